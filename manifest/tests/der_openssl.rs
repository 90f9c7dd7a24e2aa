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

/// `openssl x509 -dates` of a PEM certificate, as the RFC 3339 text `time::rfc3339` prints.
fn openssl_dates(cert: &str) -> (String, String) {
    let said = openssl(&[
        "x509", "-in", cert, "-noout", "-dates", "-dateopt", "iso_8601",
    ]);
    let field = |name: &str| {
        let line = said
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {said}"));
        line.replacen(' ', "T", 1)
    };
    (field("notBefore="), field("notAfter="))
}

fn validity_of(pem_file: &std::path::Path) -> (String, String) {
    let text = std::fs::read_to_string(pem_file).unwrap();
    let der = der::pem_decode("CERTIFICATE", &text).expect("a PEM certificate");
    let (from, until) = der::cert_validity(&der).expect("a validity");
    (
        idhal_manifest::time::rfc3339(from),
        idhal_manifest::time::rfc3339(until),
    )
}

/// Certificates `openssl` makes (UTCTime before 2050, GeneralizedTime after; Ed25519 and
/// P-256, self-signed and CA-signed) and the golden one: the agent reads the dates openssl
/// prints.
#[test]
fn the_validity_read_is_the_one_openssl_prints() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut certs = vec![std::path::PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/enroll/node.crt"
    ))];
    for (name, key, days) in [
        ("ed-short", "ed25519", "1"),
        ("ed-long", "ed25519", "36500"),
        ("ec-short", "ec", "30"),
    ] {
        let cert = format!("{d}/{name}.crt");
        let mut args = vec![
            "req",
            "-x509",
            "-nodes",
            "-subj",
            "/CN=idhal-test",
            "-days",
            days,
        ];
        args.extend(["-newkey", key]);
        if key == "ec" {
            args.extend(["-pkeyopt", "ec_paramgen_curve:P-256"]);
        }
        let keyfile = format!("{d}/{name}.key");
        args.extend(["-keyout", &keyfile, "-out", &cert]);
        openssl(&args);
        certs.push(cert.into());
    }
    // A leaf signed by one of them (a v3 certificate with extensions, like the project CA's).
    let (csr, leaf) = (format!("{d}/leaf.csr"), format!("{d}/leaf.crt"));
    let leaf_key = format!("{d}/leaf.key");
    openssl(&[
        "req",
        "-new",
        "-nodes",
        "-newkey",
        "ed25519",
        "-subj",
        "/CN=client7",
        "-keyout",
        &leaf_key,
        "-out",
        &csr,
    ]);
    let (ca_cert, ca_key) = (format!("{d}/ed-short.crt"), format!("{d}/ed-short.key"));
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca_cert,
        "-CAkey",
        &ca_key,
        "-set_serial",
        "77",
        "-days",
        "9000",
        "-out",
        &leaf,
    ]);
    certs.push(leaf.into());
    let mut generalized = 0;
    for c in &certs {
        let want = openssl_dates(c.to_str().unwrap());
        assert_eq!(validity_of(c), want, "{}", c.display());
        generalized += usize::from(want.1.as_str() >= "2050");
    }
    assert!(generalized >= 1, "no GeneralizedTime case");
}
