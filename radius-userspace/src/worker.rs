//! A worker: one wildcard socket, the flows that land on it, and its own sockets to every
//! upstream, all driven by one thread from one level-triggered epoll set ([`Poller`]).
//!
//! Shared-nothing per worker, so a request crosses no channel, no lock and no other thread
//! between the NAS and the upstream: the child's datagram is read, prepared
//! ([`proxy::prepare_request`]), given an Identifier of this worker's upstream socket and sent;
//! the upstream's reply, read from that socket, is checked ([`proxy::process_reply`]) and
//! sent from the flow's child. Steer (or the reuseport filter) keeps a flow on one worker,
//! and the worker owns its flow table, so injection of a packet that reached the wildcard for
//! a known flow is a plain call of the same handler a child read uses.
//!
//! A flow is made only for packets that pass their client's signature, or carry none to
//! check; until one of its requests proves the client's secret it is *provisional* (see
//! [`crate::admission`]): such flows have a bounded share of `max_flows`, a short idle
//! lifetime, and are evicted least recently seen first when room is needed. Their requests
//! in flight are still answered.
//!
//! Flows end after `idle_timeout` without traffic and nothing in flight: the worker
//! unregisters the child from steer first (later packets reach the wildcard), drains it,
//! closes it, and handles what it drained as wildcard packets, so nothing is lost.
//! Upstream sockets: one per (upstream, port) to start; another is opened when all 256
//! Identifiers of the existing ones are in flight, up to a bound, and closed when idle.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use radius_common::FlowKey;
use tracing::{debug, info, warn};

use crate::{
    admission::Provisional,
    answers,
    client::{self as clients, Binding, Client, Proof},
    coa::NasName,
    codec::{Code, Packet, PacketMut, auth},
    dedup::{Dedup, Verdict},
    dynamic::Resolution,
    metrics::{Refusal, Via},
    pending::{Kept, PendingSources},
    proxy::{self, InFlight},
    requests::{self, Allocation, At, Requests},
    shared::{CoaJob, Defined, FlowHandle, InboxRx, Shared, ToWorker, lock},
    socket::{self, Poller},
    upstream::Upstream,
};

/// Datagrams a wildcard gives per round before the other sockets get their turn.
const WILDCARD_BUDGET: usize = 64;

// Epoll tokens: the kind in the top byte, an index below.
const KIND_SHIFT: u32 = 56;
const WILDCARD: u64 = 0;
const UPSTREAM: u64 = 1;
const CHILD: u64 = 2;
const WAKE: u64 = 3;

fn token(kind: u64, index: usize) -> u64 {
    (kind << KIND_SHIFT) | index as u64
}

/// Which flow a request in flight belongs to; the generation tells a reused slot apart.
/// The addresses let the answer reach the NAS even when the flow has ended meanwhile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FlowRef {
    slot: u32,
    generation: u32,
    remote: SocketAddr,
    local: SocketAddr,
}

/// How a request in flight upstream ends (see [`end_request`]).
enum End<'a> {
    /// The upstream answered; this is the reply, finished for the NAS.
    Answered(&'a [u8]),
    /// No answer in time, or a send the kernel refused: a NAS retransmission goes anew.
    GivenUp,
    /// Taken off this upstream to go to another server of the pool (failover).
    Moved,
}

type Pending = InFlight<FlowRef>;

/// One flow: its child socket, its client and its counters.
struct Flow {
    key: FlowKey,
    remote: SocketAddr,
    local: SocketAddr,
    /// Its own socket, once it has proved its source (provisional flows have none).
    child: Option<UdpSocket>,
    /// The flow's client, known before the flow is made (for NAT, from its first proven
    /// request; the flow keeps it).
    client: Arc<Client>,
    /// Its place in load-balancing pools.
    hash: u64,
    generation: u32,
    /// One of its requests carried a signature made with its client's secret.
    proved: bool,
    last_seen: Instant,
    in_flight: u32,
    /// RFC 5080: requests in flight and recent replies, by Identifier.
    dedup: Dedup<At>,
    /// Its NAS's names are in the NAS directory (for CoA).
    named: bool,
    /// CoA/Disconnect requests sent to the NAS, by the Identifier we gave them.
    coa: HashMap<u8, PendingCoa>,
    coa_next_id: u8,
}

/// A CoA or Disconnect request out to a NAS, waiting for its ACK or NAK.
struct PendingCoa {
    job: CoaJob,
    sent_auth: [u8; 16],
    sent_at: Instant,
}

/// How long a NAS has to answer a CoA or Disconnect request.
const COA_TIMEOUT: Duration = Duration::from_secs(10);

/// A datagram kept while its source is being defined (see [`PendingSources`]).
struct Arrived {
    remote: SocketAddr,
    local: SocketAddr,
    data: Bytes,
}

/// This worker's way to one upstream: its two ports are `2 * link` (auth) and
/// `2 * link + 1` (acct) in the request table, whose socket indexes index `up_socks`.
struct Link {
    upstream: Arc<Upstream>,
}

/// The request table's port of upstream `link`.
fn port(link: usize, acct: bool) -> usize {
    link * 2 + usize::from(acct)
}

/// The upstream link of a socket index.
fn link_of(socket: usize) -> usize {
    requests::port_of(socket) / 2
}

fn open_upstream_socket(to: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any)?;
    s.connect(to)?;
    s.set_nonblocking(true)?;
    // Replies of up to 256 requests can arrive in one burst.
    let _ = socket2::SockRef::from(&s).set_recv_buffer_size(1 << 20);
    Ok(s)
}

/// What a round sends, flushed at its end with one `sendmmsg` per socket: requests on
/// their upstream sockets, replies on the wildcard (same address and port as the flow's
/// child, so the NAS sees no difference; the wildcard is not connected, so it can send to
/// every NAS of the round at once).
#[derive(Default)]
struct Outbox {
    bytes: Vec<u8>,
    /// (upstream socket index, Identifier, offset, length)
    up: Vec<(usize, u8, usize, usize)>,
    /// (NAS, the address it sent to, offset, length)
    nas: Vec<(SocketAddr, SocketAddr, usize, usize)>,
}

impl Outbox {
    fn keep(&mut self, data: &[u8]) -> (usize, usize) {
        let off = self.bytes.len();
        self.bytes.extend_from_slice(data);
        (off, data.len())
    }

    fn is_empty(&self) -> bool {
        self.up.is_empty() && self.nas.is_empty()
    }
}

