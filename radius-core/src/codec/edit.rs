//! Editing for proxying and building new packets, in place in a caller's buffer (up to
//! 4096 bytes): no allocation, at most one shift of the attribute bytes per insertion or
//! removal.
//!
//! The proxy's path over one request: [`PacketMut::from_datagram`], add Proxy-State, put
//! the Message-Authenticator first (BlastRADIUS), set the upstream's Identifier and
//! authenticator, [`PacketMut::rehide`] the hidden values, [`PacketMut::sign`]. Towards or
//! from a RADIUS/1.1 hop, [`PacketMut::reveal_all`] and [`PacketMut::hide_all`] instead.

use super::{
    HEADER_LEN, MAX_PACKET_LEN, Packet, ParseError, attr,
    auth::{self, SharedSecret, message_authenticator, message_authenticator_basis},
    hide::{self, HideError, Hiding},
    packet::Code,
};
use zeroize::Zeroize as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error("the packet would be {need} bytes; the buffer or RADIUS allows {capacity}")]
    Full { need: usize, capacity: usize },
    #[error("attribute value of {len} bytes does not fit one attribute (253 at most)")]
    ValueTooLong { len: usize },
    #[error("signing a response needs the request's authenticator")]
    NoRequestAuthenticator,
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Hide(#[from] HideError),
}

