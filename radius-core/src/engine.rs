//! The state machine of one worker, sans-IO: every decision between a datagram read and a
//! datagram sent. A driver (UDP today: `radius-userspace/src/worker.rs`) feeds it events
//! with the time — a datagram from a wildcard, a child or an upstream socket, a finished
//! definition, a CoA job, a timeout — and asks what to send ([`Engine::poll_transmits`])
//! and when to wake it next ([`Engine::poll_timeout`]), in the manner of quinn-proto's
//! `handle` / `poll_transmit` / `poll_timeout`; its randomness ([`Random`]) can be fixed
//! for tests. The few things that need the driver at
//! once (a child socket for a flow that proved its source, another upstream socket when 256
//! requests are in flight, a directory look-up) go through [`Io`].
//!
//! A flow is made only for packets that pass their client's signature, or carry none to
//! check; until one of its requests proves the client's secret it is *provisional* (see
//! [`crate::admission`]): it has no socket, a bounded share of `max_flows`, a short idle
//! lifetime, and is evicted least recently seen first. A request goes through dedup
//! (RFC 5080), the pool (EAP State stickiness), [`crate::proxy`], an Identifier of the
//! request table, and ends in exactly one place, `end_request`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use radius_common::FlowKey;
use tracing::{debug, info, warn};

use crate::{
    admission::Provisional,
    answers,
    client::{self as clients, Binding, Client, ClientTable, Proof},
    coa::{self, CoaJob, FlowHandle, NasDirectory, NasName},
    codec::{self, Code, Packet, PacketMut, attr, auth, dict::Dictionary},
    counters::{Count, Counters, Latencies, Refusal, Via},
    dedup::{DedupTimers, Verdict},
    dynamic::{Dynamic, Resolution},
    flows::{Flow, FlowRef, FlowTable, PendingCoa, flow_key},
    pending::{Kept, PendingSources},
    pool::{EapStates, Pool},
    proxy::{self, InFlight},
    realm::Realms,
    requests::{self, Allocation, At, Requests},
    upstream::{self, Upstream},
};

/// How often the engine looks at timeouts, idle flows and expiries.
pub const TICK: Duration = Duration::from_millis(100);
/// The longest a worker waits at shutdown for answers to requests in flight.
pub const DRAIN: Duration = Duration::from_secs(3);
/// How long a NAS has to answer a CoA or Disconnect request.
pub const COA_TIMEOUT: Duration = Duration::from_secs(10);

/// RFC 5176 Error-Cause values the sidecar answers with.
const UNSUPPORTED_SERVICE: u32 = 405;
const RESOURCES_UNAVAILABLE: u32 = 506;

/// What every worker's engine shares: read-mostly (per packet, only counters are touched).
/// A reload makes a new one ([`Common::reloaded`]) and hands it to every engine
/// ([`Engine::handle_reload`]); what must outlive a reload (the tables and the bounds'
/// counts) is behind an `Arc` the new one shares.
pub struct Common {
    pub clients: ClientTable,
    pub dynamic: Option<Arc<Dynamic>>,
    /// Which flow carries which NAS (for CoA).
    pub nas_directory: Arc<NasDirectory<FlowHandle>>,
    /// Which server an EAP conversation is on (load-balancing pools).
    pub eap_states: Arc<EapStates>,
    /// Packets kept, in all workers, while their sources are being defined.
    pub pending_packets: Arc<AtomicUsize>,
    /// Every upstream this process has known, by link (an index every worker's sockets to
    /// it are named by). Links are never reused: a reload that changes an upstream's
    /// address or secret gives it a new link, and the old one lives on for the requests
    /// it has in flight.
    pub upstreams: Vec<Arc<Upstream>>,
    /// The link of each configured upstream, by name (the links missing here are retired).
    pub upstream_index: HashMap<String, usize>,
    /// The Proxy-State this sidecar adds (random per start, RFC 2865 5.33).
    pub proxy_state: [u8; 8],
    /// Flows with a child socket (proved ones), in all workers, and their bound.
    pub active: Arc<AtomicUsize>,
    pub max_flows: usize,
    /// Flows that have not proved themselves, in all workers, and their bound.
    pub provisional_flows: Arc<AtomicUsize>,
    pub max_provisional: usize,
    pub idle_timeout: Duration,
    pub provisional_idle: Duration,
    pub dedup: DedupTimers,
    pub counters: Arc<dyn Counters>,
    /// Attribute names for debug logs (the built-in dictionary, or FreeRADIUS's).
    pub dictionary: Arc<Dictionary>,
    /// Where requests go by the realm of their User-Name; None: by their client only.
    pub realms: Option<Arc<Realms>>,
}

/// What a reload replaces: the configuration's clients, directory, upstreams and timers.
pub struct Settings {
    pub clients: ClientTable,
    pub dynamic: Option<Arc<Dynamic>>,
    /// In the configuration's order; an upstream whose settings did not change is the
    /// running one's `Arc` (the configuration reuses it), which keeps its link and health.
    pub upstreams: Vec<Arc<Upstream>>,
    pub idle_timeout: Duration,
    pub provisional_idle: Duration,
    pub dedup: DedupTimers,
    pub dictionary: Arc<Dictionary>,
    pub realms: Option<Arc<Realms>>,
}

impl Common {
    /// What every engine shares after a reload to `s`: the new settings, and this one's
    /// tables, counts, bounds and links (new upstreams get new links).
    pub fn reloaded(&self, s: Settings) -> Common {
        // A client written again keeps what its `auto` switches learnt (BlastRADIUS).
        for c in s.clients.iter() {
            if let Some(old) = self
                .clients
                .iter()
                .find(|o| o.name == c.name && o.prefix == c.prefix)
            {
                c.learned.adopt(&old.learned);
            }
        }
        let mut upstreams = self.upstreams.clone();
        let mut upstream_index = HashMap::new();
        for u in s.upstreams {
            let link = match upstreams.iter().position(|l| Arc::ptr_eq(l, &u)) {
                Some(link) => link,
                None => {
                    upstreams.push(u.clone());
                    upstreams.len() - 1
                }
            };
            upstream_index.insert(u.name.clone(), link);
        }
        Common {
            clients: s.clients,
            dynamic: s.dynamic,
            nas_directory: self.nas_directory.clone(),
            eap_states: self.eap_states.clone(),
            pending_packets: self.pending_packets.clone(),
            upstreams,
            upstream_index,
            proxy_state: self.proxy_state,
            active: self.active.clone(),
            max_flows: self.max_flows,
            provisional_flows: self.provisional_flows.clone(),
            max_provisional: self.max_provisional,
            idle_timeout: s.idle_timeout,
            provisional_idle: s.provisional_idle,
            dedup: s.dedup,
            counters: self.counters.clone(),
            dictionary: s.dictionary,
            realms: s.realms,
        }
    }

    /// Whether link `link` is an upstream of the configuration (not retired by a reload).
    pub fn is_configured(&self, link: usize) -> bool {
        self.upstreams
            .get(link)
            .is_some_and(|u| self.upstream_index.get(&u.name) == Some(&link))
    }
}

/// One worker's part of `radius-sidecar status`.
#[derive(Clone, Debug, Default)]
pub struct EngineStatus {
    /// Flows by client name.
    pub flows: std::collections::BTreeMap<String, FlowCount>,
    /// Requests in flight upstream, by link (see [`Common::upstreams`]).
    pub in_flight_by_link: Vec<usize>,
    /// Flows whose packets wait for their source's definition.
    pub pending_flows: usize,
}

/// A client's flows in one worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCount {
    pub proved: usize,
    pub provisional: usize,
    /// Their requests in flight upstream.
    pub in_flight: usize,
}

/// What the engine needs from its driver at once.
pub trait Io {
    /// Gives flow `slot` its own socket (bound to the flow's addresses, registered with
    /// steer on the fast path).
    fn open_child(&mut self, slot: usize, flow: &Flow) -> Result<(), Refusal>;
    /// Closes flow `slot`'s socket (unregistered from steer first, so later packets reach
    /// the wildcard) and hands back, in `drained`, what it still held: (source, datagram).
    fn close_child(&mut self, slot: usize, flow: &Flow, drained: &mut Vec<(SocketAddr, Vec<u8>)>);
    /// Opens upstream socket `socket` (an index of [`Requests`]), connected to `to`.
    fn open_upstream(&mut self, socket: usize, to: SocketAddr) -> std::io::Result<()>;
    fn close_upstream(&mut self, socket: usize);
    /// Starts the definition of dynamic source `ip`; its outcome comes back through
    /// [`Engine::handle_defined`] (of every worker).
    fn define(&mut self, ip: IpAddr);
    /// The connection from `remote` to `local` negotiated RADIUS/1.1 (RFC 9765): its TLS
    /// handshake, done before any of its packets is read, authenticated it, and its
    /// packets carry a Token and no signature.
    fn speaks_v11(&self, _remote: SocketAddr, _local: SocketAddr) -> bool {
        false
    }
    /// Writes an Accounting-Request that no server of `pool` answers to the spool, as
    /// durably as configured, before its NAS is answered: `packet` is prepared for
    /// `upstream` (without our Proxy-State) and arrived `age` ago. False when the spool
    /// refuses it (none configured, full, a write error): the NAS is then not answered.
    fn spool(&mut self, _pool: &str, _upstream: &str, _packet: &[u8], _age: Duration) -> bool {
        false
    }
}

