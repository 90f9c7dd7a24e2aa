//! `idhal sign` and `idhal verify`: what gets signed, the PUBDIR layout, serials, caps, and the
//! exact refusals; results are checked with the idhal-manifest library.

mod cli_support;

use cli_support::*;
use idhal_manifest::{paths, verify, Frequency, Manifest, TrustedMeta};
use std::path::Path;

fn setup() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = keygen(&dir.path().join("keys"));
    (dir, sk, pk)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn signs_in_name_order_with_frequencies_and_params_into_the_documented_layout() {
    let (dir, sk, pk) = setup();
    let scripts = dir.path().join("s");
    write(&scripts, "020-c.sh", "#!/bin/sh\necho c\n");
    write(
        &scripts,
        "000-a.sh",
        "#!/bin/sh\n# idhal: frequency=boot\necho a\n",
    );
    write(
        &scripts,
        "010-b.sh",
        "#!/bin/sh\n#\n# idhal: frequency=always\n",
    );
    write(&scripts, "README", "not a scriptlet\n");
    write(&scripts, ".hidden.sh", "echo hidden\n");
    std::fs::create_dir(scripts.join("dir.sh")).unwrap();
    let pubdir = dir.path().join("pub");
    let out = sign(
        &sk,
        &pubdir,
        &scripts,
        &[
            "--param",
            "enroll-url=http://10.0.2.100:8080/enroll",
            "--param",
            "site=lab 1",
        ],
    )
    .ok();
    assert!(out.stderr.contains("ignoring"), "{}", out.stderr);
    assert!(out.stderr.contains("README"));
    assert!(out.stderr.contains("dir.sh"));
    assert!(!out.stderr.contains("hidden"));
    assert!(out.stdout.contains("signed serial 1 "));

    let key = public_key(&pk);
    let (body, sig) = latest(&pubdir);
    let m = verify(&key, &body, &sig, &policy()).unwrap();
    let ids: Vec<_> = m.scriptlets.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["000-a", "010-b", "020-c"]);
    let freqs: Vec<_> = m.scriptlets.iter().map(|s| s.frequency).collect();
    assert_eq!(freqs, [Frequency::Boot, Frequency::Always, Frequency::Once]);
    assert_eq!(m.scriptlets[2].body, b"#!/bin/sh\necho c\n");
    assert_eq!(m.param("enroll-url"), Some("http://10.0.2.100:8080/enroll"));
    assert_eq!(m.param("site"), Some("lab 1"));
    let now = idhal_manifest::time::now();
    assert!((now + 30 * 86_400 - 60..=now + 30 * 86_400).contains(&m.expires));

    // The layout: the key, the latest pair, the immutable versioned pair, identical.
    assert_eq!(read(&pubdir.join(paths::PUBLIC_KEY)), read(&pk));
    assert_eq!(read(&pubdir.join(paths::versioned_manifest(1))), body);
    assert_eq!(
        read(&pubdir.join(paths::versioned_signature(1))),
        sig.as_bytes()
    );
    // The trusted comment carries the serial and expiry.
    let sigfile = idhal_manifest::SignatureFile::parse(&sig).unwrap();
    assert_eq!(
        TrustedMeta::parse(&sigfile.trusted_comment).unwrap(),
        TrustedMeta {
            serial: 1,
            expires: m.expires
        }
    );
    // Nothing else but the hidden lock file.
    let mut names: Vec<_> = std::fs::read_dir(&pubdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ".idhal-sign.lock",
            "idhal.pub",
            "manifest",
            "manifest.minisig",
            "manifests"
        ]
    );
    // And `idhal verify` agrees.
    let v = idhal_run(&["verify", "--pub", s(&pk), s(&pubdir)]).ok();
    assert!(v.stdout.contains("serial 1\n"));
    assert!(v.stdout.contains("param site=lab 1\n"));
    assert!(v.stdout.contains("000-a"));
    assert!(v.stdout.contains("boot"));
}

