//! RADIUS/TCP (RFC 6613) and RADIUS/TLS (RFC 6614) in front of a worker's engine: the
//! listening socket, the accepted connections and their bytes (through rustls, sans-IO, on
//! a TLS listener: its records in and out of the same non-blocking socket). A connection is a flow by nature (its 5-tuple is known at
//! accept), so the engine sees it as it sees a UDP flow: the packets cut out of the stream
//! ([`Deframer`]) are handed to it by the worker, and what it sends to the flow's NAS is
//! written to the connection.
//!
//! A connection costs a descriptor and buffers, so it is bounded before it costs more:
//! refused at accept when its source is no client (static or in a dynamic prefix), past
//! `max_connections` in all or `max_connections_per_source` from one address; closed when it
//! sends nothing (or does not finish its TLS handshake) for `timeout`, leaves a packet
//! unfinished for `timeout`, sends a length RADIUS does not allow, fails its TLS handshake
//! (an unknown CA, an expired certificate, ...), reads its answers too slowly, or is idle
//! for `idle_timeout`. Every refusal and close is counted by reason, and a failed
//! handshake is logged once with the peer and the reason.

use std::{
    collections::HashMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ServerConfig, ServerConnection};
use tracing::{debug, info};

use crate::{
    engine::Common,
    metrics::{ConnectionLabel, Metrics, ProtocolLabel, TransportLabel},
    socket::Poller,
    stream::Deframer,
    tls,
};

/// Bytes of answers a connection may leave unread before it is closed as a slow reader.
const MAX_UNSENT: usize = 1 << 20;

/// What bounds a listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: usize,
    pub max_connections_per_source: usize,
    /// For a first packet after accept, and for the rest of a packet begun.
    pub timeout: Duration,
    /// A connection with no packet for this long is closed.
    pub idle_timeout: Duration,
}

/// One accepted connection.
struct Connection {
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    deframer: Deframer,
    /// Answers not yet written, from `unsent_from`.
    unsent: Vec<u8>,
    unsent_from: usize,
    /// Its epoll token, and whether it is watched for writability (answers wait in
    /// `unsent`).
    token: u64,
    want_write: bool,
    accepted_at: Instant,
    last_packet: Option<Instant>,
    /// The engine's flow slot, once it made a flow with a "child" (proved).
    flow: Option<usize>,
    /// On a TLS listener, the session: bytes read go through it into `deframer`, answers
    /// through it into `unsent`.
    tls: Option<Box<ServerConnection>>,
    /// Its certificate was held against its client's requirements (after the handshake).
    identified: bool,
    /// Its handshake agreed on RADIUS/1.1 (ALPN, RFC 9765).
    v11: bool,
}

impl Connection {
    /// Queues an answer (encrypted on TLS).
    fn queue(&mut self, data: &[u8]) {
        match self.tls.as_deref_mut() {
            None => self.unsent.extend_from_slice(data),
            Some(tls) => {
                let _ = tls.writer().write_all(data);
                tls::drain(tls, &mut self.unsent);
            }
        }
    }
}

/// A TCP listener and its connections.
pub struct TcpFront {
    listener: TcpListener,
    limits: Limits,
    /// "tcp" or "tls", in metrics and logs.
    transport: &'static str,
    tls: Option<Arc<ServerConfig>>,
    connections: Vec<Option<Connection>>,
    free: Vec<usize>,
    by_addr: HashMap<(SocketAddr, SocketAddr), usize>,
    per_source: HashMap<IpAddr, usize>,
    /// Connections to close with the engine told, and why (closed by the worker, which
    /// holds the engine).
    doomed: Vec<(usize, &'static str)>,
}

/// A packet read from a connection, for the worker to hand to its engine.
pub struct Read {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    /// The engine's flow slot, when it has one with this connection as its "child".
    pub flow: Option<usize>,
}

impl TcpFront {
    /// A RADIUS/TCP listener, or with `tls` a RADIUS/TLS one.
    /// A reload's TLS configuration (a rotated certificate or CA): for the connections
    /// accepted from now on; those open keep the one they shook hands with.
    pub fn set_tls(&mut self, tls: Option<Arc<ServerConfig>>) {
        if let (Some(mine), Some(new)) = (&mut self.tls, tls) {
            *mine = new;
        }
    }

