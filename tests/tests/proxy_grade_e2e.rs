//! Proxy-grade forwarding, end to end in a private namespace (loopback), on both paths:
//! RFC 5080 dedup against a real FreeRADIUS (it sees a retransmitted request once),
//! Status-Server from NASes answered by the sidecar, the sidecar's own retransmission when
//! an upstream loses a request, BlastRADIUS checks against a hostile upstream of the test's
//! own, and 2 000 requests in flight to one FreeRADIUS. Run as root.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::Duration,
};

use radius_sidecar::codec::{Code, Packet, PacketMut, attr, auth, edit};
use tests::{
    loadgen::{self, LoadSpec},
    responder::{Behaviour, Responder},
    *,
};

const NAS_SECRET: &str = "pg-nas-secret";
const UP_SECRET: &str = "pg-upstream-secret";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
const METRICS: &str = "127.0.0.1:9812";

fn sidecar(ns: &NetNs, tag: &str, fast: bool, upstream: &str) -> Daemon {
    sidecar_to(ns, tag, fast, upstream, None)
}

/// As [`sidecar`], the NASes' client naming `target` (an upstream or a pool).
fn sidecar_to(ns: &NetNs, tag: &str, fast: bool, upstream: &str, target: Option<&str>) -> Daemon {
    sidecar_on(
        ns,
        tag,
        fast,
        upstream,
        target,
        r#""127.0.0.1:1812", "127.0.0.1:1813""#,
    )
}

/// As [`sidecar_to`], listening on `listen` (the inside of a TOML array).
fn sidecar_on(
    ns: &NetNs,
    tag: &str,
    fast: bool,
    upstream: &str,
    target: Option<&str>,
    listen: &str,
) -> Daemon {
    let target = target.map_or(String::new(), |t| format!("upstream = \"{t}\"\n"));
    sidecar_with_config(
        ns,
        tag,
        &format!(
            r#"[server]
listen = [{listen}]
workers = 2
iface = "lo"
ebpf = "{}"
metrics = "{METRICS}"
coa_listen = "127.0.0.1:3799"

{upstream}

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"
{target}"#,
            if fast { "require" } else { "off" }
        ),
    )
}

fn freeradius_upstream() -> String {
    format!(
        "[[upstream]]\nname = \"fr\"\nauth = \"127.0.0.1:11812\"\nacct = \"127.0.0.1:11813\"\nsecret = \"{UP_SECRET}\"\n"
    )
}

fn nas(ip: &str) -> UdpSocket {
    let s = nas_socket(ip);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn accounting_start(id: u8, session: &str) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, id).unwrap();
    p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
    p.push(attr::ACCT_SESSION_ID, session.as_bytes()).unwrap();
    p.push(attr::USER_NAME, b"alice").unwrap();
    p.sign(NAS_SECRET.as_bytes(), None).unwrap();
    p.as_bytes().to_vec()
}

/// Sends `req` and returns the reply, checked against the NAS secret.
fn ask(s: &UdpSocket, req: &[u8]) -> Option<Vec<u8>> {
    let port = if req[0] == Code::AccountingRequest as u8 {
        1813
    } else {
        1812
    };
    s.send_to(req, ("127.0.0.1", port)).unwrap();
    let mut b = [0u8; 4096];
    let n = s.recv(&mut b).ok()?;
    let mut a = [0u8; 16];
    a.copy_from_slice(&req[4..20]);
    let p = Packet::parse(&b[..n]).expect("a reply that parses");
    auth::verify(&p, NAS_SECRET.as_bytes(), Some(&a)).expect("signed with the NAS secret");
    Some(b[..n].to_vec())
}