#[test]
fn an_invalid_scriptlet_name_refuses_the_whole_run() {
    let (dir, sk, _) = setup();
    let scripts = dir.path().join("s");
    write(&scripts, "000-ok.sh", "echo\n");
    write(&scripts, "010-bad..name.sh", "echo\n");
    let pubdir = dir.path().join("pub");
    sign(&sk, &pubdir, &scripts, &[])
        .fails(1, "010-bad..name.sh: file name does not make a valid scriptlet id; nothing was signed: scriptlet id \"010-bad..name\" is invalid");
    assert!(!pubdir.join(paths::MANIFEST).exists());

    std::fs::remove_file(scripts.join("010-bad..name.sh")).unwrap();
    write(
        &scripts,
        "020-freq.sh",
        "#!/bin/sh\n\n# idhal: frequency=weekly\n",
    );
    sign(&sk, &pubdir, &scripts, &[]).fails(
        1,
        "020-freq.sh:3: unknown frequency \"weekly\" (expected once, boot or always)",
    );
    assert!(!pubdir.join(paths::MANIFEST).exists());
}

#[test]
fn serials_increase_and_never_go_back() {
    let (dir, sk, pk) = setup();
    let key = public_key(&pk);
    let scripts = dir.path().join("s");
    write(&scripts, "000-a.sh", "echo\n");
    let pubdir = dir.path().join("pub");
    for expected in 1..=3 {
        sign(&sk, &pubdir, &scripts, &[]).ok();
        assert_eq!(verified_serial(&pubdir, &key).0, expected);
    }
    for back in ["3", "2"] {
        sign(&sk, &pubdir, &scripts, &["--serial", back]).fails(
            1,
            &format!("--serial {back} is not above the serial 3 already in"),
        );
    }
    let out = sign(&sk, &pubdir, &scripts, &["--serial", "3"]);
    assert!(out.stderr.contains("rollback"));
    sign(
        &sk,
        &pubdir,
        &scripts,
        &["--serial", "10", "--expires", "1h"],
    )
    .ok();
    let (serial, expires) = verified_serial(&pubdir, &key);
    assert_eq!(serial, 10);
    let now = idhal_manifest::time::now();
    assert!((now + 3600 - 60..=now + 3600).contains(&expires));
    sign(&sk, &pubdir, &scripts, &[]).ok();
    assert_eq!(verified_serial(&pubdir, &key).0, 11);
}

