//! Upstream pools (FreeRADIUS's home server pools), sans-IO: which server of a pool a
//! request goes to, by policy and by each server's health (see [`crate::upstream`]), and
//! which server an EAP conversation is on.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use crate::upstream::{State, Upstream};

/// How a pool spreads requests (written `"fail-over"` or `"load-balance"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// The first usable server in the listed order.
    #[default]
    FailOver,
    /// Spread by flow (a flow, and an EAP conversation, stays on one server while it lives).
    LoadBalance,
}

/// A named group of upstreams a client sends to.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub members: Vec<Arc<Upstream>>,
    pub policy: Policy,
    /// Accounting-Requests that no member answers go to the spool (see
    /// [`crate::spool`]), and their NASes are answered.
    pub spool: bool,
}

impl Pool {
    /// A pool of one upstream, named after it.
    pub fn single(u: Arc<Upstream>) -> Self {
        Self {
            name: u.name.clone(),
            members: vec![u],
            policy: Policy::FailOver,
            spool: false,
        }
    }

    /// The server for a request of the flow with hash `flow_hash`, other than `avoid`:
    /// alive ones first, zombies if none is alive, dead ones as a last resort.
    /// Runs for every request: it allocates nothing.
    pub fn pick(&self, flow_hash: u64, avoid: Option<&str>) -> Option<&Arc<Upstream>> {
        for wanted in [State::Alive, State::Zombie, State::Dead] {
            let usable =
                |u: &&Arc<Upstream>| u.health.state() == wanted && Some(u.name.as_str()) != avoid;
            let picked = match self.policy {
                Policy::FailOver => self.members.iter().find(usable),
                Policy::LoadBalance => {
                    let n = self.members.iter().filter(usable).count() as u64;
                    // A state that changed between the two passes: the next pass decides.
                    (n > 0)
                        .then(|| {
                            self.members
                                .iter()
                                .filter(usable)
                                .nth((flow_hash % n) as usize)
                        })
                        .flatten()
                }
            };
            if picked.is_some() {
                return picked;
            }
        }
        None
    }
}

/// EAP conversations in load-balancing pools: the State an Access-Challenge carried, and
/// the server that sent it, so that the next request of the conversation goes back to it
/// even when it comes from another flow (a NAS that changes source port). Taken once per
/// Access-Challenge and once per request that carries a State, never per other packet.
#[derive(Debug, Default)]
pub struct EapStates {
    map: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (String, Instant)>>,
}

/// How long a conversation's State is remembered.
const STATE_LIFETIME: Duration = Duration::from_secs(60);
/// Past this many entries, expired ones are swept on insert.
const STATE_SWEEP_AT: usize = 10_000;

impl EapStates {
    pub fn remember(&self, state: &[u8], upstream: &str, now: Instant) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= STATE_SWEEP_AT {
            m.retain(|_, (_, t)| now.saturating_duration_since(*t) < STATE_LIFETIME);
        }
        m.insert(state.to_vec(), (upstream.to_owned(), now));
    }

    /// The server that sent this State, if it is recent.
    pub fn server_of(&self, state: &[u8], now: Instant) -> Option<String> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(state)
            .filter(|(_, t)| now.saturating_duration_since(*t) < STATE_LIFETIME)
            .map(|(u, _)| u.clone())
    }
}

impl Pool {
    /// Whether requests of one conversation may land on different servers (and so need
    /// [`EapStates`]).
    pub fn spreads(&self) -> bool {
        self.policy == Policy::LoadBalance && self.members.len() > 1
    }

    /// Whether no member is alive (all zombie or dead): a spooled pool's accounting then
    /// goes straight to the spool.
    pub fn none_alive(&self) -> bool {
        self.members
            .iter()
            .all(|u| u.health.state() != State::Alive)
    }

    /// The member named `name`, unless it is dead.
    pub fn usable(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.members
            .iter()
            .find(|u| u.name == name && u.health.state() != State::Dead)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        codec::auth::Secret,
        upstream::{Health, UpstreamOptions},
    };

    fn up(name: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: name.into(),
            auth: "127.0.0.1:1".parse().unwrap(),
            acct: None,
            secret: Secret::new(b"s"),
            timeout: std::time::Duration::from_secs(5),
            options: UpstreamOptions::default(),
            health: Health::default(),
            stream: false,
        })
    }

    #[test]
    fn an_eap_state_points_back_at_its_server_for_a_minute() {
        let s = EapStates::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        s.remember(b"st-1", "a", at(1));
        assert_eq!(s.server_of(b"st-1", at(30)).as_deref(), Some("a"));
        assert_eq!(s.server_of(b"st-1", at(62)), None);
        assert_eq!(s.server_of(b"other", at(1)), None);
    }

    #[test]
    fn pools_prefer_alive_servers_and_keep_a_flow_on_one() {
        let (a, b) = (up("a"), up("b"));
        let fo = Pool {
            name: "p".into(),
            members: vec![a.clone(), b.clone()],
            policy: Policy::FailOver,
            spool: false,
        };
        assert_eq!(fo.pick(7, None).unwrap().name, "a");
        assert_eq!(fo.pick(7, Some("a")).unwrap().name, "b");
        let later = Instant::now() + Duration::from_secs(1);
        a.health.on_unanswered(later, Duration::from_millis(150));
        assert_eq!(fo.pick(7, None).unwrap().name, "b", "a is a zombie");
        b.health.on_unanswered(later, Duration::from_millis(150));
        assert_eq!(
            fo.pick(7, None).unwrap().name,
            "a",
            "both zombies: in order"
        );
        a.health.on_answer(later);
        b.health.on_answer(later);
        let lb = Pool {
            name: "q".into(),
            members: vec![a, b],
            policy: Policy::LoadBalance,
            spool: false,
        };
        let first = lb.pick(12345, None).unwrap().name.clone();
        for _ in 0..10 {
            assert_eq!(lb.pick(12345, None).unwrap().name, first, "sticky per flow");
        }
        assert_ne!(
            lb.pick(0, None).unwrap().name,
            lb.pick(1, None).unwrap().name
        );
    }
}