fn retransmissions_are_answered_from_the_cache(fast: bool) {
    if !require_root("proxy-grade dedup") {
        return;
    }
    let ns = NetNs::new("pgdedup");
    let fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let _d = sidecar(&ns, "pg-dedup", fast, &freeradius_upstream());
    let (acct, auth_req) = (
        accounting_start(11, "dedup-session-1"),
        pap_request(12, "alice", "alice-pw", NAS_SECRET, &[]).0,
    );
    let (a, b) = ns.run(move || {
        let s = nas("127.0.2.1");
        // The same Accounting-Request three times, the same Access-Request twice.
        let acct_replies: Vec<_> = (0..3).map(|_| ask(&s, &acct)).collect();
        let auth_replies: Vec<_> = (0..2).map(|_| ask(&s, &auth_req)).collect();
        (acct_replies, auth_replies)
    });
    for r in a.iter().chain(&b) {
        assert!(r.is_some(), "every copy answered");
    }
    assert!(
        a.windows(2).all(|w| w[0] == w[1]),
        "the same Accounting-Response each time"
    );
    assert!(
        b.windows(2).all(|w| w[0] == w[1]),
        "the same Access-Accept each time"
    );
    assert_eq!(b[0].as_ref().map(|r| r[0]), Some(Code::AccessAccept as u8));
    // Let FreeRADIUS write its detail file.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        fr.detail_records("dedup-session-1"),
        1,
        "FreeRADIUS saw the accounting request once"
    );
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(
        m("radius_local_answers_total{reason=\"duplicate_cached\"}"),
        3,
        "two accounting and one auth retransmission answered from the cache"
    );
    assert_eq!(m("radius_forwarded_total"), 2);
}

#[test]
fn fast_path_retransmissions_are_answered_from_the_cache() {
    retransmissions_are_answered_from_the_cache(true);
}

#[test]
fn user_space_path_retransmissions_are_answered_from_the_cache() {
    retransmissions_are_answered_from_the_cache(false);
}

fn status_server_is_answered_by_the_sidecar(fast: bool) {
    if !require_root("proxy-grade status-server") {
        return;
    }
    let ns = NetNs::new("pgstatus");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    // Roles by port (1812, 1813), and said outright on ports that tell nothing or the
    // opposite.
    let _d = sidecar_on(
        &ns,
        "pg-status",
        fast,
        &freeradius_upstream(),
        None,
        r#""127.0.0.1:1812", "127.0.0.1:1813", "127.0.0.1:1700/acct", "127.0.0.1:1646/auth""#,
    );
    let got = ns.run(|| {
        let s = nas("127.0.2.1");
        let mut out = Vec::new();
        for (id, port) in [(1u8, 1812u16), (2, 1813), (3, 1700), (4, 1646)] {
            let mut buf = [0u8; 4096];
            let p = edit::status_server(&mut buf, id, NAS_SECRET.as_bytes()).unwrap();
            let (req, a) = (p.as_bytes().to_vec(), p.authenticator());
            s.send_to(&req, ("127.0.0.1", port)).unwrap();
            let mut b = [0u8; 4096];
            let n = s.recv(&mut b).expect("an answer to Status-Server");
            let r = Packet::parse(&b[..n]).unwrap();
            auth::verify(&r, NAS_SECRET.as_bytes(), Some(&a)).expect("signed for the NAS");
            assert!(r.message_authenticator_offset().is_some());
            out.push(r.code());
        }
        // Without a Message-Authenticator it is dropped (RFC 5997).
        let mut buf = [0u8; 64];
        let mut p = PacketMut::new(&mut buf, Code::StatusServer, 3).unwrap();
        p.set_authenticator(&auth::random_authenticator());
        s.send_to(p.as_bytes(), "127.0.0.1:1812").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 64];
        out.push(if s.recv(&mut b).is_ok() {
            Code::AccessAccept
        } else {
            Code::StatusServer
        });
        out
    });
    assert_eq!(
        got,
        vec![
            Code::AccessAccept,
            Code::AccountingResponse,
            Code::AccountingResponse,
            Code::AccessAccept,
            Code::StatusServer
        ],
        "Access-Accept on auth listeners, Accounting-Response on acct ones, nothing without MA"
    );
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(m("radius_local_answers_total{reason=\"status_server\"}"), 4);
    assert_eq!(m("radius_forwarded_total"), 0, "never forwarded");
    assert_eq!(
        m("radius_proxy_drops_total{reason=\"status_server_without_message_authenticator\"}"),
        1
    );
}

#[test]
fn fast_path_status_server_is_answered_by_the_sidecar() {
    status_server_is_answered_by_the_sidecar(true);
}

#[test]
fn user_space_path_status_server_is_answered_by_the_sidecar() {
    status_server_is_answered_by_the_sidecar(false);
}

