//! The control socket: a Unix socket (`server.control`, mode 0600: its owner and root only)
//! that takes one command per connection and answers in one go. `reload` hands the request
//! to [`crate::reload`] and answers `ok: ...` or `error: ...`, `upgrade` to
//! [`crate::upgrade`] (a new copy of the binary takes over); `status` and `status json`
//! answer what the daemon holds now: flows by client (asked of every worker), dynamic
//! clients, upstream health and requests in flight, the fast path and its counters.
//! [`ask`] is the client side (`radius-sidecar reload`, `radius-sidecar status`).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tracing::{info, warn};

use crate::{
    engine::EngineStatus,
    reload::ReloadRequest,
    shared::{Shared, ToWorker, lock},
};

/// Dynamic clients listed by `status`, at most (the count says how many there are).
const LISTED_SOURCES: usize = 1000;

/// The control socket of the configuration, bound (before the daemon says it is ready);
/// None, said why, when there is none.
pub(crate) fn bind(shared: &Shared) -> Option<(UnixListener, PathBuf)> {
    let path = shared.current.load().daemon.control.clone()?;
    match bind_at(&path) {
        Ok(listener) => {
            info!(path = %path.display(), "control socket listening");
            Some((listener, path))
        }
        Err(e) => {
            warn!(path = %path.display(), "no control socket ({e:#}): reload with SIGHUP");
            None
        }
    }
}

/// Binds the socket, readable and writable by its owner only. A socket file left by a
/// process that died is replaced (and said so: the last one did not stop cleanly); one a
/// live sidecar answers on is not.
fn bind_at(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!("another process answers on it");
        }
        std::fs::remove_file(path).context("removing a stale socket")?;
        warn!(
            path = %path.display(),
            "found the control socket of a sidecar that did not stop cleanly (killed?): \
             replaced; its eBPF programs and sockets went with its process"
        );
    }
    let listener = UnixListener::bind(path).context("binding")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .context("setting its mode to 0600")?;
    Ok(listener)
}

/// Serves the socket until the daemon is cancelled; reloads go to `reloads`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    (listener, path): (UnixListener, PathBuf),
    reloads: mpsc::Sender<ReloadRequest>,
) {
    loop {
        let conn = tokio::select! {
            r = listener.accept() => r,
            () = shared.cancel.cancelled() => break,
        };
        let Ok((conn, _)) = conn else { continue };
        tokio::spawn(answer(conn, shared.clone(), reloads.clone()));
    }
    // After an upgrade the file is the new process's socket.
    if !shared
        .handed_over
        .load(std::sync::atomic::Ordering::Acquire)
    {
        let _ = std::fs::remove_file(&path);
    }
}

async fn answer(conn: UnixStream, shared: Arc<Shared>, reloads: mpsc::Sender<ReloadRequest>) {
    let (read, mut write) = conn.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(read.take(256)).read_line(&mut line),
    )
    .await;
    if !matches!(read, Ok(Ok(_))) {
        return;
    }
    let answer = match line.trim() {
        "reload" => {
            let (reply_tx, reply_rx) = oneshot::channel();
            match reloads.send(reply_tx).await {
                Err(_) => "error: the daemon is stopping".to_owned(),
                Ok(()) => match reply_rx.await {
                    Ok(Ok(a)) => format!("ok: {a}"),
                    Ok(Err(e)) => format!("error: {e}"),
                    Err(_) => "error: the daemon is stopping".to_owned(),
                },
            }
        }
        "upgrade" => match crate::upgrade::upgrade(shared.clone()).await {
            Ok(a) => format!("ok: {a}"),
            Err(e) => format!("error: {e:#}"),
        },
        "status" => status(&shared).await.to_text(),
        "status json" => serde_json::to_string_pretty(&status(&shared).await)
            .unwrap_or_else(|e| format!("error: {e}")),
        other => format!(
            "error: unknown command `{other}` (known: reload, upgrade, status, status json)"
        ),
    };
    let _ = write.write_all(answer.as_bytes()).await;
    let _ = write.write_all(b"\n").await;
}

/// What `radius-sidecar status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// "fast" (eBPF) or "user-space".
    pub path: &'static str,
    pub fast_path: Option<FastPathStatus>,
    /// Flows of every worker that answered, by client.
    pub flows: BTreeMap<String, ClientFlows>,
    /// Workers that did not answer within a second (busy or stuck).
    pub workers_silent: usize,
    pub upstreams: Vec<UpstreamStatus>,
    pub dynamic: Option<DynamicStatus>,
}

#[derive(Debug, Default, Serialize)]
pub struct ClientFlows {
    pub proved: usize,
    pub provisional: usize,
    pub in_flight: usize,
}

#[derive(Debug, Serialize)]
pub struct UpstreamStatus {
    pub name: String,
    pub address: String,
    /// "alive", "zombie" or "dead".
    pub state: &'static str,
    pub in_flight: usize,
}

