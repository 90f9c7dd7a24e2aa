//! OpenVPN's per-client files for client-connect: the config file (`openvpn_cc_*.tmp`, idhal
//! writes `ifconfig-push` there). idhal writes only such files, only in `[openvpn] tmp_dir`, only
//! when they are regular files OpenVPN made: anything else is refused before a byte is written.

use crate::publish::{write_atomic, PublishError};
use std::path::{Path, PathBuf};

/// Which of OpenVPN's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `client_connect_config_file`: per-client options, read after an accept.
    Config,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Config => "openvpn_cc_",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_openvpns_own_files_in_the_tmp_dir() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let good = dir.join("openvpn_cc_0123abcd.tmp");
        std::fs::write(&good, "").unwrap();
        let f = TmpFile::check(&good, Kind::Config, dir).unwrap();
        f.write_config("ifconfig-push 10.134.0.2 255.255.0.0\n")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(&good).unwrap(),
            "ifconfig-push 10.134.0.2 255.255.0.0\n"
        );

        let outside = tempfile::tempdir().unwrap();
        let elsewhere = outside.path().join("openvpn_cc_0123abcd.tmp");
        std::fs::write(&elsewhere, "keep").unwrap();
        let name = |p: &Path| {
            matches!(
                TmpFile::check(p, Kind::Config, dir),
                Err(TmpFileError::Name { .. })
            )
        };
        assert!(name(&elsewhere));
        assert!(name(&dir.join("../openvpn_cc_0123abcd.tmp")));
        assert!(name(&dir.join("openvpn_ccr_0123abcd.tmp")));
        assert!(name(&dir.join("openvpn_cc_.tmp")));
        assert!(name(&dir.join("openvpn_cc_a.b.tmp")));
        assert!(name(&dir.join("passwd")));
        assert!(name(Path::new("openvpn_cc_1.tmp")));

        // A symlink with the right name, to a file outside: refused, the target untouched.
        let link = dir.join("openvpn_cc_feed.tmp");
        std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
        assert!(matches!(
            TmpFile::check(&link, Kind::Config, dir),
            Err(TmpFileError::NotRegular { .. })
        ));
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"keep");
        let not_a_file = dir.join("openvpn_cc_dir1.tmp");
        std::fs::create_dir(&not_a_file).unwrap();
        assert!(matches!(
            TmpFile::check(&not_a_file, Kind::Config, dir),
            Err(TmpFileError::NotRegular { .. })
        ));
    }
}
