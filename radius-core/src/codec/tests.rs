//! The codec against the RFCs' own bytes, its own round trips, and arbitrary input.

use proptest::prelude::*;

use super::{
    HEADER_LEN, Packet, PacketMut, ParseError, attr,
    auth::{self, VerifyError},
    edit, hide,
    packet::{Code, long_extended_value},
    value::{DataType, Value, decode},
};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

const RFC2865_SECRET: &[u8] = b"xyzzy5461";

/// RFC 2865 section 7.1: user `nemo`, password `arctangent`, NAS 192.168.1.16 port 3.
fn rfc2865_7_1_request() -> Vec<u8> {
    hex("01 00 00 38 0f 40 3f 94 73 97 80 57 bd 83 d5 cb
         98 f4 22 7a 01 06 6e 65 6d 6f 02 12 0d be 70 8d
         93 d4 13 ce 31 96 e4 3f 78 2a 0a ee 04 06 c0 a8
         01 10 05 06 00 00 00 03")
}

fn rfc2865_7_1_accept() -> Vec<u8> {
    hex("02 00 00 26 86 fe 22 0e 76 24 ba 2a 10 05 f6 bf
         9b 55 e0 b2 06 06 00 00 00 01 0f 06 00 00 00 00
         0e 06 c0 a8 01 03")
}

/// RFC 2865 section 7.2: CHAP user `flopsy`, framed PPP.
fn rfc2865_7_2_request() -> Vec<u8> {
    hex("01 01 00 47 2a ee 86 f0 8d 0d 55 96 9c a5 97 8e
         0d 33 67 a2 01 08 66 6c 6f 70 73 79 03 13 16 e9
         75 57 c3 16 18 58 95 f2 93 ff 63 44 07 72 75 04
         06 c0 a8 01 10 05 06 00 00 00 14 06 06 00 00 00
         02 07 06 00 00 00 01")
}

fn rfc2865_7_2_accept() -> Vec<u8> {
    hex("02 01 00 38 15 ef bc 7d ab 26 cf a3 dc 34 d9 c0
         3c 86 01 a4 06 06 00 00 00 02 07 06 00 00 00 01
         08 06 ff ff ff fe 0a 06 00 00 00 02 0d 06 00 00
         00 01 0c 06 00 00 05 dc")
}

#[test]
fn rfc2865_7_1_parses_reveals_the_password_and_verifies_the_reply() {
    let req_bytes = rfc2865_7_1_request();
    let req = Packet::parse(&req_bytes).unwrap();
    assert_eq!(req.code(), Code::AccessRequest);
    assert_eq!(req.identifier(), 0);
    let names: Vec<u8> = req.attributes().map(|a| a.ty).collect();
    assert_eq!(names, vec![1, 2, 4, 5]);
    assert_eq!(req.get(attr::USER_NAME).unwrap().value, b"nemo");
    let mut clear = [0u8; 128];
    let n = hide::reveal_user_password(
        req.get(attr::USER_PASSWORD).unwrap().value,
        RFC2865_SECRET,
        req.authenticator(),
        &mut clear,
    )
    .unwrap();
    assert_eq!(&clear[..n], b"arctangent");

    let acc_bytes = rfc2865_7_1_accept();
    let acc = Packet::parse(&acc_bytes).unwrap();
    auth::verify(&acc, RFC2865_SECRET, Some(req.authenticator())).unwrap();
    assert_eq!(
        auth::verify(&acc, b"wrong", Some(req.authenticator())),
        Err(VerifyError::BadAuthenticator)
    );
}

#[test]
fn rfc2865_7_1_is_rebuilt_byte_for_byte() {
    let original = rfc2865_7_1_request();
    let req = Packet::parse(&original).unwrap();
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 0).unwrap();
    p.set_authenticator(req.authenticator());
    p.push(attr::USER_NAME, b"nemo").unwrap();
    let mut hidden = [0u8; 128];
    let n = hide::hide_user_password(
        b"arctangent",
        RFC2865_SECRET,
        req.authenticator(),
        &mut hidden,
    )
    .unwrap();
    p.push(attr::USER_PASSWORD, &hidden[..n]).unwrap();
    p.push(attr::NAS_IP_ADDRESS, &[192, 168, 1, 16]).unwrap();
    p.push(attr::NAS_PORT, &3u32.to_be_bytes()).unwrap();
    p.sign(RFC2865_SECRET, None).unwrap();
    assert_eq!(p.as_bytes(), &original[..]);

    // And the reply, signed with the request's authenticator.
    let want = rfc2865_7_1_accept();
    let mut buf = [0u8; 4096];
    let mut r = PacketMut::new(&mut buf, Code::AccessAccept, 0).unwrap();
    r.push(6, &1u32.to_be_bytes()).unwrap();
    r.push(15, &0u32.to_be_bytes()).unwrap();
    r.push(14, &[192, 168, 1, 3]).unwrap();
    r.sign(RFC2865_SECRET, Some(req.authenticator())).unwrap();
    assert_eq!(r.as_bytes(), &want[..]);
}

#[test]
fn rfc2865_7_2_chap_reply_verifies() {
    let req_bytes = rfc2865_7_2_request();
    let req = Packet::parse(&req_bytes).unwrap();
    assert_eq!(req.get(attr::USER_NAME).unwrap().value, b"flopsy");
    assert_eq!(req.get(attr::CHAP_PASSWORD).unwrap().value.len(), 17);
    let acc_bytes = rfc2865_7_2_accept();
    let acc = Packet::parse(&acc_bytes).unwrap();
    auth::verify(&acc, RFC2865_SECRET, Some(req.authenticator())).unwrap();
    let d = super::dict::Dictionary::builtin();
    let types: Vec<&str> = acc
        .attributes()
        .map(|a| d.standard(a.ty).unwrap().name.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "Service-Type",
            "Framed-Protocol",
            "Framed-IP-Address",
            "Framed-Routing",
            "Framed-Compression",
            "Framed-MTU"
        ]
    );
    let mtu = acc.get(12).unwrap();
    assert_eq!(
        decode(d.standard(12).unwrap().ty, mtu.value).unwrap(),
        Value::Integer(1500)
    );
}

#[test]
fn every_malformation_is_named_with_its_offset() {
    let good = rfc2865_7_1_request();
    let cases: Vec<(Vec<u8>, ParseError)> = vec![
        (good[..19].to_vec(), ParseError::ShortHeader { len: 19 }),
        (
            {
                let mut p = good.clone();
                p[0] = 99;
                p
            },
            ParseError::UnknownCode { code: 99 },
        ),
        (
            {
                let mut p = good.clone();
                p[2..4].copy_from_slice(&19u16.to_be_bytes());
                p
            },
            ParseError::LengthTooSmall { length: 19 },
        ),
        (
            {
                let mut p = good.clone();
                p[2..4].copy_from_slice(&4097u16.to_be_bytes());
                p
            },
            ParseError::LengthTooLarge { length: 4097 },
        ),
        (
            {
                let mut p = good.clone();
                p[2..4].copy_from_slice(&57u16.to_be_bytes());
                p
            },
            ParseError::LengthPastDatagram {
                length: 57,
                datagram: 56,
            },
        ),
        (
            {
                let mut p = good.clone();
                p[21] = 1; // User-Name length 1
                p
            },
            ParseError::AttributeTooShort {
                offset: 20,
                ty: 1,
                length: 1,
            },
        ),
        (
            {
                let mut p = good.clone();
                p[51] = 7; // NAS-Port runs one byte past the end
                p
            },
            ParseError::AttributePastEnd {
                offset: 50,
                ty: 5,
                length: 7,
                end: 56,
            },
        ),
        (
            {
                let mut p = good.clone();
                p.push(0x50);
                p[2..4].copy_from_slice(&57u16.to_be_bytes());
                p
            },
            ParseError::AttributeHeaderTruncated { offset: 56 },
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(Packet::parse(&bytes).unwrap_err(), want, "{want}");
    }
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 1).unwrap();
    p.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap();
    p.push(attr::MESSAGE_AUTHENTICATOR, &[0; 16]).unwrap();
    assert_eq!(
        Packet::parse(p.as_bytes()).unwrap_err(),
        ParseError::DuplicateMessageAuthenticator { offset: 38 }
    );
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 1).unwrap();
    p.push(attr::MESSAGE_AUTHENTICATOR, &[0; 15]).unwrap();
    assert_eq!(
        Packet::parse(p.as_bytes()).unwrap_err(),
        ParseError::BadMessageAuthenticatorLength {
            offset: 20,
            length: 17
        }
    );
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessRequest, 1).unwrap();
    p.push(attr::USER_NAME, b"bob").unwrap();
    p.push(attr::EAP_MESSAGE, &[2, 0, 0, 5, 1]).unwrap();
    assert_eq!(
        Packet::parse(p.as_bytes()).unwrap_err(),
        ParseError::EapWithoutMessageAuthenticator { offset: 25 }
    );
    // Padding past the length field is ignored (RFC 2865 section 3).
    let mut padded = good.clone();
    padded.extend_from_slice(&[0xaa; 9]);
    assert_eq!(Packet::parse(&padded).unwrap().as_bytes(), &good[..]);
}

