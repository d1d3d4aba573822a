//! Steering: packets of a registered flow reach its child and only its child, on the eBPF
//! fast path and on the user-space path, IPv4 and IPv6, with several flows behind one
//! source address (NAT). Run as root; each test builds its own namespaces.

use std::{
    collections::HashMap,
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd,
    time::Duration,
};

use radius_common::{Counter, PROTO_UDP};
use radius_sidecar::{
    fastpath::{FastPath, FastPathOptions},
    socket::{SteeringPath, bind_child, bind_wildcards, flow_key, is_own_datagram},
};
use tests::*;

const QUIET: Duration = Duration::from_millis(300);

struct Sidecar {
    fastpath: Option<FastPath>,
    wildcards: Vec<UdpSocket>,
    bound: SocketAddr,
}

fn sidecar(topo: &Topology, path: SteeringPath, bind: &str, workers: usize) -> Sidecar {
    let bind: SocketAddr = bind.parse().unwrap();
    topo.sidecar.run(move || {
        let wildcards = bind_wildcards(bind, workers, 1 << 20).unwrap();
        let bound = wildcards[0].local_addr().unwrap();
        let fastpath = (path == SteeringPath::Fast).then(|| {
            let mut fp = FastPath::load(&FastPathOptions::default()).unwrap();
            fp.attach_steer().unwrap();
            fp.add_service(PROTO_UDP, bound, &wildcards).unwrap();
            fp
        });
        Sidecar {
            fastpath,
            wildcards,
            bound,
        }
    })
}

fn service_addr(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Creates the child of (remote -> local) in the sidecar namespace and registers it.
fn add_child(
    topo: &Topology,
    sc: &mut Sidecar,
    path: SteeringPath,
    local: SocketAddr,
    remote: SocketAddr,
) -> UdpSocket {
    let bound = sc.bound;
    let child = topo
        .sidecar
        .run(move || bind_child(path, bound, local, remote).unwrap());
    if let Some(fp) = &mut sc.fastpath {
        fp.register_child(&flow_key(remote, local), child.as_raw_fd())
            .unwrap();
    }
    child
}

fn steering(path: SteeringPath, v6: bool) {
    if !require_root("steering") {
        return;
    }
    let topo = Topology::new();
    let (any, sc1, sc2, n1, n2) = if v6 {
        ("[::]:1812", SIDECAR1_V6, SIDECAR2_V6, NAS1_V6, NAS2_V6)
    } else {
        ("0.0.0.0:1812", SIDECAR1_V4, SIDECAR2_V4, NAS1_V4, NAS2_V4)
    };
    let mut sc = sidecar(&topo, path, any, 2);
    let (to1, to2) = (service_addr(sc1, 1812), service_addr(sc2, 1812));

    // Three NAS flows behind one address (NAT: same IP, different ports), one on another host.
    let n1 = n1.to_owned();
    let nat: Vec<UdpSocket> = topo
        .nas1
        .run(move || (0..3).map(|_| nas_socket(&n1)).collect());
    let n2 = n2.to_owned();
    let other = topo.nas2.run(move || nas_socket(&n2));
    let senders: Vec<(&UdpSocket, SocketAddr)> = vec![
        (&nat[0], to1),
        (&nat[1], to1),
        (&nat[2], to1),
        (&other, to2),
    ];

    // Before any child exists every flow reaches a wildcard, with its destination known.
    for (tag, (s, to)) in senders.iter().enumerate() {
        s.send_to(&packet(tag as u32, 0, 40), to).unwrap();
    }
    let first = drain(&sc.wildcards.iter().collect::<Vec<_>>(), QUIET);
    assert_eq!(first.len(), 4, "every new flow reaches a wildcard");

    // Children for NAT flow 0 and for the other host.
    let child_a = add_child(&topo, &mut sc, path, to1, nat[0].local_addr().unwrap());
    let child_d = add_child(&topo, &mut sc, path, to2, other.local_addr().unwrap());

    for seq in 1..=50 {
        for (tag, (s, to)) in senders.iter().enumerate() {
            s.send_to(&packet(tag as u32, seq, 60), to).unwrap();
        }
    }
    let mut all: Vec<&UdpSocket> = vec![&child_a, &child_d];
    all.extend(sc.wildcards.iter());
    let got = drain(&all, QUIET);
    let mut per_socket: HashMap<usize, Vec<u32>> = HashMap::new();
    for (i, _, p) in &got {
        per_socket.entry((*i).min(2)).or_default().push(tag_of(p).0);
    }
    let a = per_socket.remove(&0).unwrap_or_default();
    let d = per_socket.remove(&1).unwrap_or_default();
    let wild = per_socket.remove(&2).unwrap_or_default();
    assert_eq!(a.len(), 50, "child A gets every packet of its flow");
    assert!(a.iter().all(|&t| t == 0), "child A gets only its flow");
    assert_eq!(d.len(), 50, "child D gets every packet of its flow");
    assert!(d.iter().all(|&t| t == 3), "child D gets only its flow");
    assert_eq!(
        wild.len(),
        100,
        "the two flows without a child reach the wildcards"
    );
    assert!(
        wild.iter().all(|&t| t == 1 || t == 2),
        "no packet of a flow with a child reaches a wildcard"
    );

    // A reply from a child leaves with the service address and port as its source.
    child_a
        .send_to(b"reply-a", nat[0].local_addr().unwrap())
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, from) = nat[0].recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"reply-a");
    assert_eq!(
        from, to1,
        "the reply's source is the address the NAS sent to"
    );

    // Closing the child returns its flow to the wildcards.
    if let Some(fp) = &mut sc.fastpath {
        fp.unregister_child(&flow_key(nat[0].local_addr().unwrap(), to1));
    }
    drop(child_a);
    for seq in 100..110 {
        nat[0].send_to(&packet(0, seq, 40), to1).unwrap();
    }
    let back = drain(&sc.wildcards.iter().collect::<Vec<_>>(), QUIET);
    assert_eq!(
        back.len(),
        10,
        "a closed child's flow goes back to the wildcards"
    );
    assert!(back.iter().all(|(_, _, p)| tag_of(p).0 == 0));

    if let Some(fp) = &sc.fastpath {
        let c = fp.counters().unwrap();
        assert_eq!(
            c.get(Counter::SteerChild),
            100,
            "steer assigned 100 to children"
        );
        assert_eq!(c.get(Counter::SteerListener), 4 + 100 + 10);
        assert_eq!(c.get(Counter::SteerAssignError), 0);
    }
    drop(child_d);
}

