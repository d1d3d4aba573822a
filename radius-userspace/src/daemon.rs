//! The daemon's run loop, the thin tokio driver around [`crate::socket`] and
//! [`crate::fastpath`]: it chooses the steering path, binds the wildcards, and runs one
//! worker task per wildcard and one task per flow.
//!
//! A worker owns the flow table of the flows that land on its wildcard (steer and the
//! reuseport filter keep a flow on one worker). A packet of a new flow creates the flow: a
//! child socket (registered in `CHILDREN` on the fast path, `connect()`ed otherwise) and a
//! task. Packets that still reach the wildcard for a known flow (its first one, and those
//! queued before the child existed) are injected into the flow's task over a channel, as if
//! read from the child. A flow belongs to the client whose prefix holds its source (none:
//! dropped and counted). Its task hands each request, prepared by [`crate::proxy`], to the
//! client's upstream task, which owns the Identifier space and the upstream sockets, and
//! gets the finished reply back to send from the child.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use bytes::Bytes;
use radius_common::{FlowKey, PROTO_UDP};
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::mpsc,
    task::JoinSet,
    time::{Instant, sleep_until},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    client::{self as clients, Binding, Client, ClientTable},
    config::Config,
    fastpath::{FastPath, FastPathOptions},
    metrics::{self, Metrics, Refusal, Via},
    proxy::{self, IdPool, InFlight, Prepared, Upstream},
    socket::{self, SteeringPath},
};

/// Whether to use the eBPF fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EbpfMode {
    /// Use it when it loads; otherwise say why and run the user-space path.
    Auto,
    /// Never load it (`--no-ebpf`).
    Off,
    /// Refuse to start without it (`--require-ebpf`).
    Require,
}

/// What the run loop needs. The TOML configuration will produce this.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// UDP services to listen on (address and port of the wildcards).
    pub listen: Vec<SocketAddr>,
    /// Wildcard sockets (worker tasks) per listen address.
    pub workers: usize,
    /// NIC for `guard`; none: no XDP.
    pub iface: Option<String>,
    pub ebpf: EbpfMode,
    /// A flow with no packet for this long ends and closes its child.
    pub idle_timeout: Duration,
    /// Upper bound on flows; the open-file limit may lower it.
    pub max_flows: Option<usize>,
    /// Packets queued per flow before its task takes them.
    pub flow_queue: usize,
    /// Receive buffer of each wildcard, bytes.
    pub wildcard_rcvbuf: usize,
    /// `guard`'s limit for sources without a flow: packets per second and burst (0: off).
    pub new_source_pps: u64,
    pub new_source_burst: u64,
    /// Where to serve `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 1812)),
                SocketAddr::from(([127, 0, 0, 1], 1813)),
            ],
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            iface: Some("lo".into()),
            ebpf: EbpfMode::Auto,
            idle_timeout: Duration::from_secs(300),
            max_flows: None,
            flow_queue: 1024,
            wildcard_rcvbuf: 4 << 20,
            new_source_pps: 2_000,
            new_source_burst: 4_000,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9812))),
        }
    }
}

/// File descriptors kept back from flows: wildcards, metrics, eBPF maps and programs, logs.
const FD_RESERVE: u64 = 128;

/// What a running daemon shares between its tasks.
struct Shared {
    path: SteeringPath,
    clients: ClientTable,
    dynamic: Option<crate::dynamic::DynamicClients>,
    /// One channel per worker, for the outcome of dynamic definitions.
    defined: Vec<mpsc::UnboundedSender<Defined>>,
    /// Packets kept, in all workers, while their sources are being defined.
    pending_packets: AtomicUsize,
    /// One channel per upstream task, by upstream name.
    upstreams: HashMap<String, mpsc::Sender<ToUpstream>>,
    /// The Proxy-State this sidecar adds (random per start, RFC 2865 5.33).
    proxy_state: [u8; 8],
    fastpath: Option<Mutex<FastPath>>,
    metrics: Arc<Metrics>,
    active: AtomicUsize,
    max_flows: usize,
    idle_timeout: Duration,
    flow_queue: usize,
    cancel: CancellationToken,
}