struct Worker {
    shared: Arc<Shared>,
    index: usize,
    /// This worker's place in `shared.defined` (for the NAS directory).
    me: usize,
    bound: SocketAddr,
    /// An accounting listener: Status-Server gets an Accounting-Response.
    accounting: bool,
    wildcard: UdpSocket,
    poller: Poller,
    runtime: tokio::runtime::Handle,
    flows: Vec<Option<Flow>>,
    free_slots: Vec<usize>,
    by_key: HashMap<FlowKey, usize>,
    next_generation: u32,
    /// Packets of sources being defined, per flow in arrival order.
    pending: PendingSources<FlowKey, Arrived>,
    /// This worker's flows that have not proved themselves, least recently seen first.
    provisional: Provisional<usize>,
    /// Datagrams drained from closing children, handled once the round's events are.
    requeue: Vec<(socket::Received, Bytes)>,
    links: Vec<Link>,
    /// Sockets to upstreams, by the request table's socket index.
    up_socks: Vec<Option<UdpSocket>>,
    /// Requests in flight upstream: Identifier spaces and timers (sans-IO).
    requests: Requests<FlowRef>,
    /// The wildcard's receive buffer.
    wildcard_buf: Vec<u8>,
    /// Receive buffer (upstream replies, draining children), and the buffer a request or
    /// reply is edited in.
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    out: Outbox,
    ticks: u64,
}

/// How often a worker looks at timeouts, idle flows and cancellation.
const TICK: Duration = Duration::from_millis(100);
/// The longest a worker waits at shutdown for answers to requests in flight.
const DRAIN: Duration = Duration::from_secs(3);

/// The listener a worker serves: its bound address, and whether it is an accounting one
/// (how a Status-Server is answered).
pub(crate) struct Listening {
    pub bound: SocketAddr,
    pub accounting: bool,
}

/// Runs one worker on the calling (dedicated) thread until the daemon is cancelled.
/// `runtime` runs what must be async: dynamic definitions.
pub(crate) fn run(
    shared: Arc<Shared>,
    wildcard: UdpSocket,
    Listening { bound, accounting }: Listening,
    index: usize,
    me: usize,
    inbox: InboxRx,
    runtime: tokio::runtime::Handle,
) -> std::io::Result<()> {
    let poller = Poller::new()?;
    wildcard.set_nonblocking(true)?;
    poller.add(&wildcard, token(WILDCARD, 0))?;
    poller.add(&*inbox.wake, token(WAKE, 0))?;
    let mut links = Vec::new();
    let mut up_socks = Vec::new();
    let mut requests = Requests::default();
    for (li, u) in shared.upstreams.iter().enumerate() {
        // One socket per port to start; more when 256 requests are in flight on each.
        for (acct, to) in [(false, Some(u.auth)), (true, u.acct)] {
            let Some(to) = to else { continue };
            let index = port(li, acct) * requests::MAX_SOCKETS;
            let sock = open_upstream_socket(to)?;
            poller.add(&sock, token(UPSTREAM, index))?;
            if up_socks.len() <= index {
                up_socks.resize_with(index + 1, || None);
            }
            up_socks[index] = Some(sock);
            requests.add_socket(index, Instant::now());
        }
        links.push(Link {
            upstream: u.clone(),
        });
    }
    let mut w = Worker {
        shared: shared.clone(),
        index,
        me,
        bound,
        accounting,
        wildcard,
        poller,
        runtime,
        flows: Vec::new(),
        free_slots: Vec::new(),
        by_key: HashMap::new(),
        next_generation: 0,
        up_socks,
        requests,
        pending: match &shared.dynamic {
            Some(d) => PendingSources::new(d.max_pending_per_flow, d.max_pending_packets),
            None => PendingSources::new(1, 1),
        },
        provisional: Provisional::default(),
        requeue: Vec::new(),
        links,
        wildcard_buf: vec![0u8; 65_536],
        rbuf: vec![0u8; 65_536],
        wbuf: vec![0u8; crate::codec::MAX_PACKET_LEN],
        out: Outbox::default(),
        ticks: 0,
    };
    let mut ready = Vec::with_capacity(256);
    let mut next_tick = Instant::now() + TICK;
    // At SIGTERM/SIGINT: keep serving until what is in flight upstream is answered (or
    // given up), for at most DRAIN, so a restart does not cost NASes their answers.
    let mut drain_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if shared.cancel.is_cancelled() {
            let until = *drain_until.get_or_insert_with(|| {
                let n = w.in_flight();
                if n > 0 {
                    info!(
                        worker = w.index,
                        in_flight = n,
                        "draining requests in flight"
                    );
                }
                now + DRAIN
            });
            if w.in_flight() == 0 || now >= until {
                break;
            }
        }
        if now >= next_tick {
            w.on_tick(now);
            w.handle_requeued();
            w.flush();
            next_tick = now + TICK;
        }
        w.poller
            .wait(&mut ready, 256, next_tick.saturating_duration_since(now))?;
        for &t in &ready {
            if t >> KIND_SHIFT == WAKE {
                inbox.wake.clear();
                while let Ok(m) = inbox.rx.try_recv() {
                    match m {
                        ToWorker::Defined(d) => w.on_defined(d),
                        ToWorker::Coa(job) => w.on_coa(job),
                    }
                }
            } else {
                w.on_ready(t);
            }
        }
        w.handle_requeued();
        w.flush();
    }
    w.shutdown();
    Ok(())
}

impl Worker {
    fn on_ready(&mut self, t: u64) {
        let index = (t & ((1 << KIND_SHIFT) - 1)) as usize;
        match t >> KIND_SHIFT {
            WILDCARD => self.read_wildcard(),
            UPSTREAM => self.read_upstream(index),
            CHILD => self.read_child(index),
            _ => {}
        }
    }

    fn read_wildcard(&mut self) {
        for _ in 0..WILDCARD_BUDGET {
            match socket::recv_from_to(&self.wildcard, &mut self.wildcard_buf, self.bound) {
                Ok(rx) => {
                    // Out of `self` while it is handled (only this reader uses it): a known
                    // flow's packet is handled from it, with no copy of its own.
                    let buf = std::mem::take(&mut self.wildcard_buf);
                    self.on_packet(rx, &buf[..rx.len]);
                    self.wildcard_buf = buf;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(worker = self.index, error = %e, "wildcard receive failed");
                    return;
                }
            }
        }
    }

    fn read_child(&mut self, slot: usize) {
        let Some(flow) = self.flows.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let (remote, local) = (flow.remote, flow.local);
        let Some(child) = flow.child.as_ref() else {
            return;
        };
        let n = match child.recv_from(&mut self.wbuf) {
            Ok((n, from)) if !socket::is_own_datagram(remote, from) => {
                // A child's datagram from another peer (see socket::is_own_datagram).
                self.shared.metrics.misdelivered.inc();
                let rx = socket::Received {
                    len: n,
                    remote: from,
                    local,
                };
                let data = self.wbuf[..n].to_vec();
                self.on_packet(rx, &data);
                return;
            }
            Ok((n, _)) => n,
            Err(_) => return,
        };
        self.shared.metrics.packet(Via::Child);
        self.on_request(slot, n);
    }

