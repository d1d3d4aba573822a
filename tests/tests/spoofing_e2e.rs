//! Spoofed UDP from inside an allowed prefix makes no state past its bound. A sprayer in
//! the NAS namespace forges datagrams from tens of thousands of (address, port) pairs of an
//! allowed /16 (198.18.0.0/16, the benchmarking range) at the sidecar, while a known NAS
//! (its own network) and NASes never seen before (real addresses inside the sprayed /16)
//! talk to a real FreeRADIUS through it. Forged Message-Authenticators make no flow at
//! all; unsigned requests (which prove nothing) make provisional flows, capped and evicted
//! least recently seen first, while proved flows are never touched. Run as root.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use radius_sidecar::codec::{Code, Packet, PacketMut, attr, auth};
use tests::{spray::Spray, *};

const NAS_SECRET: &str = "spoof-test-nas-secret";
const UP_SECRET: &str = "spoof-test-upstream";
const METRICS: &str = "127.0.0.1:9812";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";
/// Real NASes inside the sprayed /16, on NAS1's link (never forged by the sprayer).
const NEW_NAS_DURING: &str = "198.18.200.1";
const NEW_NAS_AFTER: &str = "198.18.200.2";
const PROVISIONAL_CAP: u64 = 1000;

struct Setup {
    topo: Topology,
    _fr: FreeRadius,
    daemon: Daemon,
}

fn setup(fast: bool, spoofed_range_signs: bool) -> Setup {
    let topo = Topology::new();
    // Answers to the /16 go back over NAS1's link; the real NASes there have addresses.
    topo.sidecar
        .ip(&["route", "add", "198.18.0.0/16", "via", NAS1_V4]);
    for a in [NEW_NAS_DURING, NEW_NAS_AFTER] {
        topo.nas1
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "nas"]);
    }
    let fr = FreeRadius::start_on(&topo.sidecar, &[("127.0.0.1", UP_SECRET)], USERS, 11812);
    let require = if spoofed_range_signs { "auto" } else { "no" };
    let daemon = sidecar_with_config(
        &topo.sidecar,
        &format!("spoof-{fast}-{spoofed_range_signs}"),
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812", "0.0.0.0:1813"]
workers = 2
iface = "sc1"
ebpf = "{}"
metrics = "{METRICS}"
max_provisional_flows = {PROVISIONAL_CAP}

[[upstream]]
name = "fr"
auth = "127.0.0.1:11812"
secret = "{UP_SECRET}"

[[client]]
prefix = "198.18.0.0/16"
name = "sprayed-range"
secret = "{NAS_SECRET}"
require_message_authenticator = "{require}"

[[client]]
prefix = "198.51.100.0/24"
name = "known"
secret = "{NAS_SECRET}"
"#,
            if fast { "require" } else { "off" }
        ),
    );
    Setup {
        topo,
        _fr: fr,
        daemon,
    }
}

/// One request from `s` to the sidecar's address on its link, and how long the answer took
/// (None: no answer within a second). `signed`: with a Message-Authenticator.
fn ask(s: &UdpSocket, to: SocketAddr, id: u8, signed: bool) -> Option<Duration> {
    let (req, a) = if signed {
        pap_request(id, "alice", "alice-pw", NAS_SECRET, &[])
    } else {
        unsigned_pap(id, NAS_SECRET)
    };
    let t0 = Instant::now();
    s.send_to(&req, to).ok()?;
    let mut b = [0u8; 4096];
    loop {
        let n = s.recv(&mut b).ok()?;
        let Ok(p) = Packet::parse(&b[..n]) else {
            continue;
        };
        // A late answer to an earlier request is not this one's.
        if p.identifier() == id && auth::verify(&p, NAS_SECRET.as_bytes(), Some(&a)).is_ok() {
            return (p.code() == Code::AccessAccept).then(|| t0.elapsed());
        }
    }
}

/// A PAP Access-Request without Message-Authenticator (what old NASes send).
fn unsigned_pap(id: u8, secret: &str) -> (Vec<u8>, [u8; 16]) {
    use radius_sidecar::codec::hide;
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).unwrap();
    let a = auth::random_authenticator();
    p.set_authenticator(&a);
    p.push(attr::USER_NAME, b"alice").unwrap();
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(b"alice-pw", secret.as_bytes(), &a, &mut h).unwrap();
    p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
    (p.as_bytes().to_vec(), a)
}

