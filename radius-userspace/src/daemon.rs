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
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use anyhow::Context as _;
use radius_common::PROTO_UDP;
use tokio::{io::Interest, net::UdpSocket, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    client::ClientTable,
    config::Config,
    fastpath::{FastPath, FastPathOptions},
    metrics::{self, Metrics},
    socket::{self, SteeringPath},
    upstream::Upstream,
    worker,
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

/// What a listener serves, which decides how a NAS's Status-Server is answered (RFC 5997:
/// Access-Accept on an authentication port, Accounting-Response on an accounting port).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    Auth,
    Acct,
    /// By port number: 1813 and 1646 are accounting, any other authentication.
    #[default]
    Auto,
}

impl Role {
    /// Whether a listener of this role on `port` is an accounting one.
    pub fn is_accounting(self, port: u16) -> bool {
        match self {
            Role::Auth => false,
            Role::Acct => true,
            Role::Auto => matches!(port, 1813 | 1646),
        }
    }
}

/// A UDP address NASes send to, and its role: written `ADDR:PORT` (role by port) or
/// `ADDR:PORT/auth`, `ADDR:PORT/acct`, `ADDR:PORT/auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    pub role: Role,
}

impl From<SocketAddr> for Listener {
    fn from(addr: SocketAddr) -> Self {
        Self {
            addr,
            role: Role::Auto,
        }
    }
}

impl std::str::FromStr for Listener {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, role) = match s.rsplit_once('/') {
            Some((a, r)) => (a, r),
            None => (s, "auto"),
        };
        let role = match role {
            "auth" => Role::Auth,
            "acct" => Role::Acct,
            "auto" => Role::Auto,
            other => {
                return Err(format!(
                    "`{other}`: a listener's role is \"auth\", \"acct\" or \"auto\""
                ));
            }
        };
        let addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an address:port"))?;
        Ok(Self { addr, role })
    }
}

/// What the run loop needs. The TOML configuration will produce this.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// UDP services to listen on (address and port of the wildcards), with their roles.
    pub listen: Vec<Listener>,
    /// Wildcard sockets (worker tasks) per listen address.
    pub workers: usize,
    /// NIC for `guard`; none: no XDP.
    pub iface: Option<String>,
    pub ebpf: EbpfMode,
    /// A flow with no packet for this long ends and closes its child.
    pub idle_timeout: Duration,
    /// How long a reply is kept to answer NAS retransmissions (RFC 5080).
    pub cleanup_delay: Duration,
    /// Upper bound on flows; the open-file limit may lower it.
    pub max_flows: Option<usize>,
    /// Most flows that have not proved their client's secret (none: as many as
    /// `max_flows`). They hold no socket.
    pub max_provisional_flows: Option<usize>,
    /// A provisional flow with no packet for this long ends (at least `cleanup_delay`).
    pub provisional_idle_timeout: Duration,
    /// Receive buffer of each wildcard, bytes.
    pub wildcard_rcvbuf: usize,
    /// `guard`'s limit for sources without a flow: packets per second and burst (0: off).
    pub new_source_pps: u64,
    pub new_source_burst: u64,
    /// Where to serve `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Where upstreams send CoA and Disconnect requests (RFC 5176); none: no listener.
    pub coa_listen: Option<SocketAddr>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                SocketAddr::from(([127, 0, 0, 1], 1812)).into(),
                SocketAddr::from(([127, 0, 0, 1], 1813)).into(),
            ],
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            iface: Some("lo".into()),
            ebpf: EbpfMode::Auto,
            idle_timeout: Duration::from_secs(300),
            cleanup_delay: Duration::from_secs(5),
            max_flows: None,
            max_provisional_flows: None,
            provisional_idle_timeout: Duration::from_secs(10),
            wildcard_rcvbuf: 4 << 20,
            new_source_pps: 2_000,
            new_source_burst: 4_000,
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9812))),
            coa_listen: None,
        }
    }
}

/// File descriptors kept back from flows: wildcards, metrics, eBPF maps and programs, logs.
const FD_RESERVE: u64 = 128;

