//! Upgrade under load: 64 NASes (48 configured, 16 dynamic clients from a file directory)
//! at 5 000 requests/s through the sidecar (fast path, guard on `lo`) to a real
//! FreeRADIUS. The binary the daemon runs is replaced on disk by a second copy (as a
//! package upgrade does), and `radius-sidecar upgrade` hands everything to the new process.
//! First an upgrade whose new process cannot start (its file does not check): refused,
//! with file, line and key, and the old process goes on. Then the real one: no request
//! lost (unanswered within 2 s: the generator never retransmits), no flow made again and
//! no dynamic client defined again (the new process's counters say so), p99 around the
//! handover printed. And a daemon killed with SIGKILL: the next start says what it found
//! and serves.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tests::{
    loadgen::{self, LoadSpec},
    *,
};

const NAS_SECRET: &str = "upgrade-nas-secret";
const UP_SECRET: &str = "upgrade-upstream-secret";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
const METRICS: &str = "127.0.0.1:9813";
const FR_PORT: u16 = 13812;

fn config(control: &Path, directory: &Path) -> String {
    config_on(control, directory, true)
}

/// `fast`: the eBPF path (steer, and guard on `lo`); else steering in user space.
fn config_on(control: &Path, directory: &Path, fast: bool) -> String {
    let path = if fast {
        "iface = \"lo\"\nebpf = \"require\""
    } else {
        "ebpf = \"off\""
    };
    format!(
        r#"[server]
listen = ["127.0.0.1:1812"]
workers = 2
{path}
metrics = "{METRICS}"
control = "{}"

[[upstream]]
name = "fr"
auth = "127.0.0.1:{FR_PORT}"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"

[dynamic]
prefixes = ["127.0.3.0/24"]
directory = "file"
file = "{}"
"#,
        control.display(),
        directory.display()
    )
}

/// `radius-sidecar upgrade` from inside `ns`: its success and what it printed.
fn upgrade(ns: &NetNs, bin: &Path, control: &Path) -> (bool, String) {
    let control = control.to_str().expect("utf-8");
    sidecar_cli(ns, bin, &["upgrade", "--control", control])
}

