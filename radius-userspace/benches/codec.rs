//! `cargo xtask bench codec`: the codec's proxy path per packet, with criterion, plus a
//! table (median of 5 timed batches) and heap allocations per packet, counted by a global
//! allocator wrapper. `RADIUS_BENCH_WRITE=path` splices the table into BENCHMARKS.md.
//!
//! - request: a 220-byte Access-Request from a NAS is parsed, verified (its
//!   Message-Authenticator), given a Proxy-State, a Message-Authenticator first, a new
//!   Identifier and random authenticator, its User-Password re-hidden, and signed for the
//!   upstream.
//! - accept: an Access-Accept with MS-MPPE keys is parsed, verified against the upstream
//!   secret, stripped of the Proxy-State, its keys re-hidden, and signed for the NAS.

#![expect(clippy::unwrap_used, reason = "a benchmark of fixed, valid packets")]

use std::{
    alloc::{GlobalAlloc, Layout, System},
    fmt::Write as _,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use criterion::Criterion;
use radius_sidecar::codec::{
    Code, Packet, PacketMut, attr,
    auth::{self, Secret, SharedSecret, random_authenticator},
    hide,
};

struct Counting;
static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const NAS_SECRET: &[u8] = b"nas-shared-secret";
const UP_SECRET: &[u8] = b"upstream-secret-xyz";

fn typical_request() -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 17).unwrap();
    let a = random_authenticator();
    p.set_authenticator(&a);
    p.message_authenticator_first().unwrap();
    p.push(attr::USER_NAME, b"alice.example@corp.example.com")
        .unwrap();
    let mut h = [0u8; 128];
    let n = hide::hide_user_password(b"correct horse battery", NAS_SECRET, &a, &mut h).unwrap();
    p.push(attr::USER_PASSWORD, &h[..n]).unwrap();
    p.push(attr::NAS_IP_ADDRESS, &[192, 0, 2, 10]).unwrap();
    p.push(attr::NAS_PORT, &12u32.to_be_bytes()).unwrap();
    p.push(6, &2u32.to_be_bytes()).unwrap();
    p.push(30, b"00-11-22-33-44-55:corp-ssid").unwrap();
    p.push(31, b"66-77-88-99-AA-BB").unwrap();
    p.push(attr::NAS_IDENTIFIER, b"ap-building-7-floor-3")
        .unwrap();
    p.push(61, &19u32.to_be_bytes()).unwrap();
    p.push(12, &1400u32.to_be_bytes()).unwrap();
    p.push(77, b"CONNECT 802.11ac").unwrap();
    p.sign(NAS_SECRET, None).unwrap();
    p.as_bytes().to_vec()
}

fn accept_with_keys(up_auth: &[u8; 16]) -> Vec<u8> {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessAccept, 99).unwrap();
    p.message_authenticator_first().unwrap();
    p.push(attr::USER_NAME, b"alice.example@corp.example.com")
        .unwrap();
    let mut v = [0u8; 64];
    let n = hide::hide_salted(&[0x11; 32], [0x81, 1], UP_SECRET, up_auth, &mut v).unwrap();
    p.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_SEND_KEY, &v[..n])
        .unwrap();
    let n = hide::hide_salted(&[0x22; 32], [0x82, 2], UP_SECRET, up_auth, &mut v).unwrap();
    p.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_RECV_KEY, &v[..n])
        .unwrap();
    p.push(attr::EAP_MESSAGE, &[3, 9, 0, 4]).unwrap();
    p.push(25, b"class-attribute-0123456789").unwrap();
    p.add_proxy_state(b"sc1").unwrap();
    p.sign(UP_SECRET, Some(up_auth)).unwrap();
    p.as_bytes().to_vec()
}

/// The secrets as the proxy holds them: with their HMAC key schedules.
struct Keys {
    nas: Secret,
    up: Secret,
}

/// The request path: one call = one packet.
fn proxy_request(k: &Keys, datagram: &[u8], buf: &mut [u8; 4096]) -> usize {
    buf[..datagram.len()].copy_from_slice(datagram);
    let nas_auth = {
        let p = Packet::parse(&buf[..datagram.len()]).unwrap();
        auth::verify(&p, &k.nas, None).unwrap();
        *p.authenticator()
    };
    let mut p = PacketMut::from_datagram(buf, datagram.len()).unwrap();
    p.add_proxy_state(b"sc1").unwrap();
    p.message_authenticator_first().unwrap();
    p.set_identifier(99);
    let up_auth = random_authenticator();
    p.set_authenticator(&up_auth);
    p.rehide((k.nas.bytes(), &nas_auth), (k.up.bytes(), &up_auth))
        .unwrap();
    p.sign(&k.up, None).unwrap();
    p.len()
}