#[test]
fn every_code_of_the_rfcs_is_known() {
    let codes: Vec<u8> = Code::ALL.iter().map(|c| *c as u8).collect();
    assert_eq!(
        codes,
        [1, 2, 3, 4, 5, 11, 12, 13, 40, 41, 42, 43, 44, 45, 52]
    );
    for c in Code::ALL {
        assert_eq!(Code::from_u8(c as u8), Some(c));
    }
    assert_eq!(Code::from_u8(6), None);
}

/// The whole proxy edit of a request: from the NAS's secret and authenticator to the
/// upstream's, with Proxy-State, the Message-Authenticator first, and a new Identifier.
#[test]
fn a_request_is_re_signed_for_the_upstream_and_back() {
    let mut buf = [0u8; 4096];
    let original = rfc2865_7_1_request();
    buf[..original.len()].copy_from_slice(&original);
    let nas_auth = *Packet::parse(&original).unwrap().authenticator();
    let up_auth = [7u8; 16];
    let mut p = PacketMut::from_datagram(&mut buf, original.len()).unwrap();
    p.add_proxy_state(b"sidecar-1").unwrap();
    p.message_authenticator_first().unwrap();
    p.set_identifier(200);
    p.set_authenticator(&up_auth);
    assert_eq!(
        p.rehide((RFC2865_SECRET, &nas_auth), (b"upstream-secret", &up_auth))
            .unwrap(),
        1
    );
    p.sign(b"upstream-secret", None).unwrap();
    let out = p.as_bytes().to_vec();

    let q = Packet::parse(&out).unwrap();
    assert_eq!(q.identifier(), 200);
    assert_eq!(q.message_authenticator_offset(), Some(HEADER_LEN));
    assert_eq!(q.attributes().last().unwrap().value, b"sidecar-1");
    auth::verify(&q, b"upstream-secret", None).unwrap();
    assert_eq!(
        auth::verify(&q, RFC2865_SECRET, None),
        Err(VerifyError::BadMessageAuthenticator)
    );
    let mut clear = [0u8; 128];
    let n = hide::reveal_user_password(
        q.get(attr::USER_PASSWORD).unwrap().value,
        b"upstream-secret",
        &up_auth,
        &mut clear,
    )
    .unwrap();
    assert_eq!(&clear[..n], b"arctangent");

    // The reply comes back with our Proxy-State; we strip it and re-sign for the NAS.
    let mut rbuf = [0u8; 4096];
    let mut r = PacketMut::new(&mut rbuf, Code::AccessAccept, 200).unwrap();
    r.message_authenticator_first().unwrap();
    r.push(attr::REPLY_MESSAGE, b"hi").unwrap();
    r.add_proxy_state(b"sidecar-1").unwrap();
    r.sign(b"upstream-secret", Some(&up_auth)).unwrap();
    auth::verify(&r.view().unwrap(), b"upstream-secret", Some(&up_auth)).unwrap();
    assert!(!r.strip_proxy_state(b"someone-else"));
    assert!(r.strip_proxy_state(b"sidecar-1"));
    r.set_identifier(0);
    r.sign(RFC2865_SECRET, Some(&nas_auth)).unwrap();
    let back = r.view().unwrap();
    assert!(back.get(attr::PROXY_STATE).is_none());
    auth::verify(&back, RFC2865_SECRET, Some(&nas_auth)).unwrap();
}

