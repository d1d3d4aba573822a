//! RFC 8044 data types: decoding an attribute's value once its type is known (from the
//! dictionary). Borrowing, no allocation.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The data types of RFC 8044 (and the FreeRADIUS names that map onto them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Integer,
    Enum,
    Time,
    Text,
    String,
    Concat,
    Ifid,
    Ipv4Addr,
    Ipv6Addr,
    Ipv6Prefix,
    Ipv4Prefix,
    Integer64,
    Tlv,
    Vsa,
    Extended,
    LongExtended,
    Evs,
    /// FreeRADIUS extras that RFC 8044 does not name.
    Byte,
    Short,
    Signed,
    Ether,
    ComboIp,
    Abinary,
}

impl DataType {
    /// The type of a FreeRADIUS dictionary name (`integer`, `ipaddr`, `octets[16]`, ...).
    pub fn from_freeradius(name: &str) -> Option<DataType> {
        let base = name.split('[').next().unwrap_or(name).to_ascii_lowercase();
        Some(match base.as_str() {
            "integer" | "uint32" => DataType::Integer,
            "date" | "time" => DataType::Time,
            "string" | "text" => DataType::Text,
            "octets" => DataType::String,
            "ifid" => DataType::Ifid,
            "ipaddr" | "ipv4addr" => DataType::Ipv4Addr,
            "ipv6addr" => DataType::Ipv6Addr,
            "ipv6prefix" => DataType::Ipv6Prefix,
            "ipv4prefix" => DataType::Ipv4Prefix,
            "integer64" | "uint64" => DataType::Integer64,
            "tlv" => DataType::Tlv,
            "vsa" => DataType::Vsa,
            "extended" => DataType::Extended,
            "long-extended" => DataType::LongExtended,
            "evs" => DataType::Evs,
            "byte" | "uint8" => DataType::Byte,
            "short" | "uint16" => DataType::Short,
            "signed" | "int32" => DataType::Signed,
            "ether" => DataType::Ether,
            "combo-ip" => DataType::ComboIp,
            "abinary" => DataType::Abinary,
            "concat" => DataType::Concat,
            "enum" => DataType::Enum,
            _ => return None,
        })
    }
}

/// A decoded value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value<'a> {
    Integer(u32),
    Integer64(u64),
    Signed(i32),
    Text(&'a str),
    Octets(&'a [u8]),
    Ipv4(Ipv4Addr),
    Ipv6(Ipv6Addr),
    Ipv6Prefix { len: u8, addr: Ipv6Addr },
    Ipv4Prefix { len: u8, addr: Ipv4Addr },
    Ifid([u8; 8]),
    Ether([u8; 6]),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{ty:?} value of {len} bytes (expected {expected})")]
    Length {
        ty: DataType,
        len: usize,
        expected: &'static str,
    },
    #[error("text value is not UTF-8")]
    NotUtf8,
    #[error("prefix length {len} exceeds {max}")]
    PrefixLength { len: u8, max: u8 },
}

fn fixed<const N: usize>(
    ty: DataType,
    v: &[u8],
    expected: &'static str,
) -> Result<[u8; N], ValueError> {
    v.try_into().map_err(|_| ValueError::Length {
        ty,
        len: v.len(),
        expected,
    })
}

/// Decodes `v` as `ty`. Structured types (TLV, VSA, extended) come back as octets: read them
/// with the packet module's sub-attribute readers.
pub fn decode(ty: DataType, v: &[u8]) -> Result<Value<'_>, ValueError> {
    Ok(match ty {
        DataType::Integer | DataType::Enum | DataType::Time => {
            Value::Integer(u32::from_be_bytes(fixed(ty, v, "4")?))
        }
        DataType::Signed => Value::Signed(i32::from_be_bytes(fixed(ty, v, "4")?)),
        DataType::Integer64 => Value::Integer64(u64::from_be_bytes(fixed(ty, v, "8")?)),
        DataType::Byte => Value::Integer(u32::from(fixed::<1>(ty, v, "1")?[0])),
        DataType::Short => Value::Integer(u32::from(u16::from_be_bytes(fixed(ty, v, "2")?))),
        DataType::Text => Value::Text(std::str::from_utf8(v).map_err(|_| ValueError::NotUtf8)?),
        DataType::Ipv4Addr => Value::Ipv4(Ipv4Addr::from(fixed::<4>(ty, v, "4")?)),
        DataType::Ipv6Addr => Value::Ipv6(Ipv6Addr::from(fixed::<16>(ty, v, "16")?)),
        DataType::ComboIp => match v.len() {
            4 => Value::Ipv4(Ipv4Addr::from(fixed::<4>(ty, v, "4 or 16")?)),
            _ => Value::Ipv6(Ipv6Addr::from(fixed::<16>(ty, v, "4 or 16")?)),
        },
        DataType::Ifid => Value::Ifid(fixed(ty, v, "8")?),
        DataType::Ether => Value::Ether(fixed(ty, v, "6")?),
        DataType::Ipv6Prefix => {
            // RFC 3162 / 8044: reserved, prefix length, then up to 16 address bytes.
            if v.len() < 2 || v.len() > 18 {
                return Err(ValueError::Length {
                    ty,
                    len: v.len(),
                    expected: "2 to 18",
                });
            }
            let len = v[1];
            if len > 128 {
                return Err(ValueError::PrefixLength { len, max: 128 });
            }
            let mut a = [0u8; 16];
            a[..v.len() - 2].copy_from_slice(&v[2..]);
            Value::Ipv6Prefix {
                len,
                addr: Ipv6Addr::from(a),
            }
        }
        DataType::Ipv4Prefix => {
            let b: [u8; 6] = fixed(ty, v, "6")?;
            let len = b[1] & 0x3f;
            if len > 32 {
                return Err(ValueError::PrefixLength { len, max: 32 });
            }
            Value::Ipv4Prefix {
                len,
                addr: Ipv4Addr::new(b[2], b[3], b[4], b[5]),
            }
        }
        DataType::String
        | DataType::Concat
        | DataType::Tlv
        | DataType::Vsa
        | DataType::Extended
        | DataType::LongExtended
        | DataType::Evs
        | DataType::Abinary => Value::Octets(v),
    })
}

