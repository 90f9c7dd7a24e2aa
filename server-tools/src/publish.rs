//! Durable file writes for everything the server publishes or keeps (manifests, keys, later the CA):
//! atomic replace (temp file in the same directory, fsync, rename, fsync the directory) and the
//! exclusive directory lock that keeps two publishers from interleaving.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path} has no parent directory")]
    NoParent { path: PathBuf },
    #[error("{path} is locked by another process (another `idhal sign` running?); try again when it is done")]
    Locked { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PublishError + '_ {
    move |source| PublishError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Prefix of the temp files `write_atomic` leaves behind only if it is killed mid-write; hidden,
/// so `idhal serve` never serves them. `remove_stale_temp_files` removes them under the lock.
pub(crate) const TEMP_PREFIX: &str = ".idhal-tmp.";

/// Creates or replaces `path` with `bytes` so that a reader sees either the old file or the new
/// one, complete, even across a crash or power loss. The file gets `mode` (e.g. 0o644, 0o600 for
/// secrets) from the moment it exists.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PublishError> {
    let dir = parent(path)?;
    let name = path
        .file_name()
        .ok_or_else(|| PublishError::NoParent {
            path: path.to_owned(),
        })?
        .to_string_lossy();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{name}.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        drop(f);
        fs::rename(&tmp, path).map_err(io_err(path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        // Best effort: the real error is the one worth reporting.
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `path` with `bytes` and `mode`, failing with `Exists` if anything is already there:
/// the one-step claim used for secret keys, which must never be overwritten by accident.
pub(crate) fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PublishError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                PublishError::Exists {
                    path: path.to_owned(),
                }
            } else {
                PublishError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    let result = f
        .write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(path));
    if result.is_err() {
        // A half-written secret key is worse than none.
        let _ = fs::remove_file(path);
        return result;
    }
    sync_dir(parent(path)?)
}

/// fsync on a directory makes the renames and creations inside it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), PublishError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Removes a file and makes the removal durable; a file already gone is fine.
pub(crate) fn remove_durably(path: &Path) -> Result<(), PublishError> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(parent(path)?),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PublishError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes temp files a killed writer left in `dir`. Only call it while holding the `DirLock`
/// that every writer of `dir` takes, or it could delete a write in progress.
pub(crate) fn remove_stale_temp_files(dir: &Path) -> Result<Vec<PathBuf>, PublishError> {
    let mut removed = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            remove_durably(&entry.path())?;
            removed.push(entry.path());
        }
    }
    Ok(removed)
}

fn parent(path: &Path) -> Result<&Path, PublishError> {
    match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Ok(Path::new(".")),
        Some(p) => Ok(p),
        None => Err(PublishError::NoParent {
            path: path.to_owned(),
        }),
    }
}

/// An exclusive advisory lock (flock) on a lock file, held until dropped. The kernel releases it
/// if the process dies, so a crashed publisher never leaves the directory locked.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock without waiting: a second publisher gets `Locked` at once rather than
    /// queueing behind (and then silently overwriting) the first one's work.
    pub(crate) fn try_acquire(path: &Path) -> Result<DirLock, PublishError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        match file.try_lock() {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(TryLockError::WouldBlock) => Err(PublishError::Locked {
                path: path.to_owned(),
            }),
            Err(TryLockError::Error(source)) => Err(PublishError::Io {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Waits for the lock (a CI job queued behind another one).
    pub(crate) fn acquire(path: &Path) -> Result<DirLock, PublishError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_err(path))?;
        file.lock().map_err(io_err(path))?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        write_atomic(&p, b"one", 0o644).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        write_new(&p, b"a", 0o600).unwrap();
        assert!(matches!(
            write_new(&p, b"b", 0o600),
            Err(PublishError::Exists { .. })
        ));
        assert_eq!(fs::read(&p).unwrap(), b"a");
    }

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(".lock");
        let held = DirLock::try_acquire(&p).unwrap();
        assert!(matches!(
            DirLock::try_acquire(&p),
            Err(PublishError::Locked { .. })
        ));
        drop(held);
        DirLock::try_acquire(&p).unwrap();
    }

    #[test]
    fn stale_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(format!("{TEMP_PREFIX}manifest.1.0")), b"x").unwrap();
        fs::write(dir.path().join("manifest"), b"keep").unwrap();
        assert_eq!(remove_stale_temp_files(dir.path()).unwrap().len(), 1);
        assert!(dir.path().join("manifest").exists());
    }
}
