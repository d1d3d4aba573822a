use super::*;
use crate::codec::{Code, Packet};
use proptest::prelude::*;

fn dict() -> &'static Dictionary {
    Dictionary::builtin()
}

fn request(attrs: &[(u8, &[u8])]) -> ([u8; 4096], usize) {
    let mut buf = [0u8; 4096];
    let len = {
        let mut m = PacketMut::new(&mut buf, Code::AccessRequest, 7).unwrap();
        for (t, v) in attrs {
            m.push(*t, v).unwrap();
        }
        m.len()
    };
    (buf, len)
}

/// The attributes of a packet, in order.
fn attrs(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    Packet::parse(bytes)
        .unwrap()
        .attributes()
        .map(|a| (a.ty, a.value.to_vec()))
        .collect()
}

fn vsa(vendor: u32, subs: &[(u8, &[u8])]) -> Vec<u8> {
    let mut v = vendor.to_be_bytes().to_vec();
    for (t, s) in subs {
        v.push(*t);
        v.push((s.len() + 2) as u8);
        v.extend_from_slice(s);
    }
    v
}

fn run(rw: &Rewrite, buf: &mut [u8; 4096], len: usize) -> (bool, Vec<u8>) {
    let mut m = PacketMut::from_datagram(buf, len).unwrap();
    let changed = rw.apply(&mut m).unwrap();
    (changed, m.as_bytes().to_vec())
}

#[test]
fn names_and_values_are_checked_against_the_dictionary() {
    let d = dict();
    assert_eq!(target(d, "Class"), Ok(Target::Attr(25)));
    assert_eq!(target(d, "Microsoft"), Ok(Target::Vendor(311)));
    assert_eq!(
        target(d, "Cisco-AVPair"),
        Ok(Target::VendorAttr { vendor: 9, ty: 1 })
    );
    assert!(matches!(
        target(d, "No-Such-Thing"),
        Err(RewriteError::Unknown(_))
    ));
    assert!(matches!(
        target(d, "Proxy-State"),
        Err(RewriteError::Reserved(_))
    ));
    assert!(matches!(
        assignment(d, "Message-Authenticator = 0x00"),
        Err(RewriteError::Reserved(_))
    ));
    for hidden in [
        "User-Password = secret",
        "Tunnel-Password = x",
        "MS-MPPE-Send-Key = 0x00",
    ] {
        assert!(
            matches!(assignment(d, hidden), Err(RewriteError::Hidden(_))),
            "{hidden}"
        );
    }
    assert!(matches!(
        assignment(d, "Session-Timeout = soon"),
        Err(RewriteError::Value { .. })
    ));
    assert!(matches!(
        assignment(d, "NAS-IP-Address = 10.0.0"),
        Err(RewriteError::Value { .. })
    ));
    assert!(matches!(
        assignment(d, "Session-Timeout 3600"),
        Err(RewriteError::Syntax(_))
    ));
    assert_eq!(
        assignment(d, "Reply-Message = ").map(|a| a.value.len()),
        Ok(0)
    );
    let long = format!("Reply-Message = {}", "x".repeat(254));
    assert!(matches!(
        assignment(d, &long),
        Err(RewriteError::Value { .. })
    ));
    assert!(matches!(
        modify(d, "Session-Timeout", "1", "2"),
        Err(RewriteError::NotText(_))
    ));
    assert!(matches!(
        modify(d, "User-Name", "(", "x"),
        Err(RewriteError::Regex(_))
    ));
    assert!(matches!(
        assignment(d, "Service-Type:1 = Framed-User"),
        Err(RewriteError::Value { .. })
    ));
}

#[test]
fn values_are_encoded_by_type_name_and_tag() {
    let d = dict();
    let a = assignment(d, "Service-Type = Framed-User").unwrap();
    assert_eq!((a.target, a.value), (Target::Attr(6), vec![0, 0, 0, 2]));
    let a = assignment(d, "Session-Timeout = \"3600\"").unwrap();
    assert_eq!(a.value, 3600u32.to_be_bytes());
    // RFC 2868: VLAN assignment, tag first.
    let a = assignment(d, "Tunnel-Type:1 = VLAN").unwrap();
    assert_eq!((a.target, a.value), (Target::Attr(64), vec![1, 0, 0, 13]));
    let a = assignment(d, "Tunnel-Private-Group-Id:1 = 100").unwrap();
    assert_eq!(a.value, b"\x01100");
    let a = assignment(d, "Tunnel-Private-Group-Id = 100").unwrap();
    assert_eq!(a.value, b"100");
    let a = assignment(d, "Cisco-AVPair = 'shell:priv-lvl=15'").unwrap();
    assert_eq!(
        (a.target, a.value),
        (
            Target::VendorAttr { vendor: 9, ty: 1 },
            b"shell:priv-lvl=15".to_vec()
        )
    );
    let a = assignment(d, "Class = 0x0a0b").unwrap();
    assert_eq!(a.value, [10, 11]);
}

