//! Upstreams: the AAA servers the sidecar forwards to, their retransmission and reply
//! policy, and each one's health, sans-IO and driven by the `now` its callers pass (the
//! engine's clock, and the prober's).
//!
//! Health follows FreeRADIUS's home servers: a server that lets a request go unanswered for
//! a retry interval and has answered nothing for half of one turns *zombie*; new
//! requests then go elsewhere and its requests in flight fail over. Zombie and dead servers
//! are probed with Status-Server (RFC 5997): an answer brings a zombie back, a dead one
//! needs `answers_to_alive` answers in a row; a zombie that answers no probe for
//! `zombie_period` is *dead*. Servers are shared by every worker, so the state is atomic.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed},
    time::{Duration, Instant},
};

use crate::{blastradius::YesNoAuto, codec::auth::Secret};

/// An AAA server the sidecar forwards to.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub auth: SocketAddr,
    pub acct: Option<SocketAddr>,
    pub secret: Secret,
    /// A request without an answer after this long is given up.
    pub timeout: Duration,
    pub options: UpstreamOptions,
    /// Alive, zombie or dead (see [`crate::pool`]); shared by every worker.
    pub health: Health,
    /// Reached over a stream (RADIUS/TCP or RADIUS/TLS): a request is never sent twice on
    /// a live connection (RFC 6613 section 2.6.1), and the requests of a connection that
    /// closed are sent anew, with new Identifiers, on the next.
    pub stream: bool,
}

/// Retransmission and reply policy of an upstream.
#[derive(Debug)]
pub struct UpstreamOptions {
    /// Resend a request that got no answer after this long (with up to 25 % jitter).
    pub retry: Duration,
    /// Resends per request on our own timer (NAS retransmissions also cause one each, at
    /// most one a second).
    pub max_retries: u32,
    /// A server with a request out for this long that has answered nothing for half of it
    /// turns zombie, and its requests in flight move to another server of their pool at
    /// once (FreeRADIUS's `response_window`).
    pub response_window: Duration,
    pub require_message_authenticator: YesNoAuto,
    /// This upstream has sent an Access reply without EAP-Message that carried a valid
    /// Message-Authenticator (what `Auto` learns).
    pub seen_message_authenticator: std::sync::atomic::AtomicBool,
    /// How often a zombie or dead server is probed with Status-Server.
    pub check_interval: Duration,
    pub health: HealthPolicy,
    /// Rewrites of its replies (inbound) and of the requests it gets (outbound).
    pub rewrite: crate::rewrite::Rewrites,
}

impl UpstreamOptions {
    /// Whether Access replies must carry a Message-Authenticator now (configured, or learnt
    /// by `auto`).
    pub fn requires_message_authenticator(&self) -> bool {
        match self.require_message_authenticator {
            YesNoAuto::Yes => true,
            YesNoAuto::No => false,
            YesNoAuto::Auto => self
                .seen_message_authenticator
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

impl Default for UpstreamOptions {
    fn default() -> Self {
        Self {
            retry: Duration::from_secs(2),
            max_retries: 2,
            response_window: Duration::from_secs(1),
            require_message_authenticator: YesNoAuto::Auto,
            seen_message_authenticator: false.into(),
            check_interval: Duration::from_secs(1),
            health: HealthPolicy::default(),
            rewrite: Default::default(),
        }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

/// A server's health, shared by the workers and the prober (hence atomics, in milliseconds
/// since `epoch`; an instant before the epoch counts as the epoch).
#[derive(Debug)]
pub struct Health {
    epoch: Instant,
    state: AtomicU8,
    /// When (ms) it last answered anything (0: never); when it turned zombie.
    last_answer_ms: AtomicU64,
    zombie_since_ms: AtomicU64,
    answers_in_a_row: AtomicU32,
    /// State changes, for the metrics.
    pub changes: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Health {
    /// A server alive and never heard from; `epoch` is the zero of its clock.
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            state: AtomicU8::new(State::Alive as u8),
            last_answer_ms: AtomicU64::new(0),
            zombie_since_ms: AtomicU64::new(0),
            answers_in_a_row: AtomicU32::new(0),
            changes: AtomicU64::new(0),
        }
    }

    /// Milliseconds since the epoch, from 1 (0 means "never").
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Relaxed))
    }

    fn set(&self, s: State) {
        if self.state.swap(s as u8, Relaxed) != s as u8 {
            self.changes.fetch_add(1, Relaxed);
        }
    }

    /// A valid reply to a request.
    pub fn on_answer(&self, now: Instant) {
        let now_ms = self.ms(now);
        self.last_answer_ms.fetch_max(now_ms, Relaxed);
        if self.state() == State::Zombie {
            self.set(State::Alive);
        }
    }

    /// A request is still unanswered at a retry: when the server has answered nothing at
    /// all for `window` (half a retry interval), it turns zombie. (Not "nothing since the
    /// request was sent": the requests caught in flight when a server dies were all sent
    /// before its last answers, and a closed-loop NAS sends no new ones.) Returns whether
    /// it is still alive.
    pub fn on_unanswered(&self, now: Instant, window: Duration) -> bool {
        let (now_ms, window_ms) = (self.ms(now), window.as_millis() as u64);
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
    pub fn on_probe(&self, answered: bool, now: Instant, p: &HealthPolicy) {
        let now_ms = self.ms(now);
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

    fn at(h: &Health, ms: u64) -> Instant {
        h.epoch + Duration::from_millis(ms)
    }

    #[test]
    fn a_silent_server_turns_zombie_then_dead_and_comes_back_through_probes() {
        let (h, p) = (Health::default(), HealthPolicy::default());
        h.on_answer(at(&h, 900));
        assert!(
            h.on_unanswered(at(&h, 1000), Duration::from_millis(150)),
            "it answered within the window"
        );
        assert!(
            !h.on_unanswered(at(&h, 1100), Duration::from_millis(150)),
            "nothing for 200 ms: zombie"
        );
        assert_eq!(h.state(), State::Zombie);
        h.on_probe(false, at(&h, 5_000), &p);
        assert_eq!(h.state(), State::Zombie, "within zombie_period");
        h.on_probe(false, at(&h, 11_200), &p);
        assert_eq!(h.state(), State::Dead);
        h.on_probe(true, at(&h, 12_000), &p);
        h.on_probe(true, at(&h, 13_000), &p);
        assert_eq!(h.state(), State::Dead, "two answers are not enough");
        h.on_probe(true, at(&h, 14_000), &p);
        assert_eq!(h.state(), State::Alive);
        assert_eq!(h.changes.load(Relaxed), 3);
    }

    #[test]
    fn a_zombie_is_alive_again_on_any_answer() {
        let h = Health::default();
        h.on_unanswered(at(&h, 1000), Duration::from_millis(150));
        assert_eq!(h.state(), State::Zombie);
        h.on_answer(at(&h, 30));
        assert_eq!(h.state(), State::Alive);
    }
}
