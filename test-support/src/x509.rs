//! Throwaway certificates made by the real `openssl` CLI (P-256, valid two days): a CA and leaves
//! it signs, for TLS and OpenVPN peers that are not idhal's own CA.
use std::path::Path;

/// `openssl req` arguments for a new P-256 key without a passphrase, written to the next one.
const NEW_P256_KEY: [&str; 6] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-keyout",
];

/// A self-signed CA in `dir`: private key `key`, certificate `cert`, subject CN `cn`.
#[track_caller]
pub fn ca(dir: &Path, cn: &str, key: &str, cert: &str) {
    let subject = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(NEW_P256_KEY);
    args.extend([key, "-out", cert, "-days", "2", "-subj", &subject]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    crate::openssl(dir, &args);
}

/// A certificate in `dir` for CN `cn` (private key `key`, certificate `cert`) signed by the CA
/// in `ca_key`/`ca_cert`, with the X.509v3 extensions `ext` (openssl's extfile syntax, such as
/// `subjectAltName=IP:127.0.0.1` or `extendedKeyUsage=clientAuth`).
#[track_caller]
pub fn leaf(
    dir: &Path,
    cn: &str,
    (key, cert): (&str, &str),
    (ca_key, ca_cert): (&str, &str),
    ext: &str,
) {
    let ext_file = format!("{cert}.ext");
    let csr = format!("{cert}.csr");
    std::fs::write(dir.join(&ext_file), ext).expect("writing the extensions file");
    let subject = format!("/CN={cn}");
    let mut args = vec!["req", "-new"];
    args.extend(NEW_P256_KEY);
    args.extend([key, "-out", &csr, "-subj", &subject]);
    crate::openssl(dir, &args);
    crate::openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            ca_cert,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            &ext_file,
        ],
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_leaf_verifies_against_its_ca_and_not_another() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        super::ca(dir, "one", "one.key", "one.pem");
        super::ca(dir, "two", "two.key", "two.pem");
        super::leaf(
            dir,
            "127.0.0.1",
            ("srv.key", "srv.pem"),
            ("one.key", "one.pem"),
            "subjectAltName=IP:127.0.0.1\n",
        );
        let (good, out) =
            crate::process::openssl_try(dir, &["verify", "-CAfile", "one.pem", "srv.pem"]);
        assert!(good, "{out}");
        let (good, out) =
            crate::process::openssl_try(dir, &["verify", "-CAfile", "two.pem", "srv.pem"]);
        assert!(!good, "{out}");
        assert!(
            out.contains("unable to get local issuer certificate"),
            "{out}"
        );
    }
}
