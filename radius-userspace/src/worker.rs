//! A worker: the driver around one [`Engine`]. One thread owns its NAS-facing sockets (a
//! [`Front`]: a UDP wildcard and its flows' children, or a RADIUS/TCP listener and its
//! connections, see [`crate::tcp`]) and its own sockets to every upstream, all in one
//! level-triggered epoll set ([`Poller`]), and only moves bytes: a packet read is handed
//! to the engine with the time, what the engine queued is sent (with one `sendmmsg` per
//! UDP socket), and the engine says when to wake it next. Every decision (flows, pending
//! packets, dedup, forwarding, retransmission, failover, CoA) is the engine's, in
//! `radius-core/src/engine.rs`.
//!
//! Shared-nothing per worker, so a request crosses no channel, no lock and no other thread
//! between the NAS and the upstream. Steer (or the reuseport filter) keeps a UDP flow on one
//! worker. UDP replies leave from the wildcard (same address and port as the flow's child,
//! so the NAS sees no difference; the wildcard is not connected, so it sends to every NAS of
//! a round in one batch); TCP answers are written to their connection.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsFd,
    sync::Arc,
    time::Instant,
};

use tracing::{debug, info, warn};

use radius_common::FlowKey;

use crate::{
    dynamic::NotDefined,
    engine::{self, Engine, Io, Transmits},
    flows::{Flow, flow_key},
    handover::{Handed, HandedPacket},
    metrics::{Refusal, UpstreamEventLabel},
    requests::At,
    shared::{Current, Defined, HandedFront, InboxRx, Shared, ToWorker, lock},
    socket::{self, Poller},
    tcp::TcpFront,
    upstream_conn::{Transport, UpstreamConn},
};

/// Datagrams a socket gives per round before the other sockets get their turn.
const READ_BUDGET: usize = 64;

// Epoll tokens: the kind in the top byte, an index below.
const KIND_SHIFT: u32 = 56;
const WILDCARD: u64 = 0;
const UPSTREAM: u64 = 1;
const CHILD: u64 = 2;
const WAKE: u64 = 3;
const CONNECTION: u64 = 4;

/// Connections a listener accepts per round.
const ACCEPT_BUDGET: usize = 64;

fn token(kind: u64, index: usize) -> u64 {
    (kind << KIND_SHIFT) | index as u64
}

/// The listener a worker serves: its bound address, whether it is an accounting one
/// (how a Status-Server is answered), and the worker's place among its workers.
pub(crate) struct Listening {
    pub bound: SocketAddr,
    pub accounting: bool,
    pub index: usize,
}

/// A worker's NAS-facing sockets.
pub(crate) enum Front {
    Udp {
        wildcard: UdpSocket,
        /// Flows' child sockets, by the engine's flow slot.
        children: Vec<Option<UdpSocket>>,
        /// Receive buffer of the children drained at a flow's end.
        drain_buf: Vec<u8>,
    },
    Tcp(TcpFront),
}

impl Front {
    pub fn udp(wildcard: UdpSocket) -> Self {
        Front::Udp {
            wildcard,
            children: Vec::new(),
            drain_buf: vec![0u8; 65_536],
        }
    }
}

/// The worker's sockets: what the engine asks for through [`Io`].
struct Sockets {
    shared: Arc<Shared>,
    /// The configuration this worker's engine runs on (the last reload it was handed).
    current: Arc<Current>,
    runtime: tokio::runtime::Handle,
    poller: Poller,
    /// The listener's own address (children of the user-space path bind to it).
    bound: SocketAddr,
    front: Front,
    /// Sockets to upstreams, by the engine's request-table socket index.
    upstreams: Vec<Option<UpstreamSocket>>,
    /// What each `sendmmsg` needs, reused from round to round.
    send_arrays: socket::SendArrays,
    /// Children handed over by the process this one upgraded, until their flows are
    /// adopted (`open_child` takes them instead of binding new ones).
    adopting: HashMap<FlowKey, UdpSocket>,
    /// The NAS-facing sockets went to the process that upgraded this one: they are no
    /// longer read (not even drained when a flow ends); answers still leave by them.
    handed_over: bool,
    /// This worker's number among all, for the spool's segment files.
    me: usize,
}

