//! The sidecar's only parser and signer of RADIUS (sans-IO: bytes in, bytes out).
//!
//! - [`packet`]: a validated zero-copy view ([`Packet::parse`]) with typed errors that name
//!   the failed check and its offset; attribute, Vendor-Specific, TLV and RFC 6929 readers.
//! - [`auth`]: Request/Response Authenticators and Message-Authenticator, constant-time
//!   verification.
//! - [`hide`]: User-Password, Tunnel-Password and MS-MPPE keys; in-place re-hiding.
//! - [`edit`]: in-place editing for proxying (Proxy-State, Identifier, authenticator,
//!   Message-Authenticator first, re-sign) and builders for new packets.
//! - [`value`]: RFC 8044 data types.
//! - [`dict`]: names and types: a built-in dictionary and a loader for FreeRADIUS
//!   dictionary files.
//! - [`dump`]: a packet by its dictionary names, for debug logs (hidden values hidden).
pub mod auth;
pub mod dict;
pub mod dump;
pub mod edit;
pub mod hide;
pub mod packet;
pub mod value;

pub use edit::{EditError, PacketMut};
pub use packet::{Attribute, Code, Packet, ParseError};

/// The fixed header: Code, Identifier, Length, Authenticator.
pub const HEADER_LEN: usize = 20;
/// RFC 2865 section 3.
pub const MAX_PACKET_LEN: usize = 4096;

/// Attribute numbers the codec itself needs.
pub mod attr {
    pub const USER_NAME: u8 = 1;
    pub const USER_PASSWORD: u8 = 2;
    pub const CHAP_PASSWORD: u8 = 3;
    pub const NAS_IP_ADDRESS: u8 = 4;
    pub const NAS_PORT: u8 = 5;
    pub const REPLY_MESSAGE: u8 = 18;
    pub const STATE: u8 = 24;
    pub const VENDOR_SPECIFIC: u8 = 26;
    pub const PROXY_STATE: u8 = 33;
    pub const NAS_IDENTIFIER: u8 = 32;
    pub const ACCT_STATUS_TYPE: u8 = 40;
    pub const ACCT_SESSION_ID: u8 = 44;
    pub const CHAP_CHALLENGE: u8 = 60;
    pub const TUNNEL_PASSWORD: u8 = 69;
    pub const EAP_MESSAGE: u8 = 79;
    pub const MESSAGE_AUTHENTICATOR: u8 = 80;
    pub const ERROR_CAUSE: u8 = 101;
    /// RFC 5580.
    pub const OPERATOR_NAME: u8 = 126;
    /// RFC 4372.
    pub const CHARGEABLE_USER_IDENTITY: u8 = 89;
    pub const EXTENDED_1: u8 = 241;
    pub const EXTENDED_4: u8 = 244;
    pub const LONG_EXTENDED_1: u8 = 245;
    pub const LONG_EXTENDED_2: u8 = 246;
    /// RFC 7930: Original-Packet-Code is 241.4.
    pub const EXT_ORIGINAL_PACKET_CODE: u8 = 4;
    pub const VENDOR_MICROSOFT: u32 = 311;
    pub const MS_MPPE_SEND_KEY: u8 = 16;
    pub const MS_MPPE_RECV_KEY: u8 = 17;
}

#[cfg(test)]
mod tests;
