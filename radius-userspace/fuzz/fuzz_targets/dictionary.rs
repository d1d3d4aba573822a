//! The dictionary loader (FreeRADIUS format) on any text, on top of the built-in one: it
//! never panics; a refusal names the file; what it accepts is found again by its name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use radius_core::codec::dict::Dictionary;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = std::path::Path::new("fuzz.dict");
    let mut d = Dictionary::default();
    match d.parse_str(text, file) {
        Ok(()) => {
            for line in text.lines() {
                let mut words = line.split_whitespace();
                if words.next() == Some("ATTRIBUTE")
                    && let Some(name) = words.next()
                {
                    assert!(d.by_name(name).is_some(), "{name} defined but not found");
                }
            }
        }
        Err(e) => assert_eq!(e.file, file),
    }
});
