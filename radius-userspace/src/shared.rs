//! What the daemon's threads share: [`Shared`] (the engines' [`Common`] state, which it
//! derefs to, and what only the IO side needs: the steering path, the directory, the
//! fast path, metrics, cancellation), the [`Inbox`] through which the tokio side reaches a
//! worker (definitions, CoA jobs), and the handles those carry. Below the worker, the CoA
//! listener and the daemon, which all use it; it imports none of them.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

pub use radius_core::coa::{CoaJob, FlowHandle};
pub use radius_core::engine::Common;

use crate::{
    client::Client,
    fastpath::FastPath,
    metrics::Metrics,
    socket::{SteeringPath, Wake},
};

/// What a running daemon shares between its workers (read-mostly: per packet, only
/// counters are touched).
pub(crate) struct Shared {
    pub common: Arc<Common>,
    pub path: SteeringPath,
    /// The directory that defines dynamic clients (its cache is `common.dynamic`).
    pub dynamic: Option<crate::dynamic::DynamicClients>,
    /// One inbox per worker, for the outcome of dynamic definitions and CoA requests.
    pub defined: Vec<Inbox>,
    pub fastpath: Option<Mutex<FastPath>>,
    /// How each upstream (by its index in `common.upstreams`) is reached.
    pub upstream_transports: Vec<crate::upstream_conn::Transport>,
    pub metrics: Arc<Metrics>,
    pub cancel: CancellationToken,
}

impl std::ops::Deref for Shared {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.common
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
