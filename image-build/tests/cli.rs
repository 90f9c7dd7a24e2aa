//! `idhal-image` as users run it: the built binary, checked with the library (and debugfs).
use std::path::PathBuf;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_idhal-image");

/// The cache the VM tests use, so the pinned .debs are downloaded once per target dir.
fn cache() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("idhal-image-cache")
}

#[test]
fn help_teaches_the_subcommands() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "build",
        "bake",
        "state-disk",
        "lock",
        "qemu-system-x86_64",
        "restrict=on",
        "docs/image-build.md",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn a_malformed_lock_is_refused_with_its_line() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("bad.lock"), "# pins\nopenvpn 2.6\n").unwrap();
    std::fs::write(d.path().join("agent"), b"not really an agent").unwrap();
    let out = Command::new(BIN)
        .args(["build", "--agent"])
        .arg(d.path().join("agent"))
        .arg("--lock")
        .arg(d.path().join("bad.lock"))
        .arg("--out")
        .arg(d.path().join("out"))
        .arg("--cache-dir")
        .arg(d.path().join("cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("lock file: line 2: expected `name version sha256`, got \"openvpn 2.6\""),
        "{err}"
    );
}

#[test]
fn state_disk_is_ext4_readable_without_mounting() {
    if !std::path::Path::new("/usr/sbin/mkfs.ext4").exists() {
        idhal_test_support::skip_or_fail("/usr/sbin/mkfs.ext4 (e2fsprogs) not installed");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let seed = d.path().join("seed");
    std::fs::create_dir_all(seed.join("scriptlets/000-x")).unwrap();
    std::fs::write(seed.join("scriptlets/000-x/done"), "finished 1\n").unwrap();
    let img = d.path().join("s.img");
    let out = Command::new(BIN)
        .args(["state-disk", "--size", "16", "--out"])
        .arg(&img)
        .arg("--seed")
        .arg(&seed)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = idhal_image_build::disk::read_file(&img, "/scriptlets/000-x/done").unwrap();
    assert_eq!(got.as_deref(), Some(&b"finished 1\n"[..]));
}

#[test]
fn build_writes_kernel_initrd_and_disk_and_caches_the_base() {
    // Needs the pinned packages (apt-get download); where apt cannot fetch them, the one
    // skip-or-fail rule (idhal_test_support) decides.
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("agent"), b"#!/bin/sh\necho stand-in agent\n").unwrap();
    std::fs::write(
        d.path().join("server.pub"),
        b"untrusted comment: k\nRWQ...\n",
    )
    .unwrap();
    let run = || {
        Command::new(BIN)
            .args(["build", "--agent"])
            .arg(d.path().join("agent"))
            .arg("--key")
            .arg(d.path().join("server.pub"))
            .arg("--out")
            .arg(d.path().join("out"))
            .arg("--cache-dir")
            .arg(cache())
            .output()
            .unwrap()
    };
    let first = run();
    if !first.status.success() {
        let err = String::from_utf8_lossy(&first.stderr);
        idhal_test_support::skip_or_fail(&format!("idhal-image build failed here: {err}"));
        return;
    }
    let second = run();
    assert!(second.status.success());
    let text = String::from_utf8_lossy(&second.stdout);
    assert!(text.contains("(cached)"), "{text}");
    for f in ["vmlinuz", "vmlinux", "initrd.img", "state.img"] {
        assert!(
            d.path().join("out").join(f).metadata().unwrap().len() > 0,
            "{f}"
        );
    }
    // The key rides in the uncompressed overlay at the end of the initrd.
    let initrd = std::fs::read(d.path().join("out/initrd.img")).unwrap();
    let tail = String::from_utf8_lossy(&initrd[initrd.len().saturating_sub(4096)..]);
    assert!(
        tail.contains("etc/idhal/server.pub") && tail.contains("RWQ..."),
        "{tail}"
    );
}
