//! Parsing: a validated, zero-copy view of one RADIUS packet.
//!
//! [`Packet::parse`] checks everything once (lengths, code, every attribute header, the
//! Message-Authenticator rules of RFC 3579) and remembers the offsets later steps need, so
//! reading attributes after it cannot fail and allocates nothing.

use super::{HEADER_LEN, MAX_PACKET_LEN, attr};

/// Packet codes of RFC 2865, 2866, 5176, 5997 and 7930.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Code {
    AccessRequest = 1,
    AccessAccept = 2,
    AccessReject = 3,
    AccountingRequest = 4,
    AccountingResponse = 5,
    AccessChallenge = 11,
    StatusServer = 12,
    StatusClient = 13,
    DisconnectRequest = 40,
    DisconnectAck = 41,
    DisconnectNak = 42,
    CoaRequest = 43,
    CoaAck = 44,
    CoaNak = 45,
    ProtocolError = 52,
}

impl Code {
    pub const ALL: [Code; 15] = [
        Code::AccessRequest,
        Code::AccessAccept,
        Code::AccessReject,
        Code::AccountingRequest,
        Code::AccountingResponse,
        Code::AccessChallenge,
        Code::StatusServer,
        Code::StatusClient,
        Code::DisconnectRequest,
        Code::DisconnectAck,
        Code::DisconnectNak,
        Code::CoaRequest,
        Code::CoaAck,
        Code::CoaNak,
        Code::ProtocolError,
    ];

    pub fn from_u8(v: u8) -> Option<Code> {
        Code::ALL.iter().copied().find(|c| *c as u8 == v)
    }

    /// Requests carry a Request Authenticator; the rest answer one.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Code::AccessRequest
                | Code::AccountingRequest
                | Code::StatusServer
                | Code::StatusClient
                | Code::DisconnectRequest
                | Code::CoaRequest
        )
    }

    /// Requests whose authenticator is random (RFC 2865, RFC 5997); other requests carry
    /// an MD5 over the packet and the secret (RFC 2866, RFC 5176).
    pub fn has_random_authenticator(self) -> bool {
        matches!(self, Code::AccessRequest | Code::StatusServer)
    }

    pub fn name(self) -> &'static str {
        match self {
            Code::AccessRequest => "Access-Request",
            Code::AccessAccept => "Access-Accept",
            Code::AccessReject => "Access-Reject",
            Code::AccountingRequest => "Accounting-Request",
            Code::AccountingResponse => "Accounting-Response",
            Code::AccessChallenge => "Access-Challenge",
            Code::StatusServer => "Status-Server",
            Code::StatusClient => "Status-Client",
            Code::DisconnectRequest => "Disconnect-Request",
            Code::DisconnectAck => "Disconnect-ACK",
            Code::DisconnectNak => "Disconnect-NAK",
            Code::CoaRequest => "CoA-Request",
            Code::CoaAck => "CoA-ACK",
            Code::CoaNak => "CoA-NAK",
            Code::ProtocolError => "Protocol-Error",
        }
    }
}

/// Why a datagram is not a valid RADIUS packet. Every variant says which check failed and
/// where (`offset` counts from the start of the packet).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("datagram of {len} bytes is shorter than the 20-byte header")]
    ShortHeader { len: usize },
    #[error("unknown packet code {code} at offset 0")]
    UnknownCode { code: u8 },
    #[error("length field {length} at offset 2 is below the 20-byte minimum")]
    LengthTooSmall { length: usize },
    #[error("length field {length} at offset 2 is above the 4096-byte maximum")]
    LengthTooLarge { length: usize },
    #[error("length field {length} at offset 2 is larger than the {datagram}-byte datagram")]
    LengthPastDatagram { length: usize, datagram: usize },
    #[error("attribute at offset {offset} has no room for its 2-byte header")]
    AttributeHeaderTruncated { offset: usize },
    #[error("attribute {ty} at offset {offset} has length {length} (minimum 2)")]
    AttributeTooShort { offset: usize, ty: u8, length: u8 },
    #[error(
        "attribute {ty} at offset {offset} with length {length} runs past the packet end ({end})"
    )]
    AttributePastEnd {
        offset: usize,
        ty: u8,
        length: u8,
        end: usize,
    },
    #[error("second Message-Authenticator at offset {offset}")]
    DuplicateMessageAuthenticator { offset: usize },
    #[error("Message-Authenticator at offset {offset} has length {length} (must be 18)")]
    BadMessageAuthenticatorLength { offset: usize, length: u8 },
    #[error("EAP-Message at offset {offset} without a Message-Authenticator (RFC 3579)")]
    EapWithoutMessageAuthenticator { offset: usize },
}