/// Encodes `text` (as written in a configuration: `3600`, `192.0.2.1`, `0x0a0b`,
/// `2001:db8::/32`) as a value of type `ty`; the error says what was expected. Enumerated
/// names (`Framed-User`) are the dictionary's, resolved before this.
pub fn encode(ty: DataType, text: &str) -> Result<Vec<u8>, String> {
    fn num<T: std::str::FromStr>(text: &str, what: &str) -> Result<T, String> {
        let parsed = match text.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16)
                .ok()
                .and_then(|v| v.to_string().parse().ok()),
            None => text.parse().ok(),
        };
        parsed.ok_or_else(|| format!("`{text}` is not {what}"))
    }
    fn hex(text: &str) -> Option<Vec<u8>> {
        let h = text.strip_prefix("0x")?;
        if h.len() % 2 != 0 {
            return None;
        }
        (0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(h.get(i..i + 2)?, 16).ok())
            .collect()
    }
    fn hex_bytes<const N: usize>(text: &str, what: &str) -> Result<[u8; N], String> {
        let digits: String = text
            .chars()
            .filter(|c| !matches!(c, ':' | '-' | '.'))
            .collect();
        hex(&format!("0x{digits}"))
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| format!("`{text}` is not {what}"))
    }
    let v = match ty {
        DataType::Integer | DataType::Enum | DataType::Time => {
            num::<u32>(text, "a 32-bit number")?.to_be_bytes().to_vec()
        }
        DataType::Signed => num::<i32>(text, "a signed 32-bit number")?
            .to_be_bytes()
            .to_vec(),
        DataType::Integer64 => num::<u64>(text, "a 64-bit number")?.to_be_bytes().to_vec(),
        DataType::Byte => vec![num::<u8>(text, "a number up to 255")?],
        DataType::Short => num::<u16>(text, "a number up to 65535")?
            .to_be_bytes()
            .to_vec(),
        DataType::Text => text.as_bytes().to_vec(),
        DataType::String => hex(text).unwrap_or_else(|| text.as_bytes().to_vec()),
        DataType::Ipv4Addr => text
            .parse::<Ipv4Addr>()
            .map_err(|_| format!("`{text}` is not an IPv4 address"))?
            .octets()
            .to_vec(),
        DataType::Ipv6Addr => text
            .parse::<Ipv6Addr>()
            .map_err(|_| format!("`{text}` is not an IPv6 address"))?
            .octets()
            .to_vec(),
        DataType::ComboIp => match text.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => a.octets().to_vec(),
            Ok(std::net::IpAddr::V6(a)) => a.octets().to_vec(),
            Err(_) => return Err(format!("`{text}` is not an IP address")),
        },
        DataType::Ipv4Prefix | DataType::Ipv6Prefix => {
            let (addr, len) = text
                .split_once('/')
                .ok_or_else(|| format!("`{text}` is not a prefix (address/length)"))?;
            let len: u8 = num(len, "a prefix length")?;
            if ty == DataType::Ipv4Prefix {
                let a = addr
                    .parse::<Ipv4Addr>()
                    .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
                if len > 32 {
                    return Err(format!("prefix length {len} exceeds 32"));
                }
                let mut v = vec![0, len];
                v.extend_from_slice(&a.octets());
                v
            } else {
                let a = addr
                    .parse::<Ipv6Addr>()
                    .map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
                if len > 128 {
                    return Err(format!("prefix length {len} exceeds 128"));
                }
                // RFC 3162: only the bytes the prefix covers.
                let mut v = vec![0, len];
                v.extend_from_slice(&a.octets()[..usize::from(len).div_ceil(8)]);
                v
            }
        }
        DataType::Ifid => hex_bytes::<8>(text, "an interface id (8 bytes in hex)")?.to_vec(),
        DataType::Ether => hex_bytes::<6>(text, "a MAC address")?.to_vec(),
        DataType::Concat
        | DataType::Tlv
        | DataType::Vsa
        | DataType::Extended
        | DataType::LongExtended
        | DataType::Evs
        | DataType::Abinary => {
            return Err(format!(
                "a {ty:?} value cannot be written in a configuration"
            ));
        }
    };
    Ok(v)
}