    /// A datagram that reached the wildcard (or was handed back): a known flow's is injected,
    /// a new flow's creates the flow, an unknown source's waits for its definition.
    fn on_packet(&mut self, rx: socket::Received, data: &[u8]) {
        let shared = self.shared.clone();
        let key = socket::flow_key(rx.remote, rx.local);
        if let Some(&slot) = self.by_key.get(&key) {
            self.inject(slot, data);
            return;
        }
        if self.pending.contains(&key) {
            self.keep_pending(key, rx, data);
            return;
        }
        if let Some(binding) = shared.clients.binding(rx.remote.ip()) {
            self.create_flow(
                rx.remote,
                rx.local,
                binding,
                vec![Bytes::copy_from_slice(data)],
            );
            return;
        }
        let Some(dynamic) = &shared.dynamic else {
            shared.metrics.refuse(Refusal::UnknownClient);
            debug!(remote = %rx.remote, "no client for this source: dropped");
            return;
        };
        match dynamic.resolve(rx.remote.ip(), Instant::now()) {
            Resolution::Client(client) => self.create_flow(
                rx.remote,
                rx.local,
                Binding::One(client),
                vec![Bytes::copy_from_slice(data)],
            ),
            Resolution::Refused => shared.metrics.refuse(Refusal::DirectoryRefused),
            Resolution::NotDynamic => {
                shared.metrics.refuse(Refusal::UnknownClient);
                debug!(remote = %rx.remote, "no client for this source: dropped");
            }
            Resolution::Defining { start } => {
                self.keep_pending(key, rx, data);
                if start {
                    spawn_definition(&self.runtime, shared.clone(), rx.remote.ip());
                }
            }
        }
    }

    /// A packet for a known flow that came through the wildcard: handled as if its child
    /// had read it.
    fn inject(&mut self, slot: usize, data: &[u8]) {
        let n = data.len().min(self.wbuf.len());
        self.wbuf[..n].copy_from_slice(&data[..n]);
        self.shared.metrics.packet(Via::Wildcard);
        self.on_request(slot, n);
    }

    /// A definition finished: make the flows that waited for it, and inject their packets
    /// in arrival order; or drop them, counted, on a refusal.
    fn on_defined(&mut self, d: Defined) {
        let shared = self.shared.clone();
        for (_, packets) in self.pending.take_source(d.ip, &shared.pending_packets) {
            let Some(first) = packets.first() else {
                continue;
            };
            let (remote, local) = (first.remote, first.local);
            match &d.outcome {
                Ok(client) => self.create_flow(
                    remote,
                    local,
                    Binding::One(client.clone()),
                    packets.into_iter().map(|a| a.data).collect(),
                ),
                Err(_) => {
                    for _ in &packets {
                        shared.metrics.refuse(Refusal::DirectoryRefused);
                    }
                }
            }
        }
    }

    /// Keeps a packet of a source being defined, within the per-flow and global bounds.
    fn keep_pending(&mut self, key: FlowKey, rx: socket::Received, data: &[u8]) {
        let arrived = Arrived {
            remote: rx.remote,
            local: rx.local,
            data: Bytes::copy_from_slice(data),
        };
        let kept = self.pending.keep(
            key,
            rx.remote.ip(),
            arrived,
            Instant::now(),
            &self.shared.pending_packets,
        );
        if kept != Kept::Kept {
            self.shared.metrics.refuse(Refusal::PendingFull);
        }
    }

