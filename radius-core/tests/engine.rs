//! The engine on a virtual clock, driven as the UDP worker drives it, with a fake NAS (real
//! packets, signed with the client's secret) and fake upstreams (they verify what reaches
//! them and answer with the upstream's secret). No socket, no thread, no sleep: time moves
//! only when a test moves it.
#![expect(
    clippy::unwrap_used,
    reason = "a test: an unwrap that fails is a test that fails"
)]

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use radius_core::{
    blastradius::YesNoAuto,
    client::{Client, ClientTable},
    coa::CoaJob,
    codec::{
        Code, Packet, PacketMut, attr,
        auth::{self, Secret},
        hide,
    },
    counters::{Count, Counters, Refusal, Via},
    dedup::DedupTimers,
    dynamic::{Dynamic, Lifetimes, NotDefined},
    engine::{self, Common, Engine, Io, Random, Settings},
    flows::{Flow, flow_key},
    pool::{Policy, Pool},
    realm::{Delimiters, Realm, Realms},
    requests::{self, At},
    upstream::{State, Upstream, UpstreamOptions},
};

const NAS_SECRET: &[u8] = b"nas-secret";
const LISTEN: &str = "192.0.2.1:1812";

// ---------------------------------------------------------------- fakes

/// Every count, by what was counted.
#[derive(Default)]
struct Tally(Mutex<HashMap<Count, u64>>);

impl Counters for Tally {
    fn count(&self, c: Count) {
        *self.0.lock().unwrap().entry(c).or_default() += 1;
    }
    fn signs(&self, _: &'static str, _: &str) {}
}

impl Tally {
    fn get(&self, c: Count) -> u64 {
        self.0.lock().unwrap().get(&c).copied().unwrap_or(0)
    }
}

/// The driver's side: which sockets the engine asked for.
#[derive(Default)]
struct FakeIo {
    children: HashMap<usize, SocketAddr>,
    upstream_sockets: HashMap<usize, SocketAddr>,
    /// Sockets past the first of a port that may be opened (the file-descriptor limit).
    extra_sockets_allowed: usize,
    defines: Vec<IpAddr>,
    closed_children: usize,
    /// NASes whose connections negotiated RADIUS/1.1.
    v11_nases: Vec<SocketAddr>,
    /// The spool takes records (else it refuses them), and what it took: (pool,
    /// upstream, request, age).
    spool_open: bool,
    spooled: Vec<(String, String, Vec<u8>, Duration)>,
}

impl Io for FakeIo {
    fn open_child(&mut self, slot: usize, flow: &Flow) -> Result<(), Refusal> {
        self.children.insert(slot, flow.remote);
        Ok(())
    }
    fn close_child(&mut self, slot: usize, _: &Flow, _: &mut Vec<(SocketAddr, Vec<u8>)>) {
        self.children.remove(&slot);
        self.closed_children += 1;
    }
    fn open_upstream(&mut self, socket: usize, to: SocketAddr) -> std::io::Result<()> {
        if !socket.is_multiple_of(requests::MAX_SOCKETS) {
            if self.extra_sockets_allowed == 0 {
                return Err(std::io::Error::other("no more descriptors"));
            }
            self.extra_sockets_allowed -= 1;
        }
        self.upstream_sockets.insert(socket, to);
        Ok(())
    }
    fn close_upstream(&mut self, socket: usize) {
        self.upstream_sockets.remove(&socket);
    }
    fn define(&mut self, ip: IpAddr) {
        self.defines.push(ip);
    }
    fn speaks_v11(&self, remote: SocketAddr, _: SocketAddr) -> bool {
        self.v11_nases.contains(&remote)
    }
    fn spool(&mut self, pool: &str, upstream: &str, packet: &[u8], age: Duration) -> bool {
        if self.spool_open {
            self.spooled
                .push((pool.into(), upstream.into(), packet.to_vec(), age));
        }
        self.spool_open
    }
}

/// An AAA server: verifies a request with its secret and answers it.
struct FakeUpstream {
    upstream: Arc<Upstream>,
    secret: Vec<u8>,
}

impl FakeUpstream {
    /// The request as the server sees it (verified with its secret), and its password.
    fn read<'a>(&self, wire: &'a [u8]) -> (Packet<'a>, Vec<u8>) {
        let p = Packet::parse(wire).expect("a well-formed request upstream");
        auth::verify(&p, &self.upstream.secret, None).expect("signed with the upstream's secret");
        let mut pw = Vec::new();
        if let Some(a) = p.get(attr::USER_PASSWORD) {
            let mut out = [0u8; 128];
            let n = hide::reveal_user_password(a.value, &self.secret, p.authenticator(), &mut out)
                .expect("a password hidden with the upstream's secret");
            pw = out[..n].to_vec();
        }
        (p, pw)
    }

    /// Its answer to `wire`: `code`, a Reply-Message, the Proxy-States echoed, `state`.
    fn answer(&self, wire: &[u8], code: Code, state: Option<&[u8]>) -> Vec<u8> {
        let (req, _) = self.read(wire);
        let mut buf = [0u8; 4096];
        let mut r = PacketMut::new(&mut buf, code, req.identifier()).unwrap();
        r.message_authenticator_first().unwrap();
        r.push(attr::REPLY_MESSAGE, self.upstream.name.as_bytes())
            .unwrap();
        if let Some(s) = state {
            r.push(attr::STATE, s).unwrap();
        }
        for ps in req.get_all(attr::PROXY_STATE) {
            r.add_proxy_state(ps.value).unwrap();
        }
        r.sign(&self.upstream.secret, Some(req.authenticator()))
            .unwrap();
        r.as_bytes().to_vec()
    }
}

/// A NAS's Access-Request: signed (Message-Authenticator), a hidden password, a NAS
/// name, and optionally a State.
fn access_request(id: u8, user: &str, state: Option<&[u8]>) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).unwrap();
    let a = auth::random_authenticator();
    p.set_authenticator(&a);
    p.message_authenticator_first().unwrap();
    p.push(attr::USER_NAME, user.as_bytes()).unwrap();
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(b"secret-pw", NAS_SECRET, &a, &mut h).unwrap();
    p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
    p.push(attr::NAS_IDENTIFIER, b"switch-1").unwrap();
    if let Some(s) = state {
        p.push(attr::STATE, s).unwrap();
    }
    p.sign(&Secret::new(NAS_SECRET), None).unwrap();
    p.as_bytes().to_vec()
}

/// Checks a reply the sidecar sent to the NAS against the request, and returns it.
fn nas_reads<'a>(reply: &'a [u8], request: &[u8]) -> Packet<'a> {
    let req = Packet::parse(request).unwrap();
    let p = Packet::parse(reply).expect("a well-formed reply");
    assert_eq!(p.identifier(), req.identifier(), "the NAS's Identifier");
    auth::verify(&p, &Secret::new(NAS_SECRET), Some(req.authenticator()))
        .expect("signed with the NAS's secret against its request");
    p
}

fn reply_message(p: &Packet<'_>) -> String {
    String::from_utf8_lossy(p.get(attr::REPLY_MESSAGE).map_or(&[][..], |a| a.value)).into_owned()
}

fn upstream(name: &str, port: u16) -> Arc<Upstream> {
    upstream_of(name, port, &format!("{name}-secret"), false)
}

/// An upstream reached over TCP or TLS (the driver's concern): the engine never sends a
/// request twice on its connection.
fn stream_upstream(name: &str, port: u16) -> Arc<Upstream> {
    upstream_of(name, port, &format!("{name}-secret"), true)
}

fn upstream_of(name: &str, port: u16, secret: &str, stream: bool) -> Arc<Upstream> {
    Arc::new(Upstream {
        name: name.into(),
        auth: SocketAddr::from(([127, 0, 0, 1], port)),
        acct: None,
        secret: Secret::new(secret.as_bytes()),
        timeout: Duration::from_secs(20),
        options: UpstreamOptions {
            retry: Duration::from_secs(2),
            max_retries: 2,
            require_message_authenticator: YesNoAuto::No,
            ..Default::default()
        },
        health: Default::default(),
        stream,
    })
}

fn client(name: &str, prefix: &str, pool: Arc<Pool>) -> Client {
    Client {
        name: name.into(),
        prefix: prefix.parse().unwrap(),
        secret: Secret::new(NAS_SECRET),
        pool,
        require_message_authenticator: YesNoAuto::Auto,
        limit_proxy_state: YesNoAuto::Auto,
        learned: Default::default(),
        nas_key: None,
        certificate: Default::default(),
        operator_name: None,
        rewrite: Default::default(),
        acct_pool: None,
        acct_replicas: Default::default(),
    }
}

// ---------------------------------------------------------------- the harness

struct Setup {
    upstreams: Vec<Arc<Upstream>>,
    policy: Policy,
    dynamic: Option<Dynamic>,
    realms: Option<Realms>,
    /// The NASes' client adds this Operator-Name (RFC 5580).
    operator_name: Option<Vec<u8>>,
    /// The NASes' client sends its accounting to this upstream (by index).
    acct_upstream: Option<usize>,
    /// ... and a copy to each of these.
    acct_replicas: Vec<usize>,
    /// Its accounting pool spools.
    spool: bool,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            upstreams: vec![upstream("aaa-1", 1812)],
            policy: Policy::FailOver,
            dynamic: None,
            realms: None,
            operator_name: None,
            acct_upstream: None,
            acct_replicas: Default::default(),
            spool: false,
        }
    }
}

/// One engine, its fake driver, and the virtual clock.
struct World {
    engine: Engine,
    io: FakeIo,
    now: Instant,
    start: Instant,
    tally: Arc<Tally>,
    common: Arc<Common>,
    servers: Vec<FakeUpstream>,
    /// What reached each upstream socket and what reached each NAS, in order.
    to_upstream: Vec<(At, Vec<u8>)>,
    to_nas: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
}