/// What a worker of a new process starts with, taken over from the one it upgrades: its
/// flows (proved ones, each with its child socket and client's name) and the packets that
/// waited for a definition there.
#[derive(Default)]
pub(crate) struct Inherited {
    pub flows: Vec<(SocketAddr, SocketAddr, String, UdpSocket)>,
    pub pending: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

/// A worker's way to an upstream: a UDP socket, or a TCP/TLS connection.
enum UpstreamSocket {
    Udp(UdpSocket),
    Stream(Box<UpstreamConn>),
}

fn put<T>(v: &mut Vec<Option<T>>, i: usize, x: T) {
    if v.len() <= i {
        v.resize_with(i + 1, || None);
    }
    v[i] = Some(x);
}

impl Io for Sockets {
    fn open_child(&mut self, slot: usize, flow: &Flow) -> Result<(), Refusal> {
        let (remote, local) = (flow.remote, flow.local);
        let children = match &mut self.front {
            Front::Udp { children, .. } => children,
            // A connection is its flow's "child" already.
            Front::Tcp(t) => {
                return match t.attach_flow(remote, local, slot) {
                    true => Ok(()),
                    false => Err(Refusal::ChildSocket),
                };
            }
        };
        if self.handed_over {
            // Nothing reads a new child here any more: the flow is the new process's.
            return Err(Refusal::ChildSocket);
        }
        let child = match self.adopting.remove(&flow.key) {
            Some(c) => Ok(c),
            None => socket::bind_child(self.shared.path, self.bound, local, remote),
        }
        .and_then(|c| c.set_nonblocking(true).map(|()| c))
        .map_err(|e| {
            warn!(%remote, %local, error = %e, "no child socket for a flow");
            Refusal::ChildSocket
        })?;
        self.poller.add(&child, token(CHILD, slot)).map_err(|e| {
            warn!(%remote, error = %e, "cannot watch a flow's child");
            Refusal::ChildSocket
        })?;
        if let Some(fp) = &self.shared.fastpath {
            use std::os::fd::AsRawFd;
            if let Err(e) = lock(fp).register_child(&flow.key, child.as_raw_fd()) {
                self.poller.remove(&child);
                warn!(%remote, error = %e, "steer cannot take a flow");
                return Err(Refusal::Register);
            }
        }
        put(children, slot, child);
        Ok(())
    }

    fn close_child(&mut self, slot: usize, flow: &Flow, drained: &mut Vec<(SocketAddr, Vec<u8>)>) {
        let (children, drain_buf) = match &mut self.front {
            Front::Udp {
                children,
                drain_buf,
                ..
            } => (children, drain_buf),
            Front::Tcp(t) => {
                let reason = if self.shared.cancel.is_cancelled() {
                    "shutdown"
                } else {
                    "idle"
                };
                t.flow_ended(flow.remote, flow.local, reason);
                return;
            }
        };
        let Some(child) = children.get_mut(slot).and_then(Option::take) else {
            return;
        };
        if self.handed_over {
            // The socket is the new process's now: what it holds is its to read.
            return;
        }
        // Unregistered first, so later packets reach the wildcard and start a new flow;
        // what the child already holds is handed back.
        if let Some(fp) = &self.shared.fastpath {
            lock(fp).unregister_child(&flow.key);
        }
        self.poller.remove(&child);
        while let Ok((n, from)) = child.recv_from(drain_buf) {
            drained.push((from, drain_buf[..n].to_vec()));
        }
    }