/// Sets up the fast path (or says why not), serves until `cancel`, then drains and detaches.
pub async fn run(full: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let Config {
        daemon: config,
        upstreams,
        clients,
        dynamic,
    } = full;
    let metrics = Metrics::new();
    let nofile = socket::raise_nofile_limit().context("reading RLIMIT_NOFILE")?;
    let fd_bound = nofile.saturating_sub(FD_RESERVE) as usize;
    let max_flows = config.max_flows.map_or(fd_bound, |m| m.min(fd_bound));
    info!(
        open_files_limit = nofile,
        max_flows, "open-file limit {nofile}: at most {max_flows} flows (one socket each)"
    );
    metrics.open_files_limit.set(nofile as i64);
    metrics.max_flows.set(max_flows as i64);

    let fastpath = setup_fastpath(&config, max_flows)?;
    let path = if fastpath.is_some() {
        SteeringPath::Fast
    } else {
        SteeringPath::UserSpace
    };
    metrics.fast_path.set(i64::from(fastpath.is_some()));

    let mut proxy_state = [0u8; 8];
    crate::codec::auth::fill_random(&mut proxy_state);
    let mut upstream_txs = HashMap::new();
    let mut upstream_rxs = Vec::new();
    for u in &upstreams {
        let (tx, rx) = mpsc::channel(4096);
        upstream_txs.insert(u.name.clone(), tx);
        upstream_rxs.push((u.clone(), rx));
    }
    info!(
        clients = clients.len(),
        upstreams = upstreams.len(),
        "configuration loaded"
    );
    // Every worker hears about every definition: a source's flows can land on any of them.
    let workers_per_listener = config.workers.max(1);
    let n_workers = config.listen.len() * workers_per_listener;
    let (defined_txs, mut defined_rxs): (Vec<_>, Vec<_>) = (0..n_workers)
        .map(|_| mpsc::unbounded_channel::<Defined>())
        .unzip();
    let shared = Arc::new(Shared {
        path,
        clients,
        dynamic,
        defined: defined_txs,
        pending_packets: AtomicUsize::new(0),
        upstreams: upstream_txs,
        proxy_state,
        fastpath: fastpath.map(Mutex::new),
        metrics: metrics.clone(),
        active: AtomicUsize::new(0),
        max_flows,
        idle_timeout: config.idle_timeout,
        flow_queue: config.flow_queue.max(1),
        cancel: cancel.clone(),
    });

    let mut tasks = JoinSet::new();
    for (u, rx) in upstream_rxs {
        let socks = UpstreamSockets::bind(&u)
            .await
            .with_context(|| format!("opening sockets to upstream {}", u.name))?;
        tasks.spawn(upstream_task(shared.clone(), u.clone(), socks, rx));
        tokio::spawn(probe_upstream(u));
    }
    for &addr in &config.listen {
        let wildcards = socket::bind_wildcards(addr, config.workers, config.wildcard_rcvbuf)
            .with_context(|| format!("binding the wildcard sockets of {addr}"))?;
        let bound = wildcards[0].local_addr()?;
        if let Some(fp) = &shared.fastpath {
            lock(fp)
                .add_service(PROTO_UDP, bound, &wildcards)
                .with_context(|| format!("registering {bound} with steer"))?;
        }
        info!(listen = %bound, workers = wildcards.len(), path = path.as_str(), "listening");
        for (i, w) in wildcards.into_iter().enumerate() {
            let socket = UdpSocket::from_std(w)?;
            let defined = defined_rxs
                .pop()
                .context("more wildcards than worker channels")?;
            tasks.spawn(worker(shared.clone(), socket, bound, i, defined));
        }
    }
    if let Some(addr) = config.metrics_listen {
        let (m, c) = (metrics.clone(), cancel.clone());
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(addr, m, c).await {
                warn!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    if let Some(fp) = &shared.fastpath {
        tasks.spawn(poll_kernel_counters(shared.clone()));
        if let Some(logger) = lock(fp).take_logger() {
            tasks.spawn(forward_ebpf_logs(logger, cancel.clone()));
        }
    }

    cancel.cancelled().await;
    info!("shutting down: draining flows");
    while tasks.join_next().await.is_some() {}
    let shared = Arc::into_inner(shared).context("a task still holds the daemon state")?;
    if let Some(fp) = shared.fastpath {
        let fp = fp.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Ok(c) = fp.counters() {
            metrics.set_kernel(&c);
        }
        fp.detach();
        info!("eBPF programs detached");
    }
    info!(flows = metrics.flows_created.get(), "stopped");
    Ok(())
}

fn setup_fastpath(config: &DaemonConfig, max_flows: usize) -> anyhow::Result<Option<FastPath>> {
    if config.ebpf == EbpfMode::Off {
        warn!("fast path off (--no-ebpf): steering in user space (connected children)");
        return Ok(None);
    }
    let opts = FastPathOptions {
        max_flows: u32::try_from(max_flows).unwrap_or(u32::MAX).max(1),
        rate_pps: config.new_source_pps,
        burst: config.new_source_burst,
    };
    let attempt = (|| {
        let mut fp = FastPath::load(&opts)?;
        fp.attach_steer()?;
        let guard = match &config.iface {
            Some(iface) => Some((iface.clone(), fp.attach_guard(iface)?)),
            None => None,
        };
        Ok::<_, crate::fastpath::FastPathError>((fp, guard))
    })();
    match attempt {
        Ok((fp, guard)) => {
            match guard {
                Some((iface, mode)) => info!(
                    iface,
                    xdp_mode = ?mode,
                    "fast path on: steer attached to this network namespace, guard on {iface}"
                ),
                None => info!("fast path on: steer attached; no --iface, so no guard (XDP)"),
            }
            Ok(Some(fp))
        }
        Err(e) => {
            let reason = e.unavailable_reason();
            if config.ebpf == EbpfMode::Require {
                if let Some(log) = e.verifier_log() {
                    tracing::error!("verifier log:\n{log}");
                }
                anyhow::bail!("--require-ebpf: the fast path is unavailable: {reason}");
            }
            warn!("fast path unavailable, steering in user space instead: {reason}");
            if let Some(log) = e.verifier_log() {
                warn!("verifier log:\n{log}");
            }
            Ok(None)
        }
    }
}

fn lock(fp: &Mutex<FastPath>) -> std::sync::MutexGuard<'_, FastPath> {
    // A panic elsewhere must not stop steering; the maps stay consistent per call.
    fp.lock().unwrap_or_else(|p| p.into_inner())
}

async fn poll_kernel_counters(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.cancel.cancelled() => return,
        }
        if let Some(fp) = &shared.fastpath
            && let Ok(c) = lock(fp).counters()
        {
            shared.metrics.set_kernel(&c);
        }
    }
}