fn nas(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 7], port))
}

impl World {
    fn new(setup: Setup) -> Self {
        let pool = Arc::new(Pool {
            name: "pool".into(),
            members: setup.upstreams.clone(),
            policy: setup.policy,
            spool: false,
        });
        let mut clients = ClientTable::default();
        clients.insert(Client {
            operator_name: setup.operator_name.clone(),
            acct_pool: setup.acct_upstream.map(|i| {
                Arc::new(Pool {
                    spool: setup.spool,
                    ..Pool::single(setup.upstreams[i].clone())
                })
            }),
            acct_replicas: setup
                .acct_replicas
                .iter()
                .map(|&i| Arc::new(Pool::single(setup.upstreams[i].clone())))
                .collect(),
            ..client("nases", "198.51.100.0/24", pool.clone())
        });
        let tally = Arc::new(Tally::default());
        let common = Arc::new(Common {
            clients,
            dynamic: setup.dynamic.map(Arc::new),
            nas_directory: Default::default(),
            eap_states: Default::default(),
            pending_packets: Default::default(),
            upstreams: setup.upstreams.clone(),
            upstream_index: setup
                .upstreams
                .iter()
                .enumerate()
                .map(|(i, u)| (u.name.clone(), i))
                .collect(),
            proxy_state: *b"sidecar!",
            active: Default::default(),
            max_flows: 1000,
            provisional_flows: Default::default(),
            max_provisional: 1000,
            idle_timeout: Duration::from_secs(60),
            provisional_idle: Duration::from_secs(10),
            dedup: DedupTimers::default(),
            counters: tally.clone(),
            dictionary: Arc::new(radius_core::codec::dict::Dictionary::builtin().clone()),
            realms: setup.realms.map(Arc::new),
        });
        let now = Instant::now();
        let mut engine = Engine::new(common.clone(), 0, false, now);
        // No jitter: retransmissions fall exactly on `retry`. Authenticators from a counter:
        // the fake upstream must read each request with the one it carries.
        let mut n = 0u128;
        engine.set_random(Random {
            jitter: Box::new(|d| d),
            authenticator: Box::new(move || {
                n += 1;
                n.to_be_bytes()
            }),
        });
        let mut io = FakeIo::default();
        engine.start(now, &mut io).unwrap();
        let servers = setup
            .upstreams
            .iter()
            .map(|u| FakeUpstream {
                upstream: u.clone(),
                secret: format!("{}-secret", u.name).into_bytes(),
            })
            .collect();
        Self {
            engine,
            io,
            now,
            start: now,
            tally,
            common,
            servers,
            to_upstream: Vec::new(),
            to_nas: Vec::new(),
        }
    }

    fn collect(&mut self) {
        let t = self.engine.poll_transmits();
        for &(at, off, len) in &t.upstream {
            self.to_upstream.push((at, t.data(off, len).to_vec()));
        }
        for &(remote, local, off, len) in &t.nas {
            self.to_nas.push((remote, local, t.data(off, len).to_vec()));
        }
        self.engine.recycle(t);
    }

    /// A NAS datagram, read where the worker would read it: the flow's child once it has
    /// one, else the wildcard.
    fn nas_sends(&mut self, remote: SocketAddr, data: &[u8]) {
        let local: SocketAddr = LISTEN.parse().unwrap();
        let slot = self.engine.flows().find(&flow_key(remote, local));
        match slot.filter(|s| self.io.children.contains_key(s)) {
            Some(slot) => self.engine.handle_child(self.now, slot, data, &mut self.io),
            None => self
                .engine
                .handle_wildcard(self.now, remote, local, data, &mut self.io),
        }
        self.collect();
    }

    /// A datagram read on upstream socket `socket`.
    fn upstream_sends(&mut self, socket: usize, data: &[u8]) {
        self.engine.handle_upstream(self.now, socket, data);
        self.collect();
    }

    /// Moves the clock by `d`, waking the engine whenever it asked to be.
    fn advance(&mut self, d: Duration) {
        let until = self.now + d;
        loop {
            let next = self.engine.poll_timeout();
            if next > until {
                break;
            }
            self.now = next.max(self.now);
            self.engine.handle_timeout(self.now, &mut self.io);
            self.collect();
        }
        self.now = until;
    }

    /// Takes what reached upstream `link` since the last call.
    fn take_upstream(&mut self, link: usize) -> Vec<(At, Vec<u8>)> {
        let (mine, rest) = std::mem::take(&mut self.to_upstream)
            .into_iter()
            .partition(|(at, _)| engine::link_of(at.socket) == link);
        self.to_upstream = rest;
        mine
    }

    fn take_nas(&mut self) -> Vec<(SocketAddr, SocketAddr, Vec<u8>)> {
        std::mem::take(&mut self.to_nas)
    }

    /// The server of `link` answers every request that reached it.
    fn answer_all(&mut self, link: usize, code: Code) {
        for (at, wire) in self.take_upstream(link) {
            let reply = self.servers[link].answer(&wire, code, None);
            self.upstream_sends(at.socket, &reply);
        }
    }

    /// The directory's answer about `ip`, recorded in the shared cache and told to the
    /// engine, as the daemon does.
    fn directory_answers(&mut self, ip: IpAddr, outcome: Result<Arc<Client>, String>) {
        let dynamic = self
            .common
            .dynamic
            .as_ref()
            .expect("dynamic clients configured");
        dynamic.record(
            ip,
            outcome.as_ref().map_err(|_| NotDefined::Refused),
            self.now,
        );
        self.engine
            .handle_defined(self.now, ip, &outcome, &mut self.io);
        self.collect();
    }

    fn count(&self, c: Count) -> u64 {
        self.tally.get(c)
    }
}

// ---------------------------------------------------------------- the tests

#[test]
fn a_request_is_forwarded_with_the_upstreams_secret_and_the_reply_reaches_the_nas() {
    let mut w = World::new(Setup::default());
    let req = access_request(7, "alice", None);
    w.nas_sends(nas(40000), &req);
    let sent = w.take_upstream(0);
    assert_eq!(sent.len(), 1);
    let (p, pw) = w.servers[0].read(&sent[0].1);
    assert_eq!(pw, b"secret-pw", "the password re-hidden for the upstream");
    assert!(
        p.get_all(attr::PROXY_STATE).any(|a| a.value == b"sidecar!"),
        "our Proxy-State"
    );
    assert!(
        w.io.children.len() == 1,
        "a signed request proves its flow: a child socket"
    );
    let reply = w.servers[0].answer(&sent[0].1, Code::AccessAccept, None);
    w.upstream_sends(sent[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1), (nas(40000), LISTEN.parse().unwrap()));
    let r = nas_reads(&out[0].2, &req);
    assert_eq!(r.code(), Code::AccessAccept);
    assert!(
        r.get(attr::PROXY_STATE).is_none(),
        "our Proxy-State stripped"
    );
    assert_eq!(w.engine.in_flight(), 0);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

#[test]
fn a_retransmission_after_the_answer_is_answered_from_the_dedup_cache() {
    let mut w = World::new(Setup::default());
    let req = access_request(1, "alice", None);
    w.nas_sends(nas(40000), &req);
    w.answer_all(0, Code::AccessAccept);
    let first = w.take_nas();
    w.advance(Duration::from_secs(2));
    w.nas_sends(nas(40000), &req);
    assert!(w.take_upstream(0).is_empty(), "not forwarded again");
    let again = w.take_nas();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].2, first[0].2, "the very same reply");
    assert_eq!(w.count(Count::LocalAnswer("duplicate_cached")), 1);
    // Past cleanup_delay (5 s) the cache has forgotten it: a late copy goes upstream anew.
    w.advance(Duration::from_secs(4));
    w.nas_sends(nas(40000), &req);
    assert_eq!(w.take_upstream(0).len(), 1);
}

#[test]
fn a_retransmission_in_flight_is_not_forwarded_twice_but_followed_once_a_second() {
    let mut w = World::new(Setup::default());
    let req = access_request(3, "bob", None);
    w.nas_sends(nas(40000), &req);
    let first = w.take_upstream(0);
    assert_eq!(first.len(), 1);
    // The NAS retransmits at once: nothing new upstream.
    w.advance(Duration::from_millis(300));
    w.nas_sends(nas(40000), &req);
    assert!(w.take_upstream(0).is_empty());
    assert_eq!(w.count(Count::Dropped("duplicate_in_flight")), 1);
    // A second later it is followed upstream: the same copy, same Identifier.
    w.advance(Duration::from_millis(800));
    w.nas_sends(nas(40000), &req);
    let resent = w.take_upstream(0);
    assert_eq!(resent.len(), 1);
    assert_eq!(
        resent[0], first[0],
        "the same upstream copy, not a second request"
    );
    assert_eq!(w.count(Count::UpstreamRetransmit("nas_retransmission")), 1);
    assert_eq!(w.engine.in_flight(), 1);
    // The server answers both copies: one reply reaches the NAS, the other is unknown.
    for (at, wire) in [&first[0], &resent[0]] {
        let reply = w.servers[0].answer(wire, Code::AccessAccept, None);
        w.upstream_sends(at.socket, &reply);
    }
    assert_eq!(w.take_nas().len(), 1);
    assert_eq!(w.count(Count::Dropped("reply_unknown_id")), 1);
    assert_eq!(w.engine.in_flight(), 0);
}

