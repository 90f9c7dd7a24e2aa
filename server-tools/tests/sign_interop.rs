//! Interop with stock minisign (Debian package `minisign`), both ways: its keys sign with
//! `idhal sign`, our keys sign with `minisign -S`, each verifies the other's signatures, and
//! legacy `minisign -S -l` signatures are refused.

mod cli_support;

use cli_support::*;
use idhal_manifest::{paths, Manifest, TrustedMeta};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const MINISIGN: &str = "/usr/bin/minisign";

fn minisign(args: &[&str]) -> Run {
    assert!(
        Path::new(MINISIGN).exists(),
        "{MINISIGN} is missing: install the Debian package `minisign` (the README's test command does)"
    );
    run(Command::new(MINISIGN).args(args).stdin(Stdio::null()))
}

#[test]
fn stock_minisign_verifies_idhal_signatures() {
    let f = Fixture::published();
    let pubdir = &f.pubdir;
    let published_key = pubdir.join(paths::PUBLIC_KEY);
    let out = minisign(&[
        "-Vm",
        s(&pubdir.join(paths::MANIFEST)),
        "-p",
        s(&published_key),
    ])
    .ok();
    let (serial, expires) = verified_serial(pubdir, &public_key(&published_key));
    assert!(out
        .stdout
        .contains("Signature and comment signature verified"));
    assert!(
        out.stdout.contains(&format!(
            "Trusted comment: {}",
            TrustedMeta { serial, expires }.to_comment()
        )),
        "{}",
        out.stdout
    );
}

#[test]
fn a_minisign_generated_key_signs_with_idhal_sign() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("m.key"), dir.path().join("m.pub"));
    minisign(&["-G", "-W", "-p", s(&pk), "-s", s(&sk)]).ok();
    let scripts = dir.path().join("s");
    write(&scripts, "000-a.sh", "echo a\n");
    let pubdir = dir.path().join("pub");
    sign(&sk, &pubdir, &scripts, &[]).ok();
    assert_eq!(verified_serial(&pubdir, &public_key(&pk)).0, 1);
    minisign(&["-Vm", s(&pubdir.join(paths::MANIFEST)), "-p", s(&pk)]).ok();
    idhal_run(&["verify", "--pub", s(&pk), s(&pubdir)]).ok();
}

#[test]
fn idhal_keys_sign_with_stock_minisign() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"hello\n").unwrap();

    // Unencrypted: minisign asks no password.
    let (sk, pk) = keygen(&dir.path().join("plain"));
    minisign(&["-S", "-s", s(&sk), "-m", s(&file), "-t", "plain"]).ok();
    let v = minisign(&["-Vm", s(&file), "-p", s(&pk)]).ok();
    assert!(v.stdout.contains("Trusted comment: plain"));

    // Encrypted, the passphrase from the environment this time (sign_keygen.rs covers
    // --passphrase-file): minisign reads the password from stdin when it is not a terminal.
    let keys = dir.path().join("enc");
    let out =
        run(idhal()
            .env("IDHAL_KEY_PASSPHRASE", "s3cret")
            .args(["keygen", "--dir", s(&keys)]))
        .ok();
    assert!(out.stdout.contains("(encrypted)"));
    let mut child = Command::new(MINISIGN)
        .args([
            "-S",
            "-s",
            s(&keys.join("idhal.key")),
            "-m",
            s(&file),
            "-t",
            "enc",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"s3cret\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = minisign(&["-Vm", s(&file), "-p", s(&keys.join("idhal.pub"))]).ok();
    assert!(v.stdout.contains("Trusted comment: enc"));
}

/// A key pair made by `minisign -G -W`, and a manifest for serial 1 (valid for a day) written as
/// PUBDIR/manifest: (dir, secret key, public key, PUBDIR, manifest, trusted comment to sign).
fn stock_key_and_manifest() -> (
    tempfile::TempDir,
    PathBuf,
    PathBuf,
    PathBuf,
    Vec<u8>,
    String,
) {
    let dir = tempfile::tempdir().unwrap();
    let (sk, pk) = (dir.path().join("m.key"), dir.path().join("m.pub"));
    minisign(&["-G", "-W", "-p", s(&pk), "-s", s(&sk)]).ok();
    let pubdir = dir.path().join("pub");
    let expires = idhal_manifest::time::now() + 86_400;
    let body = Manifest {
        serial: 1,
        expires,
        params: vec![],
        scriptlets: vec![idhal_manifest::Scriptlet {
            id: "000-a".parse().unwrap(),
            frequency: Default::default(),
            body: b"echo a\n",
        }],
    }
    .encode();
    std::fs::create_dir_all(pubdir.join(paths::VERSIONS_DIR)).unwrap();
    std::fs::write(pubdir.join(paths::MANIFEST), &body).unwrap();
    let comment = TrustedMeta { serial: 1, expires }.to_comment();
    (dir, sk, pk, pubdir, body, comment)
}

#[test]
fn a_manifest_signed_by_stock_minisign_verifies_with_idhal_verify() {
    let (_dir, sk, pk, pubdir, body, comment) = stock_key_and_manifest();
    let manifest = pubdir.join(paths::MANIFEST);
    minisign(&["-S", "-s", s(&sk), "-m", s(&manifest), "-t", &comment]).ok();
    let sig = std::fs::read_to_string(pubdir.join(paths::SIGNATURE)).unwrap();
    publish_by_hand(&pubdir, 1, &body, &sig);
    let out = idhal_run(&["verify", "--pub", s(&pk), s(&pubdir)]).ok();
    assert!(out.stdout.contains("serial 1\n"));
    assert!(out.stdout.contains("000-a"));
}

#[test]
fn legacy_minisign_signatures_are_refused() {
    let (_dir, sk, pk, pubdir, body, comment) = stock_key_and_manifest();
    let manifest = pubdir.join(paths::MANIFEST);
    minisign(&["-S", "-l", "-s", s(&sk), "-m", s(&manifest), "-t", &comment]).ok();
    let sig = std::fs::read_to_string(pubdir.join(paths::SIGNATURE)).unwrap();
    publish_by_hand(&pubdir, 1, &body, &sig);
    idhal_run(&["verify", "--pub", s(&pk), s(&pubdir)]).fails(
        3,
        "legacy (non-prehashed) minisign signature refused: sign with `idhal sign` or a current minisign",
    );
}
