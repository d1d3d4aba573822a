//! Reload under load: 64 NASes (the load generator, 127.0.2.x) at 5 000 requests/s through
//! the sidecar (fast path) to real FreeRADIUS servers, while the configuration is reloaded
//! 20 times with `radius-sidecar reload`: a client added (served at once) and removed (no
//! longer served), a pool member added and removed, an upstream's secret changed (its
//! FreeRADIUS restarted with the new one), and a broken file (refused, named, nothing
//! changed). No request may be lost (unanswered within 2 s: the generator never
//! retransmits), and the NASes' flows are never made again. `radius-sidecar status` then
//! says what the daemon holds, under the same load.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tests::{
    loadgen::{self, LoadSpec},
    *,
};

const NAS_SECRET: &str = "reload-nas-secret";
const SECRET_1: &str = "reload-upstream-secret";
const SECRET_2: &str = "reload-upstream-rotated";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
const METRICS: &str = "127.0.0.1:9812";
const FR1_PORT: u16 = 11812;
const FR2_PORT: u16 = 12812;

/// The configuration of step `i`: `late` adds the client 127.0.3.0/24, `fr2` adds the
/// second server (with `fr2_secret`) to the NASes' pool.
fn config(control: &Path, late: bool, fr2: Option<&str>) -> String {
    let mut c = format!(
        r#"[server]
listen = ["127.0.0.1:1812"]
workers = 2
iface = "lo"
ebpf = "require"
metrics = "{METRICS}"
control = "{}"

[[upstream]]
name = "fr1"
auth = "127.0.0.1:{FR1_PORT}"
secret = "{SECRET_1}"
"#,
        control.display()
    );
    let members = match fr2 {
        Some(secret) => {
            c.push_str(&format!(
                "\n[[upstream]]\nname = \"fr2\"\nauth = \"127.0.0.1:{FR2_PORT}\"\nsecret = \"{secret}\"\n"
            ));
            r#"["fr1", "fr2"]"#
        }
        None => r#"["fr1"]"#,
    };
    c.push_str(&format!(
        r#"
[[pool]]
name = "aaa"
upstreams = {members}
policy = "load-balance"

[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"
upstream = "aaa"
"#
    ));
    if late {
        c.push_str(&format!(
            "\n[[client]]\nprefix = \"127.0.3.0/24\"\nname = \"late\"\nsecret = \"{NAS_SECRET}\"\nupstream = \"aaa\"\n"
        ));
    }
    c
}

/// `radius-sidecar reload` from inside `ns`: its success and what it printed.
fn reload(ns: &NetNs, control: &Path) -> (bool, String) {
    let control = control.to_str().expect("utf-8");
    sidecar_cli(ns, &sidecar_bin(), &["reload", "--control", control])
}

/// One request from 127.0.3.1: whether an Access-Accept came back within `patience`.
fn late_nas_served(ns: &NetNs, patience: Duration) -> bool {
    ns.run(move || pap_accepted("127.0.3.1", ("127.0.0.1", 1812), NAS_SECRET, patience))
}

#[test]
fn twenty_reloads_under_load_lose_nothing_and_make_no_flow_again() {
    if !require_root("reload under load") {
        return;
    }
    let ns = NetNs::new("reload");
    let dir = std::env::temp_dir().join(format!("rs-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a test folder");
    let (path, control): (PathBuf, PathBuf) = (dir.join("sidecar.toml"), dir.join("control.sock"));
    let _fr1 = FreeRadius::start_on(&ns, &[("127.0.0.1", SECRET_1)], USERS, FR1_PORT);
    let mut fr2 = FreeRadius::start_on(&ns, &[("127.0.0.1", SECRET_1)], USERS, FR2_PORT);
    std::fs::write(&path, config(&control, false, None)).expect("write the configuration");
    let mut d = Daemon::start(&ns, None, &["--config", path.to_str().expect("utf-8")]);
    assert!(d.wait_for_log("control socket listening", Duration::from_secs(20)));

    let sources: Vec<IpAddr> = (1..=64)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
        .collect();
    let spec = LoadSpec {
        target: "127.0.0.1:1812".parse().expect("an address"),
        sources,
        sockets_per_source: 1,
        outstanding: 64,
        duration: Duration::from_secs(40),
        max_requests: u64::MAX,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        timeout: Duration::from_secs(2),
        message_authenticator: true,
        rate: Some(5_000.0),
    };
    let load = ns.spawn(move || loadgen::run(&spec));
    std::thread::sleep(Duration::from_secs(2));

    let mut fr2_secret = SECRET_1;
    let (mut late_served, mut broken_refused) = (0, 0);
    let started = Instant::now();
    for i in 0..20 {
        let step = i % 5;
        let text = match step {
            // A client added: served at once.
            0 => config(&control, true, None),
            // Removed again: no longer served.
            1 => config(&control, false, None),
            // A pool member added; halfway, with its secret changed (its FreeRADIUS
            // restarted with the new one first).
            2 => {
                if i == 12 {
                    drop(fr2);
                    fr2 = FreeRadius::start_on(&ns, &[("127.0.0.1", SECRET_2)], USERS, FR2_PORT);
                    fr2_secret = SECRET_2;
                }
                config(&control, false, Some(fr2_secret))
            }
            3 => config(&control, false, None),
            // A broken file: refused, says where, changes nothing.
            _ => format!(
                "{}\n[[client]]\nprefix = \"not-a-prefix\"\n",
                config(&control, true, None)
            ),
        };
        std::fs::write(&path, &text).expect("write the configuration");
        let (ok, said) = reload(&ns, &control);
        match step {
            4 => {
                assert!(!ok, "a broken file is refused: {said}");
                let line = text
                    .lines()
                    .position(|l| l.contains("not-a-prefix"))
                    .expect("the line")
                    + 1;
                assert!(
                    said.contains(&format!("sidecar.toml:{line}: client.prefix")),
                    "the error names file, line and key: {said}"
                );
                assert!(
                    !late_nas_served(&ns, Duration::from_millis(500)),
                    "the broken file's client was not added"
                );
                broken_refused += 1;
            }
            0 => {
                assert!(ok, "reload {i}: {said}");
                assert!(
                    late_nas_served(&ns, Duration::from_secs(1)),
                    "a client added by a reload is served at once ({said})"
                );
                late_served += 1;
            }
            1 => {
                assert!(ok, "reload {i}: {said}");
                assert!(
                    !late_nas_served(&ns, Duration::from_millis(500)),
                    "a removed client is no longer served"
                );
            }
            _ => assert!(ok, "reload {i}: {said}"),
        }
        println!("reload {i:2} (step {step}): {}", said.trim());
        std::thread::sleep(Duration::from_millis(800));
    }
    let reloading = started.elapsed();
    // What the daemon says it holds, under the same load.
    let status = |json: bool| {
        let mut args = vec!["status", "--control", control.to_str().expect("utf-8")];
        if json {
            args.push("--json");
        }
        let out = ns
            .command(sidecar_bin().to_str().expect("utf-8"))
            .args(&args)
            .output()
            .expect("radius-sidecar status");
        assert!(out.status.success(), "status: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = status(false);
    println!("{text}");
    assert!(
        text.contains("path: fast") && text.contains("nases: 64 / 0 /"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&status(true)).expect("status --json");
    assert_eq!(v["flows"]["nases"]["proved"], 64, "{v}");
    assert_eq!(v["fast_path"]["steer_attached"], true, "{v}");
    assert_eq!(v["fast_path"]["registered_flows"], 64, "{v}");
    // Loopback has no native XDP: guard takes TC ingress, never generic XDP.
    assert_eq!(v["fast_path"]["guard"], "lo (tc)", "{v}");
    assert_eq!(v["workers_silent"], 0, "{v}");
    let fr1 = v["upstreams"]
        .as_array()
        .and_then(|a| a.iter().find(|u| u["name"] == "fr1"))
        .expect("fr1 in the status");
    assert_eq!(fr1["state"], "alive", "{v}");
    let r = load
        .join()
        .expect("the load generator")
        .expect("the load ran");
    println!(
        "reload under load: {}; 20 reloads in {:.1} s",
        r.summary(),
        reloading.as_secs_f64()
    );
    assert_eq!(r.lost, 0, "no request lost across the reloads");
    assert_eq!(r.bad, 0, "every reply verified");
    assert!(r.rate() > 4_000.0, "the load held: {:.0} req/s", r.rate());
    let m = |s: &str| metric(&ns, METRICS, s);
    assert_eq!(m("radius_reloads_total{result=\"ok\"}"), 16);
    assert_eq!(m("radius_reloads_total{result=\"failed\"}"), broken_refused);
    assert_eq!(
        m("radius_flows_created_total"),
        64 + late_served,
        "the NASes' flows were never made again (one flow each, plus the late NAS's)"
    );
    assert!(
        !d.log().contains(SECRET_2) && !d.log().contains(SECRET_1),
        "no secret in the log"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
