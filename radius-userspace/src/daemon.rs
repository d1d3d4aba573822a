//! Start-up and shutdown: the daemon chooses the steering path, builds what the workers'
//! engines share ([`Common`]), binds the wildcards and the RADIUS/TCP listeners and runs one
//! worker thread per wildcard and per TCP listener ([`crate::worker`]), and on the tokio
//! runtime the slow side: upstream probes
//! (Status-Server), the CoA listener, the metrics endpoint, the eBPF log and counters.
//! At cancellation the workers drain their requests in flight, then the fast path is
//! detached.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::AsFd,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use radius_common::PROTO_UDP;
use tokio::{io::Interest, net::UdpSocket, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Config, DaemonConfig, EbpfMode, Listener},
    fastpath::{FastPath, FastPathOptions},
    handover::{Channel, Handed, Message},
    metrics::{self, Metrics},
    shared::{self, Common, Shared, lock},
    socket::{self, SteeringPath},
    upgrade::Takeover,
    upstream::Upstream,
    upstream_conn::Transport,
    worker,
};

/// File descriptors kept back from flows: wildcards, metrics, eBPF maps and programs, logs.
const FD_RESERVE: u64 = 128;

/// Sets up the fast path (or says why not), serves until `cancel`, then drains and detaches.
/// `loader` reads the configuration again at each reload (SIGHUP, `radius-sidecar reload`).
/// `successor`: this process was started by `radius-sidecar upgrade`; it takes the old
/// process's sockets and flows over that channel instead of binding its own.
pub async fn run(
    full: Config,
    loader: crate::reload::Loader,
    cancel: CancellationToken,
    successor: Option<Channel>,
) -> anyhow::Result<()> {
    let Config {
        daemon: config,
        upstreams,
        upstream_tls,
        clients,
        dynamic,
        directory_key,
        dictionary,
        realms,
        spool: spool_settings,
        spool_pools,
    } = full;
    let upstream_transports = upstreams
        .iter()
        .map(|u| crate::reload::transport(u, &upstream_tls))
        .collect::<anyhow::Result<Vec<_>>>()?;
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

    // On an upgrade guard waits: the interface holds the old process's until it hands over.
    let fastpath = setup_fastpath(&config, max_flows, successor.is_none())?;
    let mut takeover = match &successor {
        Some(channel) => Some(take_over(channel, &fastpath).await?),
        None => None,
    };
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
    // After an upgrade a listener keeps the running process's workers (its wildcards).
    let workers_of = |addr| {
        takeover
            .as_ref()
            .and_then(|t| t.wildcard_count(addr))
            .unwrap_or(config.workers)
            .max(1)
    };
    let n_workers = config
        .listen
        .iter()
        .map(|l| workers_of(l.addr))
        .sum::<usize>()
        + config.listen_tcp.len()
        + config.listen_tls.len();
    let (defined_txs, mut defined_rxs): (Vec<_>, Vec<_>) = (0..n_workers)
        .map(|_| shared::inbox())
        .collect::<std::io::Result<Vec<_>>>()
        .context("creating the workers' eventfds")?
        .into_iter()
        .unzip();
    let common = Arc::new(Common {
        clients,
        dynamic: dynamic.as_ref().map(|d| d.core.clone()),
        nas_directory: Default::default(),
        eap_states: Default::default(),
        pending_packets: Default::default(),
        upstreams: upstreams.clone(),
        upstream_index,
        proxy_state,
        active: Default::default(),
        max_flows,
        provisional_flows: Default::default(),
        max_provisional,
        idle_timeout: config.idle_timeout,
        provisional_idle: crate::reload::provisional_idle(&config),
        dedup: crate::reload::dedup_timers(&config),
        counters: metrics.clone(),
        dictionary,
        realms,
    });
    if let (Some(t), Some(d)) = (&takeover, &dynamic) {
        let now = std::time::Instant::now();
        let adopted = t.definitions.iter().filter(|def| d.adopt(def, now)).count();
        info!(
            adopted,
            offered = t.definitions.len(),
            "dynamic clients taken over from the process this one upgrades"
        );
    }
    let tls_server = match &config.tls {
        Some(files) if !config.listen_tls.is_empty() => Some(crate::tls::server_config(files)?),
        _ => None,
    };
    let spool = match &spool_settings {
        None => None,
        Some(s) => Some(
            crate::spool::Spool::open(s.clone(), metrics.clone())
                .with_context(|| format!("opening the spool in {}", s.dir.display()))?,
        ),
    };
    let shared = Arc::new(Shared {
        current: arc_swap::ArcSwap::from_pointee(shared::Current {
            common,
            dynamic: dynamic.map(Arc::new),
            upstream_transports,
            upstream_tls,
            directory_key,
            daemon: config.clone(),
            tls_server: tls_server.clone(),
            spool_pools,
            spool_settings,
        }),
        path,
        defined: defined_txs,
        fastpath: fastpath.map(Mutex::new),
        metrics: metrics.clone(),
        spool: spool.clone(),
        cancel: cancel.clone(),
        heartbeats: (0..n_workers).map(|_| Default::default()).collect(),
        epoch: std::time::Instant::now(),
        handoff: Default::default(),
        handed_over: Default::default(),
    });

    let mut replay = None;
    if let Some(spool) = spool {
        // A thread of its own: it blocks on its socket and the spool's condition.
        let (sh, stop) = (shared.clone(), cancel.clone());
        replay = Some(
            std::thread::Builder::new()
                .name("spool-replay".into())
                .spawn(move || {
                    spool.replay(
                        || {
                            let c = sh.current.load();
                            (c.spool_pools.clone(), c.common.upstreams.clone())
                        },
                        || stop.is_cancelled(),
                    )
                })
                .context("starting the spool's replay thread")?,
        );
    }
    let mut tasks = JoinSet::new();
    let mut watchers = UpstreamWatchers::default();
    watchers.follow(&shared.current.load(), &metrics, &cancel);
    let (m, c) = (metrics.clone(), cancel.clone());
    let (reloads_tx, reloads) = tokio::sync::mpsc::channel(4);
    tasks.spawn(crate::reload::serve(
        shared.clone(),
        loader,
        Box::new(move |current| watchers.follow(current, &m, &c)),
        reloads,
    ));
    let control = match takeover.as_mut().and_then(|t| t.control.take()) {
        Some((listener, path)) => {
            listener.set_nonblocking(true)?;
            Some((tokio::net::UnixListener::from_std(listener)?, path))
        }
        None => crate::control::bind(&shared),
    };
    if let Some(control) = control {
        keep_for_upgrade(
            &shared,
            Handed::Control {
                path: control.1.clone(),
            },
            &control.0,
        );
        tasks.spawn(crate::control::serve(shared.clone(), control, reloads_tx));
    }
    for &Listener { addr, role } in &config.listen {
        let inherited = takeover.as_mut().and_then(|t| t.take_wildcards(addr));
        let wildcards = match inherited {
            Some((_, w)) if !w.is_empty() => {
                if w.len() != config.workers {
                    warn!(
                        listen = %addr,
                        workers = w.len(),
                        "upgrade: the running process's worker count is kept until a restart"
                    );
                }
                w
            }
            _ => socket::bind_wildcards(addr, config.workers, config.wildcard_rcvbuf)
                .with_context(|| format!("binding the wildcard sockets of {addr}"))?,
        };
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
            let inherited = takeover
                .as_mut()
                .map(|t| t.take_worker(bound, i))
                .unwrap_or_default();
            // A thread of its own: the worker blocks in its epoll set (see crate::worker).
            tasks.spawn_blocking(move || {
                let listener = worker::Listening {
                    bound,
                    accounting,
                    index: i,
                };
                let front = worker::Front::udp(w);
                let run = worker::run(shared, front, listener, me, defined, runtime, inherited);
                if let Err(e) = run {
                    tracing::error!(listen = %bound, worker = i, error = %e, "worker stopped");
                }
            });
        }
    }
    // RADIUS/TCP and RADIUS/TLS: one worker per listener, its connections in its own
    // epoll set.
    let limits = crate::tcp::Limits {
        max_connections: config.max_connections.unwrap_or(max_flows).max(1),
        max_connections_per_source: config.max_connections_per_source,
        timeout: config.tcp_timeout,
        idle_timeout: config.idle_timeout,
    };
    let tls = tls_server;
    let streams = config
        .listen_tcp
        .iter()
        .map(|l| (l, None))
        .chain(config.listen_tls.iter().map(|l| (l, tls.clone())));
    for (&Listener { addr, role }, tls) in streams {
        let transport = if tls.is_some() { "tls" } else { "tcp" };
        let listener = match takeover.as_mut().and_then(|t| t.take_stream(addr)) {
            Some(l) => l,
            None => socket::bind_tcp_listener(addr)
                .with_context(|| format!("binding the RADIUS/{transport} listener {addr}"))?,
        };
        let bound = listener.local_addr()?;
        let front = worker::Front::Tcp(crate::tcp::TcpFront::new(listener, limits, tls)?);
        let accounting = role.is_accounting(bound.port());
        info!(
            listen = %bound,
            transport,
            role = if accounting { "acct" } else { "auth" },
            max_connections = limits.max_connections,
            "listening"
        );
        let defined = defined_rxs
            .pop()
            .context("more listeners than worker channels")?;
        let me = defined_rxs.len();
        let shared = shared.clone();
        let runtime = tokio::runtime::Handle::current();
        tasks.spawn_blocking(move || {
            let listening = worker::Listening {
                bound,
                accounting,
                index: 0,
            };
            let run = worker::run(
                shared,
                front,
                listening,
                me,
                defined,
                runtime,
                <_>::default(),
            );
            if let Err(e) = run {
                tracing::error!(listen = %bound, transport, error = %e, "worker stopped");
            }
        });
    }
    if let Some(addr) = config.coa_listen {
        let sock = match takeover.as_mut().and_then(|t| t.coa.take()) {
            Some(s) => {
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)?
            }
            None => UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the CoA listener {addr}"))?,
        };
        keep_for_upgrade(&shared, Handed::Coa { listen: addr }, &sock);
        info!(listen = %addr, "CoA/Disconnect listener (RFC 5176)");
        tasks.spawn(crate::coa_listener::listen(shared.clone(), sock));
    }
    if let Some(addr) = config.metrics_listen {
        let listener = match takeover.as_mut().and_then(|t| t.metrics.take()) {
            Some(l) => {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)?
            }
            None => tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the metrics endpoint {addr}"))?,
        };
        keep_for_upgrade(&shared, Handed::Metrics { listen: addr }, &listener);
        let (m, c) = (metrics.clone(), cancel.clone());
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(listener, m, c).await {
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

    // Everything is served here now: the old process detaches and drains.
    if let Some(channel) = successor {
        crate::upgrade::confirm(channel, Ok(()));
        info!("upgrade: this process serves; the old one finishes its requests in flight");
        tasks.spawn(attach_guard_after_takeover(shared.clone()));
    }
    // Type=notify: ready once every listener is bound, its worker running and the fast
    // path (if any) attached; a watchdog, if asked for, pings while the workers turn.
    let status = format!(
        "serving {} listener(s) on the {} path",
        n_workers,
        shared.path.as_str()
    );
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&status),
        ],
    );
    let mut watchdog_usec = 0;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) {
        let period = Duration::from_micros(watchdog_usec);
        info!(?period, "systemd watchdog on");
        tasks.spawn(watchdog(shared.clone(), period));
    }

    cancel.cancelled().await;
    if shared
        .handed_over
        .load(std::sync::atomic::Ordering::Acquire)
    {
        // The service goes on, in the new process.
        info!("handed over: draining requests in flight");
    } else {
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        info!("shutting down: draining flows");
    }
    while tasks.join_next().await.is_some() {}
    if let Some(replay) = replay {
        // It sees the cancellation within its wait (100 ms).
        let _ = tokio::task::spawn_blocking(move || replay.join()).await;
    }
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