/// A packet being edited or built in a caller's buffer.
#[derive(Debug)]
pub struct PacketMut<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> PacketMut<'a> {
    /// Starts a new packet: header only, zero authenticator.
    pub fn new(buf: &'a mut [u8], code: Code, identifier: u8) -> Result<Self, EditError> {
        if buf.len() < HEADER_LEN {
            return Err(EditError::Full {
                need: HEADER_LEN,
                capacity: buf.len(),
            });
        }
        buf[0] = code as u8;
        buf[1] = identifier;
        buf[4..20].fill(0);
        let mut p = Self { buf, len: 0 };
        p.set_len(HEADER_LEN);
        Ok(p)
    }

    /// Takes the first `len` bytes of `buf` (a received datagram), validated as a packet;
    /// padding past the length field is dropped. Its framing only: whoever reads it checks
    /// what its profile asks (a Message-Authenticator beside EAP, on RADIUS but not 1.1).
    pub fn from_datagram(buf: &'a mut [u8], len: usize) -> Result<Self, EditError> {
        let plen = Packet::parse_v11(&buf[..len.min(buf.len())])?.len();
        Ok(Self { buf, len: plen })
    }

    fn capacity(&self) -> usize {
        self.buf.len().min(MAX_PACKET_LEN)
    }

    fn set_len(&mut self, len: usize) {
        self.len = len;
        self.buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// A read-only view (the buffer always holds a valid packet).
    pub fn view(&self) -> Result<Packet<'_>, ParseError> {
        Packet::parse(self.as_bytes())
    }

    pub fn code(&self) -> Option<Code> {
        Code::from_u8(self.buf[0])
    }

    pub fn set_code(&mut self, code: Code) {
        self.buf[0] = code as u8;
    }

    pub fn identifier(&self) -> u8 {
        self.buf[1]
    }

    pub fn set_identifier(&mut self, id: u8) {
        self.buf[1] = id;
    }

    pub fn authenticator(&self) -> [u8; 16] {
        let mut a = [0u8; 16];
        a.copy_from_slice(&self.buf[4..20]);
        a
    }

    pub fn set_authenticator(&mut self, auth: &[u8; 16]) {
        self.buf[4..20].copy_from_slice(auth);
    }

    /// Offsets of every attribute of type `ty`.
    fn find(&self, ty: u8) -> impl Iterator<Item = usize> + '_ {
        let mut off = HEADER_LEN;
        std::iter::from_fn(move || {
            while off + 2 <= self.len {
                let (t, l) = (self.buf[off], self.buf[off + 1] as usize);
                let here = off;
                off += l.max(2);
                if t == ty {
                    return Some(here);
                }
            }
            None
        })
    }

    /// Offset of the first attribute of type `ty`.
    fn first(&self, ty: u8) -> Option<usize> {
        self.find(ty).next()
    }

    /// The attribute whose header is at `offset`: its type and value, and the offset of the
    /// next one. None past the last.
    pub fn attribute_at(&self, offset: usize) -> Option<(u8, &[u8], usize)> {
        let l = usize::from(*self.buf.get(offset + 1)?);
        if offset + 2 > self.len {
            return None;
        }
        let value = self
            .buf
            .get(offset + 2..(offset + l.max(2)).min(self.len))?;
        Some((self.buf[offset], value, offset + l.max(2)))
    }

    /// Gives the attribute at `offset` the value `value`, where it is; returns `offset`.
    pub fn replace_at(&mut self, offset: usize, value: &[u8]) -> Result<usize, EditError> {
        if value.len() > 253 {
            return Err(EditError::ValueTooLong { len: value.len() });
        }
        let ty = self.buf[offset];
        let old = usize::from(self.buf[offset + 1]).max(2);
        let need = self.len - old + value.len() + 2;
        if need > self.capacity() {
            return Err(EditError::Full {
                need,
                capacity: self.capacity(),
            });
        }
        self.remove_at(offset);
        self.insert_at(offset, ty, value)
    }

    /// Inserts an attribute at byte offset `at` (an attribute boundary); returns `at`.
    pub fn insert_at(&mut self, at: usize, ty: u8, value: &[u8]) -> Result<usize, EditError> {
        if value.len() > 253 {
            return Err(EditError::ValueTooLong { len: value.len() });
        }
        let n = value.len() + 2;
        let need = self.len + n;
        if need > self.capacity() {
            return Err(EditError::Full {
                need,
                capacity: self.capacity(),
            });
        }
        self.buf.copy_within(at..self.len, at + n);
        self.buf[at] = ty;
        self.buf[at + 1] = n as u8;
        self.buf[at + 2..at + n].copy_from_slice(value);
        self.set_len(need);
        Ok(at)
    }

    /// Appends an attribute; returns its offset.
    pub fn push(&mut self, ty: u8, value: &[u8]) -> Result<usize, EditError> {
        self.insert_at(self.len, ty, value)
    }

    /// Appends a Vendor-Specific attribute with one sub-attribute (RFC 2865 format).
    pub fn push_vendor(&mut self, vendor: u32, sub: u8, value: &[u8]) -> Result<usize, EditError> {
        if value.len() > 247 {
            return Err(EditError::ValueTooLong { len: value.len() });
        }
        let mut v = [0u8; 253];
        v[..4].copy_from_slice(&vendor.to_be_bytes());
        v[4] = sub;
        v[5] = (value.len() + 2) as u8;
        v[6..6 + value.len()].copy_from_slice(value);
        self.push(attr::VENDOR_SPECIFIC, &v[..6 + value.len()])
    }

    /// Removes the attribute whose header is at `offset`.
    pub fn remove_at(&mut self, offset: usize) {
        let n = (self.buf[offset + 1] as usize).max(2);
        self.buf.copy_within(offset + n..self.len, offset);
        self.set_len(self.len - n);
    }

    /// Gives the first attribute of type `ty` the value `value` (where it is, so the order
    /// of attributes stays); appends one when there is none.
    pub fn replace_first(&mut self, ty: u8, value: &[u8]) -> Result<usize, EditError> {
        match self.first(ty) {
            Some(off) => {
                self.remove_at(off);
                self.insert_at(off, ty, value)
            }
            None => self.push(ty, value),
        }
    }

    /// Removes every attribute of type `ty`; returns how many.
    pub fn remove_all(&mut self, ty: u8) -> usize {
        let mut removed = 0;
        while let Some(off) = self.first(ty) {
            self.remove_at(off);
            removed += 1;
        }
        removed
    }

    /// Appends a Proxy-State (RFC 2865 5.33: proxies add theirs at the end).
    pub fn add_proxy_state(&mut self, state: &[u8]) -> Result<usize, EditError> {
        self.push(attr::PROXY_STATE, state)
    }

    /// Removes the last Proxy-State if it equals `state` (the one this proxy added);
    /// returns whether it did.
    pub fn strip_proxy_state(&mut self, state: &[u8]) -> bool {
        let Some(off) = self.find(attr::PROXY_STATE).last() else {
            return false;
        };
        let n = self.buf[off + 1] as usize;
        if self.buf[off + 2..off + n] != *state {
            return false;
        }
        self.remove_at(off);
        true
    }

    /// Makes sure a Message-Authenticator is present and first among the attributes
    /// (BlastRADIUS, CVE-2024-3596); returns its offset. Its value is set by [`sign`].
    ///
    /// [`sign`]: PacketMut::sign
    pub fn message_authenticator_first(&mut self) -> Result<usize, EditError> {
        if let Some(off) = self.first(attr::MESSAGE_AUTHENTICATOR) {
            if off == HEADER_LEN {
                return Ok(off);
            }
            self.remove_at(off);
        }
        self.insert_at(HEADER_LEN, attr::MESSAGE_AUTHENTICATOR, &[0u8; 16])
    }

    /// Moves every hidden value (User-Password, Tunnel-Password, MS-MPPE keys) from
    /// (secret_a, auth_a) to (secret_b, auth_b), in place; returns how many.
    pub fn rehide(
        &mut self,
        a: (&[u8], &[u8; 16]),
        b: (&[u8], &[u8; 16]),
    ) -> Result<usize, EditError> {
        let mut off = HEADER_LEN;
        let mut count = 0;
        while off + 2 <= self.len {
            let (ty, l) = (self.buf[off], (self.buf[off + 1] as usize).max(2));
            if let Some((at, n, kind)) = hide::hidden_in(ty, &self.buf[off + 2..off + l], off + 2) {
                hide::rehide(kind, &mut self.buf[at..at + n], a, b)?;
                count += 1;
            }
            off += l;
        }
        Ok(count)
    }

    /// Reveals every hidden value (User-Password, Tunnel-Password, MS-MPPE keys) that was
    /// hidden with (`secret`, `auth`), leaving it as its plain data type: the form RADIUS/1.1
    /// (RFC 9765 section 5.1) carries them in. Returns how many.
    pub fn reveal_all(&mut self, secret: &[u8], auth: &[u8; 16]) -> Result<usize, EditError> {
        self.recode_hidden(|kind, value, out| {
            let mut clear = [0u8; 256];
            let n = match kind {
                Hiding::UserPassword => {
                    hide::reveal_user_password(value, secret, auth, &mut clear)?
                }
                Hiding::TunnelPassword | Hiding::Mppe => {
                    let skip = usize::from(kind == Hiding::TunnelPassword);
                    out[..skip].copy_from_slice(&value[..skip]);
                    let n = hide::reveal_salted(&value[skip..], secret, auth, &mut clear)?;
                    out[skip..skip + n].copy_from_slice(&clear[..n]);
                    clear.zeroize();
                    return Ok(skip + n);
                }
            };
            out[..n].copy_from_slice(&clear[..n]);
            clear.zeroize();
            Ok(n)
        })
    }

    /// Hides every value of a hidden type, given in its plain form (from a RADIUS/1.1
    /// hop), with (`secret`, `auth`). Salts are random with the high bit set, and unique in
    /// the packet (RFC 2868 3.5). Returns how many.
    pub fn hide_all(&mut self, secret: &[u8], auth: &[u8; 16]) -> Result<usize, EditError> {
        let mut index = 0u8;
        self.recode_hidden(|kind, value, out| match kind {
            Hiding::UserPassword => Ok(hide::hide_user_password(value, secret, auth, out)?),
            Hiding::TunnelPassword | Hiding::Mppe => {
                let skip = usize::from(kind == Hiding::TunnelPassword);
                out[..skip].copy_from_slice(value.get(..skip).unwrap_or_default());
                let mut r = [0u8; 1];
                auth::fill_random(&mut r);
                let salt = [0x80 | (index & 0x7f), r[0]];
                index = index.wrapping_add(1);
                let clear = value.get(skip..).unwrap_or_default();
                Ok(skip + hide::hide_salted(clear, salt, secret, auth, &mut out[skip..])?)
            }
        })
    }

    /// Rewrites the value of every attribute that may be hidden with `f(kind, value, out)`
    /// (which returns the new value's length), whatever the lengths.
    fn recode_hidden(
        &mut self,
        mut f: impl FnMut(Hiding, &[u8], &mut [u8]) -> Result<usize, EditError>,
    ) -> Result<usize, EditError> {
        let mut off = HEADER_LEN;
        let mut count = 0;
        let mut out = [0u8; 256];
        while off + 2 <= self.len {
            let (ty, l) = (self.buf[off], (self.buf[off + 1] as usize).max(2));
            let Some((at, n, kind)) = hide::hidden_in(ty, &self.buf[off + 2..off + l], off + 2)
            else {
                off += l;
                continue;
            };
            // The attribute's value up to the hidden part (a VSA's header), then the new one.
            let head = at - (off + 2);
            let mut value = [0u8; 256];
            value[..head].copy_from_slice(&self.buf[off + 2..at]);
            let m = f(kind, &self.buf[at..at + n], &mut out)?;
            if head + m > 253 {
                out.zeroize();
                return Err(EditError::ValueTooLong { len: head + m });
            }
            value[head..head + m].copy_from_slice(&out[..m]);
            if kind == Hiding::Mppe {
                // The vendor sub-attribute's length follows its value.
                value[5] = (m + 2) as u8;
            }
            self.remove_at(off);
            let inserted = self.insert_at(off, ty, &value[..head + m]);
            value.zeroize();
            out.zeroize();
            inserted?;
            off += head + m + 2;
            count += 1;
        }
        Ok(count)
    }

    /// Signs the packet for `secret`: the Message-Authenticator's value (when present), then
    /// the authenticator. Access-Request and Status-Server keep their authenticator (set it
    /// with [`PacketMut::set_authenticator`], e.g. from [`auth::random_authenticator`]);
    /// responses need the request's authenticator.
    pub fn sign<S: SharedSecret + ?Sized>(
        &mut self,
        secret: &S,
        request_auth: Option<&[u8; 16]>,
    ) -> Result<(), EditError> {
        let code = self
            .code()
            .ok_or(ParseError::UnknownCode { code: self.buf[0] })?;
        if !code.is_request() && request_auth.is_none() {
            return Err(EditError::NoRequestAuthenticator);
        }
        let own = self.authenticator();
        if let Some(off) = self.first(attr::MESSAGE_AUTHENTICATOR) {
            let basis = message_authenticator_basis(code, &own, request_auth);
            let mac = message_authenticator(self.as_bytes(), &basis, off + 2, secret);
            self.buf[off + 2..off + 18].copy_from_slice(&mac);
        }
        if code.has_random_authenticator() {
            return Ok(());
        }
        let a = match request_auth {
            Some(req) if !code.is_request() => {
                auth::response_authenticator(self.as_bytes(), req, secret)
            }
            _ => auth::request_authenticator(self.as_bytes(), secret),
        };
        self.set_authenticator(&a);
        Ok(())
    }
}

