//! The accounting spool against a real FreeRADIUS: NASes send 500 Accounting-Requests a
//! second (Start, Interim-Update and Stop of many sessions, retransmitted every second
//! until answered, as NASes do) while the accounting server is stopped for 30 s, and the
//! sidecar is killed with SIGKILL in that time and started again. Afterwards FreeRADIUS's
//! detail files must hold every (Acct-Session-Id, Acct-Status-Type) the NASes sent, and
//! every request must have had its Accounting-Response; the test prints how many records
//! came twice (delivery is at least once).

use std::{
    collections::{HashMap, HashSet},
    net::UdpSocket,
    time::{Duration, Instant},
};

use radius_sidecar::codec::{
    Code, Packet, PacketMut, attr,
    auth::{self, Secret},
};
use tests::*;

const NAS_SECRET: &str = "spool-nas-secret";
const UP_SECRET: &str = "spool-upstream-secret";
const RATE: u64 = 500;
const SESSIONS: usize = 6_000;
const NASES: usize = 16;

/// A request out of a NAS: its bytes, first and last sending, its place in the schedule.
type Out = (Vec<u8>, Instant, Instant, usize);

/// What the NASes saw.
struct Outcome {
    sent: usize,
    answered: usize,
    retransmissions: usize,
    slowest: Duration,
    /// (session, status) of every request.
    requests: HashSet<(String, &'static str)>,
}

fn request(id: u8, session: &str, status: u32, delay: u32) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, id).expect("header");
    p.push(attr::USER_NAME, format!("user-{session}").as_bytes())
        .expect("attr");
    p.push(attr::ACCT_STATUS_TYPE, &status.to_be_bytes())
        .expect("attr");
    p.push(attr::ACCT_SESSION_ID, session.as_bytes())
        .expect("attr");
    p.push(46, &(status * 60).to_be_bytes())
        .expect("Acct-Session-Time");
    p.push(41, &delay.to_be_bytes()).expect("Acct-Delay-Time");
    p.sign(&Secret::new(NAS_SECRET.as_bytes()), None)
        .expect("sign");
    p.as_bytes().to_vec()
}

