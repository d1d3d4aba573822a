//! Packets of sources being defined (dynamic clients), sans-IO: the save, restore and
//! expire steps of one component. While a directory decides about a source, every packet of
//! each of its flows is kept in arrival order, bounded per flow and in all (the total is
//! shared by the workers); once the source is defined the driver takes them back, flow by
//! flow, and handles them as if they had just arrived; once it is refused, or after a
//! definition that never ended, they are handed back to be dropped and counted.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// What [`PendingSources::keep`] did with a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kept {
    /// Kept, after those already waiting for this flow.
    Kept,
    /// Not kept: this flow already has `per_flow` packets waiting.
    FlowFull,
    /// Not kept: `total` packets are waiting in all.
    AllFull,
}

/// The packets waiting for one flow `K` of a source being defined.
#[derive(Debug)]
pub struct Waiting<P> {
    pub source: IpAddr,
    /// In arrival order.
    pub packets: Vec<P>,
    since: Instant,
}

/// The flows of one worker waiting for their source's definition.
#[derive(Debug)]
pub struct PendingSources<K, P> {
    flows: HashMap<K, Waiting<P>>,
    per_flow: usize,
    total: usize,
}

impl<K: Copy + Eq + Hash, P> PendingSources<K, P> {
    /// At most `per_flow` packets per flow, and `total` in all (counted in the shared
    /// counter each call is given).
    pub fn new(per_flow: usize, total: usize) -> Self {
        Self {
            flows: HashMap::new(),
            per_flow: per_flow.max(1),
            total: total.max(1),
        }
    }

    /// Whether packets of flow `key` are waiting.
    pub fn contains(&self, key: &K) -> bool {
        self.flows.contains_key(key)
    }

    /// Saves `packet` of flow `key` (from `source`) at `now`, within the bounds; `waiting` is
    /// the count of packets waiting in all workers.
    pub fn keep(
        &mut self,
        key: K,
        source: IpAddr,
        packet: P,
        now: Instant,
        waiting: &AtomicUsize,
    ) -> Kept {
        if self
            .flows
            .get(&key)
            .is_some_and(|w| w.packets.len() >= self.per_flow)
        {
            return Kept::FlowFull;
        }
        let total = self.total;
        if waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < total).then_some(n + 1)
            })
            .is_err()
        {
            // Nothing is made for a packet not kept (spoofed sources are cheap).
            return Kept::AllFull;
        }
        self.flows
            .entry(key)
            .or_insert_with(|| Waiting {
                source,
                packets: Vec::new(),
                since: now,
            })
            .packets
            .push(packet);
        Kept::Kept
    }

    /// Restores the flows of `source` (defined or refused): each with its packets in
    /// arrival order. They no longer count as waiting.
    pub fn take_source(&mut self, source: IpAddr, waiting: &AtomicUsize) -> Vec<(K, Vec<P>)> {
        let keys: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, w)| w.source == source)
            .map(|(k, _)| *k)
            .collect();
        self.take(keys, waiting)
    }

    /// Expires the flows that have waited longer than `max_wait` (a definition that never
    /// ended): handed back, to be dropped and counted.
    pub fn expire(
        &mut self,
        now: Instant,
        max_wait: Duration,
        waiting: &AtomicUsize,
    ) -> Vec<(K, Vec<P>)> {
        let keys: Vec<K> = self
            .flows
            .iter()
            .filter(|(_, w)| now.saturating_duration_since(w.since) > max_wait)
            .map(|(k, _)| *k)
            .collect();
        self.take(keys, waiting)
    }

    /// Every flow waiting (its process hands them to the one that upgrades it).
    pub fn take_all(&mut self, waiting: &AtomicUsize) -> Vec<(K, Vec<P>)> {
        let keys: Vec<K> = self.flows.keys().copied().collect();
        self.take(keys, waiting)
    }

    fn take(&mut self, keys: Vec<K>, waiting: &AtomicUsize) -> Vec<(K, Vec<P>)> {
        keys.into_iter()
            .filter_map(|k| {
                let w = self.flows.remove(&k)?;
                waiting.fetch_sub(w.packets.len(), Ordering::AcqRel);
                Some((k, w.packets))
            })
            .collect()
    }

    /// Flows waiting.
    pub fn len(&self) -> usize {
        self.flows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn packets_come_back_in_arrival_order_per_flow_once_defined() {
        let (t0, waiting) = (Instant::now(), AtomicUsize::new(0));
        let mut p = PendingSources::new(256, 10_000);
        // Two flows of source A (two ports), interleaved, and one of B.
        for i in 0..100u32 {
            assert_eq!(p.keep(1u16, A, i, t0, &waiting), Kept::Kept);
            assert_eq!(p.keep(2u16, A, 1000 + i, t0, &waiting), Kept::Kept);
        }
        p.keep(3u16, B, 7, t0, &waiting);
        assert_eq!(waiting.load(Ordering::Relaxed), 201);
        let mut back = p.take_source(A, &waiting);
        back.sort_by_key(|(k, _)| *k);
        assert_eq!(back.len(), 2);
        assert_eq!(
            back[0].1,
            (0..100).collect::<Vec<u32>>(),
            "nothing lost, in order"
        );
        assert_eq!(back[1].1, (1000..1100).collect::<Vec<u32>>());
        assert_eq!(waiting.load(Ordering::Relaxed), 1, "B still waits");
        assert!(p.contains(&3) && !p.contains(&1));
        assert!(p.take_source(A, &waiting).is_empty(), "taken once");
    }

    #[test]
    fn bounds_per_flow_and_in_all_are_kept_and_said() {
        let (t0, waiting) = (Instant::now(), AtomicUsize::new(0));
        let mut p = PendingSources::new(3, 5);
        for i in 0..3 {
            assert_eq!(p.keep(1u8, A, i, t0, &waiting), Kept::Kept);
        }
        assert_eq!(p.keep(1u8, A, 3, t0, &waiting), Kept::FlowFull);
        assert_eq!(p.keep(2u8, A, 4, t0, &waiting), Kept::Kept);
        // Another worker holds one more: the shared total is reached.
        waiting.fetch_add(1, Ordering::Relaxed);
        assert_eq!(p.keep(3u8, B, 5, t0, &waiting), Kept::AllFull);
        assert!(!p.contains(&3), "a packet not kept makes no entry");
        assert_eq!(waiting.load(Ordering::Relaxed), 5);
        p.take_source(A, &waiting);
        assert_eq!(waiting.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_definition_that_never_ends_expires_on_a_virtual_clock() {
        let (t0, waiting) = (Instant::now(), AtomicUsize::new(0));
        let s = |n| t0 + Duration::from_secs(n);
        let mut p = PendingSources::new(8, 100);
        p.keep(1u8, A, "a", s(0), &waiting);
        p.keep(1u8, A, "b", s(2), &waiting);
        p.keep(2u8, B, "c", s(2), &waiting);
        assert!(p.expire(s(3), Duration::from_secs(3), &waiting).is_empty());
        let gone = p.expire(s(4), Duration::from_secs(3), &waiting);
        assert_eq!(
            gone,
            vec![(1u8, vec!["a", "b"])],
            "by when the flow began waiting"
        );
        assert_eq!(waiting.load(Ordering::Relaxed), 1);
        assert_eq!(p.len(), 1);
    }
}