/// Pings systemd's watchdog at a third of its period while every worker has turned its
/// loop within the period (a worker stuck in a packet stops the pings, and systemd restarts
/// the service).
async fn watchdog(shared: Arc<Shared>, period: Duration) {
    let mut tick = tokio::time::interval(period / 3);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shared.cancel.cancelled() => return,
        }
        match shared.stalled_worker(period) {
            None => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
            Some(worker) => warn!(
                worker,
                "a worker has not turned for the watchdog period: no ping"
            ),
        }
    }
}

/// The health watcher (and first probe) of each configured upstream link; a link retired by
/// a reload loses its watcher.
#[derive(Default)]
struct UpstreamWatchers {
    by_link: HashMap<usize, CancellationToken>,
}

impl UpstreamWatchers {
    fn follow(
        &mut self,
        current: &shared::Current,
        metrics: &Arc<Metrics>,
        cancel: &CancellationToken,
    ) {
        let common = &current.common;
        self.by_link.retain(|&link, token| {
            let keep = common.is_configured(link);
            if !keep {
                token.cancel();
            }
            keep
        });
        for &link in common.upstream_index.values() {
            if self.by_link.contains_key(&link) {
                continue;
            }
            let (Some(u), Some(transport)) = (
                common.upstreams.get(link),
                current.upstream_transports.get(link),
            ) else {
                continue;
            };
            let token = cancel.child_token();
            tokio::spawn(probe_upstream(u.clone(), transport.clone()));
            metrics.set_upstream_state(&u.name, 0);
            tokio::spawn(watch_upstream(
                u.clone(),
                transport.clone(),
                metrics.clone(),
                token.clone(),
            ));
            self.by_link.insert(link, token);
        }
    }
}

