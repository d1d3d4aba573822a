//! Upstream pools (FreeRADIUS's home server pools), sans-IO: which server a request goes
//! to, and each server's health, driven by `now` (milliseconds on a monotonic clock).
//!
//! Health follows FreeRADIUS's home servers: a server that lets a request go unanswered for
//! a retry interval and has answered nothing for half of one turns *zombie*; new
//! requests then go elsewhere and its requests in flight fail over. Zombie and dead servers
//! are probed with Status-Server (RFC 5997): an answer brings a zombie back, a dead one
//! needs `answers_to_alive` answers in a row; a zombie that answers no probe for
//! `zombie_period` is *dead*. Servers are shared by every worker, so the state is atomic.

use std::sync::{
    Arc,
    atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed},
};

use crate::proxy::Upstream;

/// Milliseconds since the first call in this process: the clock [`Health`] is driven by.
pub fn millis(t: std::time::Instant) -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| t - std::time::Duration::from_secs(1));
    t.saturating_duration_since(start).as_millis() as u64
}

/// How a pool spreads requests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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
}

impl Pool {
    /// A pool of one upstream, named after it.
    pub fn single(u: Arc<Upstream>) -> Self {
        Self {
            name: u.name.clone(),
            members: vec![u],
            policy: Policy::FailOver,
        }
    }

    /// The server for a request of the flow with hash `flow_hash`, other than `avoid`:
    /// alive ones first, zombies if none is alive, dead ones as a last resort.
    pub fn pick(&self, flow_hash: u64, avoid: Option<&str>) -> Option<&Arc<Upstream>> {
        for wanted in [State::Alive, State::Zombie, State::Dead] {
            let usable: Vec<&Arc<Upstream>> = self
                .members
                .iter()
                .filter(|u| u.health.state() == wanted && Some(u.name.as_str()) != avoid)
                .collect();
            if usable.is_empty() {
                continue;
            }
            return Some(match self.policy {
                Policy::FailOver => usable[0],
                Policy::LoadBalance => usable[(flow_hash % usable.len() as u64) as usize],
            });
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
    map: std::sync::Mutex<std::collections::HashMap<Vec<u8>, (String, u64)>>,
}

/// How long a conversation's State is remembered.
const STATE_LIFETIME_MS: u64 = 60_000;
/// Past this many entries, expired ones are swept on insert.
const STATE_SWEEP_AT: usize = 10_000;

impl EapStates {
    pub fn remember(&self, state: &[u8], upstream: &str, now_ms: u64) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= STATE_SWEEP_AT {
            m.retain(|_, (_, t)| now_ms.saturating_sub(*t) < STATE_LIFETIME_MS);
        }
        m.insert(state.to_vec(), (upstream.to_owned(), now_ms));
    }

    /// The server that sent this State, if it is recent.
    pub fn server_of(&self, state: &[u8], now_ms: u64) -> Option<String> {
        let m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.get(state)
            .filter(|(_, t)| now_ms.saturating_sub(*t) < STATE_LIFETIME_MS)
            .map(|(u, _)| u.clone())
    }
}

impl Pool {
    /// Whether requests of one conversation may land on different servers (and so need
    /// [`EapStates`]).
    pub fn spreads(&self) -> bool {
        self.policy == Policy::LoadBalance && self.members.len() > 1
    }

    /// The member named `name`, unless it is dead.
    pub fn usable(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.members
            .iter()
            .find(|u| u.name == name && u.health.state() != State::Dead)
    }
}

/// A server's health.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Alive = 0,
    Zombie = 1,
    Dead = 2,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => State::Alive,
            1 => State::Zombie,
            _ => State::Dead,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            State::Alive => "alive",
            State::Zombie => "zombie",
            State::Dead => "dead",
        }
    }
}

/// The health settings of a server.
#[derive(Clone, Copy, Debug)]
pub struct HealthPolicy {
    /// Milliseconds a zombie may go without answering a probe before it is dead.
    pub zombie_period_ms: u64,
    /// Probe answers in a row that bring a dead server back.
    pub answers_to_alive: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            zombie_period_ms: 10_000,
            answers_to_alive: 3,
        }
    }
}

/// A server's health, shared by the workers and the prober.
#[derive(Debug, Default)]
pub struct Health {
    state: AtomicU8,
    /// When (ms) it last answered anything; when it turned zombie.
    last_answer_ms: AtomicU64,
    zombie_since_ms: AtomicU64,
    answers_in_a_row: AtomicU32,
    /// State changes, for the metrics.
    pub changes: AtomicU64,
}