#[test]
fn our_own_retry_recovers_a_request_the_upstream_lost() {
    let mut w = World::new(Setup::default());
    let req = access_request(9, "carol", None);
    w.nas_sends(nas(40000), &req);
    let lost = w.take_upstream(0);
    assert_eq!(lost.len(), 1);
    // The server keeps answering other things, so it stays alive.
    w.servers[0].upstream.health.on_answer(w.now);
    w.advance(Duration::from_millis(1900));
    assert!(w.take_upstream(0).is_empty(), "not before retry (2 s)");
    w.servers[0].upstream.health.on_answer(w.now);
    w.advance(Duration::from_millis(200));
    let retried = w.take_upstream(0);
    assert_eq!(retried.len(), 1, "sent again on our own timer");
    assert_eq!(retried[0], lost[0]);
    assert_eq!(w.count(Count::UpstreamRetransmit("timer")), 1);
    let reply = w.servers[0].answer(&retried[0].1, Code::AccessAccept, None);
    w.upstream_sends(retried[0].0.socket, &reply);
    assert_eq!(
        nas_reads(&w.take_nas()[0].2, &req).code(),
        Code::AccessAccept
    );
}

#[test]
fn a_request_nobody_answers_is_given_up_after_the_timeout_and_counted() {
    let mut w = World::new(Setup::default());
    let req = access_request(9, "carol", None);
    w.nas_sends(nas(40000), &req);
    w.advance(Duration::from_secs(21));
    assert_eq!(w.engine.in_flight(), 0);
    assert_eq!(w.count(Count::Dropped("upstream_timeout")), 1);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
    // Two retries (max_retries), then silence.
    assert_eq!(w.take_upstream(0).len(), 3);
    // The NAS tries again later: forwarded anew.
    w.nas_sends(nas(40000), &req);
    assert_eq!(w.take_upstream(0).len(), 1);
}

#[test]
fn a_quiet_server_fails_over_and_comes_back_through_status_server() {
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), upstream("aaa-2", 1912)],
        ..Setup::default()
    });
    let req = access_request(4, "dave", None);
    w.nas_sends(nas(40000), &req);
    assert_eq!(
        w.take_upstream(0).len(),
        1,
        "fail-over: the first server first"
    );
    // aaa-1 is silent: past its response window (1 s, before our first retry at 2 s) it
    // turns zombie and the request moves to aaa-2 at once.
    w.advance(Duration::from_millis(900));
    assert!(
        w.take_upstream(1).is_empty(),
        "not before its response window"
    );
    w.advance(Duration::from_millis(200));
    assert!(w.take_upstream(0).is_empty(), "not sent again to aaa-1");
    let moved = w.take_upstream(1);
    assert_eq!(moved.len(), 1, "failed over to the second server");
    assert_eq!(w.servers[0].upstream.health.state(), State::Zombie);
    assert_eq!(w.count(Count::UpstreamRetransmit("failover")), 1);
    let (_, pw) = w.servers[1].read(&moved[0].1);
    assert_eq!(
        pw, b"secret-pw",
        "re-prepared with the second server's secret"
    );
    let reply = w.servers[1].answer(&moved[0].1, Code::AccessAccept, None);
    w.upstream_sends(moved[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(reply_message(&nas_reads(&out[0].2, &req)), "aaa-2");
    assert_eq!(w.engine.in_flight(), 0);

    // New requests go to aaa-2 while aaa-1 is a zombie...
    w.nas_sends(nas(40000), &access_request(5, "dave", None));
    assert_eq!(w.take_upstream(1).len(), 1);
    w.answer_all(1, Code::AccessAccept);
    // ...until it answers a Status-Server probe (the daemon's prober reports it).
    let policy = w.servers[0].upstream.options.health;
    w.servers[0].upstream.health.on_probe(true, w.now, &policy);
    assert_eq!(w.servers[0].upstream.health.state(), State::Alive);
    w.nas_sends(nas(40000), &access_request(6, "dave", None));
    assert_eq!(w.take_upstream(0).len(), 1, "back on the first server");
}

#[test]
fn a_slow_server_that_keeps_answering_keeps_its_requests() {
    // Each answer takes 300 ms, one request is never answered: the server is slow, not
    // quiet, so nothing moves before that request's own retry.
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), upstream("aaa-2", 1912)],
        ..Setup::default()
    });
    let mut waiting: Vec<(Instant, At, Vec<u8>)> = Vec::new();
    for i in 0..18u8 {
        w.nas_sends(nas(40000 + u16::from(i)), &access_request(i, "fay", None));
        for (at, wire) in w.take_upstream(0) {
            waiting.push((w.now, at, wire));
        }
        let now = w.now;
        let (due, rest): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(t, _, wire)| {
            now.duration_since(*t) >= Duration::from_millis(300) && wire[1] != 0
        });
        waiting = rest;
        for (_, at, wire) in due {
            let reply = w.servers[0].answer(&wire, Code::AccessAccept, None);
            w.upstream_sends(at.socket, &reply);
        }
        w.advance(Duration::from_millis(100));
    }
    // 1.8 s: the first request has been out past the response window all along.
    assert_eq!(w.servers[0].upstream.health.state(), State::Alive);
    assert!(w.take_upstream(1).is_empty(), "nothing moved to aaa-2");
    assert_eq!(w.count(Count::UpstreamRetransmit("failover")), 0);
    assert_eq!(w.take_nas().len(), 14, "those 300 ms old answered");
}

#[test]
fn a_request_moved_between_silent_servers_still_times_out_from_its_first_sending() {
    // Found by the engine fuzz target: each move gave the request a fresh timeout, so with
    // both servers silent it went back and forth and stayed in flight for ever.
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), upstream("aaa-2", 1912)],
        ..Setup::default()
    });
    w.nas_sends(nas(40000), &access_request(4, "erin", None));
    let mut moves = 0;
    for _ in 0..19 {
        w.advance(Duration::from_secs(1));
        moves += w.take_upstream(1).len();
    }
    assert!(moves >= 1, "it failed over at least once");
    assert_eq!(
        w.engine.in_flight(),
        1,
        "19 s after it first went: still out"
    );
    w.advance(Duration::from_secs(2));
    assert_eq!(w.engine.in_flight(), 0, "given up 20 s after it first went");
    assert_eq!(w.count(Count::Dropped("upstream_timeout")), 1);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