#[test]
fn tunnel_password_and_mppe_keys_are_re_hidden_for_the_nas() {
    let (up_secret, nas_secret) = (b"upstream".as_slice(), b"nas-secret".as_slice());
    let (up_auth, nas_auth) = ([1u8; 16], [2u8; 16]);
    let send_key = [0x5au8; 32];
    let recv_key = [0xa5u8; 32];
    let mut buf = [0u8; 4096];
    let mut r = PacketMut::new(&mut buf, Code::AccessAccept, 9).unwrap();
    let mut v = [0u8; 64];
    v[0] = 1; // tag
    let n = hide::hide_salted(
        b"tunnel-pass",
        [0x81, 0x01],
        up_secret,
        &up_auth,
        &mut v[1..],
    )
    .unwrap();
    r.push(attr::TUNNEL_PASSWORD, &v[..1 + n]).unwrap();
    let n = hide::hide_salted(&send_key, [0x82, 0x02], up_secret, &up_auth, &mut v).unwrap();
    r.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_SEND_KEY, &v[..n])
        .unwrap();
    let n = hide::hide_salted(&recv_key, [0x83, 0x03], up_secret, &up_auth, &mut v).unwrap();
    r.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_RECV_KEY, &v[..n])
        .unwrap();
    assert_eq!(
        r.rehide((up_secret, &up_auth), (nas_secret, &nas_auth))
            .unwrap(),
        3
    );
    r.sign(nas_secret, Some(&nas_auth)).unwrap();
    let p = r.view().unwrap();
    let mut out = [0u8; 256];
    let tp = p.get(attr::TUNNEL_PASSWORD).unwrap();
    assert_eq!(tp.value[0], 1, "the tag is kept");
    let n = hide::reveal_salted(&tp.value[1..], nas_secret, &nas_auth, &mut out).unwrap();
    assert_eq!(&out[..n], b"tunnel-pass");
    let keys: Vec<Vec<u8>> = p
        .get_all(attr::VENDOR_SPECIFIC)
        .map(|a| {
            let (vendor, mut subs) = a.vendor_attributes().unwrap();
            assert_eq!(vendor, 311);
            let s = subs.next().unwrap();
            let n = hide::reveal_salted(s.value, nas_secret, &nas_auth, &mut out).unwrap();
            out[..n].to_vec()
        })
        .collect();
    assert_eq!(keys, vec![send_key.to_vec(), recv_key.to_vec()]);
}

