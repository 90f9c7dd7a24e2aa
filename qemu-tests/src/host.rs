//! What the host must have to run VMs, installed on demand (quietly) when we are root on Debian.
//! Whether a test that still cannot run fails or skips is `idhal_test_support`'s one rule.
use std::path::Path;
use std::process::Command;

/// Host programs the harness runs, and the Debian package that brings each one. Every package
/// here is in scripts/apt-packages.txt too (a test checks), so scripts/setup-debian.sh has
/// installed them before the suite or the demo starts.
pub const TOOLS: &[(&str, &str)] = &[
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

fn missing() -> Vec<&'static (&'static str, &'static str)> {
    TOOLS
        .iter()
        .filter(|(p, _)| !Path::new(p).exists())
        .collect()
}

/// Ok when every tool is there, after installing missing packages with apt-get if we are root.
/// apt's output is kept out of the way: shown only when the install fails.
pub fn ensure_tools() -> Result<(), String> {
    let m = missing();
    if m.is_empty() {
        return Ok(());
    }
    let mut pkgs: Vec<&str> = m.iter().map(|(_, p)| *p).collect();
    pkgs.dedup();
    let mut apt_said = String::new();
    if is_root() && Path::new("/usr/bin/apt-get").exists() {
        eprintln!(
            "installing Debian packages for the VM tests: {} (scripts/setup-debian.sh would have)",
            pkgs.join(" ")
        );
        let mut apt = |args: &[&str]| {
            let out = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .output();
            match out {
                Ok(o) if o.status.success() => true,
                Ok(o) => {
                    apt_said.push_str(&String::from_utf8_lossy(&o.stdout));
                    apt_said.push_str(&String::from_utf8_lossy(&o.stderr));
                    false
                }
                Err(e) => {
                    apt_said.push_str(&format!("apt-get: {e}\n"));
                    false
                }
            }
        };
        let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
        install.extend(&pkgs);
        if !apt(&install) {
            apt(&["update", "-qq"]);
            apt(&install);
        }
    }
    let m = missing();
    if m.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "missing {} (Debian packages: {}; scripts/setup-debian.sh installs them){}",
            m.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(", "),
            pkgs.join(" "),
            if apt_said.is_empty() {
                String::new()
            } else {
                format!("; apt-get said:\n{apt_said}")
            }
        ))
    }
}

pub fn is_root() -> bool {
    idhal_test_support::is_root()
}

/// For a prerequisite only some tests need: `None` after `idhal_test_support::skip_or_fail`
/// (a failure under scripts/test.sh and CI, a SKIPPED line otherwise).
pub fn or_skip<T>(r: Result<T, String>, what: &str) -> Option<T> {
    idhal_test_support::or_skip(r, what)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packages every Debian system has (Priority: required): apt-packages.txt need not list them.
    const ESSENTIAL: &[&str] = &["dpkg", "apt"];

    /// The harness must never have to install anything under scripts/test.sh or the demo:
    /// everything it runs comes from a package setup-debian.sh installs.
    #[test]
    fn every_tool_package_is_in_the_setup_list() {
        let list =
            std::fs::read_to_string(crate::bins::workspace_dir().join("scripts/apt-packages.txt"))
                .unwrap();
        let listed: Vec<&str> = list
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        for (tool, pkg) in TOOLS {
            assert!(
                listed.contains(pkg) || ESSENTIAL.contains(pkg),
                "{tool} comes from {pkg}, which scripts/apt-packages.txt does not list"
            );
        }
    }
}