    pub fn new(
        listener: TcpListener,
        limits: Limits,
        tls: Option<Arc<ServerConfig>>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(Self {
            listener,
            limits,
            transport: if tls.is_some() { "tls" } else { "tcp" },
            tls,
            connections: Vec::new(),
            free: Vec::new(),
            by_addr: HashMap::new(),
            per_source: HashMap::new(),
            doomed: Vec::new(),
        })
    }

    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }

    /// Accepts what waits (up to `budget`); the refused are closed at once, counted.
    /// `token` gives a connection's epoll token.
    pub fn accept(
        &mut self,
        now: Instant,
        common: &Common,
        metrics: &Metrics,
        poller: &Poller,
        token: impl Fn(usize) -> u64,
        budget: usize,
    ) {
        for _ in 0..budget {
            let (stream, remote) = match self.listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    // Out of descriptors, or a connection reset before accept: try later.
                    debug!(error = %e, "accept failed");
                    return;
                }
            };
            let transport = self.transport;
            let refuse = |reason| {
                metrics
                    .connections_refused
                    .get_or_create(&ConnectionLabel { transport, reason })
                    .inc();
                debug!(%remote, transport, reason, "connection refused");
            };
            let ip = remote.ip().to_canonical();
            let known = common.clients.binding(ip).is_some()
                || common
                    .dynamic
                    .as_ref()
                    .is_some_and(|d| d.prefixes.iter().any(|p| p.contains(&ip)));
            if !known {
                refuse("unknown_client");
                continue;
            }
            if self.by_addr.len() >= self.limits.max_connections {
                refuse("max_connections");
                continue;
            }
            let from_source = self.per_source.get(&ip).copied().unwrap_or(0);
            if from_source >= self.limits.max_connections_per_source {
                refuse("per_source");
                continue;
            }
            let Ok(local) = stream.local_addr() else {
                continue;
            };
            let tls = match &self.tls {
                None => None,
                Some(config) => match ServerConnection::new(config.clone()) {
                    Ok(c) => Some(Box::new(c)),
                    Err(e) => {
                        debug!(%remote, error = %e, "no TLS session");
                        refuse("tls_error");
                        continue;
                    }
                },
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            // Answers are small and each is complete: no Nagle delay on them.
            let _ = stream.set_nodelay(true);
            let i = self.free.pop().unwrap_or_else(|| {
                self.connections.push(None);
                self.connections.len() - 1
            });
            if let Err(e) = poller.add(&stream, token(i)) {
                debug!(%remote, error = %e, "cannot watch a connection");
                self.free.push(i);
                continue;
            }
            let (remote, local) = (canonical(remote), canonical(local));
            self.connections[i] = Some(Connection {
                stream,
                remote,
                local,
                deframer: Deframer::default(),
                unsent: Vec::new(),
                unsent_from: 0,
                token: token(i),
                want_write: false,
                accepted_at: now,
                last_packet: None,
                flow: None,
                tls,
                identified: false,
                v11: false,
            });
            self.by_addr.insert((remote, local), i);
            *self.per_source.entry(ip).or_default() += 1;
            let t = TransportLabel { transport };
            metrics.connections_accepted.get_or_create(&t).inc();
            metrics.connections_open.get_or_create(&t).inc();
            debug!(%remote, %local, transport, "connection accepted");
        }
    }

    /// Reads what connection `i` has (into `buf`, then, decrypted on TLS, its deframer),
    /// and sends what a TLS handshake has to say. `Some(reason)` when the connection must
    /// close (the peer closed it, it failed, its handshake failed); its complete packets
    /// are still to be taken.
    pub fn read(
        &mut self,
        i: usize,
        buf: &mut [u8],
        now: Instant,
        common: &Common,
        poller: &Poller,
        metrics: &Metrics,
    ) -> Option<&'static str> {
        let transport = self.transport;
        let c = self.connections.get_mut(i).and_then(Option::as_mut)?;
        let mut closing = None;
        // A bounded number of reads per round, so one connection cannot starve the others.
        for _ in 0..8 {
            let n = match c.stream.read(buf) {
                Ok(0) => {
                    closing = Some("peer");
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closing = Some("peer");
                    break;
                }
            };
            let Some(tls) = c.tls.as_deref_mut() else {
                c.deframer.push(&buf[..n], now);
                continue;
            };
            if let Err(reason) = tls::read_records(tls, &buf[..n], &mut c.deframer, now) {
                if reason != "peer" {
                    info!(remote = %c.remote, transport, reason, "TLS connection refused");
                }
                closing = Some(reason);
                break;
            }
        }
        if closing.is_none()
            && !c.identified
            && let Some(tls) = c.tls.as_deref()
            && !tls.is_handshaking()
        {
            c.identified = true;
            let offered = self
                .tls
                .as_ref()
                .map_or(&[][..], |t| t.alpn_protocols.as_slice());
            let checked =
                identify(tls, c.remote, common).and_then(|()| tls::negotiated(tls, offered));
            if let Ok(v11) = checked {
                c.v11 = v11;
                let protocol = if v11 { tls::RADIUS_11 } else { tls::RADIUS_10 };
                info!(remote = %c.remote, protocol, "TLS connection accepted");
                metrics
                    .connections_protocol
                    .get_or_create(&ProtocolLabel {
                        transport,
                        protocol,
                    })
                    .inc();
            }
            if let Err(reason) = checked {
                info!(remote = %c.remote, transport, reason, "TLS connection refused");
                // Nothing it sent is handled.
                c.deframer = Deframer::default();
                closing = Some(reason);
            }
        }
        if let Some(tls) = c.tls.as_deref_mut() {
            // Handshake messages, or the alert that tells the peer why it is refused.
            tls::drain(tls, &mut c.unsent);
        }
        self.write_out(i, poller);
        closing
    }

    /// Takes connection `i`'s deframer, to cut packets out of it while the engine runs;
    /// give it back with [`TcpFront::put_back`].
    pub fn take_packets(&mut self, i: usize) -> Option<(Deframer, SocketAddr, SocketAddr)> {
        let c = self.connections.get_mut(i)?.as_mut()?;
        Some((std::mem::take(&mut c.deframer), c.remote, c.local))
    }

    /// Where connection `i`'s next packet goes in the engine, noting it arrived at `now`.
    pub fn on_packet(&mut self, i: usize, now: Instant) -> Option<Read> {
        let c = self.connections.get_mut(i)?.as_mut()?;
        c.last_packet = Some(now);
        Some(Read {
            remote: c.remote,
            local: c.local,
            flow: c.flow,
        })
    }

    pub fn put_back(&mut self, i: usize, mut deframer: Deframer) {
        if let Some(c) = self.connections.get_mut(i).and_then(Option::as_mut) {
            deframer.compact();
            c.deframer = deframer;
        }
    }

    /// Whether the connection from `remote` to `local` speaks RADIUS/1.1.
    pub fn speaks_v11(&self, remote: SocketAddr, local: SocketAddr) -> bool {
        self.by_addr
            .get(&(remote, local))
            .and_then(|&i| self.connections.get(i)?.as_ref())
            .is_some_and(|c| c.v11)
    }

    /// The engine gave the flow of `remote` to `local` its "child": this connection.
    pub fn attach_flow(&mut self, remote: SocketAddr, local: SocketAddr, slot: usize) -> bool {
        let Some(&i) = self.by_addr.get(&(remote, local)) else {
            return false;
        };
        if let Some(c) = self.connections.get_mut(i).and_then(Option::as_mut) {
            c.flow = Some(slot);
        }
        true
    }

    /// The engine ended the flow of `remote` to `local` (idle, or shutdown): its connection
    /// closes.
    pub fn flow_ended(&mut self, remote: SocketAddr, local: SocketAddr, reason: &'static str) {
        if let Some(&i) = self.by_addr.get(&(remote, local)) {
            if let Some(c) = self.connections.get_mut(i).and_then(Option::as_mut) {
                c.flow = None;
            }
            self.doom(i, reason);
        }
    }

    /// Marks connection `i` to be closed at the end of the round.
    pub fn doom(&mut self, i: usize, reason: &'static str) {
        if !self.doomed.iter().any(|&(j, _)| j == i) {
            self.doomed.push((i, reason));
        }
    }

    /// Writes an answer to the connection of `remote` to `local`; false when there is none
    /// (it closed while the request was in flight).
    pub fn send(
        &mut self,
        remote: SocketAddr,
        local: SocketAddr,
        data: &[u8],
        poller: &Poller,
    ) -> bool {
        let Some(&i) = self.by_addr.get(&(remote, local)) else {
            return false;
        };
        let Some(c) = self.connections.get_mut(i).and_then(Option::as_mut) else {
            return false;
        };
        c.queue(data);
        self.write_out(i, poller);
        true
    }

    /// Connection `i` may be writable: what waits goes out.
    pub fn flush(&mut self, i: usize, poller: &Poller) {
        self.write_out(i, poller);
    }

    /// Writes what connection `i` has queued, as far as the socket takes it; the rest waits
    /// for writability (watched), up to [`MAX_UNSENT`].
    fn write_out(&mut self, i: usize, poller: &Poller) {
        let Some(c) = self.connections.get_mut(i).and_then(Option::as_mut) else {
            return;
        };
        let mut doom = None;
        while c.unsent_from < c.unsent.len() {
            match c.stream.write(&c.unsent[c.unsent_from..]) {
                Ok(0) => break,
                Ok(n) => c.unsent_from += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    doom = Some("error");
                    break;
                }
            }
        }
        if c.unsent_from == c.unsent.len() {
            c.unsent.clear();
            c.unsent_from = 0;
            if c.want_write {
                c.want_write = false;
                let _ = poller.watch_writable(&c.stream, c.token, false);
            }
        } else if c.unsent.len() - c.unsent_from > MAX_UNSENT {
            doom = Some("slow_reader");
        } else if !c.want_write {
            c.want_write = poller.watch_writable(&c.stream, c.token, true).is_ok();
        }
        if let Some(reason) = doom {
            self.doom(i, reason);
        }
    }

    /// Dooms the connections past their timeouts (see the module's doc).
    pub fn sweep(&mut self, now: Instant) {
        let Limits {
            timeout,
            idle_timeout,
            ..
        } = self.limits;
        let mut late = Vec::new();
        for (i, c) in self.connections.iter().enumerate() {
            let Some(c) = c else { continue };
            let reason = if c
                .deframer
                .partial_since()
                .is_some_and(|t| now - t >= timeout)
            {
                Some("partial")
            } else if c.last_packet.is_none() && now - c.accepted_at >= timeout {
                Some("silent")
            } else if c
                .last_packet
                .is_some_and(|t| now.saturating_duration_since(t) >= idle_timeout)
            {
                Some("idle")
            } else {
                None
            };
            if let Some(r) = reason {
                late.push((i, r));
            }
        }
        for (i, r) in late {
            self.doom(i, r);
        }
    }

    /// The connections doomed this round, closed: each one's addresses, for the engine.
    pub fn close_doomed(
        &mut self,
        poller: &Poller,
        metrics: &Metrics,
    ) -> Vec<(SocketAddr, SocketAddr)> {
        let doomed = std::mem::take(&mut self.doomed);
        doomed
            .into_iter()
            .filter_map(|(i, reason)| self.close(i, reason, poller, metrics))
            .collect()
    }

    /// Closes connection `i` now; its addresses, when it was open.
    pub fn close(
        &mut self,
        i: usize,
        reason: &'static str,
        poller: &Poller,
        metrics: &Metrics,
    ) -> Option<(SocketAddr, SocketAddr)> {
        let c = self.connections.get_mut(i)?.take()?;
        self.free.push(i);
        self.by_addr.remove(&(c.remote, c.local));
        let ip = c.remote.ip();
        if let Some(n) = self.per_source.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(&ip);
            }
        }
        poller.remove(&c.stream);
        let transport = self.transport;
        metrics
            .connections_closed
            .get_or_create(&ConnectionLabel { transport, reason })
            .inc();
        metrics
            .connections_open
            .get_or_create(&TransportLabel { transport })
            .dec();
        debug!(remote = %c.remote, transport, reason, "connection closed");
        Some((c.remote, c.local))
    }

    /// Every open connection's index.
    pub fn open(&self) -> Vec<usize> {
        (0..self.connections.len())
            .filter(|&i| self.connections[i].is_some())
            .collect()
    }
}

/// Holds a TLS peer's certificate (verified against the CA by now) against what its client
/// (by source address) requires.
fn identify(
    tls: &ServerConnection,
    remote: SocketAddr,
    common: &Common,
) -> Result<(), &'static str> {
    let Some(client) = common.clients.lookup(remote.ip()) else {
        // A dynamic client: its directory says nothing of certificates.
        return Ok(());
    };
    if client.certificate.is_empty() {
        return Ok(());
    }
    let der = tls
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no_certificate")?;
    crate::tls::check_peer(&client.certificate, der)
}

/// An IPv4 peer of a dual-stack socket as IPv4, so it matches the client table.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
