//! The daemon's two HTTP sides against real peers: a real Prometheus (Debian's package)
//! scrapes the metrics endpoint (target up, the flow and request series there), and an
//! HTTPS directory with a test CA, answering with chunked bodies over kept-alive
//! connections, defines dynamic clients that FreeRADIUS then serves.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tests::*;

const NAS_SECRET: &str = "http-nas-secret";
const UP_SECRET: &str = "http-upstream-secret";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
const FR_PORT: u16 = 14812;

/// `GET path` on `addr` (HTTP/1.0, to the close): the body.
fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut c) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(c, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default()
}

fn served(ns: &NetNs, from: &'static str) -> bool {
    ns.run(move || {
        pap_accepted(
            from,
            ("127.0.0.1", 1812),
            NAS_SECRET,
            Duration::from_secs(3),
        )
    })
}

#[test]
fn a_real_prometheus_scrapes_the_metrics_endpoint() {
    if !require_root("Prometheus scrape") {
        return;
    }
    let ns = NetNs::new("prom");
    let dir = std::env::temp_dir().join(format!("rs-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a test folder");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, FR_PORT);
    let mut d = sidecar_with_config(
        &ns,
        "prom",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 1
metrics = "127.0.0.1:9814"

[[upstream]]
name = "fr"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"
"#
        ),
    );
    assert!(d.wait_for_log("metrics endpoint listening", Duration::from_secs(20)));
    assert!(served(&ns, "127.0.2.1"), "{}", d.log());
    std::fs::write(
        dir.join("prometheus.yml"),
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: sidecar\n    \
         static_configs:\n      - targets: ['127.0.0.1:9814']\n",
    )
    .expect("write prometheus.yml");
    let mut prom = ns
        .command("prometheus")
        .args([
            &format!("--config.file={}", dir.join("prometheus.yml").display()),
            &format!("--storage.tsdb.path={}", dir.join("data").display()),
            "--web.listen-address=127.0.0.1:19090",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start prometheus (Debian's `prometheus` package)");
    let query = |q: &str| {
        let path = format!("/api/v1/query?query={q}");
        ns.run(move || http_get("127.0.0.1:19090", &path))
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut up, mut latency) = (String::new(), String::new());
    while Instant::now() < deadline {
        up = query("up");
        // The workers hand their timings over once a second.
        latency = query("radius_upstream_latency_seconds_count");
        if up.contains(r#""job":"sidecar""#)
            && up.contains(r#""1"]"#)
            && latency.contains(r#""1"]"#)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let flows = query("radius_flows_created_total");
    let forwarded = query("radius_forwarded_total");
    let targets = query("scrape_samples_scraped");
    let _ = prom.kill();
    let _ = prom.wait();
    println!(
        "up: {up}\nflows: {flows}\nforwarded: {forwarded}\nlatency: {latency}\nsamples: {targets}"
    );
    assert!(
        latency.contains(r#""upstream":"fr""#) && latency.contains(r#""1"]"#),
        "the answer's latency, under its upstream: {latency}"
    );
    assert!(up.contains(r#""1"]"#), "the target is up: {up}");
    assert!(
        flows.contains(r#""1"]"#),
        "one flow created, as Prometheus stored it: {flows}"
    );
    assert!(
        forwarded.contains(r#""1"]"#),
        "one request forwarded: {forwarded}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory over HTTPS: answers `GET /nas?address=IP` with a definition for 127.0.3.1
/// and 127.0.3.2 (chunked, in pieces) and 404 for anyone else; keeps connections alive.
/// Counts the connections it accepted and the requests it answered.
#[expect(
    deprecated,
    reason = "ring, as the daemon uses (no post-quantum key exchange)"
)]
fn https_directory(
    listener: std::net::TcpListener,
    pki: &Path,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.join("server.pem"))
        .expect("server.pem")
        .map(|c| c.expect("a certificate"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(pki.join("server.key")).expect("server.key");
    let config = Arc::new(
        rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("the server certificate"),
    );
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(sock) = conn else { break };
            connections.fetch_add(1, Ordering::SeqCst);
            let tls = rustls::ServerConnection::new(config.clone()).expect("a TLS session");
            let requests = requests.clone();
            std::thread::spawn(move || {
                let mut stream = BufReader::new(rustls::StreamOwned::new(tls, sock));
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    // The rest of the head.
                    loop {
                        let mut h = String::new();
                        if stream.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    requests.fetch_add(1, Ordering::SeqCst);
                    let known = ["address=127.0.3.1 ", "address=127.0.3.2 "]
                        .iter()
                        .any(|a| line.contains(a));
                    let w = stream.get_mut();
                    if known {
                        let body = format!(r#"{{"secret": "{NAS_SECRET}", "name": "dyn"}}"#);
                        let (a, b) = body.split_at(10);
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                            a.len(),
                            b.len()
                        );
                    } else {
                        let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    }
                    let _ = w.flush();
                }
            });
        }
    });
}

#[test]
fn an_https_directory_with_chunked_answers_defines_clients() {
    if !require_root("HTTPS directory") {
        return;
    }
    let ns = NetNs::new("https-dir");
    let dir = std::env::temp_dir().join(format!("rs-https-dir-{}", std::process::id()));
    write_test_pki(&dir).expect("test PKI");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, FR_PORT);
    let listener = ns.run(|| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
    let port = listener.local_addr().expect("port").port();
    let (connections, requests) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    https_directory(listener, &dir, connections.clone(), requests.clone());
    let mut d = sidecar_with_config(
        &ns,
        "https-dir",
        &format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 1

[[upstream]]
name = "fr"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[dynamic]
prefixes = ["127.0.3.0/24"]
directory = "http"
url = "https://127.0.0.1:{port}/nas"
ca = "{}"
"#,
            dir.join("ca.pem").display()
        ),
    );
    assert!(d.wait_for_log("listening", Duration::from_secs(20)));
    assert!(served(&ns, "127.0.3.1"), "defined over HTTPS: {}", d.log());
    assert!(served(&ns, "127.0.3.2"), "and another: {}", d.log());
    assert!(!served(&ns, "127.0.3.3"), "a 404 is a refusal: {}", d.log());
    assert!(d.log().contains("dynamic client refused"), "{}", d.log());
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "one question per source"
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "the three questions went over one kept-alive connection"
    );
    assert!(!d.log().contains(NAS_SECRET), "no secret in the log");
    let _ = std::fs::remove_dir_all(&dir);
}
