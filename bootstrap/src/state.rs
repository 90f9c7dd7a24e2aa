//! The node's state directory: the pinned key, the last accepted serial and manifest, and one
//! record directory per scriptlet. Everything that matters is written atomically and durably.
//!
//! Layout (docs/agent.md): `server.pub`, `serial`, `manifest`, `manifest.minisig`, `last-run`,
//! `lock`, `scriptlets/<id>/{script,log,done,failed}`, `enroll.lock`, `enroll/` (enroll.rs).

use crate::error::AgentError;
use idhal_manifest::{verify, Manifest, Policy, PublicKey};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The last accepted manifest and its signature, as `run` received them.
pub const MANIFEST: &str = "manifest";
pub const SIGNATURE: &str = "manifest.minisig";
/// The last accepted serial, written after the two copies.
pub const SERIAL: &str = "serial";

/// Whether a write must survive power loss once it returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: markers, the pinned key, the accepted serial.
    Durable,
    /// Atomic but not synced: reports that the next run rewrites anyway.
    Relaxed,
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content, never a
/// mix: temp file in the same directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    write_file(path, bytes, mode, Durability::Durable)
}

pub fn write_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> Result<(), AgentError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let io = |e| AgentError::state(path, e);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        if durability == Durability::Relaxed {
            return fs::rename(&tmp, path);
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Parsed `key=value` record (a marker or a failure record).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub finished: u64,
    pub duration_ms: u64,
    /// Exit code, or `signal N`.
    pub outcome: String,
    pub boot_id: String,
    pub serial: u64,
}

impl Record {
    pub fn encode(&self) -> String {
        format!(
            "finished={}\nduration_ms={}\noutcome={}\nboot_id={}\nserial={}\n",
            self.finished, self.duration_ms, self.outcome, self.boot_id, self.serial
        )
    }

    pub fn parse(text: &str) -> Record {
        let mut r = Record::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            match k {
                "finished" => r.finished = v.parse().unwrap_or(0),
                "duration_ms" => r.duration_ms = v.parse().unwrap_or(0),
                "outcome" => r.outcome = v.to_owned(),
                "boot_id" => r.boot_id = v.to_owned(),
                "serial" => r.serial = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        r
    }
}

pub struct StateDir {
    pub root: PathBuf,
}

impl StateDir {
    pub fn new(root: &Path) -> Self {
        StateDir { root: root.into() }
    }

    pub fn create(&self) -> Result<(), AgentError> {
        fs::create_dir_all(self.root.join("scriptlets"))
            .and_then(|_| fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700)))
            .map_err(|e| AgentError::state(&self.root, e))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    pub fn scriptlet_dir(&self, id: &str) -> PathBuf {
        self.root.join("scriptlets").join(id)
    }

