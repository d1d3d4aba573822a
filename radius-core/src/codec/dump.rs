//! A packet as people read it, for debug logs: its code, Identifier and attributes by their
//! dictionary names, values by their types (named values by name), as FreeRADIUS's debug
//! output shows them. Hidden attributes (the dictionary's `encrypt=`: User-Password,
//! Tunnel-Password, MS-MPPE keys...) show as `<hidden>`, never their bytes; long octets are
//! cut. Formatted only when written, so a disabled debug level costs nothing.

use std::fmt::{self, Display, Formatter, Write as _};

use super::{
    Packet,
    attr::VENDOR_SPECIFIC,
    dict::{AttrDef, Dictionary},
    value::{DataType, Value, decode},
};

/// Octets beyond this many bytes are shown cut, with their length.
const SHOWN_OCTETS: usize = 16;

/// `packet` read with `dict`; `Display` writes it on one line.
pub struct Dump<'a> {
    pub packet: &'a Packet<'a>,
    pub dict: &'a Dictionary,
}

impl Display for Dump<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let p = self.packet;
        write!(
            f,
            "{} Id {} ({} bytes):",
            p.code().name(),
            p.identifier(),
            p.len()
        )?;
        let mut first = true;
        for a in p.attributes() {
            let mut sep = |f: &mut Formatter<'_>| {
                let s = if first { " " } else { ", " };
                first = false;
                f.write_str(s)
            };
            if a.ty == VENDOR_SPECIFIC
                && let Some((vendor, subs)) = a.vendor_attributes()
            {
                let vname = self.dict.vendor(vendor).map(|v| v.name.as_str());
                for s in subs {
                    sep(f)?;
                    match self.dict.attribute(vendor, &[u32::from(s.ty)]) {
                        Some(def) => value(f, def, s.value, self.dict)?,
                        None => {
                            match vname {
                                Some(v) => write!(f, "{v}-Attr-{} = ", s.ty)?,
                                None => write!(f, "Vendor-{vendor}-Attr-{} = ", s.ty)?,
                            }
                            octets(f, s.value)?;
                        }
                    }
                }
                continue;
            }
            sep(f)?;
            match self.dict.standard(a.ty) {
                Some(def) => value(f, def, a.value, self.dict)?,
                None => {
                    write!(f, "Attr-{} = ", a.ty)?;
                    octets(f, a.value)?;
                }
            }
        }
        Ok(())
    }
}

/// `Name = value` of one attribute with a definition.
fn value(f: &mut Formatter<'_>, def: &AttrDef, v: &[u8], dict: &Dictionary) -> fmt::Result {
    write!(f, "{} = ", def.name)?;
    if def.encrypt != 0 {
        return f.write_str("<hidden>");
    }
    // A tag (RFC 2868) leads the value of tagged attributes when it is 1..=0x1F.
    let (tag, v) = match v.first() {
        Some(&t) if def.has_tag && (1..=0x1f).contains(&t) => (Some(t), v),
        _ => (None, v),
    };
    let integer = matches!(def.ty, DataType::Integer | DataType::Enum);
    let owned;
    let v = match tag {
        // A tagged integer's tag takes the value's first byte.
        Some(_) if integer && v.len() == 4 => {
            owned = [0, v[1], v[2], v[3]];
            &owned[..]
        }
        Some(_) => &v[1..],
        None => v,
    };
    if let Some(t) = tag {
        write!(f, ":{t} ")?;
    }
    match decode(def.ty, v) {
        Ok(Value::Integer(n)) => match dict.value_name(&def.name, n) {
            Some(name) => f.write_str(name),
            None => write!(f, "{n}"),
        },
        Ok(Value::Integer64(n)) => write!(f, "{n}"),
        Ok(Value::Signed(n)) => write!(f, "{n}"),
        Ok(Value::Text(t)) => write!(f, "{t:?}"),
        Ok(Value::Ipv4(a)) => write!(f, "{a}"),
        Ok(Value::Ipv6(a)) => write!(f, "{a}"),
        Ok(Value::Ipv4Prefix { len, addr }) => write!(f, "{addr}/{len}"),
        Ok(Value::Ipv6Prefix { len, addr }) => write!(f, "{addr}/{len}"),
        Ok(Value::Ifid(b)) => octets(f, &b),
        Ok(Value::Ether(b)) => {
            let mut s = String::with_capacity(17);
            for (i, x) in b.iter().enumerate() {
                let _ = write!(s, "{}{x:02x}", if i > 0 { ":" } else { "" });
            }
            f.write_str(&s)
        }
        Ok(Value::Octets(b)) => octets(f, b),
        // What does not fit its type shows as it is.
        Err(_) => octets(f, v),
    }
}

fn octets(f: &mut Formatter<'_>, b: &[u8]) -> fmt::Result {
    f.write_str("0x")?;
    for x in b.iter().take(SHOWN_OCTETS) {
        write!(f, "{x:02x}")?;
    }
    if b.len() > SHOWN_OCTETS {
        write!(f, "... ({} bytes)", b.len())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Code, PacketMut, attr, hide};

    #[test]
    fn attributes_show_by_name_and_hidden_ones_do_not_show() {
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 42).expect("packet");
        p.set_authenticator(&[7; 16]);
        p.message_authenticator_first().expect("attr");
        p.push(attr::USER_NAME, b"alice").expect("attr");
        let mut h = [0u8; 128];
        let n = hide::hide_user_password(b"secret-pw", b"s3cr3t", &[7; 16], &mut h).expect("hide");
        p.push(attr::USER_PASSWORD, &h[..n]).expect("attr");
        p.push(attr::NAS_IP_ADDRESS, &[192, 0, 2, 1]).expect("attr");
        p.push(6, &2u32.to_be_bytes()).expect("Service-Type");
        let mut vsa = vec![0, 0, 0, 9, 1, 12];
        vsa.extend_from_slice(b"shell:x=1\0");
        p.push(attr::VENDOR_SPECIFIC, &vsa).expect("Cisco-AVPair");
        p.push(attr::EAP_MESSAGE, &[1u8; 40]).expect("attr");
        let len = p.len();
        let packet = Packet::parse(&buf[..len]).expect("parse");
        let text = Dump {
            packet: &packet,
            dict: Dictionary::builtin(),
        }
        .to_string();
        assert!(text.starts_with("Access-Request Id 42 ("), "{text}");
        for part in [
            "User-Name = \"alice\"",
            "User-Password = <hidden>",
            "NAS-IP-Address = 192.0.2.1",
            "Service-Type = Framed-User",
            "Cisco-AVPair = \"shell:x=1\\0\"",
            "EAP-Message = 0x01010101010101010101010101010101... (40 bytes)",
        ] {
            assert!(text.contains(part), "{part} in {text}");
        }
        assert!(
            !text.contains("secret-pw"),
            "the password never shows: {text}"
        );
    }
}
