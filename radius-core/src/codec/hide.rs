//! Hidden attribute values: User-Password (RFC 2865 5.2), Tunnel-Password (RFC 2868 3.5,
//! salted, tagged) and MS-MPPE-Send-Key / MS-MPPE-Recv-Key (RFC 2548 2.4.2-3, salted).
//!
//! All three XOR the value, 16 bytes at a time, with b1 = MD5(secret | iv) and
//! b(i) = MD5(secret | c(i-1)), where the iv is the request authenticator (plus the salt
//! for the salted kinds). [`rehide`] moves a value from one (secret, authenticator) to
//! another block by block, so no more than one 16-byte block of clear text exists at a
//! time, on the stack, and it is zeroized before returning.

use md5::{Digest, Md5};
use zeroize::Zeroize;

use super::attr;

/// The most a hidden value may carry (RFC 2865: 128 bytes for User-Password; salted values
/// are bounded by the attribute size).
pub const MAX_HIDDEN: usize = 240;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HideError {
    #[error("hidden value of {len} bytes is not a non-zero multiple of 16")]
    BadCipherLength { len: usize },
    #[error("clear text of {len} bytes is longer than {max}")]
    TooLong { len: usize, max: usize },
    #[error("salted value of {len} bytes is too short for its salt")]
    NoSalt { len: usize },
    #[error("the clear text's length byte ({claimed}) exceeds what the value holds")]
    BadInnerLength { claimed: usize },
}

/// Which hiding an attribute uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hiding {
    /// RFC 2865 User-Password.
    UserPassword,
    /// RFC 2868 Tunnel-Password: tag byte, then salt, then the salted cipher.
    TunnelPassword,
    /// RFC 2548 MS-MPPE keys: salt, then the salted cipher.
    Mppe,
}

/// MD5(secret | parts...).
fn block_key(secret: &[u8], parts: &[&[u8]]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(secret);
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

/// Encrypts `data` (a multiple of 16 bytes) in place. The key of the block after the last
/// is never computed: each MD5 block costs ~125 ns here.
fn encrypt(data: &mut [u8], secret: &[u8], iv: &[&[u8]]) {
    let mut b = block_key(secret, iv);
    let mut chunks = data.chunks_mut(16).peekable();
    while let Some(chunk) = chunks.next() {
        for (c, k) in chunk.iter_mut().zip(b.iter()) {
            *c ^= k;
        }
        if chunks.peek().is_some() {
            b = block_key(secret, &[chunk]);
        }
    }
    b.zeroize();
}

/// Decrypts `data` (a multiple of 16 bytes) in place.
fn decrypt(data: &mut [u8], secret: &[u8], iv: &[&[u8]]) {
    let mut b = block_key(secret, iv);
    let mut chunks = data.chunks_mut(16).peekable();
    while let Some(chunk) = chunks.next() {
        let next = chunks.peek().is_some().then(|| block_key(secret, &[chunk]));
        for (c, k) in chunk.iter_mut().zip(b.iter()) {
            *c ^= k;
        }
        if let Some(n) = next {
            b = n;
        }
    }
    b.zeroize();
}

/// Re-encrypts `data` from (secret_a, iv_a) to (secret_b, iv_b) in place, one block of
/// clear text at a time.
fn reencrypt(data: &mut [u8], a: (&[u8], &[&[u8]]), b: (&[u8], &[&[u8]])) {
    let mut ka = block_key(a.0, a.1);
    let mut kb = block_key(b.0, b.1);
    let mut plain = [0u8; 16];
    let mut chunks = data.chunks_mut(16).peekable();
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let next_a = (!last).then(|| block_key(a.0, &[chunk]));
        for i in 0..16 {
            plain[i] = chunk[i] ^ ka[i];
            chunk[i] = plain[i] ^ kb[i];
        }
        if let Some(n) = next_a {
            ka = n;
            kb = block_key(b.0, &[chunk]);
        }
    }
    plain.zeroize();
    ka.zeroize();
    kb.zeroize();
}

/// Hides a User-Password: `out` gets the cipher text (clear text padded with zeros to a
/// multiple of 16); returns its length.
pub fn hide_user_password(
    clear: &[u8],
    secret: &[u8],
    auth: &[u8; 16],
    out: &mut [u8],
) -> Result<usize, HideError> {
    if clear.len() > 128 {
        return Err(HideError::TooLong {
            len: clear.len(),
            max: 128,
        });
    }
    let n = clear.len().div_ceil(16).max(1) * 16;
    if out.len() < n {
        return Err(HideError::TooLong {
            len: n,
            max: out.len(),
        });
    }
    out[..n].fill(0);
    out[..clear.len()].copy_from_slice(clear);
    encrypt(&mut out[..n], secret, &[auth]);
    Ok(n)
}

/// Reveals a User-Password into `out` (trailing zero padding removed); returns its length.
/// The caller owns `out` and should zeroize it.
pub fn reveal_user_password(
    cipher: &[u8],
    secret: &[u8],
    auth: &[u8; 16],
    out: &mut [u8],
) -> Result<usize, HideError> {
    if cipher.is_empty() || !cipher.len().is_multiple_of(16) || cipher.len() > 128 {
        return Err(HideError::BadCipherLength { len: cipher.len() });
    }
    if out.len() < cipher.len() {
        return Err(HideError::TooLong {
            len: cipher.len(),
            max: out.len(),
        });
    }
    let out = &mut out[..cipher.len()];
    out.copy_from_slice(cipher);
    decrypt(out, secret, &[auth]);
    Ok(out.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1))
}