/// What a running daemon shares between its workers (read-mostly: per packet, only
/// counters are touched).
pub(crate) struct Shared {
    pub path: SteeringPath,
    pub clients: ClientTable,
    pub dynamic: Option<crate::dynamic::DynamicClients>,
    /// One inbox per worker, for the outcome of dynamic definitions and CoA requests.
    pub defined: Vec<worker::Inbox>,
    /// Which flow carries which NAS (for CoA).
    pub nas_directory: crate::coa::NasDirectory,
    /// Which server an EAP conversation is on (load-balancing pools).
    pub eap_states: crate::pool::EapStates,
    /// Packets kept, in all workers, while their sources are being defined.
    pub pending_packets: AtomicUsize,
    /// The configured upstreams; each worker opens its own sockets to each.
    pub upstreams: Vec<Arc<Upstream>>,
    pub upstream_index: HashMap<String, usize>,
    /// The Proxy-State this sidecar adds (random per start, RFC 2865 5.33).
    pub proxy_state: [u8; 8],
    pub fastpath: Option<Mutex<FastPath>>,
    pub metrics: Arc<Metrics>,
    /// Flows with a child socket (proved ones), in all workers, and their bound.
    pub active: AtomicUsize,
    pub max_flows: usize,
    /// Flows that have not proved themselves, in all workers, and their bound.
    pub provisional_flows: AtomicUsize,
    pub max_provisional: usize,
    pub idle_timeout: Duration,
    pub provisional_idle: Duration,
    pub dedup: crate::dedup::DedupTimers,
    pub cancel: CancellationToken,
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
    // Provisional flows hold no socket: memory only, bounded on their own.
    let max_provisional = config.max_provisional_flows.unwrap_or(max_flows).max(1);
    info!(
        open_files_limit = nofile,
        max_flows,
        max_provisional,
        "open-file limit {nofile}: at most {max_flows} flows with a socket each, and \
         {max_provisional} provisional ones (not yet proved by a signed request; no socket)"
    );
    metrics.open_files_limit.set(nofile as i64);
    for u in &upstreams {
        metrics.set_message_authenticator_required(
            "upstream",
            &u.name,
            u.options.requires_message_authenticator(),
        );
    }
    for c in clients.iter() {
        metrics.set_message_authenticator_required(
            "client",
            &c.name,
            c.requires_message_authenticator(),
        );
    }
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
    let upstream_index: HashMap<String, usize> = upstreams
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.clone(), i))
        .collect();
    info!(
        clients = clients.len(),
        upstreams = upstreams.len(),
        "configuration loaded"
    );
    // Every worker hears about every definition: a source's flows can land on any of them.
    let workers_per_listener = config.workers.max(1);
    let n_workers = config.listen.len() * workers_per_listener;
    let (defined_txs, mut defined_rxs): (Vec<_>, Vec<_>) = (0..n_workers)
        .map(|_| worker::inbox())
        .collect::<std::io::Result<Vec<_>>>()
        .context("creating the workers' eventfds")?
        .into_iter()
        .unzip();
    let shared = Arc::new(Shared {
        path,
        clients,
        dynamic,
        defined: defined_txs,
        nas_directory: Default::default(),
        eap_states: Default::default(),
        pending_packets: AtomicUsize::new(0),
        upstreams: upstreams.clone(),
        upstream_index,
        proxy_state,
        fastpath: fastpath.map(Mutex::new),
        metrics: metrics.clone(),
        active: AtomicUsize::new(0),
        max_flows,
        provisional_flows: AtomicUsize::new(0),
        max_provisional,
        idle_timeout: config.idle_timeout,
        // A flow outlives its cached replies (RFC 5080 retransmissions hit the cache).
        provisional_idle: config.provisional_idle_timeout.max(config.cleanup_delay),
        dedup: crate::dedup::DedupTimers {
            cleanup_delay: config.cleanup_delay,
            ..Default::default()
        },
        cancel: cancel.clone(),
    });

    let mut tasks = JoinSet::new();
    for u in &upstreams {
        tokio::spawn(probe_upstream(u.clone()));
        metrics.set_upstream_state(&u.name, 0);
        tasks.spawn(watch_upstream(u.clone(), metrics.clone(), cancel.clone()));
    }
    for &Listener { addr, role } in &config.listen {
        let wildcards = socket::bind_wildcards(addr, config.workers, config.wildcard_rcvbuf)
            .with_context(|| format!("binding the wildcard sockets of {addr}"))?;
        let bound = wildcards[0].local_addr()?;
        if let Some(fp) = &shared.fastpath {
            lock(fp)
                .add_service(PROTO_UDP, bound, &wildcards)
                .with_context(|| format!("registering {bound} with steer"))?;
        }
        let accounting = role.is_accounting(bound.port());
        info!(
            listen = %bound,
            workers = wildcards.len(),
            path = path.as_str(),
            role = if accounting { "acct" } else { "auth" },
            "listening"
        );
        for (i, w) in wildcards.into_iter().enumerate() {
            let defined = defined_rxs
                .pop()
                .context("more wildcards than worker channels")?;
            let me = defined_rxs.len();
            let shared = shared.clone();
            let runtime = tokio::runtime::Handle::current();
            // A thread of its own: the worker blocks in its epoll set (see crate::worker).
            tasks.spawn_blocking(move || {
                let listener = worker::Listening { bound, accounting };
                if let Err(e) = worker::run(shared, w, listener, i, me, defined, runtime) {
                    tracing::error!(listen = %bound, worker = i, error = %e, "worker stopped");
                }
            });
        }
    }
    if let Some(addr) = config.coa_listen {
        let sock = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding the CoA listener {addr}"))?;
        info!(listen = %addr, "CoA/Disconnect listener (RFC 5176)");
        tasks.spawn(crate::coa::listen(shared.clone(), sock));
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

pub(crate) fn lock(fp: &Mutex<FastPath>) -> std::sync::MutexGuard<'_, FastPath> {
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

/// Asks an upstream once, at start, whether it is there (RFC 5997 Status-Server), and says
/// so plainly either way: a missing or misconfigured AAA server should not look like NASes
/// timing out.
/// One Status-Server (RFC 5997) to `u`, answered and verified within `wait`.
async fn status_server_once(u: &Upstream, wait: Duration) -> Result<(), String> {
    let any: SocketAddr = if u.auth.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any).await.map_err(|e| e.to_string())?;
    sock.connect(u.auth).await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4096];
    let (req, auth) = {
        let p =
            crate::codec::edit::status_server(&mut buf, 0, &u.secret).map_err(|e| e.to_string())?;
        (p.as_bytes().to_vec(), p.authenticator())
    };
    sock.send(&req).await.map_err(|e| e.to_string())?;
    let n = tokio::time::timeout(wait, sock.recv(&mut buf))
        .await
        .map_err(|_| format!("no answer in {} ms", wait.as_millis()))?
        .map_err(|e| e.to_string())?;
    let reply = crate::codec::Packet::parse(&buf[..n]).map_err(|e| e.to_string())?;
    crate::codec::auth::verify(&reply, &u.secret, Some(&auth))
        .map_err(|e| format!("an answer that does not verify ({e}): check the secret"))?;
    Ok(())
}