impl Health {
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Relaxed))
    }

    fn set(&self, s: State) {
        if self.state.swap(s as u8, Relaxed) != s as u8 {
            self.changes.fetch_add(1, Relaxed);
        }
    }

    /// A valid reply to a request.
    pub fn on_answer(&self, now_ms: u64) {
        self.last_answer_ms.fetch_max(now_ms, Relaxed);
        if self.state() == State::Zombie {
            self.set(State::Alive);
        }
    }

    /// A request is still unanswered at a retry: when the server has answered nothing at
    /// all for `window_ms` (half a retry interval), it turns zombie. (Not "nothing since the
    /// request was sent": the requests caught in flight when a server dies were all sent
    /// before its last answers, and a closed-loop NAS sends no new ones.) Returns whether
    /// it is still alive.
    pub fn on_unanswered(&self, now_ms: u64, window_ms: u64) -> bool {
        if self.state() == State::Alive
            && self.last_answer_ms.load(Relaxed) < now_ms.saturating_sub(window_ms)
        {
            self.zombie_since_ms.store(now_ms, Relaxed);
            self.answers_in_a_row.store(0, Relaxed);
            self.set(State::Zombie);
        }
        self.state() == State::Alive
    }

    /// The outcome of a Status-Server probe.
    pub fn on_probe(&self, answered: bool, now_ms: u64, p: &HealthPolicy) {
        match (self.state(), answered) {
            (State::Alive, true) => {}
            (State::Alive, false) => {}
            (State::Zombie, true) => {
                self.last_answer_ms.fetch_max(now_ms, Relaxed);
                self.set(State::Alive);
            }
            (State::Zombie, false) => {
                if now_ms.saturating_sub(self.zombie_since_ms.load(Relaxed)) >= p.zombie_period_ms {
                    self.answers_in_a_row.store(0, Relaxed);
                    self.set(State::Dead);
                }
            }
            (State::Dead, true) => {
                if self.answers_in_a_row.fetch_add(1, Relaxed) + 1 >= p.answers_to_alive {
                    self.last_answer_ms.fetch_max(now_ms, Relaxed);
                    self.set(State::Alive);
                }
            }
            (State::Dead, false) => self.answers_in_a_row.store(0, Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{codec::auth::Secret, proxy::UpstreamOptions};

    fn up(name: &str) -> Arc<Upstream> {
        Arc::new(Upstream {
            name: name.into(),
            auth: "127.0.0.1:1".parse().unwrap(),
            acct: None,
            secret: Secret::new(b"s"),
            timeout: std::time::Duration::from_secs(5),
            options: UpstreamOptions::default(),
            health: Health::default(),
        })
    }

    #[test]
    fn a_silent_server_turns_zombie_then_dead_and_comes_back_through_probes() {
        let (h, p) = (Health::default(), HealthPolicy::default());
        h.on_answer(900);
        assert!(h.on_unanswered(1000, 150), "it answered within the window");
        assert!(!h.on_unanswered(1100, 150), "nothing for 200 ms: zombie");
        assert_eq!(h.state(), State::Zombie);
        h.on_probe(false, 5_000, &p);
        assert_eq!(h.state(), State::Zombie, "within zombie_period");
        h.on_probe(false, 11_200, &p);
        assert_eq!(h.state(), State::Dead);
        h.on_probe(true, 12_000, &p);
        h.on_probe(true, 13_000, &p);
        assert_eq!(h.state(), State::Dead, "two answers are not enough");
        h.on_probe(true, 14_000, &p);
        assert_eq!(h.state(), State::Alive);
        assert_eq!(h.changes.load(Relaxed), 3);
    }

    #[test]
    fn an_eap_state_points_back_at_its_server_for_a_minute() {
        let s = EapStates::default();
        s.remember(b"st-1", "a", 1_000);
        assert_eq!(s.server_of(b"st-1", 30_000).as_deref(), Some("a"));
        assert_eq!(s.server_of(b"st-1", 62_000), None);
        assert_eq!(s.server_of(b"other", 1_000), None);
    }

    #[test]
    fn a_zombie_is_alive_again_on_any_answer() {
        let h = Health::default();
        h.on_unanswered(1000, 150);
        assert_eq!(h.state(), State::Zombie);
        h.on_answer(30);
        assert_eq!(h.state(), State::Alive);
    }

    #[test]
    fn pools_prefer_alive_servers_and_keep_a_flow_on_one() {
        let (a, b) = (up("a"), up("b"));
        let fo = Pool {
            name: "p".into(),
            members: vec![a.clone(), b.clone()],
            policy: Policy::FailOver,
        };
        assert_eq!(fo.pick(7, None).unwrap().name, "a");
        assert_eq!(fo.pick(7, Some("a")).unwrap().name, "b");
        a.health.on_unanswered(1000, 150);
        assert_eq!(fo.pick(7, None).unwrap().name, "b", "a is a zombie");
        b.health.on_unanswered(1000, 150);
        assert_eq!(
            fo.pick(7, None).unwrap().name,
            "a",
            "both zombies: in order"
        );
        a.health.on_answer(3);
        b.health.on_answer(3);
        let lb = Pool {
            name: "q".into(),
            members: vec![a, b],
            policy: Policy::LoadBalance,
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
