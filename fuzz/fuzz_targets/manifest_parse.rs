//! Manifest::parse on arbitrary bytes: never panics, and whatever parses re-encodes to exactly
//! the same bytes (the format is canonical, so two encodings can never mean one manifest).
#![no_main]
use idhal_manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        assert_eq!(m.encode(), data, "parse/encode is not canonical");
    }
});
