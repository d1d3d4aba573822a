//! What the daemon's threads share: [`Shared`] (the configuration in force, [`Current`],
//! which a reload swaps; and what only the IO side needs: the steering path, the fast
//! path, metrics, cancellation), the [`Inbox`] through which the tokio side reaches a
//! worker (definitions, CoA jobs, reloads), and the handles those carry. Below the worker,
//! the CoA listener and the daemon, which all use it; it imports none of them.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

pub use radius_core::coa::{CoaJob, FlowHandle};
pub use radius_core::engine::Common;

use crate::{
    client::Client,
    config::{DaemonConfig, DirectoryKey},
    dynamic::DynamicClients,
    fastpath::FastPath,
    handover::{Handed, HandedPacket},
    metrics::Metrics,
    socket::{SteeringPath, Wake},
    tls::UpstreamTlsFiles,
    upstream_conn::Transport,
};

/// The configuration in force: what the engines share, the directory, and how each
/// upstream link is reached. A reload builds a new one; each worker gets it in its inbox,
/// the tokio side reads it from [`Shared::current`].
pub(crate) struct Current {
    pub common: Arc<Common>,
    /// The directory that defines dynamic clients (its cache is `common.dynamic`).
    pub dynamic: Option<Arc<DynamicClients>>,
    /// How each upstream (by its link in `common.upstreams`) is reached.
    pub upstream_transports: Vec<Transport>,
    /// What a reload compares with: the TLS files of upstreams, the directory as written,
    /// the daemon section (its listeners and data path need a restart).
    pub upstream_tls: HashMap<String, UpstreamTlsFiles>,
    pub directory_key: DirectoryKey,
    pub daemon: DaemonConfig,
    /// `[tls]`'s certificate, key and CA, read at start and again at each reload (a rotated
    /// certificate is in force for the next connection); None without TLS listeners.
    pub tls_server: Option<Arc<rustls::ServerConfig>>,
    /// The pools whose accounting is spooled, and `[spool]` as the file says (its
    /// directory and bounds are the ones in force since the start).
    pub spool_pools: Vec<Arc<crate::pool::Pool>>,
    pub spool_settings: Option<crate::spool::SpoolSettings>,
}

/// What a running daemon shares between its workers (read-mostly: per packet, only
/// counters are touched).
pub(crate) struct Shared {
    pub current: ArcSwap<Current>,
    pub path: SteeringPath,
    /// One inbox per worker, for the outcome of dynamic definitions, CoA requests and
    /// reloads.
    pub defined: Vec<Inbox>,
    pub fastpath: Option<Mutex<FastPath>>,
    pub metrics: Arc<Metrics>,
    /// The accounting spool, when `[spool]` is configured.
    pub spool: Option<Arc<crate::spool::Spool>>,
    pub cancel: CancellationToken,
    /// When each worker (by its inbox) last turned its loop, in ms since `epoch`, written
    /// at most once a second (the systemd watchdog reads them).
    pub heartbeats: Vec<std::sync::atomic::AtomicU64>,
    pub epoch: std::time::Instant,
    /// The listeners of the tokio side (CoA, metrics, control), each as a duplicate fd,
    /// for an upgrade to hand over (`crate::upgrade`).
    pub handoff: Mutex<Vec<(Handed, std::os::fd::OwnedFd)>>,
    /// This process handed its sockets to the one that upgraded it: what stops now must not
    /// touch them (the control socket's file stays, no STOPPING reaches systemd).
    pub handed_over: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Worker `me` is turning its loop at `now`.
    pub fn heartbeat(&self, me: usize, now: std::time::Instant) {
        if let Some(h) = self.heartbeats.get(me) {
            let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
            h.store(ms, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The listeners kept for an upgrade (see `handoff`).
    pub fn handoff(&self) -> std::sync::MutexGuard<'_, Vec<(Handed, std::os::fd::OwnedFd)>> {
        self.handoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A worker that has not turned its loop for `period`, if any.
    pub fn stalled_worker(&self, period: std::time::Duration) -> Option<usize> {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.heartbeats.iter().position(|h| {
            now.saturating_sub(h.load(std::sync::atomic::Ordering::Relaxed))
                > period.as_millis() as u64
        })
    }
}

pub(crate) fn lock(fp: &Mutex<FastPath>) -> std::sync::MutexGuard<'_, FastPath> {
    // A panic elsewhere must not stop steering; the maps stay consistent per call.
    fp.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outcome of a dynamic definition, sent to every worker.
#[derive(Clone, Debug)]
pub(crate) struct Defined {
    pub ip: IpAddr,
    pub outcome: Result<Arc<Client>, String>,
}

/// What reaches a worker from other threads: the outcome of definitions, and the eventfd
/// that wakes it for them.
pub(crate) struct Inbox {
    pub tx: std::sync::mpsc::Sender<ToWorker>,
    pub wake: Arc<Wake>,
}

/// What other threads tell a worker.
pub(crate) enum ToWorker {
    Defined(Defined),
    Coa(CoaJob),
    /// A reload: the configuration in force from now on.
    Reload(Arc<Current>),
    /// `radius-sidecar status`: what the worker's engine holds now.
    Status(tokio::sync::oneshot::Sender<radius_core::engine::EngineStatus>),
    /// An upgrade: stop reading the NAS-facing sockets and hand them over (with the
    /// packets waiting for a definition); requests in flight are still answered.
    HandOver(tokio::sync::oneshot::Sender<HandedFront>),
    /// The upgrade failed: read them again.
    Resume,
}

/// What one worker hands over: its NAS-facing sockets (a wildcard and its flows' children,
/// or a stream listener), each a duplicate fd, and the packets it kept for definitions.
#[derive(Default)]
pub(crate) struct HandedFront {
    pub sockets: Vec<(Handed, std::os::fd::OwnedFd)>,
    pub pending: Vec<HandedPacket>,
}

impl Inbox {
    pub fn send(&self, d: ToWorker) {
        if self.tx.send(d).is_ok() {
            self.wake.wake();
        }
    }
}

/// A worker's end of its [`Inbox`].
pub(crate) struct InboxRx {
    pub rx: std::sync::mpsc::Receiver<ToWorker>,
    pub wake: Arc<Wake>,
}

/// A new inbox: the sending half for [`Shared`], the receiving half for the worker.
pub(crate) fn inbox() -> std::io::Result<(Inbox, InboxRx)> {
    let wake = Arc::new(Wake::new()?);
    let (tx, rx) = std::sync::mpsc::channel();
    Ok((
        Inbox {
            tx,
            wake: wake.clone(),
        },
        InboxRx { rx, wake },
    ))
}
