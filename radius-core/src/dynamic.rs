//! Dynamic clients as the workers see them, sans-IO: which prefixes are dynamic, the cache
//! of definitions and refusals every worker shares (defined for `lifetime`, refused for
//! `nak_lifetime`, at most `max_clients` live), and the bounds on packets kept meanwhile.
//! The directories that answer (file, HTTP, SQL) are the daemon's (`dynamic.rs` there);
//! the packets kept are [`crate::pending`]'s.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;

use crate::client::Client;

/// The cache state of one source address.
#[derive(Debug, Clone)]
pub enum Entry {
    Defining,
    Defined { client: Arc<Client>, until: Instant },
    Refused { until: Instant },
}

/// What a worker should do with a packet from an unknown source.
#[derive(Debug)]
pub enum Resolution {
    /// Defined (cached): make the flow with this client.
    Client(Arc<Client>),
    /// A definition runs (`start`: this call must start it): keep the packet.
    Defining { start: bool },
    /// Refused (cached), or over `max_clients`.
    Refused,
    /// Not in a dynamic prefix.
    NotDynamic,
}

/// Dynamic-client settings and the shared cache.
#[derive(Debug)]
pub struct Dynamic {
    pub prefixes: Vec<IpNet>,
    pub lifetime: Duration,
    pub nak_lifetime: Duration,
    pub max_clients: usize,
    /// Packets kept per flow, and in all, while sources are defined.
    pub max_pending_per_flow: usize,
    pub max_pending_packets: usize,
    /// How long packets wait for a definition that never ends (a directory answers or
    /// times out within its timeout; a queue for the concurrency limit may add more).
    pub max_wait: Duration,
    cache: Mutex<HashMap<IpAddr, Entry>>,
}

impl Dynamic {
    /// `timeout` is the directory's: packets wait at most four of it plus 5 s.
    pub fn new(
        prefixes: Vec<IpNet>,
        (lifetime, nak_lifetime): (Duration, Duration),
        max_clients: usize,
        timeout: Duration,
        (max_pending_per_flow, max_pending_packets): (usize, usize),
    ) -> Self {
        Self {
            prefixes,
            lifetime,
            nak_lifetime,
            max_clients,
            max_pending_per_flow,
            max_pending_packets,
            max_wait: timeout * 4 + Duration::from_secs(5),
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `ip` up and, when nobody is defining it yet, marks it as being defined.
    /// Taken once per new flow, never per packet of a flow.
    pub fn resolve(&self, ip: IpAddr, now: Instant) -> Resolution {
        if !self.prefixes.iter().any(|p| p.contains(&ip)) {
            return Resolution::NotDynamic;
        }
        let mut cache = self.cache();
        match cache.get(&ip) {
            Some(Entry::Defined { client, until }) if *until > now => {
                Resolution::Client(client.clone())
            }
            Some(Entry::Refused { until }) if *until > now => Resolution::Refused,
            Some(Entry::Defining) => Resolution::Defining { start: false },
            _ => {
                let live = cache
                    .values()
                    .filter(|e| matches!(e, Entry::Defined { until, .. } if *until > now))
                    .count();
                if live >= self.max_clients {
                    cache.retain(|_, e| match e {
                        Entry::Defined { until, .. } | Entry::Refused { until } => *until > now,
                        Entry::Defining => true,
                    });
                    if live >= self.max_clients {
                        return Resolution::Refused;
                    }
                }
                cache.insert(ip, Entry::Defining);
                Resolution::Defining { start: true }
            }
        }
    }

    /// Records how the definition of `ip` ended.
    pub fn record<E>(&self, ip: IpAddr, outcome: &Result<Arc<Client>, E>, now: Instant) {
        let entry = match outcome {
            Ok(c) => Entry::Defined {
                client: c.clone(),
                until: now + self.lifetime,
            },
            Err(_) => Entry::Refused {
                until: now + self.nak_lifetime,
            },
        };
        self.cache().insert(ip, entry);
    }
}