    /// Makes a flow for packets that passed [`screen`], and handles them in order. A flow
    /// that proved its source gets its child socket (registered with steer on the fast
    /// path) at once; a provisional one has none (its packets keep reaching the wildcard,
    /// its replies leave from it as every reply does) until it proves itself, so spoofed
    /// sources cost no socket and no place in `max_flows`.
    fn create_flow(
        &mut self,
        remote: SocketAddr,
        local: SocketAddr,
        binding: Binding,
        packets: Vec<Bytes>,
    ) {
        let shared = self.shared.clone();
        let key = socket::flow_key(remote, local);
        let Some((client, packets, proved)) = screen(&shared, &binding, packets) else {
            debug!(%remote, "no flow for packets that prove nothing of their source");
            return;
        };
        if proved {
            if !reserve(&shared.active, shared.max_flows) {
                shared.metrics.refuse(Refusal::MaxFlows);
                debug!(%remote, "max_flows reached: packet of a new flow dropped");
                return;
            }
        } else {
            // At their bound, the provisional flow of this worker seen least recently
            // makes room; a proved flow never does.
            while !reserve(&shared.provisional_flows, shared.max_provisional) {
                if !self.evict_oldest_provisional() {
                    shared.metrics.refuse(Refusal::ProvisionalFull);
                    debug!(%remote, "provisional flows at their bound: packet of a new flow dropped");
                    return;
                }
            }
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.flows.push(None);
            self.flows.len() - 1
        });
        self.next_generation = self.next_generation.wrapping_add(1);
        let now = Instant::now();
        self.flows[slot] = Some(Flow {
            key,
            remote,
            local,
            child: None,
            client,
            hash: flow_hash(&key),
            generation: self.next_generation,
            proved,
            last_seen: now,
            in_flight: 0,
            dedup: Dedup::default(),
            named: false,
            coa: HashMap::new(),
            coa_next_id: 0,
        });
        if proved {
            if let Err(why) = self.open_child(slot) {
                self.flows[slot] = None;
                self.free_slots.push(slot);
                shared.active.fetch_sub(1, Ordering::AcqRel);
                shared.metrics.refuse(why);
                return;
            }
            shared.metrics.flows_proved.inc();
        } else {
            self.provisional.insert(slot, now);
            shared.metrics.flows_provisional.inc();
        }
        self.by_key.insert(key, slot);
        shared.metrics.flows_created.inc();
        shared.metrics.flows_active.inc();
        debug!(%remote, %local, path = shared.path.as_str(), proved, "flow created");
        for data in packets {
            self.inject(slot, &data);
        }
    }

    /// Gives flow `slot` its child socket: bound to the flow's addresses, watched, and
    /// registered with steer on the fast path.
    fn open_child(&mut self, slot: usize) -> Result<(), Refusal> {
        let shared = self.shared.clone();
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else {
            return Err(Refusal::ChildSocket);
        };
        let (remote, local, key) = (flow.remote, flow.local, flow.key);
        let child = socket::bind_child(shared.path, self.bound, local, remote)
            .and_then(|c| c.set_nonblocking(true).map(|()| c))
            .map_err(|e| {
                warn!(%remote, %local, error = %e, "no child socket for a flow");
                Refusal::ChildSocket
            })?;
        self.poller.add(&child, token(CHILD, slot)).map_err(|e| {
            warn!(%remote, error = %e, "cannot watch a flow's child");
            Refusal::ChildSocket
        })?;
        if let Some(fp) = &shared.fastpath {
            use std::os::fd::AsRawFd;
            if let Err(e) = lock(fp).register_child(&key, child.as_raw_fd()) {
                self.poller.remove(&child);
                warn!(%remote, error = %e, "steer cannot take a flow");
                return Err(Refusal::Register);
            }
        }
        flow.child = Some(child);
        Ok(())
    }

    /// Provisional flow `slot` has proved its source: it gets its child socket and a place
    /// in `max_flows`, and is never evicted from now on. With no place or no socket it
    /// stays provisional (and is served from the wildcard).
    fn promote(&mut self, slot: usize) {
        let shared = self.shared.clone();
        if !reserve(&shared.active, shared.max_flows) {
            shared.metrics.refuse(Refusal::MaxFlows);
            return;
        }
        if let Err(why) = self.open_child(slot) {
            shared.active.fetch_sub(1, Ordering::AcqRel);
            shared.metrics.refuse(why);
            return;
        }
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        // Its NAS names (for CoA) are registered again, as a proved flow's.
        flow.proved = true;
        flow.named = false;
        self.provisional.remove(slot);
        shared.provisional_flows.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.flows_provisional.dec();
        shared.metrics.flows_proved.inc();
        debug!(remote = %flow.remote, client = %flow.client.name, "flow proved");
    }

    /// The request of flow `slot` in `wbuf[..n]`: a retransmission is answered from the
    /// cache or followed upstream (RFC 5080), a Status-Server answered here (RFC 5997), and
    /// anything else prepared for its client's upstream, given an Identifier of one of this
    /// worker's sockets to it, signed and queued.
    fn on_request(&mut self, slot: usize, n: usize) {
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let now = Instant::now();
        flow.last_seen = now;
        if !flow.proved {
            if flow.client.proof(&self.wbuf[..n]) == Proof::Proved {
                self.promote(slot);
            } else {
                self.provisional.touch(slot, now);
            }
        }
        let shared = &self.shared;
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let client = flow.client.clone();
        if n < crate::codec::HEADER_LEN {
            shared.metrics.proxy_drop("malformed");
            return;
        }
        let (code, id) = (self.wbuf[0], self.wbuf[1]);
        let mut nas_auth = [0u8; 16];
        nas_auth.copy_from_slice(&self.wbuf[4..20]);
        if code == Code::StatusServer as u8 {
            let (remote, local) = (flow.remote, flow.local);
            answer_status_server(
                shared,
                &client,
                &self.wbuf[..n],
                (remote, local),
                self.accounting,
                &mut self.out,
            );
            return;
        }
        if matches!(
            Code::from_u8(code),
            Some(Code::CoaAck | Code::CoaNak | Code::DisconnectAck | Code::DisconnectNak)
        ) {
            on_coa_answer(shared, flow, &client, &mut self.wbuf, n);
            return;
        }
        if !flow.named {
            // Once per flow: where a CoA for this NAS must go.
            if let Ok(p) = Packet::parse(&self.wbuf[..n]) {
                let names = NasName::of(&p);
                shared.nas_directory.register(
                    names,
                    FlowHandle {
                        worker: self.me,
                        key: flow.key,
                    },
                    flow.proved,
                );
            }
            flow.named = true;
        }
        match flow.dedup.check(id, &nas_auth, now, &shared.dedup) {
            Verdict::New => {}
            Verdict::Cached(reply) => {
                shared.metrics.local_answer("duplicate_cached");
                let (off, len) = self.out.keep(reply);
                self.out.nas.push((flow.remote, flow.local, off, len));
                return;
            }
            Verdict::InFlight { resend, tag } => {
                shared.metrics.proxy_drop("duplicate_in_flight");
                if resend {
                    // The NAS retransmits: follow it upstream (once a second at most)
                    // rather than sending a second request; to another server when this
                    // one has gone quiet.
                    self.resend(tag, now, "nas_retransmission");
                }
                return;
            }
        }
        let hash = flow.hash;
        // The next step of an EAP conversation goes to the server that sent its State.
        let sticky = client
            .pool
            .spreads()
            .then(|| {
                Packet::parse(&self.wbuf[..n])
                    .ok()?
                    .get(crate::codec::attr::STATE)
                    .map(|a| a.value.to_vec())
            })
            .flatten()
            .and_then(|st| {
                shared
                    .eap_states
                    .server_of(&st, crate::upstream::millis(now))
            })
            .and_then(|name| client.pool.usable(&name).cloned());
        let Some(upstream) = sticky.or_else(|| client.pool.pick(hash, None).cloned()) else {
            return;
        };
        self.forward(slot, &client, &upstream, n, now);
    }

    /// Prepares the NAS request in `wbuf[..n]` for `upstream`, gives it an Identifier of
    /// one of this worker's sockets to it, signs it and queues it; the flow's dedup entry
    /// then points at it.
    fn forward(
        &mut self,
        slot: usize,
        client: &Arc<Client>,
        upstream: &Upstream,
        n: usize,
        now: Instant,
    ) -> bool {
        let shared = &self.shared;
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let Some(&li) = shared.upstream_index.get(&upstream.name) else {
            return false;
        };
        // Kept for failover to another server of the pool (re-prepared from it).
        let nas_packet = if client.pool.members.len() > 1 {
            self.wbuf[..n].to_vec()
        } else {
            Vec::new()
        };
        let prepared = match proxy::prepare_request(
            client,
            upstream,
            &shared.proxy_state,
            &mut self.wbuf,
            n,
        ) {
            Ok(p) => {
                if p.learnt_client_signs {
                    shared
                        .metrics
                        .set_message_authenticator_required("client", &client.name, true);
                    info!(
                        client = %client.name,
                        "client signs its Access-Requests without EAP: a Message-Authenticator \
                         is now required from it (require_message_authenticator = auto)"
                    );
                }
                p
            }
            Err(e) => {
                shared.metrics.proxy_drop(e.reason());
                debug!(remote = %flow.remote, client = %client.name, error = %e, "request not forwarded");
                return false;
            }
        };
        let Some(link) = self.links.get(li) else {
            return false;
        };
        let acct = prepared.code == Code::AccountingRequest;
        let to = if acct {
            link.upstream.acct
        } else {
            Some(link.upstream.auth)
        };
        let Some(to) = to else {
            shared.metrics.proxy_drop("no_acct_upstream");
            protocol_error(
                shared,
                client,
                flow,
                &self.wbuf,
                &prepared,
                UNSUPPORTED_SERVICE,
                &mut self.out,
            );
            return false;
        };
        let mut pending = InFlight {
            client: client.clone(),
            prepared,
            up_auth: [0; 16],
            sent_at: now,
            reply_to: FlowRef {
                slot: slot as u32,
                generation: flow.generation,
                remote: flow.remote,
                local: flow.local,
            },
            wire: Vec::new(),
            retries: 0,
            next_retry: now + jittered(link.upstream.options.retry),
            nas_packet,
        };
        // An Identifier of one of this worker's sockets to that port; another socket when
        // all 256 of each are in flight.
        let at = loop {
            match self.requests.allocate(port(li, acct), pending) {
                Allocation::At(at) => break Some(at),
                Allocation::OpenSocket { socket, request } => {
                    let opened = open_upstream_socket(to).and_then(|sock| {
                        self.poller.add(&sock, token(UPSTREAM, socket))?;
                        Ok(sock)
                    });
                    match opened {
                        Ok(sock) => {
                            if self.up_socks.len() <= socket {
                                self.up_socks.resize_with(socket + 1, || None);
                            }
                            self.up_socks[socket] = Some(sock);
                            self.requests.add_socket(socket, now);
                            debug!(%to, socket, "another upstream socket: 256 requests in flight on each");
                            pending = request;
                        }
                        Err(e) => {
                            warn!(%to, error = %e, "no further upstream socket");
                            break None;
                        }
                    }
                }
                Allocation::Exhausted(_) => break None,
            }
        };
        let Some(at) = at else {
            shared.metrics.proxy_drop("upstream_ids_exhausted");
            protocol_error(
                shared,
                client,
                flow,
                &self.wbuf,
                &prepared,
                RESOURCES_UNAVAILABLE,
                &mut self.out,
            );
            return false;
        };
        match proxy::finalize_request(&mut self.wbuf, prepared.len, at.id, &link.upstream) {
            Ok(up_auth) => {
                let wire = &self.wbuf[..prepared.len];
                if let Some(p) = self.requests.get_mut(at) {
                    p.up_auth = up_auth;
                    p.wire = wire.to_vec();
                }
                let (off, len) = self.out.keep(wire);
                self.out.up.push((at.socket, at.id, off, len));
                // Begun: from here only end_request ends it.
                flow.in_flight += 1;
                shared.metrics.requests_in_flight.inc();
                flow.dedup
                    .begin(prepared.nas_id, &prepared.nas_auth, now, at);
                true
            }
            Err(e) => {
                // Not begun yet (no dedup entry, not counted): only the Identifier to free.
                self.requests.take(at, now);
                shared.metrics.proxy_drop(e.reason());
                false
            }
        }
    }

    /// Sends the request at `at` again: to the same server while it answers anything,
    /// else to another server of its client's pool (failover).
    fn resend(&mut self, at: At, now: Instant, cause: &'static str) {
        let shared = self.shared.clone();
        let Some(upstream) = self
            .links
            .get(link_of(at.socket))
            .map(|l| l.upstream.clone())
        else {
            return;
        };
        let Some(p) = self.requests.get_mut(at) else {
            return;
        };
        let window = (upstream.options.retry / 2).as_millis() as u64;
        let alive = upstream
            .health
            .on_unanswered(crate::upstream::millis(now), window);
        let flow = p.reply_to;
        let hash = self
            .flows
            .get(flow.slot as usize)
            .and_then(Option::as_ref)
            .filter(|f| f.generation == flow.generation)
            .map_or(0, |f| f.hash);
        let other = (!alive && !p.nas_packet.is_empty())
            .then(|| p.client.pool.pick(hash, Some(&upstream.name)).cloned())
            .flatten()
            .filter(|o| {
                o.health.state() != crate::upstream::State::Dead
                    || upstream.health.state() == crate::upstream::State::Dead
            });
        match other {
            None => {
                let Some(p) = self.requests.get_mut(at) else {
                    return;
                };
                p.next_retry = now + jittered(upstream.options.retry);
                let (off, len) = self.out.keep(&p.wire);
                self.out.up.push((at.socket, at.id, off, len));
                shared.metrics.upstream_retransmit(cause);
            }
            Some(to) => {
                // Ended here, begun anew there: if the new send cannot be made, nothing of
                // the old one is left behind.
                let Some(p) = self.end(at, End::Moved, now) else {
                    return;
                };
                let n = p.nas_packet.len().min(self.wbuf.len());
                self.wbuf[..n].copy_from_slice(&p.nas_packet[..n]);
                let r = p.reply_to;
                let flow_alive = self
                    .flows
                    .get(r.slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|f| f.generation == r.generation);
                info!(from = %upstream.name, to = %to.name, "upstream quiet: request failed over");
                if flow_alive && self.forward(r.slot as usize, &p.client, &to, n, now) {
                    shared.metrics.upstream_retransmit("failover");
                }
            }
        }
    }

    /// A CoA or Disconnect request for one of this worker's flows: re-signed for the NAS
    /// and sent from the flow's address and port to the NAS's, like a reply.
    fn on_coa(&mut self, job: CoaJob) {
        let shared = self.shared.clone();
        let flow = self
            .by_key
            .get(&job.key)
            .and_then(|&slot| self.flows.get_mut(slot))
            .and_then(Option::as_mut);
        let Some((flow, client)) = flow.map(|f| {
            let c = f.client.clone();
            (f, c)
        }) else {
            shared.metrics.coa("nas_not_found");
            if let Ok(p) = Packet::parse(&job.packet)
                && let Some(nak) =
                    crate::coa::nak(&p, &job.upstream, crate::coa::SESSION_CONTEXT_NOT_FOUND)
            {
                let _ = job.answer.try_send((nak, job.origin));
            }
            return;
        };
        let n = job.packet.len().min(self.wbuf.len());
        self.wbuf[..n].copy_from_slice(&job.packet[..n]);
        // An Identifier no request to this NAS has in flight.
        let mut id = flow.coa_next_id;
        for _ in 0..256 {
            if !flow.coa.contains_key(&id) {
                break;
            }
            id = id.wrapping_add(1);
        }
        flow.coa_next_id = id.wrapping_add(1);
        let Ok(mut m) = PacketMut::from_datagram(&mut self.wbuf, n) else {
            shared.metrics.coa("malformed");
            return;
        };
        m.set_identifier(id);
        m.set_authenticator(&[0; 16]);
        if m.sign(&client.secret, None).is_err() {
            shared.metrics.coa("malformed");
            return;
        }
        let sent_auth = m.authenticator();
        let (off, len) = self.out.keep(m.as_bytes());
        self.out.nas.push((flow.remote, flow.local, off, len));
        debug!(remote = %flow.remote, client = %client.name, "CoA request sent to the NAS");
        flow.coa.insert(
            id,
            PendingCoa {
                job,
                sent_auth,
                sent_at: Instant::now(),
            },
        );
    }

    /// Sends what the round produced; a datagram the kernel refuses is counted, and a
    /// request's Identifier freed.
    fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.out);
        let shared = self.shared.clone();
        out.up.sort_by_key(|&(i, ..)| i);
        let mut failed: Vec<(usize, u8)> = Vec::new();
        for group in out.up.chunk_by(|a, b| a.0 == b.0) {
            let index = group[0].0;
            let Some(sock) = self.up_socks.get(index).and_then(Option::as_ref) else {
                continue;
            };
            let batch: Vec<socket::Outgoing<'_>> = group
                .iter()
                .map(|&(_, _, off, len)| socket::Outgoing {
                    to: None,
                    from: None,
                    data: &out.bytes[off..off + len],
                })
                .collect();
            let sent = socket::send_batch(sock, &batch, |i, e| {
                debug!(error = %e, "request not sent upstream");
                failed.push((index, group[i].1));
            });
            shared.metrics.forwarded.inc_by(sent as u64);
        }
        for (socket, id) in failed {
            shared.metrics.proxy_drop("send_to_upstream");
            self.end(At { socket, id }, End::GivenUp, Instant::now());
        }
        let any = self.bound.ip().is_unspecified();
        let batch: Vec<socket::Outgoing<'_>> = out
            .nas
            .iter()
            .map(|&(remote, local, off, len)| socket::Outgoing {
                to: Some(remote),
                from: any.then_some(local.ip()),
                data: &out.bytes[off..off + len],
            })
            .collect();
        let sent = socket::send_batch(&self.wildcard, &batch, |i, e| {
            shared.metrics.proxy_drop("send_to_nas");
            debug!(remote = %out.nas[i].0, error = %e, "reply not sent");
        });
        shared.metrics.relayed.inc_by(sent as u64);
        drop(batch);
        out.bytes.clear();
        out.up.clear();
        out.nas.clear();
        self.out = out;
    }

    /// Requests of this worker in flight upstream.
    fn in_flight(&self) -> usize {
        self.requests.in_flight()
    }

    /// Ends the request at `at` without an answer; see [`end_request`].
    fn end(&mut self, at: At, end: End<'_>, now: Instant) -> Option<Pending> {
        end_request(
            &self.shared,
            &mut self.requests,
            &mut self.flows,
            at,
            end,
            now,
        )
        .map(|(p, _)| p)
    }

    /// Replies on one of this worker's upstream sockets: each checked, re-signed for its
    /// NAS and sent from its flow's child.
    fn read_upstream(&mut self, index: usize) {
        let Some(upstream) = self.links.get(link_of(index)).map(|l| l.upstream.clone()) else {
            return;
        };
        let shared = self.shared.clone();
        for _ in 0..WILDCARD_BUDGET {
            let Some(sock) = self.up_socks.get(index).and_then(Option::as_ref) else {
                return;
            };
            let n = match sock.recv(&mut self.rbuf) {
                Ok(n) => n,
                Err(_) => return,
            };
            if n < crate::codec::HEADER_LEN {
                shared.metrics.proxy_drop("reply_malformed");
                continue;
            }
            let at = At {
                socket: index,
                id: self.rbuf[1],
            };
            let Some(pending) = self.requests.get(at) else {
                shared.metrics.proxy_drop("reply_unknown_id");
                continue;
            };
            let len = match proxy::process_reply(
                &mut self.rbuf,
                n,
                &upstream,
                pending,
                &shared.proxy_state,
            ) {
                Ok(r) => {
                    if r.learnt_upstream_signs {
                        shared.metrics.set_message_authenticator_required(
                            "upstream",
                            &upstream.name,
                            true,
                        );
                        info!(
                            upstream = %upstream.name,
                            "upstream signs its Access replies without EAP: a \
                             Message-Authenticator is now required from it \
                             (require_message_authenticator = auto)"
                        );
                    }
                    r.len
                }
                // A forged or broken reply does not cancel the request: the real one may
                // follow.
                Err(e) => {
                    shared.metrics.proxy_drop(e.reason());
                    warn!(upstream = %upstream.name, error = %e, "reply dropped");
                    continue;
                }
            };
            let now = Instant::now();
            upstream.health.on_answer(crate::upstream::millis(now));
            let Some((done, send_to)) = end_request(
                &shared,
                &mut self.requests,
                &mut self.flows,
                at,
                End::Answered(&self.rbuf[..len]),
                now,
            ) else {
                continue;
            };
            if done.client.pool.spreads()
                && self.rbuf[0] == Code::AccessChallenge as u8
                && let Ok(p) = Packet::parse(&self.rbuf[..len])
                && let Some(st) = p.get(crate::codec::attr::STATE)
            {
                shared
                    .eap_states
                    .remember(st.value, &upstream.name, crate::upstream::millis(now));
            }
            if let Some((remote, local)) = send_to {
                let (off, len) = self.out.keep(&self.rbuf[..len]);
                self.out.nas.push((remote, local, off, len));
            }
        }
    }

    /// Every 100 ms: requests the upstream did not answer in time, idle flows, idle extra
    /// upstream sockets.
    fn on_tick(&mut self, now: Instant) {
        let shared = self.shared.clone();
        self.ticks = self.ticks.wrapping_add(1);
        let (mut due, mut expired) = (Vec::new(), Vec::new());
        for (li, link) in self.links.iter().enumerate() {
            let u = &link.upstream;
            let (timeout, retry, max_retries) = (u.timeout, u.options.retry, u.options.max_retries);
            for acct in [false, true] {
                // Our own retransmissions, for NASes that do not retransmit; requests past
                // their timeout; extra sockets of a burst, once idle.
                let sweep = self
                    .requests
                    .sweep(port(li, acct), now, timeout, max_retries, || {
                        jittered(retry)
                    });
                expired.extend(sweep.expired);
                due.extend(sweep.resend);
                for socket in sweep.closed {
                    if let Some(sock) = self.up_socks.get_mut(socket).and_then(Option::take) {
                        self.poller.remove(&sock);
                        debug!(upstream = %u.name, socket, "idle extra upstream socket closed");
                    }
                }
            }
        }
        for at in expired {
            if let Some(p) = self.end(at, End::GivenUp, now) {
                shared.metrics.proxy_drop("upstream_timeout");
                if let Some(link) = self.links.get(link_of(at.socket)) {
                    let window = (link.upstream.options.retry / 2).as_millis() as u64;
                    link.upstream
                        .health
                        .on_unanswered(crate::upstream::millis(now), window);
                }
                debug!(remote = %p.reply_to.remote, client = %p.client.name, "request given up: no answer upstream");
            }
        }
        for at in due {
            self.resend(at, now, "timer");
        }
        // Once a second: cached replies past cleanup_delay, CoA requests unanswered, and
        // packets of a definition that never ended (a directory answers or times out within
        // its timeout; a queue for the concurrency limit may add a few more).
        if self.ticks.is_multiple_of(10)
            && let Some(d) = &shared.dynamic
        {
            let max_wait = d.timeout * 4 + Duration::from_secs(5);
            for (_, packets) in self.pending.expire(now, max_wait, &shared.pending_packets) {
                for _ in &packets {
                    shared.metrics.refuse(Refusal::PendingExpired);
                }
            }
        }
        if self.ticks.is_multiple_of(10) {
            for f in self.flows.iter_mut().flatten() {
                f.dedup.expire(now);
                let before = f.coa.len();
                f.coa
                    .retain(|_, c| now.duration_since(c.sent_at) < COA_TIMEOUT);
                for _ in f.coa.len()..before {
                    shared.metrics.coa("nas_timeout");
                }
            }
        }
        let (idle, provisional_idle) = (shared.idle_timeout, shared.provisional_idle);
        let ended: Vec<usize> = self
            .flows
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let f = f.as_ref()?;
                let idle = if f.proved { idle } else { provisional_idle };
                (f.in_flight == 0 && now.duration_since(f.last_seen) >= idle).then_some(i)
            })
            .collect();
        for slot in ended {
            self.end_flow(slot);
        }
    }

    /// Evicts this worker's provisional flow seen least recently, to make room; false when
    /// it has none.
    fn evict_oldest_provisional(&mut self) -> bool {
        while let Some(slot) = self.provisional.oldest() {
            if self
                .flows
                .get(slot)
                .and_then(Option::as_ref)
                .is_some_and(|f| !f.proved)
            {
                self.shared.metrics.flow_evicted("provisional_bound");
                self.end_flow(slot);
                return true;
            }
            // Not a provisional flow (cannot happen): forget it and look again.
            self.provisional.remove(slot);
        }
        false
    }

    /// Handles what closing children gave back, as packets that reached the wildcard.
    fn handle_requeued(&mut self) {
        while !self.requeue.is_empty() {
            for (rx, data) in std::mem::take(&mut self.requeue) {
                self.on_packet(rx, &data);
            }
        }
    }

    /// Ends a flow (idle, or evicted with requests in flight: their answers still reach the
    /// NAS) without losing what reaches it meanwhile.
    fn end_flow(&mut self, slot: usize) {
        let Some(flow) = self.flows.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if !flow.proved {
            self.provisional.remove(slot);
            self.shared.provisional_flows.fetch_sub(1, Ordering::AcqRel);
            self.shared.metrics.flows_provisional.dec();
        }
        self.by_key.remove(&flow.key);
        if flow.named {
            self.shared.nas_directory.forget(FlowHandle {
                worker: self.me,
                key: flow.key,
            });
        }
        let before = self.requeue.len();
        if let Some(child) = flow.child {
            // Unregister first so later packets reach the wildcard and start a new flow.
            if let Some(fp) = &self.shared.fastpath {
                lock(fp).unregister_child(&flow.key);
            }
            self.poller.remove(&child);
            while let Ok((n, from)) = child.recv_from(&mut self.rbuf) {
                let rx = socket::Received {
                    len: n,
                    remote: from,
                    local: flow.local,
                };
                self.requeue
                    .push((rx, Bytes::copy_from_slice(&self.rbuf[..n])));
            }
            drop(child);
            self.shared.active.fetch_sub(1, Ordering::AcqRel);
        }
        self.free_slots.push(slot);
        self.shared.metrics.flows_ended.inc();
        self.shared.metrics.flows_active.dec();
        debug!(
            remote = %flow.remote,
            drained = self.requeue.len() - before,
            proved = flow.proved,
            in_flight = flow.in_flight,
            "flow ended"
        );
    }

    fn shutdown(&mut self) {
        let slots: Vec<usize> = (0..self.flows.len())
            .filter(|&i| self.flows[i].is_some())
            .collect();
        for slot in slots {
            if let Some(flow) = self.flows[slot].take() {
                if flow.child.is_some() {
                    if let Some(fp) = &self.shared.fastpath {
                        lock(fp).unregister_child(&flow.key);
                    }
                    self.shared.active.fetch_sub(1, Ordering::AcqRel);
                }
                if !flow.proved {
                    self.shared.provisional_flows.fetch_sub(1, Ordering::AcqRel);
                    self.shared.metrics.flows_provisional.dec();
                }
                self.shared.metrics.flows_ended.inc();
                self.shared.metrics.flows_active.dec();
            }
        }
    }
}

