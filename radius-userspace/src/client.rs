//! Clients: who may talk to the sidecar, with which secret, forwarded where. Keyed by
//! source prefix, longest prefix first (a /32 with its own secret always wins over the /24
//! around it). Transport-neutral: UDP flows, and later TCP/TLS connections, ask the same
//! table.

use std::{net::IpAddr, sync::Arc};

use ipnet::IpNet;

use crate::{codec::auth::Secret, proxy::Upstream};

/// One client definition.
#[derive(Debug)]
pub struct Client {
    pub name: String,
    pub prefix: IpNet,
    pub secret: Secret,
    pub upstream: Arc<Upstream>,
    pub require_message_authenticator: bool,
}

/// Static clients, longest prefix first.
#[derive(Debug, Default)]
pub struct ClientTable {
    by_len: Vec<Arc<Client>>,
}

impl ClientTable {
    /// Adds a client; false when its prefix is already defined.
    pub fn insert(&mut self, c: Client) -> bool {
        if self.by_len.iter().any(|x| x.prefix == c.prefix) {
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
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.by_len.iter().find(|c| c.prefix.contains(&ip)).cloned()
    }

    pub fn len(&self) -> usize {
        self.by_len.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_len.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn client(prefix: &str, secret: &str) -> Client {
        Client {
            name: prefix.into(),
            prefix: prefix.parse().unwrap(),
            secret: Secret::new(secret.as_bytes()),
            upstream: Arc::new(Upstream {
                name: "u".into(),
                auth: "127.0.0.1:1".parse().unwrap(),
                acct: None,
                secret: Secret::new(b"u"),
                timeout: Duration::from_secs(1),
            }),
            require_message_authenticator: false,
        }
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
}
