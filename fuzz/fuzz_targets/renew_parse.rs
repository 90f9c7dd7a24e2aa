//! What renewal reads from outside: the server's parse of a `POST /renew` request never panics
//! and never accepts a forged signature, and accepts only the canonical text; the agent's DER
//! reader of a certificate's validity (`der::cert_validity`, on the certificate of a signed
//! answer) never panics, and any validity it reads starts before it ends.
#![no_main]
use idhal_manifest::der;
use idhal_manifest::enroll::{KeyPair, Seed};
use idhal_manifest::renew::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = Request::parse(data) {
        let kp = KeyPair::from_seed(Seed::new([3u8; 32]));
        assert!(signed.verify(&kp.pk).is_err(), "fuzzer forged a node's signature");
        // Accepted only in its one spelling: signing what was parsed gives the same body.
        let body = &signed.request.sign(&kp);
        let cut = |b: &[u8]| b[..b.len() - 1].iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        assert_eq!(&body[..cut(body)], &data[..cut(data)], "a non-canonical request was accepted");
    }
    if let Some((from, until)) = der::cert_validity(data) {
        assert!(from <= until, "a validity that ends before it starts");
    }
});