/// Our own upstream on `127.0.0.1:port` in `ns`, with the upstream secret.
fn responder(ns: &NetNs, port: u16, b: Behaviour) -> Responder {
    ns.run(move || Responder::start(([127, 0, 0, 1], port).into(), UP_SECRET.as_bytes(), b))
        .expect("the responder binds")
}

fn responder_upstream(extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"own\"\nauth = \"127.0.0.1:41812\"\nsecret = \"{UP_SECRET}\"\ntimeout_ms = 1500\n{extra}\n"
    )
}

fn hostile_upstream_answers_never_reach_the_nas(fast: bool) {
    if !require_root("proxy-grade blastradius") {
        return;
    }
    let ns = NetNs::new("pgblast");
    let r = responder(&ns, 41812, Behaviour::ForgedMessageAuthenticator);
    // Default policy: "auto".
    let _d = sidecar(&ns, "pg-blast", fast, &responder_upstream(""));
    let try_once = |id: u8| {
        ns.run(move || {
            let s = nas("127.0.2.1");
            ask(&s, &pap_request(id, "alice", "alice-pw", NAS_SECRET, &[]).0).is_some()
        })
    };
    assert!(
        !try_once(1),
        "a forged Message-Authenticator: the NAS gets nothing"
    );
    r.set_behaviour(Behaviour::NoMessageAuthenticator);
    assert!(
        try_once(2),
        "none yet from this upstream (like FreeRADIUS 3.2.1 on PAP): relayed in auto mode"
    );
    let m = |s: &str| metric(&ns, METRICS, s);
    let required = "radius_message_authenticator_required{peer=\"upstream\",name=\"own\"}";
    assert_eq!(m(required), 0, "nothing learnt yet");
    r.set_behaviour(Behaviour::Correct);
    assert!(try_once(3), "a correct reply (signed, no EAP)");
    assert_eq!(m(required), 1, "a signed reply without EAP teaches auto");
    r.set_behaviour(Behaviour::NoMessageAuthenticator);
    assert!(
        !try_once(4),
        "once the upstream has sent one, a reply without it is dropped"
    );
    assert!(m("radius_proxy_drops_total{reason=\"bad_signature\"}") >= 1);
    assert!(m("radius_proxy_drops_total{reason=\"upstream_no_message_authenticator\"}") >= 1);
    assert_eq!(m("radius_relayed_total"), 2);
}

#[test]
fn fast_path_hostile_upstream_answers_never_reach_the_nas() {
    hostile_upstream_answers_never_reach_the_nas(true);
}

#[test]
fn user_space_path_hostile_upstream_answers_never_reach_the_nas() {
    hostile_upstream_answers_never_reach_the_nas(false);
}

/// A send to the upstream that the kernel refuses (its route prohibited for a moment) ends
/// the request whole: Identifier, dedup entry, in-flight count. The NAS's retransmission of
/// that same request is then forwarded anew and answered, not swallowed as "in flight".
fn a_request_whose_send_failed_is_answered_on_the_nas_retransmission(fast: bool) {
    if !require_root("proxy-grade send failure") {
        return;
    }
    let side = NetNs::new("pgsendfail");
    let up = NetNs::new("pgsendup");
    sh(&[
        "ip", "link", "add", "sfa", "netns", &side.name, "type", "veth", "peer", "name", "sfb",
        "netns", &up.name,
    ]);
    side.ip(&["addr", "add", "203.0.113.1/24", "dev", "sfa"]);
    side.ip(&["link", "set", "sfa", "up"]);
    up.ip(&["addr", "add", "203.0.113.2/24", "dev", "sfb"]);
    up.ip(&["link", "set", "sfb", "up"]);
    let _r = up
        .run(|| {
            Responder::start(
                ([203, 0, 113, 2], 41812).into(),
                UP_SECRET.as_bytes(),
                Behaviour::Correct,
            )
        })
        .expect("the responder binds");
    let upstream = format!(
        "[[upstream]]\nname = \"own\"\nauth = \"203.0.113.2:41812\"\nsecret = \"{UP_SECRET}\"\nretry_ms = 10000\n"
    );
    let mut d = sidecar(&side, "pg-sendfail", fast, &upstream);
    assert!(d.wait_for_log("upstream answers Status-Server", Duration::from_secs(5)));
    let m = |s: &str| metric(&side, METRICS, s);
    // One NAS socket: a retransmission comes from the same flow.
    let s = side.run(|| nas("127.0.2.1"));
    assert!(ask(&s, &pap_request(7, "alice", "alice-pw", NAS_SECRET, &[]).0).is_some());

    side.ip(&["route", "add", "prohibit", "203.0.113.2/32"]);
    let (req, _) = pap_request(8, "alice", "alice-pw", NAS_SECRET, &[]);
    assert!(ask(&s, &req).is_none(), "no route: no answer");
    assert!(m("radius_proxy_drops_total{reason=\"send_to_upstream\"}") >= 1);
    assert_eq!(
        m("radius_requests_in_flight"),
        0,
        "the failed send ended the request"
    );

    side.ip(&["route", "del", "prohibit", "203.0.113.2/32"]);
    assert!(
        ask(&s, &req).is_some(),
        "the NAS's retransmission of the same request gets a fresh answer"
    );
    assert_eq!(m("radius_requests_in_flight"), 0);
    assert_eq!(m("radius_relayed_total"), 2);
}

