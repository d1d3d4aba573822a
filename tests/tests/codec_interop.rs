//! The codec against real implementations: packets it builds are answered by a real
//! FreeRADIUS, whose replies verify; packets radclient sends are captured, verify, and are
//! rebuilt byte for byte. Run as root (a private namespace for FreeRADIUS's ports).

use std::{net::UdpSocket, time::Duration};

use radius_sidecar::codec::{
    Code, Packet, PacketMut, attr,
    auth::{self, random_authenticator},
    dict::Dictionary,
    edit, hide,
};
use tests::*;

const SECRET: &str = "nas-secret-7";

const USERS: &str = r#"alice	Cleartext-Password := "alice-pw"
	Reply-Message := "hello alice",
	Tunnel-Type := VLAN,
	Tunnel-Medium-Type := IEEE-802,
	Tunnel-Private-Group-Id := "10",
	Tunnel-Password := "tunnel-secret-42"

bob	Cleartext-Password := "bob-pw"
	Reply-Message := "hello bob"
"#;

fn exchange(sock: &UdpSocket, packet: &[u8]) -> Vec<u8> {
    sock.send_to(packet, "127.0.0.1:1812").unwrap();
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("FreeRADIUS answers");
    buf[..n].to_vec()
}

fn access_request(id: u8, user: &str, password: &str) -> (Vec<u8>, [u8; 16]) {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, id).unwrap();
    let auth = random_authenticator();
    p.set_authenticator(&auth);
    p.message_authenticator_first().unwrap();
    p.push(attr::USER_NAME, user.as_bytes()).unwrap();
    let mut hidden = [0u8; 128];
    let n = hide::hide_user_password(password.as_bytes(), SECRET.as_bytes(), &auth, &mut hidden)
        .unwrap();
    p.push(attr::USER_PASSWORD, &hidden[..n]).unwrap();
    p.push(attr::NAS_IP_ADDRESS, &[127, 0, 0, 1]).unwrap();
    p.sign(SECRET.as_bytes(), None).unwrap();
    (p.as_bytes().to_vec(), auth)
}

#[test]
fn freeradius_accepts_what_the_codec_builds_and_its_replies_verify() {
    if !require_root("codec interop") {
        return;
    }
    let ns = NetNs::new("fr");
    let _fr = FreeRadius::start(&ns, &[("127.0.0.1", SECRET)], USERS);
    let sock = ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let secret = SECRET.as_bytes();

    // PAP, with a reply carrying a hidden Tunnel-Password.
    let (req, req_auth) = access_request(1, "alice", "alice-pw");
    let reply = exchange(&sock, &req);
    let r = Packet::parse(&reply).unwrap();
    assert_eq!(r.code(), Code::AccessAccept);
    auth::verify(&r, secret, Some(&req_auth)).unwrap();
    assert_eq!(r.get(attr::REPLY_MESSAGE).unwrap().value, b"hello alice");
    let tp = r.get(attr::TUNNEL_PASSWORD).unwrap();
    let mut clear = [0u8; 256];
    let n = hide::reveal_salted(&tp.value[1..], secret, &req_auth, &mut clear).unwrap();
    assert_eq!(&clear[..n], b"tunnel-secret-42");
    // Every attribute of the reply has a name in the built-in dictionary.
    let d = Dictionary::builtin();
    for a in r.attributes() {
        assert!(d.standard(a.ty).is_some(), "attribute {} unnamed", a.ty);
    }

    // A wrong password is rejected, and the Reject verifies too.
    let (req, req_auth) = access_request(2, "alice", "nope");
    let r = exchange(&sock, &req);
    let r = Packet::parse(&r).unwrap();
    assert_eq!(r.code(), Code::AccessReject);
    auth::verify(&r, secret, Some(&req_auth)).unwrap();

    // CHAP: CHAP-Password = ident | MD5(ident | password | challenge), the Request
    // Authenticator as challenge (RFC 2865 2.2).
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 3).unwrap();
    let chap_auth = random_authenticator();
    p.set_authenticator(&chap_auth);
    p.push(attr::USER_NAME, b"bob").unwrap();
    let mut chap = vec![42u8];
    {
        use md5::{Digest, Md5};
        let mut h = Md5::new();
        h.update([42u8]);
        h.update(b"bob-pw");
        h.update(chap_auth);
        chap.extend_from_slice(&h.finalize());
    }
    p.push(attr::CHAP_PASSWORD, &chap).unwrap();
    p.push(attr::NAS_IP_ADDRESS, &[127, 0, 0, 1]).unwrap();
    p.sign(secret, None).unwrap();
    let r = exchange(&sock, p.as_bytes());
    let r = Packet::parse(&r).unwrap();
    assert_eq!(r.code(), Code::AccessAccept, "CHAP accepted");
    auth::verify(&r, secret, Some(&chap_auth)).unwrap();

    // Accounting Start and Stop: MD5 request authenticators, verified responses.
    for (id, status) in [(4u8, 1u32), (5, 2)] {
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, id).unwrap();
        p.push(attr::USER_NAME, b"alice").unwrap();
        p.push(attr::ACCT_STATUS_TYPE, &status.to_be_bytes())
            .unwrap();
        p.push(attr::ACCT_SESSION_ID, b"sess-1").unwrap();
        p.push(attr::NAS_IP_ADDRESS, &[127, 0, 0, 1]).unwrap();
        p.sign(secret, None).unwrap();
        let req_auth = p.authenticator();
        sock.send_to(p.as_bytes(), "127.0.0.1:1813").unwrap();
        let mut rb = [0u8; 4096];
        let n = sock.recv(&mut rb).expect("Accounting-Response");
        let r = Packet::parse(&rb[..n]).unwrap();
        assert_eq!(r.code(), Code::AccountingResponse);
        assert_eq!(r.identifier(), id);
        auth::verify(&r, secret, Some(&req_auth)).unwrap();
    }

    // Status-Server (RFC 5997) built by the codec is answered.
    let mut buf = [0u8; 4096];
    let ss = edit::status_server(&mut buf, 6, secret).unwrap();
    let ss_auth = ss.authenticator();
    let r = exchange(&sock, ss.as_bytes());
    let r = Packet::parse(&r).unwrap();
    assert_eq!(r.code(), Code::AccessAccept);
    auth::verify(&r, secret, Some(&ss_auth)).unwrap();
}