#[test]
fn a_superseded_requests_late_reply_is_dropped() {
    let mut w = World::new(Setup::default());
    let old = access_request(5, "erin", None);
    w.nas_sends(nas(40000), &old);
    let old_up = w.take_upstream(0);
    // The NAS gives up on it and reuses the Identifier for a new request.
    w.advance(Duration::from_millis(500));
    let new = access_request(5, "erin", None);
    w.nas_sends(nas(40000), &new);
    let new_up = w.take_upstream(0);
    assert_eq!(new_up.len(), 1, "a new request, forwarded");
    // The old request's answer arrives late: dropped, not sent as the new one's.
    let late = w.servers[0].answer(&old_up[0].1, Code::AccessReject, None);
    w.upstream_sends(old_up[0].0.socket, &late);
    assert!(w.take_nas().is_empty());
    assert_eq!(w.count(Count::Dropped("reply_superseded")), 1);
    let reply = w.servers[0].answer(&new_up[0].1, Code::AccessAccept, None);
    w.upstream_sends(new_up[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(nas_reads(&out[0].2, &new).code(), Code::AccessAccept);
    assert_eq!(w.engine.in_flight(), 0);
}

#[test]
fn shutdown_drains_requests_in_flight_within_its_bound() {
    let mut w = World::new(Setup::default());
    w.nas_sends(nas(40000), &access_request(1, "f", None));
    assert!(
        !w.engine.drain(w.now),
        "one request in flight: keep serving"
    );
    w.advance(Duration::from_millis(500));
    w.answer_all(0, Code::AccessAccept);
    assert_eq!(w.take_nas().len(), 1, "answered during the drain");
    assert!(w.engine.drain(w.now), "nothing in flight: may stop");

    // A server that never answers holds the drain for at most DRAIN.
    let mut w = World::new(Setup::default());
    w.nas_sends(nas(40000), &access_request(1, "f", None));
    assert!(!w.engine.drain(w.now));
    w.advance(engine::DRAIN - Duration::from_millis(100));
    assert!(!w.engine.drain(w.now));
    w.advance(Duration::from_millis(100));
    assert!(w.engine.drain(w.now));
    w.engine.shutdown(&mut w.io);
    assert!(w.io.children.is_empty(), "every child closed at shutdown");
}

#[test]
fn a_send_the_kernel_refuses_ends_the_request_and_a_retransmission_goes_anew() {
    let mut w = World::new(Setup::default());
    let req = access_request(2, "g", None);
    w.nas_sends(nas(40000), &req);
    let sent = w.take_upstream(0);
    w.engine.send_failed(w.now, sent[0].0, &mut w.io);
    assert_eq!(w.engine.in_flight(), 0);
    assert_eq!(w.count(Count::Dropped("send_to_upstream")), 1);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
    // Not a retransmission in flight any more: forwarded again at once.
    w.nas_sends(nas(40000), &req);
    assert_eq!(w.take_upstream(0).len(), 1);
    assert_eq!(w.count(Count::Dropped("duplicate_in_flight")), 0);
}

#[test]
fn past_256_in_flight_a_second_socket_opens_and_past_the_last_the_nas_is_told() {
    let mut w = World::new(Setup::default());
    w.io.extra_sockets_allowed = 1;
    // 256 NASes' flows, one request each; then one more.
    for i in 0..257u16 {
        w.nas_sends(nas(20000 + i), &access_request(1, "h", None));
    }
    let sent = w.take_upstream(0);
    assert_eq!(sent.len(), 257);
    let second = requests::MAX_SOCKETS * engine::port(0, false) + 1;
    assert!(w.io.upstream_sockets.contains_key(&second));
    assert_eq!(
        sent[256].0.socket, second,
        "the 257th went on the new socket"
    );
    let mut ids: Vec<_> = sent[..256]
        .iter()
        .map(|(at, _)| (at.socket, at.id))
        .collect();
    ids.dedup();
    assert_eq!(ids.len(), 256, "every Identifier of the first socket, once");
    // Fill the second socket; the next request finds no Identifier and no socket.
    for i in 257..512u16 {
        w.nas_sends(nas(20000 + i), &access_request(1, "h", None));
    }
    assert_eq!(w.take_upstream(0).len(), 255);
    w.take_nas();
    let req = access_request(1, "h", None);
    w.nas_sends(nas(30000), &req);
    assert!(w.take_upstream(0).is_empty());
    assert_eq!(w.count(Count::Dropped("upstream_ids_exhausted")), 1);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    let pe = nas_reads(&out[0].2, &req);
    assert_eq!(pe.code(), Code::ProtocolError, "the NAS is told (RFC 7930)");
    assert_eq!(
        pe.get(attr::ERROR_CAUSE).map(|a| a.value.to_vec()),
        Some(506u32.to_be_bytes().to_vec()),
        "Resources Unavailable"
    );
    assert_eq!(w.engine.in_flight(), 512);
}

fn dynamic_setup() -> Setup {
    Setup {
        dynamic: Some(Dynamic::new(
            vec!["203.0.113.0/24".parse().unwrap()],
            Lifetimes {
                defined: Duration::from_secs(3600),
                refused: Duration::from_secs(30),
                unanswered: Duration::from_secs(5),
            },
            100,
            Duration::from_secs(2),
            (8, 100),
        )),
        ..Setup::default()
    }
}

fn dynamic_nas(port: u16) -> SocketAddr {
    SocketAddr::from(([203, 0, 113, 9], port))
}

#[test]
fn packets_of_a_slow_definition_wait_and_go_in_arrival_order() {
    let mut w = World::new(dynamic_setup());
    let from = dynamic_nas(41000);
    let reqs: Vec<Vec<u8>> = (1..=3)
        .map(|i| access_request(i, &format!("user{i}"), None))
        .collect();
    for (i, r) in reqs.iter().enumerate() {
        w.nas_sends(from, r);
        w.advance(Duration::from_millis(700 * (i as u64 + 1)));
    }
    assert_eq!(
        w.io.defines,
        vec![from.ip()],
        "one definition for the source"
    );
    assert!(
        w.take_upstream(0).is_empty(),
        "nothing goes before the definition"
    );
    assert!(w.take_nas().is_empty());
    // The directory answers 4 s after the first packet.
    let defined = Arc::new(client(
        "dyn-9",
        "203.0.113.9/32",
        w.common.clients.lookup(nas(1).ip()).unwrap().pool.clone(),
    ));
    w.directory_answers(from.ip(), Ok(defined));
    let sent = w.take_upstream(0);
    let users: Vec<String> = sent
        .iter()
        .map(|(_, wire)| {
            let (p, _) = w.servers[0].read(wire);
            String::from_utf8_lossy(p.get(attr::USER_NAME).unwrap().value).into_owned()
        })
        .collect();
    assert_eq!(users, ["user1", "user2", "user3"], "in arrival order");
    assert_eq!(w.io.children.len(), 1, "the flow got its child");
    assert_eq!(w.count(Count::Packet(Via::Wildcard)), 3);
    // Its next packet comes through the child and is not kept.
    w.nas_sends(from, &access_request(4, "user4", None));
    assert_eq!(w.take_upstream(0).len(), 1);
    assert_eq!(w.count(Count::Packet(Via::Child)), 1);
}

#[test]
fn a_refused_definition_drops_what_waited_and_is_remembered() {
    let mut w = World::new(dynamic_setup());
    let from = dynamic_nas(41000);
    w.nas_sends(from, &access_request(1, "x", None));
    w.nas_sends(from, &access_request(2, "x", None));
    w.directory_answers(from.ip(), Err("refused by the directory".into()));
    assert!(w.take_upstream(0).is_empty());
    assert_eq!(w.count(Count::Refused(Refusal::DirectoryRefused)), 2);
    // Refused for nak_lifetime: no new definition, the packet refused at once.
    w.nas_sends(from, &access_request(3, "x", None));
    assert_eq!(w.io.defines.len(), 1);
    assert_eq!(w.count(Count::Refused(Refusal::DirectoryRefused)), 3);
    assert!(w.engine.flows().is_empty());
}

#[test]
fn packets_of_a_definition_that_never_ends_expire_and_are_counted() {
    let mut w = World::new(dynamic_setup());
    w.nas_sends(dynamic_nas(41000), &access_request(1, "x", None));
    let max_wait = w.common.dynamic.as_ref().unwrap().max_wait;
    w.advance(max_wait + Duration::from_secs(2));
    assert_eq!(w.count(Count::Refused(Refusal::PendingExpired)), 1);
    assert_eq!(
        w.common
            .pending_packets
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn a_coa_reaches_the_nas_through_its_flow_and_its_ack_returns_signed_for_the_origin() {
    let mut w = World::new(Setup::default());
    let from = nas(40000);
    w.nas_sends(from, &access_request(1, "i", None));
    w.answer_all(0, Code::AccessAccept);
    w.take_nas();
    // The upstream asks for a Disconnect of the NAS's session.
    let origin = w.servers[0].upstream.clone();
    let mut buf = [0u8; 4096];
    let mut d = PacketMut::new(&mut buf, Code::DisconnectRequest, 77).unwrap();
    d.push(attr::NAS_IDENTIFIER, b"switch-1").unwrap();
    d.push(attr::USER_NAME, b"i").unwrap();
    d.sign(&origin.secret, None).unwrap();
    let origin_auth = d.authenticator();
    let local: SocketAddr = LISTEN.parse().unwrap();
    let handle = w
        .common
        .nas_directory
        .find(&[radius_core::coa::NasName::Identifier(b"switch-1".to_vec())])
        .expect("the flow is registered under its NAS-Identifier");
    assert_eq!(handle.key, flow_key(from, local));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let a = answers.clone();
    let job = CoaJob {
        key: handle.key,
        origin_id: 77,
        origin_auth,
        upstream: origin.clone(),
        packet: d.as_bytes().to_vec(),
        answer: Box::new(move |bytes| {
            a.lock().unwrap().push(bytes);
            true
        }),
    };
    w.engine.handle_coa(w.now, job);
    w.collect();
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(
        (out[0].0, out[0].1),
        (from, local),
        "from the flow's own address and port"
    );
    let to_nas = Packet::parse(&out[0].2).unwrap();
    assert_eq!(to_nas.code(), Code::DisconnectRequest);
    auth::verify(&to_nas, &Secret::new(NAS_SECRET), None).expect("signed with the NAS's secret");
    // The NAS acknowledges, through its flow.
    let mut abuf = [0u8; 4096];
    let mut ack = PacketMut::new(&mut abuf, Code::DisconnectAck, to_nas.identifier()).unwrap();
    ack.sign(&Secret::new(NAS_SECRET), Some(to_nas.authenticator()))
        .unwrap();
    let ack = ack.as_bytes().to_vec();
    w.nas_sends(from, &ack);
    let got = answers.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "the ACK handed back to the CoA listener");
    let back = Packet::parse(&got[0]).unwrap();
    assert_eq!((back.code(), back.identifier()), (Code::DisconnectAck, 77));
    auth::verify(&back, &origin.secret, Some(&origin_auth)).expect("signed for the origin");
    assert!(
        w.take_upstream(0).is_empty(),
        "an ACK is not a request to forward"
    );
}

#[test]
fn a_coa_for_a_flow_that_ended_is_naked_by_the_sidecar() {
    let mut w = World::new(Setup::default());
    let origin = w.servers[0].upstream.clone();
    let mut buf = [0u8; 4096];
    let mut d = PacketMut::new(&mut buf, Code::CoaRequest, 5).unwrap();
    d.push(attr::NAS_IDENTIFIER, b"gone").unwrap();
    d.sign(&origin.secret, None).unwrap();
    let origin_auth = d.authenticator();
    let answers = Arc::new(Mutex::new(Vec::new()));
    let a = answers.clone();
    w.engine.handle_coa(
        w.now,
        CoaJob {
            key: flow_key(nas(1), LISTEN.parse().unwrap()),
            origin_id: 5,
            origin_auth,
            upstream: origin.clone(),
            packet: d.as_bytes().to_vec(),
            answer: Box::new(move |b| {
                a.lock().unwrap().push(b);
                true
            }),
        },
    );
    let got = answers.lock().unwrap().clone();
    let nak = Packet::parse(&got[0]).unwrap();
    assert_eq!(nak.code(), Code::CoaNak);
    auth::verify(&nak, &origin.secret, Some(&origin_auth)).unwrap();
    assert_eq!(w.count(Count::Coa("nas_not_found")), 1);
}

#[test]
fn an_eap_conversation_stays_on_the_server_that_challenged_it_across_flows() {
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), upstream("aaa-2", 1912)],
        policy: Policy::LoadBalance,
        ..Setup::default()
    });
    // Two flows that load-balancing puts on different servers.
    let local: SocketAddr = LISTEN.parse().unwrap();
    let pool = w.common.clients.lookup(nas(1).ip()).unwrap().pool.clone();
    let server_of = |port: u16| {
        let c = w.common.clients.lookup(nas(port).ip()).unwrap();
        let f = Flow::new(nas(port), local, c, true, w.now);
        pool.pick(f.hash, None).unwrap().name.clone()
    };
    let a = 40000;
    let b = (40001..41000)
        .find(|&p| server_of(p) != server_of(a))
        .unwrap();
    let link_a = w.common.upstream_index[&server_of(a)];
    let link_b = 1 - link_a;
    // Flow a's first EAP round is challenged by its server, with a State.
    w.nas_sends(nas(a), &access_request(1, "eap", None));
    let sent = w.take_upstream(link_a);
    assert_eq!(sent.len(), 1);
    let challenge = w.servers[link_a].answer(&sent[0].1, Code::AccessChallenge, Some(b"round-2"));
    w.upstream_sends(sent[0].0.socket, &challenge);
    assert_eq!(w.take_nas().len(), 1);
    // The conversation's next round comes on flow b (the NAS moved its source port):
    // it goes to the server that holds the conversation, not to flow b's own.
    w.nas_sends(nas(b), &access_request(1, "eap", Some(b"round-2")));
    assert!(w.take_upstream(link_b).is_empty());
    assert_eq!(
        w.take_upstream(link_a).len(),
        1,
        "sticky to its State's server"
    );
    // Without a State, flow b's requests go to its own server.
    w.nas_sends(nas(b), &access_request(2, "other", None));
    assert_eq!(w.take_upstream(link_b).len(), 1);
}