/// Moves the programs' `aya-log` events into `tracing` (target `radius_ebpf`).
async fn forward_ebpf_logs(logger: crate::fastpath::EbpfLogger, cancel: CancellationToken) {
    // SAFETY: the logger owns its ring-buffer fd and lives inside the AsyncFd until it is
    // deregistered on drop.
    let registered =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the eBPF log buffer; program log events are lost");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(_) => return,
            },
            () = cancel.cancelled() => return,
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// The ways back from a flow task to its worker.
#[derive(Clone)]
struct FlowSenders {
    /// "I have been idle": the worker forgets the flow, then drops its sender.
    ended: mpsc::UnboundedSender<FlowKey>,
    /// A datagram the child got from another peer, to be handled as a wildcard's.
    foreign: mpsc::UnboundedSender<(socket::Received, Bytes)>,
}

/// A flow as its worker sees it.
struct FlowEntry {
    tx: mpsc::Sender<Bytes>,
}

/// The outcome of a dynamic definition, sent to every worker.
#[derive(Clone, Debug)]
struct Defined {
    ip: std::net::IpAddr,
    outcome: Result<Arc<Client>, String>,
}

/// A flow whose source is being defined: its packets in arrival order.
struct PendingFlow {
    remote: SocketAddr,
    local: SocketAddr,
    packets: Vec<Bytes>,
}