    fn open_upstream(&mut self, index: usize, to: SocketAddr) -> std::io::Result<()> {
        let link = crate::engine::link_of(index);
        let tls = match self.current.upstream_transports.get(link) {
            Some(Transport::Tcp) => None,
            Some(Transport::Tls(t)) => Some(t.clone()),
            Some(Transport::Udp) | None => {
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
                self.poller.add(&s, token(UPSTREAM, index))?;
                put(&mut self.upstreams, index, UpstreamSocket::Udp(s));
                return Ok(());
            }
        };
        let now = Instant::now();
        // The watchdog's Status-Server is signed with the upstream's secret, and lets a
        // busy connection be silent for its `retry`.
        let watchdog = self
            .current
            .common
            .upstreams
            .get(link)
            .map(|u| (u.secret.clone(), u.options.retry))
            .ok_or_else(|| std::io::Error::other("no such upstream"))?;
        let conn =
            UpstreamConn::connect(to, tls, watchdog, token(UPSTREAM, index), &self.poller, now)?;
        put(
            &mut self.upstreams,
            index,
            UpstreamSocket::Stream(Box::new(conn)),
        );
        Ok(())
    }

    fn close_upstream(&mut self, index: usize) {
        match self.upstreams.get_mut(index).and_then(Option::take) {
            Some(UpstreamSocket::Udp(s)) => self.poller.remove(&s),
            Some(UpstreamSocket::Stream(mut c)) => c.close(&self.poller, Instant::now(), "idle"),
            None => {}
        }
    }

    fn define(&mut self, ip: IpAddr) {
        spawn_definition(&self.runtime, self.shared.clone(), self.current.clone(), ip);
    }

    fn spool(
        &mut self,
        pool: &str,
        upstream: &str,
        packet: &[u8],
        age: std::time::Duration,
    ) -> bool {
        self.shared
            .spool
            .as_ref()
            .is_some_and(|s| s.append(self.me, pool, upstream, packet, age))
    }

