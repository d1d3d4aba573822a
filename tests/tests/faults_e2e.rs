//! Faults, each in network namespaces the test makes and bounded in time, with the sidecar
//! on its defaults for upstreams and directories: an upstream frozen (SIGSTOP) for 10 s,
//! one that answers slowly (200 ms), 5 % loss on an upstream's link, the upstream's link
//! down and up again, and the PostgreSQL directory stopped and started again. Each asserts
//! what a user relies on (answers where a healthy server exists, failover within about a
//! second, retries that save what they can, bounded waits for new NASes, recovery without a
//! restart) and prints what it measured; BENCHMARKS.md quotes those lines.
//!
//! The scene: the sidecar and the NASes (the load generator, 127.0.2.x) share a namespace
//! with a healthy FreeRADIUS `fr2` on loopback; FreeRADIUS `fr1` sits in a namespace of its
//! own behind a veth link (10.77.0.1 on the sidecar's side, 10.77.0.2 on its own), so that
//! its link can lose packets or go down.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use radius_sidecar::codec::{Code, Packet, auth};
use tests::{
    loadgen::{self, LoadResult, LoadSpec},
    *,
};

const NAS_SECRET: &str = "faults-nas-secret";
const UP_SECRET: &str = "faults-upstream-secret";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
const METRICS: &str = "127.0.0.1:9812";
const FR1: &str = "10.77.0.2";
const FR1_PORT: u16 = 11812;
const FR2_PORT: u16 = 12812;

/// `fr1` first, `fr2` when it is not alive; both on every default.
const POOL: &str = r#"
[[upstream]]
name = "fr1"
auth = "10.77.0.2:11812"
secret = "faults-upstream-secret"

[[upstream]]
name = "fr2"
auth = "127.0.0.1:12812"
secret = "faults-upstream-secret"

[[pool]]
name = "aaa"
upstreams = ["fr1", "fr2"]
policy = "fail-over"
"#;

struct Scene {
    sc: NetNs,
    up: NetNs,
}

impl Scene {
    fn new(tag: &str) -> Self {
        let sc = NetNs::new(&format!("{tag}s"));
        let up = NetNs::new(&format!("{tag}u"));
        sh(&[
            "ip", "link", "add", "up0", "netns", &sc.name, "type", "veth", "peer", "name", "sc0",
            "netns", &up.name,
        ]);
        sc.ip(&["addr", "add", "10.77.0.1/24", "dev", "up0"]);
        up.ip(&["addr", "add", "10.77.0.2/24", "dev", "sc0"]);
        sc.ip(&["link", "set", "up0", "up"]);
        up.ip(&["link", "set", "sc0", "up"]);
        sc.run(|| wait_link("10.77.0.1", FR1));
        Self { sc, up }
    }

    /// FreeRADIUS `fr1` in its own namespace, with `extra` on top (unlang, modules).
    fn fr1(&self, extra: FreeRadiusSetup<'_>) -> FreeRadius {
        FreeRadius::start_with(
            &self.up,
            &FreeRadiusSetup {
                clients: &[("10.77.0.1", UP_SECRET)],
                users: USERS,
                auth_port: FR1_PORT,
                address: Some(FR1),
                ..extra
            },
        )
    }

    fn fr2(&self) -> FreeRadius {
        FreeRadius::start_on(&self.sc, &[("127.0.0.1", UP_SECRET)], USERS, FR2_PORT)
    }

    /// The sidecar (fast path) with `upstreams`, its NASes' client naming `target`.
    fn sidecar(&self, tag: &str, upstreams: &str, target: &str) -> Daemon {
        sidecar_with_config(
            &self.sc,
            tag,
            &format!(
                r#"[server]
listen = ["127.0.0.1:1812", "127.0.0.1:1813"]
workers = 2
iface = "lo"
ebpf = "require"
metrics = "{METRICS}"
{upstreams}
[[client]]
prefix = "127.0.2.0/24"
name = "nases"
secret = "{NAS_SECRET}"
upstream = "{target}"
"#
            ),
        )
    }

    fn metric(&self, sample: &str) -> u64 {
        metric(&self.sc, METRICS, sample)
    }

    fn state(&self, upstream: &str) -> u64 {
        self.metric(&format!("radius_upstream_state{{upstream=\"{upstream}\"}}"))
    }