/// One wildcard's state: its flows, the flows waiting for a definition, their tasks.
struct Worker {
    shared: Arc<Shared>,
    bound: SocketAddr,
    flows: HashMap<FlowKey, FlowEntry>,
    pending: HashMap<FlowKey, PendingFlow>,
    senders: FlowSenders,
    tasks: JoinSet<()>,
}

/// Reads one wildcard: creates flows and injects packets into them.
async fn worker(
    shared: Arc<Shared>,
    socket: UdpSocket,
    bound: SocketAddr,
    index: usize,
    mut defined: mpsc::UnboundedReceiver<Defined>,
) {
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<FlowKey>();
    let (foreign_tx, mut foreign_rx) = mpsc::unbounded_channel::<(socket::Received, Bytes)>();
    let mut w = Worker {
        shared: shared.clone(),
        bound,
        flows: HashMap::new(),
        pending: HashMap::new(),
        senders: FlowSenders {
            ended: ended_tx,
            foreign: foreign_tx,
        },
        tasks: JoinSet::new(),
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            r = socket.async_io(Interest::READABLE, || {
                socket::recv_from_to(&socket, &mut buf, bound)
            }) => {
                match r {
                    Ok(rx) => {
                        let data = Bytes::copy_from_slice(&buf[..rx.len]);
                        w.on_packet(rx, data);
                    }
                    Err(e) => debug!(worker = index, error = %e, "wildcard receive failed"),
                }
            }
            Some(key) = ended_rx.recv() => {
                // Unregister first so later packets reach the wildcard and start a new flow;
                // dropping the sender lets the task drain and close its child.
                if let Some(fp) = &shared.fastpath {
                    lock(fp).unregister_child(&key);
                }
                w.flows.remove(&key);
            }
            Some((rx, data)) = foreign_rx.recv() => {
                // A child's datagram from another peer (see socket::is_own_datagram).
                shared.metrics.misdelivered.inc();
                w.on_packet(rx, data);
            }
            Some(d) = defined.recv() => w.on_defined(d),
            Some(_) = w.tasks.join_next(), if !w.tasks.is_empty() => {}
            () = shared.cancel.cancelled() => break,
        }
    }
    drop(w.flows);
    while w.tasks.join_next().await.is_some() {}
}

impl Worker {
    fn on_packet(&mut self, rx: socket::Received, data: Bytes) {
        let shared = self.shared.clone();
        let key = socket::flow_key(rx.remote, rx.local);
        if let Some(flow) = self.flows.get(&key) {
            inject(&shared, &flow.tx, data);
            return;
        }
        if let Some(p) = self.pending.get_mut(&key) {
            keep_pending(&shared, p, data);
            return;
        }
        if let Some(binding) = shared.clients.binding(rx.remote.ip()) {
            self.create_flow(rx.remote, rx.local, binding, vec![data]);
            return;
        }
        let Some(dynamic) = &shared.dynamic else {
            shared.metrics.refuse(Refusal::UnknownClient);
            debug!(remote = %rx.remote, "no client for this source: dropped");
            return;
        };
        use crate::dynamic::Resolution;
        match dynamic.resolve(rx.remote.ip(), std::time::Instant::now()) {
            Resolution::Client(client) => {
                self.create_flow(rx.remote, rx.local, Binding::One(client), vec![data])
            }
            Resolution::Refused => shared.metrics.refuse(Refusal::DirectoryRefused),
            Resolution::NotDynamic => {
                shared.metrics.refuse(Refusal::UnknownClient);
                debug!(remote = %rx.remote, "no client for this source: dropped");
            }
            Resolution::Defining { start } => {
                let mut p = PendingFlow {
                    remote: rx.remote,
                    local: rx.local,
                    packets: Vec::new(),
                };
                keep_pending(&shared, &mut p, data);
                self.pending.insert(key, p);
                if start {
                    let shared = shared.clone();
                    let ip = rx.remote.ip();
                    info!(%ip, "defining a dynamic client");
                    // Not in the worker's JoinSet: a definition outlives no shutdown wait.
                    tokio::spawn(async move {
                        let Some(dynamic) = &shared.dynamic else {
                            return;
                        };
                        let outcome = dynamic.define(ip).await;
                        match &outcome {
                            Ok(c) => info!(%ip, client = %c.name, "dynamic client defined"),
                            Err(reason) => {
                                warn!(%ip, %reason, "dynamic client refused");
                                if let Some(fp) = &shared.fastpath
                                    && let Err(e) = lock(fp).add_negative(ip, dynamic.nak_lifetime)
                                {
                                    debug!(%ip, error = %e, "no negative entry");
                                }
                            }
                        }
                        for tx in &shared.defined {
                            let _ = tx.send(Defined {
                                ip,
                                outcome: outcome.clone(),
                            });
                        }
                    });
                }
            }
        }
    }