    fn speaks_v11(&self, remote: SocketAddr, local: SocketAddr) -> bool {
        match &self.front {
            Front::Tcp(t) => t.speaks_v11(remote, local),
            Front::Udp { .. } => false,
        }
    }
}

struct Worker {
    index: usize,
    engine: Engine,
    io: Sockets,
    /// The receive buffer of the wildcard and of connections (a datagram is handed to the
    /// engine from it).
    buf: Vec<u8>,
    /// Datagrams read at once from a child or an upstream socket.
    batch: socket::RecvBatch,
}

/// Runs one worker on the calling (dedicated) thread until the daemon is cancelled and its
/// requests in flight are answered. `runtime` runs what must be async: dynamic definitions.
pub(crate) fn run(
    shared: Arc<Shared>,
    front: Front,
    Listening {
        bound,
        accounting,
        index,
    }: Listening,
    me: usize,
    inbox: InboxRx,
    runtime: tokio::runtime::Handle,
    inherited: Inherited,
) -> std::io::Result<()> {
    // What `top -H` and perf show for this thread while it is this worker.
    let _name = ThreadName::set(&format!("radius-w{me}"));
    let poller = Poller::new()?;
    match &front {
        Front::Udp { wildcard, .. } => {
            wildcard.set_nonblocking(true)?;
            poller.add(wildcard, token(WILDCARD, 0))?;
        }
        Front::Tcp(t) => poller.add(t.listener(), token(WILDCARD, 0))?,
    }
    poller.add(&*inbox.wake, token(WAKE, 0))?;
    let now = Instant::now();
    let current = shared.current.load_full();
    let mut w = Worker {
        index,
        engine: Engine::new(current.common.clone(), me, accounting, now),
        io: Sockets {
            shared: shared.clone(),
            current,
            runtime,
            poller,
            bound,
            front,
            upstreams: Vec::new(),
            send_arrays: socket::SendArrays::default(),
            adopting: HashMap::new(),
            handed_over: false,
            me,
        },
        buf: vec![0u8; 65_536],
        batch: socket::RecvBatch::default(),
    };
    w.engine.start(now, &mut w.io)?;
    w.adopt(now, inherited);
    let mut ready = Vec::with_capacity(256);
    let mut next_sweep = now;
    loop {
        let now = Instant::now();
        // At SIGTERM/SIGINT: serving goes on until what is in flight is answered (or for
        // the engine's drain bound), so a restart does not cost NASes their answers.
        if shared.cancel.is_cancelled() && w.engine.drain(now) {
            break;
        }
        w.engine.handle_timeout(now, &mut w.io);
        if now >= next_sweep {
            next_sweep = now + std::time::Duration::from_secs(1);
            shared.heartbeat(me, now);
            let upstreams = &w.io.current.common.upstreams;
            for (link, l) in w.engine.take_latencies() {
                if let Some(u) = upstreams.get(link) {
                    shared.metrics.add_latencies(&u.name, &l);
                }
            }
            if let Front::Tcp(t) = &mut w.io.front {
                t.sweep(now);
            }
        }
        if w.io
            .current
            .upstream_transports
            .iter()
            .any(|t| !matches!(t, Transport::Udp))
        {
            w.reconnect_upstreams(now);
        }
        w.flush(now);
        let wait = w.engine.poll_timeout().saturating_duration_since(now);
        w.io.poller.wait(&mut ready, 256, wait)?;
        let now = Instant::now();
        for &t in &ready {
            let i = (t & ((1 << KIND_SHIFT) - 1)) as usize;
            match t >> KIND_SHIFT {
                WAKE => {
                    inbox.wake.clear();
                    while let Ok(m) = inbox.rx.try_recv() {
                        match m {
                            ToWorker::Defined(Defined { ip, outcome }) => {
                                w.engine.handle_defined(now, ip, &outcome, &mut w.io)
                            }
                            ToWorker::Coa(job) => w.engine.handle_coa(now, job),
                            ToWorker::Reload(current) => {
                                if let Front::Tcp(t) = &mut w.io.front {
                                    t.set_tls(current.tls_server.clone());
                                }
                                w.io.current = current.clone();
                                w.engine
                                    .handle_reload(now, current.common.clone(), &mut w.io);
                            }
                            ToWorker::Status(reply) => {
                                let _ = reply.send(w.engine.status());
                            }
                            ToWorker::HandOver(reply) => {
                                let _ = reply.send(w.hand_over());
                            }
                            ToWorker::Resume => w.resume(),
                        }
                    }
                }
                WILDCARD => w.read_wildcard(now),
                UPSTREAM => w.read_upstream(now, i),
                CHILD => w.read_child(now, i),
                CONNECTION => w.read_connection(now, i),
                _ => {}
            }
        }
        w.flush(now);
    }
    if w.engine.in_flight() > 0 {
        info!(
            worker = index,
            in_flight = w.engine.in_flight(),
            "drain bound reached"
        );
    }
    w.engine.shutdown(&mut w.io);
    Ok(())
}

impl Worker {
    /// The flows and packets taken over from the process this one upgrades: each flow
    /// adopted with its own socket (a client no longer there, or `max_flows`, and its
    /// socket closes: the flow is made anew from its next packet), then the packets that
    /// waited for a definition there, read as if from the wildcard.
    fn adopt(&mut self, now: Instant, inherited: Inherited) {
        let Inherited { flows, pending } = inherited;
        if flows.is_empty() && pending.is_empty() {
            return;
        }
        let offered = flows.len();
        let mut adopted = 0;
        for (remote, local, client, sock) in flows {
            // `open_child` takes it from here; one not adopted closes below.
            self.io.adopting.insert(flow_key(remote, local), sock);
            if self
                .engine
                .adopt_flow(now, remote, local, &client, &mut self.io)
            {
                adopted += 1;
            }
        }
        self.io.adopting.clear();
        let packets = pending.len();
        for (remote, local, data) in pending {
            self.engine
                .handle_wildcard(now, remote, local, &data, &mut self.io);
        }
        info!(
            worker = self.index,
            listen = %self.io.bound,
            adopted,
            not_adopted = offered - adopted,
            packets,
            "flows taken over from the process this one upgrades"
        );
    }

