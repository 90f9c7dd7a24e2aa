//! The hand-written DER (the node's PKCS#8 key and its CSR) checked by the real `openssl`.

use ed25519_compact::{KeyPair, Seed};
use idhal_manifest::der;
use std::process::Command;

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl is installed (scripts/setup-debian.sh)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
fn openssl_verifies_the_csr_and_reads_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for seed in [[7u8; 32], [0xa5; 32], [0xff; 32]] {
        let kp = KeyPair::from_seed(Seed::new(seed));
        let csr = dir.path().join("node.csr");
        let key = dir.path().join("node.key");
        std::fs::write(&csr, der::ed25519_csr(&kp, "idhal-node")).unwrap();
        std::fs::write(&key, der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&seed))).unwrap();
        let (csr, key) = (csr.to_str().unwrap(), key.to_str().unwrap());

        let checked = openssl(&[
            "req", "-in", csr, "-inform", "DER", "-verify", "-noout", "-subject",
        ]);
        assert!(checked.contains("self-signature verify OK"), "{checked}");
        assert!(checked.contains("CN = idhal-node"), "{checked}");
        // The key in the CSR is the key in the PKCS#8 file.
        let from_csr = openssl(&["req", "-in", csr, "-inform", "DER", "-pubkey", "-noout"]);
        let from_key = openssl(&["pkey", "-in", key, "-pubout"]);
        assert_eq!(from_csr.trim(), from_key.trim());
    }
}

#[test]
fn a_flipped_signature_bit_fails_openssl() {
    let dir = tempfile::tempdir().unwrap();
    let kp = KeyPair::from_seed(Seed::new([7; 32]));
    let mut csr = der::ed25519_csr(&kp, "idhal-node");
    let last = csr.len() - 1;
    csr[last] ^= 1;
    let path = dir.path().join("bad.csr");
    std::fs::write(&path, csr).unwrap();
    // openssl 3.0's `req -verify` exits 0 either way: read what it says.
    let said = openssl(&[
        "req",
        "-in",
        path.to_str().unwrap(),
        "-inform",
        "DER",
        "-verify",
        "-noout",
    ]);
    assert!(said.contains("self-signature verify failure"), "{said}");
}
