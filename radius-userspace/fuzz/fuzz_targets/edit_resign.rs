//! The proxy's edit of any packet that parses: Proxy-State added, Message-Authenticator
//! first, new Identifier and authenticator, hidden values re-hidden, signed. The result must
//! parse, verify under the new secret, and give the Proxy-State back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use radius_sidecar::codec::{Packet, PacketMut, auth};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::parse(data) else {
        return;
    };
    let (code, old_auth) = (p.code(), *p.authenticator());
    let mut buf = [0u8; 4096];
    buf[..data.len().min(4096)].copy_from_slice(&data[..data.len().min(4096)]);
    let Ok(mut m) = PacketMut::from_datagram(&mut buf, data.len().min(4096)) else {
        panic!("parsed once, must parse again");
    };
    if m.add_proxy_state(b"fuzz-ps").is_err() || m.message_authenticator_first().is_err() {
        return; // full: refused, not corrupted
    }
    m.set_identifier(m.identifier().wrapping_add(1));
    let new_auth = [0x42u8; 16];
    m.set_authenticator(&new_auth);
    // Hidden values that do not have a valid shape are refused, never corrupt the packet.
    let _ = m.rehide((b"secret-a", &old_auth), (b"secret-b", &new_auth));
    let req_auth = [7u8; 16];
    let ra = (!code.is_request()).then_some(&req_auth);
    m.sign(b"secret-b", ra).expect("sign");
    let out = m.as_bytes().to_vec();
    let q = Packet::parse(&out).expect("an edited packet parses");
    assert_eq!(q.message_authenticator_offset(), Some(20));
    auth::verify(&q, b"secret-b", ra).expect("an edited packet verifies");
    let mut buf2 = [0u8; 4096];
    buf2[..out.len()].copy_from_slice(&out);
    let mut r = PacketMut::from_datagram(&mut buf2, out.len()).expect("parses");
    assert!(r.strip_proxy_state(b"fuzz-ps"));
});
