//! The parser and every reader over arbitrary bytes: no panic, and what parses reads back
//! within bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use radius_sidecar::codec::{Packet, dict::Dictionary, packet::long_extended_value, value};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = Packet::parse(data) else {
        return;
    };
    assert!(p.len() <= data.len() && p.len() >= 20);
    let d = Dictionary::builtin();
    for a in p.attributes() {
        assert!(a.offset + a.wire_len() <= p.len());
        if let Some(def) = d.standard(a.ty) {
            let _ = value::decode(def.ty, a.value);
        }
        if let Some((_, subs)) = a.vendor_attributes() {
            for s in subs {
                assert!(s.offset + s.wire_len() <= p.len());
            }
        }
        let _ = a.extended();
        if let Some((ext, _, _)) = a.long_extended() {
            let _ = long_extended_value(&p, a.ty, ext);
        }
    }
});
