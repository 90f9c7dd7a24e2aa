//! Key rotation statements on arbitrary input: `Rotation::parse` never panics and accepts only
//! the one canonical encoding; a walk over fuzzed `keys/N` files never panics and never moves
//! the pinned key unless the statement is exactly "K_old is replaced by K_new", sequence 1,
//! signed by both. The fuzzed body is signed here by both fixed keys (with the trusted comment
//! its parse gives, if any), so the fuzzer reaches every check behind the signatures.
#![no_main]
use idhal_manifest::rotation::{manifest_key, walk, ChainHead, Rotation, StatementFiles};
use idhal_manifest::testsign::{minisign, KeyPair, Seed};
use idhal_manifest::{KeyId, PublicKey};
use libfuzzer_sys::fuzz_target;

fn key(seed: u8, id: u8) -> (KeyPair, PublicKey) {
    let kp = KeyPair::from_seed(Seed::new([seed; 32]));
    let pk = PublicKey::new(KeyId([id; 8]), *kp.pk);
    (kp, pk)
}

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Rotation::parse(data, 1) {
        assert_eq!(
            r.encode().as_bytes(),
            data,
            "a non-canonical statement was accepted"
        );
    }
    let (old_kp, old) = key(1, 0x11);
    let (new_kp, new) = key(2, 0x22);
    // The first byte picks who signs what: both right, swapped, one missing, a wrong comment.
    let [mode, body @ ..] = data else { return };
    let comment = Rotation::parse(body, 1)
        .map(|r| r.comment())
        .unwrap_or_else(|_| "idhal-key-rotation 1".into());
    let comment = if mode & 4 != 0 {
        format!("{comment} ")
    } else {
        comment
    };
    let sign = |kp: &KeyPair, pk: &PublicKey| minisign(kp, pk.id(), body, &comment);
    let (o, n) = match mode & 3 {
        0 => (sign(&old_kp, &old), sign(&new_kp, &new)),
        1 => (sign(&new_kp, &new), sign(&old_kp, &old)),
        2 => (sign(&old_kp, &old), String::new()),
        _ => (sign(&old_kp, &old), sign(&old_kp, &old)),
    };
    let files = StatementFiles {
        statement: body.to_vec(),
        old_signature: o,
        new_signature: n,
    };
    let head = ChainHead {
        key: old.clone(),
        sequence: 0,
    };
    let got = walk(&head, &mut |n| Ok::<_, ()>((n == 1).then(|| files.clone())));
    if let Ok(end) = got {
        if end != head {
            let want = Rotation {
                sequence: 1,
                from: old.clone(),
                to: new.clone(),
            };
            assert_eq!(
                body,
                want.encode().as_bytes(),
                "a chain moved on another statement"
            );
            assert_eq!(mode & 7, 0, "a chain moved without both right signatures");
            assert_eq!(
                end,
                ChainHead {
                    key: new.clone(),
                    sequence: 1
                }
            );
            assert_eq!(manifest_key(&head, &end, new.id()), Ok(&new));
            assert!(
                manifest_key(&head, &end, old.id()).is_err(),
                "the old key still signs"
            );
        }
    }
});
