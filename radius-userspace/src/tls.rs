//! RADIUS/TLS (RFC 6614) certificates: the files of `[tls]` read into a rustls server
//! configuration (TLS 1.2 and 1.3, ring as the crypto provider, no OpenSSL), with a client
//! certificate required and checked against the configured CA; then, per client, the names
//! and fingerprints its certificate must show ([`check_peer`]). Every error names the file
//! and the key it came from; nothing here echoes a key's bytes. What a handshake failure
//! means, as a metric label, is [`failure_reason`].
//!
//! ALPN (RFC 9765): listeners and upstreams offer the configured `alpn` list
//! (`radius/1.1`, `radius/1.0`, in the order of preference); [`negotiated`] says, after a
//! handshake, whether the connection speaks RADIUS/1.1, or why it must close (1.1 required
//! and not agreed, or agreed below TLS 1.3). A peer that sends no ALPN (FreeRADIUS 3.2,
//! radsecproxy 1.9) gets RADIUS/TLS, unless 1.1 is required.

use std::{path::PathBuf, sync::Arc};

use rustls::{
    CertificateError, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::client::CertificateMatch;

/// `[tls]`: the files a TLS listener needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The listener's certificate chain (PEM), leaf first.
    pub certificate: PathBuf,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates (PEM) that NASes' client certificates must chain to.
    pub ca: PathBuf,
    /// ALPN protocols accepted, in the order of preference.
    pub alpn: Vec<String>,
}

/// RFC 9765's ALPN names.
pub const RADIUS_11: &str = "radius/1.1";
pub const RADIUS_10: &str = "radius/1.0";

/// The default `alpn` of listeners and upstreams: RADIUS/1.1 when the peer offers it, else
/// RADIUS/TLS (RFC 9765's "allow", which it asks to be the default).
pub fn default_alpn() -> Vec<String> {
    vec![RADIUS_11.to_owned(), RADIUS_10.to_owned()]
}

/// Checks an `alpn` list: known names, at least one, none twice.
pub fn check_alpn(names: &[String]) -> Result<(), String> {
    if names.is_empty() {
        return Err(format!(
            "name at least one of \"{RADIUS_11}\", \"{RADIUS_10}\""
        ));
    }
    for (i, n) in names.iter().enumerate() {
        if n != RADIUS_11 && n != RADIUS_10 {
            return Err(format!(
                "\"{n}\" is not a RADIUS ALPN name (\"{RADIUS_11}\", \"{RADIUS_10}\")"
            ));
        }
        if names[..i].contains(n) {
            return Err(format!("\"{n}\" is named twice"));
        }
    }
    Ok(())
}

fn alpn_wire(names: &[String]) -> Vec<Vec<u8>> {
    names.iter().map(|n| n.as_bytes().to_vec()).collect()
}

/// What a finished handshake agreed on: `Ok(true)` for RADIUS/1.1, `Ok(false)` for
/// RADIUS/TLS; `Err` (a metric label) when the connection must close: 1.1 is required
/// (`offered` lacks `radius/1.0`) and was not agreed, or it was agreed below TLS 1.3.
pub fn negotiated<D>(
    session: &rustls::ConnectionCommon<D>,
    offered: &[Vec<u8>],
) -> Result<bool, &'static str> {
    let v11 = session.alpn_protocol() == Some(RADIUS_11.as_bytes());
    if v11 && session.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Err("alpn_below_tls13");
    }
    let required = !offered.is_empty() && !offered.iter().any(|p| p == RADIUS_10.as_bytes());
    if required && !v11 {
        return Err("alpn_refused");
    }
    Ok(v11)
}

/// A TLS file that does not do: which, under which key, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
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

/// The certificates of a PEM file, each parsed and within its dates: a certificate that
/// has expired (or is not valid yet) is named with its subject and date, at start and by
/// check-config, rather than found out at the first handshake.
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
    for der in &certs {
        within_dates(der).map_err(|m| error(file, key, m))?;
    }
    Ok(certs)
}