/// Takes one of `bound` places in `count`, atomically (workers take them concurrently).
fn reserve(count: &std::sync::atomic::AtomicUsize, bound: usize) -> bool {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < bound).then_some(n + 1)
        })
        .is_ok()
}

/// Screens the first packets of a would-be flow (in arrival order): a packet whose
/// signature fails with its client's secret, or that must be signed and is not, is dropped
/// and counted, and makes no flow. Returns the flow's client (for NAT, the entry the first
/// proven packet names), the packets to handle, and whether one of them proved the source.
fn screen(
    shared: &Shared,
    binding: &Binding,
    packets: Vec<Bytes>,
) -> Option<(Arc<Client>, Vec<Bytes>, bool)> {
    match binding {
        Binding::One(client) => {
            let mut proved = false;
            let kept: Vec<Bytes> = packets
                .into_iter()
                .filter(|p| match client.proof(p) {
                    Proof::Proved => {
                        proved = true;
                        true
                    }
                    Proof::Unverifiable => true,
                    Proof::Refused(reason) => {
                        shared.metrics.proxy_drop(reason);
                        false
                    }
                })
                .collect();
            (!kept.is_empty()).then(|| (client.clone(), kept, proved))
        }
        // Several NASes behind one address: the first packet whose Message-Authenticator
        // proves an entry's secret decides (the ones before it prove nothing).
        Binding::Nat(candidates) => {
            let found = packets
                .iter()
                .enumerate()
                .find_map(|(i, p)| Some((i, clients::identify(candidates, p)?)));
            let Some((first, client)) = found else {
                for _ in &packets {
                    shared.metrics.proxy_drop("nat_unproven");
                }
                return None;
            };
            for _ in 0..first {
                shared.metrics.proxy_drop("nat_unproven");
            }
            info!(client = %client.name, "NAS behind a shared address identified");
            Some((client, packets[first..].to_vec(), true))
        }
    }
}