/// A validated packet over borrowed bytes. Trailing bytes past the length field are
/// padding (RFC 2865 section 3) and are not part of [`Packet::as_bytes`].
#[derive(Clone, Copy, Debug)]
pub struct Packet<'a> {
    bytes: &'a [u8],
    code: Code,
    /// Offset of the Message-Authenticator attribute (its type byte), if any.
    message_authenticator: Option<u16>,
}

impl<'a> Packet<'a> {
    /// Validates `datagram` and returns a view of the packet in it.
    pub fn parse(datagram: &'a [u8]) -> Result<Self, ParseError> {
        Self::parse_profile(datagram, true)
    }

    /// As [`Packet::parse`], for RADIUS/1.1 (RFC 9765), where no Message-Authenticator is
    /// sent: an EAP-Message needs none.
    pub fn parse_v11(datagram: &'a [u8]) -> Result<Self, ParseError> {
        Self::parse_profile(datagram, false)
    }

    fn parse_profile(datagram: &'a [u8], eap_needs_ma: bool) -> Result<Self, ParseError> {
        if datagram.len() < HEADER_LEN {
            return Err(ParseError::ShortHeader {
                len: datagram.len(),
            });
        }
        let code =
            Code::from_u8(datagram[0]).ok_or(ParseError::UnknownCode { code: datagram[0] })?;
        let length = u16::from_be_bytes([datagram[2], datagram[3]]) as usize;
        if length < HEADER_LEN {
            return Err(ParseError::LengthTooSmall { length });
        }
        if length > MAX_PACKET_LEN {
            return Err(ParseError::LengthTooLarge { length });
        }
        if length > datagram.len() {
            return Err(ParseError::LengthPastDatagram {
                length,
                datagram: datagram.len(),
            });
        }
        let bytes = &datagram[..length];
        let mut message_authenticator = None;
        let mut eap = None;
        let mut off = HEADER_LEN;
        while off < length {
            if off + 2 > length {
                return Err(ParseError::AttributeHeaderTruncated { offset: off });
            }
            let (ty, alen) = (bytes[off], bytes[off + 1]);
            if alen < 2 {
                return Err(ParseError::AttributeTooShort {
                    offset: off,
                    ty,
                    length: alen,
                });
            }
            if off + alen as usize > length {
                return Err(ParseError::AttributePastEnd {
                    offset: off,
                    ty,
                    length: alen,
                    end: length,
                });
            }
            match ty {
                attr::MESSAGE_AUTHENTICATOR => {
                    if message_authenticator.is_some() {
                        return Err(ParseError::DuplicateMessageAuthenticator { offset: off });
                    }
                    if alen != 18 {
                        return Err(ParseError::BadMessageAuthenticatorLength {
                            offset: off,
                            length: alen,
                        });
                    }
                    message_authenticator = Some(off as u16);
                }
                attr::EAP_MESSAGE if eap.is_none() => eap = Some(off),
                _ => {}
            }
            off += alen as usize;
        }
        if let (Some(offset), None, true) = (eap, message_authenticator, eap_needs_ma) {
            return Err(ParseError::EapWithoutMessageAuthenticator { offset });
        }
        Ok(Self {
            bytes,
            code,
            message_authenticator,
        })
    }

    pub fn code(&self) -> Code {
        self.code
    }

    pub fn identifier(&self) -> u8 {
        self.bytes[1]
    }

    /// The length field (the packet without padding).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn authenticator(&self) -> &'a [u8; 16] {
        self.bytes[4..20]
            .try_into()
            .unwrap_or_else(|_| unreachable!("header checked in parse"))
    }

    /// The packet's bytes, up to its length field.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Offset of the Message-Authenticator attribute, when present.
    pub fn message_authenticator_offset(&self) -> Option<usize> {
        self.message_authenticator.map(usize::from)
    }

    /// Every attribute, in order.
    pub fn attributes(&self) -> Attributes<'a> {
        Attributes {
            bytes: self.bytes,
            off: HEADER_LEN,
        }
    }

    /// The first attribute of type `ty`.
    pub fn get(&self, ty: u8) -> Option<Attribute<'a>> {
        self.attributes().find(|a| a.ty == ty)
    }

    /// Every attribute of type `ty`.
    pub fn get_all(&self, ty: u8) -> impl Iterator<Item = Attribute<'a>> + 'a {
        self.attributes().filter(move |a| a.ty == ty)
    }
}

