//! Clients: who may talk to the sidecar, with which secret, forwarded where. Keyed by
//! source prefix, longest prefix first (a /32 with its own secret always wins over the /24
//! around it). Transport-neutral: UDP flows, and later TCP/TLS connections, ask the same
//! table.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use ipnet::IpNet;

use crate::{
    blastradius::YesNoAuto,
    codec::{Code, Packet, attr, auth, auth::Secret},
};

/// Which NAS behind a shared address (NAT) an entry is: the flow learns it from its first
/// request whose Message-Authenticator proves the entry's secret and that carries this
/// attribute value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NasKey {
    Identifier(String),
    IpAddress(Ipv4Addr),
}

/// One client definition.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    pub prefix: IpNet,
    pub secret: Secret,
    /// Where its requests go: a pool of upstreams (a single upstream is a pool of one).
    pub pool: Arc<crate::pool::Pool>,
    /// BlastRADIUS: Access-Requests must carry a Message-Authenticator (`Auto`: once this
    /// client has sent one).
    pub require_message_authenticator: YesNoAuto,
    /// BlastRADIUS: an Access-Request with Proxy-State and no Message-Authenticator is
    /// refused (`Auto`: unless the client's first Access-Request had one such, i.e. it is
    /// a proxy).
    pub limit_proxy_state: YesNoAuto,
    /// What `Auto` has learnt of this client (shared by its flows).
    pub learned: Learned,
    /// Set when several NASes share the prefix, each with its own secret.
    pub nas_key: Option<NasKey>,
    /// Over TLS: what its certificate must show beyond a trusted CA's signature.
    pub certificate: CertificateMatch,
    /// Where its Accounting-Requests go when no realm says otherwise; None: `pool`, as its
    /// Access-Requests.
    pub acct_pool: Option<Arc<crate::pool::Pool>>,
    /// Its Accounting-Requests also go to one server of each of these (see
    /// [`crate::realm::Realm::acct_replicas`]), when no realm routes them.
    /// (Shared, so that a request takes them without copying the list.)
    pub acct_replicas: Arc<[Arc<crate::pool::Pool>]>,
    /// RFC 5580 Operator-Name added to its requests that carry none (namespace digit first:
    /// `1example.org` names the operator by its realm, as eduroam asks).
    pub operator_name: Option<Vec<u8>>,
    /// Rewrites of its requests (inbound) and of the replies it gets (outbound).
    pub rewrite: crate::rewrite::Rewrites,
}

/// What a client's TLS certificate must show (RFC 6614 section 2.3), beyond the signature of
/// a trusted CA: one of `names` among its subjectAltNames (a DNS name or an IP address),
/// and, when pinned, a SHA-256 fingerprint among `fingerprints`. Empty: the CA is enough.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateMatch {
    pub names: Vec<String>,
    pub fingerprints: Vec<[u8; 32]>,
}

impl CertificateMatch {
    pub fn is_empty(&self) -> bool {
        self.names.is_empty() && self.fingerprints.is_empty()
    }
}

/// What a client's `Auto` switches have learnt from its Access-Requests.
#[derive(Debug, Default)]
pub struct Learned(std::sync::atomic::AtomicU8);

impl Learned {
    /// Takes what `old` has learnt (a client's entry made again by a reload).
    pub fn adopt(&self, old: &Learned) {
        use std::sync::atomic::Ordering::Relaxed;
        self.0.fetch_or(old.0.load(Relaxed), Relaxed);
    }
}

const SEEN_MA: u8 = 1;
const DECIDED: u8 = 2;
const FIRST_PS_WITHOUT_MA: u8 = 4;

/// The BlastRADIUS checks an Access-Request must pass, as [`Client::blastradius`] decides
/// them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlastRadius {
    /// The request must carry a Message-Authenticator.
    pub require_message_authenticator: bool,
    /// A Proxy-State without a Message-Authenticator is refused.
    pub limit_proxy_state: bool,
    /// This request taught `auto` that the client signs its requests (log it once).
    pub learnt: bool,
}