/// Puts a fresh copy of the built binary at `at`, the way dpkg does: written beside it,
/// then renamed over it (the running process keeps the old file).
fn install_copy(at: &Path) {
    let tmp = at.with_extension("new");
    std::fs::copy(sidecar_bin(), &tmp).expect("copy the binary");
    std::fs::rename(&tmp, at).expect("rename it into place");
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn an_upgrade_under_load_loses_nothing_and_makes_no_flow_again() {
    upgrade_under_load("upgrade", true);
}

#[test]
fn on_the_user_space_path_too() {
    upgrade_under_load("upgrade-user", false);
}

fn upgrade_under_load(tag: &str, fast: bool) {
    if !require_root("upgrade under load") {
        return;
    }
    let ns = NetNs::new(tag);
    let dir = std::env::temp_dir().join(format!("rs-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a test folder");
    let (path, control, directory, bin): (PathBuf, PathBuf, PathBuf, PathBuf) = (
        dir.join("sidecar.toml"),
        dir.join("control.sock"),
        dir.join("nas.toml"),
        dir.join("radius-sidecar"),
    );
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, FR_PORT);
    std::fs::write(
        &directory,
        format!("[[client]]\nprefix = \"127.0.3.0/24\"\nsecret = \"{NAS_SECRET}\"\n"),
    )
    .expect("write the directory");
    std::fs::write(&path, config_on(&control, &directory, fast)).expect("write the configuration");
    install_copy(&bin);
    let filter = std::env::var("RADIUS_SIDECAR_FILTER").unwrap_or_else(|_| "info".into());
    let mut d = Daemon::start_binary(
        &bin,
        &ns,
        None,
        &["--config", path.to_str().expect("utf-8")],
        &filter,
    );
    assert!(d.wait_for_log("control socket listening", Duration::from_secs(20)));
    let old_pid = d.child.id() as i32;

    let sources: Vec<IpAddr> = (1..=48)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
        .chain((1..=16).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 3, i))))
        .collect();
    let spec = LoadSpec {
        target: "127.0.0.1:1812".parse().expect("an address"),
        sources,
        sockets_per_source: 1,
        outstanding: 64,
        duration: Duration::from_secs(24),
        max_requests: u64::MAX,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        timeout: Duration::from_secs(2),
        message_authenticator: true,
        rate: Some(5_000.0),
    };
    let started = Instant::now();
    let load = ns.spawn(move || loadgen::run(&spec));
    std::thread::sleep(Duration::from_secs(5));
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(m("radius_flows_created_total"), 64, "one flow per NAS");

    // An upgrade whose new process cannot start: refused, and why; the old one goes on.
    let good = config_on(&control, &directory, fast);
    let broken = format!("{good}\n[[client]]\nprefix = \"not-a-prefix\"\n");
    std::fs::write(&path, &broken).expect("write the configuration");
    let (ok, said) = upgrade(&ns, &bin, &control);
    let line = broken
        .lines()
        .position(|l| l.contains("not-a-prefix"))
        .expect("the line")
        + 1;
    println!("upgrade with a broken file: {}", said.trim());
    assert!(
        !ok,
        "an upgrade to a process that cannot start fails: {said}"
    );
    assert!(
        said.contains(&format!("sidecar.toml:{line}: client.prefix")),
        "the error names file, line and key: {said}"
    );
    assert!(pid_alive(old_pid), "the old process goes on");
    // The new file asks for one worker: the running process's two (their wildcards, and
    // the flows on each) are kept until a restart.
    std::fs::write(&path, good.replace("workers = 2", "workers = 1"))
        .expect("write the configuration");
    std::thread::sleep(Duration::from_secs(3));

    // The real one, to a second copy of the binary.
    install_copy(&bin);
    let at = started.elapsed();
    let (ok, said) = upgrade(&ns, &bin, &control);
    println!("upgrade: {}", said.trim());
    assert!(ok, "the upgrade: {said}\n{}", d.log());
    assert!(said.contains("took over 64 flow(s)"), "{said}");
    assert!(
        d.wait_for_log("worker count is kept", Duration::from_secs(5)),
        "{}",
        d.log()
    );
    let new_pid = upgraded_pid(&said);
    // Not our child: stopped however the test ends, so no later test finds its programs.
    let _stop_new = StopOnDrop(new_pid);
    let exe = std::fs::read_link(format!("/proc/{new_pid}/exe")).expect("the new process's exe");
    assert_eq!(exe, bin, "the new process runs the second copy");
    assert!(
        d.stop(0, Duration::from_secs(10)).is_some(),
        "the old process exits once its requests in flight are answered"
    );

    let r = load
        .join()
        .expect("the load generator")
        .expect("the load ran");
    // The seconds around the handover.
    let second = at.as_secs() as usize;
    let around: Vec<String> = r
        .per_second_latency
        .iter()
        .enumerate()
        .skip(second.saturating_sub(1))
        .take(4)
        .map(|(s, (p50, p99))| {
            format!(
                "second {s}: p50 {:.2} ms, p99 {:.2} ms",
                *p50 as f64 / 1000.0,
                *p99 as f64 / 1000.0
            )
        })
        .collect();
    let worst_p99 = r
        .per_second_latency
        .iter()
        .skip(second.saturating_sub(1))
        .take(4)
        .map(|(_, p99)| *p99)
        .max()
        .unwrap_or(0);
    println!(
        "upgrade under load: {}; around the handover (at {:.1} s): {}",
        r.summary(),
        at.as_secs_f64(),
        around.join("; ")
    );
    // The new process's own counters (the metrics endpoint went over with the rest).
    let created = m("radius_flows_created_total");
    let adopted = m("radius_flows_adopted_total");
    let defined = m("radius_dynamic_definitions_total{reason=\"defined\"}");
    println!("new process: flows created {created}, adopted {adopted}, definitions {defined}");
    // SAFETY: plain kill(2) of the process the test started through the old one.
    unsafe { libc::kill(new_pid, libc::SIGTERM) };
    assert_eq!(r.lost, 0, "no request lost across the upgrade");
    assert_eq!(r.bad, 0, "every reply verified");
    assert!(r.rate() > 4_000.0, "the load held: {:.0} req/s", r.rate());
    assert_eq!(adopted, 64, "every flow taken over with its socket");
    assert_eq!(created, 0, "no flow made again");
    assert_eq!(defined, 0, "no dynamic client defined again");
    assert!(
        worst_p99 < 500_000,
        "p99 around the handover stays well under the NAS's timeout: {worst_p99} us"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(new_pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !d.log().contains(NAS_SECRET) && !d.log().contains(UP_SECRET),
        "no secret in the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_a_kill_the_next_start_says_what_it_found_and_serves() {
    if !require_root("restart after SIGKILL") {
        return;
    }
    let ns = NetNs::new("killed");
    let dir = std::env::temp_dir().join(format!("rs-killed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a test folder");
    let (path, control, directory) = (
        dir.join("sidecar.toml"),
        dir.join("control.sock"),
        dir.join("nas.toml"),
    );
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, FR_PORT);
    std::fs::write(&directory, "").expect("write the directory");
    std::fs::write(&path, config(&control, &directory)).expect("write the configuration");
    let args = ["--config", path.to_str().expect("utf-8")];
    let ask = |ns: &NetNs| {
        ns.run(|| {
            pap_accepted(
                "127.0.2.1",
                ("127.0.0.1", 1812),
                NAS_SECRET,
                Duration::from_secs(2),
            )
        })
    };
    let mut d = Daemon::start(&ns, None, &args);
    assert!(d.wait_for_log("control socket listening", Duration::from_secs(20)));
    assert!(ask(&ns), "served before the kill");
    assert!(d.stop(libc::SIGKILL, Duration::from_secs(5)).is_some());
    assert!(
        control.exists(),
        "a killed process leaves its control socket"
    );

    let mut d = Daemon::start(&ns, None, &args);
    assert!(
        d.wait_for_log("control socket listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    assert!(
        d.log().contains("did not stop cleanly"),
        "the start says what it found: {}",
        d.log()
    );
    assert!(ask(&ns), "served after the restart");
    assert!(d.log().contains("fast path on"), "{}", d.log());
    let _ = std::fs::remove_dir_all(&dir);
}
