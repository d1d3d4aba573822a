//! Dynamic clients end to end: a NAS nobody configured is defined by an HTTP directory that
//! takes 300 ms to answer; the 100 requests it sends in the meantime are kept and all
//! answered exactly once by the real FreeRADIUS behind the sidecar, without a single
//! retransmission. A refused NAS is not served and gets a negative entry that the XDP guard
//! then enforces. Run as root.

use std::{
    collections::HashMap,
    io::{Read, Write},
    net::{TcpListener, UdpSocket},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use radius_sidecar::codec::{Code, Packet, auth};
use tests::*;

const METRICS: &str = "127.0.0.1:9812";
const UPSTREAM_SECRET: &str = "dyn-upstream-secret";
const NAS_SECRET: &str = "dynamic-nas-secret";
const REFUSED_IP: &str = "192.0.2.3";

/// The directory: an HTTP endpoint of the test's own that answers after `delay`, defining
/// NAS1's address and refusing every other. Counts the questions per address.
fn directory(ns: &NetNs, delay: Duration) -> (u16, Arc<Mutex<HashMap<String, usize>>>) {
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let asked = Arc::new(Mutex::new(HashMap::new()));
    let counts = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let counts = counts.clone();
            std::thread::spawn(move || {
                let mut req = [0u8; 2048];
                let n = conn.read(&mut req).unwrap_or(0);
                let text = String::from_utf8_lossy(&req[..n]).to_string();
                let ip = text
                    .split("address=")
                    .nth(1)
                    .and_then(|r| r.split([' ', '&']).next())
                    .unwrap_or("")
                    .to_owned();
                *counts.lock().unwrap().entry(ip.clone()).or_insert(0) += 1;
                std::thread::sleep(delay);
                let resp = if ip == NAS1_V4 {
                    let body = format!("{{\"secret\": \"{NAS_SECRET}\", \"name\": \"dyn-nas1\"}}");
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned()
                };
                let _ = conn.write_all(resp.as_bytes());
            });
        }
    });
    (port, asked)
}

fn start(topo: &Topology, fast: bool, directory_port: u16) -> Daemon {
    start_with(
        topo,
        fast,
        &format!(
            "directory = \"http\"\nurl = \"http://127.0.0.1:{directory_port}/nas\"\ntimeout_ms = 3000\n"
        ),
    )
}

/// The sidecar with a `[dynamic]` section over NAS1's network using `directory`.
fn start_with(topo: &Topology, fast: bool, directory: &str) -> Daemon {
    sidecar_with_config(
        &topo.sidecar,
        if fast { "dyn-fast" } else { "dyn-user" },
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 2
iface = "sc1"
ebpf = "{}"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[dynamic]
prefixes = ["192.0.2.0/24"]
nak_lifetime = 30
{directory}"#,
            if fast { "require" } else { "off" }
        ),
    )
}

/// The real FreeRADIUS behind the sidecar, on the sidecar host's loopback.
fn upstream(topo: &Topology) -> FreeRadius {
    FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        "alice\tCleartext-Password := \"alice-pw\"\n",
        11812,
    )
}

fn access_request(id: u8, secret: &str) -> (Vec<u8>, [u8; 16]) {
    pap_request(id, "alice", "alice-pw", secret, &[])
}