    /// A definition finished: make the flows that waited for it, and inject their packets
    /// in arrival order; or drop them, counted, on a refusal.
    fn on_defined(&mut self, d: Defined) {
        let keys: Vec<FlowKey> = self
            .pending
            .iter()
            .filter(|(_, p)| p.remote.ip() == d.ip)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            let Some(p) = self.pending.remove(&key) else {
                continue;
            };
            self.shared
                .pending_packets
                .fetch_sub(p.packets.len(), Ordering::Relaxed);
            match &d.outcome {
                Ok(client) => {
                    self.create_flow(p.remote, p.local, Binding::One(client.clone()), p.packets)
                }
                Err(_) => {
                    for _ in &p.packets {
                        self.shared.metrics.refuse(Refusal::DirectoryRefused);
                    }
                }
            }
        }
    }

    /// Makes a flow: its child socket (registered with steer on the fast path), its task,
    /// and the packets that reached the wildcard for it, injected in order.
    fn create_flow(
        &mut self,
        remote: SocketAddr,
        local: SocketAddr,
        binding: Binding,
        packets: Vec<Bytes>,
    ) {
        let shared = &self.shared;
        let key = socket::flow_key(remote, local);
        // Reserve the slot atomically: workers create flows concurrently.
        let max = shared.max_flows;
        if shared
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            shared.metrics.refuse(Refusal::MaxFlows);
            debug!(%remote, "max_flows reached: packet of a new flow dropped");
            return;
        }
        let release = || shared.active.fetch_sub(1, Ordering::AcqRel);
        let child = match socket::bind_child(shared.path, self.bound, local, remote) {
            Ok(c) => c,
            Err(e) => {
                release();
                shared.metrics.refuse(Refusal::ChildSocket);
                warn!(%remote, %local, error = %e, "no child socket for a new flow");
                return;
            }
        };
        if let Some(fp) = &shared.fastpath {
            use std::os::fd::AsRawFd;
            if let Err(e) = lock(fp).register_child(&key, child.as_raw_fd()) {
                release();
                shared.metrics.refuse(Refusal::Register);
                warn!(%remote, error = %e, "steer cannot take a new flow");
                return;
            }
        }
        let child = match child
            .set_nonblocking(true)
            .and_then(|()| UdpSocket::from_std(child))
        {
            Ok(c) => c,
            Err(e) => {
                if let Some(fp) = &shared.fastpath {
                    lock(fp).unregister_child(&key);
                }
                release();
                shared.metrics.refuse(Refusal::ChildSocket);
                warn!(%remote, error = %e, "child socket not usable");
                return;
            }
        };
        let (tx, rx_chan) = mpsc::channel(shared.flow_queue.max(packets.len()));
        shared.metrics.flows_created.inc();
        shared.metrics.flows_active.inc();
        debug!(%remote, %local, path = shared.path.as_str(), "flow created");
        for data in packets {
            inject(shared, &tx, data);
        }
        self.flows.insert(key, FlowEntry { tx });
        self.tasks.spawn(flow_task(
            FlowCtx {
                shared: shared.clone(),
                key,
                remote,
                local,
                binding,
                bound: None,
            },
            child,
            rx_chan,
            self.senders.clone(),
        ));
    }
}

/// Keeps a packet of a source being defined, within the per-flow and global bounds.
fn keep_pending(shared: &Shared, p: &mut PendingFlow, data: Bytes) {
    let Some(dynamic) = &shared.dynamic else {
        return;
    };
    if p.packets.len() >= dynamic.max_pending_per_flow
        || shared.pending_packets.load(Ordering::Relaxed) >= dynamic.max_pending_packets
    {
        shared.metrics.refuse(Refusal::PendingFull);
        return;
    }
    shared.pending_packets.fetch_add(1, Ordering::Relaxed);
    p.packets.push(data);
}