/// Ends the request in flight at (`index`, `id`): the one operation that frees its upstream
/// Identifier, takes it off its flow's in-flight count and ends its dedup entry (answered:
/// the reply is cached for retransmissions; given up or moved: forgotten, so the NAS's next
/// retransmission is forwarded anew). Returns the request, and for an answer where to send
/// the reply: to the flow's NAS, even when the flow has ended meanwhile, unless the NAS has
/// moved on to a new request with that Identifier.
#[allow(clippy::type_complexity)]
fn end_request(
    shared: &Shared,
    requests: &mut Requests<FlowRef>,
    flows: &mut [Option<Flow>],
    at: At,
    end: End<'_>,
    now: Instant,
) -> Option<(Pending, Option<(SocketAddr, SocketAddr)>)> {
    let p = requests.take(at, now)?;
    shared.metrics.requests_in_flight.dec();
    let r = p.reply_to;
    let (nas_id, nas_auth) = (p.prepared.nas_id, p.prepared.nas_auth);
    let tag = at;
    let flow = flows
        .get_mut(r.slot as usize)
        .and_then(Option::as_mut)
        .filter(|f| f.generation == r.generation);
    let mut send_to = None;
    match (flow, end) {
        (Some(f), end) => {
            f.in_flight = f.in_flight.saturating_sub(1);
            match end {
                End::Answered(reply) => {
                    if f.dedup
                        .on_reply(nas_id, &nas_auth, reply, now, &shared.dedup)
                    {
                        send_to = Some((f.remote, f.local));
                    } else {
                        // The NAS has moved on to a new request with this Identifier.
                        shared.metrics.proxy_drop("reply_superseded");
                    }
                }
                End::GivenUp | End::Moved => f.dedup.on_give_up(nas_id, &nas_auth, tag),
            }
        }
        // The flow ended (evicted) while this was in flight: its NAS still gets the answer.
        (None, End::Answered(_)) => send_to = Some((r.remote, r.local)),
        (None, End::GivenUp | End::Moved) => {}
    }
    Some((p, send_to))
}