#[test]
fn fast_path_a_request_whose_send_failed_is_answered_on_the_nas_retransmission() {
    a_request_whose_send_failed_is_answered_on_the_nas_retransmission(true);
}

#[test]
fn user_space_path_a_request_whose_send_failed_is_answered_on_the_nas_retransmission() {
    a_request_whose_send_failed_is_answered_on_the_nas_retransmission(false);
}

#[test]
fn a_request_lost_upstream_is_sent_again_on_the_sidecars_timer() {
    if !require_root("proxy-grade retransmission") {
        return;
    }
    let ns = NetNs::new("pgretry");
    let r = responder(&ns, 41812, Behaviour::IgnoreFirstCopy);
    let _d = sidecar(&ns, "pg-retry", true, &responder_upstream("retry_ms = 300"));
    // The start-up Status-Server probe is one datagram of its own.
    let before = r.received();
    let answered = ns.run(|| {
        let s = nas("127.0.2.1");
        let t0 = std::time::Instant::now();
        let ok = ask(&s, &pap_request(5, "alice", "alice-pw", NAS_SECRET, &[]).0).is_some();
        (ok, t0.elapsed())
    });
    assert!(answered.0, "answered without the NAS retransmitting");
    assert!(
        answered.1 >= Duration::from_millis(250),
        "after one retry interval"
    );
    assert_eq!(
        r.received() - before,
        2,
        "the first copy and one retransmission"
    );
    assert_eq!(
        metric(
            &ns,
            METRICS,
            "radius_upstream_retransmits_total{reason=\"timer\"}"
        ),
        1
    );
}