/// One attribute: its type, its value and where its header sits in the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub ty: u8,
    pub value: &'a [u8],
    pub offset: usize,
}

impl<'a> Attribute<'a> {
    /// The whole attribute, header included, as it is on the wire.
    pub fn wire_len(&self) -> usize {
        self.value.len() + 2
    }

    /// A Vendor-Specific attribute (26): vendor id and its payload.
    pub fn vendor_specific(&self) -> Option<(u32, &'a [u8])> {
        if self.ty != attr::VENDOR_SPECIFIC || self.value.len() < 4 {
            return None;
        }
        let v = &self.value;
        Some((u32::from_be_bytes([v[0], v[1], v[2], v[3]]), &v[4..]))
    }

    /// The sub-attributes of a Vendor-Specific attribute in the RFC 2865 format (1-byte
    /// type, 1-byte length); `None` when the payload does not follow it.
    pub fn vendor_attributes(&self) -> Option<(u32, SubAttributes<'a>)> {
        let (vendor, payload) = self.vendor_specific()?;
        let subs = SubAttributes::new(payload, self.offset + 6)?;
        Some((vendor, subs))
    }

    /// RFC 6929 extended types (241-244): (extended type, value).
    pub fn extended(&self) -> Option<(u8, &'a [u8])> {
        if !(attr::EXTENDED_1..=attr::EXTENDED_4).contains(&self.ty) || self.value.is_empty() {
            return None;
        }
        Some((self.value[0], &self.value[1..]))
    }

    /// RFC 6929 long extended types (245-246): (extended type, more-follows flag, fragment).
    pub fn long_extended(&self) -> Option<(u8, bool, &'a [u8])> {
        if !(attr::LONG_EXTENDED_1..=attr::LONG_EXTENDED_2).contains(&self.ty)
            || self.value.len() < 2
        {
            return None;
        }
        Some((self.value[0], self.value[1] & 0x80 != 0, &self.value[2..]))
    }
}

/// Iterator over a packet's attributes (validated by [`Packet::parse`]).
#[derive(Clone, Debug)]
pub struct Attributes<'a> {
    bytes: &'a [u8],
    off: usize,
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.off + 2 > self.bytes.len() {
            return None;
        }
        let len = self.bytes[self.off + 1] as usize;
        let value = self.bytes.get(self.off + 2..self.off + len)?;
        let a = Attribute {
            ty: self.bytes[self.off],
            value,
            offset: self.off,
        };
        self.off += len.max(2);
        Some(a)
    }
}

/// Type-length-value sub-attributes (VSA payloads in the RFC 2865 format, and TLVs).
#[derive(Clone, Debug)]
pub struct SubAttributes<'a> {
    bytes: &'a [u8],
    off: usize,
    base: usize,
}

impl<'a> SubAttributes<'a> {
    /// Checks that `bytes` is a well-formed sequence of 1-byte-type, 1-byte-length TLVs.
    /// `base` is the offset of `bytes` in the packet, for the offsets of the items.
    pub fn new(bytes: &'a [u8], base: usize) -> Option<Self> {
        let mut off = 0;
        while off < bytes.len() {
            let len = *bytes.get(off + 1)? as usize;
            if len < 2 || off + len > bytes.len() {
                return None;
            }
            off += len;
        }
        Some(Self {
            bytes,
            off: 0,
            base,
        })
    }
}

impl<'a> Iterator for SubAttributes<'a> {
    type Item = Attribute<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let len = *self.bytes.get(self.off + 1)? as usize;
        let a = Attribute {
            ty: self.bytes[self.off],
            value: self.bytes.get(self.off + 2..self.off + len)?,
            offset: self.base + self.off,
        };
        self.off += len.max(2);
        Some(a)
    }
}

/// Reassembles an RFC 6929 long-extended attribute (type `ty`, extended type `ext`) from its
/// fragments; the only allocating reader, used when such an attribute is asked for.
pub fn long_extended_value(packet: &Packet<'_>, ty: u8, ext: u8) -> Option<Vec<u8>> {
    let mut out: Option<Vec<u8>> = None;
    for a in packet.get_all(ty) {
        let Some((e, more, frag)) = a.long_extended() else {
            continue;
        };
        if e != ext {
            continue;
        }
        out.get_or_insert_with(Vec::new).extend_from_slice(frag);
        if !more {
            break;
        }
    }
    out
}