impl Client {
    /// What this (verified) Access-Request must carry, learning from it for `Auto`.
    ///
    /// Only a request *without* EAP-Message teaches that the client signs: RFC 3579 makes a
    /// Message-Authenticator mandatory with EAP, and many switches sign only their EAP
    /// requests, so an EAP request proves nothing about the client's PAP or CHAP ones.
    pub fn blastradius(&self, has_ma: bool, has_ps: bool, has_eap: bool) -> BlastRadius {
        use std::sync::atomic::Ordering::Relaxed;
        let mut add = DECIDED;
        if has_ma && !has_eap {
            add |= SEEN_MA;
        }
        let before = self.learned.0.load(Relaxed);
        if before & DECIDED == 0 && has_ps && !has_ma {
            add |= FIRST_PS_WITHOUT_MA;
        }
        let before = self.learned.0.fetch_or(add, Relaxed);
        let l = before | add;
        let require = match self.require_message_authenticator {
            YesNoAuto::Yes => true,
            YesNoAuto::No => false,
            YesNoAuto::Auto => l & SEEN_MA != 0,
        };
        let limit = match self.limit_proxy_state {
            YesNoAuto::Yes => true,
            YesNoAuto::No => false,
            YesNoAuto::Auto => l & FIRST_PS_WITHOUT_MA == 0,
        };
        BlastRadius {
            require_message_authenticator: require,
            limit_proxy_state: limit,
            learnt: self.require_message_authenticator == YesNoAuto::Auto
                && before & SEEN_MA == 0
                && l & SEEN_MA != 0,
        }
    }

    /// Whether this client's Access-Requests must carry a Message-Authenticator now
    /// (configured, or learnt by `auto`).
    pub fn requires_message_authenticator(&self) -> bool {
        match self.require_message_authenticator {
            YesNoAuto::Yes => true,
            YesNoAuto::No => false,
            YesNoAuto::Auto => {
                self.learned.0.load(std::sync::atomic::Ordering::Relaxed) & SEEN_MA != 0
            }
        }
    }
}

/// A shared secret as written in a configuration file or given by a directory: text that is
/// never echoed (its `Debug` shows only its length, and a value of the wrong type is refused
/// without quoting it, as serde's own messages would).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretText(zeroize::Zeroizing<String>);

impl SecretText {
    pub fn new(s: String) -> Self {
        Self(zeroize::Zeroizing::new(s))
    }

    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretText({} bytes)", self.0.len())
    }
}

