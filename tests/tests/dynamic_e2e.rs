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

use radius_sidecar::codec::{
    Code, Packet, PacketMut, attr,
    auth::{self, random_authenticator},
    hide,
};
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
    let config = std::env::temp_dir().join(format!(
        "rs-dyn-{}-{}.toml",
        std::process::id(),
        u8::from(fast)
    ));
    std::fs::write(
        &config,
        format!(
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
directory = "http"
url = "http://127.0.0.1:{directory_port}/nas"
timeout_ms = 3000
nak_lifetime = 30
"#,
            if fast { "require" } else { "off" }
        ),
    )
    .unwrap();
    let mut d = Daemon::start(&topo.sidecar, None, &["--config", config.to_str().unwrap()]);
    assert!(d.wait_for_log("listening", Duration::from_secs(20)));
    d
}

fn access_request(id: u8, secret: &str) -> (Vec<u8>, [u8; 16]) {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).unwrap();
    let a = random_authenticator();
    p.set_authenticator(&a);
    p.message_authenticator_first().unwrap();
    p.push(attr::USER_NAME, b"alice").unwrap();
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(b"alice-pw", secret.as_bytes(), &a, &mut h).unwrap();
    p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
    p.sign(secret.as_bytes(), None).unwrap();
    (p.as_bytes().to_vec(), a)
}

fn setup_window(fast: bool) {
    if !require_root("dynamic setup window") {
        return;
    }
    let topo = Topology::new();
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        "alice\tCleartext-Password := \"alice-pw\"\n",
        11812,
    );
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
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        "alice\tCleartext-Password := \"alice-pw\"\n",
        11812,
    );
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