#[test]
fn a_status_server_from_a_nas_is_answered_by_the_sidecar_itself() {
    let mut w = World::new(Setup::default());
    let mut buf = [0u8; 4096];
    let ss = radius_core::codec::edit::status_server(&mut buf, 12, &Secret::new(NAS_SECRET))
        .unwrap()
        .as_bytes()
        .to_vec();
    w.nas_sends(nas(40000), &ss);
    assert!(w.take_upstream(0).is_empty(), "never forwarded");
    let out = w.take_nas();
    assert_eq!(nas_reads(&out[0].2, &ss).code(), Code::AccessAccept);
}

#[test]
fn a_request_with_a_bad_signature_makes_no_flow() {
    let mut w = World::new(Setup::default());
    let mut req = access_request(1, "mallory", None);
    let last = req.len() - 1;
    req[last] ^= 0xff;
    w.nas_sends(nas(40000), &req);
    assert!(w.engine.flows().is_empty());
    assert!(w.io.children.is_empty());
    assert!(w.take_upstream(0).is_empty());
}

#[test]
fn idle_flows_end_and_their_children_close() {
    let mut w = World::new(Setup::default());
    w.nas_sends(nas(40000), &access_request(1, "j", None));
    w.answer_all(0, Code::AccessAccept);
    assert_eq!(w.engine.flows().len(), 1);
    w.advance(Duration::from_secs(59));
    assert_eq!(w.engine.flows().len(), 1);
    w.advance(Duration::from_secs(2));
    assert!(w.engine.flows().is_empty());
    assert_eq!(w.io.closed_children, 1);
    assert_eq!(w.count(Count::FlowEnded { proved: true }), 1);
    assert_eq!(
        w.common.active.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let _ = w.start;
}

#[test]
fn the_engine_asks_to_be_woken_no_later_than_its_next_timer() {
    let w = World::new(Setup::default());
    assert!(w.engine.poll_timeout() <= w.now + engine::TICK);
}

#[test]
fn upstream_socket_indexes_round_trip() {
    for link in 0..5 {
        for acct in [false, true] {
            for s in 0..requests::MAX_SOCKETS {
                let socket = engine::port(link, acct) * requests::MAX_SOCKETS + s;
                assert_eq!(engine::link_of(socket), link);
                assert_eq!(requests::port_of(socket), engine::port(link, acct));
            }
        }
    }
}

#[test]
fn a_request_to_a_stream_upstream_is_never_sent_twice_on_its_connection() {
    let mut w = World::new(Setup {
        upstreams: vec![stream_upstream("radsec-1", 2083)],
        ..Setup::default()
    });
    let req = access_request(8, "kim", None);
    w.nas_sends(nas(40000), &req);
    assert_eq!(w.take_upstream(0).len(), 1);
    // Past our retry, and a NAS retransmission a second later: nothing more on the stream.
    w.advance(Duration::from_millis(2100));
    w.nas_sends(nas(40000), &req);
    w.advance(Duration::from_millis(1100));
    w.nas_sends(nas(40000), &req);
    assert!(
        w.take_upstream(0).is_empty(),
        "a stream delivers: no retransmission"
    );
    assert_eq!(w.count(Count::UpstreamRetransmit("timer")), 0);
    assert_eq!(w.count(Count::UpstreamRetransmit("nas_retransmission")), 0);
    assert_eq!(w.engine.in_flight(), 1);
}

#[test]
fn the_requests_of_a_closed_stream_go_anew_with_a_new_signature() {
    let mut w = World::new(Setup {
        upstreams: vec![stream_upstream("radsec-1", 2083)],
        ..Setup::default()
    });
    let req = access_request(8, "lee", None);
    w.nas_sends(nas(40000), &req);
    let first = w.take_upstream(0);
    assert_eq!(first.len(), 1);
    // The connection closes before the answer: the request is prepared again.
    let socket = first[0].0.socket;
    w.engine.handle_upstream_closed(w.now, socket, &mut w.io);
    w.collect();
    let again = w.take_upstream(0);
    assert_eq!(again.len(), 1, "sent anew");
    let (old, _) = w.servers[0].read(&first[0].1);
    let (new, pw) = w.servers[0].read(&again[0].1);
    assert_ne!(
        old.authenticator(),
        new.authenticator(),
        "a fresh authenticator"
    );
    assert_eq!(pw, b"secret-pw", "the password hidden anew for it");
    assert_eq!(w.count(Count::UpstreamRetransmit("connection_lost")), 1);
    assert_eq!(w.engine.in_flight(), 1);
    let reply = w.servers[0].answer(&again[0].1, Code::AccessAccept, None);
    w.upstream_sends(again[0].0.socket, &reply);
    assert_eq!(
        nas_reads(&w.take_nas()[0].2, &req).code(),
        Code::AccessAccept
    );
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

#[test]
fn a_request_sent_anew_on_each_new_connection_still_times_out_from_its_first_sending() {
    let mut w = World::new(Setup {
        upstreams: vec![stream_upstream("radsec-1", 2083)],
        ..Setup::default()
    });
    let req = access_request(8, "max", None);
    w.nas_sends(nas(40000), &req);
    let mut socket = w.take_upstream(0)[0].0.socket;
    // The server's connections keep closing before it answers.
    for _ in 0..3 {
        w.advance(Duration::from_secs(6));
        w.engine.handle_upstream_closed(w.now, socket, &mut w.io);
        w.collect();
        if let Some(sent) = w.take_upstream(0).first() {
            socket = sent.0.socket;
        }
    }
    // 18 s after its first sending, 2 s before its 20 s timeout: still out.
    assert_eq!(w.engine.in_flight(), 1);
    w.advance(Duration::from_secs(3));
    assert_eq!(w.engine.in_flight(), 0, "given up 20 s after it first went");
    assert_eq!(w.count(Count::Dropped("upstream_timeout")), 1);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

// ---------------------------------------------------------------- RADIUS/1.1 (RFC 9765)

/// A RADIUS/1.1 packet: Reserved-1 zero, `token`, Reserved-2 zero, plain attributes.
fn v11_packet(code: Code, token: u32, attrs: &[(u8, &[u8])], mppe: Option<&[u8]>) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut m = PacketMut::new(&mut buf, code, 0).unwrap();
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&token.to_be_bytes());
    m.set_authenticator(&header);
    for (ty, v) in attrs {
        m.push(*ty, v).unwrap();
    }
    if let Some(k) = mppe {
        m.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_RECV_KEY, k)
            .unwrap();
    }
    m.as_bytes().to_vec()
}

fn mppe_key<'a>(p: &Packet<'a>) -> &'a [u8] {
    let vsa = p.get(attr::VENDOR_SPECIFIC).expect("an MPPE key").value;
    &vsa[6..]
}

