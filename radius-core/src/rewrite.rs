//! Attribute rewriting, sans-IO: radsecproxy's `rewrite` blocks, FreeRADIUS's edits on
//! proxying. A [`Rewrite`] is compiled once from names in the dictionary and applied in
//! place to a packet after its sender's signature was checked and before it is signed for
//! the next hop, so a rewritten packet is signed, and its hidden values re-hidden, like any
//! other.
//!
//! Hidden values (User-Password, Tunnel-Password, the MPPE keys, whatever the dictionary
//! marks `encrypt=`) can be removed or kept, never written: they are hidden with the
//! secret and authenticator of a hop this layer does not see. Proxy-State and
//! Message-Authenticator belong to the proxy and cannot be named.
//!
//! One rewrite applies, in this order (radsecproxy's): `keep_only`, `remove`, `modify`,
//! `replace`, `add`, `add_if_absent`.

use std::sync::Arc;

use regex::Regex;

use crate::codec::{
    EditError, HEADER_LEN, PacketMut, attr,
    dict::{AttrDef, Dictionary},
    packet::SubAttributes,
    value::{self, DataType},
};

/// What an entry of a rewrite names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A standard attribute, by type.
    Attr(u8),
    /// Every attribute of a vendor (remove and keep_only only).
    Vendor(u32),
    /// One attribute of a vendor whose attributes are in the RFC 2865 format.
    VendorAttr { vendor: u32, ty: u8 },
    /// An RFC 6929 extended attribute (241-246).
    Extended { ty: u8, ext: u8 },
}

/// A value to write: `Attribute = value`, encoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub target: Target,
    pub value: Vec<u8>,
}

/// A regular expression replacement in a text attribute.
#[derive(Clone, Debug)]
pub struct Modify {
    pub target: Target,
    pub regex: Regex,
    pub replacement: String,
}

impl PartialEq for Modify {
    fn eq(&self, o: &Self) -> bool {
        self.target == o.target
            && self.regex.as_str() == o.regex.as_str()
            && self.replacement == o.replacement
    }
}

/// One named rewrite.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rewrite {
    pub name: String,
    /// Empty: keep everything (else everything else goes).
    pub keep_only: Vec<Target>,
    pub remove: Vec<Target>,
    pub modify: Vec<Modify>,
    /// Every instance present takes the value; nothing is added.
    pub replace: Vec<Assignment>,
    pub add: Vec<Assignment>,
    pub add_if_absent: Vec<Assignment>,
}

/// The rewrites of a client or an upstream: `inbound` for what it sends the sidecar (a
/// NAS's requests, an upstream's replies), `outbound` for what the sidecar sends it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rewrites {
    pub inbound: Option<Arc<Rewrite>>,
    pub outbound: Option<Arc<Rewrite>>,
}

/// A rewrite entry that cannot be compiled.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    #[error("`{0}` is no attribute or vendor of the dictionary")]
    Unknown(String),
    #[error("`{0}` belongs to the proxy and cannot be rewritten")]
    Reserved(String),
    #[error("`{0}` is hidden with the shared secret: it can be removed or kept, not written")]
    Hidden(String),
    #[error("`{0}` cannot be written: {1}")]
    NotWritable(String, &'static str),
    #[error("`{0}`: expected `Attribute = value`")]
    Syntax(String),
    #[error("`{name}`: {message}")]
    Value { name: String, message: String },
    #[error("`{0}` is not a text attribute: only text is changed by a regular expression")]
    NotText(String),
    #[error("bad regular expression: {0}")]
    Regex(String),
}

fn target_of(dict: &Dictionary, def: &AttrDef) -> Result<Target, RewriteError> {
    let name = || def.name.clone();
    let byte = |n: u32| {
        u8::try_from(n).map_err(|_| RewriteError::NotWritable(name(), "its type is over 255"))
    };
    match (def.key.vendor, def.key.path()) {
        (0, [ty]) => {
            let ty = byte(*ty)?;
            if matches!(ty, attr::PROXY_STATE | attr::MESSAGE_AUTHENTICATOR) {
                return Err(RewriteError::Reserved(name()));
            }
            Ok(Target::Attr(ty))
        }
        (0, [ty, ext]) if (241..=246).contains(ty) => Ok(Target::Extended {
            ty: byte(*ty)?,
            ext: byte(*ext)?,
        }),
        (vendor, [ty]) if vendor != 0 => match dict.vendor(vendor) {
            Some(v) if v.type_size == 1 && v.length_size == 1 => Ok(Target::VendorAttr {
                vendor,
                ty: byte(*ty)?,
            }),
            _ => Err(RewriteError::NotWritable(
                name(),
                "its vendor's attributes are not in the RFC 2865 format (remove the vendor)",
            )),
        },
        _ => Err(RewriteError::NotWritable(
            name(),
            "a nested attribute (name its parent)",
        )),
    }
}

