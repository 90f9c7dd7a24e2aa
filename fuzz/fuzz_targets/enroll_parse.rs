//! Enrollment wire format on arbitrary input: request parsing never panics and never accepts a
//! forged token signature; response bodies are signed here with a fixed key so the parser
//! behind the signature check is exercised too, and must refuse anything not canonical.
#![no_main]
use ct_codecs::{Base64, Encoder};
use idhal_manifest::enroll::{EnrollKey, KeyPair, Request, Response, Seed, Token, RESPONSE_FORMAT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(signed) = Request::parse(data) {
        let token = Token::from_random([3u8; 40]);
        assert!(
            signed.verify(&token.verifier()).is_err(),
            "fuzzer forged a token signature"
        );
    }
    // Past the signature only bodies that end a line get anywhere; start them with the format
    // line so the fuzzer spends its time on the fields.
    if !data.ends_with(b"\n") {
        return;
    }
    let kp = KeyPair::from_seed(Seed::new([9u8; 32]));
    let key = EnrollKey(*kp.pk);
    let mut body = format!("{RESPONSE_FORMAT}\n").into_bytes();
    body.extend_from_slice(data);
    let sig = kp.sk.sign(&body, None);
    body.extend_from_slice(b"signature ");
    body.extend_from_slice(Base64::encode_to_string(sig.as_ref()).unwrap().as_bytes());
    body.push(b'\n');
    if let Ok(r) = Response::verify(&body, &key, &[0u8; 32]) {
        // Accepted only if it is exactly the canonical encoding of what was parsed.
        assert_eq!(r.sign(&kp), body, "a non-canonical response was accepted");
    }
});
