//! Upstreams over RADIUS/TCP (RFC 6613) or RADIUS/TLS (RFC 6614): one connection per socket
//! index of the engine's request table (so 256 Identifiers each, and another connection
//! when they are all in flight), connected without blocking. Requests written while it
//! connects (or handshakes, or waits to connect again) wait in its buffer; when it closes,
//! the worker tells the engine (which sends that connection's requests anew, to wait for
//! the next connection) and the connection is made again after a backoff that doubles up
//! to [`MAX_BACKOFF`].
//!
//! A watchdog (RFC 3539, as RFC 6613 section 2.6.4 asks): after the upstream's `retry`
//! without a byte from the server while requests are out (or [`WATCHDOG_IDLE`] when none
//! are), a Status-Server goes on the connection with Identifier [`WATCHDOG_ID`] (which the
//! engine never gives a request); if nothing at all is heard for another `retry` while
//! requests are out, the connection is closed and its requests go on a new one, while
//! their timeout allows. Its answer is the connection's, not the engine's. (RFC 3539's
//! Tw of 6 s or more is longer than a RADIUS request lives: 5 s by default here.)
//!
//! Over TLS, what waits is held until the worker has heard which protocol the handshake
//! agreed on (ALPN, RFC 9765) and confirmed it ([`UpstreamConn::confirm`]): requests
//! prepared for the other one are dropped, and the engine prepares them again. Each
//! request is then a TLS record of its own: FreeRADIUS 3.2 takes a record for one
//! packet, and closes the connection when it holds more.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use rustls::{ClientConnection, pki_types::ServerName};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tracing::{debug, info};

use crate::{
    codec::{Code, Packet, auth::Secret},
    requests::WATCHDOG_ID,
    socket::Poller,
    stream::Deframer,
    tls,
};