#[derive(Debug, Serialize)]
pub struct FastPathStatus {
    pub steer_attached: bool,
    /// The NIC and mode of the XDP guard, when attached.
    pub guard: Option<String>,
    pub registered_flows: usize,
    /// The eBPF programs' counters, by event.
    pub counters: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct DynamicStatus {
    pub definitions_running: usize,
    pub max_concurrent: usize,
    /// Sources in the cache (defined, refused, being defined), and the first of them.
    pub cached: usize,
    pub sources: Vec<CachedSourceStatus>,
}

#[derive(Debug, Serialize)]
pub struct CachedSourceStatus {
    pub address: String,
    pub state: &'static str,
    pub client: Option<String>,
    pub seconds_left: u64,
}

/// Gathers the status: every worker is asked for its flows (each answers between two
/// packets), the rest is read from what they share.
pub(crate) async fn status(shared: &Shared) -> Status {
    let mut asked = Vec::new();
    for inbox in &shared.defined {
        let (tx, rx) = oneshot::channel();
        inbox.send(ToWorker::Status(tx));
        asked.push(rx);
    }
    let mut parts: Vec<EngineStatus> = Vec::new();
    let mut workers_silent = 0;
    for rx in asked {
        match tokio::time::timeout(Duration::from_secs(1), rx).await {
            Ok(Ok(s)) => parts.push(s),
            _ => workers_silent += 1,
        }
    }
    let current = shared.current.load_full();
    let common = &current.common;
    let mut flows: BTreeMap<String, ClientFlows> = BTreeMap::new();
    for p in &parts {
        for (client, c) in &p.flows {
            let f = flows.entry(client.clone()).or_default();
            f.proved += c.proved;
            f.provisional += c.provisional;
            f.in_flight += c.in_flight;
        }
    }
    let mut links: Vec<usize> = common.upstream_index.values().copied().collect();
    links.sort_unstable();
    let upstreams = links
        .into_iter()
        .filter_map(|link| {
            let u = common.upstreams.get(link)?;
            Some(UpstreamStatus {
                name: u.name.clone(),
                address: u.auth.to_string(),
                state: u.health.state().name(),
                in_flight: parts
                    .iter()
                    .filter_map(|p| p.in_flight_by_link.get(link))
                    .sum(),
            })
        })
        .collect();
    let fast_path = shared.fastpath.as_ref().map(|fp| {
        let fp = lock(fp);
        let counters = fp
            .counters()
            .map(|c| {
                radius_common::Counter::ALL
                    .iter()
                    .map(|&k| (k.name(), c.get(k)))
                    .collect()
            })
            .unwrap_or_default();
        FastPathStatus {
            steer_attached: fp.steer_attached(),
            guard: fp
                .guard_attached()
                .map(|(iface, hook)| format!("{iface} ({hook})")),
            registered_flows: fp.registered_children(),
            counters,
        }
    });
    let dynamic = current.dynamic.as_ref().map(|d| {
        let (sources, cached) = d.core.snapshot(Instant::now(), LISTED_SOURCES);
        DynamicStatus {
            definitions_running: d.running(),
            max_concurrent: d.max_concurrent(),
            cached,
            sources: sources
                .into_iter()
                .map(|s| CachedSourceStatus {
                    address: s.ip.to_string(),
                    state: s.state,
                    client: s.client,
                    seconds_left: s.left.as_secs(),
                })
                .collect(),
        }
    });
    Status {
        path: shared.path.as_str(),
        fast_path,
        flows,
        workers_silent,
        upstreams,
        dynamic,
    }
}

impl Status {
    /// For people: one section each.
    pub fn to_text(&self) -> String {
        use std::fmt::Write as _;
        let mut t = String::new();
        let _ = writeln!(t, "path: {}", self.path);
        if let Some(fp) = &self.fast_path {
            let _ = writeln!(
                t,
                "fast path: steer {}, guard {}, {} flows registered",
                if fp.steer_attached {
                    "attached"
                } else {
                    "detached"
                },
                fp.guard.as_deref().unwrap_or("none"),
                fp.registered_flows
            );
            let counters: Vec<String> = fp
                .counters
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(t, "  counters: {}", counters.join(", "));
        }
        let _ = writeln!(t, "flows (proved / provisional / requests in flight):");
        for (client, f) in &self.flows {
            let _ = writeln!(
                t,
                "  {client}: {} / {} / {}",
                f.proved, f.provisional, f.in_flight
            );
        }
        if self.workers_silent > 0 {
            let _ = writeln!(t, "  ({} worker(s) did not answer)", self.workers_silent);
        }
        let _ = writeln!(t, "upstreams:");
        for u in &self.upstreams {
            let _ = writeln!(
                t,
                "  {} ({}): {}, {} in flight",
                u.name, u.address, u.state, u.in_flight
            );
        }
        if let Some(d) = &self.dynamic {
            let _ = writeln!(
                t,
                "dynamic clients: {} cached, {} of {} definitions running",
                d.cached, d.definitions_running, d.max_concurrent
            );
            for s in &d.sources {
                let _ = writeln!(
                    t,
                    "  {} {}{} ({} s left)",
                    s.address,
                    s.state,
                    s.client
                        .as_deref()
                        .map_or(String::new(), |c| format!(" as {c}")),
                    s.seconds_left
                );
            }
        }
        t.trim_end().to_owned()
    }
}

/// The client side: sends `command` to the control socket at `path` and returns the
/// daemon's answer; an `error:` answer is an error.
pub fn ask(path: &Path, command: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to the control socket {} (is the daemon running, and are you its \
             user or root?)",
            path.display()
        )
    })?;
    // An upgrade waits up to 30 s for the new process, and then for its answer.
    s.set_read_timeout(Some(Duration::from_secs(75)))?;
    writeln!(s, "{command}")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let answer = answer.trim_end().to_owned();
    match answer.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None if answer.is_empty() => anyhow::bail!("the daemon closed without an answer"),
        None => Ok(answer),
    }
}
