//! RFC 5080 section 2.2 on the NAS side, sans-IO: one [`Dedup`] per flow, keyed by the
//! Identifier (the flow is the rest of the key), driven by `now`. A request is looked up
//! with [`Dedup::check`] before anything else, and recorded with [`Dedup::begin`] only once
//! it has been verified, so a forged packet cannot replace a NAS's request.
//!
//! - A request whose Identifier and Request Authenticator match one in flight is a
//!   retransmission: not forwarded again as a new request (the proxy may retransmit its own
//!   upstream copy, see [`Verdict::InFlight`]).
//! - After the reply, the same retransmission is answered from the cache for
//!   `cleanup_delay`, without asking the upstream again.
//! - A new authenticator with a known Identifier is a new request: it replaces the old one,
//!   whose late reply is then dropped ([`Dedup::on_reply`] says so).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

/// What to do with a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict<'a, T> {
    /// New: verify it, [`Dedup::begin`] it and forward it.
    New,
    /// A retransmission of a request in flight: do not forward it again. `resend` is true
    /// when the proxy should follow the NAS and retransmit its upstream copy (`tag` says
    /// which), at most once per `min_resend`.
    InFlight { resend: bool, tag: T },
    /// A retransmission of an answered request: send this cached reply again.
    Cached(&'a [u8]),
}

#[derive(Debug)]
enum State<T> {
    InFlight { last_sent: Instant, tag: T },
    Answered { reply: Vec<u8>, until: Instant },
}

#[derive(Debug)]
struct Entry<T> {
    auth: [u8; 16],
    state: State<T>,
}

/// A flow's recent requests; `T` tags a request in flight (where its upstream copy is).
#[derive(Debug)]
pub struct Dedup<T> {
    entries: HashMap<u8, Entry<T>>,
}

impl<T> Default for Dedup<T> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
        }
    }
}

/// The timers of [`Dedup`].
#[derive(Clone, Copy, Debug)]
pub struct DedupTimers {
    /// How long a reply is kept to answer retransmissions (FreeRADIUS: `cleanup_delay`, 5 s).
    pub cleanup_delay: Duration,
    /// The least time between two upstream retransmissions caused by the NAS.
    pub min_resend: Duration,
}

impl Default for DedupTimers {
    fn default() -> Self {
        Self {
            cleanup_delay: Duration::from_secs(5),
            min_resend: Duration::from_secs(1),
        }
    }
}