    /// An upgrade: the NAS-facing sockets leave the epoll set and go to the new process,
    /// duplicated, with what each is; the packets kept for definitions go too. Requests in
    /// flight stay, and are answered through this process's copies.
    fn hand_over(&mut self) -> HandedFront {
        let mut out = HandedFront::default();
        let (listen, index) = (self.io.bound, self.index);
        let dup = |fd: &dyn AsFd| fd.as_fd().try_clone_to_owned();
        match &self.io.front {
            Front::Udp {
                wildcard, children, ..
            } => {
                self.io.poller.remove(wildcard);
                match dup(wildcard) {
                    Ok(fd) => out.sockets.push((Handed::Wildcard { listen, index }, fd)),
                    Err(e) => warn!(error = %e, "upgrade: cannot hand a wildcard over"),
                }
                for (slot, flow) in self.engine.flows().iter() {
                    let Some(child) = children.get(slot).and_then(Option::as_ref) else {
                        continue; // provisional: no socket, made anew there
                    };
                    self.io.poller.remove(child);
                    if flow.retiring {
                        continue;
                    }
                    let handed = Handed::Flow {
                        listen,
                        index,
                        remote: flow.remote,
                        local: flow.local,
                        client: flow.client.name.clone(),
                    };
                    match dup(child) {
                        Ok(fd) => out.sockets.push((handed, fd)),
                        Err(e) => warn!(error = %e, "upgrade: cannot hand a flow over"),
                    }
                }
            }
            Front::Tcp(t) => {
                self.io.poller.remove(t.listener());
                match dup(t.listener()) {
                    Ok(fd) => out.sockets.push((Handed::StreamListener { listen }, fd)),
                    Err(e) => warn!(error = %e, "upgrade: cannot hand a listener over"),
                }
            }
        }
        out.pending = self
            .engine
            .take_pending()
            .into_iter()
            .map(|(remote, local, data)| HandedPacket {
                listen,
                index,
                remote,
                local,
                data,
            })
            .collect();
        self.io.handed_over = true;
        out
    }

    /// The upgrade failed: the sockets handed over are read again. (Packets that waited
    /// for a definition went with the hand-over; their NASes retransmit.)
    fn resume(&mut self) {
        if !self.io.handed_over {
            return;
        }
        self.io.handed_over = false;
        let poller = &self.io.poller;
        match &self.io.front {
            Front::Udp {
                wildcard, children, ..
            } => {
                let _ = poller.add(wildcard, token(WILDCARD, 0));
                for (slot, c) in children.iter().enumerate() {
                    if let Some(c) = c {
                        let _ = poller.add(c, token(CHILD, slot));
                    }
                }
            }
            Front::Tcp(t) => {
                let _ = poller.add(t.listener(), token(WILDCARD, 0));
            }
        }
    }

    fn read_wildcard(&mut self, now: Instant) {
        if let Front::Tcp(t) = &mut self.io.front {
            let (common, metrics) = (&self.io.current.common, &self.io.shared.metrics);
            let token = |i| token(CONNECTION, i);
            t.accept(now, common, metrics, &self.io.poller, token, ACCEPT_BUDGET);
            return;
        }
        for _ in 0..READ_BUDGET {
            let Front::Udp { wildcard, .. } = &self.io.front else {
                return;
            };
            match socket::recv_from_to(wildcard, &mut self.buf, self.io.bound) {
                Ok(rx) => {
                    let data = &self.buf[..rx.len];
                    self.engine
                        .handle_wildcard(now, rx.remote, rx.local, data, &mut self.io);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    debug!(worker = self.index, error = %e, "wildcard receive failed");
                    return;
                }
            }
        }
    }

    fn read_child(&mut self, now: Instant, slot: usize) {
        let Some((remote, local)) = self.engine.flow_addresses(slot) else {
            return;
        };
        let Front::Udp { children, .. } = &self.io.front else {
            return;
        };
        let Some(child) = children.get(slot).and_then(Option::as_ref) else {
            return;
        };
        // What the child holds, in one call (the engine may end the flow on the way).
        let Ok(got) = self.batch.recv(child) else {
            return;
        };
        for i in 0..got {
            let (data, Some(from)) = (self.batch.data(i), self.batch.source(i)) else {
                continue;
            };
            if i > 0 && self.engine.flow_addresses(slot) != Some((remote, local)) {
                // The flow ended on the way: the rest is anyone's, as at the wildcard.
                self.engine
                    .handle_wildcard(now, from, local, data, &mut self.io);
            } else if socket::is_own_datagram(remote, from) {
                self.engine.handle_child(now, slot, data, &mut self.io);
            } else {
                // A child's datagram from another peer (see socket::is_own_datagram).
                self.io.shared.metrics.misdelivered.inc();
                self.engine
                    .handle_wildcard(now, from, local, data, &mut self.io);
            }
        }
    }