/// What a round sends: requests on their upstream sockets, datagrams to NASes from the
/// address and port each NAS sent to. One buffer, so the driver can send each group in one
/// `sendmmsg`.
#[derive(Debug, Default)]
pub struct Transmits {
    bytes: Vec<u8>,
    /// (socket and Identifier, offset, length)
    pub upstream: Vec<(At, usize, usize)>,
    /// (NAS, the address it sent to, offset, length)
    pub nas: Vec<(SocketAddr, SocketAddr, usize, usize)>,
}

impl Transmits {
    fn keep(&mut self, data: &[u8]) -> (usize, usize) {
        let off = self.bytes.len();
        self.bytes.extend_from_slice(data);
        (off, data.len())
    }

    fn send_upstream(&mut self, at: At, data: &[u8]) {
        let (off, len) = self.keep(data);
        self.upstream.push((at, off, len));
    }

    fn send_nas(&mut self, remote: SocketAddr, local: SocketAddr, data: &[u8]) {
        let (off, len) = self.keep(data);
        self.nas.push((remote, local, off, len));
    }

    pub fn data(&self, off: usize, len: usize) -> &[u8] {
        &self.bytes[off..off + len]
    }

    pub fn is_empty(&self) -> bool {
        self.upstream.is_empty() && self.nas.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.upstream.clear();
        self.nas.clear();
    }
}

/// How a request in flight upstream ends (see `end_request`).
enum End<'a> {
    /// The upstream answered; this is the reply, finished for the NAS.
    Answered(&'a [u8]),
    /// No answer in time, or a send the kernel refused: a NAS retransmission goes anew.
    GivenUp,
    /// Taken off this upstream to go to another server of the pool (failover).
    Moved,
}

type Pending = InFlight<FlowRef>;

/// Where a reply goes: the NAS, and the address it sent to.
type SendTo = (SocketAddr, SocketAddr);

/// A datagram kept while its source is being defined (see [`PendingSources`]).
struct Arrived {
    remote: SocketAddr,
    local: SocketAddr,
    data: Vec<u8>,
}

/// Where a request is served from: its realm's pool (None: its client's), and the part of
/// its User-Name left when the realm is stripped.
#[derive(Clone, Debug, Default)]
struct Route {
    pool: Option<Arc<Pool>>,
    user_name: Option<std::ops::Range<usize>>,
    /// Accounting replicas the request is copied to (see `Realm::acct_replicas`).
    replicas: Option<Arc<[Arc<Pool>]>>,
    /// This is such a copy.
    replica: bool,
}

impl Route {
    fn pool<'a>(&'a self, client: &'a Client) -> &'a Arc<Pool> {
        self.pool.as_ref().unwrap_or(&client.pool)
    }
}

/// What the realms make of a request.
enum Routing {
    Forward(Route),
    /// Answered here: an Access-Reject (with this Reply-Message), or an
    /// Accounting-Response.
    Answer(Option<String>),
    Drop(&'static str),
}

/// The realm of the request in `packet`'s User-Name decides where it goes (see
/// `realm.rs`); without realms, a realm that matches, or a User-Name, it goes to its
/// client's pool (its accounting pool for Accounting-Requests, when it has one).
fn route_request(realms: Option<&Realms>, client: &Client, packet: &[u8]) -> Routing {
    // Accounting goes to the client's accounting pool when it has one.
    let acct = packet.first() == Some(&(Code::AccountingRequest as u8));
    let by_client = || {
        Routing::Forward(Route {
            pool: client.acct_pool.clone().filter(|_| acct),
            replicas: (acct && !client.acct_replicas.is_empty())
                .then(|| client.acct_replicas.clone()),
            ..Route::default()
        })
    };
    let Some(realms) = realms else {
        return by_client();
    };
    let Ok(p) = Packet::parse_v11(packet) else {
        return by_client();
    };
    if !matches!(p.code(), Code::AccessRequest | Code::AccountingRequest) {
        return by_client();
    }
    let Some(name) = p.get(attr::USER_NAME) else {
        return by_client();
    };
    let Some(routed) = realms.route(name.value) else {
        return by_client();
    };
    let realm = routed.realm;
    let pool = if acct { &realm.acct } else { &realm.auth };
    match pool {
        Some(pool) => {
            let at = name.offset + 2;
            let whole = routed.user.len() == name.value.len();
            // EAP servers hold User-Name to the EAP identity, which keeps its realm
            // (FreeRADIUS rejects the conversation otherwise): only other requests are
            // stripped.
            let eap = p.get(attr::EAP_MESSAGE).is_some();
            Routing::Forward(Route {
                pool: Some(pool.clone()),
                user_name: (realm.strip && !whole && !eap)
                    .then(|| at + routed.user.start..at + routed.user.end),
                replicas: (acct && !realm.acct_replicas.is_empty())
                    .then(|| realm.acct_replicas.clone()),
                replica: false,
            })
        }
        None if acct && realm.answer_accounting => Routing::Answer(None),
        None if acct => Routing::Drop("realm_no_accounting"),
        None => Routing::Answer(realm.reject_message.clone()),
    }
}

/// At debug level: `packet` by its attribute names, with its client and flow.
fn debug_packet(
    dict: &Dictionary,
    what: &'static str,
    client: &str,
    remote: SocketAddr,
    packet: &[u8],
) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    if let Ok(p) = Packet::parse_v11(packet) {
        let dump = codec::dump::Dump { packet: &p, dict };
        debug!(client, flow = %remote, "{what}: {dump}");
    }
}

/// The request table's port of upstream `link`: `2 * link` (auth), `2 * link + 1` (acct).
pub fn port(link: usize, acct: bool) -> usize {
    link * 2 + usize::from(acct)
}

/// The upstream link of a socket index.
pub fn link_of(socket: usize) -> usize {
    requests::port_of(socket) / 2
}

/// The engine's randomness, replaceable so tests can fix it.
pub struct Random {
    /// Draws a retransmission delay from the configured one.
    pub jitter: Box<dyn FnMut(Duration) -> Duration + Send>,
    /// Fills a new Request Authenticator of an Access-Request sent upstream.
    pub authenticator: Box<dyn FnMut() -> [u8; 16] + Send>,
}

impl Default for Random {
    /// Up to 25 % of jitter (RFC 5080 asks for some, so that retransmissions do not align),
    /// and authenticators from the thread's CSPRNG.
    fn default() -> Self {
        Self {
            jitter: Box::new(|d| {
                use rand::Rng as _;
                d + d.mul_f64(rand::rng().random_range(0.0..0.25))
            }),
            authenticator: Box::new(auth::random_authenticator),
        }
    }
}

/// One worker's state machine.
pub struct Engine {
    common: Arc<Common>,
    /// This worker's place among the workers (for the NAS directory).
    worker: usize,
    /// An accounting listener: Status-Server gets an Accounting-Response.
    accounting: bool,
    flows: FlowTable,
    /// Packets of sources being defined, per flow in arrival order.
    pending: PendingSources<FlowKey, Arrived>,
    /// This worker's flows that have not proved themselves, least recently seen first.
    provisional: Provisional<usize>,
    /// Requests in flight upstream: Identifier spaces and timers.
    requests: Requests<FlowRef>,
    /// Datagrams drained from closing children, handled as wildcard ones.
    requeue: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
    /// The buffer a request or a reply is edited in.
    buf: Vec<u8>,
    out: Transmits,
    ticks: u64,
    /// The dedup entries last reported (`Count::DedupEntries`).
    dedup_reported: usize,
    next_tick: Instant,
    drain_until: Option<Instant>,
    random: Random,
    /// Per upstream link: its connections negotiated RADIUS/1.1 (the driver says, after
    /// each handshake), and the Token counter of requests to such upstreams.
    upstream_v11: Vec<bool>,
    next_token: u32,
    /// Links (see [`Common::upstreams`]) this engine has opened sockets to.
    links_open: usize,
    /// How long each link's answers took since the driver last took them.
    latencies: Vec<Latencies>,
}

impl Engine {
    /// A worker's engine; `worker` is its index in the daemon's list of workers.
    pub fn new(common: Arc<Common>, worker: usize, accounting: bool, now: Instant) -> Self {
        let pending = match &common.dynamic {
            Some(d) => PendingSources::new(d.max_pending_per_flow, d.max_pending_packets),
            None => PendingSources::new(1, 1),
        };
        Self {
            common,
            worker,
            accounting,
            flows: FlowTable::default(),
            pending,
            provisional: Provisional::default(),
            requests: Requests::default(),
            requeue: Vec::new(),
            buf: vec![0u8; codec::MAX_PACKET_LEN],
            out: Transmits::default(),
            ticks: 0,
            dedup_reported: 0,
            next_tick: now + TICK,
            drain_until: None,
            random: Random::default(),
            upstream_v11: Vec::new(),
            next_token: 0,
            links_open: 0,
            latencies: Vec::new(),
        }
    }

    /// Whether upstream socket `socket`'s link speaks RADIUS/1.1.
    pub fn upstream_speaks_v11(&self, socket: usize) -> bool {
        self.upstream_v11
            .get(link_of(socket))
            .copied()
            .unwrap_or(false)
    }

