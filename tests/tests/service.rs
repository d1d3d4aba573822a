//! The systemd unit (`packaging/radius-sidecar.service`): `systemd-analyze verify` accepts
//! it, and the daemon started the way the unit starts it (its user, exactly its
//! capabilities, `NOTIFY_SOCKET` and `WATCHDOG_USEC` as systemd sets them) attaches the
//! fast path, says READY=1 once it listens, pings the watchdog, serves a request on port
//! 1812, and says STOPPING=1 at SIGTERM.

use std::{
    os::unix::net::UnixDatagram,
    time::{Duration, Instant},
};

use tests::*;

const UNIT: &str = include_str!("../../packaging/radius-sidecar.service");
const NAS_SECRET: &str = "service-nas-secret";
const UP_SECRET: &str = "service-upstream-secret";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";

/// The values of `key=` in the unit, space-separated words of every such line.
fn unit_values(key: &str) -> Vec<String> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let dir = std::env::temp_dir().join(format!("rs-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder");
    // The unit names the installed binary; here it is this build's.
    let unit = UNIT.replace(
        "/usr/bin/radius-sidecar",
        sidecar_bin().to_str().expect("utf-8"),
    );
    let path = dir.join("radius-sidecar.service");
    std::fs::write(&path, unit).expect("write the unit");
    // The man page it names comes with the package, not with this build.
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (package systemd)");
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("radius-sidecar"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify: {said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn started_as_the_unit_starts_it_the_daemon_attaches_the_fast_path_and_serves() {
    if !require_root("the daemon as the unit starts it") {
        return;
    }
    let user = unit_values("User").pop().expect("User= in the unit");
    assert_eq!(unit_values("Group"), vec![user.clone()]);
    // As the package's postinst makes it.
    if !std::process::Command::new("id")
        .arg(&user)
        .output()
        .is_ok_and(|o| o.status.success())
    {
        sh(&[
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &user,
        ]);
    }
    let caps: Vec<String> = unit_values("AmbientCapabilities")
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    assert_eq!(
        unit_values("CapabilityBoundingSet"),
        unit_values("AmbientCapabilities")
    );
    let caps = format!("-all,{}", caps.join(","));

    let ns = NetNs::new("service");
    let _fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    // RuntimeDirectory=: a folder only the service user may write, for the control socket.
    let dir = std::env::temp_dir().join(format!("rs-service-{}", std::process::id()));
    let run = dir.join("run");
    std::fs::create_dir_all(&run).expect("a folder");
    sh(&[
        "chown",
        &format!("{user}:{user}"),
        run.to_str().expect("utf-8"),
    ]);
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            r#"[server]
listen = ["127.0.0.1:1812"]
workers = 2
iface = "lo"
ebpf = "require"
metrics = "none"
control = "{}/control.sock"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UP_SECRET}"

[[client]]
prefix = "127.0.2.0/24"
secret = "{NAS_SECRET}"
"#,
            run.display()
        ),
    )
    .expect("write the configuration");
    sh(&["chmod", "0755", dir.to_str().expect("utf-8")]);
    sh(&["chmod", "0644", config.to_str().expect("utf-8")]);
    // systemd's notify socket: the service user must be able to send to it.
    let notify_path = dir.join("notify");
    let notify = UnixDatagram::bind(&notify_path).expect("the notify socket");
    sh(&["chmod", "0666", notify_path.to_str().expect("utf-8")]);
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("a timeout");

    // WATCHDOG_PID is the service's main process: the shell execs into setpriv, which
    // execs into the daemon, all one pid.
    let mut cmd = ns.command("sh");
    cmd.arg("-c")
        .arg(format!(
            "WATCHDOG_PID=$$ exec setpriv --reuid={user} --regid={user} --clear-groups \
             --inh-caps={caps} --ambient-caps={caps} --bounding-set={caps} --no-new-privs \
             {bin} --config {config}",
            bin = sidecar_bin().display(),
            config = config.display(),
        ))
        .env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify_path)
        .env("WATCHDOG_USEC", "1500000")
        .env("WATCHDOG_PID", "0");
    let started = Instant::now();
    let mut d = Daemon::spawn(cmd);

    let mut heard = Vec::<String>::new();
    let listen = |heard: &mut Vec<String>, want: &str, within: Duration| {
        let t = Instant::now();
        while t.elapsed() < within {
            if heard.iter().any(|m| m.lines().any(|l| l == want)) {
                return true;
            }
            let mut b = [0u8; 1024];
            if let Ok(n) = notify.recv(&mut b) {
                heard.push(String::from_utf8_lossy(&b[..n]).into_owned());
            }
        }
        false
    };
    assert!(
        listen(&mut heard, "READY=1", Duration::from_secs(20)),
        "READY=1 sent: {heard:?}\n{}",
        d.log()
    );
    let ready_after = started.elapsed();
    let log = d.log();
    assert!(
        log.contains("listening") && log.contains("fast path on"),
        "ready only once it listens, with the fast path attached: {log}"
    );
    assert!(
        log.contains("control socket listening"),
        "the control socket in the runtime folder: {log}"
    );
    heard.clear();
    assert!(
        listen(&mut heard, "WATCHDOG=1", Duration::from_secs(2)),
        "the watchdog pinged within its period: {heard:?}"
    );

    let served = ns.run(|| {
        pap_accepted(
            "127.0.2.9",
            ("127.0.0.1", 1812),
            NAS_SECRET,
            Duration::from_secs(3),
        )
    });
    assert!(served, "an Access-Request served: {}", d.log());
    println!(
        "as the unit starts it ({user}, {caps}): READY=1 after {:.2} s, fast path on, \
         watchdog pinged, request served",
        ready_after.as_secs_f64()
    );

    heard.clear();
    d.stop(libc::SIGTERM, Duration::from_secs(10));
    assert!(
        listen(&mut heard, "STOPPING=1", Duration::from_secs(1)),
        "STOPPING=1 at SIGTERM: {heard:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_are_one_object_per_line_with_their_fields() {
    let dir = std::env::temp_dir().join(format!("rs-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a folder");
    let config = dir.join("sidecar.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = [\"127.0.0.1:0\"]\nebpf = \"off\"\nmetrics = \"none\"\n\
         control = \"none\"\n\n[[upstream]]\nname = \"aaa\"\nauth = \"127.0.0.1:11812\"\n\
         secret = \"json-upstream-secret\"\n\n[[client]]\nprefix = \"127.0.0.0/8\"\n\
         secret = \"json-nas-secret\"\n",
    )
    .expect("write the configuration");
    let mut child = std::process::Command::new(sidecar_bin())
        .args(["--log-format", "json", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the daemon");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut lines = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(20)
        && !lines.iter().any(|l: &String| l.contains("listening"))
    {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut err, &mut l).unwrap_or(0) == 0 {
            break;
        }
        lines.push(l);
    }
    // SAFETY: a child of ours.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(lines.iter().any(|l| l.contains("listening")), "{lines:?}");
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
        assert!(!l.contains("json-upstream-secret") && !l.contains("json-nas-secret"));
    }
    let loaded = lines
        .iter()
        .find(|l| l.contains("configuration loaded"))
        .expect("the configuration line");
    let v: serde_json::Value = serde_json::from_str(loaded).expect("json");
    assert_eq!(v["fields"]["clients"], 1, "fields stay fields: {loaded}");
}