/// Runs radclient against a socket of ours and returns the first datagram it sent.
fn capture_radclient(ns: &NetNs, kind: &str, input: &str) -> Vec<u8> {
    let server = ns.run(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    });
    let target = server.local_addr().unwrap().to_string();
    let mut child = spawn_radclient(ns, &["-r", "1", "-t", "1", &target, kind, SECRET], input);
    let mut buf = [0u8; 4096];
    let n = server.recv(&mut buf).expect("radclient sends");
    let _ = child.kill();
    let _ = child.wait();
    buf[..n].to_vec()
}

#[test]
fn radclient_packets_parse_verify_and_are_rebuilt_byte_for_byte() {
    if !require_root("radclient capture") {
        return;
    }
    let ns = NetNs::new("rc");
    let secret = SECRET.as_bytes();
    let captured = capture_radclient(
        &ns,
        "auth",
        "User-Name = \"alice\", User-Password = \"alice-pw\", NAS-IP-Address = 127.0.0.1, \
         NAS-Port = 7, Message-Authenticator = 0x00\n",
    );
    let p = Packet::parse(&captured).unwrap();
    assert_eq!(p.code(), Code::AccessRequest);
    auth::verify(&p, secret, None).unwrap();
    let mut clear = [0u8; 128];
    let n = hide::reveal_user_password(
        p.get(attr::USER_PASSWORD).unwrap().value,
        secret,
        p.authenticator(),
        &mut clear,
    )
    .unwrap();
    assert_eq!(&clear[..n], b"alice-pw");

    // Rebuild it from its meaning, in radclient's order, with its Identifier and
    // authenticator: the codec's bytes are radclient's bytes.
    let mut buf = [0u8; 4096];
    let mut q = PacketMut::new(&mut buf, Code::AccessRequest, p.identifier()).unwrap();
    q.set_authenticator(p.authenticator());
    for a in p.attributes() {
        match a.ty {
            attr::USER_PASSWORD => {
                let mut h = [0u8; 128];
                let n = hide::hide_user_password(b"alice-pw", secret, p.authenticator(), &mut h)
                    .unwrap();
                q.push(a.ty, &h[..n]).unwrap();
            }
            attr::MESSAGE_AUTHENTICATOR => {
                q.push(a.ty, &[0; 16]).unwrap();
            }
            _ => {
                q.push(a.ty, a.value).unwrap();
            }
        }
    }
    q.sign(secret, None).unwrap();
    assert_eq!(q.as_bytes(), &captured[..]);

    // Accounting: radclient's MD5 Request Authenticator verifies and is reproduced.
    let captured = capture_radclient(
        &ns,
        "acct",
        "User-Name = \"alice\", Acct-Status-Type = Start, Acct-Session-Id = \"s1\", \
         NAS-IP-Address = 127.0.0.1\n",
    );
    let p = Packet::parse(&captured).unwrap();
    assert_eq!(p.code(), Code::AccountingRequest);
    auth::verify(&p, secret, None).unwrap();
    let mut buf = [0u8; 4096];
    let mut q = PacketMut::new(&mut buf, Code::AccountingRequest, p.identifier()).unwrap();
    for a in p.attributes() {
        q.push(a.ty, a.value).unwrap();
    }
    q.sign(secret, None).unwrap();
    assert_eq!(q.as_bytes(), &captured[..]);
}

#[test]
fn the_freeradius_dictionaries_load() {
    let path = std::path::Path::new("/usr/share/freeradius/dictionary");
    assert!(
        path.exists(),
        "FreeRADIUS's dictionaries are missing: install freeradius-common (`cargo xtask test` does)"
    );
    let d = Dictionary::load(path).unwrap();
    assert!(d.len() > 5_000, "only {} attributes", d.len());
    assert_eq!(d.by_name("User-Password").unwrap().encrypt, 1);
    assert_eq!(d.by_name("Cisco-AVPair").unwrap().key.vendor, 9);
    assert_eq!(d.by_name("MS-MPPE-Recv-Key").unwrap().encrypt, 2);
    assert_eq!(d.vendor_by_name("Lucent").unwrap().type_size, 2);
    assert_eq!(d.value_name("Service-Type", 2), Some("Framed-User"));
}
