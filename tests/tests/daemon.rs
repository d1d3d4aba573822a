//! The `radius-sidecar` binary: it starts with both programs attached, serves flows, and
//! leaves nothing attached after SIGTERM/SIGINT; without CAP_BPF it says why and serves on
//! the user-space path; `--require-ebpf` makes that a startup error; `--max-flows` is
//! enforced and counted. Run as root; each test builds its own namespaces.

use std::{net::SocketAddr, time::Duration};

use tests::*;

const METRICS: &str = "127.0.0.1:9812";

/// A configuration whose client covers NAS1's network; its upstream is not there (these
/// tests look at flows, not answers).
fn config_file() -> String {
    let path = std::env::temp_dir().join(format!("rs-daemon-test-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "[[upstream]]\nname = \"none\"\nauth = \"127.0.0.1:11812\"\nsecret = \"up\"\n\n\
         [[client]]\nprefix = \"192.0.2.0/24\"\nsecret = \"nas\"\n",
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn args(extra: &[&'static str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--config".into(), config_file()];
    v.extend(
        [
            "--listen",
            "0.0.0.0:1812",
            "--workers",
            "2",
            "--metrics",
            METRICS,
            "--iface",
            "sc1",
        ]
        .map(String::from),
    );
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// An Accounting-Request signed with the client's secret: it proves its source, so each
/// flow is a proved one (unsigned junk makes no flow at all).
fn accounting(flow: usize, seq: u32) -> Vec<u8> {
    use radius_sidecar::codec::{Code, PacketMut, attr};
    let mut buf = [0u8; 256];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, seq as u8).unwrap();
    p.push(attr::ACCT_STATUS_TYPE, &3u32.to_be_bytes()).unwrap();
    p.push(attr::ACCT_SESSION_ID, format!("{flow}-{seq}").as_bytes())
        .unwrap();
    p.sign(b"nas", None).unwrap();
    p.as_bytes().to_vec()
}

/// Sends `per_flow` packets from each of `flows` NAS sockets (one address, many ports: NAT).
fn send_flows(topo: &Topology, flows: usize, per_flow: u32) {
    let to: SocketAddr = format!("{SIDECAR1_V4}:1812").parse().unwrap();
    topo.nas1.run(move || {
        let socks: Vec<_> = (0..flows).map(|_| nas_socket(NAS1_V4)).collect();
        for seq in 0..per_flow {
            for (i, s) in socks.iter().enumerate() {
                s.send_to(&accounting(i, seq), to).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
}

fn wait_metric(topo: &Topology, sample: &str, want: u64) -> u64 {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(&topo.sidecar, METRICS, sample);
        if v >= want || std::time::Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn runs_attached_and_detaches_on(signal: i32) {
    if !require_root("daemon attach/detach") {
        return;
    }
    let topo = Topology::new();
    let mut d = Daemon::start(&topo.sidecar, None, &args(&["--require-ebpf"]));
    assert!(
        d.wait_for_log("guard on sc1", Duration::from_secs(20)),
        "the daemon says both programs are attached"
    );
    assert!(program_loaded("steer") && program_loaded("guard"));
    send_flows(&topo, 5, 20);
    assert_eq!(wait_metric(&topo, "radius_flows_created_total", 5), 5);
    let total = wait_metric(&topo, "radius_packets_total{via=\"Child\"}", 1)
        + metric(
            &topo.sidecar,
            METRICS,
            "radius_packets_total{via=\"Wildcard\"}",
        );
    assert_eq!(total, 100, "every packet of every flow reached its flow");
    assert!(
        metric(
            &topo.sidecar,
            METRICS,
            "radius_packets_total{via=\"Child\"}"
        ) >= 80,
        "after the first packets, the children take the flows"
    );
    assert!(
        wait_metric(
            &topo,
            "radius_fastpath_events_total{event=\"guard_pass_flow\"}",
            1
        ) > 0,
        "guard counts known flows"
    );
    let status = d
        .stop(signal, Duration::from_secs(10))
        .expect("the daemon stops");
    assert!(status.success(), "clean exit, got {status:?}");
    assert!(d.log().contains("eBPF programs detached"));
    assert!(
        !program_loaded("steer") && !program_loaded("guard") && !program_loaded("guard_tc"),
        "no program left behind"
    );
}

#[test]
fn daemon_attaches_both_programs_serves_and_detaches_on_sigterm() {
    runs_attached_and_detaches_on(libc::SIGTERM);
}

#[test]
fn daemon_detaches_on_sigint() {
    runs_attached_and_detaches_on(libc::SIGINT);
}

#[test]
fn without_cap_bpf_the_daemon_says_why_and_serves_in_user_space() {
    if !require_root("daemon fallback") {
        return;
    }
    let topo = Topology::new();
    let mut d = Daemon::start(&topo.sidecar, Some("65534"), &args(&[]));
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "the daemon starts"
    );
    let log = d.log();
    assert!(
        log.contains("fast path unavailable") && log.contains("missing privileges"),
        "one line says the fast path is off because of privileges: {log}"
    );
    send_flows(&topo, 4, 10);
    assert_eq!(wait_metric(&topo, "radius_flows_created_total", 4), 4);
    let total = wait_metric(&topo, "radius_packets_total{via=\"Child\"}", 1)
        + metric(
            &topo.sidecar,
            METRICS,
            "radius_packets_total{via=\"Wildcard\"}",
        );
    assert_eq!(total, 40, "every packet of every flow reached its flow");
    assert_eq!(metric(&topo.sidecar, METRICS, "radius_fast_path"), 0);
    let status = d
        .stop(libc::SIGTERM, Duration::from_secs(10))
        .expect("stops");
    assert!(status.success());
}

#[test]
fn require_ebpf_without_privileges_is_a_startup_error() {
    if !require_root("daemon require-ebpf") {
        return;
    }
    let topo = Topology::new();
    let mut d = Daemon::start(&topo.sidecar, Some("65534"), &args(&["--require-ebpf"]));
    let status = d
        .stop(0, Duration::from_secs(20))
        .expect("the daemon exits by itself");
    assert!(!status.success());
    assert!(
        d.log().contains("--require-ebpf") && d.log().contains("missing privileges"),
        "the error names the cause: {}",
        d.log()
    );
}

#[test]
fn max_flows_is_enforced_and_counted() {
    if !require_root("daemon max-flows") {
        return;
    }
    let topo = Topology::new();
    let mut d = Daemon::start(&topo.sidecar, None, &args(&["--max-flows", "3"]));
    assert!(d.wait_for_log("listening", Duration::from_secs(20)));
    send_flows(&topo, 6, 2);
    assert_eq!(wait_metric(&topo, "radius_flows_created_total", 3), 3);
    assert_eq!(
        wait_metric(&topo, "radius_refused_total{reason=\"MaxFlows\"}", 6),
        6,
        "both packets of the 3 flows over the limit are refused and counted"
    );
    assert_eq!(metric(&topo.sidecar, METRICS, "radius_max_flows"), 3);
    // Nothing listens where the upstream should be: the sidecar says so plainly.
    assert!(
        d.wait_for_log(
            "upstream did not answer Status-Server",
            Duration::from_secs(5)
        ),
        "{}",
        d.log()
    );
    let status = d
        .stop(libc::SIGTERM, Duration::from_secs(10))
        .expect("stops");
    assert!(status.success());
}