fn hidden(def: &AttrDef, t: Target) -> bool {
    def.encrypt != 0
        || matches!(
            t,
            Target::Attr(attr::USER_PASSWORD | attr::TUNNEL_PASSWORD)
                | Target::VendorAttr {
                    vendor: attr::VENDOR_MICROSOFT,
                    ty: attr::MS_MPPE_SEND_KEY | attr::MS_MPPE_RECV_KEY,
                }
        )
}

/// The attribute or vendor named `name`, for `remove` and `keep_only`.
pub fn target(dict: &Dictionary, name: &str) -> Result<Target, RewriteError> {
    let name = name.trim();
    if let Some(def) = dict.by_name(name) {
        return target_of(dict, def);
    }
    match dict.vendor_by_name(name) {
        Some(v) => Ok(Target::Vendor(v.id)),
        None => Err(RewriteError::Unknown(name.to_owned())),
    }
}

/// `Attribute = value`, or `Attribute:tag = value` for a tagged one (RFC 2868), for
/// `add`, `add_if_absent` and `replace`. The value is written as in FreeRADIUS (quotes
/// optional, enumerated names from the dictionary, `0x` hex for octets).
pub fn assignment(dict: &Dictionary, text: &str) -> Result<Assignment, RewriteError> {
    let (lhs, rhs) = text
        .split_once('=')
        .ok_or_else(|| RewriteError::Syntax(text.to_owned()))?;
    let lhs = lhs.trim();
    let (name, tag) = match lhs.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (lhs, None),
    };
    let def = dict
        .by_name(name)
        .ok_or_else(|| RewriteError::Unknown(name.to_owned()))?;
    let target = target_of(dict, def)?;
    if hidden(def, target) {
        return Err(RewriteError::Hidden(def.name.clone()));
    }
    let bad = |message: String| RewriteError::Value {
        name: def.name.clone(),
        message,
    };
    let tag = match tag {
        None => None,
        Some(_) if !def.has_tag => return Err(bad("has no tag".into())),
        Some(t) => Some(
            t.parse::<u8>()
                .ok()
                .filter(|t| (1..=0x1f).contains(t))
                .ok_or_else(|| bad(format!("tag `{t}` is not 1 to 31")))?,
        ),
    };
    let rhs = rhs.trim();
    let rhs = rhs
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .or_else(|| rhs.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')))
        .unwrap_or(rhs);
    let numeric = matches!(
        def.ty,
        DataType::Integer | DataType::Enum | DataType::Byte | DataType::Short
    );
    let mut v = match dict.value_number(&def.name, rhs) {
        Some(n) if numeric => value::encode(def.ty, &n.to_string()),
        _ => value::encode(def.ty, rhs),
    }
    .map_err(bad)?;
    if def.has_tag {
        if numeric && v.len() == 4 {
            // RFC 2868: the tag takes the first byte of a tagged integer.
            if v[0] != 0 {
                return Err(bad("a tagged integer has 24 bits".into()));
            }
            v[0] = tag.unwrap_or(0);
        } else if let Some(t) = tag {
            v.insert(0, t);
        }
    }
    let max = match target {
        Target::VendorAttr { .. } => 247,
        Target::Extended { ty, .. } if ty >= attr::LONG_EXTENDED_1 => 251,
        Target::Extended { .. } => 252,
        _ => 253,
    };
    if v.len() > max {
        return Err(bad(format!(
            "{} bytes do not fit one attribute ({max} at most)",
            v.len()
        )));
    }
    Ok(Assignment { target, value: v })
}

/// A regular expression replacement (`regex` crate syntax; `$1` or radsecproxy's `\1` for
/// a group) in the text attribute `name`.
pub fn modify(
    dict: &Dictionary,
    name: &str,
    pattern: &str,
    replacement: &str,
) -> Result<Modify, RewriteError> {
    let def = dict
        .by_name(name.trim())
        .ok_or_else(|| RewriteError::Unknown(name.trim().to_owned()))?;
    let target = target_of(dict, def)?;
    if hidden(def, target) {
        return Err(RewriteError::Hidden(def.name.clone()));
    }
    if def.ty != DataType::Text {
        return Err(RewriteError::NotText(def.name.clone()));
    }
    let regex = Regex::new(pattern).map_err(|e| RewriteError::Regex(e.to_string()))?;
    // `\1` as radsecproxy writes it is `${1}` here.
    let mut out = String::with_capacity(replacement.len());
    let mut chars = replacement.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            _ => out.push(c),
        }
    }
    Ok(Modify {
        target,
        regex,
        replacement: out,
    })
}