/// A duplicate of `sock`'s fd, kept for an upgrade to hand over.
fn keep_for_upgrade(shared: &Shared, what: Handed, sock: &impl AsFd) {
    match sock.as_fd().try_clone_to_owned() {
        Ok(fd) => shared.handoff().push((what, fd)),
        Err(e) => warn!(error = %e, "cannot keep a listener for an upgrade"),
    }
}

/// Takes the old process's sockets over (see crate::upgrade). A process that cannot serve
/// the old one's sockets (unconnected children need the fast path) refuses, and the old
/// one goes on.
async fn take_over(channel: &Channel, fastpath: &Option<FastPath>) -> anyhow::Result<Takeover> {
    let t = tokio::task::block_in_place(|| crate::upgrade::take_over(channel))
        .context("upgrade: taking the running process's sockets over")?;
    if t.fast != fastpath.is_some() {
        let why = if t.fast {
            "the running process steers with eBPF and this one cannot (see above)"
        } else {
            "the running process steers in user space; restart to move to the fast path"
        };
        let _ = channel.send(&Message::Refused { why: why.into() }, &[]);
        anyhow::bail!("upgrade refused: {why}");
    }
    let flows: usize = t.workers.values().map(|w| w.flows.len()).sum();
    info!(flows, "upgrade: sockets taken over");
    Ok(t)
}