    /// Waits until `upstream` is alive again; how long it took.
    fn alive_again(&self, upstream: &str, within: Duration) -> Duration {
        let t = Instant::now();
        while self.state(upstream) != 0 {
            assert!(
                t.elapsed() < within,
                "{upstream} alive again within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    }

    /// One NAS asks `n` times, one request at a time; how many got an Access-Accept.
    fn accepted(&self, n: u8) -> usize {
        self.sc.run(move || {
            ask(
                ("127.0.2.200", 0),
                ("127.0.0.1", 1812),
                n,
                Duration::from_secs(2),
            )
        })
    }
}

/// NASes 127.0.2.1-16, `outstanding` requests out, for `seconds`; a request not answered
/// within `patience` counts as lost (the generator never retransmits).
fn load(seconds: u64, outstanding: usize, patience: Duration) -> LoadSpec {
    LoadSpec {
        target: "127.0.0.1:1812".parse().expect("an address"),
        sources: (1..=16)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 2, i)))
            .collect(),
        sockets_per_source: 1,
        outstanding,
        duration: Duration::from_secs(seconds),
        max_requests: 2_000_000,
        secret: NAS_SECRET.as_bytes().to_vec(),
        user: "alice".into(),
        password: "alice-pw".into(),
        timeout: patience,
        message_authenticator: true,
        rate: None,
    }
}

fn longest_ms(r: &LoadResult) -> f64 {
    r.latencies_us
        .last()
        .map_or(0.0, |&us| f64::from(us) / 1000.0)
}

/// Runs `spec` in the sidecar's namespace while `during` plays the fault on this thread.
fn under_load<T: Send>(
    s: &Scene,
    spec: LoadSpec,
    during: impl FnOnce() -> T + Send,
) -> (LoadResult, T) {
    std::thread::scope(|scope| {
        let load = scope.spawn(|| s.sc.run(move || loadgen::run(&spec)));
        let t = during();
        let r = load
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
            .expect("the load generator ran");
        (r, t)
    })
}

/// A fault of `fr1` in a fail-over pool of `fr1` and `fr2`, under load for `seconds`:
/// `begin` 2 s in, `end` `lasts` later. Nothing may be lost, the longest wait must stay
/// within about a second (failover), `fr1` must be seen not alive halfway and alive again
/// after `end`, and serve alone once `fr2` is gone. `what` names the fault in the line it
/// prints.
fn fail_over_and_back(
    s: &Scene,
    tag: &str,
    seconds: u64,
    lasts: Duration,
    what: &str,
    begin: impl FnOnce() + Send,
    end: impl FnOnce() + Send,
) {
    let fr2 = s.fr2();
    let _d = s.sidecar(tag, POOL, "aaa");
    let (res, (during, back)) = under_load(s, load(seconds, 32, Duration::from_secs(3)), || {
        std::thread::sleep(Duration::from_secs(2));
        begin();
        std::thread::sleep(lasts / 2);
        let during = s.state("fr1");
        std::thread::sleep(lasts / 2);
        end();
        (during, s.alive_again("fr1", Duration::from_secs(10)))
    });
    println!(
        "{what} for {:.0} s, fail-over pool of two, 32 outstanding: {} answered, {} lost, {} \
         bad; longest wait {:.0} ms (failover); fr1 alive again {:.1} s after it ended; \
         answers per second: {:?}",
        lasts.as_secs_f64(),
        res.answered,
        res.lost,
        res.bad,
        longest_ms(&res),
        back.as_secs_f64(),
        res.per_second
    );
    assert_eq!((res.lost, res.bad), (0, 0), "every request answered");
    assert!(
        longest_ms(&res) < 1_500.0,
        "failover within about a second: the longest wait was {:.0} ms",
        longest_ms(&res)
    );
    assert_ne!(during, 0, "fr1 was not alive during the fault");
    drop(fr2);
    assert_eq!(s.accepted(5), 5, "fr1 serves again, fr2 gone");
}

#[test]
fn an_upstream_frozen_for_10_s_fails_over_within_a_second_and_comes_back() {
    if !require_root("frozen upstream") {
        return;
    }
    let s = Scene::new("frz");
    let fr1 = s.fr1(FreeRadiusSetup::default());
    let pid = fr1.child.id().to_string();
    fail_over_and_back(
        &s,
        "faults-frozen",
        16,
        Duration::from_secs(10),
        "upstream frozen (SIGSTOP)",
        || sh(&["kill", "-STOP", &pid]),
        || sh(&["kill", "-CONT", &pid]),
    );
}

