//! Authenticators and Message-Authenticator (RFC 2865, 2866, 2869, 3579, 5176).
//!
//! - Access-Request and Status-Server carry 16 random bytes from the OS CSPRNG.
//! - Accounting-Request, CoA-Request and Disconnect-Request carry
//!   MD5(Code | Id | Length | 16 zero bytes | Attributes | Secret).
//! - Responses carry MD5(Code | Id | Length | Request Authenticator | Attributes | Secret).
//! - Message-Authenticator is HMAC-MD5(secret, packet) with the attribute's value zeroed and
//!   the authenticator field holding: the packet's own random authenticator (Access-Request,
//!   Status-Server), zeros (other requests), or the request's authenticator (responses).
//!   It is computed first; the MD5 authenticators then cover it.
//!
//! Verification compares in constant time.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use subtle::ConstantTimeEq;

use super::{HEADER_LEN, packet::Code};

type HmacMd5 = Hmac<Md5>;

/// A shared secret. Plain bytes work; [`Secret`] also keeps the HMAC-MD5 key schedule so
/// each Message-Authenticator costs two MD5 blocks less (hold one per client and upstream).
pub trait SharedSecret {
    fn bytes(&self) -> &[u8];
    fn hmac(&self) -> HmacMd5 {
        // HMAC takes keys of any length; the error is for fixed-size MACs only.
        HmacMd5::new_from_slice(self.bytes()).unwrap_or_else(|_| unreachable!())
    }
}

impl SharedSecret for [u8] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl<const N: usize> SharedSecret for [u8; N] {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A secret with its HMAC-MD5 key schedule computed once; zeroized on drop.
#[derive(Clone)]
pub struct Secret {
    bytes: zeroize::Zeroizing<Vec<u8>>,
    hmac: HmacMd5,
}

impl Secret {
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            bytes: zeroize::Zeroizing::new(bytes.to_vec()),
            hmac: bytes.hmac(),
        }
    }
}

impl std::fmt::Debug for Secret {
    // Never print a secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.bytes.len())
    }
}

impl SharedSecret for Secret {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    fn hmac(&self) -> HmacMd5 {
        self.hmac.clone()
    }
}

/// 16 bytes from a CSPRNG: `rand`'s thread-local ChaCha12, seeded and periodically
/// reseeded from the operating system (a system call per packet would cost ~370 ns here).
pub fn random_authenticator() -> [u8; 16] {
    use rand::Rng as _;
    let mut a = [0u8; 16];
    rand::rng().fill(&mut a);
    a
}

/// Fills `buf` from the same CSPRNG.
pub fn fill_random(buf: &mut [u8]) {
    use rand::Rng as _;
    rand::rng().fill(buf);
}

/// MD5 over `packet` (its length field already set) with `auth` in place of its
/// authenticator field, then `secret`.
fn md5_over(packet: &[u8], auth: &[u8; 16], secret: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(&packet[..4]);
    h.update(auth);
    h.update(&packet[HEADER_LEN..]);
    h.update(secret);
    h.finalize().into()
}

/// The Request Authenticator of an Accounting-, CoA- or Disconnect-Request (RFC 2866 3).
pub fn request_authenticator<S: SharedSecret + ?Sized>(packet: &[u8], secret: &S) -> [u8; 16] {
    md5_over(packet, &[0; 16], secret.bytes())
}

/// The Response Authenticator of a reply to a request with `request_auth` (RFC 2865 3).
pub fn response_authenticator<S: SharedSecret + ?Sized>(
    packet: &[u8],
    request_auth: &[u8; 16],
    secret: &S,
) -> [u8; 16] {
    md5_over(packet, request_auth, secret.bytes())
}

/// What the authenticator field holds while the Message-Authenticator is computed.
pub fn message_authenticator_basis(
    code: Code,
    own_auth: &[u8; 16],
    request_auth: Option<&[u8; 16]>,
) -> [u8; 16] {
    if code.has_random_authenticator() {
        *own_auth
    } else if code.is_request() {
        [0; 16]
    } else {
        request_auth.copied().unwrap_or([0; 16])
    }
}

/// HMAC-MD5 of `packet` with `basis` as its authenticator and the 16 value bytes at
/// `ma_value` (offset of the Message-Authenticator's value) taken as zeros.
pub fn message_authenticator<S: SharedSecret + ?Sized>(
    packet: &[u8],
    basis: &[u8; 16],
    ma_value: usize,
    secret: &S,
) -> [u8; 16] {
    let mut mac = secret.hmac();
    mac.update(&packet[..4]);
    mac.update(basis);
    mac.update(&packet[HEADER_LEN..ma_value]);
    mac.update(&[0u8; 16]);
    mac.update(&packet[ma_value + 16..]);
    mac.finalize().into_bytes().into()
}

/// Constant-time equality of two 16-byte values.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Why a packet's signature does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("the authenticator does not match the shared secret")]
    BadAuthenticator,
    #[error("the Message-Authenticator does not match the shared secret")]
    BadMessageAuthenticator,
    #[error("a Message-Authenticator is required and missing")]
    MissingMessageAuthenticator,
    #[error("a response needs the request's authenticator to be verified")]
    NoRequestAuthenticator,
}

/// Checks a parsed packet against `secret`: its authenticator (except the random ones of
/// Access-Request and Status-Server) and, when present, its Message-Authenticator.
/// `request_auth` is the authenticator of the request a response answers.
pub fn verify<S: SharedSecret + ?Sized>(
    packet: &super::Packet<'_>,
    secret: &S,
    request_auth: Option<&[u8; 16]>,
) -> Result<(), VerifyError> {
    let bytes = packet.as_bytes();
    let code = packet.code();
    if !code.has_random_authenticator() {
        let expected = if code.is_request() {
            request_authenticator(bytes, secret)
        } else {
            let req = request_auth.ok_or(VerifyError::NoRequestAuthenticator)?;
            response_authenticator(bytes, req, secret)
        };
        if !ct_eq(&expected, packet.authenticator()) {
            return Err(VerifyError::BadAuthenticator);
        }
    }
    if let Some(off) = packet.message_authenticator_offset() {
        if !code.is_request() && request_auth.is_none() {
            return Err(VerifyError::NoRequestAuthenticator);
        }
        let basis = message_authenticator_basis(code, packet.authenticator(), request_auth);
        let mac = message_authenticator(bytes, &basis, off + 2, secret);
        if !ct_eq(&mac, &bytes[off + 2..off + 18]) {
            return Err(VerifyError::BadMessageAuthenticator);
        }
    }
    Ok(())
}
