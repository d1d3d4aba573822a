//! What the engine counts, as events: the daemon turns them into Prometheus metrics
//! (`radius-userspace/src/metrics.rs`), tests into a tally. Closed enums and static
//! reasons, so counting never allocates on the packet path.

/// How a packet reached its flow.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Via {
    /// Read from the flow's child socket.
    Child,
    /// Read by a wildcard and injected (the flow's first packets, or the set-up window).
    Wildcard,
}

/// Why a packet or a new flow was not taken.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Refusal {
    /// `max_flows` (bounded by the open-file limit) reached.
    MaxFlows,
    /// The child socket could not be created.
    ChildSocket,
    /// The fast path could not register the child.
    Register,
    /// The source is in no client's prefix.
    UnknownClient,
    /// The directory refused the source (or failed); counted once per packet.
    DirectoryRefused,
    /// The packet queue of a source being defined was full.
    PendingFull,
    /// Kept for a definition that never ended.
    PendingExpired,
    /// Provisional flows are at their share of `max_flows` and this worker has none to
    /// evict.
    ProvisionalFull,
}

impl Refusal {
    /// The metric label (the variant's name, as the metrics have always shown it).
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxFlows => "MaxFlows",
            Refusal::ChildSocket => "ChildSocket",
            Refusal::Register => "Register",
            Refusal::UnknownClient => "UnknownClient",
            Refusal::DirectoryRefused => "DirectoryRefused",
            Refusal::PendingFull => "PendingFull",
            Refusal::PendingExpired => "PendingExpired",
            Refusal::ProvisionalFull => "ProvisionalFull",
        }
    }
}

/// One thing that happened, to be counted.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Count {
    /// A packet handed to its flow.
    Packet(Via),
    Refused(Refusal),
    /// A request or reply not relayed, by reason (`ProxyError::reason` and the engine's).
    Dropped(&'static str),
    /// A request the sidecar answered itself.
    LocalAnswer(&'static str),
    /// A request sent upstream again, by cause.
    UpstreamRetransmit(&'static str),
    /// A CoA or Disconnect request, by what became of it.
    Coa(&'static str),
    /// A copy of an Accounting-Request sent to a replica server, by what became of it
    /// (`answered`, `timeout`, `not_sent`): never shown to the NAS.
    Replica(&'static str),
    /// A flow made, proved (with its socket) or provisional.
    FlowCreated {
        proved: bool,
    },
    /// A proved flow taken over, with its socket, from the process this one upgraded
    /// (not made again: counted apart from `FlowCreated`).
    FlowAdopted,
    /// A provisional flow proved its source.
    FlowProved,
    /// A flow ended; `proved` as it was then.
    FlowEnded {
        proved: bool,
    },
    /// A provisional flow ended to make room, by what was full.
    FlowEvicted(&'static str),
    /// A request began upstream (the in-flight gauge goes up).
    RequestBegun,
    /// A request in flight ended: answered, given up or moved.
    RequestEnded,
    /// The requests this worker's dedup caches remember (in flight, or answered and kept
    /// for NAS retransmissions, RFC 5080) changed by this many since its last report (once
    /// a second).
    DedupEntries(i64),
}

/// The upper bounds (microseconds) of the buckets of answered requests' latency per
/// upstream: from 0.5 ms (a server beside the sidecar) to 5 s (past any NAS's patience).
pub const LATENCY_BOUNDS_US: [u64; 13] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000,
];

/// How long one upstream took to answer, as a histogram: one worker's since it was last
/// taken (kept in the engine and handed to the metrics once a second, so a request touches
/// no memory another core writes).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Answers per bucket of [`LATENCY_BOUNDS_US`] (not cumulative); the last is past them.
    pub buckets: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
    pub count: u64,
}

impl Latencies {
    pub fn observe(&mut self, us: u64) {
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.buckets[i] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Latencies) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(other.sum_us);
        self.count += other.count;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// Where the engine's counts go; shared by every worker.
pub trait Counters: Send + Sync {
    fn count(&self, c: Count);
    /// `auto` learnt that a peer signs its Access packets: from now on it must (BlastRADIUS).
    /// `peer` is "client" or "upstream".
    fn signs(&self, peer: &'static str, name: &str);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_lands_in_the_first_bucket_that_holds_it() {
        let mut l = Latencies::default();
        for us in [0, 500, 501, 4_999, 5_000_000, 5_000_001, u64::MAX / 2] {
            l.observe(us);
        }
        assert_eq!(l.buckets[0], 2, "0 and 500 us are at most 0.5 ms");
        assert_eq!(l.buckets[1], 1);
        assert_eq!(l.buckets[3], 1, "4 999 us is under 5 ms");
        assert_eq!(l.buckets[12], 1, "5 s is at most 5 s");
        assert_eq!(l.buckets[13], 2, "past the last bound");
        assert_eq!(l.count, 7);
        let mut m = Latencies::default();
        m.merge(&l);
        m.merge(&l);
        assert_eq!(m.count, 14);
        assert_eq!(m.buckets[13], 4);
    }
}