/// A flow's place in a load-balancing pool: the same for every request of the flow.
fn flow_hash(key: &FlowKey) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// A NAS's CoA/Disconnect ACK or NAK: checked with the NAS's secret, re-signed for the
/// upstream that asked, and handed to the CoA listener.
fn on_coa_answer(shared: &Shared, flow: &mut Flow, client: &Client, buf: &mut [u8], n: usize) {
    let Some(id) = buf.get(1).copied() else {
        return;
    };
    let Some(pending) = flow.coa.get(&id) else {
        shared.metrics.coa("answer_unknown_id");
        return;
    };
    match Packet::parse(&buf[..n]) {
        Ok(p) if auth::verify(&p, &client.secret, Some(&pending.sent_auth)).is_ok() => {}
        _ => {
            shared.metrics.coa("answer_bad_signature");
            return;
        }
    }
    let Some(pending) = flow.coa.remove(&id) else {
        return;
    };
    let job = &pending.job;
    let Ok(mut m) = PacketMut::from_datagram(buf, n) else {
        return;
    };
    m.set_identifier(job.origin_id);
    if m.sign(&job.upstream.secret, Some(&job.origin_auth))
        .is_err()
    {
        shared.metrics.coa("malformed");
        return;
    }
    if job
        .answer
        .try_send((m.as_bytes().to_vec(), job.origin))
        .is_err()
    {
        shared.metrics.coa("listener_busy");
    }
}

