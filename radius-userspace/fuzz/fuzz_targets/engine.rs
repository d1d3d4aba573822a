//! The engine on a virtual clock, fed a sequence of events decoded from the input: NAS
//! datagrams (well-signed requests, retransmissions, or raw bytes), upstream replies (right
//! answers, replies to the wrong request, or raw bytes), clock steps, a stream upstream's
//! connection closing or agreeing on RADIUS/1.1, and NASes whose connection speaks 1.1.
//! The input's first bytes choose the set-up: realms (exact and stripped, a wildcard, a
//! refused realm, `NULL`; no regex, which would be compiled for every input: `realm.rs`'s
//! tests cover them) or none; rewrites both ways on the client and the
//! upstream, and an Operator-Name, or none; an accounting spool that takes records, one
//! that is full, or none. User-Names are raw bytes or `user@realm`
//! among the realms written, and their neighbours.
//! Invariants checked: every datagram to a NAS goes to a source that sent one, from the
//! address it sent to; nothing stays in flight past its timeout once time moves on; every
//! request begun is ended; the in-flight count matches the table's.
//! `ENGINE_TRACE=1` prints each event and the state after it (for one input at a time).
#![no_main]

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use libfuzzer_sys::fuzz_target;
use radius_core::{
    blastradius::YesNoAuto,
    client::{Client, ClientTable},
    codec::{Code, Packet, PacketMut, attr, auth::Secret, dict::Dictionary, hide},
    counters::{Count, Counters, Refusal},
    dedup::DedupTimers,
    engine::{Common, Engine, Io, Random},
    flows::Flow,
    pool::{Policy, Pool},
    realm::{Delimiters, Realm, Realms},
    requests::At,
    rewrite::{self, Rewrite, Rewrites},
    upstream::{Upstream, UpstreamOptions},
};

const NAS_SECRET: &[u8] = b"nas-secret";
const UP_SECRET: &[u8] = b"up-secret";
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Tally(Mutex<HashMap<Count, u64>>);