#[test]
fn md5_authenticated_requests_and_builders_verify() {
    let secret = b"acct-secret";
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccountingRequest, 3).unwrap();
    p.push(attr::ACCT_STATUS_TYPE, &1u32.to_be_bytes()).unwrap();
    p.push(attr::ACCT_SESSION_ID, b"abc").unwrap();
    p.push(attr::PROXY_STATE, b"ps1").unwrap();
    p.sign(secret, None).unwrap();
    let req_bytes = p.as_bytes().to_vec();
    let req = Packet::parse(&req_bytes).unwrap();
    auth::verify(&req, secret, None).unwrap();
    assert_eq!(
        auth::verify(&req, b"x", None),
        Err(VerifyError::BadAuthenticator)
    );

    let mut rbuf = [0u8; 4096];
    let resp = edit::accounting_response(&mut rbuf, &req, secret).unwrap();
    let resp = resp.view().unwrap();
    assert_eq!(resp.code(), Code::AccountingResponse);
    assert_eq!(resp.get(attr::PROXY_STATE).unwrap().value, b"ps1");
    auth::verify(&resp, secret, Some(req.authenticator())).unwrap();

    let mut sbuf = [0u8; 4096];
    let ss = edit::status_server(&mut sbuf, 77, secret).unwrap();
    let ss = ss.view().unwrap();
    assert_eq!(ss.message_authenticator_offset(), Some(HEADER_LEN));
    auth::verify(&ss, secret, None).unwrap();

    let mut ebuf = [0u8; 4096];
    let pe = edit::protocol_error(&mut ebuf, &req, 404, secret).unwrap();
    let pe = pe.view().unwrap();
    assert_eq!(pe.code(), Code::ProtocolError);
    assert_eq!(
        pe.get(attr::ERROR_CAUSE).unwrap().value,
        404u32.to_be_bytes()
    );
    let (ext, v) = pe.get(attr::EXTENDED_1).unwrap().extended().unwrap();
    assert_eq!((ext, v), (4, &4u32.to_be_bytes()[..]));
    auth::verify(&pe, secret, Some(req.authenticator())).unwrap();

    // CoA-Request with a Message-Authenticator: MA over zeros, then the MD5 authenticator.
    let mut cbuf = [0u8; 4096];
    let mut coa = PacketMut::new(&mut cbuf, Code::CoaRequest, 5).unwrap();
    coa.message_authenticator_first().unwrap();
    coa.push(attr::USER_NAME, b"bob").unwrap();
    coa.sign(secret, None).unwrap();
    auth::verify(&coa.view().unwrap(), secret, None).unwrap();
}