/// `n` requests, one every `gap`; the answer times (a lost one counts as None).
fn probe(
    s: &UdpSocket,
    to: SocketAddr,
    n: usize,
    gap: Duration,
    signed: bool,
) -> Vec<Option<Duration>> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    (0..n)
        .map(|i| {
            let r = ask(s, to, i as u8, signed);
            std::thread::sleep(gap);
            r
        })
        .collect()
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// `radius_flows_active`, scraped from the calling thread's namespace.
fn flows_active_here() -> u64 {
    use std::io::{Read as _, Write as _};
    let Ok(mut c) = std::net::TcpStream::connect(METRICS) else {
        return 0;
    };
    let _ = c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
    let mut body = String::new();
    let _ = c.read_to_string(&mut body);
    body.lines()
        .find_map(|l| l.strip_prefix("radius_flows_active "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Sum of the samples whose line starts with `prefix`.
fn sum_metrics(ns: &NetNs, prefix: &str) -> u64 {
    metrics_text(ns, METRICS)
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// The spray, with the known NAS measured before and during it, a NAS never seen before
/// served during and after it, and the flow count sampled throughout.
fn spray_while_nases_talk(fast: bool, forged_signatures: bool) {
    if !require_root("spoofing e2e") {
        return;
    }
    let s = setup(fast, forged_signatures);
    let (sidecar, nas1, nas2) = (&s.topo.sidecar, &s.topo.nas1, &s.topo.nas2);
    let to1: SocketAddr = format!("{SIDECAR1_V4}:1812").parse().unwrap();
    let to2: SocketAddr = format!("{SIDECAR2_V4}:1812").parse().unwrap();
    // The known NAS signs (a proved flow); the new NASes sign when their range must.
    let known = nas2.run(|| nas_socket(NAS2_V4));
    let before = probe(&known, to2, 400, Duration::from_millis(2), true);
    assert!(
        before.iter().all(Option::is_some),
        "the known NAS is served"
    );
    let before: Vec<Duration> = before.into_iter().flatten().collect();

    // Unsigned requests are relayed (nothing tells them from a real NAS's), so that spray
    // loads FreeRADIUS too: half the rate for half the time still churns the bound 25 times.
    let (rate, seconds) = if forged_signatures {
        (20_000u32, 10u64)
    } else {
        (10_000, 5)
    };
    let spec = Spray {
        to: format!("{SIDECAR1_V4}:1812").parse().unwrap(),
        prefix: [198, 18],
        pairs: 60_000,
        rate,
        duration: Duration::from_secs(seconds),
        skip: [NEW_NAS_DURING, NEW_NAS_AFTER]
            .map(|a| a.parse().unwrap())
            .to_vec(),
    };
    let raw = nas1.run(|| spray::raw_socket().expect("a raw socket (root)"));
    let sprayer = std::thread::spawn(move || {
        // A forger's best: a Message-Authenticator made with a guessed secret, or none.
        let (template, _) = if forged_signatures {
            pap_request(0, "spray", "guess", "a-guessed-secret", &[])
        } else {
            unsigned_pap(0, "a-guessed-secret")
        };
        spray::run(&raw, &spec, |n, buf| {
            buf.extend_from_slice(&template);
            buf[1] = n as u8;
            buf[4..12].copy_from_slice(&n.to_be_bytes());
        })
        .expect("spray")
    });

    // During: the known NAS keeps measuring, a never-seen NAS of the range is served, and
    // the flow count is sampled.
    let done = Arc::new(AtomicBool::new(false));
    let max_flows = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (done, max_flows) = (done.clone(), max_flows.clone());
        // A thread in the sidecar's namespace: it scrapes the endpoint directly.
        sidecar.spawn(move || {
            while !done.load(Ordering::Relaxed) {
                max_flows.fetch_max(flows_active_here(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let new_nas = nas1.run(|| nas_socket(NEW_NAS_DURING));
    let signed = forged_signatures;
    let newcomer =
        std::thread::spawn(move || probe(&new_nas, to1, 100, Duration::from_millis(50), signed));
    let during = probe(&known, to2, 1500, Duration::from_millis(2), true);
    let newcomer = newcomer.join().expect("the new NAS's probe");
    let sent = sprayer.join().expect("the sprayer");
    std::thread::sleep(Duration::from_millis(500));
    let after_nas = nas1.run(|| nas_socket(NEW_NAS_AFTER));
    let after = probe(&after_nas, to1, 20, Duration::from_millis(10), signed);
    // The known NAS once more: the baseline brackets the spray (a busy moment of the
    // machine before it should not pass for the spray's cost).
    let known_after: Vec<Duration> = probe(&known, to2, 400, Duration::from_millis(2), true)
        .into_iter()
        .flatten()
        .collect();
    done.store(true, Ordering::Relaxed);
    sampler.join().expect("the sampler");

    let m = |k: &str| metric(sidecar, METRICS, k);
    let lost = during.iter().filter(|r| r.is_none()).count();
    let during: Vec<Duration> = during.into_iter().flatten().collect();
    let (pb, pd, pa) = (p99(before), p99(during), p99(known_after));
    let bad = m("radius_proxy_drops_total{reason=\"bad_signature\"}");
    let kernel = sum_metrics(sidecar, "radius_fastpath_events_total{event=\"guard_drop");
    let created = m("radius_flows_created_total");
    let evicted = sum_metrics(sidecar, "radius_flows_evicted_total");
    eprintln!(
        "spray: sent {sent} in {seconds} s; known NAS p99 {pb:?} before, {pd:?} during ({lost} \
         lost), {pa:?} after; flows max {} (cap {PROVISIONAL_CAP}), created {created}, evicted {evicted}; \
         bad_signature {bad}, kernel drops {kernel}; forwarded {}",
        max_flows.load(Ordering::Relaxed),
        m("radius_forwarded_total"),
    );
    assert!(
        sent >= u64::from(rate) * seconds * 95 / 100,
        "the spray ran at its rate"
    );
    assert!(
        newcomer.iter().all(Option::is_some),
        "a NAS never seen before gets every answer during the spray: {} of 100",
        newcomer.iter().flatten().count()
    );
    assert!(
        after.iter().all(Option::is_some),
        "and after it: {} of 20",
        after.iter().flatten().count()
    );
    assert_eq!(lost, 0, "the known NAS loses nothing");
    assert!(
        max_flows.load(Ordering::Relaxed) <= PROVISIONAL_CAP + 3,
        "the flow count stays under the provisional cap"
    );
    if forged_signatures {
        // Every forged datagram is accounted for: refused for its signature (no flow made),
        // or dropped by the kernel before.
        assert!(
            bad + kernel >= sent * 99 / 100,
            "the counters account for the spray: {bad} + {kernel} of {sent}"
        );
        assert!(
            created <= 3,
            "no flow for a forged signature: {created} created"
        );
        // Latency is the bench's to measure; this only catches harm of the kind the spray
        // could do (a socket per forged source took p99 to ~50 ms). On these 2-core VMs the
        // p99 of a quiet minute alone swings from 0.5 to ~10 ms, so a ratio would flake.
        let bound = (pb.max(pa) * 2).max(Duration::from_millis(25));
        assert!(
            pd <= bound,
            "the known NAS's p99 stays within {bound:?}: {pb:?} before, {pd:?} during, {pa:?} after"
        );
    } else {
        // Unsigned requests prove nothing: provisional flows (no socket), churned through
        // their bound least recently seen first; the proved ones stay.
        assert!(
            evicted >= sent / 2,
            "provisional flows were evicted to make room: {evicted}"
        );
        assert!(
            m("radius_flows_provisional") <= PROVISIONAL_CAP,
            "provisional flows within their bound"
        );
    }
    // Proved (with a socket): the known NAS and, when its range signs, the new ones.
    let proved = m("radius_flows_proved_total");
    assert!(
        (1..=3).contains(&proved),
        "only real NASes get a socket: {proved}"
    );
    drop(s.daemon);
}

#[test]
fn fast_path_forged_signatures_from_a_sprayed_16_make_no_flow() {
    spray_while_nases_talk(true, true);
}

#[test]
fn user_space_path_forged_signatures_from_a_sprayed_16_make_no_flow() {
    spray_while_nases_talk(false, true);
}

#[test]
fn fast_path_unsigned_requests_from_a_sprayed_16_stay_within_the_provisional_share() {
    spray_while_nases_talk(true, false);
}
