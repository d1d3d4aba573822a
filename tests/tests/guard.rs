//! `guard` (on the sidecar's NIC): junk, blocked and refused sources are dropped and
//! counted by reason, new sources are rate-limited, valid traffic passes byte for byte, and
//! known flows are counted. Each test runs on both hooks: XDP in the veth driver, and TC
//! ingress (where drivers without native XDP, loopback among them, get it). Run as root;
//! each test builds its own namespaces.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use radius_common::{Counter, PROTO_UDP};
use radius_sidecar::{
    fastpath::{FastPath, FastPathOptions, GuardHook},
    socket::{SteeringPath, bind_child, bind_wildcards, flow_key},
};
use tests::*;

const QUIET: Duration = Duration::from_millis(250);
const HOOKS: [GuardHook; 2] = [GuardHook::XdpDriver, GuardHook::TcIngress];

struct Guarded {
    topo: Topology,
    fp: FastPath,
    wildcards: Vec<UdpSocket>,
    to1: SocketAddr,
    to2: SocketAddr,
}

/// The sidecar with both programs, `guard` on the interface facing NAS1 (`sc1`) on `hook`,
/// and one wildcard on the any-address of the family.
fn guarded(opts: FastPathOptions, v6: bool, hook: GuardHook) -> Guarded {
    // Shown with a failure: which hook it was.
    eprintln!("guard on {hook}");
    let topo = Topology::new();
    let any = if v6 { "[::]:1812" } else { "0.0.0.0:1812" };
    let (fp, wildcards) = topo.sidecar.run(move || {
        let w = bind_wildcards(any.parse().unwrap(), 1, 4 << 20).unwrap();
        let mut fp = FastPath::load(&opts).unwrap();
        fp.attach_steer().unwrap();
        assert_eq!(fp.attach_guard_on("sc1", hook).unwrap(), hook);
        fp.add_service(PROTO_UDP, w[0].local_addr().unwrap(), &w)
            .unwrap();
        (fp, w)
    });
    let (sc1, sc2) = if v6 {
        (SIDECAR1_V6, SIDECAR2_V6)
    } else {
        (SIDECAR1_V4, SIDECAR2_V4)
    };
    Guarded {
        topo,
        fp,
        wildcards,
        to1: SocketAddr::new(sc1.parse().unwrap(), 1812),
        to2: SocketAddr::new(sc2.parse().unwrap(), 1812),
    }
}

fn received(g: &Guarded) -> Vec<Vec<u8>> {
    let w: Vec<&UdpSocket> = g.wildcards.iter().collect();
    drain(&w, QUIET).into_iter().map(|(_, _, p)| p).collect()
}

fn no_limit() -> FastPathOptions {
    FastPathOptions {
        rate_pps: 0,
        ..FastPathOptions::default()
    }
}

#[test]
fn junk_is_dropped_and_counted_by_reason_and_valid_traffic_passes_byte_for_byte() {
    if !require_root("guard junk") {
        return;
    }
    for hook in HOOKS {
        let g = guarded(no_limit(), false, hook);
        let nas = g.topo.nas1.run(|| nas_socket(NAS1_V4));
        let to = g.to1;

        // Runts: shorter than a RADIUS header.
        for n in [0usize, 1, 4, 19] {
            nas.send_to(&vec![1u8; n], to).unwrap();
        }
        // Lying length fields: below 20, above 4096, longer than the datagram.
        let mut lies = Vec::new();
        for claimed in [0u16, 19, 4097, 65535, 41] {
            let mut p = packet(7, 0, 40);
            p[2..4].copy_from_slice(&claimed.to_be_bytes());
            lies.push(p);
        }
        for p in &lies {
            nas.send_to(p, to).unwrap();
        }
        // Valid packets of many sizes, including trailing bytes past the RADIUS length
        // (RFC 2865: padding is allowed and ignored).
        let mut valid: Vec<Vec<u8>> = [20usize, 21, 100, 255, 1000, 4096]
            .iter()
            .enumerate()
            .map(|(i, &n)| packet(1, i as u32, n))
            .collect();
        let mut padded = packet(1, 99, 30);
        padded.extend_from_slice(&[0xab; 10]);
        valid.push(padded);
        for p in &valid {
            nas.send_to(p, to).unwrap();
        }

        let got = received(&g);
        assert_eq!(
            got, valid,
            "exactly the valid packets arrive, byte for byte, in order"
        );
        let c = g.fp.counters().unwrap();
        assert_eq!(c.get(Counter::DropRunt), 4);
        assert_eq!(c.get(Counter::DropBadLength), 5);
        // The 4096-byte packet crosses the 1500-byte link in 3 fragments, which guard leaves to
        // the stack to reassemble.
        assert_eq!(c.get(Counter::GuardPassNew), valid.len() as u64 - 1);
        assert_eq!(c.get(Counter::GuardPassFragment), 3);
    }
}

#[test]
fn blocked_prefixes_are_dropped_until_unblocked() {
    if !require_root("guard blocked") {
        return;
    }
    for hook in HOOKS {
        let mut g = guarded(no_limit(), false, hook);
        let nas = g.topo.nas1.run(|| nas_socket(NAS1_V4));
        g.fp.block("192.0.2.0/24".parse().unwrap()).unwrap();
        for i in 0..10 {
            nas.send_to(&packet(1, i, 20), g.to1).unwrap();
        }
        assert!(received(&g).is_empty(), "a blocked /24 reaches nobody");
        assert_eq!(g.fp.counters().unwrap().get(Counter::DropBlocked), 10);

        // A more specific block elsewhere does not cover this source.
        g.fp.unblock("192.0.2.0/24".parse().unwrap()).unwrap();
        g.fp.block("192.0.2.128/25".parse().unwrap()).unwrap();
        for i in 0..10 {
            nas.send_to(&packet(1, i, 20), g.to1).unwrap();
        }
        assert_eq!(received(&g).len(), 10, "unblocked traffic passes again");
        assert_eq!(g.fp.counters().unwrap().get(Counter::DropBlocked), 10);
    }
}