fn inject(shared: &Shared, tx: &mpsc::Sender<Bytes>, data: Bytes) {
    match tx.try_send(data) {
        Ok(()) => {}
        Err(_) => shared.metrics.refuse(Refusal::QueueFull),
    }
}

/// What a flow task knows about its flow.
struct FlowCtx {
    shared: Arc<Shared>,
    key: FlowKey,
    remote: SocketAddr,
    local: SocketAddr,
    binding: Binding,
    /// The flow's client and its upstream's channel, once known (at once, or for NAT from
    /// the first proven request; the flow keeps it).
    bound: Option<(Arc<Client>, mpsc::Sender<ToUpstream>)>,
}

impl FlowCtx {
    /// The flow's client: known, or learnt from this request (NAT).
    fn client_for(&mut self, packet: &[u8]) -> Option<(Arc<Client>, mpsc::Sender<ToUpstream>)> {
        if let Some(b) = &self.bound {
            return Some(b.clone());
        }
        let client = match &self.binding {
            Binding::One(c) => c.clone(),
            Binding::Nat(candidates) => clients::identify(candidates, packet)?,
        };
        let tx = self.shared.upstreams.get(&client.upstream.name)?.clone();
        if let Binding::Nat(_) = self.binding {
            info!(remote = %self.remote, client = %client.name, "NAS behind a shared address identified");
        }
        self.bound = Some((client, tx));
        self.bound.clone()
    }
}

/// One flow: reads its child and its injection channel, forwards requests, sends replies
/// from the child. Ends when idle (after its worker has forgotten it, so no injected packet
/// is lost) or at shutdown.
async fn flow_task(
    mut ctx: FlowCtx,
    child: UdpSocket,
    mut injected: mpsc::Receiver<Bytes>,
    back: FlowSenders,
) {
    let shared = ctx.shared.clone();
    let (remote, local) = (ctx.remote, ctx.local);
    let (reply_tx, mut replies) = mpsc::channel::<Bytes>(1024);
    let mut buf = vec![0u8; 4096];
    let (mut from_child, mut from_wildcard) = (0u64, 0u64);
    let mut deadline = Instant::now() + shared.idle_timeout;
    let mut ending = false;
    loop {
        tokio::select! {
            r = child.recv_from(&mut buf) => match r {
                Ok((n, from)) if !socket::is_own_datagram(remote, from) => {
                    let rx = socket::Received { len: n, remote: from, local };
                    let _ = back.foreign.send((rx, Bytes::copy_from_slice(&buf[..n])));
                }
                Ok((n, _)) => {
                    from_child += 1;
                    shared.metrics.packet(Via::Child);
                    deadline = Instant::now() + shared.idle_timeout;
                    forward(&mut ctx, &reply_tx, &mut buf, n);
                }
                Err(_) => {}
            },
            m = injected.recv() => match m {
                Some(packet) => {
                    from_wildcard += 1;
                    shared.metrics.packet(Via::Wildcard);
                    deadline = Instant::now() + shared.idle_timeout;
                    let n = packet.len().min(buf.len());
                    buf[..n].copy_from_slice(&packet[..n]);
                    forward(&mut ctx, &reply_tx, &mut buf, n);
                }
                // The worker forgot us: nothing more will be injected.
                None => break,
            },
            Some(reply) = replies.recv() => {
                if let Err(e) = child.send_to(&reply, remote).await {
                    shared.metrics.proxy_drop("send_to_nas");
                    debug!(%remote, error = %e, "reply not sent");
                } else {
                    shared.metrics.relayed.inc();
                }
            }
            () = sleep_until(deadline), if !ending => {
                ending = true;
                if back.ended.send(ctx.key).is_err() {
                    break;
                }
            }
            () = shared.cancel.cancelled() => break,
        }
    }
    // What reached the child before it closes still counts.
    while let Ok((n, from)) = child.try_recv_from(&mut buf) {
        if socket::is_own_datagram(remote, from) {
            from_child += 1;
            shared.metrics.packet(Via::Child);
        } else {
            let rx = socket::Received {
                len: n,
                remote: from,
                local,
            };
            let _ = back.foreign.send((rx, Bytes::copy_from_slice(&buf[..n])));
        }
    }
    shared.active.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.flows_ended.inc();
    shared.metrics.flows_active.dec();
    debug!(%remote, from_child, from_wildcard, "flow ended");
}

