//! The lock file: which Debian packages, at which version, with which sha256. Owns parsing it and
//! fetching + checking the pinned .deb files into the cache.
use crate::{run_cmd, sha256_hex, Error};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The lock file shipped in the repository (image-build/debian.lock).
pub const DEFAULT_LOCK: &str = include_str!("../debian.lock");

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    pub name: String,
    pub version: String,
    pub sha256: String,
}

impl Pin {
    /// Our own file name in the cache: apt's has URL-escaped epochs (`1%3a…`).
    fn file_name(&self) -> String {
        format!("{}_{}.deb", self.name, self.version.replace(':', "%3a"))
    }
}

#[derive(Debug, Clone)]
pub struct Lock {
    pub pins: Vec<Pin>,
}

impl Lock {
    pub fn parse(text: &str) -> Result<Lock, Error> {
        let mut pins = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let ok_hash = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit());
            if f.len() != 3 || !ok_hash(f[2]) {
                return Err(Error::Lock(format!(
                    "line {}: expected `name version sha256`, got {line:?}",
                    i + 1
                )));
            }
            pins.push(Pin {
                name: f[0].into(),
                version: f[1].into(),
                sha256: f[2].to_ascii_lowercase(),
            });
        }
        for required in ["busybox-static", "openvpn", "wireguard-tools", "libc6"] {
            if !pins.iter().any(|p| p.name == required) {
                return Err(Error::Lock(format!("no pin for {required}")));
            }
        }
        if !pins.iter().any(|p| p.name.starts_with("linux-image-")) {
            return Err(Error::Lock(
                "no pin for a linux-image-* kernel package".into(),
            ));
        }
        Ok(Lock { pins })
    }

    pub fn get(&self, name: &str) -> Option<&Pin> {
        self.pins.iter().find(|p| p.name == name)
    }

    pub fn kernel(&self) -> &Pin {
        // parse() guarantees one.
        self.pins
            .iter()
            .find(|p| p.name.starts_with("linux-image-"))
            .expect("kernel pin")
    }

    /// Makes sure every pinned .deb is in `cache/debs` with the pinned hash; returns their paths
    /// in lock order. Missing ones are fetched with one `apt-get download`; when apt does not know
    /// the version (a fresh machine without `apt-get update`), it updates its lists once and retries.
    pub fn fetch(&self, cache: &Path) -> Result<Vec<PathBuf>, Error> {
        let dir = cache.join("debs");
        fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let missing: Vec<&Pin> = self
            .pins
            .iter()
            .filter(|p| !matches!(check(&dir.join(p.file_name()), p), Ok(true)))
            .collect();
        if !missing.is_empty() {
            let tmp = dir.join(format!(".download-{}", std::process::id()));
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
            // Always remove the download dir, also when a download or a hash check fails.
            let r = (|| -> Result<(), Error> {
                let args: Vec<String> = missing
                    .iter()
                    .map(|p| format!("{}={}", p.name, p.version))
                    .collect();
                let download = || {
                    run_cmd(
                        Command::new("apt-get")
                            // apt drops to the _apt user for downloads; it cannot write our cache.
                            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
                            .args(&args)
                            .current_dir(&tmp),
                    )
                };
                if download().is_err() {
                    run_cmd(Command::new("apt-get").args(["-q", "update"]))?;
                    download().map_err(|e| {
                    Error::Lock(format!(
                        "apt cannot download the pinned {}: {e}\nDebian removes superseded versions \
                         (kernel ABIs first) from its mirror: refresh the pins with \
                         `idhal-image lock > image-build/debian.lock` and commit them",
                        args.join(" ")
                    ))
                })?;
                }
                for p in &missing {
                    let got = fs::read_dir(&tmp)
                        .map_err(|e| Error::io(&tmp, e))?
                        .filter_map(|e| e.ok())
                        .map(|e| e.path())
                        .find(|f| {
                            f.file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(|n| n.starts_with(&format!("{}_", p.name)))
                        })
                        .ok_or_else(|| {
                            Error::Lock(format!("apt-get download gave no .deb for {}", p.name))
                        })?;
                    if !check(&got, p)? {
                        return Err(Error::Hash {
                            package: format!("{}={}", p.name, p.version),
                            expected: p.sha256.clone(),
                            got: sha256_hex(&fs::read(&got).map_err(|e| Error::io(&got, e))?),
                        });
                    }
                    let dest = dir.join(p.file_name());
                    fs::rename(&got, &dest).map_err(|e| Error::io(&dest, e))?;
                }
                Ok(())
            })();
            let _ = fs::remove_dir_all(&tmp);
            r?;
        }
        Ok(self.pins.iter().map(|p| dir.join(p.file_name())).collect())
    }
}

/// Ok(true) when the file exists and has the pinned hash.
fn check(path: &Path, pin: &Pin) -> Result<bool, Error> {
    match fs::read(path) {
        Ok(bytes) => Ok(sha256_hex(&bytes) == pin.sha256),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Writes a new lock text for `names`: the candidate version apt offers now, downloaded and hashed.
pub fn relock(names: &[String], work: &Path) -> Result<String, Error> {
    fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    run_cmd(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download"])
            .args(names)
            .current_dir(work),
    )?;
    let mut out = String::from(
        "# Debian 12 packages the test vnode is built from, pinned: `name version sha256` of the .deb.\n\
         # idhal-image downloads exactly these (apt-get download NAME=VERSION) and refuses any other bytes.\n\
         # When Debian drops a version from its mirror, refresh with `idhal-image lock` and commit the result.\n",
    );
    for name in names {
        let deb = fs::read_dir(work)
            .map_err(|e| Error::io(work, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|f| {
                f.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")))
            })
            .ok_or_else(|| Error::Lock(format!("apt-get download gave no .deb for {name}")))?;
        let version = run_cmd(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
        let bytes = fs::read(&deb).map_err(|e| Error::io(&deb, e))?;
        out.push_str(&format!(
            "{name} {} {}\n",
            version.trim(),
            sha256_hex(&bytes)
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_lock_parses() {
        let l = Lock::parse(DEFAULT_LOCK).unwrap();
        assert!(l.kernel().name.ends_with("-cloud-amd64"));
        assert_eq!(
            l.get("busybox-static")
                .unwrap()
                .file_name()
                .matches("%3a")
                .count(),
            1
        );
    }

    #[test]
    fn bad_lines_are_refused() {
        let refusal = |text: &str| match Lock::parse(text) {
            Err(Error::Lock(why)) => why,
            other => panic!("{text:?}: {other:?}"),
        };
        assert_eq!(
            refusal("openvpn 1.0\n"),
            "line 1: expected `name version sha256`, got \"openvpn 1.0\""
        );
        assert_eq!(
            refusal("# pins\n\nopenvpn 1 abc\n"),
            "line 3: expected `name version sha256`, got \"openvpn 1 abc\""
        );
        assert_eq!(refusal(""), "no pin for busybox-static");
        // `wg` is one of the image's programs: a lock without it is refused up front, not
        // halfway through an assembly.
        let without_wg: String = DEFAULT_LOCK
            .lines()
            .filter(|l| !l.starts_with("wireguard-tools "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(refusal(&without_wg), "no pin for wireguard-tools");
    }
}
