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
