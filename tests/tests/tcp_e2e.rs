//! End to end, RADIUS/TCP (RFC 6613): radclient over TCP in its own namespace, through the
//! sidecar's TCP listener (beside UDP on the same port, with the fast path on), to a real
//! FreeRADIUS on UDP; and the bounds a listener keeps
//! against connections that cost without asking anything (silent, half a packet, a length
//! RADIUS does not allow, sources that are no client), while a good NAS is served
//! throughout. Run as root.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use tests::*;

const METRICS: &str = "127.0.0.1:9812";
const UPSTREAM_SECRET: &str = "sidecar-upstream-tcp";
const NAS_SECRET: &str = "nas-tcp-secret";

const USERS: &str = r#"alice	Cleartext-Password := "alice-pw"
	Reply-Message := "hello alice over tcp"
"#;

struct Setup {
    topo: Topology,
    _fr: FreeRadius,
    daemon: Daemon,
}

fn setup() -> Setup {
    let topo = Topology::new();
    let fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    // nas2's network is no client: its connections are refused at accept. UDP on the same
    // port, with the fast path steering it, beside TCP.
    let daemon = sidecar_with_config(
        &topo.sidecar,
        "tcp",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
listen_tcp = ["0.0.0.0:1812", "0.0.0.0:1813"]
tcp_timeout = 1
max_connections_per_source = 4
workers = 1
iface = "sc1"
ebpf = "require"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
acct = "127.0.0.1:11813"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{NAS_SECRET}"
"#
        ),
    );
    let mut daemon = daemon;
    // The TCP listeners come up after the UDP ones ("listening" with their bound).
    assert!(
        daemon.wait_for_log("max_connections", Duration::from_secs(10)),
        "{}",
        daemon.log()
    );
    Setup {
        topo,
        _fr: fr,
        daemon,
    }
}

/// radclient over TCP from `ns`; (exit success, output).
fn radclient_tcp(ns: &NetNs, target: &str, kind: &str, input: &str) -> (bool, String) {
    run_radclient(
        ns,
        &[
            "-x", "-P", "tcp", "-r", "1", "-t", "3", target, kind, NAS_SECRET,
        ],
        input,
    )
}

fn closed(ns: &NetNs, reason: &str) -> u64 {
    metric(
        ns,
        METRICS,
        &format!("radius_connections_closed_total{{transport=\"tcp\",reason=\"{reason}\"}}"),
    )
}

