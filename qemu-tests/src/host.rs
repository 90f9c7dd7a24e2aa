//! What the host must have to run VMs, installed on demand when we are root on Debian.
use std::path::Path;
use std::process::Command;

/// Host programs the harness runs, and the Debian package that brings each one.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
    ("/usr/bin/socat", "socat"),
    ("/usr/bin/qemu-img", "qemu-utils"),
    ("/usr/sbin/openvpn", "openvpn"),
    ("/usr/bin/openssl", "openssl"),
    ("/usr/sbin/debootstrap", "debootstrap"),
    ("/usr/sbin/mkfs.ext4", "e2fsprogs"),
    ("/usr/sbin/debugfs", "e2fsprogs"),
    ("/usr/bin/dpkg-deb", "dpkg"),
    ("/usr/bin/apt-get", "apt"),
];

/// CI must fail, not skip, when something is missing.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn missing() -> Vec<&'static (&'static str, &'static str)> {
    TOOLS
        .iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .collect()
}

/// Ok when every tool is there, after installing missing packages with apt-get if we are root.
pub fn ensure_tools() -> Result<(), String> {
    let m = missing();
    if m.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = m.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        eprintln!(
            "installing Debian packages for the VM tests: {}",
            pkgs.join(" ")
        );
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut install = vec!["install", "-y", "-q", "--no-install-recommends"];
        install.extend(&pkgs);
        if !apt(&install) {
            apt(&["update", "-q"]);
            apt(&install);
        }
    }
    let m = missing();
    if m.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing {} (Debian packages: {}; scripts/setup-debian.sh installs them)",
            m.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "),
            pkgs.join(" ")
        ))
    }
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
}

/// For a prerequisite only some tests need: `None` (skip, with a message) outside CI, a panic
/// in CI.
pub fn or_skip<T>(r: Result<T, String>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) if ci() => panic!("{what}: {e} (CI=true forbids skipping)"),
        Err(e) => {
            eprintln!("SKIPPING: {what}: {e}");
            None
        }
    }
}