#[test]
fn remove_takes_every_instance_and_leaves_the_rest_in_order() {
    let d = dict();
    let rw = Rewrite {
        remove: vec![target(d, "NAS-Port").unwrap(), target(d, "Cisco").unwrap()],
        ..Rewrite::default()
    };
    let cisco = vsa(9, &[(1, b"a=b")]);
    let ms = vsa(311, &[(2, b"x")]);
    let (mut buf, len) = request(&[
        (1, b"bob"),
        (5, &[0, 0, 0, 1]),
        (26, &cisco),
        (26, &ms),
        (5, &[0, 0, 0, 2]),
        (33, b"ps"),
    ]);
    let (changed, out) = run(&rw, &mut buf, len);
    assert!(changed);
    assert_eq!(
        attrs(&out),
        vec![(1, b"bob".to_vec()), (26, ms), (33, b"ps".to_vec())]
    );
    // Nothing named: nothing changes.
    let (mut buf, len) = request(&[(1, b"bob")]);
    let (changed, out) = run(&rw, &mut buf, len);
    assert!(!changed);
    assert_eq!(out, buf[..len]);
}

#[test]
fn one_vendor_attribute_goes_from_a_vsa_that_carries_several() {
    let d = dict();
    let rw = Rewrite {
        remove: vec![target(d, "MS-CHAP-Challenge").unwrap()],
        ..Rewrite::default()
    };
    let both = vsa(311, &[(11, b"challenge"), (1, b"resp")]);
    let only = vsa(311, &[(11, b"challenge")]);
    let (mut buf, len) = request(&[(26, &both), (26, &only), (1, b"u")]);
    let (_, out) = run(&rw, &mut buf, len);
    assert_eq!(
        attrs(&out),
        vec![(26, vsa(311, &[(1, b"resp")])), (1, b"u".to_vec())]
    );
}

#[test]
fn keep_only_keeps_what_it_names_and_what_the_proxy_needs() {
    let d = dict();
    let rw = Rewrite {
        keep_only: ["User-Name", "User-Password", "MS-CHAP-Challenge", "WISPr"]
            .iter()
            .map(|n| target(d, n).unwrap())
            .collect(),
        ..Rewrite::default()
    };
    let ms = vsa(311, &[(11, b"c"), (1, b"r")]);
    let wispr = vsa(14122, &[(1, b"loc")]);
    let cisco = vsa(9, &[(1, b"x")]);
    let (mut buf, len) = request(&[
        (80, &[0; 16]),
        (1, b"bob"),
        (2, &[9; 16]),
        (4, &[10, 0, 0, 1]),
        (26, &ms),
        (26, &wispr),
        (26, &cisco),
        (33, b"downstream"),
        (241, &[1, 2, 3]),
    ]);
    let (_, out) = run(&rw, &mut buf, len);
    assert_eq!(
        attrs(&out),
        vec![
            (80, vec![0; 16]),
            (1, b"bob".to_vec()),
            (2, vec![9; 16]),
            (26, vsa(311, &[(11, b"c")])),
            (26, wispr),
            (33, b"downstream".to_vec()),
        ]
    );
}