fn two_thousand_requests_in_flight_to_one_freeradius(fast: bool) {
    if !require_root("proxy-grade 2000 in flight") {
        return;
    }
    let ns = NetNs::new("pg2000");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let d = sidecar(&ns, "pg-2000", fast, &freeradius_upstream());
    let spec = LoadSpec {
        target: "127.0.0.1:1812".parse().unwrap(),
        sources: (1..=10)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
            .collect(),
        sockets_per_source: 1,
        outstanding: 2_000,
        duration: Duration::from_secs(2),
        max_requests: 40_000,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        timeout: Duration::from_secs(8),
        message_authenticator: true,
        rate: None,
    };
    let res = ns.run(move || loadgen::run(&spec)).unwrap();
    let why: String = metrics_text(&ns, METRICS)
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && (l.contains("drops") || l.contains("refused") || l.contains("fastpath_events"))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(res.answered >= 2_000, "answered {}", res.answered);
    assert_eq!(
        (res.lost, res.bad),
        (0, 0),
        "none lost, none bad; metrics:\n{why}"
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
        .map(|d| d.count())
        .unwrap_or(0);
    // 10 flows, 4 wildcards, at most 16 upstream sockets per worker and port, a few more.
    assert!(fds < 150, "file descriptors bounded: {fds}");
    assert_eq!(
        metric(
            &ns,
            METRICS,
            "radius_proxy_drops_total{reason=\"upstream_ids_exhausted\"}"
        ),
        0
    );
}

#[test]
fn fast_path_two_thousand_requests_in_flight_to_one_freeradius() {
    two_thousand_requests_in_flight_to_one_freeradius(true);
}

#[test]
fn user_space_path_two_thousand_requests_in_flight_to_one_freeradius() {
    two_thousand_requests_in_flight_to_one_freeradius(false);
}

fn failover_and_back(fast: bool) {
    if !require_root("proxy-grade failover") {
        return;
    }
    let ns = NetNs::new("pgfail");
    let fr1 = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let _fr2 = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 12812);
    let health = "retry_ms = 300\ntimeout_ms = 4000\ncheck_interval_ms = 200\nzombie_period_ms = 1000\nanswers_to_alive = 2\n";
    let upstreams = format!(
        "[[upstream]]\nname = \"fr1\"\nauth = \"127.0.0.1:11812\"\nsecret = \"{UP_SECRET}\"\n{health}\n\
         [[upstream]]\nname = \"fr2\"\nauth = \"127.0.0.1:12812\"\nsecret = \"{UP_SECRET}\"\n{health}\n\
         [[pool]]\nname = \"aaa\"\nupstreams = [\"fr1\", \"fr2\"]\npolicy = \"fail-over\"\n"
    );
    let _d = sidecar_to(&ns, "pg-fail", fast, &upstreams, Some("aaa"));
    let spec = LoadSpec {
        target: "127.0.0.1:1812".parse().unwrap(),
        sources: (1..=8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
            .collect(),
        sockets_per_source: 1,
        outstanding: 32,
        duration: Duration::from_secs(4),
        max_requests: 400_000,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        timeout: Duration::from_secs(4),
        message_authenticator: true,
        rate: None,
    };
    // The first upstream stops in the middle of the run.
    let res = std::thread::scope(|sc| {
        let load = sc.spawn(|| ns.run(move || loadgen::run(&spec)));
        std::thread::sleep(Duration::from_millis(1500));
        drop(fr1);
        load.join().unwrap().unwrap()
    });
    let m = |s: &str| metric(&ns, METRICS, s);
    assert!(res.answered > 1000, "answered {}", res.answered);
    let why: String = metrics_text(&ns, METRICS)
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && [
                    "drops",
                    "retransmits",
                    "upstream_state",
                    "forwarded",
                    "relayed",
                ]
                .iter()
                .any(|k| l.contains(k))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        (res.lost, res.bad),
        (0, 0),
        "every request answered across the switch; metrics:\n{why}"
    );
    assert_ne!(
        m("radius_upstream_state{upstream=\"fr1\"}"),
        0,
        "fr1 is not alive"
    );
    assert_eq!(m("radius_upstream_state{upstream=\"fr2\"}"), 0);
    // It comes back: Status-Server probes see it.
    let _fr1 = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while m("radius_upstream_state{upstream=\"fr1\"}") != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "fr1 alive again within 10 s of its restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ok = ns.run(|| {
        let s = nas("127.0.2.50");
        ask(&s, &pap_request(9, "alice", "alice-pw", NAS_SECRET, &[]).0).is_some()
    });
    assert!(ok, "served after fr1 came back");
}

#[test]
fn fast_path_failover_and_back() {
    failover_and_back(true);
}

#[test]
fn user_space_path_failover_and_back() {
    failover_and_back(false);
}

