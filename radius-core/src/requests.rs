//! The requests one worker has in flight upstream, sans-IO: per upstream port a few
//! sockets' Identifier spaces (256 Identifiers each), and their timers.
//!
//! A request gets an Identifier on the first socket of its port with one free; when all
//! are in flight the table asks the driver for another socket (up to [`MAX_SOCKETS`] per
//! port: 4 096 requests in flight per port and worker, where radsecproxy drops past 256),
//! and gives an extra socket back after [`SOCKET_IDLE`] with nothing in flight. A sweep
//! says which requests are past their timeout (to give up) and which are due for a
//! retransmission on the sidecar's own timer (with the delay the caller draws: jitter is
//! the caller's, so tests can fix it). Sockets are the driver's: the table only knows
//! their indexes, `port * MAX_SOCKETS + n`.

use std::time::{Duration, Instant};

use crate::proxy::{IdPool, InFlight};

/// On a stream upstream's connection, the Identifier (and, on RADIUS/1.1, the last byte of
/// the Token) of the driver's watchdog Status-Server (RFC 3539): never a request's.
pub const WATCHDOG_ID: u8 = 255;

/// Sockets a worker may open per upstream port.
pub const MAX_SOCKETS: usize = 16;
/// An extra socket with nothing in flight for this long is given back.
pub const SOCKET_IDLE: Duration = Duration::from_secs(30);

/// Where a request's upstream copy is: a socket (by index) and the Identifier on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct At {
    pub socket: usize,
    pub id: u8,
}

/// The port a socket index belongs to.
pub fn port_of(socket: usize) -> usize {
    socket / MAX_SOCKETS
}

/// What [`Requests::allocate`] did with a request.
#[derive(Debug)]
pub enum Allocation<F> {
    /// It has this socket and Identifier.
    At(At),
    /// Every Identifier of the port's sockets is in flight: open socket `socket` (then
    /// [`Requests::add_socket`]) and allocate `request` again.
    OpenSocket { socket: usize, request: InFlight<F> },
    /// All [`MAX_SOCKETS`] sockets are full.
    Exhausted(InFlight<F>),
}

/// What a [`Requests::sweep`] found on one port.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Past their timeout: to be given up (and ended).
    pub expired: Vec<At>,
    /// Due for a retransmission on our own timer (their retry count is already taken).
    pub resend: Vec<At>,
    /// Extra sockets given back: the driver closes them.
    pub closed: Vec<usize>,
    /// When the oldest request still out went to this server (see `InFlight::sent_here`).
    pub oldest: Option<Instant>,
}

#[derive(Debug)]
struct Space<F> {
    ids: IdPool<InFlight<F>>,
    idle_since: Instant,
}

/// Every request of one worker in flight upstream; `F` says where its answer goes.
#[derive(Debug)]
pub struct Requests<F> {
    spaces: Vec<Option<Space<F>>>,
}

impl<F> Default for Requests<F> {
    fn default() -> Self {
        Self { spaces: Vec::new() }
    }
}

impl<F> Requests<F> {
    /// The driver opened socket `socket`: its Identifiers are free (but
    /// [`WATCHDOG_ID`] on a stream's connection).
    pub fn add_socket(&mut self, socket: usize, stream: bool, now: Instant) {
        if self.spaces.len() <= socket {
            self.spaces.resize_with(socket + 1, || None);
        }
        let mut ids = IdPool::default();
        if stream {
            ids.reserve_from(WATCHDOG_ID);
        }
        self.spaces[socket] = Some(Space {
            ids,
            idle_since: now,
        });
    }

    /// Gives `request` an Identifier on one of `port`'s sockets, or says what is needed.
    pub fn allocate(&mut self, port: usize, mut request: InFlight<F>) -> Allocation<F> {
        let first = port * MAX_SOCKETS;
        for socket in first..first + MAX_SOCKETS {
            if let Some(Some(space)) = self.spaces.get_mut(socket) {
                match space.ids.allocate(request) {
                    Ok(id) => return Allocation::At(At { socket, id }),
                    Err(r) => request = r,
                }
            }
        }
        match (first..first + MAX_SOCKETS).find(|&s| !matches!(self.spaces.get(s), Some(Some(_)))) {
            Some(socket) => Allocation::OpenSocket { socket, request },
            None => Allocation::Exhausted(request),
        }
    }

