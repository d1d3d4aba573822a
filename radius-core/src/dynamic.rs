//! Dynamic clients as the workers see them, sans-IO: which prefixes are dynamic, the cache
//! of definitions and refusals every worker shares (each kept for its [`Lifetimes`], at
//! most `max_clients` live), and the bounds on packets kept meanwhile.
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

/// Why a source was not defined; each is remembered for its own time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotDefined {
    /// The directory said no, or what it gave cannot be used.
    Refused,
    /// The directory did not answer: down, an error, or its timeout.
    Unanswered,
}

/// How long the cache keeps each outcome of a definition.
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    pub defined: Duration,
    /// A refusal (also the XDP negative entry's life).
    pub refused: Duration,
    /// A directory that did not answer: short, so that a NAS that came during an outage is
    /// served soon after it ends; long enough that the retransmissions of NASes do not
    /// each ask a directory that is down.
    pub unanswered: Duration,
}

/// Dynamic-client settings and the shared cache.
#[derive(Debug)]
pub struct Dynamic {
    pub prefixes: Vec<IpNet>,
    pub lifetimes: Lifetimes,
    pub max_clients: usize,
    /// Packets kept per flow, and in all, while sources are defined.
    pub max_pending_per_flow: usize,
    pub max_pending_packets: usize,
    /// How long packets wait for a definition that never ends (a directory answers or
    /// times out within its timeout; a queue for the concurrency limit may add more).
    pub max_wait: Duration,
    cache: Mutex<Cache>,
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<IpAddr, Entry>,
    /// Expired entries are swept at most once a second (and whenever the map is full).
    next_sweep: Option<Instant>,
}

/// What the cache holds about one source (`radius-sidecar status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CachedSource {
    pub ip: IpAddr,
    /// "defined", "refused" (refused, or the directory did not answer) or "defining".
    pub state: &'static str,
    /// The client's name, when defined.
    pub client: Option<String>,
    /// How long the entry has left (zero while defining).
    pub left: Duration,
}