#[test]
fn fast_path_steers_known_ipv4_flows_to_their_child() {
    steering(SteeringPath::Fast, false);
}

#[test]
fn fast_path_steers_known_ipv6_flows_to_their_child() {
    steering(SteeringPath::Fast, true);
}

#[test]
fn user_space_path_steers_known_ipv4_flows_to_their_child() {
    steering(SteeringPath::UserSpace, false);
}

#[test]
fn user_space_path_steers_known_ipv6_flows_to_their_child() {
    steering(SteeringPath::UserSpace, true);
}

/// 20 peers keep sending while children of other flows are created; not one of their
/// packets may land on a child that is not theirs.
fn setup_race(path: SteeringPath) {
    if !require_root("setup_race") {
        return;
    }
    let topo = Topology::new();
    // Bound to the service address itself, so user-space children share the wildcards'
    // reuseport group (the case the classic BPF filter protects).
    let mut sc = sidecar(&topo, path, "192.0.2.1:1812", 2);
    let to = service_addr(SIDECAR1_V4, 1812);

    let background: Vec<UdpSocket> = topo
        .nas1
        .run(|| (0..20).map(|_| nas_socket(NAS1_V4)).collect());
    let newcomers: Vec<UdpSocket> = topo
        .nas1
        .run(|| (0..200).map(|_| nas_socket(NAS1_V4)).collect());

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bg = {
        let stop = stop.clone();
        let socks: Vec<UdpSocket> = background.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            let mut sent = 0u32;
            // Bounded in count and time.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && sent < 200_000
                && std::time::Instant::now() < deadline
            {
                for (i, s) in socks.iter().enumerate() {
                    let _ = s.send_to(&packet(1000 + i as u32, sent, 24), to);
                }
                sent += 1;
                if sent.is_multiple_of(64) {
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            sent
        })
    };

    let mut children = Vec::new();
    for (i, s) in newcomers.iter().enumerate() {
        let child = add_child(&topo, &mut sc, path, to, s.local_addr().unwrap());
        s.send_to(&packet(i as u32, 0, 24), to).unwrap();
        children.push(child);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = bg.join().unwrap();
    assert!(rounds > 0, "the background peers sent");

    let refs: Vec<&UdpSocket> = children.iter().collect();
    let got = drain(&refs, QUIET);
    // What each child's reader accepts as its own flow: the daemon checks every datagram's
    // source against the flow and hands foreign ones back to the listener.
    let remotes: Vec<SocketAddr> = newcomers.iter().map(|s| s.local_addr().unwrap()).collect();
    let (own, foreign): (Vec<_>, Vec<_>) = got
        .iter()
        .partition(|(i, from, _)| is_own_datagram(remotes[*i], *from));
    let accepted_wrong = own
        .iter()
        .filter(|(i, _, p)| tag_of(p).0 != *i as u32)
        .count();
    assert_eq!(
        accepted_wrong, 0,
        "a child accepted a packet of another peer"
    );
    assert_eq!(
        own.len(),
        200,
        "each newcomer's packet reached its own child"
    );
    assert!(foreign.iter().all(|(_, _, p)| tag_of(p).0 >= 1000));
    let sent_in_window = (rounds as usize) * 20;
    match path {
        // steer decides before the kernel's own lookup: nothing can land elsewhere.
        SteeringPath::Fast => assert_eq!(foreign.len(), 0, "the fast path misdelivered"),
        // Known kernel race (see socket::is_own_datagram): rare, and recovered.
        SteeringPath::UserSpace => {
            eprintln!(
                "user-space path: {} of {sent_in_window} background datagrams reached a \
                 connecting child (re-dispatched by its reader)",
                foreign.len()
            );
            // Measured here: 0 to 2 of ~3 000 (without the fixes in socket::bind_child,
            // 40 to 60). The bound catches a regression; the reader's check recovers the rest.
            assert!(
                foreign.len() * 200 <= sent_in_window,
                "more than 1 in 200 background datagrams reached a child: {}",
                foreign.len()
            );
        }
    }
    // Drain the wildcards so the background traffic is accounted for.
    let w: Vec<&UdpSocket> = sc.wildcards.iter().collect();
    let wild = drain(&w, QUIET);
    assert!(
        wild.iter().all(|(_, _, p)| tag_of(p).0 >= 1000),
        "only the background peers (no child) reached the wildcards"
    );
    assert!(!wild.is_empty());
}

#[test]
fn fast_path_setup_race_steals_nothing() {
    setup_race(SteeringPath::Fast);
}

#[test]
fn user_space_path_setup_race_steals_nothing() {
    setup_race(SteeringPath::UserSpace);
}