    /// Connection `i` is readable or writable: its answers go out, its bytes come in, and
    /// every packet complete in them goes to the engine, in order.
    fn read_connection(&mut self, now: Instant, i: usize) {
        let Front::Tcp(t) = &mut self.io.front else {
            return;
        };
        t.flush(i, &self.io.poller);
        let closing = t.read(
            i,
            &mut self.buf,
            now,
            &self.io.current.common,
            &self.io.poller,
            &self.io.shared.metrics,
        );
        let Some((mut deframer, remote, local)) = t.take_packets(i) else {
            return;
        };
        loop {
            let packet = match deframer.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    debug!(%remote, error = %e, "RADIUS/TCP stream broken");
                    if let Front::Tcp(t) = &mut self.io.front {
                        t.doom(i, e.reason());
                    }
                    break;
                }
            };
            let Front::Tcp(t) = &mut self.io.front else {
                return;
            };
            let Some(read) = t.on_packet(i, now) else {
                break;
            };
            match read.flow {
                Some(slot) => self.engine.handle_child(now, slot, packet, &mut self.io),
                None => self
                    .engine
                    .handle_wildcard(now, remote, local, packet, &mut self.io),
            }
        }
        if let Front::Tcp(t) = &mut self.io.front {
            t.put_back(i, deframer);
            if let Some(reason) = closing {
                t.doom(i, reason);
            }
        }
    }

    fn read_upstream(&mut self, now: Instant, index: usize) {
        match self.io.upstreams.get_mut(index).and_then(Option::as_mut) {
            Some(UpstreamSocket::Udp(_)) => {}
            Some(UpstreamSocket::Stream(c)) => {
                let ready = c.on_ready(&mut self.buf, &self.io.poller, now);
                let closed_why = c.closed_why();
                let current = &self.io.current;
                let upstream = || {
                    current
                        .common
                        .upstreams
                        .get(engine::link_of(index))
                        .map_or_else(String::new, |u| u.name.clone())
                };
                if let Some(event) = ready.opened {
                    self.io
                        .shared
                        .metrics
                        .upstream_connections
                        .get_or_create(&UpstreamEventLabel {
                            upstream: upstream(),
                            event,
                        })
                        .inc();
                }
                if ready.closed {
                    self.io
                        .shared
                        .metrics
                        .upstream_connections
                        .get_or_create(&UpstreamEventLabel {
                            upstream: upstream(),
                            event: closed_why,
                        })
                        .inc();
                }
                if let Some(v11) = ready.negotiated {
                    // What waited was prepared for the protocol the link spoke so far;
                    // if the handshake chose the other, the engine prepares it again.
                    let changed =
                        self.engine
                            .handle_upstream_version(now, index, v11, &mut self.io);
                    if let Some(Some(UpstreamSocket::Stream(c))) = self.io.upstreams.get_mut(index)
                    {
                        c.confirm(changed, &self.io.poller);
                    }
                }
                for reply in &ready.replies {
                    self.engine.handle_upstream(now, index, reply);
                }
                if ready.closed {
                    // Its requests go anew, on the next connection.
                    self.engine.handle_upstream_closed(now, index, &mut self.io);
                }
                return;
            }
            None => return,
        }
        for _ in 0..READ_BUDGET / socket::RecvBatch::DATAGRAMS {
            let Some(Some(UpstreamSocket::Udp(sock))) = self.io.upstreams.get(index) else {
                return;
            };
            let Ok(got) = self.batch.recv(sock) else {
                return;
            };
            for i in 0..got {
                self.engine.handle_upstream(now, index, self.batch.data(i));
            }
            // A short batch: the socket is empty (no call that would fail with EAGAIN).
            if got < socket::RecvBatch::DATAGRAMS {
                return;
            }
        }
    }

    /// Connections to upstreams that closed are made again once their backoff passed; the
    /// watchdog looks at the open ones, and what it closes has its requests sent anew.
    fn reconnect_upstreams(&mut self, now: Instant) {
        let mut silent = Vec::new();
        for (index, u) in self.io.upstreams.iter_mut().enumerate() {
            if let Some(UpstreamSocket::Stream(c)) = u {
                if c.watchdog(&self.io.poller, now) {
                    silent.push(index);
                }
                c.poll(&self.io.poller, now);
            }
        }
        for index in silent {
            let upstream = self
                .io
                .current
                .common
                .upstreams
                .get(engine::link_of(index))
                .map_or_else(String::new, |u| u.name.clone());
            self.io
                .shared
                .metrics
                .upstream_connections
                .get_or_create(&UpstreamEventLabel {
                    upstream,
                    event: "watchdog",
                })
                .inc();
            self.engine.handle_upstream_closed(now, index, &mut self.io);
        }
    }

    /// The end of a round: what the engine queued is sent, the connections doomed in it
    /// are closed.
    fn flush(&mut self, now: Instant) {
        self.send(now);
        // Connections closed this round: their flows end (what the engine queues meanwhile
        // for other flows goes at the next flush).
        if let Front::Tcp(tcp) = &mut self.io.front {
            let closed = tcp.close_doomed(&self.io.poller, &self.io.shared.metrics);
            for (remote, local) in closed {
                self.engine.handle_closed(now, remote, local, &mut self.io);
            }
        }
    }

    /// Sends what the engine queued: requests with one `sendmmsg` per upstream socket,
    /// answers to NASes with one on the wildcard (or a write per connection). A request
    /// the kernel refuses goes back to the engine.
    fn send(&mut self, now: Instant) {
        let mut t = self.engine.poll_transmits();
        if t.is_empty() {
            self.engine.recycle(t);
            return;
        }
        let metrics = &self.io.shared.metrics;
        t.upstream.sort_by_key(|&(at, ..)| at.socket);
        let mut failed: Vec<At> = Vec::new();
        for group in t.upstream.chunk_by(|a, b| a.0.socket == b.0.socket) {
            let index = group[0].0.socket;
            let sock = match self.io.upstreams.get_mut(index).and_then(Option::as_mut) {
                Some(UpstreamSocket::Udp(sock)) => sock,
                Some(UpstreamSocket::Stream(c)) => {
                    for &(at, off, len) in group {
                        if c.send(t.data(off, len), &self.io.poller) {
                            metrics.forwarded.inc();
                        } else {
                            failed.push(at);
                        }
                    }
                    continue;
                }
                None => {
                    failed.extend(group.iter().map(|g| g.0));
                    continue;
                }
            };
            let batch = group.iter().map(|&(_, off, len)| socket::Outgoing {
                to: None,
                from: None,
                data: t.data(off, len),
            });
            let sent = socket::send_batch(&*sock, batch, &mut self.io.send_arrays, |i, e| {
                debug!(error = %e, "request not sent upstream");
                failed.push(group[i].0);
            });
            metrics.forwarded.inc_by(sent as u64);
        }
        self.io.send_to_nases(&t);
        self.engine.recycle(t);
        for at in failed {
            self.engine.send_failed(now, at, &mut self.io);
        }
    }
}