#[test]
fn vendor_tlvs_and_extended_attributes_are_read() {
    let mut buf = [0u8; 4096];
    let mut p = PacketMut::new(&mut buf, Code::AccessAccept, 1).unwrap();
    p.push_vendor(9, 1, b"shell:priv-lvl=15").unwrap();
    p.push(attr::EXTENDED_1, &[1, 0, 0, 0, 7]).unwrap();
    p.push(attr::LONG_EXTENDED_1, &[9, 0x80, 1, 2, 3]).unwrap();
    p.push(attr::LONG_EXTENDED_1, &[9, 0x00, 4, 5]).unwrap();
    let v = p.view().unwrap();
    let vsa = v.get(attr::VENDOR_SPECIFIC).unwrap();
    let (vendor, mut subs) = vsa.vendor_attributes().unwrap();
    assert_eq!(vendor, 9);
    let s = subs.next().unwrap();
    assert_eq!((s.ty, s.value), (1, &b"shell:priv-lvl=15"[..]));
    assert_eq!(s.offset, vsa.offset + 6);
    assert_eq!(
        v.get(attr::EXTENDED_1).unwrap().extended(),
        Some((1, &[0u8, 0, 0, 7][..]))
    );
    assert_eq!(
        long_extended_value(&v, attr::LONG_EXTENDED_1, 9),
        Some(vec![1, 2, 3, 4, 5])
    );
    let d = super::dict::Dictionary::builtin();
    assert_eq!(d.attribute(9, &[1]).unwrap().name, "Cisco-AVPair");
    assert_eq!(d.attribute(0, &[241, 1]).unwrap().name, "Frag-Status");
}