#[test]
fn a_slow_upstream_is_waited_for_not_failed_over() {
    if !require_root("slow upstream") {
        return;
    }
    let s = Scene::new("slow");
    // Every Access-Request waits 200 ms in fr1's authorize (a thread of its pool held, as a
    // slow LDAP or SQL backend holds it).
    let _fr1 = s.fr1(FreeRadiusSetup {
        files: &[(
            "mods-enabled/slow",
            "exec slow {\n wait = yes\n program = \"/bin/sleep 0.2\"\n input_pairs = request\n \
             shell_escape = yes\n timeout = 10\n}\n",
        )],
        authorize: Some("\tslow\n"),
        ..Default::default()
    });
    let _fr2 = s.fr2();
    let _d = s.sidecar("faults-slow", POOL, "aaa");
    let (res, states) = under_load(&s, load(6, 16, Duration::from_secs(3)), || {
        (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_secs(1));
                s.state("fr1")
            })
            .collect::<Vec<_>>()
    });
    let failovers = s.metric("radius_upstream_retransmits_total{reason=\"failover\"}");
    let resent = s.metric("radius_upstream_retransmits_total{reason=\"timer\"}");
    println!(
        "slow upstream (200 ms per request), 16 outstanding: {} answered, {} lost, p50 {:.0} ms, \
         p99 {:.0} ms, {:.0} req/s; failovers {failovers}, retransmissions {resent}",
        res.answered,
        res.lost,
        res.latency_ms(0.5),
        res.latency_ms(0.99),
        res.rate()
    );
    assert_eq!((res.lost, res.bad), (0, 0), "every request answered");
    assert!(res.answered > 100, "answered {}", res.answered);
    assert!(
        res.latency_ms(0.5) >= 195.0,
        "answered by the slow server, not elsewhere: p50 {:.0} ms",
        res.latency_ms(0.5)
    );
    assert!(
        states.iter().all(|&st| st == 0),
        "fr1 stayed alive: {states:?}"
    );
    assert_eq!((failovers, resent), (0, 0), "nothing sent twice");
}

/// Drops `percent` % of the datagrams to and from fr1's port, in fr1's namespace, with
/// nftables (this kernel has no netem); counts what it dropped.
fn lossy_link(up: &NetNs, percent: u32) {
    let rules = format!(
        "table inet faults {{\n\
         chain input {{ type filter hook input priority 0; udp dport {FR1_PORT} numgen random mod 100 < {percent} counter drop; }}\n\
         chain output {{ type filter hook output priority 0; udp sport {FR1_PORT} numgen random mod 100 < {percent} counter drop; }}\n\
         }}\n"
    );
    let path = std::env::temp_dir().join(format!("rs-faults-{}.nft", std::process::id()));
    std::fs::write(&path, rules).expect("nft rules");
    let ok = up
        .command("nft")
        .args(["-f", path.to_str().expect("utf-8")])
        .status()
        .expect("nft (package nftables)")
        .success();
    let _ = std::fs::remove_file(&path);
    assert!(ok, "nft took the rules");
}