impl Counters for Tally {
    fn count(&self, c: Count) {
        if let Ok(mut m) = self.0.lock() {
            *m.entry(c).or_default() += 1;
        }
    }
    fn signs(&self, _: &'static str, _: &str) {}
}

impl Tally {
    fn get(&self, c: Count) -> u64 {
        self.0.lock().map_or(0, |m| m.get(&c).copied().unwrap_or(0))
    }
}

#[derive(Default)]
struct FakeIo {
    v11_nases: HashSet<SocketAddr>,
    /// Whether the spool takes what it is given (a full one refuses).
    spool_takes: bool,
}

impl Io for FakeIo {
    fn open_child(&mut self, _: usize, _: &Flow) -> Result<(), Refusal> {
        Ok(())
    }
    fn close_child(&mut self, _: usize, _: &Flow, _: &mut Vec<(SocketAddr, Vec<u8>)>) {}
    fn open_upstream(&mut self, _: usize, _: SocketAddr) -> std::io::Result<()> {
        Ok(())
    }
    fn close_upstream(&mut self, _: usize) {}
    fn define(&mut self, _: IpAddr) {}
    fn speaks_v11(&self, remote: SocketAddr, _: SocketAddr) -> bool {
        self.v11_nases.contains(&remote)
    }
    fn spool(&mut self, _: &str, _: &str, packet: &[u8], _: Duration) -> bool {
        assert!(
            Packet::parse(packet).is_ok_and(|p| p.code() == Code::AccountingRequest),
            "only Accounting-Requests are spooled"
        );
        self.spool_takes
    }
}

/// The realms the User-Names are drawn from (the last ones match none).
const REALMS: [&str; 8] = [
    "example.org",
    "a.example.net",
    "sub.a.example.net",
    "refused.org",
    "kept.org",
    "EXAMPLE.ORG",
    "example.net",
    "",
];

fn realms(pool: &Arc<Pool>) -> Arc<Realms> {
    let realm = |name: &str, strip: bool, auth: Option<Arc<Pool>>| Realm {
        name: name.into(),
        auth,
        acct: Some(pool.clone()),
        acct_replicas: Arc::from(Vec::new()),
        reject_message: Some("no such realm".into()),
        answer_accounting: false,
        strip,
    };
    let table = vec![
        realm("example.org", true, Some(pool.clone())),
        realm("*.example.net", false, Some(pool.clone())),
        realm("refused.org", false, None),
        realm("kept.org", false, Some(pool.clone())),
        realm("NULL", false, Some(pool.clone())),
    ];
    Arc::new(Realms::new(table, Delimiters::default()).expect("the realms compile"))
}

/// The dictionary, made once: cloning it for every input would cost more than the input.
fn dictionary() -> Arc<Dictionary> {
    static D: OnceLock<Arc<Dictionary>> = OnceLock::new();
    D.get_or_init(|| Arc::new(Dictionary::builtin().clone()))
        .clone()
}

/// A client's or an upstream's rewrites, both ways: what eduroam and ISPs write. Made once
/// (they hold no state; compiling their regex for every input would slow the target).
fn rewrites() -> Rewrites {
    static R: OnceLock<Rewrites> = OnceLock::new();
    R.get_or_init(compile_rewrites).clone()
}

fn compile_rewrites() -> Rewrites {
    let dict = Dictionary::builtin();
    let inbound = Rewrite {
        name: "in".into(),
        remove: vec![rewrite::target(dict, "Filter-Id").expect("an attribute")],
        modify: vec![
            rewrite::modify(dict, "User-Name", "^(.*)@EXAMPLE\\.ORG$", "$1@example.org")
                .expect("a regex"),
        ],
        add_if_absent: vec![rewrite::assignment(dict, "NAS-Port = 7").expect("a value")],
        ..Rewrite::default()
    };
    let outbound = Rewrite {
        name: "out".into(),
        remove: vec![rewrite::target(dict, "Reply-Message").expect("an attribute")],
        replace: vec![rewrite::assignment(dict, "Session-Timeout = 60").expect("a value")],
        add: vec![rewrite::assignment(dict, "Class = 0x66757a7a").expect("a value")],
        ..Rewrite::default()
    };
    Rewrites {
        inbound: Some(Arc::new(inbound)),
        outbound: Some(Arc::new(outbound)),
    }
}

fn upstream(name: &str, port: u16, stream: bool, rewrite: Rewrites) -> Arc<Upstream> {
    Arc::new(Upstream {
        name: name.into(),
        auth: SocketAddr::from(([127, 0, 0, 1], port)),
        acct: Some(SocketAddr::from(([127, 0, 0, 1], port + 1))),
        secret: Secret::new(UP_SECRET),
        timeout: TIMEOUT,
        options: UpstreamOptions {
            retry: Duration::from_secs(2),
            max_retries: 2,
            require_message_authenticator: YesNoAuto::Auto,
            rewrite,
            ..Default::default()
        },
        health: Default::default(),
        stream,
    })
}

/// Reads the input a byte at a time; zeros when it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn nas(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 1 + i % 3], 40000 + u16::from(i % 4)))
}

/// A NAS's request: signed with its secret (RADIUS), or in RADIUS/1.1 form.
fn request(id: u8, code: Code, v11: bool, user: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let Ok(mut p) = PacketMut::new(&mut buf, code, if v11 { 0 } else { id }) else {
        return Vec::new();
    };
    let mut a = [0u8; 16];
    if v11 {
        a[3] = id;
    } else {
        a[0] = id;
        a[1] = 0x5a;
    }
    p.set_authenticator(&a);
    if !v11 && code != Code::AccountingRequest {
        let _ = p.message_authenticator_first();
    }
    let _ = p.push(attr::USER_NAME, &user[..user.len().min(64)]);
    if code == Code::AccessRequest {
        if v11 {
            let _ = p.push(attr::USER_PASSWORD, b"pw");
        } else {
            let mut h = [0u8; 128];
            if let Ok(n) = hide::hide_user_password(b"pw", NAS_SECRET, &a, &mut h) {
                let _ = p.push(attr::USER_PASSWORD, &h[..n]);
            }
        }
    }
    if !v11 {
        let _ = p.sign(NAS_SECRET, None);
    }
    p.as_bytes().to_vec()
}