#[test]
fn rfc8044_values_decode() {
    assert_eq!(
        decode(DataType::Ipv4Addr, &[10, 0, 0, 1]).unwrap(),
        Value::Ipv4([10, 0, 0, 1].into())
    );
    assert_eq!(
        decode(DataType::Ipv6Prefix, &[0, 64, 0x20, 1, 0x0d, 0xb8]).unwrap(),
        Value::Ipv6Prefix {
            len: 64,
            addr: "2001:db8::".parse().unwrap()
        }
    );
    assert_eq!(
        decode(DataType::Integer64, &[0, 0, 0, 0, 0, 0, 1, 0]).unwrap(),
        Value::Integer64(256)
    );
    assert_eq!(
        decode(DataType::Text, b"hello").unwrap(),
        Value::Text("hello")
    );
    assert!(decode(DataType::Text, &[0xff]).is_err());
    assert!(decode(DataType::Integer, &[1, 2, 3]).is_err());
    assert!(decode(DataType::Ipv6Prefix, &[0, 129]).is_err());
}

#[test]
fn hiding_rejects_what_it_cannot_carry() {
    let mut out = [0u8; 256];
    assert!(hide::hide_user_password(&[1; 129], b"s", &[0; 16], &mut out).is_err());
    assert!(hide::reveal_user_password(&[1; 15], b"s", &[0; 16], &mut out).is_err());
    assert!(hide::reveal_salted(&[0x80, 1, 2], b"s", &[0; 16], &mut out).is_err());
    let mut v = [0u8; 17];
    assert!(
        hide::rehide(
            hide::Hiding::UserPassword,
            &mut v,
            (b"a", &[0; 16]),
            (b"b", &[0; 16])
        )
        .is_err()
    );
}

fn arb_attribute() -> impl Strategy<Value = (u8, Vec<u8>)> {
    // Any type but Message-Authenticator and EAP-Message (which have their own rules).
    (1u8..=255)
        .prop_filter("MA/EAP have rules", |t| *t != 80 && *t != 79)
        .prop_flat_map(|t| (Just(t), proptest::collection::vec(any::<u8>(), 0..=60)))
}

proptest! {
    #[test]
    fn any_packet_the_encoder_makes_parses_back_to_the_same_attributes(
        code in proptest::sample::select(Code::ALL.to_vec()),
        id in any::<u8>(),
        attrs in proptest::collection::vec(arb_attribute(), 0..40),
    ) {
        let mut buf = [0u8; 4096];
        let mut p = PacketMut::new(&mut buf, code, id).unwrap();
        for (t, v) in &attrs {
            p.push(*t, v).unwrap();
        }
        let q = Packet::parse(p.as_bytes()).unwrap();
        prop_assert_eq!(q.code(), code);
        prop_assert_eq!(q.identifier(), id);
        let got: Vec<(u8, Vec<u8>)> = q.attributes().map(|a| (a.ty, a.value.to_vec())).collect();
        prop_assert_eq!(got, attrs);
    }

    #[test]
    fn the_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(p) = Packet::parse(&bytes) {
            for a in p.attributes() {
                let _ = a.vendor_attributes().map(|(_, s)| s.count());
                let _ = a.extended();
                let _ = a.long_extended();
            }
        }
    }

    #[test]
    fn headers_with_any_length_field_never_panic(
        head in proptest::collection::vec(any::<u8>(), 20..=20),
        tail in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut b = head;
        b[0] = 1;
        b.extend_from_slice(&tail);
        let _ = Packet::parse(&b);
    }

    #[test]
    fn rehide_then_reveal_gives_the_clear_text_back(
        clear in proptest::collection::vec(any::<u8>(), 0..=128),
        sa in proptest::collection::vec(any::<u8>(), 1..40),
        sb in proptest::collection::vec(any::<u8>(), 1..40),
        aa in any::<[u8; 16]>(),
        ab in any::<[u8; 16]>(),
    ) {
        // Salted values carry their own length, so any bytes survive.
        let mut v = [0u8; 256];
        let n = hide::hide_salted(&clear, [0x80, 7], &sa, &aa, &mut v).unwrap();
        hide::rehide(hide::Hiding::Mppe, &mut v[..n], (&sa, &aa), (&sb, &ab)).unwrap();
        let mut out = [0u8; 256];
        let m = hide::reveal_salted(&v[..n], &sb, &ab, &mut out).unwrap();
        prop_assert_eq!(&out[..m], &clear[..]);
        // User-Password drops trailing zeros by definition: use non-zero clear text.
        let pw: Vec<u8> = clear.iter().map(|b| b | 1).collect();
        let n = hide::hide_user_password(&pw, &sa, &aa, &mut v).unwrap();
        hide::rehide(hide::Hiding::UserPassword, &mut v[..n], (&sa, &aa), (&sb, &ab)).unwrap();
        let m = hide::reveal_user_password(&v[..n], &sb, &ab, &mut out).unwrap();
        prop_assert_eq!(&out[..m], &pw[..]);
    }
}