    pub fn get(&self, at: At) -> Option<&InFlight<F>> {
        self.spaces.get(at.socket)?.as_ref()?.ids.get(at.id)
    }

    pub fn get_mut(&mut self, at: At) -> Option<&mut InFlight<F>> {
        self.spaces.get_mut(at.socket)?.as_mut()?.ids.get_mut(at.id)
    }

    /// Frees the Identifier at `at`, returning its request.
    pub fn take(&mut self, at: At, now: Instant) -> Option<InFlight<F>> {
        let space = self.spaces.get_mut(at.socket)?.as_mut()?;
        let r = space.ids.take(at.id)?;
        if space.ids.in_flight() == 0 {
            space.idle_since = now;
        }
        Some(r)
    }

    /// Where the requests in flight on `socket` are.
    pub fn on_socket(&mut self, socket: usize) -> Vec<At> {
        let mut out = Vec::new();
        if let Some(Some(space)) = self.spaces.get_mut(socket) {
            space.ids.for_each_mut(|id, _| out.push(At { socket, id }));
        }
        out
    }

    /// Requests in flight on `socket`.
    pub fn in_flight_on(&self, socket: usize) -> usize {
        match self.spaces.get(socket) {
            Some(Some(space)) => space.ids.in_flight(),
            _ => 0,
        }
    }

    /// Requests in flight on every socket.
    pub fn in_flight(&self) -> usize {
        self.spaces
            .iter()
            .flatten()
            .map(|s| s.ids.in_flight())
            .sum()
    }

