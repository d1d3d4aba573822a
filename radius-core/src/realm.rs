//! Realms, sans-IO: where a request goes by the realm of its User-Name, as FreeRADIUS's
//! `proxy.conf` and radsecproxy's `realm` blocks route (eduroam runs on them).
//!
//! The realm of a name: after the last suffix delimiter (`user@realm`), else before the
//! first prefix delimiter (`realm/user`, `realm\user`); the delimiters are configurable.
//! Realms are matched without scanning them one by one, in this order, the first match
//! winning: a name written exactly (a hash map; case does not matter), then a wildcard
//! `*.example.org` (each parent domain of the realm looked up, the most specific first;
//! it matches subdomains, not `example.org` itself), then regular expressions (all of them
//! in one pass of a `RegexSet`, the first written winning), then `DEFAULT`. A name without
//! a realm goes to the `NULL` realm when there is one. Without a match the request goes to
//! its client's pool, as when no realm is configured.

use std::{collections::HashMap, ops::Range, sync::Arc};

use crate::pool::Pool;

/// What a realm does with the requests routed to it.
#[derive(Debug)]
pub struct Realm {
    /// As written (`example.org`, `*.example.org`, `~regex`, `DEFAULT`, `NULL`).
    pub name: String,
    /// Access-Requests go to this pool; None: they are refused here.
    pub auth: Option<Arc<Pool>>,
    /// Accounting-Requests go to this pool; None: answered here when `answer_accounting`,
    /// else dropped (and counted).
    pub acct: Option<Arc<Pool>>,
    /// Every Accounting-Request also goes to one server of each of these (the NAS is
    /// answered on `acct`'s answer; a replica's failure is counted, never shown). Shared,
    /// so that a request takes them without copying the list.
    pub acct_replicas: Arc<[Arc<Pool>]>,
    /// The Reply-Message of the Access-Reject this sidecar sends for a refused realm.
    pub reject_message: Option<String>,
    pub answer_accounting: bool,
    /// The realm goes from User-Name before the request is forwarded.
    pub strip: bool,
}

/// Where a User-Name's realm is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delimiters {
    /// `user@realm`: the realm follows the last of these.
    pub suffix: Vec<u8>,
    /// `realm/user`, `realm\user`: the realm precedes the first of these.
    pub prefix: Vec<u8>,
}

impl Default for Delimiters {
    fn default() -> Self {
        Self {
            suffix: vec![b'@'],
            prefix: vec![b'/', b'\\'],
        }
    }
}

/// A realm a name matched, and what of the name is left once the realm is stripped.
#[derive(Debug)]
pub struct Routed<'a> {
    pub realm: &'a Realm,
    /// The user part of the name (the whole name when it has no realm).
    pub user: Range<usize>,
}

/// A realm's name that does not make a realm.
#[derive(Debug, thiserror::Error)]
pub enum RealmError {
    #[error("realm `{0}` is written twice")]
    Duplicate(String),
    #[error("realm `{name}`: {message}")]
    Regex { name: String, message: String },
    #[error("realm `{0}`: a wildcard is `*.` and a domain")]
    Wildcard(String),
}

/// Every realm, indexed for a look-up that does not depend on how many there are.
#[derive(Debug, Default)]
pub struct Realms {
    realms: Vec<Realm>,
    exact: HashMap<String, usize>,
    /// `*.example.org` under `example.org`.
    wildcard: HashMap<String, usize>,
    regexes: Option<regex::RegexSet>,
    /// The realm of each regular expression, in the set's order.
    regex_realm: Vec<usize>,
    default: Option<usize>,
    no_realm: Option<usize>,
    delimiters: Delimiters,
}

/// The longest realm looked up (a User-Name is at most 253 bytes).
const MAX_REALM: usize = 253;

impl Realms {
    /// Indexes `realms` (in the configuration's order, which orders the regexes).
    pub fn new(realms: Vec<Realm>, delimiters: Delimiters) -> Result<Self, RealmError> {
        let mut t = Realms {
            delimiters,
            ..Realms::default()
        };
        let mut patterns = Vec::new();
        for (i, r) in realms.iter().enumerate() {
            let name = r.name.as_str();
            let taken = match name {
                "DEFAULT" => t.default.replace(i).is_some(),
                "NULL" => t.no_realm.replace(i).is_some(),
                _ => {
                    if let Some(re) = name.strip_prefix('~') {
                        patterns.push(re.to_owned());
                        t.regex_realm.push(i);
                        false
                    } else if let Some(domain) = name.strip_prefix("*.") {
                        if domain.is_empty() || domain.contains('*') {
                            return Err(RealmError::Wildcard(name.to_owned()));
                        }
                        t.wildcard.insert(domain.to_ascii_lowercase(), i).is_some()
                    } else if name.contains('*') {
                        return Err(RealmError::Wildcard(name.to_owned()));
                    } else {
                        t.exact.insert(name.to_ascii_lowercase(), i).is_some()
                    }
                }
            };
            if taken {
                return Err(RealmError::Duplicate(name.to_owned()));
            }
        }
        if !patterns.is_empty() {
            let set = regex::RegexSetBuilder::new(&patterns)
                .case_insensitive(true)
                .build()
                .map_err(|e| {
                    // Which one: each alone, to name it.
                    let bad = patterns
                        .iter()
                        .zip(&t.regex_realm)
                        .find(|(p, _)| regex::Regex::new(p).is_err())
                        .map_or_else(String::new, |(_, &i)| realms[i].name.clone());
                    RealmError::Regex {
                        name: bad,
                        message: e.to_string(),
                    }
                })?;
            t.regexes = Some(set);
        }
        t.realms = realms;
        Ok(t)
    }