/// The upstream's answer to `wire` (as it saw it): signed, Proxy-States echoed; in 1.1
/// form when the link speaks it.
fn answer(wire: &[u8], v11: bool, code: Code) -> Option<Vec<u8>> {
    let req = if v11 {
        Packet::parse_v11(wire).ok()?
    } else {
        Packet::parse(wire).ok()?
    };
    let mut buf = [0u8; 4096];
    let mut r = PacketMut::new(&mut buf, code, req.identifier()).ok()?;
    if v11 {
        r.set_authenticator(req.authenticator());
    } else if code != Code::AccountingResponse {
        r.message_authenticator_first().ok()?;
    }
    for ps in req.get_all(attr::PROXY_STATE) {
        r.add_proxy_state(ps.value).ok()?;
    }
    if !v11 {
        r.sign(UP_SECRET, Some(req.authenticator())).ok()?;
    }
    Some(r.as_bytes().to_vec())
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let setup = input.byte();
    let with_realms = setup & 1 == 1;
    let rewrite = if setup & 2 == 2 {
        rewrites()
    } else {
        Rewrites::default()
    };
    let ups = vec![
        upstream("udp-1", 1812, false, rewrite.clone()),
        upstream("stream-1", 2083, true, rewrite.clone()),
    ];
    // A spooled pool has UDP members only (`check-config` refuses streams there).
    let spooled = setup & 8 == 8;
    let pool = Arc::new(Pool {
        name: "pool".into(),
        members: if spooled {
            ups[..1].to_vec()
        } else {
            ups.clone()
        },
        policy: if input.byte() & 1 == 0 {
            Policy::FailOver
        } else {
            Policy::LoadBalance
        },
        spool: spooled,
    });
    let realms = with_realms.then(|| realms(&pool));
    let mut clients = ClientTable::default();
    clients.insert(Client {
        name: "nases".into(),
        prefix: "198.51.100.0/24".parse().expect("a prefix"),
        secret: Secret::new(NAS_SECRET),
        pool,
        require_message_authenticator: YesNoAuto::Auto,
        limit_proxy_state: YesNoAuto::Auto,
        learned: Default::default(),
        nas_key: None,
        certificate: Default::default(),
        operator_name: (setup & 4 == 4).then(|| b"1example.org".to_vec()),
        acct_pool: None,
        acct_replicas: Default::default(),
        rewrite,
    });
    let tally = Arc::new(Tally::default());
    let common = Arc::new(Common {
        clients,
        dynamic: None,
        nas_directory: Default::default(),
        eap_states: Default::default(),
        pending_packets: Default::default(),
        upstreams: ups.clone(),
        upstream_index: ups
            .iter()
            .enumerate()
            .map(|(i, u)| (u.name.clone(), i))
            .collect(),
        proxy_state: *b"sidecar!",
        active: Default::default(),
        max_flows: 8,
        provisional_flows: Default::default(),
        max_provisional: 4,
        idle_timeout: Duration::from_secs(60),
        provisional_idle: Duration::from_secs(10),
        dedup: DedupTimers::default(),
        counters: tally.clone(),
        dictionary: dictionary(),
        realms,
    });
    let start = Instant::now();
    let mut now = start;
    let mut engine = Engine::new(common.clone(), 0, false, now);
    let mut n = 0u128;
    engine.set_random(Random {
        jitter: Box::new(|d| d),
        authenticator: Box::new(move || {
            n += 1;
            n.to_be_bytes()
        }),
    });
    let mut io = FakeIo {
        spool_takes: setup & 16 == 16,
        ..FakeIo::default()
    };
    if engine.start(now, &mut io).is_err() {
        return;
    }
    let local: SocketAddr = "192.0.2.1:1812".parse().expect("an address");
    // Who sent what to which address; what is out upstream, by socket.
    let mut senders: HashSet<(SocketAddr, SocketAddr)> = HashSet::new();
    let mut out: Vec<(At, Vec<u8>)> = Vec::new();
    let mut last: HashMap<SocketAddr, Vec<u8>> = HashMap::new();
    let collect = |engine: &mut Engine,
                   out: &mut Vec<(At, Vec<u8>)>,
                   senders: &HashSet<(SocketAddr, SocketAddr)>| {
        let t = engine.poll_transmits();
        for &(at, off, len) in &t.upstream {
            out.push((at, t.data(off, len).to_vec()));
        }
        for &(remote, from, _, _) in &t.nas {
            assert!(
                senders.contains(&(remote, from)),
                "a datagram to {remote} from {from}, who sent nothing there"
            );
        }
        engine.recycle(t);
    };
    let trace = std::env::var_os("ENGINE_TRACE").is_some();
    let mut steps = 0;
    while !input.is_empty() && steps < 200 {
        steps += 1;
        let ev = input.byte() % 9;
        if trace {
            eprintln!("event {ev} rest {:02x?}", &input.0[..input.0.len().min(12)]);
        }
        match ev {
            // A NAS sends a well-formed request (or its retransmission).
            0..=2 => {
                let who = input.byte();
                let remote = nas(who);
                let again = input.byte() % 4 == 0;
                let data = match (again, last.get(&remote)) {
                    (true, Some(d)) => d.clone(),
                    _ => {
                        let id = input.byte();
                        let code = match input.byte() % 4 {
                            0 => Code::AccountingRequest,
                            1 => Code::StatusServer,
                            _ => Code::AccessRequest,
                        };
                        let user = match input.byte() % 3 {
                            0 => input.bytes(8).to_vec(),
                            _ => {
                                let mut u = input.bytes(3).to_vec();
                                u.push(b'@');
                                let realm = REALMS[usize::from(input.byte()) % REALMS.len()];
                                u.extend_from_slice(realm.as_bytes());
                                u
                            }
                        };
                        request(id, code, io.v11_nases.contains(&remote), &user)
                    }
                };
                last.insert(remote, data.clone());
                senders.insert((remote, local));
                engine.handle_wildcard(now, remote, local, &data, &mut io);
            }
            // A NAS sends raw bytes.
            3 => {
                let remote = nas(input.byte());
                let len = usize::from(input.byte());
                let data = input.bytes(len).to_vec();
                senders.insert((remote, local));
                engine.handle_wildcard(now, remote, local, &data, &mut io);
            }
            // An upstream answers what it got (or another request's Identifier).
            4 | 5 => {
                if out.is_empty() {
                    continue;
                }
                let i = usize::from(input.byte()) % out.len();
                let (at, wire) = out.swap_remove(i);
                let v11 = engine.upstream_speaks_v11(at.socket);
                let code = match wire.first().copied() {
                    Some(4) => Code::AccountingResponse,
                    _ if input.byte() & 1 == 0 => Code::AccessAccept,
                    _ => Code::AccessReject,
                };
                if let Some(reply) = answer(&wire, v11, code) {
                    let mut reply = reply;
                    if input.byte() % 8 == 0 && reply.len() > 7 {
                        // The wrong request's reply.
                        reply[1] ^= 1;
                        reply[7] ^= 1;
                    }
                    engine.handle_upstream(now, at.socket, &reply);
                }
            }
            // Raw bytes from an upstream socket.
            6 => {
                let socket = usize::from(input.byte() % 4) * 16;
                let len = usize::from(input.byte());
                let data = input.bytes(len).to_vec();
                engine.handle_upstream(now, socket, &data);
            }
            // Time moves.
            7 => {
                let ms = u64::from(input.byte()) * 40;
                let until = now + Duration::from_millis(ms);
                while engine.poll_timeout() <= until {
                    now = engine.poll_timeout().max(now);
                    engine.handle_timeout(now, &mut io);
                    collect(&mut engine, &mut out, &senders);
                }
                now = until;
            }
            // The stream upstream: its connection closes, or agrees on a protocol; a NAS's
            // connection speaks 1.1 from now (its next flow).
            _ => match input.byte() % 3 {
                0 => engine.handle_upstream_closed(now, 32, &mut io),
                1 => {
                    let v11 = input.byte() & 1 == 1;
                    engine.handle_upstream_version(now, 32, v11, &mut io);
                }
                _ => {
                    io.v11_nases.insert(nas(input.byte()));
                }
            },
        }
        collect(&mut engine, &mut out, &senders);
        if trace {
            eprintln!(
                "t={:?} in_flight={} out={:?} next={:?}",
                now - start,
                engine.in_flight(),
                out.iter()
                    .map(|(at, w)| (at.socket, w.first().copied(), w.get(1).copied()))
                    .collect::<Vec<_>>(),
                engine.poll_timeout().saturating_duration_since(start)
            );
        }
        assert_eq!(
            tally.get(Count::RequestBegun) - tally.get(Count::RequestEnded),
            engine.in_flight() as u64,
            "the in-flight count is the table's"
        );
    }
    // Nothing stays in flight past its timeout once time moves on.
    let until = now + TIMEOUT + Duration::from_secs(3);
    while engine.poll_timeout() <= until {
        now = engine.poll_timeout().max(now);
        engine.handle_timeout(now, &mut io);
        collect(&mut engine, &mut out, &senders);
    }
    if trace {
        eprintln!("end t={:?} in_flight={}", now - start, engine.in_flight());
    }
    assert_eq!(
        engine.in_flight(),
        0,
        "requests in flight past their timeout"
    );
    assert_eq!(
        tally.get(Count::RequestBegun),
        tally.get(Count::RequestEnded),
        "every request begun is ended"
    );
});