impl<'de> serde::Deserialize<'de> for SecretText {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        const WRONG: &str = "a secret must be a quoted string";
        impl serde::de::Visitor<'_> for Text {
            type Value = SecretText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a quoted string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SecretText, E> {
                Ok(SecretText::new(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<SecretText, E> {
                Ok(SecretText::new(v))
            }
            // serde's defaults would quote the value in the error.
            fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
            fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<SecretText, E> {
                Err(E::custom(WRONG))
            }
        }
        // Any: a deserializer asked for a string reports other types itself, value and all.
        d.deserialize_any(Text)
    }
}

/// What a packet proves about its source: only a signature made with the client's secret
/// does. An upstream's answer proves nothing (it answers spoofed requests too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proof {
    /// A Message-Authenticator (Access-Request, Status-Server) or a Request Authenticator
    /// (Accounting-Request) that verified with the client's secret.
    Proved,
    /// Nothing to verify: an Access-Request without Message-Authenticator from a client
    /// that need not send one. It may be relayed, but it proves nothing.
    Unverifiable,
    /// Not relayed; the reason as counted in `radius_proxy_drops_total`.
    Refused(&'static str),
}

impl Client {
    /// What `packet` (a datagram from a NAS, not yet part of a flow it has proved) proves.
    /// Learns nothing: the packet is checked again, and learnt from, when it is relayed.
    pub fn proof(&self, packet: &[u8]) -> Proof {
        let Ok(p) = Packet::parse(packet) else {
            return Proof::Refused("malformed");
        };
        let has_ma = p.message_authenticator_offset().is_some();
        match p.code() {
            Code::AccessRequest if !has_ma => {
                if self.requires_message_authenticator() {
                    Proof::Refused("no_message_authenticator")
                } else {
                    Proof::Unverifiable
                }
            }
            Code::StatusServer if !has_ma => {
                Proof::Refused("status_server_without_message_authenticator")
            }
            Code::AccessRequest | Code::StatusServer | Code::AccountingRequest => {
                match auth::verify(&p, &self.secret, None) {
                    Ok(()) => Proof::Proved,
                    Err(_) => Proof::Refused("bad_signature"),
                }
            }
            // Answers to CoA requests belong to a flow that sent one; nothing else is
            // taken from a NAS.
            _ => Proof::Refused("not_forwarded"),
        }
    }
}

/// What a new flow knows of its client.
#[derive(Clone, Debug)]
pub enum Binding {
    One(Arc<Client>),
    /// Several NASes behind one address: the first proven request decides.
    Nat(Arc<[Arc<Client>]>),
}

/// Which of `candidates` sent `packet`: a Message-Authenticator that verifies under its
/// secret, and its NAS-Identifier or NAS-IP-Address. Without a Message-Authenticator nothing
/// is proven (NAT mode requires one).
pub fn identify(candidates: &[Arc<Client>], packet: &[u8]) -> Option<Arc<Client>> {
    let p = Packet::parse(packet).ok()?;
    p.message_authenticator_offset()?;
    let ident = p.get(attr::NAS_IDENTIFIER).map(|a| a.value);
    let ip = p
        .get(attr::NAS_IP_ADDRESS)
        .and_then(|a| <[u8; 4]>::try_from(a.value).ok())
        .map(Ipv4Addr::from);
    candidates
        .iter()
        .find(|c| {
            let named = match &c.nas_key {
                Some(NasKey::Identifier(id)) => ident == Some(id.as_bytes()),
                Some(NasKey::IpAddress(a)) => ip == Some(*a),
                None => true,
            };
            named && auth::verify(&p, &c.secret, None).is_ok()
        })
        .cloned()
}

/// Static clients, longest prefix first.
#[derive(Debug, Default)]
pub struct ClientTable {
    by_len: Vec<Arc<Client>>,
}

impl ClientTable {
    /// Adds a client; false when its prefix is already defined, unless every entry of the
    /// prefix names its NAS (NAT) and this name is new.
    pub fn insert(&mut self, c: Client) -> bool {
        if self.by_len.iter().any(|x| {
            x.prefix == c.prefix
                && (x.nas_key.is_none() || c.nas_key.is_none() || x.nas_key == c.nas_key)
        }) {
            return false;
        }
        let pos = self
            .by_len
            .iter()
            .position(|x| x.prefix.prefix_len() < c.prefix.prefix_len())
            .unwrap_or(self.by_len.len());
        self.by_len.insert(pos, Arc::new(c));
        true
    }

    /// The most specific client whose prefix holds `ip` (IPv4-mapped IPv6 counts as IPv4).
    pub fn lookup(&self, ip: IpAddr) -> Option<Arc<Client>> {
        match self.binding(ip)? {
            Binding::One(c) => Some(c),
            Binding::Nat(_) => None,
        }
    }

    /// The client of a new flow from `ip`, or the NASes that share its prefix.
    pub fn binding(&self, ip: IpAddr) -> Option<Binding> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let first = self.by_len.iter().find(|c| c.prefix.contains(&ip))?;
        if first.nas_key.is_none() {
            return Some(Binding::One(first.clone()));
        }
        let same: Vec<Arc<Client>> = self
            .by_len
            .iter()
            .filter(|c| c.prefix == first.prefix)
            .cloned()
            .collect();
        Some(Binding::Nat(same.into()))
    }

    pub fn len(&self) -> usize {
        self.by_len.len()
    }

    /// Every client, longest prefix first.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.by_len.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::upstream::Upstream;
    use std::time::Duration;

    /// A client of `prefix` with `secret`, behind a pool of one upstream (other modules'
    /// tests use it too).
    pub(crate) fn client(prefix: &str, secret: &str) -> Client {
        Client {
            name: prefix.into(),
            prefix: prefix.parse().unwrap(),
            secret: Secret::new(secret.as_bytes()),
            pool: Arc::new(crate::pool::Pool::single(Arc::new(Upstream {
                name: "u".into(),
                auth: "127.0.0.1:1".parse().unwrap(),
                acct: None,
                secret: Secret::new(b"u"),
                timeout: Duration::from_secs(1),
                options: Default::default(),
                health: Default::default(),
                stream: false,
            }))),
            require_message_authenticator: YesNoAuto::No,
            limit_proxy_state: YesNoAuto::Auto,
            learned: Default::default(),
            nas_key: None,
            certificate: Default::default(),
            operator_name: None,
            rewrite: Default::default(),
            acct_pool: None,
            acct_replicas: Default::default(),
        }
    }

