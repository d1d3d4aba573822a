//! Attribute names and types: the dictionary.
//!
//! The format is FreeRADIUS's (`ATTRIBUTE`, `VALUE`, `VENDOR`, `BEGIN-VENDOR`,
//! `BEGIN-TLV`, `$INCLUDE`), the one AAA operators already maintain; [`Dictionary::load`]
//! reads such a tree (for example `/usr/share/freeradius/dictionary`) and every line it cannot
//! read is an error naming the file, the line and what is wrong. [`Dictionary::builtin`] is
//! the same parser over an embedded file with the standard attributes and the Microsoft,
//! Cisco, WISPr and FreeRADIUS vendors.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use super::value::DataType;

/// Where an attribute lives: vendor (0 = standard space) and its number path (`241.1`,
/// `26.311.16` is vendor 311, `[16]`; TLV children add a level). Up to 8 levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttrKey {
    pub vendor: u32,
    pub oid: [u32; 8],
    pub depth: u8,
}

impl AttrKey {
    pub fn new(vendor: u32, path: &[u32]) -> Option<Self> {
        if path.is_empty() || path.len() > 8 {
            return None;
        }
        let mut oid = [0u32; 8];
        oid[..path.len()].copy_from_slice(path);
        Some(Self {
            vendor,
            oid,
            depth: path.len() as u8,
        })
    }

    pub fn path(&self) -> &[u32] {
        &self.oid[..self.depth as usize]
    }
}

/// One attribute definition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttrDef {
    pub name: String,
    pub key: AttrKey,
    pub ty: DataType,
    /// FreeRADIUS `encrypt=N`: 1 User-Password, 2 Tunnel-Password, 3 Ascend secret.
    pub encrypt: u8,
    pub has_tag: bool,
    pub array: bool,
    pub concat: bool,
}

/// A vendor: its number and the sizes of its sub-attribute type and length fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorDef {
    pub name: String,
    pub id: u32,
    pub type_size: u8,
    pub length_size: u8,
}

/// A line the loader could not read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", file.display())]
pub struct DictError {
    pub file: PathBuf,
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, Default)]
pub struct Dictionary {
    attrs: HashMap<AttrKey, AttrDef>,
    by_name: HashMap<String, AttrKey>,
    vendors: HashMap<u32, VendorDef>,
    vendor_by_name: HashMap<String, u32>,
    /// (attribute name, lower case) -> value number -> value name.
    values: HashMap<String, HashMap<u32, String>>,
}

const BUILTIN: &str = include_str!("dictionary.builtin");