#[test]
fn a_udp_nas_reaches_a_radius_1_1_upstream_and_back() {
    let mut w = World::new(Setup {
        upstreams: vec![stream_upstream("radsec-1", 2083)],
        ..Setup::default()
    });
    // The connection negotiated radius/1.1 before any request: nothing to send anew.
    assert!(w.engine.handle_upstream_version(w.now, 0, true, &mut w.io));
    w.collect();
    assert!(w.take_upstream(0).is_empty());
    let req = access_request(8, "ann", None);
    w.nas_sends(nas(40000), &req);
    let sent = w.take_upstream(0);
    assert_eq!(sent.len(), 1);
    let (at, wire) = &sent[0];
    let p = Packet::parse(wire).unwrap();
    assert_eq!(p.identifier(), 0, "Reserved-1");
    assert_eq!(
        p.authenticator()[3],
        at.id,
        "the Token ends in our Identifier"
    );
    assert_eq!(&p.authenticator()[4..], &[0u8; 12], "Reserved-2");
    assert!(p.message_authenticator_offset().is_none(), "no MD5 on 1.1");
    assert_eq!(
        p.get(attr::USER_PASSWORD).unwrap().value,
        b"secret-pw",
        "the password travels plain inside TLS"
    );
    let token = u32::from_be_bytes(p.authenticator()[..4].try_into().unwrap());
    let key = [5u8; 32];
    let ps = p.get(attr::PROXY_STATE).unwrap().value.to_vec();
    let reply = v11_packet(
        Code::AccessAccept,
        token,
        &[(attr::PROXY_STATE, ps.as_slice())],
        Some(&key),
    );
    // A reply with another Token is not its answer.
    let forged = v11_packet(
        Code::AccessAccept,
        token ^ 0x100,
        &[(attr::PROXY_STATE, ps.as_slice())],
        None,
    );
    w.upstream_sends(at.socket, &forged);
    assert!(w.take_nas().is_empty());
    assert_eq!(w.count(Count::Dropped("token_mismatch")), 1);
    w.upstream_sends(at.socket, &reply);
    let got = w.take_nas();
    let answer = nas_reads(&got[0].2, &req);
    assert_eq!(answer.code(), Code::AccessAccept);
    assert!(answer.message_authenticator_offset().is_some());
    let request = Packet::parse(&req).unwrap();
    let mut out = [0u8; 64];
    let n = hide::reveal_salted(
        mppe_key(&answer),
        NAS_SECRET,
        request.authenticator(),
        &mut out,
    )
    .unwrap();
    assert_eq!(&out[..n], &key, "the MPPE key hidden for the NAS");
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

#[test]
fn a_radius_1_1_nas_reaches_a_udp_upstream_and_gets_its_token_back() {
    let mut w = World::new(Setup::default());
    w.io.v11_nases.push(nas(40001));
    let token = 0x0102_0304;
    let req = v11_packet(
        Code::AccessRequest,
        token,
        &[
            (attr::USER_NAME, b"ann".as_slice()),
            (attr::USER_PASSWORD, b"plain-pw".as_slice()),
        ],
        None,
    );
    w.nas_sends(nas(40001), &req);
    let sent = w.take_upstream(0);
    assert_eq!(sent.len(), 1, "a 1.1 flow needs no signature to be served");
    let (p, pw) = w.servers[0].read(&sent[0].1);
    assert_eq!(pw, b"plain-pw", "hidden with the upstream's secret");
    assert!(p.message_authenticator_offset().is_some());
    // The server answers with a hidden MPPE key.
    let mut buf = [0u8; 4096];
    let mut r = PacketMut::new(&mut buf, Code::AccessAccept, p.identifier()).unwrap();
    r.message_authenticator_first().unwrap();
    let mut hidden = [0u8; 64];
    let key = [6u8; 32];
    let n = hide::hide_salted(
        &key,
        [0x81, 2],
        &w.servers[0].secret,
        p.authenticator(),
        &mut hidden,
    )
    .unwrap();
    r.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_RECV_KEY, &hidden[..n])
        .unwrap();
    for ps in p.get_all(attr::PROXY_STATE) {
        r.add_proxy_state(ps.value).unwrap();
    }
    r.sign(&w.servers[0].upstream.secret, Some(p.authenticator()))
        .unwrap();
    let reply = r.as_bytes().to_vec();
    w.upstream_sends(sent[0].0.socket, &reply);
    let got = w.take_nas();
    let answer = Packet::parse(&got[0].2).unwrap();
    assert_eq!(answer.code(), Code::AccessAccept);
    assert_eq!(answer.identifier(), 0);
    assert_eq!(
        &answer.authenticator()[..4],
        &token.to_be_bytes(),
        "its Token"
    );
    assert_eq!(&answer.authenticator()[4..], &[0u8; 12]);
    assert!(answer.message_authenticator_offset().is_none());
    assert!(
        answer.get(attr::PROXY_STATE).is_none(),
        "our Proxy-State removed"
    );
    assert_eq!(mppe_key(&answer), &key, "the MPPE key plain");
    // A Status-Server is answered by the sidecar, in 1.1 form.
    let ss = v11_packet(Code::StatusServer, 77, &[], None);
    w.nas_sends(nas(40001), &ss);
    let got = w.take_nas();
    let a = Packet::parse(&got[0].2).unwrap();
    assert_eq!(a.code(), Code::AccessAccept);
    assert_eq!(&a.authenticator()[..4], &77u32.to_be_bytes());
}

#[test]
fn requests_prepared_before_the_handshake_said_1_1_are_prepared_again() {
    let mut w = World::new(Setup {
        upstreams: vec![stream_upstream("radsec-1", 2083)],
        ..Setup::default()
    });
    let req = access_request(9, "bo", None);
    w.nas_sends(nas(40000), &req);
    let first = w.take_upstream(0);
    assert!(
        w.servers[0]
            .read(&first[0].1)
            .0
            .message_authenticator_offset()
            .is_some()
    );
    // The handshake ends: radius/1.1. What was prepared for RADIUS/TLS goes anew, in 1.1.
    assert!(
        w.engine
            .handle_upstream_version(w.now, first[0].0.socket, true, &mut w.io)
    );
    w.collect();
    let again = w.take_upstream(0);
    assert_eq!(again.len(), 1);
    let p = Packet::parse(&again[0].1).unwrap();
    assert_eq!(p.identifier(), 0);
    assert_eq!(p.get(attr::USER_PASSWORD).unwrap().value, b"secret-pw");
    assert_eq!(w.count(Count::UpstreamRetransmit("protocol_changed")), 1);
    assert_eq!(w.engine.in_flight(), 1);
}

// ---------------------------------------------------------------- reload

/// `upstream(name, port)` with another secret.
fn upstream_with_secret(name: &str, port: u16, secret: &str) -> Arc<Upstream> {
    upstream_of(name, port, secret, false)
}

impl World {
    /// A reload to `clients` and `upstreams`, handed to the engine as the daemon does;
    /// `secrets` are the servers' secrets, by name, for new links.
    fn reload(
        &mut self,
        clients: ClientTable,
        upstreams: Vec<Arc<Upstream>>,
        secrets: &[(&str, &str)],
    ) {
        let common = Arc::new(self.common.reloaded(Settings {
            clients,
            dynamic: self.common.dynamic.clone(),
            upstreams,
            idle_timeout: self.common.idle_timeout,
            provisional_idle: self.common.provisional_idle,
            dedup: DedupTimers::default(),
            dictionary: self.common.dictionary.clone(),
            realms: self.common.realms.clone(),
        }));
        for u in &common.upstreams[self.servers.len()..] {
            let secret = secrets
                .iter()
                .find(|(n, _)| *n == u.name)
                .map_or(format!("{}-secret", u.name), |(_, s)| (*s).to_owned());
            self.servers.push(FakeUpstream {
                upstream: u.clone(),
                secret: secret.into_bytes(),
            });
        }
        self.common = common.clone();
        self.engine.handle_reload(self.now, common, &mut self.io);
        self.collect();
    }
}

fn table(clients: Vec<Client>) -> ClientTable {
    let mut t = ClientTable::default();
    for c in clients {
        assert!(t.insert(c));
    }
    t
}

