//! OpenVPN's per-client files for client-connect: the config file (`openvpn_cc_*.tmp`, idhal
//! writes `ifconfig-push` there) and the deferred result file (`openvpn_ccr_*.tmp`: `2`, `1`,
//! `0`). idhal writes only such files, only in `[openvpn] tmp_dir`, only when they are regular
//! files OpenVPN made: a request naming anything else is refused before a byte is written.

use crate::publish::{write_atomic, PublishError};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Which of the two files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `client_connect_config_file`: per-client options, read after an accept.
    Config,
    /// `client_connect_deferred_file`: the verdict, first byte `2` (later), `1` (accept), `0`.
    Result,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Config => "openvpn_cc_",
            Kind::Result => "openvpn_ccr_",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TmpFileError {
    #[error("{path:?} is not an OpenVPN {what} file (want {dir}/{prefix}….tmp): refused")]
    Name {
        path: PathBuf,
        what: &'static str,
        dir: String,
        prefix: &'static str,
    },
    #[error("{path}: not a regular file (a symlink, directory or device): refused")]
    NotRegular { path: PathBuf },
    #[error("{path} is gone (the client left, or OpenVPN already decided)")]
    Gone { path: PathBuf },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Write(#[from] PublishError),
}

/// One of OpenVPN's client-connect files, checked: inside `tmp_dir`, named as OpenVPN names it,
/// a regular file (not a symlink) right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TmpFile {
    path: PathBuf,
    kind: Kind,
}