/// Prepares the request in `buf[..n]` for the client's upstream and hands it over.
fn forward(ctx: &mut FlowCtx, reply_tx: &mpsc::Sender<Bytes>, buf: &mut [u8], n: usize) {
    let Some((client, to_upstream)) = ctx.client_for(&buf[..n]) else {
        ctx.shared.metrics.proxy_drop("nat_unproven");
        return;
    };
    let shared = &ctx.shared;
    match proxy::prepare_request(&client, &shared.proxy_state, buf, n) {
        Ok(prepared) => {
            let msg = ToUpstream {
                packet: Bytes::copy_from_slice(&buf[..prepared.len]),
                prepared,
                client: client.clone(),
                reply_to: reply_tx.clone(),
            };
            if to_upstream.try_send(msg).is_err() {
                shared.metrics.proxy_drop("upstream_queue_full");
            }
        }
        Err(e) => {
            shared.metrics.proxy_drop(e.reason());
            debug!(remote = %ctx.remote, client = %client.name, error = %e, "request not forwarded");
        }
    }
}

/// A prepared request on its way to an upstream task.
struct ToUpstream {
    packet: Bytes,
    prepared: Prepared,
    client: Arc<Client>,
    reply_to: mpsc::Sender<Bytes>,
}

/// The upstream's sockets: one connected socket per port (auth, acct), each with its own
/// Identifier space.
struct UpstreamSockets {
    auth: UdpSocket,
    acct: Option<UdpSocket>,
}

impl UpstreamSockets {
    async fn bind(u: &Upstream) -> std::io::Result<Self> {
        async fn one(to: SocketAddr) -> std::io::Result<UdpSocket> {
            let any: SocketAddr = if to.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let s = UdpSocket::bind(any).await?;
            s.connect(to).await?;
            Ok(s)
        }
        Ok(Self {
            auth: one(u.auth).await?,
            acct: match u.acct {
                Some(a) => Some(one(a).await?),
                None => None,
            },
        })
    }
}

type Pending = InFlight<mpsc::Sender<Bytes>>;

/// Asks an upstream once, at start, whether it is there (RFC 5997 Status-Server), and says
/// so plainly either way: a missing or misconfigured AAA server should not look like NASes
/// timing out.
async fn probe_upstream(u: Arc<Upstream>) {
    let outcome = async {
        let any: SocketAddr = if u.auth.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any).await.map_err(|e| e.to_string())?;
        sock.connect(u.auth).await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4096];
        let (req, auth) = {
            let p = crate::codec::edit::status_server(&mut buf, 0, &u.secret)
                .map_err(|e| e.to_string())?;
            (p.as_bytes().to_vec(), p.authenticator())
        };
        sock.send(&req).await.map_err(|e| e.to_string())?;
        let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
            .await
            .map_err(|_| "no answer in 2 s".to_owned())?
            .map_err(|e| e.to_string())?;
        let reply = crate::codec::Packet::parse(&buf[..n]).map_err(|e| e.to_string())?;
        crate::codec::auth::verify(&reply, &u.secret, Some(&auth))
            .map_err(|e| format!("an answer that does not verify ({e}): check the secret"))?;
        Ok::<_, String>(())
    }
    .await;
    match outcome {
        Ok(()) => info!(upstream = %u.name, addr = %u.auth, "upstream answers Status-Server"),
        Err(why) => warn!(
            upstream = %u.name,
            addr = %u.auth,
            "upstream did not answer Status-Server: {why}; is it running, does it list the \
             sidecar as a client with this secret, and is status_server enabled?"
        ),
    }
}