/// How often expired entries are swept, at most.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Dynamic {
    /// `timeout` is the directory's: packets wait at most four of it plus 5 s.
    pub fn new(
        prefixes: Vec<IpNet>,
        lifetimes: Lifetimes,
        max_clients: usize,
        timeout: Duration,
        (max_pending_per_flow, max_pending_packets): (usize, usize),
    ) -> Self {
        Self {
            prefixes,
            lifetimes,
            max_clients,
            max_pending_per_flow,
            max_pending_packets,
            max_wait: timeout * 4 + Duration::from_secs(5),
            cache: Mutex::new(Cache::default()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live entries, at most `limit` of them (by address), and how many there are.
    pub fn snapshot(&self, now: Instant, limit: usize) -> (Vec<CachedSource>, usize) {
        let cache = self.cache();
        let mut live: Vec<CachedSource> = cache
            .map
            .iter()
            .filter_map(|(&ip, e)| match e {
                Entry::Defined { client, until } if *until > now => Some(CachedSource {
                    ip,
                    state: "defined",
                    client: Some(client.name.clone()),
                    left: *until - now,
                }),
                Entry::Refused { until } if *until > now => Some(CachedSource {
                    ip,
                    state: "refused",
                    client: None,
                    left: *until - now,
                }),
                Entry::Defining => Some(CachedSource {
                    ip,
                    state: "defining",
                    client: None,
                    left: Duration::ZERO,
                }),
                _ => None,
            })
            .collect();
        let total = live.len();
        live.sort_by_key(|c| c.ip);
        live.truncate(limit);
        (live, total)
    }

    /// Looks `ip` up and, when nobody is defining it yet, marks it as being defined.
    /// Taken once per new flow, never per packet of a flow.
    pub fn resolve(&self, ip: IpAddr, now: Instant) -> Resolution {
        if !self.prefixes.iter().any(|p| p.contains(&ip)) {
            return Resolution::NotDynamic;
        }
        let mut guard = self.cache();
        let Cache {
            map: cache,
            next_sweep,
        } = &mut *guard;
        match cache.get(&ip) {
            Some(Entry::Defined { client, until }) if *until > now => {
                Resolution::Client(client.clone())
            }
            Some(Entry::Refused { until }) if *until > now => Resolution::Refused,
            Some(Entry::Defining) => Resolution::Defining { start: false },
            _ => {
                // Expired entries go once a second, and whenever the map holds
                // `max_clients` entries of any kind: it stays the size of what is alive,
                // however many sources come and go.
                if cache.len() >= self.max_clients || next_sweep.is_none_or(|t| now >= t) {
                    cache.retain(|_, e| match e {
                        Entry::Defined { until, .. } | Entry::Refused { until } => *until > now,
                        Entry::Defining => true,
                    });
                    *next_sweep = Some(now + SWEEP_EVERY);
                }
                let live = cache
                    .values()
                    .filter(|e| matches!(e, Entry::Defined { until, .. } if *until > now))
                    .count();
                if live >= self.max_clients {
                    return Resolution::Refused;
                }
                cache.insert(ip, Entry::Defining);
                Resolution::Defining { start: true }
            }
        }
    }

    /// Sources in the cache (defined, refused or being defined, expired or not yet swept).
    pub fn cached(&self) -> usize {
        self.cache().map.len()
    }

    /// A definition made by the process this one upgraded: kept for what it had left
    /// (at most a definition's lifetime), so the flows it carries are not defined again.
    pub fn adopt(&self, ip: IpAddr, client: Arc<Client>, left: Duration, now: Instant) {
        let until = now + left.min(self.lifetimes.defined);
        let mut cache = self.cache();
        if cache.map.len() < self.max_clients {
            cache.map.insert(ip, Entry::Defined { client, until });
        }
    }

    /// The definition of `ip` in the cache, if live (a look-up that starts nothing).
    pub fn defined(&self, ip: IpAddr, now: Instant) -> Option<Arc<Client>> {
        match self.cache().map.get(&ip) {
            Some(Entry::Defined { client, until }) if *until > now => Some(client.clone()),
            _ => None,
        }
    }

    /// The live definitions, for the process that takes this one's place.
    pub fn definitions(&self, now: Instant) -> Vec<(IpAddr, Arc<Client>, Duration)> {
        self.cache()
            .map
            .iter()
            .filter_map(|(&ip, e)| match e {
                Entry::Defined { client, until } if *until > now => {
                    Some((ip, client.clone(), *until - now))
                }
                _ => None,
            })
            .collect()
    }

    /// Records how the definition of `ip` ended; returns how long it is remembered.
    pub fn record(
        &self,
        ip: IpAddr,
        outcome: Result<&Arc<Client>, NotDefined>,
        now: Instant,
    ) -> Duration {
        let life = match outcome {
            Ok(_) => self.lifetimes.defined,
            Err(NotDefined::Refused) => self.lifetimes.refused,
            Err(NotDefined::Unanswered) => self.lifetimes.unanswered,
        };
        let until = now + life;
        let entry = match outcome {
            Ok(c) => Entry::Defined {
                client: c.clone(),
                until,
            },
            Err(_) => Entry::Refused { until },
        };
        self.cache().map.insert(ip, entry);
        life
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dynamic() -> Dynamic {
        Dynamic::new(
            vec!["203.0.113.0/24".parse().unwrap()],
            Lifetimes {
                defined: Duration::from_secs(3600),
                refused: Duration::from_secs(60),
                unanswered: Duration::from_secs(5),
            },
            10,
            Duration::from_secs(2),
            (8, 100),
        )
    }

    fn client() -> Arc<Client> {
        Arc::new(crate::client::tests::client("203.0.113.9/32", "s"))
    }

    #[test]
    fn a_directory_that_did_not_answer_is_asked_again_long_before_a_refusal_expires() {
        let (d, t0) = (dynamic(), Instant::now());
        let (down, no) = (
            "203.0.113.1".parse().unwrap(),
            "203.0.113.2".parse().unwrap(),
        );
        for ip in [down, no] {
            assert!(matches!(
                d.resolve(ip, t0),
                Resolution::Defining { start: true }
            ));
        }
        let life = d.record(down, Err(NotDefined::Unanswered), t0);
        assert_eq!(life, Duration::from_secs(5));
        assert_eq!(
            d.record(no, Err(NotDefined::Refused), t0),
            Duration::from_secs(60)
        );
        let later = t0 + Duration::from_secs(6);
        assert!(
            matches!(d.resolve(down, later), Resolution::Defining { start: true }),
            "asked again once its 5 s are over"
        );
        assert!(matches!(d.resolve(no, later), Resolution::Refused));
        let c = client();
        d.record(down, Ok(&c), later);
        assert!(matches!(d.resolve(down, later), Resolution::Client(_)));
    }

    #[test]
    fn an_adopted_definition_is_used_for_what_it_had_left() {
        let (d, t0) = (dynamic(), Instant::now());
        let ip = "203.0.113.9".parse().unwrap();
        d.adopt(ip, client(), Duration::from_secs(10), t0);
        assert!(matches!(d.resolve(ip, t0), Resolution::Client(_)));
        let listed = d.definitions(t0 + Duration::from_secs(4));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].2, Duration::from_secs(6));
        let later = t0 + Duration::from_secs(11);
        assert!(matches!(
            d.resolve(ip, later),
            Resolution::Defining { start: true }
        ));
        assert!(d.definitions(later).is_empty());
    }

    #[test]
    fn the_cache_stays_bounded_while_sources_come_and_go() {
        let (d, t0) = (dynamic(), Instant::now());
        let c = client();
        // A new source every 100 ms, each defined for 500 ms: 5 live at once, but the cache
        // kept every expired one until max_clients (1 000) were alive at the same time.
        let d = Dynamic {
            lifetimes: Lifetimes {
                defined: Duration::from_millis(500),
                ..d.lifetimes
            },
            max_clients: 1_000,
            ..d
        };
        for i in 0..200u32 {
            let now = t0 + Duration::from_millis(100 * u64::from(i));
            let ip = IpAddr::from([203, 0, 113, (i % 250) as u8]);
            if matches!(d.resolve(ip, now), Resolution::Defining { start: true }) {
                d.record(ip, Ok(&c), now);
            }
            // Those alive, and those that expired since the last sweep (a second ago).
            assert!(d.cached() <= 16, "{} cached after {i}", d.cached());
        }
    }
}