/// The reply path.
fn proxy_accept(
    k: &Keys,
    datagram: &[u8],
    up_auth: &[u8; 16],
    nas_auth: &[u8; 16],
    buf: &mut [u8; 4096],
) -> usize {
    buf[..datagram.len()].copy_from_slice(datagram);
    {
        let p = Packet::parse(&buf[..datagram.len()]).unwrap();
        auth::verify(&p, &k.up, Some(up_auth)).unwrap();
    }
    let mut p = PacketMut::from_datagram(buf, datagram.len()).unwrap();
    p.strip_proxy_state(b"sc1");
    p.set_identifier(17);
    p.rehide((k.up.bytes(), up_auth), (k.nas.bytes(), nas_auth))
        .unwrap();
    p.sign(&k.nas, Some(nas_auth)).unwrap();
    p.len()
}

fn measure(mut f: impl FnMut()) -> (f64, f64) {
    const N: u64 = 200_000;
    for _ in 0..10_000 {
        f();
    }
    let mut batches = Vec::new();
    let a0 = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..N {
            f();
        }
        batches.push(t.elapsed().as_nanos() as f64 / N as f64);
    }
    let allocs = (ALLOCS.load(Ordering::Relaxed) - a0) as f64 / (5 * N) as f64;
    batches.sort_by(f64::total_cmp);
    (batches[2], allocs)
}

fn main() {
    let req = typical_request();
    let up_auth = [9u8; 16];
    let nas_auth = *Packet::parse(&req).unwrap().authenticator();
    let acc = accept_with_keys(&up_auth);
    let k = Keys {
        nas: Secret::new(NAS_SECRET),
        up: Secret::new(UP_SECRET),
    };

    let mut c = Criterion::default().configure_from_args();
    let mut buf = [0u8; 4096];
    c.bench_function(
        "proxy Access-Request (parse, verify, edit, re-hide, sign)",
        |b| b.iter(|| proxy_request(&k, black_box(&req), &mut buf)),
    );
    c.bench_function("proxy Access-Accept with MPPE keys", |b| {
        b.iter(|| proxy_accept(&k, black_box(&acc), &up_auth, &nas_auth, &mut buf))
    });
    c.final_summary();

    let (req_ns, req_allocs) = measure(|| {
        black_box(proxy_request(&k, black_box(&req), &mut buf));
    });
    let (acc_ns, acc_allocs) = measure(|| {
        black_box(proxy_accept(
            &k,
            black_box(&acc),
            &up_auth,
            &nas_auth,
            &mut buf,
        ));
    });
    let (rand_ns, _) = measure(|| {
        black_box(random_authenticator());
    });
    let block = [0x5au8; 64];
    let (md5_ns, _) = measure(|| {
        use md5::Digest as _;
        let mut h = md5::Md5::new();
        h.update(black_box(&block[..55]));
        black_box(h.finalize());
    });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    let mut t = String::new();
    let _ = writeln!(
        t,
        "Machine: {cpu}, {} cores. Median of 5 batches of 200 000 packets, one thread.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let _ = writeln!(
        t,
        "| path | packet bytes | ns/packet | heap allocations/packet | target |"
    );
    let _ = writeln!(t, "| --- | ---: | ---: | ---: | --- |");
    let _ = writeln!(
        t,
        "| Access-Request: parse, verify MA, Proxy-State, MA first, new id + authenticator, re-hide User-Password, sign | {} | {req_ns:.0} | {req_allocs:.0} | < 1000 ns, 0 allocations |",
        req.len()
    );
    let _ = writeln!(
        t,
        "| Access-Accept with MS-MPPE keys: parse, verify, strip Proxy-State, re-hide 2 keys, sign | {} | {acc_ns:.0} | {acc_allocs:.0} | < 1000 ns, 0 allocations |",
        acc.len()
    );
    let _ = writeln!(
        t,
        "| for scale: one random authenticator (thread-local ChaCha12) | - | {rand_ns:.0} | 0 | |"
    );
    let _ = writeln!(
        t,
        "| for scale: one MD5 block (55 bytes in, the unit every authenticator, HMAC and hiding step is made of) | - | {md5_ns:.0} | 0 | |"
    );
    println!("\n{t}");
    if let Ok(path) = std::env::var("RADIUS_BENCH_WRITE") {
        splice(&path, &t);
    }
}

fn splice(path: &str, table: &str) {
    const BEGIN: &str = "<!-- codec:begin -->";
    const END: &str = "<!-- codec:end -->";
    let old = std::fs::read_to_string(path).unwrap_or_else(|_| "# Benchmarks\n".into());
    let block = format!("{BEGIN}\n{table}{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if e > b => format!("{}{}{}", &old[..b], block, &old[e + END.len()..]),
        _ => format!(
            "{}\n\n## codec: the proxy path per packet (`cargo xtask bench codec`)\n\n{block}\n",
            old.trim_end()
        ),
    };
    let _ = std::fs::write(path, new);
}