/// Probes `u` with Status-Server every `check_interval` while it is a zombie or dead, moves
/// its health on the answers, and keeps its state in the metrics.
async fn watch_upstream(u: Arc<Upstream>, metrics: Arc<Metrics>, cancel: CancellationToken) {
    use crate::upstream::{State, millis};
    let mut tick = tokio::time::interval(u.options.check_interval);
    let mut last = State::Alive;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = cancel.cancelled() => return,
        }
        let state = u.health.state();
        if state != State::Alive {
            let wait = u.options.check_interval.min(Duration::from_secs(2));
            let answered = status_server_once(&u, wait).await.is_ok();
            u.health.on_probe(
                answered,
                millis(std::time::Instant::now()),
                &u.options.health,
            );
        }
        let now = u.health.state();
        if now != last {
            match now {
                State::Alive => info!(upstream = %u.name, "upstream alive again"),
                State::Zombie => {
                    warn!(upstream = %u.name, "upstream not answering: zombie, probing it with Status-Server")
                }
                State::Dead => {
                    warn!(upstream = %u.name, "upstream dead: no answer to Status-Server for its zombie period")
                }
            }
            last = now;
        }
        metrics.set_upstream_state(&u.name, now as i64);
    }
}

/// Asks an upstream once, at start, whether it is there, and says so plainly either way.
async fn probe_upstream(u: Arc<Upstream>) {
    let outcome = status_server_once(&u, Duration::from_secs(2)).await;
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