#[cfg(test)]
mod encode_tests {
    use super::*;

    #[test]
    fn every_writable_type_round_trips_through_decode() {
        let cases: &[(DataType, &str, Value<'_>)] = &[
            (DataType::Integer, "3600", Value::Integer(3600)),
            (DataType::Integer, "0x10", Value::Integer(16)),
            (DataType::Signed, "-5", Value::Signed(-5)),
            (
                DataType::Integer64,
                "5000000000",
                Value::Integer64(5_000_000_000),
            ),
            (DataType::Byte, "7", Value::Integer(7)),
            (DataType::Short, "1812", Value::Integer(1812)),
            (DataType::Text, "1example.org", Value::Text("1example.org")),
            (DataType::String, "0x0a0b", Value::Octets(&[10, 11])),
            (
                DataType::Ipv4Addr,
                "192.0.2.1",
                Value::Ipv4(Ipv4Addr::new(192, 0, 2, 1)),
            ),
            (
                DataType::Ipv4Prefix,
                "10.0.0.0/8",
                Value::Ipv4Prefix {
                    len: 8,
                    addr: Ipv4Addr::new(10, 0, 0, 0),
                },
            ),
            (
                DataType::Ipv6Prefix,
                "2001:db8::/32",
                Value::Ipv6Prefix {
                    len: 32,
                    addr: "2001:db8::".parse().unwrap(),
                },
            ),
            (
                DataType::Ether,
                "00:11:22:33:44:55",
                Value::Ether([0, 0x11, 0x22, 0x33, 0x44, 0x55]),
            ),
        ];
        for (ty, text, want) in cases {
            let v = encode(*ty, text).unwrap();
            assert_eq!(decode(*ty, &v).unwrap(), *want, "{ty:?} {text}");
        }
    }

    #[test]
    fn values_that_do_not_fit_their_type_are_refused_with_what_was_expected() {
        for (ty, text) in [
            (DataType::Integer, "many"),
            (DataType::Integer, "4294967296"),
            (DataType::Byte, "256"),
            (DataType::Ipv4Addr, "192.0.2"),
            (DataType::Ipv4Prefix, "10.0.0.0/33"),
            (DataType::Ether, "00:11:22"),
            (DataType::Tlv, "x"),
        ] {
            let e = encode(ty, text).unwrap_err();
            assert!(!e.is_empty(), "{ty:?} {text}");
        }
    }
}