/// After an upgrade's handover: guard onto the interface once the old process's has left
/// it (it detaches when it hears `Taken`). Not before: packets wait in the sockets while
/// this process starts its workers, and an interface without guard for those
/// milliseconds drops nothing valid.
async fn attach_guard_after_takeover(shared: Arc<Shared>) {
    let Some(iface) = shared.current.load().daemon.iface.clone() else {
        return;
    };
    let Some(fp) = &shared.fastpath else {
        return;
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let attempt = lock(fp).attach_guard(&iface);
        match attempt {
            Ok(mode) => {
                info!(iface, hook = %mode, "upgrade: guard attached to {iface}");
                return;
            }
            // The old process's guard is still there: it goes within milliseconds.
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => {
                warn!(iface, error = %e, "upgrade: guard not attached; serving without it");
                return;
            }
        }
    }
}

fn setup_fastpath(
    config: &DaemonConfig,
    max_flows: usize,
    attach_guard: bool,
) -> anyhow::Result<Option<FastPath>> {
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
            Some(iface) if attach_guard => Some((iface.clone(), fp.attach_guard(iface)?)),
            _ => None,
        };
        Ok::<_, crate::fastpath::FastPathError>((fp, guard))
    })();
    match attempt {
        Ok((fp, guard)) => {
            match guard {
                Some((iface, mode)) => info!(
                    iface,
                    hook = %mode,
                    "fast path on: steer attached to this network namespace, guard on {iface}"
                ),
                None if config.iface.is_some() => info!(
                    "fast path on: steer attached; guard waits for the running process's to \
                     come off the interface (upgrade)"
                ),
                None => info!("fast path on: steer attached; no --iface, so no guard"),
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

/// One Status-Server (RFC 5997) to `u`, answered and verified within `wait`: a datagram,
/// or over TCP/TLS a connection of its own (the workers' connections carry requests only).
async fn status_server_once(
    u: &Arc<Upstream>,
    transport: &Transport,
    wait: Duration,
) -> Result<(), String> {
    let tls = match transport {
        Transport::Udp => return udp_status_server(u, wait).await,
        Transport::Tcp => None,
        Transport::Tls(t) => Some(t.clone()),
    };
    let u = u.clone();
    tokio::task::spawn_blocking(move || stream_status_server(&u, tls, wait))
        .await
        .map_err(|e| e.to_string())?
}

/// Status-Server over a connection of its own, blocking (on the runtime's blocking pool).
fn stream_status_server(
    u: &Upstream,
    tls: Option<crate::upstream_conn::TlsClient>,
    wait: Duration,
) -> Result<(), String> {
    use std::io::{Read as _, Write as _};
    let mut sock =
        std::net::TcpStream::connect_timeout(&u.auth, wait).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    sock.set_write_timeout(Some(wait))
        .map_err(|e| e.to_string())?;
    trait Stream: std::io::Read + std::io::Write {}
    impl<T: std::io::Read + std::io::Write> Stream for T {}
    // Over TLS the handshake first: on RADIUS/1.1 (RFC 9765) the probe carries a Token and
    // no signature, and the answer must echo the Token.
    let (mut stream, v11): (Box<dyn Stream>, bool) = match tls {
        None => (Box::new(sock), false),
        Some((config, name)) => {
            let mut conn =
                rustls::ClientConnection::new(config.clone(), name).map_err(|e| e.to_string())?;
            while conn.is_handshaking() {
                conn.complete_io(&mut sock).map_err(|e| e.to_string())?;
            }
            let v11 = crate::tls::negotiated(&conn, &config.alpn_protocols)
                .map_err(|reason| format!("TLS refused: {reason}"))?;
            (Box::new(rustls::StreamOwned::new(conn, sock)), v11)
        }
    };
    let mut buf = [0u8; 4096];
    let (req, auth) = if v11 {
        let mut token = [0u8; 16];
        crate::codec::auth::fill_random(&mut token[..4]);
        let mut req = vec![0u8; crate::codec::HEADER_LEN];
        req[0] = crate::codec::Code::StatusServer as u8;
        req[3] = crate::codec::HEADER_LEN as u8;
        req[4..20].copy_from_slice(&token);
        (req, token)
    } else {
        let p =
            crate::codec::edit::status_server(&mut buf, 0, &u.secret).map_err(|e| e.to_string())?;
        (p.as_bytes().to_vec(), p.authenticator())
    };
    stream.write_all(&req).map_err(|e| e.to_string())?;
    stream.flush().map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    let len = loop {
        if got.len() >= 4 {
            let len = usize::from(u16::from_be_bytes([got[2], got[3]]));
            if got.len() >= len {
                break len;
            }
        }
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection closed without an answer".into());
        }
        got.extend_from_slice(&buf[..n]);
    };
    let reply = crate::codec::Packet::parse(&got[..len]).map_err(|e| e.to_string())?;
    if v11 {
        return if reply.authenticator()[..4] == auth[..4] {
            Ok(())
        } else {
            Err("a RADIUS/1.1 answer with another Token".into())
        };
    }
    crate::codec::auth::verify(&reply, &u.secret, Some(&auth))
        .map_err(|e| format!("an answer that does not verify ({e}): check the secret"))?;
    Ok(())
}

/// One Status-Server datagram to `u`.
async fn udp_status_server(u: &Upstream, wait: Duration) -> Result<(), String> {
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
async fn watch_upstream(
    u: Arc<Upstream>,
    transport: Transport,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    use crate::upstream::State;
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
            let answered = status_server_once(&u, &transport, wait).await.is_ok();
            u.health
                .on_probe(answered, std::time::Instant::now(), &u.options.health);
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

/// Asks an upstream once, at start, whether it is there (RFC 5997 Status-Server), and says
/// so plainly either way: a missing or misconfigured AAA server should not look like NASes
/// timing out.
async fn probe_upstream(u: Arc<Upstream>, transport: Transport) {
    let outcome = status_server_once(&u, &transport, Duration::from_secs(2)).await;
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