/// The NASes: every request of `sessions` sessions named `prefix-N` paced at `RATE`, in
/// batches of 100 sessions (their Starts, then Interims, then Stops), each retransmitted
/// every second until answered or `deadline`.
fn run_nases(prefix: &str, sessions: usize, deadline: Duration) -> Outcome {
    let sockets: Vec<UdpSocket> = (0..NASES)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("a NAS socket");
            s.connect("127.0.0.1:1813").expect("connect");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let secret = Secret::new(NAS_SECRET.as_bytes());
    let mut schedule = Vec::new();
    for batch in (0..sessions).step_by(100) {
        for (status, name) in [(1u32, "Start"), (3, "Interim-Update"), (2, "Stop")] {
            for s in batch..(batch + 100).min(sessions) {
                schedule.push((format!("{prefix}-{s}"), status, name));
            }
        }
    }
    let start = Instant::now();
    let mut out: Vec<HashMap<u8, Out>> = (0..NASES).map(|_| HashMap::new()).collect();
    let mut next_id = [0u8; NASES];
    let (mut next, mut answered, mut retransmissions) = (0usize, 0usize, 0usize);
    let mut slowest = Duration::ZERO;
    let mut buf = [0u8; 4096];
    let mut requests = HashSet::new();
    while start.elapsed() < deadline && (next < schedule.len() || out.iter().any(|o| !o.is_empty()))
    {
        let now = Instant::now();
        // New requests due by the rate.
        let due = ((start.elapsed().as_millis() as u64 * RATE) / 1000) as usize;
        while next < schedule.len().min(due) {
            let nas = next % NASES;
            let Some(id) = (0..256)
                .map(|k| next_id[nas].wrapping_add(k as u8))
                .find(|id| !out[nas].contains_key(id))
            else {
                break;
            };
            next_id[nas] = id.wrapping_add(1);
            let (session, status, name) = &schedule[next];
            let bytes = request(id, session, *status, 0);
            let _ = sockets[nas].send(&bytes);
            requests.insert((session.clone(), *name));
            out[nas].insert(id, (bytes, now, now, next));
            next += 1;
        }
        // Answers.
        for (nas, s) in sockets.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                let Ok(reply) = Packet::parse(&buf[..n]) else {
                    continue;
                };
                let id = reply.identifier();
                let Some((bytes, first, _, _)) = out[nas].get(&id) else {
                    continue;
                };
                let mut sent_auth = [0u8; 16];
                sent_auth.copy_from_slice(&bytes[4..20]);
                if reply.code() == Code::AccountingResponse
                    && auth::verify(&reply, &secret, Some(&sent_auth)).is_ok()
                {
                    slowest = slowest.max(first.elapsed());
                    out[nas].remove(&id);
                    answered += 1;
                }
            }
        }
        // Retransmissions, once a second, the same bytes.
        for (nas, o) in out.iter_mut().enumerate() {
            for (bytes, _, last, _) in o.values_mut() {
                if now.duration_since(*last) >= Duration::from_secs(1) {
                    *last = now;
                    let _ = sockets[nas].send(bytes);
                    retransmissions += 1;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Outcome {
        sent: next,
        answered,
        retransmissions,
        slowest,
        requests,
    }
}

/// Every (session, status) FreeRADIUS's detail files under `dirs` hold, with how often.
fn detail_records(dirs: &[&FreeRadius]) -> HashMap<(String, String), usize> {
    let mut seen = HashMap::new();
    for fr in dirs {
        let dir = fr.dir.join("log/radacct/127.0.0.1");
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            for record in text.split("\n\n") {
                let field = |name: &str| {
                    record.lines().find_map(|l| {
                        l.trim()
                            .strip_prefix(name)
                            .and_then(|r| r.strip_prefix(" = "))
                            .map(|v| v.trim_matches('"').to_owned())
                    })
                };
                if let (Some(s), Some(t)) = (field("Acct-Session-Id"), field("Acct-Status-Type")) {
                    *seen.entry((s, t)).or_default() += 1;
                }
            }
        }
    }
    seen
}

#[test]
fn accounting_survives_a_stopped_server_and_a_killed_sidecar() {
    if !require_root("accounting spool e2e") {
        return;
    }
    let ns = NetNs::new("spool");
    let spool_dir = std::env::temp_dir().join(format!("rs-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&spool_dir);
    let config = format!(
        r#"[server]
listen = ["127.0.0.1:1813"]
workers = 1
metrics = "127.0.0.1:9816"

[[upstream]]
name = "accounting"
auth = "127.0.0.1:16812"
acct = "127.0.0.1:16813"
secret = "{UP_SECRET}"
timeout_ms = 3000
check_interval_ms = 500
answers_to_alive = 1

[[client]]
prefix = "127.0.0.0/8"
secret = "{NAS_SECRET}"
upstream = "accounting"

[spool]
pools = ["accounting"]
dir = "{}"
fsync = "always"
"#,
        spool_dir.display()
    );
    let users = "DEFAULT\tAuth-Type := Accept\n";
    let mut first = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, 16812);
    let mut d = sidecar_with_config(&ns, "spool", &config);
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );

    let nases = ns.spawn(|| run_nases("spool", SESSIONS, Duration::from_secs(150)));
    let t0 = Instant::now();
    let at = |s: u64| {
        let when = t0 + Duration::from_secs(s);
        std::thread::sleep(when.saturating_duration_since(Instant::now()));
    };
    at(5);
    let _ = first.child.kill();
    let _ = first.child.wait();
    println!("{:>5.1} s: FreeRADIUS stopped", t0.elapsed().as_secs_f64());
    at(15);
    let spooled_before_kill = metric(&ns, "127.0.0.1:9816", "radius_spool_records");
    d.stop(libc::SIGKILL, Duration::from_secs(5));
    println!(
        "{:>5.1} s: sidecar killed (SIGKILL) with {spooled_before_kill} records spooled",
        t0.elapsed().as_secs_f64()
    );
    let mut d = sidecar_with_config(&ns, "spool", &config);
    assert!(
        d.wait_for_log("listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    println!(
        "{:>5.1} s: sidecar started again",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        d.wait_for_log(
            "spool: accounting left by a process that is gone",
            Duration::from_secs(5)
        ),
        "the new process adopts the killed one's spool:\n{}",
        d.log()
    );
    at(35);
    let second = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], users, 16812);
    println!(
        "{:>5.1} s: FreeRADIUS started again",
        t0.elapsed().as_secs_f64()
    );
    let outcome = nases.join().expect("the NASes");
    println!(
        "{:>5.1} s: NASes done: {} sent, {} answered, {} retransmissions, slowest answer {:?}",
        t0.elapsed().as_secs_f64(),
        outcome.sent,
        outcome.answered,
        outcome.retransmissions,
        outcome.slowest
    );
    assert_eq!(outcome.sent, SESSIONS * 3);
    assert_eq!(
        outcome.answered,
        outcome.sent,
        "every NAS got its Accounting-Response\n{}",
        d.log()
    );
    // The spool drains.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&ns, "127.0.0.1:9816", "radius_spool_records") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let m = |s: &str| metric(&ns, "127.0.0.1:9816", s);
    println!(
        "after recovery: spool_records {}, replayed {}, recovered {}, written {}",
        m("radius_spool_records"),
        m("radius_spool_total{reason=\"replayed\"}"),
        m("radius_spool_total{reason=\"recovered\"}"),
        m("radius_spool_total{reason=\"written\"}"),
    );
    assert_eq!(
        m("radius_spool_records"),
        0,
        "the spool drained\n{}",
        d.log()
    );
    let seen = detail_records(&[&first, &second]);
    let missing: Vec<_> = outcome
        .requests
        .iter()
        .filter(|(s, t)| !seen.contains_key(&(s.clone(), (*t).to_owned())))
        .collect();
    let twice = seen.values().filter(|&&n| n > 1).count();
    let extra: usize = seen.values().map(|n| n.saturating_sub(1)).sum();
    println!(
        "detail files: {} distinct (session, status) of {} sent; {twice} came more than once \
         ({extra} extra records)",
        seen.len(),
        outcome.requests.len()
    );
    assert!(
        missing.is_empty(),
        "{} (session, status) never reached FreeRADIUS, e.g. {:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let leftovers = std::fs::read_dir(&spool_dir)
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    println!("spool files left: {leftovers}");
    drop(d);
    let _ = std::fs::remove_dir_all(&spool_dir);
}

#[test]
fn an_upgrade_hands_the_spool_over_and_replays_it_once() {
    if !require_root("accounting spool across an upgrade") {
        return;
    }
    let ns = NetNs::new("spool-up");
    let dir = std::env::temp_dir().join(format!("rs-spool-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a test folder");
    let (path, control, spool, bin) = (
        dir.join("sidecar.toml"),
        dir.join("control.sock"),
        dir.join("spool"),
        dir.join("radius-sidecar"),
    );
    std::fs::write(
        &path,
        format!(
            r#"[server]
listen = ["127.0.0.1:1813"]
workers = 1
metrics = "127.0.0.1:9817"
control = "{}"

[[upstream]]
name = "accounting"
auth = "127.0.0.1:16812"
acct = "127.0.0.1:16813"
secret = "{UP_SECRET}"
timeout_ms = 2000
check_interval_ms = 500
answers_to_alive = 1

[[client]]
prefix = "127.0.0.0/8"
secret = "{NAS_SECRET}"
upstream = "accounting"

[spool]
pools = ["accounting"]
dir = "{}"
"#,
            control.display(),
            spool.display()
        ),
    )
    .expect("write the configuration");
    std::fs::copy(sidecar_bin(), &bin).expect("copy the binary");
    let args = ["--config", path.to_str().expect("utf-8")];
    let mut d = Daemon::start_binary(&bin, &ns, None, &args, "info");
    assert!(
        d.wait_for_log("control socket listening", Duration::from_secs(20)),
        "{}",
        d.log()
    );
    let old_pid = d.child.id() as i32;
    // The accounting server is down: everything is spooled, every NAS answered.
    let before = ns.spawn(|| run_nases("before", 100, Duration::from_secs(60)));
    let before = before.join().expect("the NASes");
    assert_eq!(before.answered, before.sent, "{}", d.log());
    let spooled = metric(&ns, "127.0.0.1:9817", "radius_spool_records");
    assert_eq!(spooled, 300, "all spooled by the old process");
    let (ok, said) = sidecar_cli(
        &ns,
        &bin,
        &["upgrade", "--control", control.to_str().expect("utf-8")],
    );
    assert!(ok, "upgrade: {said}\n{}", d.log());
    // The new process is not our child: it is stopped when the test ends, however it ends.
    let new_pid = upgraded_pid(&said);
    let _stop_new = StopOnDrop(new_pid);
    // The old process (our child) finishes what it had in flight and exits.
    let deadline = Instant::now() + Duration::from_secs(30);
    while matches!(d.child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        matches!(d.child.try_wait(), Ok(Some(_))),
        "the old process {old_pid} exits"
    );
    let after = ns.spawn(|| run_nases("after", 100, Duration::from_secs(60)));
    let after = after.join().expect("the NASes");
    println!(
        "after the upgrade: {} sent, {} answered, {} retransmissions, slowest {:?}",
        after.sent, after.answered, after.retransmissions, after.slowest
    );
    println!(
        "{}",
        metrics_text(&ns, "127.0.0.1:9817")
            .lines()
            .filter(|l| l.contains("drops") || l.contains("spool") || l.contains("local_answers"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(after.answered, after.sent);
    assert!(
        d.wait_for_log(
            "spool: accounting left by a process that is gone",
            Duration::from_secs(10)
        ),
        "the new process adopts the old one's spool once it has exited:\n{}",
        d.log()
    );
    let fr = FreeRadius::start_on(&ns, &[("127.0.0.1", UP_SECRET)], "", 16812);
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&ns, "127.0.0.1:9817", "radius_spool_records") > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    let seen = detail_records(&[&fr]);
    let sent: HashSet<_> = before.requests.union(&after.requests).cloned().collect();
    let missing = sent
        .iter()
        .filter(|(s, t)| !seen.contains_key(&(s.clone(), (*t).to_owned())))
        .count();
    let extra: usize = seen.values().map(|n| n.saturating_sub(1)).sum();
    println!(
        "upgrade with 300 records spooled, 300 more after it: {} of {} (session, status) \
         delivered, {extra} extra records",
        sent.len() - missing,
        sent.len()
    );
    assert_eq!(
        missing, 0,
        "every record spooled before and after the upgrade is delivered"
    );
    assert_eq!(
        extra, 0,
        "the old and the new process never replay one record both"
    );
    drop(d);
    let _ = std::fs::remove_dir_all(&dir);
}