/// Owns one upstream: its sockets and Identifier spaces. Signs requests, checks replies.
async fn upstream_task(
    shared: Arc<Shared>,
    upstream: Arc<Upstream>,
    socks: UpstreamSockets,
    mut requests: mpsc::Receiver<ToUpstream>,
) {
    let mut auth_ids: IdPool<Pending> = IdPool::default();
    let mut acct_ids: IdPool<Pending> = IdPool::default();
    let mut buf = vec![0u8; 4096];
    let mut rbuf = vec![0u8; 4096];
    let mut abuf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let acct_sock = socks.acct.as_ref();
    loop {
        tokio::select! {
            Some(req) = requests.recv() => {
                let is_acct = req.prepared.code == crate::codec::Code::AccountingRequest;
                let (pool, sock) = match (is_acct, acct_sock) {
                    (false, _) => (&mut auth_ids, &socks.auth),
                    (true, Some(a)) => (&mut acct_ids, a),
                    (true, None) => {
                        shared.metrics.proxy_drop("no_acct_upstream");
                        continue;
                    }
                };
                send_upstream(&shared, &upstream, pool, sock, req, &mut buf).await;
            }
            r = socks.auth.recv(&mut rbuf) => {
                if let Ok(n) = r {
                    on_reply(&shared, &upstream, &mut auth_ids, &mut rbuf, n);
                }
            }
            r = async { acct_sock?.recv(&mut abuf).await.ok() } , if acct_sock.is_some() => {
                if let Some(n) = r {
                    on_reply(&shared, &upstream, &mut acct_ids, &mut abuf, n);
                }
            }
            _ = tick.tick() => {
                let now = std::time::Instant::now();
                let timeout = upstream.timeout;
                for pool in [&mut auth_ids, &mut acct_ids] {
                    for _ in pool.expire(|p| now.duration_since(p.sent_at) > timeout) {
                        shared.metrics.proxy_drop("upstream_timeout");
                    }
                }
            }
            () = shared.cancel.cancelled() => break,
        }
    }
}

async fn send_upstream(
    shared: &Shared,
    upstream: &Upstream,
    pool: &mut IdPool<Pending>,
    sock: &UdpSocket,
    req: ToUpstream,
    buf: &mut [u8],
) {
    let len = req.packet.len();
    buf[..len].copy_from_slice(&req.packet);
    let pending = InFlight {
        client: req.client,
        prepared: req.prepared,
        up_auth: [0; 16],
        sent_at: std::time::Instant::now(),
        reply_to: req.reply_to,
    };
    let Ok(id) = pool.allocate(pending) else {
        // 256 in flight on this socket; more sockets per upstream come with the proxy issue.
        shared.metrics.proxy_drop("upstream_ids_exhausted");
        return;
    };
    match proxy::finalize_request(buf, len, id, upstream) {
        Ok(up_auth) => {
            if let Some(p) = pool.get_mut(id) {
                p.up_auth = up_auth;
            }
            if sock.send(&buf[..len]).await.is_ok() {
                shared.metrics.forwarded.inc();
            } else {
                pool.take(id);
                shared.metrics.proxy_drop("send_to_upstream");
            }
        }
        Err(e) => {
            pool.take(id);
            shared.metrics.proxy_drop(e.reason());
        }
    }
}

fn on_reply(
    shared: &Shared,
    upstream: &Upstream,
    pool: &mut IdPool<Pending>,
    buf: &mut [u8],
    n: usize,
) {
    if n < 20 {
        shared.metrics.proxy_drop("reply_malformed");
        return;
    }
    let id = buf[1];
    let Some(pending) = pool.get(id) else {
        shared.metrics.proxy_drop("reply_unknown_id");
        return;
    };
    match proxy::process_reply(buf, n, upstream, pending, &shared.proxy_state) {
        Ok(len) => {
            if let Some(p) = pool.take(id)
                && p.reply_to
                    .try_send(Bytes::copy_from_slice(&buf[..len]))
                    .is_err()
            {
                shared.metrics.proxy_drop("flow_gone");
            }
        }
        // A forged or broken reply does not cancel the request: the real one may follow.
        Err(e) => {
            shared.metrics.proxy_drop(e.reason());
            warn!(upstream = %upstream.name, error = %e, "reply dropped");
        }
    }
}