fn coa_and_disconnect_reach_the_nas_through_its_flow(fast: bool) {
    if !require_root("proxy-grade coa") {
        return;
    }
    let ns = NetNs::new("pgcoa");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let _d = sidecar(&ns, "pg-coa", fast, &freeradius_upstream());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (got, outputs) = std::thread::scope(|sc| {
        let nas_side = sc.spawn(|| {
            ns.run(move || {
                let s = nas("127.0.2.9");
                let req = pap_request(
                    1,
                    "alice",
                    "alice-pw",
                    NAS_SECRET,
                    &[(attr::NAS_IDENTIFIER, b"nas-coa")],
                )
                .0;
                assert!(ask(&s, &req).is_some(), "the NAS is served first");
                ready_tx.send(()).unwrap();
                // CoA and Disconnect arrive on the NAS's own RADIUS socket (its flow),
                // not on port 3799: what a NAS behind NAT can receive.
                let mut got = Vec::new();
                let mut b = [0u8; 4096];
                while got.len() < 2 {
                    let Ok(n) = s.recv(&mut b) else { break };
                    let p = Packet::parse(&b[..n]).expect("parses");
                    auth::verify(&p, NAS_SECRET.as_bytes(), None)
                        .expect("signed with the NAS's secret");
                    assert_eq!(p.get(attr::USER_NAME).map(|a| a.value), Some(&b"alice"[..]));
                    let ack = match p.code() {
                        Code::CoaRequest => Code::CoaAck,
                        Code::DisconnectRequest => Code::DisconnectAck,
                        other => panic!("unexpected {other:?}"),
                    };
                    let mut out = [0u8; 64];
                    let mut m = PacketMut::new(&mut out, ack, p.identifier()).unwrap();
                    m.sign(NAS_SECRET.as_bytes(), Some(p.authenticator()))
                        .unwrap();
                    s.send_to(m.as_bytes(), "127.0.0.1:1812").unwrap();
                    got.push(p.code());
                }
                got
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("NAS ready");
        let mut outputs = Vec::new();
        for (kind, nas_id) in [
            ("coa", "nas-coa"),
            ("disconnect", "nas-coa"),
            ("coa", "no-such-nas"),
        ] {
            let c = spawn_radclient(
                &ns,
                &["-r", "1", "-t", "3", "127.0.0.1:3799", kind, UP_SECRET],
                &format!("NAS-Identifier = \"{nas_id}\"\nUser-Name = \"alice\"\n"),
            );
            let o = c.wait_with_output().expect("radclient");
            outputs.push(format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ));
        }
        (nas_side.join().unwrap(), outputs)
    });
    assert_eq!(got, vec![Code::CoaRequest, Code::DisconnectRequest]);
    assert!(outputs[0].contains("CoA-ACK"), "radclient: {}", outputs[0]);
    assert!(
        outputs[1].contains("Disconnect-ACK"),
        "radclient: {}",
        outputs[1]
    );
    assert!(outputs[2].contains("CoA-NAK"), "radclient: {}", outputs[2]);
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(m("radius_coa_total{reason=\"to_nas\"}"), 2);
    assert_eq!(m("radius_coa_total{reason=\"nas_not_found\"}"), 1);
}

#[test]
fn fast_path_coa_and_disconnect_reach_the_nas_through_its_flow() {
    coa_and_disconnect_reach_the_nas_through_its_flow(true);
}

#[test]
fn user_space_path_coa_and_disconnect_reach_the_nas_through_its_flow() {
    coa_and_disconnect_reach_the_nas_through_its_flow(false);
}

#[test]
fn blastradius_auto_defaults_protect_a_nas_that_sends_message_authenticators() {
    if !require_root("proxy-grade blastradius client") {
        return;
    }
    let ns = NetNs::new("pgblastc");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let _d = sidecar(&ns, "pg-blastc", true, &freeradius_upstream());
    let got = ns.run(|| {
        let s = nas("127.0.2.1");
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        let with_ma = pap_request(1, "alice", "alice-pw", NAS_SECRET, &[]).0;
        // Then one without a Message-Authenticator (and nothing to prove it), and one with
        // a Proxy-State: what a BlastRADIUS forgery needs.
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 2).unwrap();
        let a = auth::random_authenticator();
        p.set_authenticator(&a);
        p.push(attr::USER_NAME, b"alice").unwrap();
        p.push(attr::PROXY_STATE, b"forged").unwrap();
        let without_ma = p.as_bytes().to_vec();
        vec![ask(&s, &with_ma).is_some(), ask(&s, &without_ma).is_some()]
    });
    assert_eq!(got, vec![true, false]);
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(
        m("radius_proxy_drops_total{reason=\"no_message_authenticator\"}"),
        1,
        "required once the NAS has sent one (auto)"
    );
}

/// A NAS behind a real NAT: its own namespace, a router namespace that masquerades it
/// (nftables), the sidecar in a third. The CoA reaches it only because it is sent through
/// its flow (to the port the NAT gave it).
fn coa_reaches_a_nas_behind_a_real_nat(fast: bool) {
    if !require_root("proxy-grade coa behind nat") {
        return;
    }
    let (sc, rt, nasns) = (
        NetNs::new("pgn-sc"),
        NetNs::new("pgn-rt"),
        NetNs::new("pgn-nas"),
    );
    sh(&[
        "ip", "link", "add", "scr", "netns", &sc.name, "type", "veth", "peer", "name", "rts",
        "netns", &rt.name,
    ]);
    sh(&[
        "ip",
        "link",
        "add",
        "rtn",
        "netns",
        &rt.name,
        "type",
        "veth",
        "peer",
        "name",
        "nasr",
        "netns",
        &nasns.name,
    ]);
    sc.ip(&["addr", "add", "192.0.2.1/24", "dev", "scr"]);
    sc.ip(&["link", "set", "scr", "up"]);
    rt.ip(&["addr", "add", "192.0.2.254/24", "dev", "rts"]);
    rt.ip(&["addr", "add", "10.9.0.1/24", "dev", "rtn"]);
    rt.ip(&["link", "set", "rts", "up"]);
    rt.ip(&["link", "set", "rtn", "up"]);
    nasns.ip(&["addr", "add", "10.9.0.2/24", "dev", "nasr"]);
    nasns.ip(&["link", "set", "nasr", "up"]);
    nasns.ip(&["route", "add", "default", "via", "10.9.0.1"]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &rt.name,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &rt.name,
        "nft",
        "add table ip nat; add chain ip nat post { type nat hook postrouting priority 100; }; add rule ip nat post oifname rts masquerade",
    ]);
    let _fr = FreeRadius::start_on(&sc, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let _d = sidecar_with_config(
        &sc,
        "pg-natcoa",
        &format!(
            r#"[server]
listen = ["192.0.2.1:1812"]
workers = 2
iface = "scr"
ebpf = "{}"
metrics = "{METRICS}"
coa_listen = "127.0.0.1:3799"

{}

[[client]]
prefix = "192.0.2.254/32"
name = "behind-nat"
secret = "{NAS_SECRET}"
"#,
            if fast { "require" } else { "off" },
            freeradius_upstream()
        ),
    );
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (got, out) = std::thread::scope(|scope| {
        let nas_side = scope.spawn(|| {
            nasns.run(move || {
                let s = nas("10.9.0.2");
                let req = pap_request(
                    1,
                    "alice",
                    "alice-pw",
                    NAS_SECRET,
                    &[(attr::NAS_IDENTIFIER, b"nas-behind-nat")],
                )
                .0;
                let mut served = false;
                for _ in 0..3 {
                    s.send_to(&req, "192.0.2.1:1812").unwrap();
                    let mut b = [0u8; 4096];
                    if s.recv(&mut b).is_ok() {
                        served = true;
                        break;
                    }
                }
                assert!(served, "the NAS behind NAT is served");
                ready_tx.send(()).unwrap();
                let mut b = [0u8; 4096];
                let n = s.recv(&mut b).expect("a CoA-Request through the NAT");
                let p = Packet::parse(&b[..n]).unwrap();
                auth::verify(&p, NAS_SECRET.as_bytes(), None).expect("signed for the NAS");
                let mut o = [0u8; 64];
                let mut m = PacketMut::new(&mut o, Code::CoaAck, p.identifier()).unwrap();
                m.sign(NAS_SECRET.as_bytes(), Some(p.authenticator()))
                    .unwrap();
                s.send_to(m.as_bytes(), "192.0.2.1:1812").unwrap();
                p.code()
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(15))
            .expect("NAS ready");
        let c = spawn_radclient(
            &sc,
            &["-r", "1", "-t", "3", "127.0.0.1:3799", "coa", UP_SECRET],
            "NAS-Identifier = \"nas-behind-nat\"\nUser-Name = \"alice\"\n",
        );
        let o = c.wait_with_output().expect("radclient");
        (
            nas_side.join().unwrap(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    });
    assert_eq!(got, Code::CoaRequest);
    assert!(out.contains("CoA-ACK"), "radclient: {out}");
}

#[test]
fn fast_path_coa_reaches_a_nas_behind_a_real_nat() {
    coa_reaches_a_nas_behind_a_real_nat(true);
}

#[test]
fn user_space_path_coa_reaches_a_nas_behind_a_real_nat() {
    coa_reaches_a_nas_behind_a_real_nat(false);
}

#[test]
fn a_request_that_cannot_be_forwarded_gets_a_protocol_error() {
    if !require_root("proxy-grade protocol-error") {
        return;
    }
    let ns = NetNs::new("pgperr");
    let _r = responder(&ns, 41812, Behaviour::Correct);
    // An upstream with no accounting port: accounting cannot be forwarded.
    let _d = sidecar(&ns, "pg-perr", true, &responder_upstream(""));
    let reply = ns.run(|| {
        let s = nas("127.0.2.1");
        ask(&s, &accounting_start(3, "perr-session"))
    });
    let reply = reply.expect("an answer instead of a timeout");
    let p = Packet::parse(&reply).unwrap();
    assert_eq!(p.code(), Code::ProtocolError);
    assert_eq!(
        p.get(attr::ERROR_CAUSE).map(|a| a.value),
        Some(&405u32.to_be_bytes()[..]),
        "Unsupported Service"
    );
    assert_eq!(
        metric(
            &ns,
            METRICS,
            "radius_proxy_drops_total{reason=\"no_acct_upstream\"}"
        ),
        1
    );
}

#[test]
fn sigterm_lets_the_requests_in_flight_be_answered() {
    if !require_root("proxy-grade drain") {
        return;
    }
    let ns = NetNs::new("pgdrain");
    let _r = responder(&ns, 41812, Behaviour::IgnoreFirstCopy);
    // The upstream answers only the retransmission, 500 ms later: the request is still in
    // flight when SIGTERM comes.
    let mut d = sidecar(&ns, "pg-drain", true, &responder_upstream("retry_ms = 500"));
    let pid = d.child.id() as i32;
    let answered = std::thread::scope(|sc| {
        let nas_side = sc.spawn(|| {
            ns.run(|| {
                let s = nas("127.0.2.1");
                ask(&s, &pap_request(4, "alice", "alice-pw", NAS_SECRET, &[]).0).is_some()
            })
        });
        std::thread::sleep(Duration::from_millis(150));
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        nas_side.join().unwrap()
    });
    assert!(answered, "the request in flight at SIGTERM was answered");
    let status = d.stop(libc::SIGTERM, Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "a clean exit: {status:?}"
    );
    assert!(
        d.log().contains("draining requests in flight"),
        "{}",
        d.log()
    );
}

#[test]
fn an_eap_conversation_stays_on_its_server_across_flows_of_a_load_balancing_pool() {
    if !require_root("proxy-grade eap stickiness") {
        return;
    }
    let ns = NetNs::new("pgsticky");
    let _r = (
        responder(&ns, 41812, Behaviour::Challenge),
        responder(&ns, 41813, Behaviour::Challenge),
    );
    let upstreams = format!(
        "[[upstream]]\nname = \"r1\"\nauth = \"127.0.0.1:41812\"\nsecret = \"{UP_SECRET}\"\n\
         [[upstream]]\nname = \"r2\"\nauth = \"127.0.0.1:41813\"\nsecret = \"{UP_SECRET}\"\n\
         [[pool]]\nname = \"lb\"\nupstreams = [\"r1\", \"r2\"]\npolicy = \"load-balance\"\n"
    );
    let _d = sidecar_to(&ns, "pg-sticky", true, &upstreams, Some("lb"));
    let codes = ns.run(|| {
        let first = nas("127.0.2.1");
        let challenge = ask(
            &first,
            &pap_request(1, "alice", "alice-pw", NAS_SECRET, &[]).0,
        )
        .expect("a challenge");
        let p = Packet::parse(&challenge).unwrap();
        assert_eq!(p.code(), Code::AccessChallenge);
        let state = p.get(attr::STATE).expect("a State").value.to_vec();
        // The next steps come from other source ports: other flows, other hashes.
        (0..8)
            .map(|i| {
                let s = nas("127.0.2.1");
                let req = pap_request(
                    2 + i,
                    "alice",
                    "alice-pw",
                    NAS_SECRET,
                    &[(attr::STATE, &state)],
                )
                .0;
                let r = ask(&s, &req).expect("an answer");
                Packet::parse(&r).unwrap().code()
            })
            .collect::<Vec<_>>()
    });
    assert!(
        codes.iter().all(|c| *c == Code::AccessAccept),
        "every step reached the server that holds the conversation: {codes:?}"
    );
}
