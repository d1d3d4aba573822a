//! A worker: UDP's driver around one [`Engine`]. One thread owns one wildcard socket, the
//! child sockets of the flows that land on it and its own sockets to every upstream, all in
//! one level-triggered epoll set ([`Poller`]), and only moves bytes: a datagram read is
//! handed to the engine with the time, what the engine queued is sent with one `sendmmsg`
//! per socket, and the engine says when to wake it next. Every decision (flows, pending
//! packets, dedup, forwarding, retransmission, failover, CoA) is the engine's, in
//! `radius-core/src/engine.rs`.
//!
//! Shared-nothing per worker, so a request crosses no channel, no lock and no other thread
//! between the NAS and the upstream. Steer (or the reuseport filter) keeps a flow on one
//! worker. Replies leave from the wildcard (same address and port as the flow's child, so
//! the NAS sees no difference; the wildcard is not connected, so it sends to every NAS of a
//! round in one batch).

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::Arc,
    time::Instant,
};

use tracing::{debug, info, warn};

use crate::{
    engine::{Engine, Io, Transmits},
    flows::Flow,
    metrics::Refusal,
    requests::At,
    shared::{Defined, InboxRx, Shared, ToWorker, lock},
    socket::{self, Poller},
};

/// Datagrams a socket gives per round before the other sockets get their turn.
const READ_BUDGET: usize = 64;

// Epoll tokens: the kind in the top byte, an index below.
const KIND_SHIFT: u32 = 56;
const WILDCARD: u64 = 0;
const UPSTREAM: u64 = 1;
const CHILD: u64 = 2;
const WAKE: u64 = 3;

fn token(kind: u64, index: usize) -> u64 {
    (kind << KIND_SHIFT) | index as u64
}

/// The listener a worker serves: its bound address, and whether it is an accounting one
/// (how a Status-Server is answered).
pub(crate) struct Listening {
    pub bound: SocketAddr,
    pub accounting: bool,
}

/// The worker's sockets: what the engine asks for through [`Io`].
struct Sockets {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    poller: Poller,
    /// The wildcard's own address (children of the user-space path bind to it).
    bound: SocketAddr,
    wildcard: UdpSocket,
    /// Flows' child sockets, by the engine's flow slot.
    children: Vec<Option<UdpSocket>>,
    /// Sockets to upstreams, by the engine's request-table socket index.
    upstreams: Vec<Option<UdpSocket>>,
    /// Receive buffer of the children drained at a flow's end.
    drain_buf: Vec<u8>,
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
        let child = socket::bind_child(self.shared.path, self.bound, local, remote)
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
        put(&mut self.children, slot, child);
        Ok(())
    }

    fn close_child(&mut self, slot: usize, flow: &Flow, drained: &mut Vec<(SocketAddr, Vec<u8>)>) {
        let Some(child) = self.children.get_mut(slot).and_then(Option::take) else {
            return;
        };
        // Unregistered first, so later packets reach the wildcard and start a new flow;
        // what the child already holds is handed back.
        if let Some(fp) = &self.shared.fastpath {
            lock(fp).unregister_child(&flow.key);
        }
        self.poller.remove(&child);
        while let Ok((n, from)) = child.recv_from(&mut self.drain_buf) {
            drained.push((from, self.drain_buf[..n].to_vec()));
        }
    }

    fn open_upstream(&mut self, index: usize, to: SocketAddr) -> std::io::Result<()> {
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
        put(&mut self.upstreams, index, s);
        Ok(())
    }

    fn close_upstream(&mut self, index: usize) {
        if let Some(s) = self.upstreams.get_mut(index).and_then(Option::take) {
            self.poller.remove(&s);
        }
    }

    fn define(&mut self, ip: IpAddr) {
        spawn_definition(&self.runtime, self.shared.clone(), ip);
    }
}

struct Worker {
    index: usize,
    engine: Engine,
    io: Sockets,
    /// The receive buffer of every socket (a datagram is handed to the engine from it).
    buf: Vec<u8>,
}

