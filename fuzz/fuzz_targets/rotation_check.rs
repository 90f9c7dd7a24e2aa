//! Key rotation statements on arbitrary input: `Rotation::parse` never panics and accepts only
//! the one canonical encoding; a walk over fuzzed `keys/N` files never panics and never moves
//! the pinned key (the fuzzer holds no signing key, so nothing may verify).
#![no_main]
use idhal_manifest::rotation::{manifest_key, walk, ChainHead, Rotation, StatementFiles};
use idhal_manifest::{KeyId, PublicKey};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Rotation::parse(data, 1) {
        assert_eq!(r.encode().as_bytes(), data, "a non-canonical statement was accepted");
    }
    // Two leading bytes cut the rest into the statement, its old and its new signature.
    let [a, b, rest @ ..] = data else { return };
    let (x, y) = (*a as usize * rest.len() / 255, *b as usize * rest.len() / 255);
    let (x, y) = (x.min(y), x.max(y));
    let files = StatementFiles {
        statement: rest[..x].to_vec(),
        old_signature: String::from_utf8_lossy(&rest[x..y]).into_owned(),
        new_signature: String::from_utf8_lossy(&rest[y..]).into_owned(),
    };
    // The pinned key is the one the fuzzed old signature names, so the check goes past the id.
    let id = idhal_manifest::SignatureFile::parse(&files.old_signature)
        .map_or(KeyId([7; 8]), |s| s.key_id);
    let head = ChainHead {
        key: PublicKey::new(id, [9; 32]),
        sequence: 0,
    };
    let got = walk(&head, &mut |n| Ok::<_, ()>((n <= 3).then(|| files.clone())));
    if let Ok(end) = got {
        assert_eq!(end, head, "a fuzzed chain moved the pinned key");
        assert_eq!(manifest_key(&head, &end, KeyId([1; 8])), Ok(&head.key));
    }
});