const FIRST_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Silence, with nothing out, after which the watchdog asks (RFC 3539's default Tw).
const WATCHDOG_IDLE: Duration = Duration::from_secs(30);
/// Requests a connection may hold unsent before it counts as failed.
const MAX_UNSENT: usize = 4 << 20;

/// The TLS side of an upstream: its client configuration and the name to verify.
pub type TlsClient = (Arc<rustls::ClientConfig>, ServerName<'static>);

/// How an upstream is reached.
#[derive(Clone, Debug)]
pub enum Transport {
    Udp,
    Tcp,
    Tls(TlsClient),
}

/// One connection to an upstream.
pub struct UpstreamConn {
    to: SocketAddr,
    tls: Option<TlsClient>,
    /// For the watchdog's Status-Server, and how long it lets a busy connection be silent.
    secret: Secret,
    watchdog_busy: Duration,
    /// The handshake agreed on RADIUS/1.1.
    v11: bool,
    /// Requests given and replies read on this connection, and when a byte was last heard.
    sent: u64,
    answered: u64,
    heard_at: Instant,
    /// The watchdog's Status-Server out: when, and the authenticator (or Token) it carried.
    probe: Option<(Instant, [u8; 16])>,
    token: u64,
    stream: Option<TcpStream>,
    session: Option<Box<ClientConnection>>,
    connected: bool,
    deframer: Deframer,
    /// Requests (clear text) not yet given to the connection: it is not up, or TLS is
    /// still shaking hands.
    waiting: Vec<u8>,
    /// Why it last closed (a metric label).
    closed_why: &'static str,
    /// The handshake's protocol was told to the worker (TLS), and confirmed by it.
    told: bool,
    confirmed: bool,
    /// Bytes for the socket (TLS records, or requests on TCP), written from `unsent_from`.
    unsent: Vec<u8>,
    unsent_from: usize,
    want_write: bool,
    /// When to connect again, after a close.
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// What a connection's readiness gave: replies, and whether it closed.
#[derive(Default)]
pub struct Readiness {
    pub replies: Vec<Vec<u8>>,
    pub closed: bool,
    /// The TLS handshake just finished: RADIUS/1.1 agreed or not. The worker tells the
    /// engine, then [`UpstreamConn::confirm`]s.
    pub negotiated: Option<bool>,
    /// The connection is ready to carry requests, speaking this ("tcp", "radius/1.0",
    /// "radius/1.1"): a metric label.
    pub opened: Option<&'static str>,
}

impl UpstreamConn {
    /// Starts connecting to `to`.
    pub fn connect(
        to: SocketAddr,
        tls: Option<TlsClient>,
        (secret, watchdog_busy): (Secret, Duration),
        token: u64,
        poller: &Poller,
        now: Instant,
    ) -> std::io::Result<Self> {
        let mut c = Self {
            to,
            tls,
            secret,
            watchdog_busy,
            v11: false,
            sent: 0,
            answered: 0,
            heard_at: now,
            probe: None,
            token,
            stream: None,
            session: None,
            connected: false,
            deframer: Deframer::default(),
            waiting: Vec::new(),
            closed_why: "",
            told: false,
            confirmed: false,
            unsent: Vec::new(),
            unsent_from: 0,
            want_write: false,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        };
        c.open(poller, now)?;
        Ok(c)
    }

    fn open(&mut self, poller: &Poller, now: Instant) -> std::io::Result<()> {
        let s = Socket::new(
            Domain::for_address(self.to),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        match s.connect(&SockAddr::from(self.to)) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => {
                self.retry_at = Some(now + self.backoff);
                return Err(e);
            }
        }
        let stream: TcpStream = s.into();
        poller.add(&stream, self.token)?;
        // Writable once connected.
        poller.watch_writable(&stream, self.token, true)?;
        self.want_write = true;
        self.session = match &self.tls {
            None => None,
            Some((config, name)) => Some(Box::new(
                ClientConnection::new(config.clone(), name.clone())
                    .map_err(std::io::Error::other)?,
            )),
        };
        self.stream = Some(stream);
        self.connected = false;
        self.v11 = false;
        self.sent = 0;
        self.answered = 0;
        self.heard_at = now;
        self.probe = None;
        self.told = false;
        self.confirmed = false;
        self.retry_at = None;
        Ok(())
    }

    /// Queues a request, also while the connection is down (it goes on the next one);
    /// false when the connection holds too much already.
    pub fn send(&mut self, data: &[u8], poller: &Poller) -> bool {
        if self.waiting.len() + self.unsent.len() - self.unsent_from > MAX_UNSENT {
            return false;
        }
        self.waiting.extend_from_slice(data);
        self.sent += 1;
        self.give_waiting(poller);
        true
    }

    /// Gives the waiting requests to the connection once it can carry them, and writes.
    fn give_waiting(&mut self, poller: &Poller) {
        if !self.connected {
            return;
        }
        match self.session.as_deref_mut() {
            None => {
                self.unsent.extend_from_slice(&self.waiting);
                self.waiting.clear();
            }
            Some(s) => {
                if !s.is_handshaking() && self.confirmed {
                    // One packet per write: a record each. rustls takes a whole packet
                    // (its buffer is drained after each); if it ever took part, the rest
                    // follows at once, so `given` stays on a packet's boundary.
                    let mut given = 0;
                    'packets: while given < self.waiting.len() {
                        let len = self
                            .waiting
                            .get(given + 2..given + 4)
                            .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
                        let end = (given + len.max(1)).min(self.waiting.len());
                        while given < end {
                            match s.writer().write(&self.waiting[given..end]) {
                                Ok(0) | Err(_) => break 'packets,
                                Ok(n) => given += n,
                            }
                            tls::drain(s, &mut self.unsent);
                        }
                    }
                    self.waiting.drain(..given);
                }
                tls::drain(s, &mut self.unsent);
            }
        }
        self.write_out(poller);
    }

    /// The socket is ready: the connection completes, replies are read, queued requests go.
    pub fn on_ready(&mut self, buf: &mut [u8], poller: &Poller, now: Instant) -> Readiness {
        let mut out = Readiness::default();
        if !self.connected {
            let state = match self.stream.as_ref() {
                None => return out,
                Some(s) => match s.take_error() {
                    Ok(None) => s.peer_addr().is_ok().then_some(true),
                    _ => Some(false),
                },
            };
            match state {
                // Still connecting.
                None => return out,
                Some(true) => {
                    self.connected = true;
                    self.backoff = FIRST_BACKOFF;
                    info!(upstream = %self.to, tls = self.tls.is_some(), "upstream connection open");
                    if self.tls.is_none() {
                        out.opened = Some("tcp");
                    }
                }
                Some(false) => {
                    self.close(poller, now, "connect_failed");
                    out.closed = true;
                    return out;
                }
            }
        }
        if let Some(why) = self.read_all(buf, now, &mut out.replies) {
            self.close(poller, now, why);
            out.closed = true;
            return out;
        }
        if !self.told
            && let Some(s) = self.session.as_deref()
            && !s.is_handshaking()
        {
            self.told = true;
            let offered = self
                .tls
                .as_ref()
                .map_or(&[][..], |t| &t.0.alpn_protocols[..]);
            match tls::negotiated(s, offered) {
                Ok(v11) => {
                    info!(
                        upstream = %self.to,
                        protocol = if v11 { tls::RADIUS_11 } else { tls::RADIUS_10 },
                        "upstream TLS connection ready"
                    );
                    self.v11 = v11;
                    out.negotiated = Some(v11);
                    out.opened = Some(if v11 { tls::RADIUS_11 } else { tls::RADIUS_10 });
                }
                Err(reason) => {
                    info!(upstream = %self.to, reason, "upstream TLS refused: RADIUS/1.1 required");
                    self.close(poller, now, reason);
                    out.closed = true;
                    return out;
                }
            }
        }
        self.give_waiting(poller);
        out
    }

    /// The worker told the engine what the handshake agreed on; `drop_waiting` when the
    /// requests that waited were prepared for the other protocol (the engine sent them
    /// anew). What waits may go now.
    pub fn confirm(&mut self, drop_waiting: bool, poller: &Poller) {
        if drop_waiting {
            self.waiting.clear();
        }
        self.confirmed = true;
        self.give_waiting(poller);
    }

    /// Reads what the socket has into the deframer and the replies; why the connection
    /// failed or closed, if it did.
    fn read_all(
        &mut self,
        buf: &mut [u8],
        now: Instant,
        replies: &mut Vec<Vec<u8>>,
    ) -> Option<&'static str> {
        let Some(stream) = self.stream.as_mut() else {
            return Some("closed");
        };
        let mut failed = None;
        for _ in 0..8 {
            let n = match stream.read(buf) {
                Ok(0) => {
                    failed = Some("closed");
                    break;
                }
                Ok(n) => {
                    self.heard_at = now;
                    n
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    failed = Some("error");
                    break;
                }
            };
            match self.session.as_deref_mut() {
                None => self.deframer.push(&buf[..n], now),
                Some(s) => {
                    if let Err(reason) = tls::read_records(s, &buf[..n], &mut self.deframer, now) {
                        if reason != "peer" {
                            info!(upstream = %self.to, reason, "upstream TLS failed");
                        }
                        failed = Some(if reason == "peer" { "closed" } else { reason });
                        break;
                    }
                }
            }
        }
        loop {
            match self.deframer.next_packet() {
                Ok(Some(p)) => {
                    let id = if self.v11 { p.get(7) } else { p.get(1) };
                    if id == Some(&WATCHDOG_ID) && self.probe.is_some() {
                        // The watchdog's answer: checked, and the connection's alone.
                        if answers_probe(self.probe.as_ref(), self.v11, &self.secret, p) {
                            self.probe = None;
                        }
                    } else {
                        self.answered += 1;
                        replies.push(p.to_vec());
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    failed = Some("bad_length");
                    break;
                }
            }
        }
        self.deframer.compact();
        failed
    }

    fn write_out(&mut self, poller: &Poller) {
        let Some(stream) = self.stream.as_mut() else {
            return;
        };
        while self.unsent_from < self.unsent.len() {
            match stream.write(&self.unsent[self.unsent_from..]) {
                Ok(0) => break,
                Ok(n) => self.unsent_from += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let pending = self.unsent_from < self.unsent.len();
        if !pending {
            self.unsent.clear();
            self.unsent_from = 0;
        }
        if pending != self.want_write {
            self.want_write =
                poller.watch_writable(&*stream, self.token, pending).is_ok() && pending;
        }
    }

    /// Drops the connection; what it held, and what waited for it, is lost (the engine
    /// sends its requests anew, and they wait for the next connection).
    pub fn close(&mut self, poller: &Poller, now: Instant, why: &'static str) {
        self.closed_why = why;
        if let Some(s) = self.stream.take() {
            poller.remove(&s);
            debug!(upstream = %self.to, why, "upstream connection closed");
        }
        self.session = None;
        self.connected = false;
        self.deframer = Deframer::default();
        self.waiting.clear();
        self.unsent.clear();
        self.unsent_from = 0;
        self.want_write = false;
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }

    /// Why it last closed: a metric label.
    pub fn closed_why(&self) -> &'static str {
        self.closed_why
    }

    /// The watchdog: asks a silent server, and closes a connection that stays silent with
    /// requests out (true then: the worker sends them anew).
    pub fn watchdog(&mut self, poller: &Poller, now: Instant) -> bool {
        if !self.connected || !self.confirmed && self.tls.is_some() {
            return false;
        }
        // A server that ignores Status-Server but answers requests: forget the probe, ask
        // again later.
        if let Some((at, _)) = self.probe
            && self.heard_at > at
            && now.saturating_duration_since(at) >= WATCHDOG_IDLE
        {
            self.probe = None;
        }
        let busy = self.sent > self.answered;
        let silent = now.saturating_duration_since(self.heard_at);
        match self.probe {
            Some((at, _))
                if busy
                    && now.saturating_duration_since(at) >= self.watchdog_busy
                    && silent >= self.watchdog_busy =>
            {
                info!(
                    upstream = %self.to,
                    silent_ms = silent.as_millis() as u64,
                    "upstream connection silent: closed by the watchdog"
                );
                self.close(poller, now, "watchdog");
                true
            }
            Some(_) => false,
            None if silent
                >= if busy {
                    self.watchdog_busy
                } else {
                    WATCHDOG_IDLE
                } =>
            {
                let mut buf = [0u8; 64];
                let (packet, auth) = if self.v11 {
                    let mut token = [0u8; 16];
                    crate::codec::auth::fill_random(&mut token[..3]);
                    token[3] = WATCHDOG_ID;
                    buf[0] = Code::StatusServer as u8;
                    buf[3] = crate::codec::HEADER_LEN as u8;
                    buf[4..20].copy_from_slice(&token);
                    (buf[..crate::codec::HEADER_LEN].to_vec(), token)
                } else {
                    match crate::codec::edit::status_server(&mut buf, WATCHDOG_ID, &self.secret) {
                        Ok(p) => (p.as_bytes().to_vec(), p.authenticator()),
                        Err(_) => return false,
                    }
                };
                debug!(upstream = %self.to, "watchdog Status-Server");
                self.probe = Some((now, auth));
                self.waiting.extend_from_slice(&packet);
                self.give_waiting(poller);
                false
            }
            None => false,
        }
    }

    /// Connects again once its backoff has passed.
    pub fn poll(&mut self, poller: &Poller, now: Instant) {
        if self.stream.is_none()
            && self.retry_at.is_some_and(|t| now >= t)
            && let Err(e) = self.open(poller, now)
        {
            debug!(upstream = %self.to, error = %e, "upstream connection not made");
            self.retry_at = Some(now + self.backoff);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        }
    }
}

/// Whether `reply` answers the watchdog's Status-Server `probe` (sent at, authenticator or
/// Token).
fn answers_probe(
    probe: Option<&(Instant, [u8; 16])>,
    v11: bool,
    secret: &Secret,
    reply: &[u8],
) -> bool {
    let Some((_, auth)) = probe else {
        return false;
    };
    if v11 {
        return Packet::parse_v11(reply).is_ok_and(|p| p.authenticator()[..4] == auth[..4]);
    }
    Packet::parse(reply).is_ok_and(|p| crate::codec::auth::verify(&p, secret, Some(auth)).is_ok())
}