/// Whether the peer closes `s` within `within` (a read returns 0 or fails).
fn closed_by_peer(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let deadline = Instant::now() + within;
    let mut b = [0u8; 64];
    while Instant::now() < deadline {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn radclient_over_tcp_is_answered_by_freeradius_on_udp() {
    if !require_root("tcp e2e") {
        return;
    }
    let s = setup();
    let to_auth = format!("{SIDECAR1_V4}:1812");
    let to_acct = format!("{SIDECAR1_V4}:1813");
    let (ok, out) = radclient_tcp(
        &s.topo.nas1,
        &to_auth,
        "auth",
        "User-Name = alice, User-Password = alice-pw, NAS-IP-Address = 192.0.2.2\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    assert!(out.contains("hello alice over tcp"), "{out}");
    let (_, out) = radclient_tcp(
        &s.topo.nas1,
        &to_auth,
        "auth",
        "User-Name = alice, User-Password = wrong\n",
    );
    assert!(out.contains("Received Access-Reject"), "{out}");
    for status in ["Start", "Stop"] {
        let (ok, out) = radclient_tcp(
            &s.topo.nas1,
            &to_acct,
            "acct",
            &format!(
                "User-Name = alice, Acct-Status-Type = {status}, Acct-Session-Id = \"tcp-1\", \
                 NAS-IP-Address = 192.0.2.2\n"
            ),
        );
        assert!(
            ok && out.contains("Received Accounting-Response"),
            "{status}: {out}"
        );
    }
    // Several requests in one connection, answered on it.
    let (ok, out) = radclient_tcp(
        &s.topo.nas1,
        &to_auth,
        "auth",
        "User-Name = alice, User-Password = alice-pw\n\n\
         User-Name = alice, User-Password = alice-pw, NAS-Port = 2\n\n\
         User-Name = alice, User-Password = alice-pw, NAS-Port = 3\n",
    );
    assert!(
        ok && out.matches("Received Access-Accept").count() == 3,
        "{out}"
    );
    // The same NAS on UDP to the same port, steered by the fast path meanwhile.
    let child = spawn_radclient(
        &s.topo.nas1,
        &["-x", "-r", "2", "-t", "2", &to_auth, "auth", NAS_SECRET],
        "User-Name = alice, User-Password = alice-pw\n",
    );
    let udp = String::from_utf8_lossy(&child.wait_with_output().unwrap().stdout).into_owned();
    assert!(udp.contains("Received Access-Accept"), "{udp}");
    assert_eq!(metric(&s.topo.sidecar, METRICS, "radius_fast_path"), 1);
    let accepted = metric(
        &s.topo.sidecar,
        METRICS,
        "radius_connections_accepted_total{transport=\"tcp\"}",
    );
    assert!(
        accepted >= 5,
        "one connection per radclient run: {accepted}"
    );
    drop(s.daemon);
}

#[test]
fn connections_that_cost_without_asking_are_closed_and_a_good_nas_is_served() {
    if !require_root("tcp e2e") {
        return;
    }
    let s = setup();
    let to = format!("{SIDECAR1_V4}:1812");
    // A connection that sends nothing, one that sends half a packet, one that sends a
    // length RADIUS does not allow.
    let t = to.clone();
    let (silent, partial, bad) = s.topo.nas1.run(move || {
        let mut silent = TcpStream::connect(&t).unwrap();
        let mut partial = TcpStream::connect(&t).unwrap();
        partial.write_all(&[1, 7, 0, 60, 0, 0, 0, 0]).unwrap();
        let mut bad = TcpStream::connect(&t).unwrap();
        bad.write_all(&[1, 7, 0x10, 0x01]).unwrap();
        let bad_closed = closed_by_peer(&mut bad, Duration::from_millis(500));
        let silent_closed = closed_by_peer(&mut silent, Duration::from_secs(3));
        let partial_closed = closed_by_peer(&mut partial, Duration::from_secs(3));
        (silent_closed, partial_closed, bad_closed)
    });
    assert!(bad, "a length over 4096 closes the connection at once");
    assert!(silent, "a silent connection is closed after tcp_timeout");
    assert!(
        partial,
        "half a packet is dropped with its connection after tcp_timeout"
    );
    assert!(closed(&s.topo.sidecar, "bad_length") >= 1);
    assert!(closed(&s.topo.sidecar, "silent") >= 1);
    assert!(closed(&s.topo.sidecar, "partial") >= 1);

    // Past max_connections_per_source (4) a source's connections are refused; the good
    // NAS is answered on its own connection meanwhile.
    let t = to.clone();
    let held = s.topo.nas1.run(move || {
        (0..6)
            .filter_map(|_| TcpStream::connect(&t).ok())
            .collect::<Vec<_>>()
    });
    std::thread::sleep(Duration::from_millis(200));
    let refused = metric(
        &s.topo.sidecar,
        METRICS,
        "radius_connections_refused_total{transport=\"tcp\",reason=\"per_source\"}",
    );
    assert!(
        refused >= 2,
        "connections past the per-source bound refused: {refused}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out) = radclient_tcp(
        &s.topo.nas1,
        &to,
        "auth",
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");

    // A source in no client's prefix is refused at accept.
    let t = format!("{SIDECAR2_V4}:1812");
    let stranger = s.topo.nas2.run(move || {
        let mut c = TcpStream::connect(&t).unwrap();
        closed_by_peer(&mut c, Duration::from_secs(1))
    });
    assert!(stranger, "no client: closed at once");
    assert!(
        metric(
            &s.topo.sidecar,
            METRICS,
            "radius_connections_refused_total{transport=\"tcp\",reason=\"unknown_client\"}",
        ) >= 1
    );
    drop(s.daemon);
}

/// 500 connections that never send a byte hold nothing past `tcp_timeout`: all are closed
/// and counted, and a good NAS is answered while they are open.
#[test]
fn five_hundred_idle_connections_are_closed_and_a_good_nas_is_served_meanwhile() {
    if !require_root("tcp e2e") {
        return;
    }
    let topo = Topology::new();
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let mut daemon = sidecar_with_config(
        &topo.sidecar,
        "tcp-idle",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
listen_tcp = ["0.0.0.0:1812"]
tcp_timeout = 2
max_connections_per_source = 1000
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "192.0.2.0/24"
name = "nas1"
secret = "{NAS_SECRET}"
"#
        ),
    );
    assert!(daemon.wait_for_log("max_connections", Duration::from_secs(10)));
    let to = format!("{SIDECAR1_V4}:1812");
    let t = to.clone();
    let idle = topo.nas1.run(move || {
        (0..500)
            .map(|_| TcpStream::connect(&t).unwrap())
            .collect::<Vec<_>>()
    });
    assert_eq!(idle.len(), 500);
    std::thread::sleep(Duration::from_millis(300));
    let open = |ns: &NetNs| metric(ns, METRICS, "radius_connections_open{transport=\"tcp\"}");
    assert_eq!(open(&topo.sidecar), 500, "all 500 accepted");
    let (ok, out) = radclient_tcp(
        &topo.nas1,
        &to,
        "auth",
        "User-Name = alice, User-Password = alice-pw\n",
    );
    assert!(ok && out.contains("Received Access-Accept"), "{out}");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        open(&topo.sidecar),
        0,
        "every idle connection closed after tcp_timeout"
    );
    assert!(closed(&topo.sidecar, "silent") >= 500);
    drop(idle);
    drop(daemon);
}