/// A Status-Server (RFC 5997): random authenticator, Message-Authenticator, signed.
pub fn status_server<'a, S: SharedSecret + ?Sized>(
    buf: &'a mut [u8],
    id: u8,
    secret: &S,
) -> Result<PacketMut<'a>, EditError> {
    let mut p = PacketMut::new(buf, Code::StatusServer, id)?;
    p.set_authenticator(&auth::random_authenticator());
    p.message_authenticator_first()?;
    p.sign(secret, None)?;
    Ok(p)
}

/// The Accounting-Response to `request` (RFC 2866): no attributes but the Proxy-States the
/// request carried, in order (RFC 2865 5.33).
pub fn accounting_response<'a, S: SharedSecret + ?Sized>(
    buf: &'a mut [u8],
    request: &Packet<'_>,
    secret: &S,
) -> Result<PacketMut<'a>, EditError> {
    let mut p = PacketMut::new(buf, Code::AccountingResponse, request.identifier())?;
    for ps in request.get_all(attr::PROXY_STATE) {
        p.push(attr::PROXY_STATE, ps.value)?;
    }
    p.sign(secret, Some(request.authenticator()))?;
    Ok(p)
}

/// A Protocol-Error answering `request` (RFC 7930): Error-Cause, Original-Packet-Code
/// (241.4), the request's Proxy-States, a Message-Authenticator first.
pub fn protocol_error<'a, S: SharedSecret + ?Sized>(
    buf: &'a mut [u8],
    request: &Packet<'_>,
    error_cause: u32,
    secret: &S,
) -> Result<PacketMut<'a>, EditError> {
    protocol_error_to(
        buf,
        (
            request.identifier(),
            request.authenticator(),
            request.code(),
        ),
        request.get_all(attr::PROXY_STATE).map(|a| a.value),
        error_cause,
        secret,
    )
}

/// A Protocol-Error to the request `(identifier, authenticator, code)` with these
/// Proxy-States: for a proxy, whose copy of the request has already been rewritten.
pub fn protocol_error_to<'a, 'r, S: SharedSecret + ?Sized>(
    buf: &'a mut [u8],
    (id, request_auth, request_code): (u8, &[u8; 16], Code),
    proxy_states: impl Iterator<Item = &'r [u8]>,
    error_cause: u32,
    secret: &S,
) -> Result<PacketMut<'a>, EditError> {
    let mut p = PacketMut::new(buf, Code::ProtocolError, id)?;
    p.message_authenticator_first()?;
    p.push(attr::ERROR_CAUSE, &error_cause.to_be_bytes())?;
    let code = u32::from(request_code as u8).to_be_bytes();
    p.push(
        attr::EXTENDED_1,
        &[
            attr::EXT_ORIGINAL_PACKET_CODE,
            code[0],
            code[1],
            code[2],
            code[3],
        ],
    )?;
    for ps in proxy_states {
        p.push(attr::PROXY_STATE, ps)?;
    }
    p.sign(secret, Some(request_auth))?;
    Ok(p)
}