/// Hides a salted value (Tunnel-Password without its tag, or an MPPE key): `out` gets
/// salt | cipher of (length byte | clear | zero padding); returns the bytes written.
pub fn hide_salted(
    clear: &[u8],
    salt: [u8; 2],
    secret: &[u8],
    auth: &[u8; 16],
    out: &mut [u8],
) -> Result<usize, HideError> {
    let n = (clear.len() + 1).div_ceil(16) * 16;
    if clear.len() > 255 || 2 + n > out.len() || 2 + n > MAX_HIDDEN + 18 {
        return Err(HideError::TooLong {
            len: clear.len(),
            max: out.len().saturating_sub(3),
        });
    }
    let salt = [salt[0] | 0x80, salt[1]];
    out[..2].copy_from_slice(&salt);
    let body = &mut out[2..2 + n];
    body.fill(0);
    body[0] = clear.len() as u8;
    body[1..1 + clear.len()].copy_from_slice(clear);
    encrypt(body, secret, &[auth, &salt]);
    Ok(2 + n)
}

/// Reveals a salted value (salt | cipher) into `out`; returns the clear text's length.
pub fn reveal_salted(
    value: &[u8],
    secret: &[u8],
    auth: &[u8; 16],
    out: &mut [u8],
) -> Result<usize, HideError> {
    if value.len() < 2 + 16 {
        return Err(HideError::NoSalt { len: value.len() });
    }
    let (salt, cipher) = value.split_at(2);
    if !cipher.len().is_multiple_of(16) {
        return Err(HideError::BadCipherLength { len: cipher.len() });
    }
    let mut tmp = [0u8; MAX_HIDDEN + 16];
    if cipher.len() > tmp.len() {
        return Err(HideError::BadCipherLength { len: cipher.len() });
    }
    let body = &mut tmp[..cipher.len()];
    body.copy_from_slice(cipher);
    decrypt(body, secret, &[auth, salt]);
    let len = body[0] as usize;
    let result = if len + 1 > body.len() || len > out.len() {
        Err(HideError::BadInnerLength { claimed: len })
    } else {
        out[..len].copy_from_slice(&body[1..1 + len]);
        Ok(len)
    };
    tmp.zeroize();
    result
}

/// Moves one hidden value, in place, from (secret_a, auth_a) to (secret_b, auth_b). `value`
/// is the attribute's value as on the wire (for Tunnel-Password, tag byte first; for MPPE,
/// the vendor sub-attribute's value). Salts are kept: they stay unique within the packet.
pub fn rehide(
    kind: Hiding,
    value: &mut [u8],
    a: (&[u8], &[u8; 16]),
    b: (&[u8], &[u8; 16]),
) -> Result<(), HideError> {
    match kind {
        Hiding::UserPassword => {
            if value.is_empty() || !value.len().is_multiple_of(16) {
                return Err(HideError::BadCipherLength { len: value.len() });
            }
            reencrypt(value, (a.0, &[a.1]), (b.0, &[b.1]));
        }
        Hiding::TunnelPassword | Hiding::Mppe => {
            let skip = usize::from(kind == Hiding::TunnelPassword);
            let v = value.get_mut(skip..).unwrap_or_default();
            if v.len() < 2 + 16 {
                return Err(HideError::NoSalt { len: v.len() });
            }
            let (salt, cipher) = v.split_at_mut(2);
            if !cipher.len().is_multiple_of(16) {
                return Err(HideError::BadCipherLength { len: cipher.len() });
            }
            let salt: &[u8] = salt;
            reencrypt(cipher, (a.0, &[a.1, salt]), (b.0, &[b.1, salt]));
        }
    }
    Ok(())
}

/// How an attribute of a packet is hidden, if it is: `(offset of the hidden value, length,
/// kind)`. Knows the standard types and the Microsoft MPPE keys inside Vendor-Specific.
pub fn hidden_in(ty: u8, value: &[u8], value_offset: usize) -> Option<(usize, usize, Hiding)> {
    match ty {
        attr::USER_PASSWORD => Some((value_offset, value.len(), Hiding::UserPassword)),
        attr::TUNNEL_PASSWORD => Some((value_offset, value.len(), Hiding::TunnelPassword)),
        attr::VENDOR_SPECIFIC if value.len() >= 6 => {
            let vendor = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
            let (sub, sub_len) = (value[4], value[5] as usize);
            // One MPPE key per VSA, as every implementation sends them.
            if vendor == attr::VENDOR_MICROSOFT
                && matches!(sub, attr::MS_MPPE_SEND_KEY | attr::MS_MPPE_RECV_KEY)
                && sub_len + 4 == value.len()
                && sub_len >= 2
            {
                Some((value_offset + 6, sub_len - 2, Hiding::Mppe))
            } else {
                None
            }
        }
        _ => None,
    }
}