fn within_dates(der: &[u8]) -> Result<(), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("not a certificate: {e}"))?;
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    let subject = cert.subject();
    if now > v.not_after {
        return Err(format!("\"{subject}\" expired on {}", v.not_after));
    }
    if now < v.not_before {
        return Err(format!(
            "\"{subject}\" is not valid before {}",
            v.not_before
        ));
    }
    Ok(())
}

/// Reads and checks the files: readable, parsed, the key matches the certificate, the CA
/// usable. The server configuration every TLS listener shares.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(provider());
    let chain = certificates(&files.certificate, "tls.certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        // The parser's message is about the PEM framing; it never holds key bytes.
        .map_err(|e| error(&files.key, "tls.key", e))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca, "tls.ca")? {
        roots.add(ca).map_err(|e| error(&files.ca, "tls.ca", e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| error(&files.ca, "tls.ca", e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&files.certificate, "tls.certificate", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        // Also where a key that is not the certificate's is found.
        .map_err(|e| error(&files.key, "tls.key", e))?;
    config.alpn_protocols = alpn_wire(&files.alpn);
    Ok(Arc::new(config))
}

/// A client's pinned fingerprint, "sha256:" and 64 hex digits (colons between bytes
/// allowed, either case).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let hex = text
        .strip_prefix("sha256:")
        .ok_or("a fingerprint is written \"sha256:\" and 64 hex digits")?
        .replace(':', "");
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("a SHA-256 fingerprint has 64 hex digits".into());
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| "a SHA-256 fingerprint has 64 hex digits".to_owned())?;
    }
    Ok(out)
}

/// The SHA-256 fingerprint of a certificate (its DER).
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(der).into()
}

/// Whether the certificate a TLS peer presented (`der`, already verified against the CA)
/// shows what its client requires; `Err` is the metric label of the refusal.
pub fn check_peer(required: &CertificateMatch, der: &[u8]) -> Result<(), &'static str> {
    if !required.fingerprints.is_empty() && !required.fingerprints.contains(&fingerprint(der)) {
        return Err("fingerprint_mismatch");
    }
    if required.names.is_empty() {
        return Ok(());
    }
    let der = CertificateDer::from(der);
    let cert = webpki::EndEntityCert::try_from(&der).map_err(|_| "bad_certificate")?;
    let named = required.names.iter().any(|n| {
        ServerName::try_from(n.as_str())
            .is_ok_and(|name| cert.verify_is_valid_for_subject_name(&name).is_ok())
    });
    if named { Ok(()) } else { Err("name_mismatch") }
}

/// Moves what a TLS session (of a listener's connection or an upstream's) has to send:
/// records, alerts, handshake messages, into `out`.
pub fn drain<D>(session: &mut rustls::ConnectionCommon<D>, out: &mut Vec<u8>) {
    while session.wants_write() {
        if session.write_tls(out).is_err() {
            break;
        }
    }
}

/// Bytes read from a TLS connection: records into the session, plaintext into the
/// deframer. `Err` is why the connection must close (the metric label; `"peer"` when the
/// peer said goodbye).
pub fn read_records<D>(
    session: &mut rustls::ConnectionCommon<D>,
    mut bytes: &[u8],
    deframer: &mut crate::stream::Deframer,
    now: std::time::Instant,
) -> Result<(), &'static str> {
    use std::io::Read as _;
    let mut plain = [0u8; 4096];
    while !bytes.is_empty() {
        session.read_tls(&mut bytes).map_err(|_| "tls_error")?;
        session
            .process_new_packets()
            .map_err(|e| failure_reason(&e))?;
        loop {
            match session.reader().read(&mut plain) {
                // close_notify: the peer is done.
                Ok(0) => return Err("peer"),
                Ok(m) => deframer.push(&plain[..m], now),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Err("peer"),
            }
        }
    }
    Ok(())
}

/// ring, whose provider rustls marks deprecated for its lack of post-quantum key exchange;
/// aws-lc-rs has it but builds with cmake and NASM. RADIUS peers (FreeRADIUS 3.2,
/// radsecproxy 1.9) offer no post-quantum group either.
#[expect(
    deprecated,
    reason = "ring has no post-quantum key exchange; see above"
)]
pub(crate) fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// What an upstream over RADIUS/TLS needs: whom to trust, what to present, and the name
/// its certificate must show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// CA certificates (PEM) the upstream's certificate must chain to.
    pub ca: PathBuf,
    /// The sidecar's client certificate chain and key (PEM).
    pub certificate: PathBuf,
    pub key: PathBuf,
    /// The name (DNS or IP) its certificate must hold.
    pub name: String,
    /// ALPN protocols offered, in the order of preference.
    pub alpn: Vec<String>,
}

