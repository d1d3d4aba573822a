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

/// The NASes: every request paced at `RATE`, in batches of 100 sessions (their Starts,
/// then Interims, then Stops), each retransmitted every second until answered or
/// `deadline`.
fn run_nases(deadline: Duration) -> Outcome {
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
    for batch in (0..SESSIONS).step_by(100) {
        for (status, name) in [(1u32, "Start"), (3, "Interim-Update"), (2, "Stop")] {
            for s in batch..(batch + 100).min(SESSIONS) {
                schedule.push((format!("spool-{s}"), status, name));
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

    let nases = ns.spawn(|| run_nases(Duration::from_secs(150)));
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
        d.log()
            .contains("spool: accounting left by the previous process"),
        "the new process recovers the spool:\n{}",
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