impl Sockets {
    /// Answers to NASes: one `sendmmsg` on the wildcard, or a write per connection.
    fn send_to_nases(&mut self, t: &Transmits) {
        let metrics = &self.shared.metrics;
        let wildcard = match &mut self.front {
            Front::Udp { wildcard, .. } => wildcard,
            Front::Tcp(tcp) => {
                for &(remote, local, off, len) in &t.nas {
                    if tcp.send(remote, local, t.data(off, len), &self.poller) {
                        metrics.relayed.inc();
                    } else {
                        metrics.proxy_drop("connection_closed");
                    }
                }
                return;
            }
        };
        let any = self.bound.ip().is_unspecified();
        let batch = t
            .nas
            .iter()
            .map(|&(remote, local, off, len)| socket::Outgoing {
                to: Some(remote),
                from: any.then_some(local.ip()),
                data: t.data(off, len),
            });
        let sent = socket::send_batch(&*wildcard, batch, &mut self.send_arrays, |i, e| {
            metrics.proxy_drop("send_to_nas");
            debug!(remote = %t.nas[i].0, error = %e, "reply not sent");
        });
        metrics.relayed.inc_by(sent as u64);
    }
}

/// Asks the directory about `ip` and tells every worker the outcome.
fn spawn_definition(
    runtime: &tokio::runtime::Handle,
    shared: Arc<Shared>,
    current: Arc<Current>,
    ip: IpAddr,
) {
    info!(%ip, "defining a dynamic client");
    // Not in a JoinSet: a definition outlives no shutdown wait.
    runtime.spawn(async move {
        let Some(dynamic) = &current.dynamic else {
            return;
        };
        let outcome = dynamic.define(ip).await;
        match &outcome {
            Ok(c) => {
                shared.metrics.definition("defined");
                info!(%ip, client = %c.name, "dynamic client defined");
                shared.metrics.set_message_authenticator_required(
                    "client",
                    &c.name,
                    c.requires_message_authenticator(),
                );
            }
            Err(r) => {
                let (reason, seconds) = (&r.reason, r.remembered.as_secs());
                match r.why {
                    NotDefined::Refused => {
                        shared.metrics.definition("refused");
                        warn!(%ip, %reason, seconds, "dynamic client refused");
                    }
                    NotDefined::Unanswered => {
                        shared.metrics.definition("unanswered");
                        warn!(%ip, %reason, seconds, "dynamic client not defined: the directory failed or did not answer");
                    }
                }
                if let Some(fp) = &shared.fastpath
                    && let Err(e) = lock(fp).add_negative(ip, r.remembered)
                {
                    debug!(%ip, error = %e, "no negative entry");
                }
            }
        }
        let outcome = outcome.map_err(|r| r.reason);
        for inbox in &shared.defined {
            inbox.send(ToWorker::Defined(Defined {
                ip,
                outcome: outcome.clone(),
            }));
        }
    });
}