    /// The timers of `port`'s requests at `now`: those older than `timeout` expire; those
    /// whose next retry is due, and that have retries left of `max_retries`, are to be sent
    /// again, the next one after `next_delay()`. Extra sockets idle for [`SOCKET_IDLE`] are
    /// given back.
    pub fn sweep(
        &mut self,
        port: usize,
        now: Instant,
        timeout: Duration,
        max_retries: u32,
        mut next_delay: impl FnMut() -> Duration,
    ) -> Sweep {
        let mut out = Sweep::default();
        let first = port * MAX_SOCKETS;
        for socket in first..(first + MAX_SOCKETS).min(self.spaces.len()) {
            let Some(space) = self.spaces[socket].as_mut() else {
                continue;
            };
            space.ids.for_each_mut(|id, r| {
                if now.saturating_duration_since(r.sent_at) > timeout {
                    out.expired.push(At { socket, id });
                    return;
                }
                out.oldest = Some(out.oldest.map_or(r.sent_here, |o| o.min(r.sent_here)));
                if r.retries < max_retries && now >= r.next_retry && !r.wire.is_empty() {
                    r.retries += 1;
                    r.next_retry = now + next_delay();
                    out.resend.push(At { socket, id });
                }
            });
            if socket > first
                && space.ids.in_flight() == 0
                && now.saturating_duration_since(space.idle_since) > SOCKET_IDLE
            {
                self.spaces[socket] = None;
                out.closed.push(socket);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        blastradius::YesNoAuto,
        client::Client,
        codec::{Code, auth::Secret},
        pool::Pool,
        proxy::Prepared,
        upstream::Upstream,
    };
    use std::sync::Arc;

    fn client() -> Arc<Client> {
        Arc::new(Client {
            name: "nas".into(),
            prefix: "192.0.2.0/24".parse().unwrap(),
            secret: Secret::new(b"s"),
            pool: Arc::new(Pool::single(Arc::new(Upstream {
                name: "up".into(),
                auth: "127.0.0.1:1".parse().unwrap(),
                acct: None,
                secret: Secret::new(b"u"),
                timeout: Duration::from_secs(5),
                options: Default::default(),
                health: Default::default(),
                stream: false,
            }))),
            require_message_authenticator: YesNoAuto::No,
            limit_proxy_state: YesNoAuto::Auto,
            learned: Default::default(),
            nas_key: None,
            certificate: Default::default(),
            operator_name: None,
            rewrite: Default::default(),
            acct_pool: None,
            acct_replicas: Default::default(),
        })
    }

    fn request(c: &Arc<Client>, now: Instant, n: u32) -> InFlight<u32> {
        InFlight {
            client: c.clone(),
            prepared: Prepared {
                nas_v11: false,
                len: 20,
                code: Code::AccessRequest,
                nas_id: n as u8,
                nas_auth: [0; 16],
                learnt_client_signs: false,
            },
            up_auth: [0; 16],
            sent_at: now,
            sent_here: now,
            reply_to: n,
            wire: vec![1],
            retries: 0,
            next_retry: now + Duration::from_secs(2),
            nas_packet: Vec::new(),
            pool: None,
            user_name: None,
            replica: false,
        }
    }

    /// Allocates like the driver: opening the sockets the table asks for.
    fn allocate(t: &mut Requests<u32>, port: usize, r: InFlight<u32>, now: Instant) -> Option<At> {
        let mut r = r;
        loop {
            match t.allocate(port, r) {
                Allocation::At(at) => return Some(at),
                Allocation::OpenSocket { socket, request } => {
                    t.add_socket(socket, false, now);
                    r = request;
                }
                Allocation::Exhausted(_) => return None,
            }
        }
    }

    #[test]
    fn past_256_in_flight_the_next_socket_is_asked_for_and_past_the_bound_none() {
        let (c, now) = (client(), Instant::now());
        let mut t = Requests::default();
        t.add_socket(MAX_SOCKETS, false, now); // port 1's first socket
        let mut ats = Vec::new();
        for n in 0..256 {
            ats.push(allocate(&mut t, 1, request(&c, now, n), now).unwrap());
        }
        assert!(ats.iter().all(|a| a.socket == MAX_SOCKETS));
        match t.allocate(1, request(&c, now, 256)) {
            Allocation::OpenSocket { socket, .. } => assert_eq!(socket, MAX_SOCKETS + 1),
            other => panic!("{other:?}"),
        }
        for n in 256..(256 * MAX_SOCKETS as u32) {
            assert!(allocate(&mut t, 1, request(&c, now, n), now).is_some());
        }
        assert_eq!(t.in_flight(), 256 * MAX_SOCKETS);
        assert!(matches!(
            t.allocate(1, request(&c, now, 0)),
            Allocation::Exhausted(_)
        ));
        // An answer frees its Identifier for the next request.
        let freed = t.take(ats[10], now).unwrap();
        assert_eq!(freed.reply_to, 10);
        assert_eq!(allocate(&mut t, 1, request(&c, now, 9), now), Some(ats[10]));
        assert_eq!(port_of(ats[0].socket), 1);
    }

    #[test]
    fn a_sweep_expires_retransmits_with_the_drawn_delay_and_gives_sockets_back() {
        let (c, t0) = (client(), Instant::now());
        let s = |n| t0 + Duration::from_secs(n);
        let mut t = Requests::default();
        t.add_socket(0, false, t0);
        let a = allocate(&mut t, 0, request(&c, t0, 1), t0).unwrap();
        let b = allocate(&mut t, 0, request(&c, s(3), 2), t0).unwrap();
        let delay = || Duration::from_millis(2_100);
        // t0 + 2 s: `a` is due (next_retry), `b` not yet.
        let sw = t.sweep(0, s(2), Duration::from_secs(5), 2, delay);
        assert_eq!((sw.expired, sw.resend), (vec![], vec![a]));
        assert_eq!(t.get(a).unwrap().retries, 1);
        assert_eq!(
            t.get(a).unwrap().next_retry,
            s(2) + Duration::from_millis(2_100)
        );
        // Past the timeout `a` expires; `b` (sent at 3 s) is resent at 5 s.
        let sw = t.sweep(0, s(6), Duration::from_secs(5), 2, delay);
        assert_eq!((sw.expired, sw.resend), (vec![a], vec![b]));
        // Given up and answered: the extra socket of a burst goes back once idle.
        t.take(a, s(6));
        t.take(b, s(6));
        t.add_socket(1, false, s(6));
        assert!(
            t.sweep(0, s(30), Duration::from_secs(5), 2, delay)
                .closed
                .is_empty()
        );
        let sw = t.sweep(0, s(37), Duration::from_secs(5), 2, delay);
        assert_eq!(sw.closed, vec![1], "never the port's first socket");
    }
}