fn setup_window(fast: bool) {
    if !require_root("dynamic setup window") {
        return;
    }
    let topo = Topology::new();
    let _fr = upstream(&topo);
    let (port, asked) = directory(&topo.sidecar, Duration::from_millis(300));
    let _d = start(&topo, fast, port);

    let nas = topo.nas1.run(|| {
        let s = nas_socket(NAS1_V4);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s
    });
    let to = format!("{SIDECAR1_V4}:1812");
    let mut sent = HashMap::new();
    let t0 = Instant::now();
    for id in 0..100u8 {
        let (p, a) = access_request(id, NAS_SECRET);
        nas.send_to(&p, &to).unwrap();
        sent.insert(id, a);
    }
    let burst = t0.elapsed();
    assert!(
        burst < Duration::from_millis(50),
        "the burst took {burst:?}"
    );

    // Replies for up to 5 s; never a retransmission.
    let mut answered: HashMap<u8, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && answered.len() < 100 {
        let Ok(n) = nas.recv(&mut buf) else { continue };
        let r = Packet::parse(&buf[..n]).unwrap();
        let req_auth = sent
            .get(&r.identifier())
            .expect("a reply to a request we sent");
        auth::verify(&r, NAS_SECRET.as_bytes(), Some(req_auth)).unwrap();
        assert_eq!(r.code(), Code::AccessAccept);
        *answered.entry(r.identifier()).or_insert(0) += 1;
    }
    // Anything late would be a duplicate.
    while let Ok(n) = nas.recv(&mut buf) {
        let id = buf[1];
        let _ = n;
        *answered.entry(id).or_insert(0) += 1;
    }
    assert_eq!(answered.len(), 100, "every request was answered");
    assert!(answered.values().all(|&c| c == 1), "each exactly once");
    assert_eq!(
        asked.lock().unwrap().get(NAS1_V4),
        Some(&1),
        "one definition for the source"
    );
    assert_eq!(
        metric(
            &topo.sidecar,
            METRICS,
            "radius_refused_total{reason=\"PendingFull\"}"
        ),
        0
    );
}

#[test]
fn fast_path_setup_window_loses_nothing() {
    setup_window(true);
}

#[test]
fn user_space_path_setup_window_loses_nothing() {
    setup_window(false);
}