#[test]
fn modify_replaces_by_regular_expression_in_text() {
    let d = dict();
    let rw = Rewrite {
        modify: vec![
            modify(d, "User-Name", r"^(.*)@old\.example$", r"\1@example.org").unwrap(),
            modify(d, "Cisco-AVPair", "^vlan=(.*)$", "vlan=$1-guest").unwrap(),
        ],
        ..Rewrite::default()
    };
    let cisco = vsa(9, &[(1, b"vlan=10"), (1, b"other")]);
    let (mut buf, len) = request(&[(1, b"bob@old.example"), (26, &cisco)]);
    let (changed, out) = run(&rw, &mut buf, len);
    assert!(changed);
    assert_eq!(
        attrs(&out),
        vec![
            (1, b"bob@example.org".to_vec()),
            (26, vsa(9, &[(1, b"vlan=10-guest"), (1, b"other")])),
        ]
    );
    // No match: unchanged.
    let (mut buf, len) = request(&[(1, b"alice@example.net")]);
    assert!(!run(&rw, &mut buf, len).0);
}

#[test]
fn replace_sets_every_instance_present_and_adds_none() {
    let d = dict();
    let rw = Rewrite {
        replace: vec![assignment(d, "Session-Timeout = 3600").unwrap()],
        ..Rewrite::default()
    };
    let (mut buf, len) = request(&[(27, &[0, 0, 0, 60]), (1, b"u"), (27, &[0, 0, 0, 90])]);
    let (_, out) = run(&rw, &mut buf, len);
    let st = 3600u32.to_be_bytes().to_vec();
    assert_eq!(
        attrs(&out),
        vec![(27, st.clone()), (1, b"u".to_vec()), (27, st)]
    );
    let (mut buf, len) = request(&[(1, b"u")]);
    assert_eq!(attrs(&run(&rw, &mut buf, len).1), vec![(1, b"u".to_vec())]);
}

#[test]
fn add_appends_and_add_if_absent_only_fills_a_gap() {
    let d = dict();
    let rw = Rewrite {
        add: vec![
            assignment(d, "Reply-Message = hello").unwrap(),
            assignment(d, "Cisco-AVPair = a=b").unwrap(),
        ],
        add_if_absent: vec![
            assignment(d, "Operator-Name = 1example.org").unwrap(),
            assignment(d, "Session-Timeout = 3600").unwrap(),
        ],
        ..Rewrite::default()
    };
    let (mut buf, len) = request(&[(126, b"1other.org")]);
    let (_, out) = run(&rw, &mut buf, len);
    assert_eq!(
        attrs(&out),
        vec![
            (126, b"1other.org".to_vec()),
            (18, b"hello".to_vec()),
            (26, vsa(9, &[(1, b"a=b")])),
            (27, 3600u32.to_be_bytes().to_vec()),
        ]
    );
}

#[test]
fn a_value_that_no_longer_fits_is_an_error_not_a_broken_packet() {
    let d = dict();
    let rw = Rewrite {
        modify: vec![modify(d, "User-Name", "^(.*)$", "$1$1$1").unwrap()],
        ..Rewrite::default()
    };
    let name = [b'a'; 100];
    let (mut buf, len) = request(&[(1, &name)]);
    let mut m = PacketMut::from_datagram(&mut buf, len).unwrap();
    assert!(matches!(
        rw.apply(&mut m),
        Err(EditError::ValueTooLong { .. })
    ));
}

proptest! {
    /// Whatever is removed or kept, the result is a valid packet holding exactly the
    /// attributes not removed, in their order.
    #[test]
    fn removal_keeps_a_valid_packet_and_the_order_of_the_rest(
        list in proptest::collection::vec((1u8..=50, proptest::collection::vec(any::<u8>(), 0..20)), 0..30),
        gone in proptest::collection::vec(1u8..=50, 0..6),
    ) {
        let rw = Rewrite {
            remove: gone
                .iter()
                .filter(|t| !matches!(**t, attr::PROXY_STATE | attr::VENDOR_SPECIFIC))
                .map(|t| Target::Attr(*t))
                .collect(),
            ..Rewrite::default()
        };
        let list: Vec<(u8, Vec<u8>)> = list
            .into_iter()
            .filter(|(t, _)| *t != attr::VENDOR_SPECIFIC)
            .collect();
        let borrowed: Vec<(u8, &[u8])> = list.iter().map(|(t, v)| (*t, v.as_slice())).collect();
        let (mut buf, len) = request(&borrowed);
        let (_, out) = run(&rw, &mut buf, len);
        let want: Vec<(u8, Vec<u8>)> = list
            .into_iter()
            .filter(|(t, _)| !rw.remove.contains(&Target::Attr(*t)))
            .collect();
        prop_assert_eq!(attrs(&out), want);
    }
}