    /// Reads a small file; `None` if it does not exist.
    pub fn read(&self, path: &Path) -> Result<Option<String>, AgentError> {
        match fs::read_to_string(path) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(AgentError::state(path, e)),
        }
    }

    pub fn last_serial(&self) -> Result<Option<u64>, AgentError> {
        let path = self.path(SERIAL);
        match self.read(&path)? {
            None => Ok(None),
            Some(t) => t.trim().parse().map(Some).map_err(|_| {
                AgentError::state(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "not a serial number"),
                )
            }),
        }
    }

    /// The manifest `run` accepted last, verified again with `key` under `policy` before anyone
    /// reads it (the state directory is not trusted more than the network): `None` until `run`
    /// accepted one. `enroll` acts on it (expiry enforced), `status` only shows it (ignored).
    /// The manifest borrows its scriptlet bodies from `buf`, which receives the stored bytes.
    pub fn accepted_manifest<'a>(
        &self,
        key: &PublicKey,
        policy: &Policy,
        buf: &'a mut Vec<u8>,
    ) -> Result<Option<Manifest<'a>>, AgentError> {
        let path = self.path(MANIFEST);
        *buf = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::state(&path, e)),
        };
        let Some(sig) = self.read(&self.path(SIGNATURE))? else {
            return Ok(None);
        };
        Ok(Some(verify(key, buf, &sig, policy)?))
    }

    /// Whether a `done` marker exists (one syscall: the no-op run checks hundreds).
    pub fn is_done(&self, id: &str) -> Result<bool, AgentError> {
        let path = self.scriptlet_dir(id).join("done");
        path.try_exists().map_err(|e| AgentError::state(&path, e))
    }

    pub fn record(&self, id: &str, kind: &str) -> Result<Option<Record>, AgentError> {
        Ok(self
            .read(&self.scriptlet_dir(id).join(kind))?
            .map(|t| Record::parse(&t)))
    }

    /// Takes the lock file `name` without waiting: the boot run and the periodic run never
    /// overlap (`lock`), nor do two enrollments (`enroll.lock`: `enroll` runs inside a run's
    /// scriptlet, which holds `lock`), nor two instances of a scriptlet
    /// (`scriptlets/<id>/lock`). Released when every copy of the returned file is closed:
    /// when it is dropped, or the process dies, and the same in every child that inherited it.
    /// Read-only and empty: a scriptlet gets its lock as standard input.
    pub fn lock(&self, name: &str) -> Result<File, AgentError> {
        let path = self.path(name);
        let f = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .and_then(|_| File::open(&path))
            .map_err(|e| AgentError::state(&path, e))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(fs::TryLockError::WouldBlock) => Err(AgentError::Busy(path)),
            Err(fs::TryLockError::Error(e)) => Err(AgentError::state(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp file left behind"
        );
        let r = Record {
            finished: 5,
            duration_ms: 7,
            outcome: "exit 0".into(),
            boot_id: "b".into(),
            serial: 3,
        };
        assert_eq!(Record::parse(&r.encode()), r);
    }

    #[test]
    fn accepted_manifest_is_verified_again() {
        use idhal_manifest::{Expiry, TrustedMeta, VerifyError};
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        let key = PublicKey::from_base64(&kp.pk.to_base64()).unwrap();
        let (serial, expires) = (3, 2_000_000_000);
        let m = Manifest {
            serial,
            expires,
            params: vec![],
            scriptlets: vec![],
        }
        .encode();
        let comment = TrustedMeta { serial, expires }.to_comment();
        let sig = minisign::sign(Some(&kp.pk), &kp.sk, &m[..], Some(&comment), None)
            .unwrap()
            .into_string();
        let enforce = Policy {
            now: expires - 1,
            expiry: Expiry::Enforce,
            last_serial: Some(serial),
        };
        let mut buf = Vec::new();
        let mut load = |policy: &Policy| {
            s.accepted_manifest(&key, policy, &mut buf)
                .map(|m| m.map(|m| m.serial))
        };

        assert_eq!(load(&enforce).unwrap(), None, "nothing stored");
        fs::write(s.path(MANIFEST), &m).unwrap();
        assert_eq!(load(&enforce).unwrap(), None, "no signature stored");
        fs::write(s.path(SIGNATURE), &sig).unwrap();
        assert_eq!(load(&enforce).unwrap(), Some(serial));

        let expired = Policy {
            now: expires,
            ..enforce
        };
        assert!(matches!(
            load(&expired),
            Err(AgentError::Refused(VerifyError::Expired { serial: 3, .. }))
        ));
        let shown = Policy {
            expiry: Expiry::Ignore,
            ..expired
        };
        assert_eq!(load(&shown).unwrap(), Some(serial));
        let rolled_back = Policy {
            last_serial: Some(serial + 1),
            ..enforce
        };
        assert!(matches!(
            load(&rolled_back),
            Err(AgentError::Refused(VerifyError::Rollback {
                got: 3,
                last: 4
            }))
        ));

        // The state directory is trusted no more than the network.
        let mut tampered = m.clone();
        tampered[m.len() - 2] ^= 1;
        fs::write(s.path(MANIFEST), &tampered).unwrap();
        assert!(matches!(
            load(&enforce),
            Err(AgentError::Refused(VerifyError::BadSignature))
        ));
        fs::write(s.path(MANIFEST), &m).unwrap();
        fs::write(s.path(SIGNATURE), "not a signature").unwrap();
        assert!(matches!(
            load(&enforce),
            Err(AgentError::Refused(VerifyError::MalformedSignature(_)))
        ));
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::new(dir.path());
        let held = s.lock("lock").unwrap();
        assert!(matches!(s.lock("lock"), Err(AgentError::Busy(_))));
        let other = s.lock("enroll.lock").unwrap();
        drop(held);
        s.lock("lock").unwrap();
        drop(other);
    }
}