#[test]
fn a_refused_nas_is_not_served_and_xdp_drops_it_afterwards() {
    if !require_root("dynamic refusal") {
        return;
    }
    let topo = Topology::new();
    topo.nas1
        .ip(&["addr", "add", &format!("{REFUSED_IP}/24"), "dev", "nas"]);
    let _fr = upstream(&topo);
    let (port, asked) = directory(&topo.sidecar, Duration::from_millis(50));
    let _d = start(&topo, true, port);
    let nas = topo.nas1.run(|| {
        let s = UdpSocket::bind((REFUSED_IP, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        s
    });
    let to = format!("{SIDECAR1_V4}:1812");
    for id in 0..5u8 {
        nas.send_to(&access_request(id, NAS_SECRET).0, &to).unwrap();
    }
    let mut buf = [0u8; 4096];
    assert!(nas.recv(&mut buf).is_err(), "a refused NAS gets no answer");
    let refused = metric(
        &topo.sidecar,
        METRICS,
        "radius_refused_total{reason=\"DirectoryRefused\"}",
    );
    assert_eq!(refused, 5, "each kept packet is dropped and counted once");
    // Now the XDP guard drops it before the stack.
    for id in 5..10u8 {
        nas.send_to(&access_request(id, NAS_SECRET).0, &to).unwrap();
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let dropped = metric(
        &topo.sidecar,
        METRICS,
        "radius_fastpath_events_total{event=\"drop_negative\"}",
    );
    assert_eq!(
        dropped, 5,
        "the negative entry drops the refused source in XDP"
    );
    assert_eq!(asked.lock().unwrap().get(REFUSED_IP), Some(&1));
}

/// Sends 10 requests from `ip` and returns how many verified Access-Accepts came back.
fn accepted_from(topo: &Topology, ip: &'static str) -> usize {
    let nas = topo.nas1.run(move || {
        let s = UdpSocket::bind((ip, 0)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        s
    });
    let to = format!("{SIDECAR1_V4}:1812");
    let mut sent = HashMap::new();
    for id in 0..10u8 {
        let (p, a) = access_request(id, NAS_SECRET);
        nas.send_to(&p, &to).unwrap();
        sent.insert(id, a);
    }
    let mut buf = [0u8; 4096];
    let mut ok = 0;
    while let Ok(n) = nas.recv(&mut buf) {
        let r = Packet::parse(&buf[..n]).unwrap();
        if let Some(a) = sent.get(&r.identifier())
            && r.code() == Code::AccessAccept
            && auth::verify(&r, NAS_SECRET.as_bytes(), Some(a)).is_ok()
        {
            ok += 1;
        }
    }
    ok
}

/// Rows of FreeRADIUS's `nas` table: NAS1 by address, with its own secret; REFUSED_IP is in
/// no row.
const NAS_ROWS: &str = "INSERT INTO nas (nasname, shortname, type, secret, server) VALUES \
     ('192.0.2.2', 'nas1-sql', 'other', 'dynamic-nas-secret', NULL), \
     ('192.0.2.128/25', 'other-half', 'other', 'x', NULL);";

fn sql_directory(url: String, topo: &Topology) {
    topo.nas1
        .ip(&["addr", "add", &format!("{REFUSED_IP}/24"), "dev", "nas"]);
    let _fr = upstream(topo);
    let _d = start_with(
        topo,
        true,
        &format!("directory = \"sql\"\nurl = \"{url}\"\n"),
    );
    assert_eq!(
        accepted_from(topo, NAS1_V4),
        10,
        "a NAS in the nas table is defined and served"
    );
    assert_eq!(
        accepted_from(topo, REFUSED_IP),
        0,
        "a NAS in no row is refused"
    );
}

#[test]
fn sqlite_directory_reads_freeradius_nas_table() {
    if !require_root("sqlite directory") {
        return;
    }
    let topo = Topology::new();
    let db = std::env::temp_dir().join(format!("rs-nas-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let schema =
        std::fs::read_to_string("/etc/freeradius/3.0/mods-config/sql/main/sqlite/schema.sql")
            .expect("FreeRADIUS's SQLite schema (package freeradius)");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            use sqlx::Connection;
            let mut c = sqlx::SqliteConnection::connect(&url).await.unwrap();
            sqlx::raw_sql(&schema).execute(&mut c).await.unwrap();
            sqlx::raw_sql(NAS_ROWS).execute(&mut c).await.unwrap();
        });
    sql_directory(format!("sqlite://{}", db.display()), &topo);
    let _ = std::fs::remove_file(&db);
}

#[test]
fn postgresql_directory_reads_freeradius_nas_table() {
    if !require_root("postgresql directory") {
        return;
    }
    let topo = Topology::new();
    let pg = Postgres::start(&topo.sidecar, NAS_ROWS);
    sql_directory(pg.url(), &topo);
}

/// While a new NAS's definition takes 300 ms, a known NAS at steady load never waits for it:
/// its slowest answers stay far below the definition's delay.
#[test]
fn a_known_nas_does_not_wait_for_definitions() {
    if !require_root("known NAS during definitions") {
        return;
    }
    let topo = Topology::new();
    let _fr = upstream(&topo);
    let (port, _asked) = directory(&topo.sidecar, Duration::from_millis(300));
    let _d = sidecar_with_config(
        &topo.sidecar,
        "dyn-known",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 2
iface = "sc1"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "198.51.100.0/24"
secret = "known-secret"

[dynamic]
prefixes = ["192.0.2.0/24"]
directory = "http"
url = "http://127.0.0.1:{port}/nas"
"#
        ),
    );
    let known = topo.nas2.run(|| {
        let s = nas_socket(NAS2_V4);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    });
    let newcomers: Vec<UdpSocket> = topo
        .nas1
        .run(|| (0..5).map(|_| nas_socket(NAS1_V4)).collect());
    let to_known = format!("{SIDECAR2_V4}:1812");
    let to_new = format!("{SIDECAR1_V4}:1812");
    let mut latencies = Vec::new();
    let mut buf = [0u8; 4096];
    // 150 requests, one at a time, over ~1.5 s; new NASes keep arriving meanwhile.
    for i in 0..150u32 {
        if i % 30 == 0 {
            let s = &newcomers[(i / 30) as usize % newcomers.len()];
            s.send_to(&access_request(1, NAS_SECRET).0, &to_new)
                .unwrap();
        }
        let (p, a) = pap_request((i % 256) as u8, "alice", "alice-pw", "known-secret", &[]);
        let t = Instant::now();
        known.send_to(&p, &to_known).unwrap();
        let n = known.recv(&mut buf).expect("the known NAS is answered");
        latencies.push(t.elapsed());
        let r = Packet::parse(&buf[..n]).unwrap();
        auth::verify(&r, b"known-secret", Some(&a)).unwrap();
        std::thread::sleep(Duration::from_millis(8));
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100 - 1];
    eprintln!(
        "known NAS during definitions: p50 {:?}, p99 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        p99,
        latencies[latencies.len() - 1]
    );
    assert!(
        p99 < Duration::from_millis(150),
        "p99 {p99:?}: the known NAS waited for a 300 ms definition"
    );
}

/// Over RADIUS/TCP and RADIUS/TLS the dynamic client is the same: the connection of an
/// unknown NAS in the dynamic prefix is accepted, the 50 requests it writes at once wait for
/// the directory (300 ms) and are all answered, once, after one definition.
fn dynamic_nas_over_a_stream(tls: bool) {
    if !require_root("dynamic over tcp/tls") {
        return;
    }
    let topo = Topology::new();
    let _fr = upstream(&topo);
    let (port, asked) = directory(&topo.sidecar, Duration::from_millis(300));
    let pki = std::env::temp_dir().join(format!("rs-dyn-pki-{}", std::process::id()));
    write_test_pki(&pki).unwrap();
    let (listen, tls_section) = if tls {
        (
            "listen_tls = [\"0.0.0.0:2083\"]",
            format!(
                "[tls]\ncertificate = \"{0}/server.pem\"\nkey = \"{0}/server.key\"\nca = \"{0}/ca.pem\"\n",
                pki.display()
            ),
        )
    } else {
        ("listen_tcp = [\"0.0.0.0:1812\"]", String::new())
    };
    let mut daemon = sidecar_with_config(
        &topo.sidecar,
        if tls { "dyn-tls" } else { "dyn-tcp" },
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
{listen}
workers = 1
iface = "none"
ebpf = "off"
metrics = "{METRICS}"

{tls_section}
[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[dynamic]
prefixes = ["192.0.2.0/24"]
directory = "http"
url = "http://127.0.0.1:{port}/nas"
timeout_ms = 3000
"#
        ),
    );
    assert!(daemon.wait_for_log("max_connections", Duration::from_secs(10)));
    let answered = topo.nas1.run(move || {
        let mut c: Box<dyn ReadWrite> = if tls {
            let s = tls_connect(&pki, "nas", &format!("{SIDECAR1_V4}:2083")).unwrap();
            s.sock
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            Box::new(s)
        } else {
            let s = std::net::TcpStream::connect(format!("{SIDECAR1_V4}:1812")).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            Box::new(s)
        };
        let mut sent = HashMap::new();
        let mut all = Vec::new();
        for id in 0..50u8 {
            let (p, a) = access_request(id, NAS_SECRET);
            all.extend_from_slice(&p);
            sent.insert(id, a);
        }
        let t0 = Instant::now();
        c.write_all(&all).unwrap();
        c.flush().unwrap();
        let mut stream = Vec::new();
        let mut answered = HashMap::new();
        let mut buf = [0u8; 4096];
        while t0.elapsed() < Duration::from_secs(5) && answered.len() < 50 {
            if let Ok(n) = c.read(&mut buf) {
                stream.extend_from_slice(&buf[..n]);
            }
            while stream.len() >= 4 {
                let len = usize::from(u16::from_be_bytes([stream[2], stream[3]]));
                if stream.len() < len {
                    break;
                }
                let r = Packet::parse(&stream[..len]).unwrap();
                let req_auth = sent
                    .get(&r.identifier())
                    .expect("a reply to a request sent");
                auth::verify(&r, NAS_SECRET.as_bytes(), Some(req_auth)).unwrap();
                assert_eq!(r.code(), Code::AccessAccept);
                *answered.entry(r.identifier()).or_insert(0usize) += 1;
                stream.drain(..len);
            }
        }
        answered
    });
    assert_eq!(
        answered.len(),
        50,
        "every request written meanwhile was answered"
    );
    assert!(answered.values().all(|&c| c == 1), "each exactly once");
    assert_eq!(
        asked.lock().unwrap().get(NAS1_V4),
        Some(&1),
        "one definition"
    );
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

#[test]
fn a_dynamic_nas_over_tcp_is_served_after_its_definition() {
    dynamic_nas_over_a_stream(false);
}

#[test]
fn a_dynamic_nas_over_tls_is_served_after_its_definition() {
    dynamic_nas_over_a_stream(true);
}