/// Runs one worker on the calling (dedicated) thread until the daemon is cancelled and its
/// requests in flight are answered. `runtime` runs what must be async: dynamic definitions.
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
    let now = Instant::now();
    let mut w = Worker {
        index,
        engine: Engine::new(shared.common.clone(), me, accounting, now),
        io: Sockets {
            shared: shared.clone(),
            runtime,
            poller,
            bound,
            wildcard,
            children: Vec::new(),
            upstreams: Vec::new(),
            drain_buf: vec![0u8; 65_536],
        },
        buf: vec![0u8; 65_536],
    };
    w.engine.start(now, &mut w.io)?;
    let mut ready = Vec::with_capacity(256);
    loop {
        let now = Instant::now();
        // At SIGTERM/SIGINT: serving goes on until what is in flight is answered (or for
        // the engine's drain bound), so a restart does not cost NASes their answers.
        if shared.cancel.is_cancelled() && w.engine.drain(now) {
            break;
        }
        w.engine.handle_timeout(now, &mut w.io);
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
                        }
                    }
                }
                WILDCARD => w.read_wildcard(now),
                UPSTREAM => w.read_upstream(now, i),
                CHILD => w.read_child(now, i),
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
    fn read_wildcard(&mut self, now: Instant) {
        for _ in 0..READ_BUDGET {
            match socket::recv_from_to(&self.io.wildcard, &mut self.buf, self.io.bound) {
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
        let Some(child) = self.io.children.get(slot).and_then(Option::as_ref) else {
            return;
        };
        let Ok((n, from)) = child.recv_from(&mut self.buf) else {
            return;
        };
        let data = &self.buf[..n];
        if socket::is_own_datagram(remote, from) {
            self.engine.handle_child(now, slot, data, &mut self.io);
        } else {
            // A child's datagram from another peer (see socket::is_own_datagram).
            self.io.shared.metrics.misdelivered.inc();
            self.engine
                .handle_wildcard(now, from, local, data, &mut self.io);
        }
    }

    fn read_upstream(&mut self, now: Instant, index: usize) {
        for _ in 0..READ_BUDGET {
            let Some(sock) = self.io.upstreams.get(index).and_then(Option::as_ref) else {
                return;
            };
            let Ok(n) = sock.recv(&mut self.buf) else {
                return;
            };
            self.engine.handle_upstream(now, index, &self.buf[..n]);
        }
    }

    /// Sends what the engine queued: requests with one `sendmmsg` per upstream socket,
    /// answers to NASes with one on the wildcard. A request the kernel refuses goes back
    /// to the engine.
    fn flush(&mut self, now: Instant) {
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
            let Some(sock) = self.io.upstreams.get(index).and_then(Option::as_ref) else {
                failed.extend(group.iter().map(|g| g.0));
                continue;
            };
            let batch: Vec<socket::Outgoing<'_>> = group
                .iter()
                .map(|&(_, off, len)| socket::Outgoing {
                    to: None,
                    from: None,
                    data: t.data(off, len),
                })
                .collect();
            let sent = socket::send_batch(sock, &batch, |i, e| {
                debug!(error = %e, "request not sent upstream");
                failed.push(group[i].0);
            });
            metrics.forwarded.inc_by(sent as u64);
        }
        send_to_nases(&self.io, &t);
        self.engine.recycle(t);
        for at in failed {
            self.engine.send_failed(now, at);
        }
    }
}

fn send_to_nases(io: &Sockets, t: &Transmits) {
    let metrics = &io.shared.metrics;
    let any = io.bound.ip().is_unspecified();
    let batch: Vec<socket::Outgoing<'_>> = t
        .nas
        .iter()
        .map(|&(remote, local, off, len)| socket::Outgoing {
            to: Some(remote),
            from: any.then_some(local.ip()),
            data: t.data(off, len),
        })
        .collect();
    let sent = socket::send_batch(&io.wildcard, &batch, |i, e| {
        metrics.proxy_drop("send_to_nas");
        debug!(remote = %t.nas[i].0, error = %e, "reply not sent");
    });
    metrics.relayed.inc_by(sent as u64);
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
    fn tokens_keep_kind_and_index_apart() {
        let t = token(CHILD, 12345);
        assert_eq!(t >> KIND_SHIFT, CHILD);
        assert_eq!(t & ((1 << KIND_SHIFT) - 1), 12345);
    }
}