impl<T: Copy> Dedup<T> {
    /// Classifies the request `(id, auth)`; records nothing.
    pub fn check(
        &mut self,
        id: u8,
        auth: &[u8; 16],
        now: Instant,
        t: &DedupTimers,
    ) -> Verdict<'_, T> {
        let Some(e) = self.entries.get_mut(&id).filter(|e| &e.auth == auth) else {
            return Verdict::New;
        };
        match &mut e.state {
            State::InFlight { last_sent, tag } => {
                let resend = now.duration_since(*last_sent) >= t.min_resend;
                if resend {
                    *last_sent = now;
                }
                Verdict::InFlight { resend, tag: *tag }
            }
            // Expired: a retransmission this late goes to the upstream again.
            State::Answered { until, .. } if *until <= now => Verdict::New,
            State::Answered { reply, .. } => Verdict::Cached(reply),
        }
    }

    /// Records a verified new request, replacing whatever had its Identifier.
    pub fn begin(&mut self, id: u8, auth: &[u8; 16], now: Instant, tag: T) {
        self.entries.insert(
            id,
            Entry {
                auth: *auth,
                state: State::InFlight {
                    last_sent: now,
                    tag,
                },
            },
        );
    }

    /// The reply to `(id, auth)` is ready: keep it for retransmissions. Returns false when
    /// that request is no longer the current one (replaced by a new authenticator, or
    /// given up): the reply must not be sent.
    pub fn on_reply(
        &mut self,
        id: u8,
        auth: &[u8; 16],
        reply: &[u8],
        now: Instant,
        t: &DedupTimers,
    ) -> bool {
        match self.entries.get_mut(&id) {
            Some(e) if &e.auth == auth && matches!(e.state, State::InFlight { .. }) => {
                e.state = State::Answered {
                    reply: reply.to_vec(),
                    until: now + t.cleanup_delay,
                };
                true
            }
            _ => false,
        }
    }

    /// A new request answered here at once (its accounting spooled): its reply is kept
    /// for retransmissions, as an upstream's would be.
    pub fn answered_here(
        &mut self,
        id: u8,
        auth: &[u8; 16],
        reply: &[u8],
        now: Instant,
        t: &DedupTimers,
    ) {
        self.entries.insert(
            id,
            Entry {
                auth: *auth,
                state: State::Answered {
                    reply: reply.to_vec(),
                    until: now + t.cleanup_delay,
                },
            },
        );
    }

    /// The request `(id, auth)` whose upstream copy is `tag` was given up (no answer, a
    /// send that failed): forget it, so a retransmission is forwarded anew. A newer request
    /// with the Identifier, or the same one sent elsewhere since, is left alone.
    pub fn on_give_up(&mut self, id: u8, auth: &[u8; 16], tag: T)
    where
        T: PartialEq,
    {
        if self.entries.get(&id).is_some_and(|e| {
            &e.auth == auth && matches!(&e.state, State::InFlight { tag: t, .. } if *t == tag)
        }) {
            self.entries.remove(&id);
        }
    }

    /// Drops cached replies past their time.
    pub fn expire(&mut self, now: Instant) {
        self.entries
            .retain(|_, e| !matches!(e.state, State::Answered { until, .. } if until <= now));
    }

    /// Requests in flight or answered and cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 16] = [1; 16];
    const B: [u8; 16] = [2; 16];

    fn fresh() -> (Dedup<u32>, DedupTimers, Instant) {
        (Dedup::default(), DedupTimers::default(), Instant::now())
    }

    #[test]
    fn a_retransmission_in_flight_is_not_forwarded_and_follows_at_most_once_a_second() {
        let (mut d, t, t0) = fresh();
        assert_eq!(d.check(7, &A, t0, &t), Verdict::New);
        d.begin(7, &A, t0, 42);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(
            d.check(7, &A, ms(300), &t),
            Verdict::InFlight {
                resend: false,
                tag: 42
            }
        );
        assert_eq!(
            d.check(7, &A, ms(1100), &t),
            Verdict::InFlight {
                resend: true,
                tag: 42
            }
        );
        assert_eq!(
            d.check(7, &A, ms(1500), &t),
            Verdict::InFlight {
                resend: false,
                tag: 42
            }
        );
    }

    #[test]
    fn after_the_reply_a_retransmission_is_answered_from_the_cache_until_cleanup_delay() {
        let (mut d, t, t0) = fresh();
        d.begin(7, &A, t0, 0);
        assert!(d.on_reply(7, &A, b"reply", t0 + Duration::from_millis(10), &t));
        assert_eq!(
            d.check(7, &A, t0 + Duration::from_secs(2), &t),
            Verdict::Cached(b"reply")
        );
        // Past cleanup_delay the cache is gone: forwarded as new.
        assert_eq!(
            d.check(7, &A, t0 + Duration::from_secs(6), &t),
            Verdict::New
        );
        d.expire(t0 + Duration::from_secs(60));
        assert!(d.is_empty());
    }

    #[test]
    fn a_new_authenticator_replaces_the_old_request_and_its_late_reply_is_dropped() {
        let (mut d, t, t0) = fresh();
        d.begin(7, &A, t0, 1);
        assert_eq!(d.check(7, &B, t0, &t), Verdict::New);
        d.begin(7, &B, t0, 2);
        assert!(
            !d.on_reply(7, &A, b"old", t0, &t),
            "the replaced request's reply"
        );
        assert!(d.on_reply(7, &B, b"new", t0, &t));
        assert!(
            !d.on_reply(7, &B, b"again", t0, &t),
            "one reply per request"
        );
    }

    #[test]
    fn giving_up_lets_the_next_retransmission_through_and_expiry_frees_memory() {
        let (mut d, t, t0) = fresh();
        d.begin(1, &A, t0, 0);
        d.on_give_up(1, &A, 9);
        assert!(
            matches!(d.check(1, &A, t0, &t), Verdict::InFlight { tag: 0, .. }),
            "giving up another copy leaves this one in flight"
        );
        d.on_give_up(1, &A, 0);
        assert_eq!(d.check(1, &A, t0, &t), Verdict::New);
        d.begin(1, &A, t0, 0);
        d.on_reply(1, &A, b"r", t0, &t);
        d.begin(2, &B, t0, 0);
        d.on_reply(2, &B, b"r", t0, &t);
        d.expire(t0 + Duration::from_secs(5));
        assert!(d.is_empty());
    }
}