#[test]
fn a_reload_moves_a_flow_to_its_clients_new_pool_and_answers_what_was_in_flight() {
    let mut w = World::new(Setup::default());
    let first = access_request(1, "alice", None);
    w.nas_sends(nas(40000), &first);
    assert_eq!(
        w.take_upstream(0).len(),
        1,
        "in flight on aaa-1 at the reload"
    );
    let aaa2 = upstream("aaa-2", 1912);
    let pool = Arc::new(Pool::single(aaa2.clone()));
    let mut ups = w.common.upstreams.clone();
    ups.push(aaa2);
    w.reload(
        table(vec![client("nases", "198.51.100.0/24", pool)]),
        ups,
        &[],
    );
    assert_eq!(
        w.common.upstreams.len(),
        2,
        "aaa-1 kept its link, aaa-2 got a new one"
    );
    assert!(w.common.is_configured(0) && w.common.is_configured(1));
    // The same flow's next request goes to the new pool.
    let second = access_request(2, "alice", None);
    w.nas_sends(nas(40000), &second);
    let to_new = w.take_upstream(1);
    assert_eq!(to_new.len(), 1, "the flow follows its client's new pool");
    assert_eq!(w.io.children.len(), 1, "the same flow, not a new one");
    let reply = w.servers[1].answer(&to_new[0].1, Code::AccessAccept, None);
    w.upstream_sends(to_new[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(reply_message(&nas_reads(&out[0].2, &second)), "aaa-2");
    assert_eq!(
        w.engine.in_flight(),
        1,
        "the first request is still in flight on aaa-1"
    );
}

#[test]
fn a_reload_that_removes_a_client_ends_its_flows_once_their_answers_are_relayed() {
    let mut w = World::new(Setup::default());
    let first = access_request(1, "alice", None);
    w.nas_sends(nas(40000), &first);
    let sent = w.take_upstream(0);
    let ups = w.common.upstreams.clone();
    let pool = Arc::new(Pool::single(ups[0].clone()));
    w.reload(
        table(vec![client("others", "203.0.113.0/24", pool)]),
        ups,
        &[],
    );
    // A new request from the removed client's flow is not taken...
    let second = access_request(2, "alice", None);
    w.nas_sends(nas(40000), &second);
    assert!(w.take_upstream(0).is_empty());
    assert_eq!(w.count(Count::Dropped("client_removed")), 1);
    // ...but what it had in flight is answered.
    let reply = w.servers[0].answer(&sent[0].1, Code::AccessAccept, None);
    w.upstream_sends(sent[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(nas_reads(&out[0].2, &first).code(), Code::AccessAccept);
    // Then the flow ends at the next tick, and the NAS is an unknown source.
    w.advance(engine::TICK * 2);
    assert!(w.io.children.is_empty());
    assert_eq!(w.io.closed_children, 1);
    w.nas_sends(nas(40000), &access_request(3, "alice", None));
    assert!(w.take_upstream(0).is_empty());
    assert_eq!(w.count(Count::Refused(Refusal::UnknownClient)), 1);
}

#[test]
fn an_upstream_whose_secret_changes_gets_a_new_link_and_old_requests_keep_the_old_one() {
    let mut w = World::new(Setup::default());
    let first = access_request(1, "alice", None);
    w.nas_sends(nas(40000), &first);
    let old = w.take_upstream(0);
    let rotated = upstream_with_secret("aaa-1", 1812, "rotated");
    let pool = Arc::new(Pool::single(rotated.clone()));
    w.reload(
        table(vec![client("nases", "198.51.100.0/24", pool)]),
        vec![rotated],
        &[("aaa-1", "rotated")],
    );
    assert!(!w.common.is_configured(0), "the old link is retired");
    assert_eq!(w.common.upstream_index["aaa-1"], 1);
    // The request sent before is answered with the secret it was sent with.
    let reply = w.servers[0].answer(&old[0].1, Code::AccessAccept, None);
    w.upstream_sends(old[0].0.socket, &reply);
    assert_eq!(
        nas_reads(&w.take_nas()[0].2, &first).code(),
        Code::AccessAccept
    );
    // New requests are signed with the new secret (the fake server verifies it).
    let second = access_request(2, "alice", None);
    w.nas_sends(nas(40000), &second);
    let new = w.take_upstream(1);
    assert_eq!(new.len(), 1);
    let (_, pw) = w.servers[1].read(&new[0].1);
    assert_eq!(pw, b"secret-pw", "the password hidden with the new secret");
    assert_eq!(w.engine.in_flight(), 1);
}

#[test]
fn status_counts_flows_by_client_and_requests_in_flight_by_link() {
    let mut w = World::new(Setup::default());
    w.nas_sends(nas(40000), &access_request(1, "alice", None));
    w.nas_sends(nas(40001), &access_request(1, "bob", None));
    w.answer_all(0, Code::AccessAccept);
    w.nas_sends(nas(40000), &access_request(2, "alice", None));
    let st = w.engine.status();
    let nases = st.flows["nases"];
    assert_eq!(
        (nases.proved, nases.provisional, nases.in_flight),
        (2, 0, 1)
    );
    assert_eq!(st.in_flight_by_link, vec![1]);
}

#[test]
fn an_adopted_flow_is_served_through_its_socket_and_not_made_again() {
    let mut w = World::new(dynamic_setup());
    let local: SocketAddr = LISTEN.parse().unwrap();
    let pool = w.common.clients.lookup(nas(1).ip()).unwrap().pool.clone();
    // The definition came over first, with what it had left in the old process.
    let dynamic = w.common.dynamic.clone().unwrap();
    let defined = Arc::new(client("dyn-9", "203.0.113.9/32", pool));
    dynamic.adopt(dynamic_nas(1).ip(), defined, Duration::from_secs(60), w.now);
    assert!(
        w.engine
            .adopt_flow(w.now, nas(40000), local, "nases", &mut w.io)
    );
    assert!(
        w.engine
            .adopt_flow(w.now, dynamic_nas(41000), local, "dyn-9", &mut w.io)
    );
    assert!(
        !w.engine
            .adopt_flow(w.now, nas(40001), local, "gone", &mut w.io),
        "a client that is no longer configured: not adopted"
    );
    assert!(
        !w.engine
            .adopt_flow(w.now, nas(40000), local, "nases", &mut w.io),
        "a flow is adopted once"
    );
    assert_eq!(w.io.children.len(), 2, "each took its socket");
    assert_eq!(w.count(Count::FlowAdopted), 2);
    assert_eq!(w.count(Count::FlowCreated { proved: true }), 0);
    assert!(w.io.defines.is_empty(), "no definition asked for again");
    // Their requests come through their sockets and go upstream at once.
    w.nas_sends(nas(40000), &access_request(1, "alice", None));
    w.nas_sends(dynamic_nas(41000), &access_request(2, "bob", None));
    assert_eq!(w.count(Count::Packet(Via::Child)), 2);
    w.answer_all(0, Code::AccessAccept);
    assert_eq!(w.take_nas().len(), 2);
    assert_eq!(w.count(Count::FlowCreated { proved: true }), 0);
}

#[test]
fn each_upstreams_answers_are_timed_from_the_first_sending() {
    let mut w = World::new(Setup::default());
    w.nas_sends(nas(40000), &access_request(1, "alice", None));
    w.advance(Duration::from_millis(30));
    w.answer_all(0, Code::AccessAccept);
    w.nas_sends(nas(40000), &access_request(2, "bob", None));
    w.advance(Duration::from_millis(2));
    w.answer_all(0, Code::AccessAccept);
    let taken: Vec<_> = w.engine.take_latencies().collect();
    assert_eq!(taken.len(), 1, "one upstream answered");
    let (link, l) = &taken[0];
    assert_eq!(*link, 0);
    assert_eq!(l.count, 2);
    assert_eq!(l.sum_us, 32_000);
    assert_eq!(l.buckets[2], 1, "2 ms: at most 2.5 ms");
    assert_eq!(l.buckets[6], 1, "30 ms: at most 50 ms");
    assert_eq!(w.engine.take_latencies().count(), 0, "taken out");
}

fn realm_of(name: &str, auth: Option<Arc<Pool>>, strip: bool) -> Realm {
    Realm {
        name: name.into(),
        acct: auth.clone(),
        auth,
        acct_replicas: Default::default(),
        reject_message: None,
        answer_accounting: false,
        strip,
    }
}

#[test]
fn a_realm_picks_its_pool_strips_its_name_or_refuses_here() {
    let ups = vec![upstream("aaa-1", 1812), upstream("aaa-2", 1814)];
    let home = Arc::new(Pool::single(ups[1].clone()));
    let refused = Realm {
        reject_message: Some("go away".into()),
        ..realm_of("refused.example", None, false)
    };
    let realms = Realms::new(
        vec![
            realm_of("example.org", Some(home.clone()), true),
            realm_of("*.kept.example", Some(home), false),
            refused,
        ],
        Delimiters::default(),
    )
    .unwrap();
    let mut w = World::new(Setup {
        upstreams: ups,
        realms: Some(realms),
        ..Setup::default()
    });
    let user = |w: &World, wire: &[u8], link: usize| {
        let (p, pw) = w.servers[link].read(wire);
        assert_eq!(
            pw, b"secret-pw",
            "the password re-hidden after the name changed"
        );
        String::from_utf8_lossy(p.get(attr::USER_NAME).unwrap().value).into_owned()
    };
    // The realm's pool, its name stripped.
    w.nas_sends(nas(40000), &access_request(1, "alice@Example.ORG", None));
    let sent = w.take_upstream(1);
    assert_eq!(sent.len(), 1, "to the realm's server");
    assert_eq!(user(&w, &sent[0].1, 1), "alice");
    let reply = w.servers[1].answer(&sent[0].1, Code::AccessAccept, None);
    w.upstream_sends(sent[0].0.socket, &reply);
    assert_eq!(w.take_nas().len(), 1);
    // EAP keeps its realm even so: the EAP server holds User-Name to the EAP identity.
    let eap = {
        let mut buf = [0u8; 4096];
        let req = access_request(9, "alice@example.org", None);
        buf[..req.len()].copy_from_slice(&req);
        let mut m = PacketMut::from_datagram(&mut buf, req.len()).unwrap();
        // EAP-Response/Identity.
        m.push(79, b"\x02\x01\x00\x16\x01alice@example.org")
            .unwrap();
        m.sign(&Secret::new(NAS_SECRET), None).unwrap();
        m.as_bytes().to_vec()
    };
    w.nas_sends(nas(40000), &eap);
    let sent = w.take_upstream(1);
    assert_eq!(sent.len(), 1, "EAP to the realm's server");
    assert_eq!(user(&w, &sent[0].1, 1), "alice@example.org");
    // Kept when the realm says so.
    w.nas_sends(nas(40000), &access_request(2, "carol@x.kept.example", None));
    let sent = w.take_upstream(1);
    assert_eq!(user(&w, &sent[0].1, 1), "carol@x.kept.example");
    // No realm matches: the client's pool.
    w.nas_sends(nas(40000), &access_request(3, "bob", None));
    assert_eq!(w.take_upstream(0).len(), 1, "by the client's pool");
    // Refused here, with its message, signed for the NAS; nothing goes upstream.
    let req = access_request(4, "eve@refused.example", None);
    w.nas_sends(nas(40000), &req);
    assert!(w.take_upstream(0).is_empty() && w.take_upstream(1).is_empty());
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    let r = nas_reads(&out[0].2, &req);
    assert_eq!(r.code(), Code::AccessReject);
    assert_eq!(reply_message(&r), "go away");
    assert_eq!(w.count(Count::LocalAnswer("realm_reject")), 1);
}

#[test]
fn operator_name_is_added_and_cui_and_proxy_state_pass_as_the_rfcs_say() {
    let mut w = World::new(Setup {
        operator_name: Some(b"1example.org".to_vec()),
        ..Setup::default()
    });
    // A NAS asking for a CUI (RFC 4372: one NUL byte), behind a proxy of its own.
    let request = |id: u8, operator: Option<&[u8]>| {
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).unwrap();
        let a = auth::random_authenticator();
        p.set_authenticator(&a);
        p.message_authenticator_first().unwrap();
        p.push(attr::USER_NAME, b"alice@example.org").unwrap();
        let mut h = [0u8; 128];
        let n = hide::hide_user_password(b"secret-pw", NAS_SECRET, &a, &mut h).unwrap();
        p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
        p.push(attr::CHARGEABLE_USER_IDENTITY, &[0]).unwrap();
        if let Some(o) = operator {
            p.push(attr::OPERATOR_NAME, o).unwrap();
        }
        p.push(attr::PROXY_STATE, b"nas-side-proxy").unwrap();
        p.sign(&Secret::new(NAS_SECRET), None).unwrap();
        p.as_bytes().to_vec()
    };
    let req = request(1, None);
    w.nas_sends(nas(40000), &req);
    let sent = w.take_upstream(0);
    let (p, _) = w.servers[0].read(&sent[0].1);
    assert_eq!(p.get(attr::OPERATOR_NAME).unwrap().value, b"1example.org");
    assert_eq!(p.get(attr::CHARGEABLE_USER_IDENTITY).unwrap().value, &[0]);
    let states: Vec<&[u8]> = p.get_all(attr::PROXY_STATE).map(|a| a.value).collect();
    assert_eq!(
        states,
        [&b"nas-side-proxy"[..], &b"sidecar!"[..]],
        "the NAS side's Proxy-State first, ours last"
    );
    // The home answers with the CUI; the NAS gets it, and its own Proxy-State only.
    let mut buf = [0u8; 4096];
    let mut r = PacketMut::new(&mut buf, Code::AccessAccept, p.identifier()).unwrap();
    r.message_authenticator_first().unwrap();
    r.push(attr::CHARGEABLE_USER_IDENTITY, b"cui-7f3a").unwrap();
    for ps in p.get_all(attr::PROXY_STATE) {
        r.add_proxy_state(ps.value).unwrap();
    }
    r.sign(&w.servers[0].upstream.secret, Some(p.authenticator()))
        .unwrap();
    let reply = r.as_bytes().to_vec();
    w.upstream_sends(sent[0].0.socket, &reply);
    let out = w.take_nas();
    let got = nas_reads(&out[0].2, &req);
    assert_eq!(
        got.get(attr::CHARGEABLE_USER_IDENTITY).unwrap().value,
        b"cui-7f3a"
    );
    let states: Vec<&[u8]> = got.get_all(attr::PROXY_STATE).map(|a| a.value).collect();
    assert_eq!(states, [&b"nas-side-proxy"[..]]);
    // A NAS that names its operator keeps its own.
    w.nas_sends(nas(40000), &request(2, Some(b"1nas.example")));
    let sent = w.take_upstream(0);
    let (p, _) = w.servers[0].read(&sent[0].1);
    let names: Vec<&[u8]> = p.get_all(attr::OPERATOR_NAME).map(|a| a.value).collect();
    assert_eq!(names, [&b"1nas.example"[..]]);
}

/// An upstream that takes accounting, on port `port + 1`.
fn acct_upstream(name: &str, port: u16) -> Arc<Upstream> {
    Arc::new(Upstream {
        acct: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
        ..Arc::into_inner(upstream_of(name, port, &format!("{name}-secret"), false)).unwrap()
    })
}

fn accounting_request(id: u8, session: &str) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, id).unwrap();
    p.push(attr::USER_NAME, b"alice").unwrap();
    p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
    p.push(attr::ACCT_SESSION_ID, session.as_bytes()).unwrap();
    p.sign(&Secret::new(NAS_SECRET), None).unwrap();
    p.as_bytes().to_vec()
}

#[test]
fn accounting_replicas_get_every_request_and_their_failures_stay_with_us() {
    let mut w = World::new(Setup {
        upstreams: vec![
            upstream("aaa-1", 1812),
            acct_upstream("acct-1", 1814),
            acct_upstream("archive", 1816),
        ],
        acct_upstream: Some(1),
        acct_replicas: vec![2],
        ..Setup::default()
    });
    let req = accounting_request(3, "s-1");
    w.nas_sends(nas(40000), &req);
    let primary = w.take_upstream(1);
    let copy = w.take_upstream(2);
    assert_eq!(
        (primary.len(), copy.len()),
        (1, 1),
        "to the primary and the replica"
    );
    let (p, _) = w.servers[2].read(&copy[0].1);
    assert_eq!(p.get(attr::ACCT_SESSION_ID).unwrap().value, b"s-1");
    // The NAS is answered on the primary's answer.
    let reply = w.servers[1].answer(&primary[0].1, Code::AccountingResponse, None);
    w.upstream_sends(primary[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(nas_reads(&out[0].2, &req).code(), Code::AccountingResponse);
    // The replica answers late: counted, nothing more reaches the NAS.
    let late = w.servers[2].answer(&copy[0].1, Code::AccountingResponse, None);
    w.upstream_sends(copy[0].0.socket, &late);
    assert!(w.take_nas().is_empty());
    assert_eq!(w.count(Count::Replica("answered")), 1);
    // A replica that never answers is retried, then given up, counted, never shown.
    let req = accounting_request(4, "s-2");
    w.nas_sends(nas(40000), &req);
    let primary = w.take_upstream(1);
    let reply = w.servers[1].answer(&primary[0].1, Code::AccountingResponse, None);
    w.upstream_sends(primary[0].0.socket, &reply);
    assert_eq!(w.take_nas().len(), 1);
    w.advance(Duration::from_secs(30));
    assert!(
        w.take_nas().is_empty(),
        "no Protocol-Error or anything for the replica"
    );
    assert_eq!(w.count(Count::Replica("timeout")), 1);
    assert_eq!(w.engine.in_flight(), 0, "nothing left in flight");
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
}

#[test]
fn accounting_no_server_answers_is_spooled_and_its_nas_answered() {
    let acct = acct_upstream("acct-1", 1814);
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), acct.clone()],
        acct_upstream: Some(1),
        spool: true,
        ..Setup::default()
    });
    w.io.spool_open = true;
    // The server is alive but silent: the request is retried, then spooled at its timeout
    // (20 s here), and only then is the NAS answered, once, with the request's age.
    let req = accounting_request(5, "s-1");
    w.nas_sends(nas(40000), &req);
    let first = w.take_upstream(1);
    assert_eq!(first.len(), 1);
    w.advance(Duration::from_secs(19));
    assert!(w.take_nas().is_empty());
    assert!(w.io.spooled.is_empty());
    w.advance(Duration::from_secs(2));
    assert_eq!(w.io.spooled.len(), 1, "spooled at its timeout");
    let (pool, up, packet, age) = w.io.spooled[0].clone();
    assert_eq!((pool.as_str(), up.as_str()), ("acct-1", "acct-1"));
    assert!(age >= Duration::from_secs(20), "{age:?}");
    // What is spooled is the request as prepared for the server, but for our Proxy-State.
    let (p, _) = w.servers[1].read(&first[0].1);
    let spooled = Packet::parse(&packet).unwrap();
    assert_eq!(
        spooled.get(attr::ACCT_SESSION_ID).unwrap().value,
        p.get(attr::ACCT_SESSION_ID).unwrap().value
    );
    assert!(spooled.get(attr::PROXY_STATE).is_none());
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(nas_reads(&out[0].2, &req).code(), Code::AccountingResponse);
    assert_eq!(w.count(Count::LocalAnswer("accounting_spooled")), 1);
    assert_eq!(w.count(Count::Dropped("upstream_timeout")), 0);
    assert_eq!(w.engine.in_flight(), 0);
    assert_eq!(w.count(Count::RequestBegun), w.count(Count::RequestEnded));
    assert_eq!(w.take_upstream(1).len(), 2, "its two retries went before");
    // The NAS's retransmission gets the same answer, and nothing is spooled twice.
    w.nas_sends(nas(40000), &req);
    assert_eq!(w.take_nas().len(), 1);
    assert!(w.take_upstream(1).is_empty());
    assert_eq!(w.io.spooled.len(), 1);
    // No server alive: spooled at once, nothing sent.
    assert_ne!(acct.health.state(), State::Alive, "it went silent");
    let req = accounting_request(6, "s-2");
    w.nas_sends(nas(40000), &req);
    assert!(w.take_upstream(1).is_empty());
    assert_eq!(w.io.spooled.len(), 2);
    assert_eq!(w.io.spooled[1].3, Duration::ZERO);
    let out = w.take_nas();
    assert_eq!(out.len(), 1);
    assert_eq!(nas_reads(&out[0].2, &req).code(), Code::AccountingResponse);
    // A spool that refuses (full): the NAS is not answered, and retries.
    w.io.spool_open = false;
    w.nas_sends(nas(40000), &accounting_request(7, "s-3"));
    assert!(w.take_nas().is_empty());
    assert_eq!(w.count(Count::Dropped("spool_refused")), 1);
    // Access-Requests are never spooled.
    assert_eq!(w.io.spooled.len(), 2);
}