/// RADIUS/1.1 carries hidden types in their plain form: hiding them for a RADIUS/UDP hop
/// and revealing them again gives the same packet, and each hidden value reveals with the
/// RFC's own functions.
#[test]
fn plain_values_of_a_radius_1_1_hop_are_hidden_and_revealed_losslessly() {
    let mut buf = [0u8; 4096];
    let mut m = PacketMut::new(&mut buf, Code::AccessAccept, 0).unwrap();
    m.push(attr::USER_NAME, b"bob").unwrap();
    m.push(attr::USER_PASSWORD, b"a password").unwrap();
    m.push(attr::TUNNEL_PASSWORD, b"\x01tunnel secret").unwrap();
    let key = [7u8; 32];
    m.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_RECV_KEY, &key)
        .unwrap();
    m.push_vendor(attr::VENDOR_MICROSOFT, attr::MS_MPPE_SEND_KEY, &key)
        .unwrap();
    let plain = m.as_bytes().to_vec();
    let (secret, auth) = (b"hop-secret".as_slice(), [9u8; 16]);
    assert_eq!(m.hide_all(secret, &auth).unwrap(), 4);
    let hidden = m.as_bytes().to_vec();
    {
        let p = Packet::parse(&hidden).unwrap();
        let mut out = [0u8; 256];
        let pw = p.get(attr::USER_PASSWORD).unwrap().value;
        assert_eq!(pw.len(), 16);
        let n = hide::reveal_user_password(pw, secret, &auth, &mut out).unwrap();
        assert_eq!(&out[..n], b"a password");
        let tp = p.get(attr::TUNNEL_PASSWORD).unwrap().value;
        assert_eq!(tp[0], 1, "the tag stays in front");
        let n = hide::reveal_salted(&tp[1..], secret, &auth, &mut out).unwrap();
        assert_eq!(&out[..n], b"tunnel secret");
        let salts: Vec<[u8; 2]> = p
            .attributes()
            .filter(|a| a.ty == attr::VENDOR_SPECIFIC)
            .map(|a| [a.value[6], a.value[7]])
            .collect();
        assert_eq!(salts.len(), 2);
        assert!(salts.iter().all(|s| s[0] & 0x80 != 0));
        assert_ne!(salts[0], salts[1], "salts unique in the packet");
    }
    assert_eq!(m.reveal_all(secret, &auth).unwrap(), 4);
    assert_eq!(m.as_bytes(), &plain[..]);
}

#[test]
fn eap_without_a_message_authenticator_is_refused_but_on_radius_1_1() {
    let mut buf = [0u8; 4096];
    let mut m = PacketMut::new(&mut buf, Code::AccessRequest, 0).unwrap();
    m.push(attr::EAP_MESSAGE, b"\x02\x01\x00\x05\x01").unwrap();
    let bytes = m.as_bytes().to_vec();
    assert!(matches!(
        Packet::parse(&bytes),
        Err(ParseError::EapWithoutMessageAuthenticator { .. })
    ));
    assert!(Packet::parse_v11(&bytes).is_ok(), "RFC 9765 sends none");
}