/// The calling thread's name (at most 15 bytes, the kernel's limit) until dropped, when the
/// one before comes back: workers run on tokio's blocking pool, whose threads return to it.
struct ThreadName([u8; 16]);

impl ThreadName {
    fn set(name: &str) -> Self {
        let mut old = [0u8; 16];
        // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer given.
        unsafe { libc::prctl(libc::PR_GET_NAME, old.as_mut_ptr()) };
        let mut new = [0u8; 16];
        let n = name.len().min(15);
        new[..n].copy_from_slice(&name.as_bytes()[..n]);
        // SAFETY: a NUL-terminated buffer of 16 bytes.
        unsafe { libc::prctl(libc::PR_SET_NAME, new.as_ptr()) };
        Self(old)
    }
}

impl Drop for ThreadName {
    fn drop(&mut self) {
        // SAFETY: the NUL-terminated name PR_GET_NAME gave.
        unsafe { libc::prctl(libc::PR_SET_NAME, self.0.as_ptr()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_names_its_thread_and_gives_the_old_name_back() {
        std::thread::Builder::new()
            .name("pool-thread".into())
            .spawn(|| {
                let comm = || std::fs::read_to_string("/proc/thread-self/comm").unwrap();
                {
                    let _n = ThreadName::set("radius-w12345678901");
                    assert_eq!(comm().trim_end(), "radius-w1234567");
                }
                assert_eq!(comm().trim_end(), "pool-thread");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn tokens_keep_kind_and_index_apart() {
        let t = token(CHILD, 12345);
        assert_eq!(t >> KIND_SHIFT, CHILD);
        assert_eq!(t & ((1 << KIND_SHIFT) - 1), 12345);
    }
}
