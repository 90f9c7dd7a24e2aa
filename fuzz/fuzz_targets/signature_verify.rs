//! Signature-file and trusted-comment parsing plus full verification on arbitrary input: never
//! panics, and never accepts (no key can be forged by a fuzzer; acceptance would be a bug).
#![no_main]
use idhal_manifest::{verify, Expiry, KeyId, Policy, PublicKey, SignatureFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First byte picks where the signature text ends and the manifest begins.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = (split as usize * rest.len()) / 255;
    let (sig, manifest) = rest.split_at(cut.min(rest.len()));
    let Ok(sig) = std::str::from_utf8(sig) else {
        return;
    };
    let _ = SignatureFile::parse(sig);
    let _ = idhal_manifest::sig::TrustedMeta::parse(sig);
    let key = PublicKey::new(KeyId(*b"fuzzkey!"), [7u8; 32]);
    let policy = Policy {
        now: 0,
        expiry: Expiry::Ignore,
        last_serial: None,
    };
    assert!(
        verify(&key, manifest, sig, &policy).is_err(),
        "fuzzer forged a signature"
    );
});
