//! `idhal keygen` and the signing key's passphrase handling, through the built binary.

mod cli_support;

use cli_support::*;
use std::os::unix::fs::PermissionsExt;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn keygen_writes_a_minisign_pair_and_prints_the_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let out = idhal_run(&["keygen", "--dir", s(&keys), "--no-passphrase"]).ok();
    let (sk, pk) = (keys.join("idhal.key"), keys.join("idhal.pub"));
    assert_eq!(mode(&sk), 0o600);
    let key = public_key(&pk);
    assert!(out.stdout.contains(&format!("key id:      {}", key.id())));
    assert!(out
        .stdout
        .contains(&format!("idhal.pin={}", key.fingerprint())));
    let text = std::fs::read_to_string(&sk).unwrap();
    assert!(text.starts_with("untrusted comment: "));
    // "Ed" then KDF [0, 0]: unencrypted, like `minisign -W`.
    assert!(text.lines().nth(1).unwrap().starts_with("RWQAA"));
}

#[test]
fn keygen_never_overwrites_a_secret_key() {
    let dir = tempfile::tempdir().unwrap();
    let (sk, _) = keygen(dir.path());
    let before = std::fs::read(&sk).unwrap();
    idhal_run(&["keygen", "--dir", s(dir.path()), "--no-passphrase"])
        .fails(1, "already exists; refusing to overwrite a signing key");
    assert_eq!(std::fs::read(&sk).unwrap(), before);
    // There is no --force.
    idhal_run(&["keygen", "--dir", s(dir.path()), "--force"]).fails(2, "--force");
}

#[test]
fn keygen_without_a_terminal_or_passphrase_option_explains_the_options() {
    let dir = tempfile::tempdir().unwrap();
    let out = idhal_run(&["keygen", "--dir", s(dir.path())])
        .fails(1, "stdin is not a terminal: pass --passphrase-file FILE, set IDHAL_KEY_PASSPHRASE, or --no-passphrase");
    assert!(out.stdout.is_empty());
    assert!(!dir.path().join("idhal.key").exists());
}

#[test]
fn encrypted_key_from_passphrase_file_and_env() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys");
    let pass = dir.path().join("pass");
    std::fs::write(&pass, "correct horse\n").unwrap();
    let out = idhal_run(&["keygen", "--dir", s(&keys), "--passphrase-file", s(&pass)]).ok();
    assert!(out.stdout.contains("(encrypted)"));
    let (sk, pk) = (keys.join("idhal.key"), keys.join("idhal.pub"));
    assert_eq!(mode(&sk), 0o600);
    // "Ed" then KDF "Sc" (scrypt, as minisign).
    let text = std::fs::read_to_string(&sk).unwrap();
    assert!(text.lines().nth(1).unwrap().starts_with("RWRTY"));
    let key = public_key(&pk);

    // A fixture whose key is this encrypted one.
    let f = Fixture {
        sk: sk.clone(),
        ..Fixture::new()
    };

    // The passphrase file's trailing newline is not part of the passphrase.
    f.sign(&["--passphrase-file", s(&pass)]).ok();
    assert_eq!(verified_serial(&f.pubdir, &key).0, 1);
    f.sign_with_env_passphrase("correct horse").ok();
    assert_eq!(verified_serial(&f.pubdir, &key).0, 2);
    f.sign_with_env_passphrase("wrong")
        .fails(1, &format!("wrong passphrase for {}", sk.display()));
    f.sign(&[]).fails(
        1,
        "is encrypted and no passphrase is available: pass --passphrase-file FILE, set IDHAL_KEY_PASSPHRASE",
    );
    // Refusals published nothing.
    assert_eq!(verified_serial(&f.pubdir, &key).0, 2);
}

/// Runs `idhal ARGS` on a pseudo-terminal (util-linux `script`), typing `input`.
fn on_a_terminal(args: &[&str], input: &str) -> Run {
    let command = std::iter::once(BIN)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_remove("IDHAL_KEY_PASSPHRASE")
        .env_remove("IDHAL_SIGNING_KEY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("util-linux `script`");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    // On a terminal stdout and stderr arrive mixed in `stdout`.
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stdout).into_owned(),
    }
}

#[test]
fn on_a_terminal_the_passphrase_is_prompted_for() {
    let f = Fixture::new();
    let keys = f.dir.path().join("tty");
    let keys_arg = s(&keys).to_owned();
    on_a_terminal(&["keygen", "--dir", &keys_arg], "pw one\npw two\n")
        .fails(1, "the two passphrases typed differ");
    assert!(!keys.join("idhal.key").exists());
    let out = on_a_terminal(&["keygen", "--dir", &keys_arg], "pw one\npw one\n").ok();
    assert!(out.stdout.contains("Passphrase (again): "));
    assert!(out.stdout.contains("(encrypted)"));

    let key = keys.join("idhal.key");
    let args = [
        "sign",
        "--key",
        s(&key),
        "--out",
        s(&f.pubdir),
        s(&f.scripts),
    ];
    on_a_terminal(&args, "pw one\n").ok();
    assert_eq!(
        verified_serial(&f.pubdir, &public_key(&keys.join("idhal.pub"))).0,
        1
    );
}