#[test]
fn ipv6_blocks_and_extension_headers() {
    if !require_root("guard ipv6") {
        return;
    }
    for hook in HOOKS {
        let mut g = guarded(no_limit(), true, hook);
        let (plain, with_ext) = g.topo.nas1.run(|| {
            let plain = nas_socket(NAS1_V6);
            let ext = nas_socket(NAS1_V6);
            // A hop-by-hop options header (PadN only) in front of UDP.
            let hbh: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
            // SAFETY: valid buffer of the given length.
            let rc = unsafe {
                libc::setsockopt(
                    ext.as_raw_fd(),
                    libc::IPPROTO_IPV6,
                    libc::IPV6_HOPOPTS,
                    hbh.as_ptr().cast(),
                    hbh.len() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "IPV6_HOPOPTS: {}", std::io::Error::last_os_error());
            (plain, ext)
        });
        // A runt behind an extension header is not looked at: passed, not dropped.
        with_ext.send_to(&[1u8; 5], g.to1).unwrap();
        plain.send_to(&[1u8; 5], g.to1).unwrap();
        let got = received(&g);
        assert_eq!(
            got,
            vec![vec![1u8; 5]],
            "only the packet with an extension header passes"
        );
        let c = g.fp.counters().unwrap();
        assert_eq!(c.get(Counter::DropRunt), 1);
        // At least ours: MLD reports (hop-by-hop too) are counted as well.
        assert!(c.get(Counter::GuardPassUnparsed) >= 1);

        g.fp.block("2001:db8:1::/48".parse().unwrap()).unwrap();
        plain.send_to(&packet(1, 1, 20), g.to1).unwrap();
        assert!(received(&g).is_empty());
        assert_eq!(g.fp.counters().unwrap().get(Counter::DropBlocked), 1);
    }
}

#[test]
fn negative_entries_drop_until_they_expire() {
    if !require_root("guard negative") {
        return;
    }
    for hook in HOOKS {
        let mut g = guarded(no_limit(), false, hook);
        let nas = g.topo.nas1.run(|| nas_socket(NAS1_V4));
        let src = NAS1_V4.parse().unwrap();
        g.fp.add_negative(src, Duration::from_millis(600)).unwrap();
        assert!(g.fp.is_negative(src));
        for i in 0..5 {
            nas.send_to(&packet(1, i, 20), g.to1).unwrap();
        }
        assert!(received(&g).is_empty(), "a refused source is dropped");
        assert_eq!(g.fp.counters().unwrap().get(Counter::DropNegative), 5);
        std::thread::sleep(Duration::from_millis(700));
        for i in 0..5 {
            nas.send_to(&packet(1, i, 20), g.to1).unwrap();
        }
        assert_eq!(received(&g).len(), 5, "the refusal expired");
        assert_eq!(g.fp.counters().unwrap().get(Counter::DropNegative), 5);
        assert!(!g.fp.is_negative(src));
    }
}

#[test]
fn new_sources_are_rate_limited_and_known_flows_are_not_and_are_counted() {
    if !require_root("guard rate") {
        return;
    }
    for hook in HOOKS {
        let (rate, burst) = (50u64, 20u64);
        let mut g = guarded(
            FastPathOptions {
                rate_pps: rate,
                burst,
                ..FastPathOptions::default()
            },
            false,
            hook,
        );
        let nas = g.topo.nas1.run(|| nas_socket(NAS1_V4));
        let start = std::time::Instant::now();
        for i in 0..500 {
            nas.send_to(&packet(1, i, 20), g.to1).unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let passed = received(&g).len() as u64;
        let allowed = burst + (rate as f64 * elapsed).ceil() as u64 + 1;
        assert!(
            passed >= burst && passed <= allowed,
            "{passed} passed; the bucket allows {burst} + {rate}/s over {elapsed:.3}s"
        );
        let c = g.fp.counters().unwrap();
        assert_eq!(c.get(Counter::DropRateLimited), 500 - passed);

        // Once the flow has a child, its packets are neither limited nor lost, and counted.
        let remote = nas.local_addr().unwrap();
        let to = g.to1;
        let child = g
            .topo
            .sidecar
            .run(move || bind_child(SteeringPath::Fast, to, to, remote).unwrap());
        let key = flow_key(remote, g.to1);
        g.fp.register_child(&key, child.as_raw_fd()).unwrap();
        let mut bytes = 0;
        let limited_before = g.fp.counters().unwrap().get(Counter::DropRateLimited);
        // 150 small datagrams fit the child's default receive buffer (read only at the end).
        for i in 0..150u32 {
            let p = packet(1, i, 20 + (i as usize % 50));
            bytes += p.len() as u64;
            nas.send_to(&p, g.to1).unwrap();
        }
        let got = drain(&[&child], QUIET);
        assert_eq!(got.len(), 150, "a known flow is not rate-limited");
        assert_eq!(
            g.fp.counters().unwrap().get(Counter::DropRateLimited),
            limited_before
        );
        let stats = g.fp.flow_stats(&key).unwrap();
        assert_eq!(stats.packets, 150);
        assert_eq!(stats.bytes, bytes);
        // Another source on another link is untouched by NAS1's bucket (guard is on sc1 only,
        // and the bucket is per source).
        let other = g.topo.nas2.run(|| nas_socket(NAS2_V4));
        other.send_to(&packet(2, 0, 20), g.to2).unwrap();
        assert_eq!(received(&g).len(), 1);
    }
}