impl TmpFile {
    pub fn check(path: &Path, kind: Kind, tmp_dir: &Path) -> Result<Self, TmpFileError> {
        let what = match kind {
            Kind::Config => "client-connect config",
            Kind::Result => "client-connect deferred result",
        };
        let bad = || TmpFileError::Name {
            path: path.to_owned(),
            what,
            dir: tmp_dir.display().to_string(),
            prefix: kind.prefix(),
        };
        let name = path.file_name().and_then(|n| n.to_str()).ok_or_else(bad)?;
        let rand = name
            .strip_prefix(kind.prefix())
            .and_then(|r| r.strip_suffix(".tmp"))
            .ok_or_else(bad)?;
        // OpenVPN's random part is hex; never a path, never empty, never long.
        if rand.is_empty()
            || rand.len() > 64
            || !rand.bytes().all(|b| b.is_ascii_alphanumeric())
            || !path.is_absolute()
            || path.parent() != Some(tmp_dir)
        {
            return Err(bad());
        }
        let file = Self {
            path: path.to_owned(),
            kind,
        };
        file.regular()?;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn regular(&self) -> Result<std::fs::Metadata, TmpFileError> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_file() => Ok(m),
            Ok(_) => Err(TmpFileError::NotRegular {
                path: self.path.clone(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(TmpFileError::Gone {
                path: self.path.clone(),
            }),
            Err(source) => Err(TmpFileError::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    /// The config file's whole content, atomically (OpenVPN opens it by name after the verdict).
    pub fn write_config(&self, text: &str) -> Result<(), TmpFileError> {
        debug_assert_eq!(self.kind, Kind::Config);
        self.regular()?;
        write_atomic(&self.path, text.as_bytes(), 0o600)?;
        Ok(())
    }

    /// The verdict byte, written in place: an empty file means "still deferred" to OpenVPN, so
    /// truncate-then-write can never be read as another verdict. `None` empties the file (the
    /// synchronous path: empty and exit 0 accepts, the exit code decides).
    pub fn write_result(&self, verdict: Option<u8>) -> Result<(), TmpFileError> {
        debug_assert_eq!(self.kind, Kind::Result);
        let io = |source| TmpFileError::Io {
            path: self.path.clone(),
            source,
        };
        let before = self.regular()?;
        // No create: a file OpenVPN deleted stays deleted. O_NOFOLLOW: a symlink swapped in
        // since the check is refused (ELOOP), and the inode must be the one checked.
        let mut f = OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TmpFileError::Gone {
                    path: self.path.clone(),
                },
                _ => io(e),
            })?;
        let m = f.metadata().map_err(io)?;
        if !m.file_type().is_file() || (m.dev(), m.ino()) != (before.dev(), before.ino()) {
            return Err(TmpFileError::NotRegular {
                path: self.path.clone(),
            });
        }
        f.set_len(0).map_err(io)?;
        if let Some(b) = verdict {
            f.write_all(&[b, b'\n']).map_err(io)?;
        }
        f.sync_all().map_err(io)
    }
}

/// Removes OpenVPN's client-connect files (and idhal's interrupted temp copies of them) older
/// than `max_age` from `tmp_dir`: OpenVPN never deletes the files of a client that left while
/// its connect was deferred. Regular files only; returns how many went.
pub fn sweep(tmp_dir: &Path, max_age: Duration, now: SystemTime) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(tmp_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("openvpn_cc")
            || name.starts_with(&format!("{}openvpn_cc", crate::publish::TEMP_PREFIX));
        if !ours {
            continue;
        }
        let Ok(m) = entry.path().symlink_metadata() else {
            continue;
        };
        let old = m
            .modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|age| age > max_age);
        if m.file_type().is_file() && old && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_openvpns_own_files_in_the_tmp_dir() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let good = dir.join("openvpn_ccr_0123abcd.tmp");
        std::fs::write(&good, "").unwrap();
        let f = TmpFile::check(&good, Kind::Result, dir).unwrap();
        f.write_result(Some(b'1')).unwrap();
        assert_eq!(std::fs::read(&good).unwrap(), b"1\n");
        f.write_result(None).unwrap();
        assert_eq!(std::fs::read(&good).unwrap(), b"");

        let outside = tempfile::tempdir().unwrap();
        let elsewhere = outside.path().join("openvpn_ccr_0123abcd.tmp");
        std::fs::write(&elsewhere, "keep").unwrap();
        let name =
            |p: &Path, k| matches!(TmpFile::check(p, k, dir), Err(TmpFileError::Name { .. }));
        assert!(name(&elsewhere, Kind::Result));
        assert!(name(&dir.join("../openvpn_ccr_0123abcd.tmp"), Kind::Result));
        assert!(name(&dir.join("openvpn_cc_0123abcd.tmp"), Kind::Result));
        assert!(name(&dir.join("openvpn_ccr_0123abcd.tmp"), Kind::Config));
        assert!(name(&dir.join("openvpn_ccr_.tmp"), Kind::Result));
        assert!(name(&dir.join("openvpn_ccr_a.b.tmp"), Kind::Result));
        assert!(name(&dir.join("passwd"), Kind::Result));
        assert!(name(Path::new("openvpn_ccr_1.tmp"), Kind::Result));

        // A symlink with the right name, to a file outside: refused, the target untouched.
        let link = dir.join("openvpn_ccr_feed.tmp");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert!(matches!(
            TmpFile::check(&link, Kind::Result, dir),
            Err(TmpFileError::NotRegular { .. })
        ));
        // Swapped in after the check: O_NOFOLLOW refuses it.
        let swapped = dir.join("openvpn_ccr_beef.tmp");
        std::fs::write(&swapped, "").unwrap();
        let checked = TmpFile::check(&swapped, Kind::Result, dir).unwrap();
        std::fs::remove_file(&swapped).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &swapped).unwrap();
        assert!(checked.write_result(Some(b'1')).is_err());
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
        // Gone: never re-created.
        std::fs::remove_file(&swapped).unwrap();
        assert!(matches!(
            checked.write_result(Some(b'1')),
            Err(TmpFileError::Gone { .. })
        ));
        assert!(!swapped.exists());
        let fifo_like = dir.join("openvpn_cc_dir1.tmp");
        std::fs::create_dir(&fifo_like).unwrap();
        assert!(matches!(
            TmpFile::check(&fifo_like, Kind::Config, dir),
            Err(TmpFileError::NotRegular { .. })
        ));
    }

    #[test]
    fn the_janitor_removes_only_old_openvpn_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        for n in ["openvpn_cc_1.tmp", "openvpn_ccr_1.tmp", "other.tmp"] {
            std::fs::write(dir.join(n), "").unwrap();
        }
        std::fs::create_dir(dir.join("openvpn_cc_dir.tmp")).unwrap();
        let now = SystemTime::now();
        assert_eq!(sweep(dir, Duration::from_secs(600), now).unwrap(), 0);
        let later = now + Duration::from_secs(3600);
        assert_eq!(sweep(dir, Duration::from_secs(600), later).unwrap(), 2);
        assert!(dir.join("other.tmp").exists());
        assert!(dir.join("openvpn_cc_dir.tmp").is_dir());
    }
}
