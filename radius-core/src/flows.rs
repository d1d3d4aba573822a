//! A worker's flow table, sans-IO: one entry per NAS flow (the full 5-tuple, so NASes behind
//! one NAT address stay apart), its client, its dedup state and its CoA requests out, by a
//! slot the driver also uses for the flow's child socket. A slot is reused after its flow
//! ends; the generation tells a request's old flow from the slot's new one.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use radius_common::{Addr, FlowKey, PROTO_UDP};

use crate::{client::Client, coa::CoaJob, dedup::Dedup, requests::At};

/// 16-byte form of an address: IPv4 as `::ffff:a.b.c.d` (the fast path's map keys).
pub fn addr(ip: IpAddr) -> Addr {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let o = v6.octets();
    std::array::from_fn(|i| {
        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
    })
}

/// The 5-tuple of a UDP flow from the server's side.
pub fn flow_key(remote: SocketAddr, local: SocketAddr) -> FlowKey {
    FlowKey {
        remote: addr(remote.ip()),
        local: addr(local.ip()),
        remote_port: remote.port(),
        local_port: local.port(),
        proto: PROTO_UDP,
        _pad: [0; 3],
    }
}

/// A CoA or Disconnect request out to a NAS, waiting for its ACK or NAK.
#[derive(Debug)]
pub struct PendingCoa {
    pub job: CoaJob,
    pub sent_auth: [u8; 16],
    pub sent_at: Instant,
}

/// One flow.
#[derive(Debug)]
pub struct Flow {
    pub key: FlowKey,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The driver holds a child socket for it (proved flows; provisional ones have none
    /// and are served from the wildcard).
    pub has_child: bool,
    /// The flow's client, known before the flow is made (for NAT, from its first proven
    /// request; the flow keeps it).
    pub client: Arc<Client>,
    /// Its place in load-balancing pools: the same for every request of the flow.
    pub hash: u64,
    pub generation: u32,
    /// One of its requests carried a signature made with its client's secret.
    pub proved: bool,
    pub last_seen: Instant,
    pub in_flight: u32,
    /// RFC 5080: requests in flight and recent replies, by Identifier.
    pub dedup: Dedup<At>,
    /// Its NAS's names are in the NAS directory (for CoA).
    pub named: bool,
    /// CoA/Disconnect requests sent to the NAS, by the Identifier we gave them.
    pub coa: HashMap<u8, PendingCoa>,
    pub coa_next_id: u8,
    /// A connection that negotiated RADIUS/1.1 (RFC 9765): Tokens, no signatures.
    pub v11: bool,
    /// Its client left the configuration at a reload: no new request is taken, and the
    /// flow ends once its requests in flight are answered.
    pub retiring: bool,
}

impl Flow {
    pub fn new(
        remote: SocketAddr,
        local: SocketAddr,
        client: Arc<Client>,
        proved: bool,
        now: Instant,
    ) -> Self {
        let key = flow_key(remote, local);
        Self {
            key,
            remote,
            local,
            has_child: false,
            client,
            hash: flow_hash(&key),
            generation: 0,
            proved,
            last_seen: now,
            in_flight: 0,
            dedup: Dedup::default(),
            named: false,
            coa: HashMap::new(),
            coa_next_id: 0,
            v11: false,
            retiring: false,
        }
    }
}

/// Which flow a request in flight belongs to. The addresses let the answer reach the NAS
/// even when the flow has ended meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowRef {
    pub slot: u32,
    pub generation: u32,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

/// A worker's flows, by slot and by key.
#[derive(Debug, Default)]
pub struct FlowTable {
    slots: Vec<Option<Flow>>,
    free: Vec<usize>,
    by_key: HashMap<FlowKey, usize>,
    next_generation: u32,
}

impl FlowTable {
    /// Adds `flow` (its generation set here) and returns its slot.
    pub fn insert(&mut self, mut flow: Flow) -> usize {
        self.next_generation = self.next_generation.wrapping_add(1);
        flow.generation = self.next_generation;
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        self.by_key.insert(flow.key, slot);
        self.slots[slot] = Some(flow);
        slot
    }

    pub fn find(&self, key: &FlowKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    pub fn get(&self, slot: usize) -> Option<&Flow> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut Flow> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    /// The flow a request was made for, if it has not ended since.
    pub fn of(&mut self, r: &FlowRef) -> Option<&mut Flow> {
        self.get_mut(r.slot as usize)
            .filter(|f| f.generation == r.generation)
    }

    /// A reference to flow `slot` for a request of it.
    pub fn reference(&self, slot: usize) -> Option<FlowRef> {
        self.get(slot).map(|f| FlowRef {
            slot: slot as u32,
            generation: f.generation,
            remote: f.remote,
            local: f.local,
        })
    }

    pub fn remove(&mut self, slot: usize) -> Option<Flow> {
        let flow = self.slots.get_mut(slot).and_then(Option::take)?;
        self.by_key.remove(&flow.key);
        self.free.push(slot);
        Some(flow)
    }

    /// Every flow, with its slot.
    pub fn iter(&self) -> impl Iterator<Item = (usize, &Flow)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, f)| Some((i, f.as_ref()?)))
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Flow> {
        self.slots.iter_mut().flatten()
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// A flow's place in a load-balancing pool.
fn flow_hash(key: &FlowKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}