    #[test]
    fn nas_behind_one_address_are_told_apart_by_their_proven_secret() {
        use crate::codec::{Code, PacketMut, auth::SharedSecret};
        let mut t = ClientTable::default();
        let mut a = client("198.51.100.0/24", "secret-a");
        a.nas_key = Some(NasKey::Identifier("ap-a".into()));
        let mut b = client("198.51.100.0/24", "secret-b");
        b.nas_key = Some(NasKey::Identifier("ap-b".into()));
        assert!(t.insert(a));
        assert!(t.insert(b));
        assert!(!t.insert(client("198.51.100.0/24", "keyless")));
        let Some(Binding::Nat(cands)) = t.binding("198.51.100.9".parse().unwrap()) else {
            panic!("a NAT binding");
        };
        let packet = |id: &str, secret: &[u8], ma: bool| {
            let mut buf = [0u8; 4096];
            let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 1).unwrap();
            p.set_authenticator(&crate::codec::auth::random_authenticator());
            if ma {
                p.message_authenticator_first().unwrap();
            }
            p.push(attr::NAS_IDENTIFIER, id.as_bytes()).unwrap();
            p.sign(secret, None).unwrap();
            p.as_bytes().to_vec()
        };
        assert_eq!(
            identify(&cands, &packet("ap-b", b"secret-b", true))
                .unwrap()
                .secret
                .bytes(),
            b"secret-b"
        );
        assert_eq!(
            identify(&cands, &packet("ap-a", b"secret-a", true))
                .unwrap()
                .secret
                .bytes(),
            b"secret-a"
        );
        assert!(
            identify(&cands, &packet("ap-a", b"secret-b", true)).is_none(),
            "name and secret must agree"
        );
        assert!(
            identify(&cands, &packet("ap-a", b"secret-a", false)).is_none(),
            "no MA, no proof"
        );
    }

    #[test]
    fn a_secret_of_the_wrong_type_is_refused_without_quoting_it() {
        #[derive(serde::Deserialize, Debug)]
        struct S {
            #[allow(dead_code)]
            secret: SecretText,
        }
        for text in [
            "secret = 31415926535",
            "secret = 3.1415926535",
            "secret = true",
            "secret = [31415926535]",
        ] {
            let e = toml::from_str::<S>(text).unwrap_err();
            assert!(!e.message().contains("31415926535"), "{text}: {e}");
            assert!(!e.message().contains("true"), "{text}: {e}");
        }
        let e = serde_json::from_str::<S>(r#"{"secret": 31415926535}"#).unwrap_err();
        assert!(!e.to_string().contains("31415926535"), "{e}");
        let ok: S = toml::from_str("secret = \"31415926535\"").unwrap();
        assert_eq!(format!("{ok:?}"), "S { secret: SecretText(11 bytes) }");
    }

    #[test]
    fn only_a_signature_with_the_clients_secret_proves_a_source() {
        use crate::codec::{PacketMut, edit};
        let mut c = client("192.0.2.0/24", "the-secret");
        c.require_message_authenticator = YesNoAuto::Auto;
        let access = |ma: bool, secret: &[u8]| {
            let mut buf = [0u8; 4096];
            let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 1).unwrap();
            p.set_authenticator(&auth::random_authenticator());
            if ma {
                p.message_authenticator_first().unwrap();
            }
            p.push(attr::USER_NAME, b"u").unwrap();
            p.sign(secret, None).unwrap();
            p.as_bytes().to_vec()
        };
        let accounting = |secret: &[u8]| {
            let mut buf = [0u8; 4096];
            let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, 1).unwrap();
            p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
            p.sign(secret, None).unwrap();
            p.as_bytes().to_vec()
        };
        assert_eq!(c.proof(&access(true, b"the-secret")), Proof::Proved);
        assert_eq!(
            c.proof(&access(true, b"spoofer")),
            Proof::Refused("bad_signature")
        );
        assert_eq!(c.proof(&access(false, b"spoofer")), Proof::Unverifiable);
        assert_eq!(c.proof(&accounting(b"the-secret")), Proof::Proved);
        assert_eq!(
            c.proof(&accounting(b"spoofer")),
            Proof::Refused("bad_signature")
        );
        let mut buf = [0u8; 64];
        let st = edit::status_server(&mut buf, 1, b"the-secret").unwrap();
        assert_eq!(c.proof(st.as_bytes()), Proof::Proved);
        assert_eq!(c.proof(&[1, 2, 0, 3]), Proof::Refused("malformed"));
        // Once the client is known to sign, an unsigned request is refused outright.
        c.require_message_authenticator = YesNoAuto::Yes;
        assert_eq!(
            c.proof(&access(false, b"the-secret")),
            Proof::Refused("no_message_authenticator")
        );
    }

    #[test]
    fn the_longest_prefix_wins_whatever_the_order() {
        let mut t = ClientTable::default();
        assert!(t.insert(client("192.0.2.0/24", "wide")));
        assert!(t.insert(client("192.0.2.7/32", "narrow")));
        assert!(t.insert(client("0.0.0.0/0", "any")));
        assert!(!t.insert(client("192.0.2.0/24", "again")));
        let name = |ip: &str| t.lookup(ip.parse().unwrap()).map(|c| c.name.clone());
        assert_eq!(name("192.0.2.7").as_deref(), Some("192.0.2.7/32"));
        assert_eq!(name("192.0.2.8").as_deref(), Some("192.0.2.0/24"));
        assert_eq!(name("198.51.100.1").as_deref(), Some("0.0.0.0/0"));
        assert_eq!(name("::ffff:192.0.2.7").as_deref(), Some("192.0.2.7/32"));
        assert_eq!(name("2001:db8::1"), None);
    }

    #[test]
    fn auto_blastradius_switches_learn_from_the_clients_requests() {
        let mut nas = client("192.0.2.0/24", "s");
        (nas.require_message_authenticator, nas.limit_proxy_state) =
            (YesNoAuto::Auto, YesNoAuto::Auto);
        let b = |c: &Client, ma, ps, eap| {
            let r = c.blastradius(ma, ps, eap);
            (
                r.require_message_authenticator,
                r.limit_proxy_state,
                r.learnt,
            )
        };
        // A NAS: no Proxy-State in its first request, so Proxy-State needs an MA from now.
        assert_eq!(b(&nas, false, false, false), (false, true, false));
        // EAP requests always carry one (RFC 3579): that teaches nothing of PAP requests.
        assert_eq!(b(&nas, true, false, true), (false, true, false));
        assert_eq!(b(&nas, false, false, false), (false, true, false));
        assert!(!nas.requires_message_authenticator());
        // A signed request without EAP: from now on it must always sign; learnt once.
        assert_eq!(b(&nas, true, false, false), (true, true, true));
        assert_eq!(b(&nas, true, false, false), (true, true, false));
        assert_eq!(b(&nas, false, false, false), (true, true, false));
        assert!(nas.requires_message_authenticator());
        let mut proxy = client("198.51.100.0/24", "s");
        (proxy.require_message_authenticator, proxy.limit_proxy_state) =
            (YesNoAuto::Auto, YesNoAuto::Auto);
        // A proxy: its first request had Proxy-State and no MA; not limited.
        assert_eq!(b(&proxy, false, true, false), (false, false, false));
        assert_eq!(b(&proxy, false, true, false), (false, false, false));
        proxy.limit_proxy_state = YesNoAuto::Yes;
        assert_eq!(b(&proxy, false, true, false), (false, true, false));
        // "no" learns nothing, "yes" needs nothing learnt.
        let mut off = client("203.0.113.0/24", "s");
        off.require_message_authenticator = YesNoAuto::No;
        assert_eq!(b(&off, true, false, false), (false, true, false));
        off.require_message_authenticator = YesNoAuto::Yes;
        assert!(off.requires_message_authenticator());
    }
}