/// What the `faults` table dropped.
fn dropped(up: &NetNs) -> u64 {
    let out = up
        .command("nft")
        .args(["list", "table", "inet", "faults"])
        .output()
        .expect("nft");
    String::from_utf8_lossy(&out.stdout)
        .split("packets ")
        .skip(1)
        .filter_map(|t| t.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn retries_save_the_requests_a_lossy_upstream_link_drops() {
    if !require_root("lossy upstream link") {
        return;
    }
    let s = Scene::new("loss");
    let _fr1 = s.fr1(FreeRadiusSetup::default());
    // fr1 alone: the sidecar's own retries are all that can save a request.
    let _d = s.sidecar("faults-loss", POOL, "fr1");
    lossy_link(&s.up, 5);
    let (res, ()) = under_load(&s, load(10, 64, Duration::from_secs(6)), || ());
    let drops = dropped(&s.up);
    let resent = s.metric("radius_upstream_retransmits_total{reason=\"timer\"}");
    println!(
        "5 % loss each way on the upstream link (nftables), 64 outstanding, NAS patience 6 s: \
         {} answered, {} lost ({:.3} %); {drops} datagrams dropped, each a lost request without \
         retries; {resent} retransmissions; p50 {:.1} ms, p99 {:.0} ms",
        res.answered,
        res.lost,
        100.0 * res.lost as f64 / (res.answered + res.lost).max(1) as f64,
        res.latency_ms(0.5),
        res.latency_ms(0.99)
    );
    assert_eq!(res.bad, 0);
    assert!(drops > 100, "the link dropped {drops}");
    // A request is lost when its first two sendings are (about 1 % of them: the second
    // retry of the defaults often comes too late for the 5 s timeout).
    assert!(
        res.lost * 10 <= drops,
        "retries saved at least 90 % of the requests hit: {} lost for {drops} drops",
        res.lost
    );
    assert!(
        resent >= drops / 2,
        "{resent} retransmissions for {drops} drops"
    );
}

#[test]
fn an_upstream_link_down_fails_over_and_its_return_is_used() {
    if !require_root("upstream link down") {
        return;
    }
    let s = Scene::new("link");
    let _fr1 = s.fr1(FreeRadiusSetup::default());
    fail_over_and_back(
        &s,
        "faults-link",
        14,
        Duration::from_secs(6),
        "upstream link down",
        || s.up.ip(&["link", "set", "sc0", "down"]),
        || s.up.ip(&["link", "set", "sc0", "up"]),
    );
}

/// Rows of FreeRADIUS's `nas` table: the NAS known before the outage and the one that
/// comes during it.
const NAS_ROWS: &str = "INSERT INTO nas (nasname, shortname, type, secret, server) VALUES \
     ('192.0.2.2', 'known', 'other', 'faults-nas-secret', NULL), \
     ('192.0.2.3', 'newcomer', 'other', 'faults-nas-secret', NULL);";

/// How many of `n` requests from `ip` (on NAS1's link) got a verified Access-Accept.
fn accepted_from(topo: &Topology, ip: &'static str, n: u8) -> usize {
    topo.nas1
        .run(move || ask((ip, 0), (SIDECAR1_V4, 1812), n, Duration::from_millis(800)))
}

/// A NAS bound to `from` asks `to` `n` times, one request at a time, waiting `patience`
/// for each answer; how many got an Access-Accept signed with the NAS secret.
fn ask(from: (&str, u16), to: (&str, u16), n: u8, patience: Duration) -> usize {
    let s = UdpSocket::bind(from).expect("a NAS socket");
    s.set_read_timeout(Some(patience)).ok();
    let mut ok = 0;
    for id in 0..n {
        let (req, a) = pap_request(id, "alice", "alice-pw", NAS_SECRET, &[]);
        s.send_to(&req, to).expect("send");
        let mut b = [0u8; 4096];
        let Ok(len) = s.recv(&mut b) else { continue };
        if let Ok(p) = Packet::parse(&b[..len])
            && p.code() == Code::AccessAccept
            && auth::verify(&p, NAS_SECRET.as_bytes(), Some(&a)).is_ok()
        {
            ok += 1;
        }
    }
    ok
}

#[test]
fn the_postgresql_directory_stopped_and_started_again() {
    if !require_root("postgresql directory outage") {
        return;
    }
    let topo = Topology::new();
    topo.nas1.ip(&["addr", "add", "192.0.2.3/24", "dev", "nas"]);
    let pg = Postgres::start(&topo.sidecar, NAS_ROWS);
    let _fr = FreeRadius::start_on(&topo.sidecar, &[("127.0.0.1", UP_SECRET)], USERS, FR1_PORT);
    let _d = sidecar_with_config(
        &topo.sidecar,
        "faults-pg",
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 2
iface = "sc1"
ebpf = "require"
metrics = "{METRICS}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:{FR1_PORT}"
secret = "{UP_SECRET}"

[dynamic]
prefixes = ["192.0.2.0/24"]
directory = "sql"
url = "{}"
"#,
            pg.url()
        ),
    );
    let m = |sample: &str| metric(&topo.sidecar, METRICS, sample);
    assert_eq!(
        accepted_from(&topo, "192.0.2.2", 5),
        5,
        "defined and served"
    );
    pg.stop();
    let stopped = Instant::now();
    // The known NAS is served from its definition while the directory is down.
    assert_eq!(
        accepted_from(&topo, "192.0.2.2", 20),
        20,
        "known NAS served"
    );
    // A new one waits for a directory that is down, is refused, and that is counted.
    let asked = Instant::now();
    let first = accepted_from(&topo, "192.0.2.3", 1);
    while m("radius_dynamic_definitions_total{reason=\"unanswered\"}") == 0 {
        assert!(
            asked.elapsed() < Duration::from_secs(5),
            "the failed definition is counted within the directory's timeout"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let refused_after = asked.elapsed();
    let refused = m("radius_refused_total{reason=\"DirectoryRefused\"}");
    std::thread::sleep(Duration::from_secs(2));
    pg.resume();
    let started = Instant::now();
    // Served without a restart once the directory answers again.
    let served_after = loop {
        if accepted_from(&topo, "192.0.2.3", 1) == 1 {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the new NAS is served within 15 s of PostgreSQL's return"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "PostgreSQL directory down {:.1} s: the known NAS served throughout (25 of 25); a new \
         NAS refused {:.1} s after its first request ({refused} packets counted), served {:.1} \
         s after PostgreSQL came back",
        (started - stopped).as_secs_f64(),
        refused_after.as_secs_f64(),
        served_after.as_secs_f64()
    );
    assert_eq!(first, 0, "not served while the directory is down");
    assert!(refused >= 1, "its packet counted as refused");
    assert_eq!(
        accepted_from(&topo, "192.0.2.2", 5),
        5,
        "known NAS still served"
    );
}