    /// A connection behind upstream socket `socket` finished its TLS handshake, with
    /// RADIUS/1.1 negotiated or not. When that is not what its link spoke so far, its
    /// requests in flight are prepared again (the driver drops what it held of them);
    /// true then.
    pub fn handle_upstream_version(
        &mut self,
        now: Instant,
        socket: usize,
        v11: bool,
        io: &mut dyn Io,
    ) -> bool {
        let link = link_of(socket);
        if self.upstream_speaks_v11(socket) == v11 {
            return false;
        }
        if self.upstream_v11.len() <= link {
            self.upstream_v11.resize(link + 1, false);
        }
        self.upstream_v11[link] = v11;
        info!(
            upstream = self
                .common
                .upstreams
                .get(link)
                .map_or("", |u| u.name.as_str()),
            protocol = if v11 { "radius/1.1" } else { "radius/1.0" },
            "upstream protocol negotiated"
        );
        self.send_anew(now, socket, "protocol_changed", io);
        true
    }

    /// What this engine holds now, for `radius-sidecar status`.
    pub fn status(&self) -> EngineStatus {
        let mut st = EngineStatus::default();
        for (_, f) in self.flows.iter() {
            let c = st.flows.entry(f.client.name.clone()).or_default();
            if f.proved {
                c.proved += 1;
            } else {
                c.provisional += 1;
            }
            c.in_flight += f.in_flight as usize;
        }
        for link in 0..self.links_open {
            let first = port(link, false) * requests::MAX_SOCKETS;
            let n = (first..first + 2 * requests::MAX_SOCKETS)
                .map(|s| self.requests.in_flight_on(s))
                .sum();
            st.in_flight_by_link.push(n);
        }
        st.pending_flows = self.pending.len();
        st
    }

    /// Replaces the engine's randomness (tests fix it).
    pub fn set_random(&mut self, random: Random) {
        self.random = random;
    }

    /// Opens the first socket to each upstream port (more come when 256 are in flight).
    pub fn start(&mut self, now: Instant, io: &mut dyn Io) -> std::io::Result<()> {
        self.open_links(now, io)
    }

    /// Opens the first sockets of the links this engine has none to yet.
    fn open_links(&mut self, now: Instant, io: &mut dyn Io) -> std::io::Result<()> {
        let common = self.common.clone();
        for (li, u) in common.upstreams.iter().enumerate().skip(self.links_open) {
            for (acct, to) in [(false, Some(u.auth)), (true, u.acct)] {
                let Some(to) = to else { continue };
                let socket = port(li, acct) * requests::MAX_SOCKETS;
                io.open_upstream(socket, to)?;
                self.requests.add_socket(socket, u.stream, now);
            }
            self.links_open = li + 1;
        }
        Ok(())
    }

