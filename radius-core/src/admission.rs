//! Which flows have not proved themselves yet, and which of them makes room, sans-IO.
//!
//! A flow is *provisional* until one of its requests carries a signature made with its
//! client's secret (see [`crate::client::Proof`]). Spoofed UDP is cheap, so provisional
//! flows are what an attacker inside an allowed prefix can make: they get a bounded share of
//! the flow table and a short idle lifetime, and when room is needed the one seen least
//! recently goes first. A proved flow is never chosen. The worker owns one
//! [`Provisional`] for its flows; the bound itself is shared by the workers.

use std::{
    collections::{BTreeSet, HashMap},
    hash::Hash,
    time::Instant,
};

/// The provisional flows of one worker, by when each was last seen.
#[derive(Debug)]
pub struct Provisional<K> {
    by_age: BTreeSet<(Instant, K)>,
    seen: HashMap<K, Instant>,
}

impl<K> Default for Provisional<K> {
    fn default() -> Self {
        Self {
            by_age: BTreeSet::new(),
            seen: HashMap::new(),
        }
    }
}

impl<K: Copy + Ord + Hash> Provisional<K> {
    /// A new provisional flow, seen at `now`.
    pub fn insert(&mut self, k: K, now: Instant) {
        self.remove(k);
        self.by_age.insert((now, k));
        self.seen.insert(k, now);
    }

    /// A packet of `k` at `now`; false when `k` is not provisional.
    pub fn touch(&mut self, k: K, now: Instant) -> bool {
        let Some(at) = self.seen.get_mut(&k) else {
            return false;
        };
        if *at < now {
            self.by_age.remove(&(*at, k));
            *at = now;
            self.by_age.insert((now, k));
        }
        true
    }

    /// `k` proved itself or ended; false when it was not provisional.
    pub fn remove(&mut self, k: K) -> bool {
        match self.seen.remove(&k) {
            Some(at) => {
                self.by_age.remove(&(at, k));
                true
            }
            None => false,
        }
    }

    /// The flow to evict first: the one seen least recently.
    pub fn oldest(&self) -> Option<K> {
        self.by_age.first().map(|&(_, k)| k)
    }

    pub fn contains(&self, k: K) -> bool {
        self.seen.contains_key(&k)
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_flow_seen_least_recently_goes_first_and_proved_flows_leave_the_set() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut p = Provisional::default();
        p.insert(1u32, ms(0));
        p.insert(2, ms(10));
        p.insert(3, ms(20));
        assert_eq!(p.oldest(), Some(1));
        // A real (unsigned) NAS keeps sending: it is no longer the oldest.
        assert!(p.touch(1, ms(30)));
        assert_eq!(p.oldest(), Some(2));
        // Flow 2 proves itself: it can no longer be chosen.
        assert!(p.remove(2));
        assert!(!p.touch(2, ms(40)));
        assert_eq!(p.oldest(), Some(3));
        assert_eq!(p.len(), 2);
        assert!(!p.remove(2));
    }

    #[test]
    fn a_flood_of_new_flows_churns_through_a_bounded_set() {
        // What the worker does with each new provisional flow when the share is full:
        // evict the oldest, admit the new one. The set never grows past the bound, and a
        // flow that keeps sending stays.
        let t0 = Instant::now();
        let cap = 100;
        let mut p = Provisional::default();
        let steady = u32::MAX;
        p.insert(steady, t0);
        for i in 0..10_000u32 {
            let now = t0 + Duration::from_micros(u64::from(i) * 50);
            if i % 50 == 0 {
                p.touch(steady, now);
            }
            if p.len() >= cap {
                let victim = p.oldest().unwrap();
                p.remove(victim);
            }
            p.insert(i, now);
            assert!(p.len() <= cap);
        }
        assert!(
            p.contains(steady),
            "a NAS that keeps sending is not evicted"
        );
    }
}