/// RFC 5176 Error-Cause values the sidecar answers with.
const UNSUPPORTED_SERVICE: u32 = 405;
const RESOURCES_UNAVAILABLE: u32 = 506;

/// Tells the NAS that its request cannot be forwarded (RFC 7930 Protocol-Error, with the
/// Error-Cause and Original-Packet-Code), instead of leaving it to time out. `buf` holds the
/// request as prepared for the upstream: its Proxy-States are echoed, but for ours.
fn protocol_error(
    shared: &Shared,
    client: &Client,
    flow: &Flow,
    buf: &[u8],
    prepared: &proxy::Prepared,
    cause: u32,
    out: &mut Outbox,
) {
    let mut b = [0u8; 1024];
    if let Some(m) = answers::protocol_error(
        &mut b,
        buf,
        prepared,
        &shared.proxy_state,
        cause,
        &client.secret,
    ) {
        let (off, len) = out.keep(m.as_bytes());
        out.nas.push((flow.remote, flow.local, off, len));
        shared.metrics.local_answer("protocol_error");
    }
}

/// `d` plus up to 25 % (RFC 5080 asks for jitter so that retransmissions do not align).
fn jittered(d: Duration) -> Duration {
    use rand::Rng as _;
    d + d.mul_f64(rand::rng().random_range(0.0..0.25))
}

/// RFC 5997: a Status-Server from a NAS is answered by the sidecar itself (never forwarded),
/// with Access-Accept on an authentication listener and Accounting-Response on an
/// accounting one (by the listener's role); one without a valid Message-Authenticator is
/// dropped.
fn answer_status_server(
    shared: &Shared,
    client: &Client,
    request: &[u8],
    (remote, local): (SocketAddr, SocketAddr),
    accounting: bool,
    out: &mut Outbox,
) {
    let mut buf = [0u8; 64];
    match answers::status_server(&mut buf, request, &client.secret, accounting) {
        Ok(m) => {
            let (off, len) = out.keep(m.as_bytes());
            out.nas.push((remote, local, off, len));
            shared.metrics.local_answer("status_server");
        }
        Err(reason) => shared.metrics.proxy_drop(reason),
    }
}

/// Asks the directory about `ip` and tells every worker the outcome.
fn spawn_definition(runtime: &tokio::runtime::Handle, shared: Arc<Shared>, ip: IpAddr) {
    info!(%ip, "defining a dynamic client");
    // Not in a JoinSet: a definition outlives no shutdown wait.
    runtime.spawn(async move {
        let Some(dynamic) = &shared.dynamic else {
            return;
        };
        let outcome = dynamic.define(ip).await;
        match &outcome {
            Ok(c) => {
                info!(%ip, client = %c.name, "dynamic client defined");
                shared.metrics.set_message_authenticator_required(
                    "client",
                    &c.name,
                    c.requires_message_authenticator(),
                );
            }
            Err(reason) => {
                warn!(%ip, %reason, "dynamic client refused");
                if let Some(fp) = &shared.fastpath
                    && let Err(e) = lock(fp).add_negative(ip, dynamic.nak_lifetime)
                {
                    debug!(%ip, error = %e, "no negative entry");
                }
            }
        }
        for inbox in &shared.defined {
            inbox.send(ToWorker::Defined(Defined {
                ip,
                outcome: outcome.clone(),
            }));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_socket_indexes_round_trip() {
        for link in 0..5 {
            for acct in [false, true] {
                for s in 0..requests::MAX_SOCKETS {
                    let socket = port(link, acct) * requests::MAX_SOCKETS + s;
                    assert_eq!(link_of(socket), link);
                    assert_eq!(requests::port_of(socket), port(link, acct));
                }
            }
        }
        let t = token(CHILD, 12345);
        assert_eq!(t >> KIND_SHIFT, CHILD);
        assert_eq!(t & ((1 << KIND_SHIFT) - 1), 12345);
    }
}