    /// A reload: from now on `common`'s clients, directory, upstreams and timers. A flow
    /// whose client is still configured (by name, for the flow's address) goes on with the
    /// new entry; one whose client left ends, once its requests in flight are answered.
    /// Flows of dynamic clients keep their definition until they end. New upstreams get
    /// their sockets; retired ones keep theirs for the requests they have in flight.
    pub fn handle_reload(&mut self, now: Instant, common: Arc<Common>, io: &mut dyn Io) {
        let old = std::mem::replace(&mut self.common, common);
        if let Err(e) = self.open_links(now, io) {
            warn!(error = %e, "reload: cannot open a socket to a new upstream");
        }
        let mut ending = Vec::new();
        let slots: Vec<usize> = self.flows.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            let Some(flow) = self.flows.get_mut(slot) else {
                continue;
            };
            if !old.clients.iter().any(|c| Arc::ptr_eq(c, &flow.client)) {
                continue; // a dynamic client's definition
            }
            let same = |c: &&Arc<Client>| c.name == flow.client.name;
            let now_configured = match self.common.clients.binding(flow.remote.ip()) {
                Some(Binding::One(c)) => Some(c).filter(|c| same(&c)),
                Some(Binding::Nat(list)) => list.iter().find(same).cloned(),
                None => None,
            };
            match now_configured {
                Some(c) => flow.client = c,
                None => {
                    flow.retiring = true;
                    if flow.in_flight == 0 {
                        ending.push(slot);
                    }
                }
            }
        }
        for slot in ending {
            self.end_flow(slot, io);
        }
        self.handle_requeued(now, io);
    }

    fn count(&self, c: Count) {
        self.common.counters.count(c);
    }

    /// A datagram that reached the wildcard (or was handed back): a known flow's is
    /// injected, a new flow's creates the flow, an unknown source's waits for its
    /// definition.
    pub fn handle_wildcard(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        data: &[u8],
        io: &mut dyn Io,
    ) {
        self.on_packet(now, remote, local, data, io);
        self.handle_requeued(now, io);
    }

    /// A datagram read from flow `slot`'s child socket.
    pub fn handle_child(&mut self, now: Instant, slot: usize, data: &[u8], io: &mut dyn Io) {
        self.count(Count::Packet(Via::Child));
        let n = self.take_request(data);
        self.on_request(now, slot, n, io);
        self.handle_requeued(now, io);
    }

    /// A stream transport's connection from `remote` to `local` closed: its flow ends
    /// (requests in flight are still answered, to nowhere: the driver drops what it can no
    /// longer send). Nothing happens when it had no flow.
    pub fn handle_closed(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        io: &mut dyn Io,
    ) {
        if let Some(slot) = self.flows.find(&flow_key(remote, local)) {
            self.end_flow(slot, io);
        }
        self.handle_requeued(now, io);
    }

    /// Where flow `slot`'s NAS is, and the address it sends to.
    pub fn flow_addresses(&self, slot: usize) -> Option<(SocketAddr, SocketAddr)> {
        self.flows.get(slot).map(|f| (f.remote, f.local))
    }

    pub fn flows(&self) -> &FlowTable {
        &self.flows
    }

    fn take_request(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&data[..n]);
        n
    }

    fn on_packet(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        data: &[u8],
        io: &mut dyn Io,
    ) {
        let key = flow_key(remote, local);
        if let Some(slot) = self.flows.find(&key) {
            self.inject(now, slot, data, io);
            return;
        }
        if self.pending.contains(&key) {
            self.keep_pending(now, key, remote, local, data);
            return;
        }
        let common = self.common.clone();
        if let Some(binding) = common.clients.binding(remote.ip()) {
            self.create_flow(now, remote, local, binding, vec![data.to_vec()], io);
            return;
        }
        let Some(dynamic) = &common.dynamic else {
            self.count(Count::Refused(Refusal::UnknownClient));
            debug!(%remote, "no client for this source: dropped");
            return;
        };
        match dynamic.resolve(remote.ip(), now) {
            Resolution::Client(client) => self.create_flow(
                now,
                remote,
                local,
                Binding::One(client),
                vec![data.to_vec()],
                io,
            ),
            Resolution::Refused => self.count(Count::Refused(Refusal::DirectoryRefused)),
            Resolution::NotDynamic => {
                self.count(Count::Refused(Refusal::UnknownClient));
                debug!(%remote, "no client for this source: dropped");
            }
            Resolution::Defining { start } => {
                self.keep_pending(now, key, remote, local, data);
                if start {
                    io.define(remote.ip());
                }
            }
        }
    }

    /// A packet for a known flow that came through the wildcard: handled as if its child
    /// had read it.
    fn inject(&mut self, now: Instant, slot: usize, data: &[u8], io: &mut dyn Io) {
        self.count(Count::Packet(Via::Wildcard));
        let n = self.take_request(data);
        self.on_request(now, slot, n, io);
    }

    /// A definition finished: make the flows that waited for it and inject their packets in
    /// arrival order; or drop them, counted, on a refusal.
    pub fn handle_defined(
        &mut self,
        now: Instant,
        ip: IpAddr,
        outcome: &Result<Arc<Client>, String>,
        io: &mut dyn Io,
    ) {
        let common = self.common.clone();
        for (_, packets) in self.pending.take_source(ip, &common.pending_packets) {
            let Some(first) = packets.first() else {
                continue;
            };
            let (remote, local) = (first.remote, first.local);
            match outcome {
                Ok(client) => self.create_flow(
                    now,
                    remote,
                    local,
                    Binding::One(client.clone()),
                    packets.into_iter().map(|a| a.data).collect(),
                    io,
                ),
                Err(_) => {
                    for _ in &packets {
                        self.count(Count::Refused(Refusal::DirectoryRefused));
                    }
                }
            }
        }
        self.handle_requeued(now, io);
    }

    /// Keeps a packet of a source being defined, within the per-flow and global bounds.
    fn keep_pending(
        &mut self,
        now: Instant,
        key: FlowKey,
        remote: SocketAddr,
        local: SocketAddr,
        data: &[u8],
    ) {
        let arrived = Arrived {
            remote,
            local,
            data: data.to_vec(),
        };
        let kept = self
            .pending
            .keep(key, remote.ip(), arrived, now, &self.common.pending_packets);
        if kept != Kept::Kept {
            self.count(Count::Refused(Refusal::PendingFull));
        }
    }

    /// Makes a flow for packets that passed [`screen`], and handles them in order. A flow
    /// that proved its source gets its child socket at once; a provisional one has none
    /// (its packets keep reaching the wildcard, its replies leave from it as every reply
    /// does) until it proves itself, so spoofed sources cost no socket and no place in
    /// `max_flows`.
    fn create_flow(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        binding: Binding,
        packets: Vec<Vec<u8>>,
        io: &mut dyn Io,
    ) {
        let common = self.common.clone();
        // A RADIUS/1.1 connection was authenticated by its handshake; its packets carry no
        // signature to screen.
        let v11 = io.speaks_v11(remote, local);
        let screened = match (&binding, v11) {
            (Binding::One(client), true) => Some((client.clone(), packets, true)),
            _ => screen(&*common.counters, &binding, packets),
        };
        let Some((client, packets, proved)) = screened else {
            debug!(%remote, "no flow for packets that prove nothing of their source");
            return;
        };
        if proved {
            if !reserve(&common.active, common.max_flows) {
                self.count(Count::Refused(Refusal::MaxFlows));
                debug!(%remote, "max_flows reached: packet of a new flow dropped");
                return;
            }
        } else {
            // At their bound, the provisional flow of this worker seen least recently
            // makes room; a proved flow never does.
            while !reserve(&common.provisional_flows, common.max_provisional) {
                if !self.evict_oldest_provisional(io) {
                    self.count(Count::Refused(Refusal::ProvisionalFull));
                    debug!(%remote, "provisional flows at their bound: packet of a new flow dropped");
                    return;
                }
            }
        }
        let mut flow = Flow::new(remote, local, client, proved, now);
        flow.v11 = v11;
        let slot = self.flows.insert(flow);
        if proved {
            if let Err(why) = self.open_child(slot, io) {
                self.flows.remove(slot);
                common.active.fetch_sub(1, Ordering::AcqRel);
                self.count(Count::Refused(why));
                return;
            }
        } else {
            self.provisional.insert(slot, now);
        }
        self.count(Count::FlowCreated { proved });
        debug!(%remote, %local, proved, "flow created");
        for data in packets {
            self.inject(now, slot, &data, io);
        }
    }

    /// Every packet waiting for a definition, as it arrived (remote, local, bytes), taken
    /// out: this process hands them to the one that upgrades it, which reads them as if
    /// from the wildcard.
    pub fn take_pending(&mut self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        let waiting = self.common.pending_packets.clone();
        self.pending
            .take_all(&waiting)
            .into_iter()
            .flat_map(|(_, packets)| packets)
            .map(|a| (a.remote, a.local, a.data))
            .collect()
    }

    /// A proved flow taken over from the process this one upgraded (`radius-sidecar
    /// upgrade`): the driver holds its socket already and hands it through
    /// `Io::open_child`. Its client is the one named `client` for its address, configured
    /// or defined (the definitions came over first). Nothing is made, and false returned,
    /// when no such client is there any longer or at `max_flows`: the flow is then made
    /// anew from its next packet, as any other. Its dedup state starts empty: a NAS's
    /// retransmission of a request the old process had in flight is forwarded again.
    pub fn adopt_flow(
        &mut self,
        now: Instant,
        remote: SocketAddr,
        local: SocketAddr,
        client: &str,
        io: &mut dyn Io,
    ) -> bool {
        let common = self.common.clone();
        let named = |c: &&Arc<Client>| c.name == client;
        let found = match common.clients.binding(remote.ip()) {
            Some(Binding::One(c)) => Some(c).filter(|c| named(&c)),
            Some(Binding::Nat(list)) => list.iter().find(named).cloned(),
            None => common
                .dynamic
                .as_ref()
                .and_then(|d| d.defined(remote.ip(), now))
                .filter(|c| named(&c)),
        };
        let Some(client) = found else {
            debug!(%remote, client, "not adopted: no such client for its address now");
            return false;
        };
        if self.flows.find(&flow_key(remote, local)).is_some()
            || !reserve(&common.active, common.max_flows)
        {
            return false;
        }
        let slot = self
            .flows
            .insert(Flow::new(remote, local, client, true, now));
        if let Err(why) = self.open_child(slot, io) {
            self.flows.remove(slot);
            common.active.fetch_sub(1, Ordering::AcqRel);
            self.count(Count::Refused(why));
            return false;
        }
        self.count(Count::FlowAdopted);
        true
    }

    fn open_child(&mut self, slot: usize, io: &mut dyn Io) -> Result<(), Refusal> {
        let flow = self.flows.get_mut(slot).ok_or(Refusal::ChildSocket)?;
        io.open_child(slot, flow)?;
        flow.has_child = true;
        Ok(())
    }

    /// Provisional flow `slot` has proved its source: it gets its child socket and a place
    /// in `max_flows`, and is never evicted from now on. With no place or no socket it
    /// stays provisional (and is served from the wildcard).
    fn promote(&mut self, slot: usize, io: &mut dyn Io) {
        let common = self.common.clone();
        if !reserve(&common.active, common.max_flows) {
            self.count(Count::Refused(Refusal::MaxFlows));
            return;
        }
        if let Err(why) = self.open_child(slot, io) {
            common.active.fetch_sub(1, Ordering::AcqRel);
            self.count(Count::Refused(why));
            return;
        }
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        // Its NAS names (for CoA) are registered again, as a proved flow's.
        flow.proved = true;
        flow.named = false;
        debug!(remote = %flow.remote, client = %flow.client.name, "flow proved");
        self.provisional.remove(slot);
        common.provisional_flows.fetch_sub(1, Ordering::AcqRel);
        self.count(Count::FlowProved);
    }

    /// The request of flow `slot` in `buf[..n]`: a retransmission is answered from the
    /// cache or followed upstream (RFC 5080), a Status-Server answered here (RFC 5997), and
    /// anything else prepared for its client's upstream, given an Identifier of one of this
    /// worker's sockets to it, signed and queued.
    fn on_request(&mut self, now: Instant, slot: usize, n: usize, io: &mut dyn Io) {
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        flow.last_seen = now;
        if !flow.proved {
            if flow.client.proof(&self.buf[..n]) == Proof::Proved {
                self.promote(slot, io);
            } else {
                self.provisional.touch(slot, now);
            }
        }
        let common = &*self.common;
        let Some(flow) = self.flows.get_mut(slot) else {
            return;
        };
        let client = flow.client.clone();
        debug_packet(
            &common.dictionary,
            "from the NAS",
            &client.name,
            flow.remote,
            &self.buf[..n],
        );
        if n < codec::HEADER_LEN {
            common.counters.count(Count::Dropped("malformed"));
            return;
        }
        let (code, mut id) = (self.buf[0], self.buf[1]);
        let mut nas_auth = [0u8; 16];
        nas_auth.copy_from_slice(&self.buf[4..20]);
        if flow.v11 {
            // RADIUS/1.1: the Token is the request's key (its last byte for the
            // Identifier-indexed dedup); Reserved-2 is ignored.
            id = nas_auth[3];
            nas_auth[4..].fill(0);
            if code == Code::StatusServer as u8 {
                let reply = if self.accounting {
                    Code::AccountingResponse
                } else {
                    Code::AccessAccept
                };
                let mut b = [0u8; codec::HEADER_LEN];
                b[0] = reply as u8;
                b[3] = codec::HEADER_LEN as u8;
                b[4..20].copy_from_slice(&nas_auth);
                self.out.send_nas(flow.remote, flow.local, &b);
                common.counters.count(Count::LocalAnswer("status_server"));
                return;
            }
            if Code::from_u8(code).is_some_and(|c| {
                matches!(
                    c,
                    Code::CoaAck | Code::CoaNak | Code::DisconnectAck | Code::DisconnectNak
                )
            }) {
                // CoA is not relayed through RADIUS/1.1 flows yet.
                common.counters.count(Count::Dropped("coa_over_radius_1_1"));
                return;
            }
        }
        if code == Code::StatusServer as u8 {
            let mut b = [0u8; 64];
            match answers::status_server(&mut b, &self.buf[..n], &client.secret, self.accounting) {
                Ok(m) => {
                    self.out.send_nas(flow.remote, flow.local, m.as_bytes());
                    common.counters.count(Count::LocalAnswer("status_server"));
                }
                Err(reason) => common.counters.count(Count::Dropped(reason)),
            }
            return;
        }
        if matches!(
            Code::from_u8(code),
            Some(Code::CoaAck | Code::CoaNak | Code::DisconnectAck | Code::DisconnectNak)
        ) {
            on_coa_answer(&*common.counters, flow, &client, &mut self.buf, n);
            return;
        }
        let route = match route_request(common.realms.as_deref(), &client, &self.buf[..n]) {
            Routing::Forward(route) => route,
            Routing::Drop(reason) => {
                common.counters.count(Count::Dropped(reason));
                return;
            }
            Routing::Answer(message) => {
                if flow.v11 {
                    common
                        .counters
                        .count(Count::Dropped("realm_answer_over_radius_1_1"));
                    return;
                }
                let mut out = [0u8; codec::MAX_PACKET_LEN];
                let signed = client.requires_message_authenticator();
                match answers::realm_answer(
                    &mut out,
                    &self.buf[..n],
                    &client.secret,
                    signed,
                    message.as_deref(),
                ) {
                    Ok(m) => {
                        let what = if code == Code::AccountingRequest as u8 {
                            "realm_accounting"
                        } else {
                            "realm_reject"
                        };
                        self.out.send_nas(flow.remote, flow.local, m.as_bytes());
                        common.counters.count(Count::LocalAnswer(what));
                    }
                    Err(reason) => common.counters.count(Count::Dropped(reason)),
                }
                return;
            }
        };
        if !flow.named {
            // Once per flow: where a CoA for this NAS must go. (Reading names only: the
            // lenient parse, for RADIUS/1.1 flows too; the request is verified later.)
            if let Ok(p) = Packet::parse_v11(&self.buf[..n]) {
                common.nas_directory.register(
                    NasName::of(&p),
                    FlowHandle {
                        worker: self.worker,
                        key: flow.key,
                    },
                    flow.proved,
                );
            }
            flow.named = true;
        }
        match flow.dedup.check(id, &nas_auth, now, &common.dedup) {
            Verdict::New if flow.retiring => {
                common.counters.count(Count::Dropped("client_removed"));
                return;
            }
            Verdict::New => {}
            Verdict::Cached(reply) => {
                common
                    .counters
                    .count(Count::LocalAnswer("duplicate_cached"));
                self.out.send_nas(flow.remote, flow.local, reply);
                return;
            }
            Verdict::InFlight { resend, tag } => {
                common.counters.count(Count::Dropped("duplicate_in_flight"));
                if resend {
                    // The NAS retransmits: follow it upstream (once a second at most)
                    // rather than sending a second request; to another server when this
                    // one has gone quiet.
                    self.resend(tag, now, "nas_retransmission", io);
                }
                return;
            }
        }
        let hash = flow.hash;
        let pool = route.pool(&client);
        // The next step of an EAP conversation goes to the server that sent its State.
        let sticky = pool
            .spreads()
            .then(|| {
                Packet::parse_v11(&self.buf[..n])
                    .ok()?
                    .get(attr::STATE)
                    .map(|a| a.value.to_vec())
            })
            .flatten()
            .and_then(|st| common.eap_states.server_of(&st, now))
            .and_then(|name| pool.usable(&name).cloned());
        let Some(upstream) = sticky.or_else(|| pool.pick(hash, None).cloned()) else {
            return;
        };
        let mut route = route;
        let Some(replicas) = route.replicas.take() else {
            self.forward_or_spool(now, slot, &client, route, &upstream, n, io);
            return;
        };
        // Accounting copied to its replicas: the NAS's request as it came, for each.
        let original = self.buf[..n].to_vec();
        let user_name = route.user_name.clone();
        self.forward_or_spool(now, slot, &client, route, &upstream, n, io);
        for pool in replicas.iter() {
            let Some(to) = pool.pick(hash, None).cloned() else {
                self.count(Count::Replica("not_sent"));
                continue;
            };
            let copy = Route {
                pool: Some(pool.clone()),
                user_name: user_name.clone(),
                replicas: None,
                replica: true,
            };
            let n = self.take_request(&original);
            if !self.forward(now, now, slot, &client, copy, &to, n, io) {
                self.count(Count::Replica("not_sent"));
            }
        }
    }

    /// Forwards the NAS request in `buf[..n]`, unless it is accounting for a spooled pool
    /// none of whose servers is alive: then it goes to the spool, and the NAS is answered.
    #[expect(clippy::too_many_arguments, reason = "one request's whole context")]
    fn forward_or_spool(
        &mut self,
        now: Instant,
        slot: usize,
        client: &Arc<Client>,
        route: Route,
        upstream: &Arc<Upstream>,
        n: usize,
        io: &mut dyn Io,
    ) {
        let pool = route.pool(client);
        let spool_now = pool.spool
            && !route.replica
            && self.buf.first() == Some(&(Code::AccountingRequest as u8))
            && !self.flows.get(slot).is_some_and(|f| f.v11)
            && pool.none_alive();
        if !spool_now {
            self.forward(now, now, slot, client, route, upstream, n, io);
            return;
        }
        let common = self.common.clone();
        let original = self.buf[..n].to_vec();
        let fresh = (self.random.authenticator)();
        let prepared = proxy::prepare_request(
            client,
            upstream,
            proxy::Hops::default(),
            &common.proxy_state,
            &fresh,
            &mut self.buf,
            n,
            route.user_name.clone(),
        );
        let len = match prepared {
            Ok(p) => p.len,
            Err(e) => {
                common.counters.count(Count::Dropped(e.reason()));
                return;
            }
        };
        let Ok(mut m) = codec::PacketMut::from_datagram(&mut self.buf, len) else {
            return;
        };
        m.strip_proxy_state(&common.proxy_state);
        let len = m.len();
        if !io.spool(&pool.name, &upstream.name, &self.buf[..len], Duration::ZERO) {
            common.counters.count(Count::Dropped("spool_refused"));
            return;
        }
        self.answer_spooled(now, slot, client, &original);
    }

    /// Answers the NAS whose Accounting-Request (`request`, as it sent it) was spooled,
    /// and keeps the answer for its retransmissions.
    fn answer_spooled(&mut self, now: Instant, slot: usize, client: &Client, request: &[u8]) {
        let common = &*self.common;
        let mut out = [0u8; codec::MAX_PACKET_LEN];
        let Ok(req) = Packet::parse(request) else {
            return;
        };
        let Ok(m) = codec::edit::accounting_response(&mut out, &req, &client.secret) else {
            common.counters.count(Count::Dropped("too_big"));
            return;
        };
        if let Some(f) = self.flows.get_mut(slot) {
            f.dedup.answered_here(
                req.identifier(),
                req.authenticator(),
                m.as_bytes(),
                now,
                &common.dedup,
            );
            self.out.send_nas(f.remote, f.local, m.as_bytes());
            common
                .counters
                .count(Count::LocalAnswer("accounting_spooled"));
        }
    }

    /// Spools the request out at `at` that its server did not answer in time, if its pool
    /// spools, and answers its NAS; false when it is not spooled (and is given up).
    fn spool_given_up(&mut self, at: At, now: Instant, io: &mut dyn Io) -> bool {
        let common = self.common.clone();
        let Some(p) = self.requests.get(at) else {
            return false;
        };
        if p.replica
            || p.prepared.code != Code::AccountingRequest
            || p.prepared.nas_v11
            || !p.pool().spool
        {
            return false;
        }
        let Some(upstream) = common.upstreams.get(link_of(at.socket)) else {
            return false;
        };
        // What went upstream, but for our Proxy-State.
        let mut wire = p.wire.clone();
        let len = wire.len();
        let Ok(mut m) = codec::PacketMut::from_datagram(&mut wire, len) else {
            return false;
        };
        m.strip_proxy_state(&common.proxy_state);
        let len = m.len();
        let age = now.saturating_duration_since(p.sent_at);
        if !io.spool(&p.pool().name, &upstream.name, &wire[..len], age) {
            common.counters.count(Count::Dropped("spool_refused"));
            return false;
        }
        // The answer is the NAS's: its Identifier and authenticator, its Proxy-States.
        wire[1] = p.prepared.nas_id;
        wire[4..20].copy_from_slice(&p.prepared.nas_auth);
        let mut out = [0u8; codec::MAX_PACKET_LEN];
        let Ok(req) = Packet::parse(&wire[..len]) else {
            return false;
        };
        let Ok(m) = codec::edit::accounting_response(&mut out, &req, &p.client.secret) else {
            return false;
        };
        let n = m.len();
        let reply = &out[..n];
        if let Some((_, Some((remote, local)))) = end_request(
            &common,
            &mut self.requests,
            &mut self.flows,
            at,
            End::Answered(reply),
            now,
        ) {
            self.out.send_nas(remote, local, reply);
        }
        common
            .counters
            .count(Count::LocalAnswer("accounting_spooled"));
        true
    }

    /// Prepares the NAS request in `buf[..n]` for `upstream`, gives it an Identifier of one
    /// of this worker's sockets to it, signs it and queues it; the flow's dedup entry then
    /// points at it. Its timeout counts from `since`. True when it went.
    #[expect(clippy::too_many_arguments, reason = "one request's whole context")]
    fn forward(
        &mut self,
        now: Instant,
        since: Instant,
        slot: usize,
        client: &Arc<Client>,
        route: Route,
        upstream: &Arc<Upstream>,
        n: usize,
        io: &mut dyn Io,
    ) -> bool {
        let common = &*self.common;
        // The server of that name in the configuration now (a client defined before a
        // reload may hold an older one): its secret signs, its link carries.
        let Some((li, upstream)) = common
            .upstream_index
            .get(&upstream.name)
            .and_then(|&li| Some((li, common.upstreams.get(li)?)))
        else {
            common.counters.count(Count::Dropped("upstream_removed"));
            return false;
        };
        let Some(reply_to) = self.flows.reference(slot) else {
            return false;
        };
        let replica = route.replica;
        // Kept for failover to another server of the pool, and for a stream upstream's next
        // connection (re-prepared from it).
        let nas_packet = if route.pool(client).members.len() > 1 || upstream.stream {
            self.buf[..n].to_vec()
        } else {
            Vec::new()
        };
        let fresh = (self.random.authenticator)();
        let hops = proxy::Hops {
            nas_v11: self.flows.get(slot).is_some_and(|f| f.v11),
            upstream_v11: self.upstream_v11.get(li).copied().unwrap_or(false),
        };
        let prepared = match proxy::prepare_request(
            client,
            upstream,
            hops,
            &common.proxy_state,
            &fresh,
            &mut self.buf,
            n,
            route.user_name.clone(),
        ) {
            Ok(p) => {
                if p.learnt_client_signs {
                    common.counters.signs("client", &client.name);
                    info!(
                        client = %client.name,
                        "client signs its Access-Requests without EAP: a Message-Authenticator \
                         is now required from it (require_message_authenticator = auto)"
                    );
                }
                p
            }
            Err(e) => {
                common.counters.count(Count::Dropped(e.reason()));
                debug!(remote = %reply_to.remote, client = %client.name, error = %e, "request not forwarded");
                return false;
            }
        };
        let acct = prepared.code == Code::AccountingRequest;
        let to = if acct {
            upstream.acct
        } else {
            Some(upstream.auth)
        };
        let Some(to) = to else {
            common.counters.count(Count::Dropped("no_acct_upstream"));
            if !route.replica {
                self.protocol_error(client, reply_to, &prepared, UNSUPPORTED_SERVICE);
            }
            return false;
        };
        let mut pending = InFlight {
            client: client.clone(),
            prepared,
            up_auth: [0; 16],
            sent_at: since,
            sent_here: now,
            reply_to,
            wire: Vec::new(),
            retries: 0,
            next_retry: now + (self.random.jitter)(upstream.options.retry),
            nas_packet,
            pool: route.pool,
            user_name: route.user_name,
            replica: route.replica,
        };
        // An Identifier of one of this worker's sockets to that port; another socket when
        // all 256 of each are in flight.
        let at = loop {
            match self.requests.allocate(port(li, acct), pending) {
                Allocation::At(at) => break Some(at),
                Allocation::OpenSocket { socket, request } => match io.open_upstream(socket, to) {
                    Ok(()) => {
                        self.requests.add_socket(socket, upstream.stream, now);
                        debug!(%to, socket, "another upstream socket: 256 requests in flight on each");
                        pending = request;
                    }
                    Err(e) => {
                        warn!(%to, error = %e, "no further upstream socket");
                        break None;
                    }
                },
                Allocation::Exhausted(_) => break None,
            }
        };
        let Some(at) = at else {
            self.count(Count::Dropped("upstream_ids_exhausted"));
            if !replica {
                self.protocol_error(client, reply_to, &prepared, RESOURCES_UNAVAILABLE);
            }
            return false;
        };
        let token = hops.upstream_v11.then(|| {
            self.next_token = self.next_token.wrapping_add(1) & 0x00ff_ffff;
            self.next_token
        });
        match proxy::finalize_request(&mut self.buf, prepared.len, at.id, upstream, token) {
            Ok(up_auth) => {
                let wire = &self.buf[..prepared.len];
                if let Some(p) = self.requests.get_mut(at) {
                    p.up_auth = up_auth;
                    p.wire = wire.to_vec();
                }
                self.out.send_upstream(at, wire);
                // Begun: from here only end_request ends it.
                self.common.counters.count(Count::RequestBegun);
                // A replica's copy is no request of the NAS's: neither its flow nor its
                // dedup entry knows it.
                if let Some(flow) = self.flows.get_mut(slot).filter(|_| !replica) {
                    flow.in_flight += 1;
                    flow.dedup
                        .begin(prepared.nas_id, &prepared.nas_auth, now, at);
                }
                true
            }
            Err(e) => {
                // Not begun yet (no dedup entry, not counted): only the Identifier to free.
                self.requests.take(at, now);
                self.count(Count::Dropped(e.reason()));
                false
            }
        }
    }

    /// Tells the NAS that its request cannot be forwarded (RFC 7930 Protocol-Error, with
    /// the Error-Cause and Original-Packet-Code), instead of leaving it to time out. `buf`
    /// holds the request as prepared for the upstream: its Proxy-States are echoed, but for
    /// ours.
    fn protocol_error(
        &mut self,
        client: &Client,
        to: FlowRef,
        prepared: &proxy::Prepared,
        cause: u32,
    ) {
        let mut b = [0u8; 1024];
        if let Some(m) = answers::protocol_error(
            &mut b,
            &self.buf,
            prepared,
            &self.common.proxy_state,
            cause,
            &client.secret,
        ) {
            self.out.send_nas(to.remote, to.local, m.as_bytes());
            self.count(Count::LocalAnswer("protocol_error"));
        }
    }

    /// Sends the request at `at` again: to the same server while it answers anything,
    /// else to another server of its client's pool (failover).
    fn resend(&mut self, at: At, now: Instant, cause: &'static str, io: &mut dyn Io) {
        let Some(upstream) = self.common.upstreams.get(link_of(at.socket)).cloned() else {
            return;
        };
        let Some(r) = self.requests.get(at).map(|p| p.reply_to) else {
            return;
        };
        let alive = upstream
            .health
            .on_unanswered(now, upstream.options.retry / 2);
        let hash = self.flows.of(&r).map_or(0, |f| f.hash);
        let other = if alive {
            None
        } else {
            self.other_server(at, hash, &upstream)
        };
        match other {
            // On a stream, what was sent arrives: never twice on one connection.
            None if upstream.stream => {}
            None => {
                let Some(p) = self.requests.get_mut(at) else {
                    return;
                };
                p.next_retry = now + (self.random.jitter)(upstream.options.retry);
                self.out.send_upstream(at, &p.wire);
                self.count(Count::UpstreamRetransmit(cause));
            }
            Some(to) => self.move_to(at, &upstream, &to, now, io),
        }
    }

    /// The server of the request at `at`'s pool it may move to from `upstream`: another
    /// usable one, not a dead one unless `upstream` is dead too. None for a request that
    /// cannot be prepared again (a pool of one keeps no copy).
    fn other_server(&self, at: At, hash: u64, upstream: &Upstream) -> Option<Arc<Upstream>> {
        let p = self.requests.get(at)?;
        if p.nas_packet.is_empty() {
            return None;
        }
        p.pool()
            .pick(hash, Some(&upstream.name))
            .filter(|o| {
                o.health.state() != upstream::State::Dead
                    || upstream.health.state() == upstream::State::Dead
            })
            .cloned()
    }

    /// Moves the request at `at`, on a server that is not alive, to another of its pool
    /// that is; otherwise it stays for its retries.
    fn fail_over(&mut self, at: At, now: Instant, io: &mut dyn Io) {
        let Some(upstream) = self.common.upstreams.get(link_of(at.socket)).cloned() else {
            return;
        };
        let Some(r) = self.requests.get(at).map(|p| p.reply_to) else {
            return;
        };
        let hash = self.flows.of(&r).map_or(0, |f| f.hash);
        // Only to a server that answers: between quiet ones the retries decide.
        if let Some(to) = self.other_server(at, hash, &upstream)
            && to.health.state() == upstream::State::Alive
        {
            self.move_to(at, &upstream, &to, now, io);
        }
    }

    /// Ends the request at `at` on `from` and begins it anew on `to`, prepared again from
    /// the NAS's request: if the new send cannot be made, nothing of the old one is left.
    fn move_to(
        &mut self,
        at: At,
        from: &Upstream,
        to: &Arc<Upstream>,
        now: Instant,
        io: &mut dyn Io,
    ) {
        let Some(p) = self.end(at, End::Moved, now) else {
            return;
        };
        let n = self.take_request(&p.nas_packet);
        let r = p.reply_to;
        debug!(from = %from.name, to = %to.name, "upstream quiet: request failed over");
        // Its timeout still counts from its first sending: between silent servers a fresh
        // one at each move would keep it in flight for ever.
        let route = Route {
            pool: p.pool.clone(),
            user_name: p.user_name.clone(),
            replicas: None,
            replica: p.replica,
        };
        if self.flows.of(&r).is_some()
            && self.forward(now, p.sent_at, r.slot as usize, &p.client, route, to, n, io)
        {
            self.count(Count::UpstreamRetransmit("failover"));
        }
    }

    /// The stream connection behind upstream socket `socket` closed (the driver connects
    /// again): its requests in flight are sent anew, each prepared again with a new
    /// Identifier and a fresh signature (RFC 6613 section 2.6.5), to the same server while it
    /// is usable, else to another of its pool.
    pub fn handle_upstream_closed(&mut self, now: Instant, socket: usize, io: &mut dyn Io) {
        self.send_anew(now, socket, "connection_lost", io);
    }

    /// Prepares the requests in flight on upstream socket `socket` again, each with a new
    /// Identifier and a fresh signature.
    fn send_anew(&mut self, now: Instant, socket: usize, cause: &'static str, io: &mut dyn Io) {
        let Some(upstream) = self.common.upstreams.get(link_of(socket)).cloned() else {
            return;
        };
        for at in self.requests.on_socket(socket) {
            let Some(p) = self.end(at, End::Moved, now) else {
                continue;
            };
            let r = p.reply_to;
            if p.nas_packet.is_empty() || self.flows.of(&r).is_none() {
                continue;
            }
            let hash = self.flows.of(&r).map_or(0, |f| f.hash);
            let to = if upstream.health.state() == upstream::State::Dead {
                p.pool().pick(hash, None).cloned()
            } else {
                Some(upstream.clone())
            };
            let Some(to) = to else { continue };
            let n = self.take_request(&p.nas_packet);
            // Its timeout still counts from its first sending: a server whose connections
            // keep closing cannot keep a request alive past it.
            let route = Route {
                pool: p.pool.clone(),
                user_name: p.user_name.clone(),
                replicas: None,
                replica: p.replica,
            };
            if self.forward(
                now,
                p.sent_at,
                r.slot as usize,
                &p.client,
                route,
                &to,
                n,
                io,
            ) {
                self.count(Count::UpstreamRetransmit(cause));
            }
        }
    }

    /// A CoA or Disconnect request for one of this worker's flows: re-signed for the NAS
    /// and sent from the flow's address and port to the NAS's, like a reply.
    pub fn handle_coa(&mut self, now: Instant, job: CoaJob) {
        let counters = self.common.counters.clone();
        let Some(flow) = self
            .flows
            .find(&job.key)
            .and_then(|slot| self.flows.get_mut(slot))
        else {
            counters.count(Count::Coa("nas_not_found"));
            if let Ok(p) = Packet::parse(&job.packet)
                && let Some(nak) = coa::nak(&p, &job.upstream, coa::SESSION_CONTEXT_NOT_FOUND)
                && !(job.answer)(nak)
            {
                counters.count(Count::Coa("listener_busy"));
            }
            return;
        };
        let client = flow.client.clone();
        let n = job.packet.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&job.packet[..n]);
        // An Identifier no request to this NAS has in flight.
        let mut id = flow.coa_next_id;
        for _ in 0..256 {
            if !flow.coa.contains_key(&id) {
                break;
            }
            id = id.wrapping_add(1);
        }
        flow.coa_next_id = id.wrapping_add(1);
        let Ok(mut m) = PacketMut::from_datagram(&mut self.buf, n) else {
            counters.count(Count::Coa("malformed"));
            return;
        };
        m.set_identifier(id);
        m.set_authenticator(&[0; 16]);
        if m.sign(&client.secret, None).is_err() {
            counters.count(Count::Coa("malformed"));
            return;
        }
        let sent_auth = m.authenticator();
        self.out.send_nas(flow.remote, flow.local, m.as_bytes());
        debug!(remote = %flow.remote, client = %client.name, "CoA request sent to the NAS");
        flow.coa.insert(
            id,
            PendingCoa {
                job,
                sent_auth,
                sent_at: now,
            },
        );
    }

    /// What to send: everything queued since the last call. Give it back with
    /// [`Engine::recycle`] once sent, so its buffers are reused.
    pub fn poll_transmits(&mut self) -> Transmits {
        std::mem::take(&mut self.out)
    }

    pub fn recycle(&mut self, mut t: Transmits) {
        if self.out.is_empty() {
            t.clear();
            self.out = t;
        }
    }

    /// The kernel refused the request at `at`: it is given up (a NAS retransmission goes
    /// anew).
    /// The kernel refused to send the request at `at` (a server whose port is closed shows
    /// so, after its ICMP): the server counts as unanswering, and the request is spooled
    /// (if its pool spools) or given up.
    pub fn send_failed(&mut self, now: Instant, at: At, io: &mut dyn Io) {
        self.count(Count::Dropped("send_to_upstream"));
        if let Some(u) = self.common.upstreams.get(link_of(at.socket)) {
            u.health.on_unanswered(now, u.options.retry / 2);
        }
        if !self.spool_given_up(at, now, io) {
            self.end(at, End::GivenUp, now);
        }
    }

    /// When [`Engine::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Instant {
        self.next_tick
    }

    /// Requests of this worker in flight upstream.
    pub fn in_flight(&self) -> usize {
        self.requests.in_flight()
    }

    /// Shutdown: serving goes on until what is in flight upstream is answered (or given
    /// up), for at most [`DRAIN`] from the first call, so a restart does not cost NASes
    /// their answers. True when the worker may stop.
    pub fn drain(&mut self, now: Instant) -> bool {
        let n = self.in_flight();
        let worker = self.worker;
        let until = *self.drain_until.get_or_insert_with(|| {
            if n > 0 {
                info!(worker, in_flight = n, "draining requests in flight");
            }
            now + DRAIN
        });
        n == 0 || now >= until
    }

    /// Replies read on upstream socket `socket`: checked, re-signed for its NAS and queued
    /// for it.
    pub fn handle_upstream(&mut self, now: Instant, socket: usize, data: &[u8]) {
        // Borrowed field by field, not cloned: this runs for every reply, and an Arc shared
        // by all workers would bounce its count between their cores.
        let common = &*self.common;
        let Some(upstream) = common.upstreams.get(link_of(socket)) else {
            return;
        };
        if data.len() < codec::HEADER_LEN {
            common.counters.count(Count::Dropped("reply_malformed"));
            return;
        }
        // On RADIUS/1.1 the Token's last byte is the Identifier we gave.
        let v11 = self
            .upstream_v11
            .get(link_of(socket))
            .copied()
            .unwrap_or(false);
        let at = At {
            socket,
            id: if v11 { data[7] } else { data[1] },
        };
        let Some(pending) = self.requests.get(at) else {
            common.counters.count(Count::Dropped("reply_unknown_id"));
            return;
        };
        let n = data.len().min(self.buf.len());
        self.buf[..n].copy_from_slice(&data[..n]);
        let len = match proxy::process_reply(
            &mut self.buf,
            n,
            upstream,
            v11,
            pending,
            &common.proxy_state,
        ) {
            Ok(r) => {
                if r.learnt_upstream_signs {
                    common.counters.signs("upstream", &upstream.name);
                    info!(
                        upstream = %upstream.name,
                        "upstream signs its Access replies without EAP: a \
                         Message-Authenticator is now required from it \
                         (require_message_authenticator = auto)"
                    );
                }
                r.len
            }
            // A forged or broken reply does not cancel the request: the real one may follow.
            Err(e) => {
                common.counters.count(Count::Dropped(e.reason()));
                warn!(upstream = %upstream.name, error = %e, "reply dropped");
                return;
            }
        };
        upstream.health.on_answer(now);
        let Some((done, send_to)) = end_request(
            common,
            &mut self.requests,
            &mut self.flows,
            at,
            End::Answered(&self.buf[..len]),
            now,
        ) else {
            return;
        };
        if done.pool().spreads()
            && self.buf[0] == Code::AccessChallenge as u8
            && let Ok(p) = Packet::parse_v11(&self.buf[..len])
            && let Some(st) = p.get(attr::STATE)
        {
            common.eap_states.remember(st.value, &upstream.name, now);
        }
        let link = link_of(socket);
        if self.latencies.len() <= link {
            self.latencies.resize_with(link + 1, Latencies::default);
        }
        let took = now.saturating_duration_since(done.sent_at);
        self.latencies[link].observe(took.as_micros() as u64);
        if let Some((remote, local)) = send_to {
            debug_packet(
                &common.dictionary,
                "to the NAS",
                &done.client.name,
                remote,
                &self.buf[..len],
            );
            self.out.send_nas(remote, local, &self.buf[..len]);
        }
    }

    /// How long each upstream (by link) took to answer since the last call, from each
    /// request's first sending (a request moved between servers counts its whole wait at
    /// the one that answered); taken out, for the metrics.
    pub fn take_latencies(&mut self) -> impl Iterator<Item = (usize, Latencies)> + '_ {
        self.latencies
            .iter_mut()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(link, l)| (link, std::mem::take(l)))
    }

    /// Ends the request at `at` without an answer; see `end_request`.
    fn end(&mut self, at: At, end: End<'_>, now: Instant) -> Option<Pending> {
        end_request(
            &self.common,
            &mut self.requests,
            &mut self.flows,
            at,
            end,
            now,
        )
        .map(|(p, _)| p)
    }

    /// The timers, every [`TICK`]: requests the upstream did not answer in time, our own
    /// retransmissions, idle flows, idle extra upstream sockets; once a second, cached
    /// replies, CoA requests and pending packets past their time.
    pub fn handle_timeout(&mut self, now: Instant, io: &mut dyn Io) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        self.on_tick(now, io);
        self.handle_requeued(now, io);
    }

    fn on_tick(&mut self, now: Instant, io: &mut dyn Io) {
        let common = self.common.clone();
        self.ticks = self.ticks.wrapping_add(1);
        let (mut due, mut expired, mut quiet) = (Vec::new(), Vec::new(), Vec::new());
        for (li, u) in common.upstreams.iter().enumerate() {
            // A stream delivers or closes; no retransmission on it (RFC 6613 2.6.1).
            let max_retries = if u.stream { 0 } else { u.options.max_retries };
            let (timeout, retry) = (u.timeout, u.options.retry);
            for acct in [false, true] {
                let jitter = &mut self.random.jitter;
                let sweep = self
                    .requests
                    .sweep(port(li, acct), now, timeout, max_retries, || jitter(retry));
                expired.extend(sweep.expired);
                due.extend(sweep.resend);
                let window = u.options.response_window;
                if sweep
                    .oldest
                    .is_some_and(|t| now.saturating_duration_since(t) >= window)
                    && !u.health.on_unanswered(now, window / 2)
                {
                    quiet.push(port(li, acct));
                }
                for socket in sweep.closed {
                    io.close_upstream(socket);
                    debug!(upstream = %u.name, socket, "idle extra upstream socket closed");
                }
            }
        }
        for at in expired {
            if self.spool_given_up(at, now, io) {
                if let Some(u) = common.upstreams.get(link_of(at.socket)) {
                    u.health.on_unanswered(now, u.options.retry / 2);
                }
                continue;
            }
            if let Some(p) = self.end(at, End::GivenUp, now) {
                self.count(Count::Dropped("upstream_timeout"));
                if let Some(u) = common.upstreams.get(link_of(at.socket)) {
                    u.health.on_unanswered(now, u.options.retry / 2);
                }
                debug!(remote = %p.reply_to.remote, client = %p.client.name, "request given up: no answer upstream");
            }
        }
        // A server silent past its response window: what it has in flight moves now,
        // rather than at each request's next retry (failover within about a second).
        for port in quiet {
            for socket in port * requests::MAX_SOCKETS..(port + 1) * requests::MAX_SOCKETS {
                for at in self.requests.on_socket(socket) {
                    self.fail_over(at, now, io);
                }
            }
        }
        for at in due {
            self.resend(at, now, "timer", io);
        }
        if self.ticks.is_multiple_of(10) {
            if let Some(d) = &common.dynamic {
                for (_, packets) in self
                    .pending
                    .expire(now, d.max_wait, &common.pending_packets)
                {
                    for _ in &packets {
                        self.count(Count::Refused(Refusal::PendingExpired));
                    }
                }
            }
            let mut remembered = 0;
            for f in self.flows.iter_mut() {
                f.dedup.expire(now);
                remembered += f.dedup.len();
                let before = f.coa.len();
                f.coa
                    .retain(|_, c| now.duration_since(c.sent_at) < COA_TIMEOUT);
                for _ in f.coa.len()..before {
                    common.counters.count(Count::Coa("nas_timeout"));
                }
            }
            if remembered != self.dedup_reported {
                let delta = remembered as i64 - self.dedup_reported as i64;
                common.counters.count(Count::DedupEntries(delta));
                self.dedup_reported = remembered;
            }
        }
        let (idle, provisional_idle) = (common.idle_timeout, common.provisional_idle);
        let ended: Vec<usize> = self
            .flows
            .iter()
            .filter_map(|(i, f)| {
                let idle = if f.proved { idle } else { provisional_idle };
                (f.in_flight == 0 && (f.retiring || now.duration_since(f.last_seen) >= idle))
                    .then_some(i)
            })
            .collect();
        for slot in ended {
            self.end_flow(slot, io);
        }
    }

    /// Evicts this worker's provisional flow seen least recently, to make room; false when
    /// it has none.
    fn evict_oldest_provisional(&mut self, io: &mut dyn Io) -> bool {
        while let Some(slot) = self.provisional.oldest() {
            if self.flows.get(slot).is_some_and(|f| !f.proved) {
                self.count(Count::FlowEvicted("provisional_bound"));
                self.end_flow(slot, io);
                return true;
            }
            // Not a provisional flow (cannot happen): forget it and look again.
            self.provisional.remove(slot);
        }
        false
    }

    /// Handles what closing children gave back, as packets that reached the wildcard.
    fn handle_requeued(&mut self, now: Instant, io: &mut dyn Io) {
        while !self.requeue.is_empty() {
            for (remote, local, data) in std::mem::take(&mut self.requeue) {
                self.on_packet(now, remote, local, &data, io);
            }
        }
    }

    /// Ends a flow (idle, or evicted with requests in flight: their answers still reach the
    /// NAS) without losing what reaches it meanwhile.
    fn end_flow(&mut self, slot: usize, io: &mut dyn Io) {
        let Some(flow) = self.flows.remove(slot) else {
            return;
        };
        let common = &*self.common;
        if !flow.proved {
            self.provisional.remove(slot);
            common.provisional_flows.fetch_sub(1, Ordering::AcqRel);
        }
        if flow.named {
            common.nas_directory.forget(FlowHandle {
                worker: self.worker,
                key: flow.key,
            });
        }
        let mut drained = Vec::new();
        if flow.has_child {
            io.close_child(slot, &flow, &mut drained);
            common.active.fetch_sub(1, Ordering::AcqRel);
        }
        common.counters.count(Count::FlowEnded {
            proved: flow.proved,
        });
        debug!(
            remote = %flow.remote,
            drained = drained.len(),
            proved = flow.proved,
            in_flight = flow.in_flight,
            "flow ended"
        );
        self.requeue.extend(
            drained
                .into_iter()
                .map(|(from, data)| (from, flow.local, data)),
        );
    }

    /// Ends every flow at shutdown (their sockets leave steer first).
    pub fn shutdown(&mut self, io: &mut dyn Io) {
        let slots: Vec<usize> = self.flows.iter().map(|(i, _)| i).collect();
        for slot in slots {
            self.end_flow(slot, io);
        }
        self.requeue.clear();
    }
}