#[test]
fn a_clients_accounting_goes_to_its_accounting_pool() {
    let acct = acct_upstream("acct-1", 1814);
    let mut w = World::new(Setup {
        upstreams: vec![upstream("aaa-1", 1812), acct],
        acct_upstream: Some(1),
        ..Setup::default()
    });
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, 9).unwrap();
    p.push(attr::USER_NAME, b"alice").unwrap();
    p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
    p.push(attr::ACCT_SESSION_ID, b"s-1").unwrap();
    p.sign(&Secret::new(NAS_SECRET), None).unwrap();
    let req = p.as_bytes().to_vec();
    w.nas_sends(nas(40000), &req);
    assert!(
        w.take_upstream(0).is_empty(),
        "not to the authentication pool"
    );
    let sent = w.take_upstream(1);
    assert_eq!(sent.len(), 1, "to the accounting pool");
    let reply = w.servers[1].answer(&sent[0].1, Code::AccountingResponse, None);
    w.upstream_sends(sent[0].0.socket, &reply);
    let out = w.take_nas();
    assert_eq!(nas_reads(&out[0].2, &req).code(), Code::AccountingResponse);
    // Its Access-Requests still go to its pool.
    w.nas_sends(nas(40000), &access_request(1, "alice", None));
    assert_eq!(w.take_upstream(0).len(), 1);
}