/// What becomes of one attribute under keep_only and remove.
enum Fate {
    Keep,
    Drop,
    /// A Vendor-Specific attribute with some of its sub-attributes gone: its new value,
    /// this long, is in the scratch buffer.
    Rebuild(usize),
}

impl Rewrite {
    /// Whether the rewrite does anything at all.
    pub fn is_empty(&self) -> bool {
        self.keep_only.is_empty()
            && self.remove.is_empty()
            && self.modify.is_empty()
            && self.replace.is_empty()
            && self.add.is_empty()
            && self.add_if_absent.is_empty()
    }

    /// Applies the rewrite to `m`, in place; returns whether anything changed. An error
    /// (a value that would no longer fit) leaves the packet partly rewritten: drop it.
    pub fn apply(&self, m: &mut PacketMut<'_>) -> Result<bool, EditError> {
        let mut changed = false;
        if !self.keep_only.is_empty() || !self.remove.is_empty() {
            changed |= self.filter(m)?;
        }
        for x in &self.modify {
            changed |= edit_each(m, x.target, |v, out| {
                let Ok(text) = std::str::from_utf8(v) else {
                    return Ok(None);
                };
                match x.regex.replace(text, x.replacement.as_str()) {
                    std::borrow::Cow::Owned(new) if new != text => {
                        let new = new.as_bytes();
                        let slot = out
                            .get_mut(..new.len())
                            .ok_or(EditError::ValueTooLong { len: new.len() })?;
                        slot.copy_from_slice(new);
                        Ok(Some(new.len()))
                    }
                    _ => Ok(None),
                }
            })?;
        }
        for a in &self.replace {
            changed |= edit_each(m, a.target, |v, out| {
                if v == a.value.as_slice() {
                    return Ok(None);
                }
                out[..a.value.len()].copy_from_slice(&a.value);
                Ok(Some(a.value.len()))
            })?;
        }
        for a in &self.add {
            push(m, a)?;
            changed = true;
        }
        for a in &self.add_if_absent {
            if !present(m, a.target) {
                push(m, a)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    fn filter(&self, m: &mut PacketMut<'_>) -> Result<bool, EditError> {
        let mut changed = false;
        let mut scratch = [0u8; 253];
        let mut off = HEADER_LEN;
        while let Some((ty, value, next)) = m.attribute_at(off) {
            match self.fate(ty, value, &mut scratch) {
                Fate::Keep => off = next,
                Fate::Drop => {
                    m.remove_at(off);
                    changed = true;
                }
                Fate::Rebuild(n) => {
                    m.replace_at(off, &scratch[..n])?;
                    off += n + 2;
                    changed = true;
                }
            }
        }
        Ok(changed)
    }

    fn kept(&self, t: Target) -> bool {
        self.keep_only.is_empty() || self.keep_only.contains(&t)
    }

    fn fate(&self, ty: u8, value: &[u8], scratch: &mut [u8; 253]) -> Fate {
        let verdict = |keep: bool, remove: bool| {
            if keep && !remove {
                Fate::Keep
            } else {
                Fate::Drop
            }
        };
        match ty {
            attr::PROXY_STATE | attr::MESSAGE_AUTHENTICATOR => Fate::Keep,
            attr::VENDOR_SPECIFIC if value.len() >= 4 => {
                let vendor = u32::from_be_bytes([value[0], value[1], value[2], value[3]]);
                let whole = Target::Vendor(vendor);
                if self.remove.contains(&whole) {
                    return Fate::Drop;
                }
                let whole_kept = self.kept(whole);
                let names_subs = self
                    .remove
                    .iter()
                    .chain(&self.keep_only)
                    .any(|t| matches!(t, Target::VendorAttr { vendor: v, .. } if *v == vendor));
                let subs = match SubAttributes::new(&value[4..], 0) {
                    Some(s) if names_subs => s,
                    _ => return verdict(whole_kept, false),
                };
                scratch[..4].copy_from_slice(&value[..4]);
                let (mut n, mut dropped) = (4, false);
                for s in subs {
                    let t = Target::VendorAttr { vendor, ty: s.ty };
                    if (whole_kept || self.keep_only.contains(&t)) && !self.remove.contains(&t) {
                        let w = s.value.len() + 2;
                        scratch[n] = s.ty;
                        scratch[n + 1] = w as u8;
                        scratch[n + 2..n + w].copy_from_slice(s.value);
                        n += w;
                    } else {
                        dropped = true;
                    }
                }
                match (dropped, n) {
                    (false, _) => Fate::Keep,
                    (true, 4) => Fate::Drop,
                    (true, n) => Fate::Rebuild(n),
                }
            }
            attr::EXTENDED_1..=attr::LONG_EXTENDED_2 if !value.is_empty() => {
                let (t, whole) = (Target::Extended { ty, ext: value[0] }, Target::Attr(ty));
                verdict(
                    self.keep_only.is_empty()
                        || self.keep_only.contains(&t)
                        || self.keep_only.contains(&whole),
                    self.remove.contains(&t) || self.remove.contains(&whole),
                )
            }
            _ => {
                let t = Target::Attr(ty);
                verdict(self.kept(t), self.remove.contains(&t))
            }
        }
    }
}

/// Calls `f` with the value of every instance of `target`; where it writes a new value in
/// its buffer and returns its length, the instance takes it, in place.
fn edit_each(
    m: &mut PacketMut<'_>,
    target: Target,
    mut f: impl FnMut(&[u8], &mut [u8; 253]) -> Result<Option<usize>, EditError>,
) -> Result<bool, EditError> {
    let (mut new, mut whole) = ([0u8; 253], [0u8; 253]);
    let mut changed = false;
    let mut off = HEADER_LEN;
    while let Some((ty, value, next)) = m.attribute_at(off) {
        let rebuilt: Option<usize> = match target {
            Target::Attr(t) if t == ty => f(value, &mut new)?.inspect(|&n| {
                whole[..n].copy_from_slice(&new[..n]);
            }),
            Target::Extended { ty: t, ext } if t == ty && value.first() == Some(&ext) => {
                let head = if t >= attr::LONG_EXTENDED_1 { 2 } else { 1 };
                match value.get(head..) {
                    Some(v) => match f(v, &mut new)? {
                        Some(n) if n + head <= 253 => {
                            whole[..head].copy_from_slice(&value[..head]);
                            whole[head..head + n].copy_from_slice(&new[..n]);
                            Some(n + head)
                        }
                        Some(n) => return Err(EditError::ValueTooLong { len: n + head }),
                        None => None,
                    },
                    None => None,
                }
            }
            Target::VendorAttr { vendor, ty: sub }
                if ty == attr::VENDOR_SPECIFIC
                    && value.len() >= 4
                    && value[..4] == vendor.to_be_bytes() =>
            {
                match SubAttributes::new(&value[4..], 0) {
                    None => None,
                    Some(subs) => {
                        whole[..4].copy_from_slice(&value[..4]);
                        let (mut n, mut any) = (4, false);
                        for s in subs {
                            let v = match (s.ty == sub).then(|| f(s.value, &mut new)) {
                                Some(r) => match r? {
                                    Some(len) => {
                                        any = true;
                                        &new[..len]
                                    }
                                    None => s.value,
                                },
                                None => s.value,
                            };
                            if n + 2 + v.len() > 253 {
                                return Err(EditError::ValueTooLong {
                                    len: n + 2 + v.len(),
                                });
                            }
                            whole[n] = s.ty;
                            whole[n + 1] = (v.len() + 2) as u8;
                            whole[n + 2..n + 2 + v.len()].copy_from_slice(v);
                            n += 2 + v.len();
                        }
                        any.then_some(n)
                    }
                }
            }
            _ => None,
        };
        match rebuilt {
            Some(n) => {
                m.replace_at(off, &whole[..n])?;
                off += n + 2;
                changed = true;
            }
            None => off = next,
        }
    }
    Ok(changed)
}

fn push(m: &mut PacketMut<'_>, a: &Assignment) -> Result<usize, EditError> {
    match a.target {
        Target::Attr(t) => m.push(t, &a.value),
        Target::VendorAttr { vendor, ty } => m.push_vendor(vendor, ty, &a.value),
        Target::Extended { ty, ext } => {
            let mut v = [0u8; 253];
            let head = if ty >= attr::LONG_EXTENDED_1 { 2 } else { 1 };
            let n = head + a.value.len();
            if n > 253 {
                return Err(EditError::ValueTooLong { len: n });
            }
            v[0] = ext;
            v[head..n].copy_from_slice(&a.value);
            m.push(ty, &v[..n])
        }
        // Refused when compiled: a vendor has no single value.
        Target::Vendor(_) => Ok(0),
    }
}

fn present(m: &PacketMut<'_>, target: Target) -> bool {
    let mut off = HEADER_LEN;
    while let Some((ty, value, next)) = m.attribute_at(off) {
        let vendor_is =
            |v: u32| ty == attr::VENDOR_SPECIFIC && value.get(..4) == Some(&v.to_be_bytes()[..]);
        let hit = match target {
            Target::Attr(t) => t == ty,
            Target::Extended { ty: t, ext } => t == ty && value.first() == Some(&ext),
            Target::Vendor(v) => vendor_is(v),
            Target::VendorAttr { vendor, ty: sub } => {
                vendor_is(vendor)
                    && SubAttributes::new(&value[4..], 0)
                        .is_some_and(|mut s| s.any(|a| a.ty == sub))
            }
        };
        if hit {
            return true;
        }
        off = next;
    }
    false
}

#[cfg(test)]
mod tests;
