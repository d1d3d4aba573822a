//! What the daemon's threads share: [`Shared`] (read-mostly state of a running daemon),
//! the [`Inbox`] through which the tokio side reaches a worker (definitions, CoA jobs), and
//! the handles those carry. Below the worker, the CoA listener and the daemon, which all use
//! it; it imports none of them.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicUsize},
    time::Duration,
};

use radius_common::FlowKey;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    client::{Client, ClientTable},
    fastpath::FastPath,
    metrics::Metrics,
    socket::{SteeringPath, Wake},
    upstream::Upstream,
};

/// What a running daemon shares between its workers (read-mostly: per packet, only
/// counters are touched).
pub(crate) struct Shared {
    pub path: SteeringPath,
    pub clients: ClientTable,
    pub dynamic: Option<crate::dynamic::DynamicClients>,
    /// One inbox per worker, for the outcome of dynamic definitions and CoA requests.
    pub defined: Vec<Inbox>,
    /// Which flow carries which NAS (for CoA).
    pub nas_directory: crate::coa::NasDirectory<FlowHandle>,
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

pub(crate) fn lock(fp: &Mutex<FastPath>) -> std::sync::MutexGuard<'_, FastPath> {
    // A panic elsewhere must not stop steering; the maps stay consistent per call.
    fp.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a NAS's flow lives: its worker and its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowHandle {
    pub worker: usize,
    pub key: FlowKey,
}

/// A CoA or Disconnect request on its way to a NAS's flow.
#[derive(Debug)]
pub(crate) struct CoaJob {
    pub key: FlowKey,
    /// Where the answer goes, and what it must be signed against.
    pub origin: SocketAddr,
    pub origin_id: u8,
    pub origin_auth: [u8; 16],
    pub upstream: Arc<Upstream>,
    pub packet: Vec<u8>,
    /// The channel back to [`listen`]: (answer, origin).
    pub answer: mpsc::Sender<(Vec<u8>, SocketAddr)>,
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
