//! `idhal scriptlet ssh-key` output goes through the real `idhal sign` / `idhal verify`: the
//! scheduler's key reaches nodes only inside a signed manifest.

use std::process::Command;

const IDHAL: &str = env!("CARGO_BIN_EXE_idhal");
const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHhG3uQ6YQ2Zk1mVxq3kq2n9m8J0oWQ1ZbEw9XyZc3Xo oar@frontend";

fn idhal(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(IDHAL).args(args).output().unwrap()
}

#[test]
fn ssh_key_scriptlet_is_signed_and_verified() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).into_os_string();
    std::fs::write(d.path().join("oar.pub"), format!("{KEY}\n")).unwrap();
    let o = idhal(&[
        "scriptlet".as_ref(),
        "ssh-key".as_ref(),
        "--key".as_ref(),
        &p("oar.pub"),
        "--out".as_ref(),
        &p("scriptlets"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let script =
        std::fs::read_to_string(d.path().join("scriptlets/050-scheduler-ssh-key.sh")).unwrap();
    assert!(
        script.starts_with("#!/bin/sh\n# idhal: frequency=boot\n"),
        "{script}"
    );
    assert!(script.contains(&format!("key='{KEY}'")));

    let o = idhal(&[
        "keygen".as_ref(),
        "--no-passphrase".as_ref(),
        "--dir".as_ref(),
        &p("keys"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = idhal(&[
        "sign".as_ref(),
        "--key".as_ref(),
        &p("keys/idhal.key"),
        "--out".as_ref(),
        &p("pub"),
        &p("scriptlets"),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = idhal(&[
        "verify".as_ref(),
        "--pub".as_ref(),
        &p("keys/idhal.pub"),
        &p("pub"),
    ]);
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{out}");
    assert!(out.contains("050-scheduler-ssh-key"), "{out}");
}

#[test]
fn private_or_odd_keys_are_refused() {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in [
        (
            "priv",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
                .to_string(),
        ),
        ("opts", format!("command=\"/bin/sh\" {KEY}\n")),
        ("quote", format!("{KEY}'$(reboot)'\n")),
    ] {
        let key = d.path().join(name);
        std::fs::write(&key, text).unwrap();
        let o = idhal(&[
            "scriptlet".as_ref(),
            "ssh-key".as_ref(),
            "--key".as_ref(),
            key.as_os_str(),
            "--out".as_ref(),
            d.path().join("out").as_os_str(),
        ]);
        assert_eq!(o.status.code(), Some(1), "{name}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("refusing"),
            "{name}"
        );
        assert!(!d.path().join("out/050-scheduler-ssh-key.sh").exists());
    }
}