/// Takes one of `bound` places in `count`, atomically (workers take them concurrently).
fn reserve(count: &AtomicUsize, bound: usize) -> bool {
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
    counters: &dyn Counters,
    binding: &Binding,
    packets: Vec<Vec<u8>>,
) -> Option<(Arc<Client>, Vec<Vec<u8>>, bool)> {
    match binding {
        Binding::One(client) => {
            let mut proved = false;
            let kept: Vec<Vec<u8>> = packets
                .into_iter()
                .filter(|p| match client.proof(p) {
                    Proof::Proved => {
                        proved = true;
                        true
                    }
                    Proof::Unverifiable => true,
                    Proof::Refused(reason) => {
                        counters.count(Count::Dropped(reason));
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
                    counters.count(Count::Dropped("nat_unproven"));
                }
                return None;
            };
            for _ in 0..first {
                counters.count(Count::Dropped("nat_unproven"));
            }
            info!(client = %client.name, "NAS behind a shared address identified");
            let mut packets = packets;
            Some((client, packets.split_off(first), true))
        }
    }
}

/// Ends the request in flight at `at`: the one operation that frees its upstream
/// Identifier, takes it off its flow's in-flight count and the in-flight gauge, and ends
/// its dedup entry (answered: the reply is cached for retransmissions; given up or moved:
/// forgotten, so the NAS's next retransmission is forwarded anew). Returns the request,
/// and for an answer where to send the reply: to the flow's NAS, even when the flow has
/// ended meanwhile, unless the NAS has moved on to a new request with that Identifier.
fn end_request(
    common: &Common,
    requests: &mut Requests<FlowRef>,
    flows: &mut FlowTable,
    at: At,
    end: End<'_>,
    now: Instant,
) -> Option<(Pending, Option<SendTo>)> {
    let p = requests.take(at, now)?;
    common.counters.count(Count::RequestEnded);
    if p.replica {
        match end {
            End::Answered(_) => common.counters.count(Count::Replica("answered")),
            End::GivenUp => common.counters.count(Count::Replica("timeout")),
            End::Moved => {}
        }
        return Some((p, None));
    }
    let r = p.reply_to;
    let (nas_id, nas_auth) = (p.prepared.nas_id, p.prepared.nas_auth);
    let mut send_to = None;
    match (flows.of(&r), end) {
        (Some(f), end) => {
            f.in_flight = f.in_flight.saturating_sub(1);
            match end {
                End::Answered(reply) => {
                    if f.dedup
                        .on_reply(nas_id, &nas_auth, reply, now, &common.dedup)
                    {
                        send_to = Some((f.remote, f.local));
                    } else {
                        // The NAS has moved on to a new request with this Identifier.
                        common.counters.count(Count::Dropped("reply_superseded"));
                    }
                }
                End::GivenUp | End::Moved => f.dedup.on_give_up(nas_id, &nas_auth, at),
            }
        }
        // The flow ended (evicted) while this was in flight: its NAS still gets the answer.
        (None, End::Answered(_)) => send_to = Some((r.remote, r.local)),
        (None, End::GivenUp | End::Moved) => {}
    }
    Some((p, send_to))
}

/// A NAS's CoA/Disconnect ACK or NAK: checked with the NAS's secret, re-signed for the
/// upstream that asked, and handed to the CoA listener.
fn on_coa_answer(
    counters: &dyn Counters,
    flow: &mut Flow,
    client: &Client,
    buf: &mut [u8],
    n: usize,
) {
    let Some(id) = buf.get(1).copied() else {
        return;
    };
    let Some(pending) = flow.coa.get(&id) else {
        counters.count(Count::Coa("answer_unknown_id"));
        return;
    };
    match Packet::parse(&buf[..n]) {
        Ok(p) if auth::verify(&p, &client.secret, Some(&pending.sent_auth)).is_ok() => {}
        _ => {
            counters.count(Count::Coa("answer_bad_signature"));
            return;
        }
    }
    let Some(pending) = flow.coa.remove(&id) else {
        return;
    };
    let job = pending.job;
    let Ok(mut m) = PacketMut::from_datagram(buf, n) else {
        return;
    };
    m.set_identifier(job.origin_id);
    if m.sign(&job.upstream.secret, Some(&job.origin_auth))
        .is_err()
    {
        counters.count(Count::Coa("malformed"));
        return;
    }
    if !(job.answer)(m.as_bytes().to_vec()) {
        counters.count(Count::Coa("listener_busy"));
    }
}