impl Dictionary {
    /// The embedded dictionary (parsed once).
    pub fn builtin() -> &'static Dictionary {
        static D: OnceLock<Dictionary> = OnceLock::new();
        D.get_or_init(|| {
            let mut d = Dictionary::default();
            // The embedded file is tested; a failure here is a build defect.
            if let Err(e) = d.parse(BUILTIN, Path::new("dictionary.builtin"), None, 0) {
                panic!("the built-in dictionary does not parse: {e}");
            }
            d
        })
    }

    /// Reads a FreeRADIUS dictionary file and everything it includes.
    pub fn load(path: &Path) -> Result<Dictionary, DictError> {
        let mut d = Dictionary::default();
        d.load_file(path, 0)?;
        Ok(d)
    }

    /// Adds the definitions of `text` (as if read from `file`; `$INCLUDE` is refused).
    pub fn parse_str(&mut self, text: &str, file: &Path) -> Result<(), DictError> {
        self.parse(text, file, None, 0)
    }

    fn load_file(&mut self, path: &Path, depth: usize) -> Result<(), DictError> {
        let text = std::fs::read_to_string(path).map_err(|e| DictError {
            file: path.to_owned(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        self.parse(&text, path, Some(&dir), depth)
    }

    pub fn len(&self) -> usize {
        self.attrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.attrs.is_empty()
    }

    pub fn attribute(&self, vendor: u32, path: &[u32]) -> Option<&AttrDef> {
        self.attrs.get(&AttrKey::new(vendor, path)?)
    }

    /// A standard attribute by number.
    pub fn standard(&self, ty: u8) -> Option<&AttrDef> {
        self.attribute(0, &[u32::from(ty)])
    }

    pub fn by_name(&self, name: &str) -> Option<&AttrDef> {
        self.attrs
            .get(self.by_name.get(&name.to_ascii_lowercase())?)
    }

    pub fn vendor(&self, id: u32) -> Option<&VendorDef> {
        self.vendors.get(&id)
    }

    pub fn vendor_by_name(&self, name: &str) -> Option<&VendorDef> {
        self.vendors
            .get(self.vendor_by_name.get(&name.to_ascii_lowercase())?)
    }

    /// The name of value `v` of attribute `attr` (`Service-Type` 2 is `Framed-User`).
    pub fn value_name(&self, attr: &str, v: u32) -> Option<&str> {
        self.values
            .get(&attr.to_ascii_lowercase())?
            .get(&v)
            .map(String::as_str)
    }

    /// The number of value `name` of attribute `attr` (`Service-Type` `Framed-User` is 2);
    /// names are matched without regard to case, as FreeRADIUS does.
    pub fn value_number(&self, attr: &str, name: &str) -> Option<u32> {
        self.values
            .get(&attr.to_ascii_lowercase())?
            .iter()
            .find(|(_, n)| n.eq_ignore_ascii_case(name))
            .map(|(v, _)| *v)
    }

    fn parse(
        &mut self,
        text: &str,
        file: &Path,
        dir: Option<&Path>,
        depth: usize,
    ) -> Result<(), DictError> {
        if depth > 16 {
            return Err(DictError {
                file: file.to_owned(),
                line: 0,
                message: "$INCLUDE nested more than 16 deep".into(),
            });
        }
        let mut vendor: Option<u32> = None;
        let mut tlv: Vec<AttrKey> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| DictError {
                file: file.to_owned(),
                line,
                message,
            };
            let content = raw.split('#').next().unwrap_or("");
            let words: Vec<&str> = content.split_whitespace().collect();
            let Some(&keyword) = words.first() else {
                continue;
            };
            match keyword {
                "$INCLUDE" | "$INCLUDE-" => {
                    let name = words
                        .get(1)
                        .ok_or_else(|| err("$INCLUDE without a file name".into()))?;
                    let dir = dir.ok_or_else(|| err("$INCLUDE outside a file tree".into()))?;
                    let path = dir.join(name);
                    if keyword == "$INCLUDE-" && !path.exists() {
                        continue;
                    }
                    self.load_file(&path, depth + 1)?;
                }
                "VENDOR" => {
                    let (Some(name), Some(id)) = (words.get(1), words.get(2)) else {
                        return Err(err("VENDOR needs a name and a number".into()));
                    };
                    let id = number(id)
                        .ok_or_else(|| err(format!("VENDOR {name}: `{id}` is not a number")))?;
                    let (mut ts, mut ls) = (1u8, 1u8);
                    if let Some(f) = words.get(3) {
                        let spec = f
                            .strip_prefix("format=")
                            .ok_or_else(|| err(format!("VENDOR {name}: unknown option `{f}`")))?;
                        let mut parts = spec.split(',');
                        ts = parts
                            .next()
                            .and_then(|p| p.parse().ok())
                            .filter(|t| [1, 2, 4].contains(t))
                            .ok_or_else(|| err(format!("VENDOR {name}: bad type size in `{f}`")))?;
                        ls = parts
                            .next()
                            .and_then(|p| p.parse().ok())
                            .filter(|l| [0, 1, 2].contains(l))
                            .ok_or_else(|| {
                                err(format!("VENDOR {name}: bad length size in `{f}`"))
                            })?;
                    }
                    self.vendor_by_name.insert(name.to_ascii_lowercase(), id);
                    self.vendors.insert(
                        id,
                        VendorDef {
                            name: (*name).to_owned(),
                            id,
                            type_size: ts,
                            length_size: ls,
                        },
                    );
                }
                "BEGIN-VENDOR" => {
                    let name = words
                        .get(1)
                        .ok_or_else(|| err("BEGIN-VENDOR needs a name".into()))?;
                    let id = self
                        .vendor_by_name
                        .get(&name.to_ascii_lowercase())
                        .copied()
                        .ok_or_else(|| err(format!("BEGIN-VENDOR {name}: unknown vendor")))?;
                    vendor = Some(id);
                }
                "END-VENDOR" => {
                    if vendor.take().is_none() {
                        return Err(err("END-VENDOR without BEGIN-VENDOR".into()));
                    }
                }
                "BEGIN-TLV" => {
                    let name = words
                        .get(1)
                        .ok_or_else(|| err("BEGIN-TLV needs a name".into()))?;
                    let key = self
                        .by_name
                        .get(&name.to_ascii_lowercase())
                        .copied()
                        .ok_or_else(|| err(format!("BEGIN-TLV {name}: unknown attribute")))?;
                    tlv.push(key);
                }
                "END-TLV" => {
                    if tlv.pop().is_none() {
                        return Err(err("END-TLV without BEGIN-TLV".into()));
                    }
                }
                "ATTRIBUTE" => {
                    let (Some(name), Some(oid), Some(ty)) =
                        (words.get(1), words.get(2), words.get(3))
                    else {
                        return Err(err("ATTRIBUTE needs a name, a number and a type".into()));
                    };
                    let mut path: Vec<u32> = match tlv.last() {
                        Some(parent) => parent.path().to_vec(),
                        None => Vec::new(),
                    };
                    for part in oid.split('.') {
                        path.push(number(part).ok_or_else(|| {
                            err(format!("ATTRIBUTE {name}: `{oid}` is not a number"))
                        })?);
                    }
                    let v = tlv.last().map_or(vendor.unwrap_or(0), |p| p.vendor);
                    let key = AttrKey::new(v, &path)
                        .ok_or_else(|| err(format!("ATTRIBUTE {name}: `{oid}` nests too deep")))?;
                    let data_type = DataType::from_freeradius(ty)
                        .ok_or_else(|| err(format!("ATTRIBUTE {name}: unknown type `{ty}`")))?;
                    let mut def = AttrDef {
                        name: (*name).to_owned(),
                        key,
                        ty: data_type,
                        encrypt: 0,
                        has_tag: false,
                        array: false,
                        concat: false,
                    };
                    if let Some(flags) = words.get(4) {
                        for flag in flags.split(',') {
                            match flag {
                                "has_tag" => def.has_tag = true,
                                "array" => def.array = true,
                                "concat" => def.concat = true,
                                "virtual" | "secret" | "internal" => {}
                                f if f.starts_with("encrypt=") => {
                                    def.encrypt = f[8..]
                                        .parse()
                                        .ok()
                                        .filter(|n| (1..=3).contains(n))
                                        .ok_or_else(|| {
                                            err(format!("ATTRIBUTE {name}: bad `{f}`"))
                                        })?;
                                }
                                f => {
                                    return Err(err(format!(
                                        "ATTRIBUTE {name}: unknown flag `{f}`"
                                    )));
                                }
                            }
                        }
                    }
                    if let Some(extra) = words.get(5) {
                        return Err(err(format!("ATTRIBUTE {name}: unexpected `{extra}`")));
                    }
                    self.by_name.insert(name.to_ascii_lowercase(), key);
                    self.attrs.insert(key, def);
                }
                "VALUE" => {
                    let (Some(attr), Some(name), Some(n)) =
                        (words.get(1), words.get(2), words.get(3))
                    else {
                        return Err(err("VALUE needs an attribute, a name and a number".into()));
                    };
                    let n = number(n).ok_or_else(|| {
                        err(format!("VALUE {attr} {name}: `{n}` is not a number"))
                    })?;
                    self.values
                        .entry(attr.to_ascii_lowercase())
                        .or_default()
                        .insert(n, (*name).to_owned());
                }
                other => return Err(err(format!("unknown keyword `{other}`"))),
            }
        }
        if vendor.is_some() {
            return Err(DictError {
                file: file.to_owned(),
                line: text.lines().count(),
                message: "BEGIN-VENDOR without END-VENDOR".into(),
            });
        }
        Ok(())
    }
}

fn number(s: &str) -> Option<u32> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_dictionary_knows_standard_and_vendor_attributes() {
        let d = Dictionary::builtin();
        assert_eq!(d.standard(1).unwrap().name, "User-Name");
        assert_eq!(d.standard(2).unwrap().encrypt, 1);
        assert!(d.standard(69).unwrap().has_tag);
        assert_eq!(
            d.by_name("message-authenticator").unwrap().key.path(),
            &[80]
        );
        let ms = d.attribute(311, &[16]).unwrap();
        assert_eq!(ms.name, "MS-MPPE-Send-Key");
        assert_eq!(d.by_name("Cisco-AVPair").unwrap().key.vendor, 9);
        assert_eq!(d.by_name("WISPr-Location-Name").unwrap().key.vendor, 14122);
        assert_eq!(
            d.by_name("FreeRADIUS-Statistics-Type").unwrap().key.vendor,
            11344
        );
        assert_eq!(d.by_name("Frag-Status").unwrap().key.path(), &[241, 1]);
        assert_eq!(d.value_name("Service-Type", 2), Some("Framed-User"));
        assert_eq!(d.value_name("Acct-Status-Type", 3), Some("Interim-Update"));
    }

    #[test]
    fn errors_name_the_file_line_and_problem() {
        let mut d = Dictionary::default();
        let e = d
            .parse_str(
                "ATTRIBUTE A 1 string\nATTRIBUTE B x integer\n",
                Path::new("dict.test"),
            )
            .unwrap_err();
        assert_eq!(e.line, 2);
        assert_eq!(
            e.to_string(),
            "dict.test:2: ATTRIBUTE B: `x` is not a number"
        );
        let e = d
            .parse_str("ATTRIBUTE C 3 floaty\n", Path::new("d"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown type `floaty`"), "{e}");
        let e = d.parse_str("FLAVOUR x\n", Path::new("d")).unwrap_err();
        assert!(e.to_string().contains("unknown keyword `FLAVOUR`"));
        let e = d
            .parse_str("BEGIN-VENDOR Nobody\n", Path::new("d"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown vendor"));
        let e = d
            .parse_str("ATTRIBUTE D 4 integer sparkly\n", Path::new("d"))
            .unwrap_err();
        assert!(e.to_string().contains("unknown flag `sparkly`"));
    }

    #[test]
    fn tlv_children_and_vendor_blocks_nest() {
        let mut d = Dictionary::default();
        d.parse_str(
            "VENDOR Acme 99 format=2,1\nBEGIN-VENDOR Acme\nATTRIBUTE Acme-T 5 tlv\n\
             BEGIN-TLV Acme-T\nATTRIBUTE Acme-T-A 1 integer\nEND-TLV Acme-T\nEND-VENDOR Acme\n",
            Path::new("d"),
        )
        .unwrap();
        assert_eq!(d.vendor(99).unwrap().type_size, 2);
        let a = d.by_name("Acme-T-A").unwrap();
        assert_eq!((a.key.vendor, a.key.path()), (99, &[5, 1][..]));
    }
}
