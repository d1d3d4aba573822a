//! RADIUS/TLS (RFC 6614) certificates: the files of `[tls]` read into a rustls server
//! configuration (TLS 1.2 and 1.3, ring as the crypto provider, no OpenSSL), with a client
//! certificate required and checked against the configured CA. Every error names the file
//! and the key it came from; nothing here echoes a key's bytes. What a handshake failure
//! means, as a metric label, is [`failure_reason`].

use std::{path::PathBuf, sync::Arc};

use rustls::{
    CertificateError, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};

/// `[tls]`: the files a TLS listener needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The listener's certificate chain (PEM), leaf first.
    pub certificate: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that NASes' client certificates must chain to.
    pub ca: PathBuf,
}

/// A TLS file that does not do: which, under which key, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: tls.{key}: {message}", file.display())]
pub struct TlsError {
    pub file: PathBuf,
    pub key: &'static str,
    pub message: String,
}

fn error(file: &std::path::Path, key: &'static str, message: impl ToString) -> TlsError {
    TlsError {
        file: file.to_owned(),
        key,
        message: message.to_string(),
    }
}

fn certificates(
    file: &std::path::Path,
    key: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .map_err(|e| error(file, key, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(file, key, e))?;
    if certs.is_empty() {
        return Err(error(file, key, "no certificate in the file"));
    }
    Ok(certs)
}

/// Reads and checks the files: readable, parsed, the key matches the certificate, the CA
/// usable. The server configuration every TLS listener shares.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider());
    let chain = certificates(&files.certificate, "certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        // The parser's message is about the PEM framing; it never holds key bytes.
        .map_err(|e| error(&files.key, "key", e))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca, "ca")? {
        roots.add(ca).map_err(|e| error(&files.ca, "ca", e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| error(&files.ca, "ca", e))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&files.certificate, "certificate", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        // Also where a key that is not the certificate's is found.
        .map_err(|e| error(&files.key, "key", e))?;
    Ok(Arc::new(config))
}

/// ring, whose provider rustls marks deprecated for its lack of post-quantum key exchange;
/// aws-lc-rs has it but builds with cmake and NASM. RADIUS peers (FreeRADIUS 3.2,
/// radsecproxy 1.9) offer no post-quantum group either.
#[expect(
    deprecated,
    reason = "ring has no post-quantum key exchange; see above"
)]
fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// The metric label of a failed handshake (or of a later TLS error).
pub fn failure_reason(e: &rustls::Error) -> &'static str {
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "not_yet_valid"
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "name_mismatch"
            }
            CertificateError::Revoked => "revoked",
            CertificateError::BadSignature => "bad_signature",
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_certificate",
        rustls::Error::NoApplicationProtocol => "alpn_refused",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::AlertReceived(_) => "alert_received",
        _ => "tls_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &std::path::Path) -> TlsFiles {
        TlsFiles {
            certificate: dir.join("server.pem"),
            key: dir.join("server.key"),
            ca: dir.join("ca.pem"),
        }
    }

    #[test]
    fn a_missing_or_empty_file_is_named_with_its_key() {
        let dir = std::env::temp_dir().join(format!("rs-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = server_config(&files(&dir)).err().unwrap();
        assert_eq!(e.key, "certificate");
        assert!(
            e.to_string()
                .starts_with(&format!("{}", dir.join("server.pem").display()))
        );
        std::fs::write(dir.join("server.pem"), "not a certificate\n").unwrap();
        let e = server_config(&files(&dir)).err().unwrap();
        assert!(
            e.to_string().contains("tls.certificate: no certificate"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
