//! NAT, end to end through a real FreeRADIUS: many flows from one address with the same
//! Identifier at the same instant each get their own reply; two NASes behind one address
//! with different secrets are told apart (by a proven Message-Authenticator) and both served.
//! Run as root.

use std::{collections::HashMap, net::UdpSocket, time::Duration};

use radius_sidecar::codec::{Code, Packet, attr, auth};
use tests::*;

const UPSTREAM_SECRET: &str = "nat-upstream";
const USERS: &str = "alice\tCleartext-Password := \"alice-pw\"\n";

fn request(id: u8, secret: &str, nas_id: &str) -> (Vec<u8>, [u8; 16]) {
    pap_request(
        id,
        "alice",
        "alice-pw",
        secret,
        &[(attr::NAS_IDENTIFIER, nas_id.as_bytes())],
    )
}

fn start(topo: &Topology, fast: bool) -> Daemon {
    sidecar_with_config(
        &topo.sidecar,
        if fast { "nat-fast" } else { "nat-user" },
        &format!(
            r#"[server]
listen = ["0.0.0.0:1812"]
workers = 2
iface = "sc1"
ebpf = "{}"

[[upstream]]
name = "freeradius"
auth = "127.0.0.1:11812"
secret = "{UPSTREAM_SECRET}"

[[client]]
prefix = "192.0.2.0/24"
secret = "shared-nat-secret"

[[client]]
prefix = "198.51.100.0/24"
nas_identifier = "ap-red"
secret = "red-secret"

[[client]]
prefix = "198.51.100.0/24"
nas_identifier = "ap-blue"
secret = "blue-secret"
"#,
            if fast { "require" } else { "off" }
        ),
    )
}

fn nat(fast: bool) {
    if !require_root("nat e2e") {
        return;
    }
    let topo = Topology::new();
    let _fr = FreeRadius::start_on(
        &topo.sidecar,
        &[("127.0.0.1", UPSTREAM_SECRET)],
        USERS,
        11812,
    );
    let _d = start(&topo, fast);

    // 20 flows behind one address, all with Identifier 7, sent at the same instant.
    let socks: Vec<UdpSocket> = topo.nas1.run(|| {
        (0..20)
            .map(|_| {
                let s = nas_socket(NAS1_V4);
                s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                s
            })
            .collect()
    });
    let to1 = format!("{SIDECAR1_V4}:1812");
    let auths: Vec<[u8; 16]> = socks
        .iter()
        .map(|s| {
            let (p, a) = request(7, "shared-nat-secret", "any");
            s.send_to(&p, &to1).unwrap();
            a
        })
        .collect();
    for (s, a) in socks.iter().zip(&auths) {
        let mut buf = [0u8; 4096];
        let n = s.recv(&mut buf).expect("each flow gets its reply");
        let r = Packet::parse(&buf[..n]).unwrap();
        assert_eq!(r.identifier(), 7);
        auth::verify(&r, b"shared-nat-secret", Some(a)).expect("its own reply, not another's");
        assert_eq!(r.code(), Code::AccessAccept);
    }

    // Two NASes behind one address (NAS2's), each with its own secret.
    let (red, blue) = topo.nas2.run(|| {
        let r = nas_socket(NAS2_V4);
        let b = nas_socket(NAS2_V4);
        r.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        (r, b)
    });
    let to2 = format!("{SIDECAR2_V4}:1812");
    let mut answers = HashMap::new();
    for (sock, secret, name) in [
        (&red, "red-secret", "ap-red"),
        (&blue, "blue-secret", "ap-blue"),
    ] {
        for id in 0..3u8 {
            let (p, a) = request(id, secret, name);
            sock.send_to(&p, &to2).unwrap();
            let mut buf = [0u8; 4096];
            let n = sock.recv(&mut buf).expect("answered");
            let r = Packet::parse(&buf[..n]).unwrap();
            auth::verify(&r, secret.as_bytes(), Some(&a)).expect("signed with this NAS's secret");
            assert_eq!(r.code(), Code::AccessAccept);
            *answers.entry(name).or_insert(0) += 1;
        }
    }
    assert_eq!(answers.get("ap-red"), Some(&3));
    assert_eq!(answers.get("ap-blue"), Some(&3));
    // A NAS that claims ap-red with blue's secret proves nothing: not answered.
    let liar = topo.nas2.run(|| {
        let s = nas_socket(NAS2_V4);
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s
    });
    liar.send_to(&request(1, "blue-secret", "ap-red").0, &to2)
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(liar.recv(&mut buf).is_err());
}

#[test]
fn fast_path_nat_flows_and_nases_behind_one_address() {
    nat(true);
}

#[test]
fn user_space_path_nat_flows_and_nases_behind_one_address() {
    nat(false);
}