/// Reads an upstream's TLS files into a rustls client configuration, and the name to
/// verify its certificate against.
pub fn client_config(
    files: &UpstreamTlsFiles,
) -> Result<(Arc<rustls::ClientConfig>, ServerName<'static>), TlsError> {
    let provider = Arc::new(provider());
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca, "upstream.tls_ca")? {
        roots
            .add(ca)
            .map_err(|e| error(&files.ca, "upstream.tls_ca", e))?;
    }
    let chain = certificates(&files.certificate, "upstream.tls_certificate")?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| error(&files.key, "upstream.tls_key", e))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| error(&files.certificate, "upstream.tls_certificate", e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| error(&files.key, "upstream.tls_key", e))?;
    config.alpn_protocols = alpn_wire(&files.alpn);
    let name = ServerName::try_from(files.name.clone()).map_err(|e| TlsError {
        file: PathBuf::new(),
        key: "upstream.tls_name",
        message: e.to_string(),
    })?;
    Ok((Arc::new(config), name))
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
            alpn: default_alpn(),
        }
    }

    #[test]
    fn fingerprints_are_read_with_or_without_colons_and_nothing_else() {
        let hex = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&format!("sha256:{hex}")), Ok([0xab; 32]));
        assert_eq!(
            parse_fingerprint(&format!("sha256:{colons}")),
            Ok([0xab; 32])
        );
        assert!(parse_fingerprint(&hex).is_err(), "the algorithm is named");
        assert!(parse_fingerprint("sha256:abcd").is_err());
        assert!(parse_fingerprint(&format!("sha256:{}", "zz".repeat(32))).is_err());
    }

    #[test]
    fn a_certificate_is_held_against_its_clients_names_and_fingerprints() {
        let mut p = rcgen::CertificateParams::new(vec!["nas1.example.org".to_owned()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress("192.0.2.2".parse().unwrap()));
        let key = rcgen::KeyPair::generate().unwrap();
        let der = p.self_signed(&key).unwrap().der().to_vec();
        let need = |names: &[&str], fingerprints: Vec<[u8; 32]>| CertificateMatch {
            names: names.iter().map(|n| n.to_string()).collect(),
            fingerprints,
        };
        assert_eq!(check_peer(&need(&[], vec![]), &der), Ok(()));
        assert_eq!(
            check_peer(&need(&["nas1.example.org"], vec![]), &der),
            Ok(())
        );
        assert_eq!(
            check_peer(&need(&["other", "192.0.2.2"], vec![]), &der),
            Ok(())
        );
        assert_eq!(
            check_peer(&need(&["nas2.example.org"], vec![]), &der),
            Err("name_mismatch")
        );
        assert_eq!(
            check_peer(&need(&[], vec![fingerprint(&der)]), &der),
            Ok(())
        );
        assert_eq!(
            check_peer(&need(&["nas1.example.org"], vec![[0; 32]]), &der),
            Err("fingerprint_mismatch")
        );
    }

    #[test]
    fn an_expired_certificate_is_named_with_its_file_key_and_date() {
        let dir = std::env::temp_dir().join(format!("rs-tls-expired-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut p = rcgen::CertificateParams::new(vec!["old".to_owned()]).unwrap();
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
        std::fs::write(dir.join("ca.pem"), cert.pem()).unwrap();
        let e = server_config(&files(&dir)).err().unwrap();
        assert_eq!(e.key, "tls.certificate");
        assert!(e.to_string().contains("expired on"), "{e}");
        assert!(e.to_string().contains("2021"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_or_empty_file_is_named_with_its_key() {
        let dir = std::env::temp_dir().join(format!("rs-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = server_config(&files(&dir)).err().unwrap();
        assert_eq!(e.key, "tls.certificate");
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