#[test]
fn keeps_the_newest_ten_versions() {
    let (dir, sk, pk) = setup();
    let scripts = dir.path().join("s");
    let pubdir = dir.path().join("pub");
    for n in 1..=12 {
        write(&scripts, "000-a.sh", &format!("echo {n}\n"));
        sign(&sk, &pubdir, &scripts, &[]).ok();
    }
    let mut names: Vec<_> = std::fs::read_dir(pubdir.join(paths::VERSIONS_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut expected: Vec<String> = (3..=12)
        .flat_map(|n| [n.to_string(), format!("{n}.minisig")])
        .collect();
    expected.sort();
    assert_eq!(names, expected);
    // Each kept version still verifies on its own.
    let key = public_key(&pk);
    for n in 3..=12u64 {
        let body = read(&pubdir.join(paths::versioned_manifest(n)));
        let sig = std::fs::read_to_string(pubdir.join(paths::versioned_signature(n))).unwrap();
        let m = verify(&key, &body, &sig, &policy()).unwrap();
        assert_eq!(m.serial, n);
        assert_eq!(m.scriptlets[0].body, format!("echo {n}\n").as_bytes());
    }
}

#[test]
fn the_size_cap_refuses_before_publishing() {
    let (dir, sk, _) = setup();
    let scripts = dir.path().join("s");
    write(&scripts, "000-small.sh", "echo\n");
    write(&scripts, "010-big.sh", &"x".repeat(5000));
    let pubdir = dir.path().join("pub");
    // The raw bodies alone are over: refused while reading, naming the file.
    sign(&sk, &pubdir, &scripts, &["--max-size", "4KiB"]).fails(
        1,
        "010-big.sh: with it the scriptlets are over the 4096-byte cap (--max-size",
    );
    // The bodies fit, the encoded manifest (headers, lengths) does not.
    write(&scripts, "010-big.sh", &"x".repeat(4050));
    let out = sign(&sk, &pubdir, &scripts, &["--max-size", "4KiB"])
        .fails(1, "over the 4096-byte cap (--max-size");
    assert!(out
        .stderr
        .contains("Largest scriptlets: 010-big (4050 bytes)"));
    assert!(!pubdir.join(paths::MANIFEST).exists());
    // The default cap is the agents' default, 4 MiB.
    write(&scripts, "010-big.sh", &"x".repeat(4 << 20));
    sign(&sk, &pubdir, &scripts, &[]).fails(1, "over the 4194304-byte cap");
    write(&scripts, "010-big.sh", &"x".repeat((4 << 20) - 200));
    sign(&sk, &pubdir, &scripts, &[]).ok();
}

#[test]
fn a_symlinked_scriptlet_is_refused() {
    // A link could publish any file the signer can read, such as its own secret key.
    let f = Fixture::new();
    std::os::unix::fs::symlink(&f.sk, f.scripts.join("010-key.sh")).unwrap();
    f.sign(&[]).fails(
        1,
        "010-key.sh is a symbolic link; scriptlets must be regular files",
    );
    assert!(!f.pubdir.join(paths::MANIFEST).exists());
}

#[test]
fn the_key_can_come_from_the_environment() {
    let (dir, sk, pk) = setup();
    let scripts = dir.path().join("s");
    write(&scripts, "000-a.sh", "echo\n");
    let pubdir = dir.path().join("pub");
    let text = std::fs::read_to_string(&sk).unwrap();
    run(idhal()
        .env("IDHAL_SIGNING_KEY", &text)
        .args(["sign", "--out", s(&pubdir), s(&scripts)]))
    .ok();
    assert_eq!(verified_serial(&pubdir, &public_key(&pk)).0, 1);
    idhal_run(&["sign", "--out", s(&pubdir), s(&scripts)]).fails(
        1,
        "no signing key: pass --key FILE, or set IDHAL_SIGNING_KEY",
    );
    run(idhal().env("IDHAL_SIGNING_KEY", "garbage").args([
        "sign",
        "--out",
        s(&pubdir),
        s(&scripts),
    ]))
    .fails(1, "$IDHAL_SIGNING_KEY is not a minisign secret key");
}

#[test]
fn a_pubdir_signed_by_another_key_or_tampered_with_is_refused() {
    let (dir, sk, _) = setup();
    let (other_sk, _) = keygen(&dir.path().join("other"));
    let scripts = dir.path().join("s");
    write(&scripts, "000-a.sh", "echo\n");
    let pubdir = dir.path().join("pub");
    sign(&sk, &pubdir, &scripts, &[]).ok();
    let out = sign(&other_sk, &pubdir, &scripts, &[]);
    let out = out.fails(1, "manifest.minisig is signed by key ");
    assert!(out.stderr.contains("would refuse this manifest"));

    let versioned = pubdir.join(paths::versioned_manifest(1));
    let mut body = read(&versioned);
    let last = body.len() - 6;
    body[last] ^= 1;
    std::fs::write(&versioned, &body).unwrap();
    let o = sign(&sk, &pubdir, &scripts, &[]).fails(1, "does not verify with this key");
    assert!(o.stderr.contains("signature does not match the manifest"));
}

#[test]
fn verify_refuses_with_exact_errors_and_exit_codes() {
    let (dir, sk, pk) = setup();
    let (_, other_pk) = keygen(&dir.path().join("other"));
    let scripts = dir.path().join("s");
    write(&scripts, "000-a.sh", "echo\n");
    let pubdir = dir.path().join("pub");
    sign(&sk, &pubdir, &scripts, &["--param", "x=1"]).ok();
    let verify_cmd = |pk: &Path, extra: &[&str]| {
        let mut args = vec!["verify", "--pub", s(pk)];
        args.extend_from_slice(extra);
        args.push(s(&pubdir));
        idhal_run(&args)
    };
    verify_cmd(&pk, &[]).ok();

    // Wrong key.
    let o = verify_cmd(&other_pk, &[]).fails(3, "refused: ");
    assert!(o.stderr.contains("but this node pinned key"));
    assert_eq!(o.stderr.lines().count(), 1);

    // `manifest` differs from `manifests/1`: the signature still matches `manifest`.
    let versioned = pubdir.join(paths::versioned_manifest(1));
    let good = read(&versioned);
    std::fs::write(&versioned, b"other").unwrap();
    verify_cmd(&pk, &[]).fails(4, "inconsistent: ");
    std::fs::write(&versioned, &good).unwrap();

    // PUBDIR/idhal.pub is another key: first-boot nodes pinned by fingerprint would refuse.
    let served = pubdir.join(paths::PUBLIC_KEY);
    std::fs::copy(&other_pk, &served).unwrap();
    verify_cmd(&pk, &[]).fails(4, "first-boot nodes pinned by fingerprint would refuse it");
    std::fs::copy(&pk, &served).unwrap();

    // Tampered manifest byte.
    let mut body = good.clone();
    body[20] ^= 1;
    std::fs::write(pubdir.join(paths::MANIFEST), &body).unwrap();
    verify_cmd(&pk, &[]).fails(
        3,
        "signature does not match the manifest: manifest or signature was tampered with or truncated",
    );

    // `manifest` one version ahead of `manifest.minisig` (a publish interrupted between its
    // last two renames): inconsistent, not "tampered", since that version is validly signed.
    std::fs::write(pubdir.join(paths::MANIFEST), &good).unwrap();
    let old_sig = std::fs::read(pubdir.join(paths::SIGNATURE)).unwrap();
    sign(&sk, &pubdir, &scripts, &[]).ok();
    std::fs::write(pubdir.join(paths::SIGNATURE), &old_sig).unwrap();
    verify_cmd(&pk, &[]).fails(4, "manifest is already serial 2 but");
    let o = verify_cmd(&pk, &[]);
    assert!(o
        .stderr
        .contains("an interrupted publish? Re-run `idhal sign`"));

    // Expired (a fixture `idhal sign` cannot make): refused, shown with --ignore-expiry.
    let m = Manifest {
        serial: 5,
        expires: 1_000_000,
        params: vec![],
        scriptlets: vec![],
    }
    .encode();
    let sig = sign_fixture(
        &sk,
        &m,
        &TrustedMeta {
            serial: 5,
            expires: 1_000_000,
        }
        .to_comment(),
    );
    publish_by_hand(&pubdir, 5, &m, &sig);
    verify_cmd(&pk, &[]).fails(3, "manifest serial 5 expired at 1970-01-12T13:46:40Z");
    let o = verify_cmd(&pk, &["--ignore-expiry"]).ok();
    assert!(o.stdout.contains("EXPIRED"));

    // Help documents the exit codes.
    let help = idhal_run(&["verify", "--help"]).ok();
    assert!(help.stdout.contains("3  refused"));
    assert!(help.stdout.contains("4  PUBDIR is inconsistent"));
}

#[test]
fn concurrent_signers_take_turns_and_stale_temp_files_are_cleaned() {
    let f = Fixture::published();
    // What a signer killed mid-write leaves behind.
    let stale = f.pubdir.join(".idhal-tmp.manifest.999999.0");
    std::fs::write(&stale, b"half").unwrap();
    let signers: Vec<_> = (0..4)
        .map(|_| {
            f.sign_command()
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in signers {
        assert!(c.wait().unwrap().success());
    }
    // Four more serials, none reused, every version intact.
    let key = public_key(&f.pk);
    assert_eq!(verified_serial(&f.pubdir, &key).0, 5);
    for n in 1..=5u64 {
        let body = read(&f.pubdir.join(paths::versioned_manifest(n)));
        let sig = std::fs::read_to_string(f.pubdir.join(paths::versioned_signature(n))).unwrap();
        assert_eq!(verify(&key, &body, &sig, &policy()).unwrap().serial, n);
    }
    assert!(!stale.exists());
}