    pub fn len(&self) -> usize {
        self.realms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.realms.is_empty()
    }

    /// The realm part of `name` and the user part, by the delimiters: None without a realm.
    pub fn split(&self, name: &[u8]) -> Option<(Range<usize>, Range<usize>)> {
        let d = &self.delimiters;
        if let Some(at) = name.iter().rposition(|b| d.suffix.contains(b)) {
            return Some((at + 1..name.len(), 0..at));
        }
        let at = name.iter().position(|b| d.prefix.contains(b))?;
        Some((0..at, at + 1..name.len()))
    }

    /// The realm `user_name` is routed to, if any (see the module's notes for the order).
    pub fn route(&self, user_name: &[u8]) -> Option<Routed<'_>> {
        let Some((realm, user)) = self.split(user_name) else {
            return self.no_realm.map(|i| Routed {
                realm: &self.realms[i],
                user: 0..user_name.len(),
            });
        };
        let i = self.lookup(&user_name[realm]).or(self.default)?;
        Some(Routed {
            realm: &self.realms[i],
            user,
        })
    }

    fn lookup(&self, realm: &[u8]) -> Option<usize> {
        if realm.is_empty() || realm.len() > MAX_REALM {
            return None;
        }
        // Lower case on the stack: no allocation per request.
        let mut buf = [0u8; MAX_REALM];
        let lower = &mut buf[..realm.len()];
        lower.copy_from_slice(realm);
        lower.make_ascii_lowercase();
        let lower = std::str::from_utf8(lower).ok()?;
        if let Some(&i) = self.exact.get(lower) {
            return Some(i);
        }
        if !self.wildcard.is_empty() {
            let mut rest = lower;
            while let Some((_, parent)) = rest.split_once('.') {
                if let Some(&i) = self.wildcard.get(parent) {
                    return Some(i);
                }
                rest = parent;
            }
        }
        let set = self.regexes.as_ref()?;
        let first = set.matches(lower).iter().next()?;
        self.regex_realm.get(first).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn realm(name: &str) -> Realm {
        Realm {
            name: name.into(),
            auth: None,
            acct: None,
            acct_replicas: Default::default(),
            reject_message: None,
            answer_accounting: false,
            strip: false,
        }
    }

    fn table(names: &[&str]) -> Realms {
        Realms::new(
            names.iter().map(|n| realm(n)).collect(),
            Delimiters::default(),
        )
        .expect("realms")
    }

    fn routed<'a>(t: &'a Realms, name: &str) -> Option<(&'a str, String)> {
        t.route(name.as_bytes()).map(|r| {
            (
                r.realm.name.as_str(),
                String::from_utf8_lossy(&name.as_bytes()[r.user]).into_owned(),
            )
        })
    }

    #[test]
    fn a_name_finds_its_realm_by_suffix_or_prefix() {
        let t = table(&["example.org", "corp", "NULL"]);
        assert_eq!(
            routed(&t, "alice@Example.ORG"),
            Some(("example.org", "alice".into()))
        );
        assert_eq!(
            routed(&t, "a@b@example.org"),
            Some(("example.org", "a@b".into())),
            "the last @"
        );
        assert_eq!(routed(&t, "corp/bob"), Some(("corp", "bob".into())));
        assert_eq!(routed(&t, "corp\\bob"), Some(("corp", "bob".into())));
        assert_eq!(routed(&t, "carol"), Some(("NULL", "carol".into())));
        assert_eq!(routed(&t, "dave@elsewhere.net"), None, "no DEFAULT");
    }

    #[test]
    fn exact_then_the_most_specific_wildcard_then_regexes_in_order_then_default() {
        let t = table(&[
            "~^staff\\.",
            "*.example.org",
            "*.eu.example.org",
            "eu.example.org",
            "~example",
            "DEFAULT",
        ]);
        let realm = |n: &str| routed(&t, n).map(|(r, _)| r.to_owned());
        assert_eq!(realm("a@eu.example.org").as_deref(), Some("eu.example.org"));
        assert_eq!(
            realm("a@x.eu.example.org").as_deref(),
            Some("*.eu.example.org")
        );
        assert_eq!(realm("a@x.example.org").as_deref(), Some("*.example.org"));
        assert_eq!(
            realm("a@staff.example.org").as_deref(),
            Some("*.example.org"),
            "a wildcard before any regex"
        );
        assert_eq!(realm("a@staff.example.com").as_deref(), Some("~^staff\\."));
        assert_eq!(realm("a@example.net").as_deref(), Some("~example"));
        assert_eq!(realm("a@other.net").as_deref(), Some("DEFAULT"));
        assert_eq!(realm("nobody").as_deref(), None, "no NULL realm");
    }

    #[test]
    fn ten_thousand_realms_are_found_without_a_scan() {
        let names: Vec<String> = (0..10_000)
            .map(|i| format!("realm{i}.example.org"))
            .collect();
        let t = Realms::new(
            names.iter().map(|n| realm(n)).collect(),
            Delimiters::default(),
        )
        .expect("realms");
        assert_eq!(t.len(), 10_000);
        assert_eq!(
            routed(&t, "x@REALM9999.example.org").map(|(r, _)| r.to_owned()),
            Some("realm9999.example.org".into())
        );
    }

    /// The documented order, by scanning every realm: what the indexed look-up must equal.
    fn reference(names: &[String], name: &str) -> Option<String> {
        let Some((realm, _)) = name
            .rsplit_once('@')
            .map(|(_, r)| (r.to_ascii_lowercase(), ()))
            .or_else(|| {
                name.split_once(['/', '\\'])
                    .map(|(r, _)| (r.to_ascii_lowercase(), ()))
            })
        else {
            return names.iter().find(|n| *n == "NULL").cloned();
        };
        let exact = names.iter().find(|n| n.to_ascii_lowercase() == realm);
        // The most specific wildcard: the longest domain it names.
        let wildcard = names
            .iter()
            .filter_map(|n| Some((n, n.strip_prefix("*.")?.to_ascii_lowercase())))
            .filter(|(_, d)| realm.ends_with(&format!(".{d}")))
            .max_by_key(|(_, d)| d.len())
            .map(|(n, _)| n);
        let regex = names.iter().find(|n| {
            n.strip_prefix('~').is_some_and(|re| {
                regex::RegexBuilder::new(re)
                    .case_insensitive(true)
                    .build()
                    .is_ok_and(|r| !realm.is_empty() && r.is_match(&realm))
            })
        });
        let default = names.iter().find(|n| *n == "DEFAULT");
        exact
            .filter(|_| !realm.is_empty())
            .or(wildcard)
            .or(regex)
            .or(default)
            .cloned()
    }

    proptest::proptest! {
        #[test]
        fn the_indexed_look_up_is_the_documented_order(
            labels in proptest::collection::vec("[a-c]{1,2}", 1..6),
            picks in proptest::collection::vec((0usize..6, 0usize..4), 1..12),
            users in proptest::collection::vec((0usize..4, 0usize..6, 0usize..3), 1..20),
            default in proptest::bool::ANY,
            null in proptest::bool::ANY,
        ) {
            // Realm names from a few labels, so that names, wildcards and regexes collide.
            let domain = |i: usize, depth: usize| -> String {
                (0..=depth).map(|k| labels[(i + k) % labels.len()].as_str()).collect::<Vec<_>>().join(".")
            };
            let mut names: Vec<String> = Vec::new();
            for (i, (depth, kind)) in picks.iter().enumerate() {
                let d = domain(i, *depth % 3);
                let n = match kind {
                    0 => d,
                    1 => format!("*.{d}"),
                    2 => format!("~^{}", d.replace('.', "\\.")),
                    _ => format!("~{}$", labels[i % labels.len()]),
                };
                if !names.iter().any(|x| x.eq_ignore_ascii_case(&n)) {
                    names.push(n);
                }
            }
            if default { names.push("DEFAULT".into()); }
            if null { names.push("NULL".into()); }
            let t = table(&names.iter().map(String::as_str).collect::<Vec<_>>());
            for (form, i, depth) in users {
                let d = domain(i, depth).to_ascii_uppercase();
                let name = match form {
                    0 => format!("u@{d}"),
                    1 => format!("{d}/u"),
                    2 => format!("{d}\\u"),
                    _ => "u".to_owned(),
                };
                let got = t.route(name.as_bytes()).map(|r| r.realm.name.clone());
                proptest::prop_assert_eq!(got, reference(&names, &name), "{} in {:?}", name, names);
            }
        }
    }

    #[test]
    fn a_realm_that_cannot_be_indexed_is_named() {
        let e = Realms::new(vec![realm("a"), realm("A")], Delimiters::default())
            .expect_err("duplicate");
        assert!(e.to_string().contains("`A`"), "{e}");
        let e = Realms::new(vec![realm("~(")], Delimiters::default()).expect_err("bad regex");
        assert!(e.to_string().contains("`~(`"), "{e}");
        assert!(Realms::new(vec![realm("a.*.org")], Delimiters::default()).is_err());
    }
}
