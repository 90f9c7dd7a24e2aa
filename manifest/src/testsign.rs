//! A minisign signer for fuzz targets (feature `test-signing`): the verifier's own format, so a
//! fuzzer holding a fixed key gets past the signature checks into what follows them. Real
//! signatures come from `idhal sign` (the minisign crate).

use crate::key::KeyId;
use blake2::{Blake2b512, Digest};
use ct_codecs::{Base64, Encoder};
pub use ed25519_compact::{KeyPair, Seed};

/// A prehashed minisign signature file of `data` by `kp` (key id `id`), with `trusted` as its
/// trusted comment.
pub fn minisign(kp: &KeyPair, id: KeyId, data: &[u8], trusted: &str) -> String {
    let sig = kp.sk.sign(Blake2b512::digest(data), None);
    let mut line = b"ED".to_vec();
    line.extend_from_slice(&id.0);
    line.extend_from_slice(sig.as_ref());
    let mut global = sig.to_vec();
    global.extend_from_slice(trusted.as_bytes());
    format!(
        "untrusted comment: test\n{}\ntrusted comment: {trusted}\n{}\n",
        Base64::encode_to_string(&line).expect("small"),
        Base64::encode_to_string(kp.sk.sign(&global, None).as_ref()).expect("small")
    )
}
