//! The configuration parser on any text: it never panics, and a refusal names the file it
//! was given and a line of the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use radius_sidecar::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = Config::from_toml(text, "fuzz.toml") {
        assert_eq!(e.file, "fuzz.toml");
        let lines = text.lines().count().max(1);
        assert!(
            e.line >= 1 && e.line <= lines + 1,
            "line {} of {lines}: {e}",
            e.line
        );
        assert!(!e.key.is_empty() || !e.message.is_empty(), "{e}");
    }
});
