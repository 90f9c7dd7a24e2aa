//! Checking a PUBDIR as an agent would (the same library, the same fixed order) and that its
//! files agree with each other: `manifest` with `manifests/<serial>`, both signatures, and the
//! key it serves with the key nodes are pinned to.

use idhal_manifest::key::KeyError;
use idhal_manifest::{paths, verify, Expiry, Manifest, Policy, PublicKey, VerifyError};
use std::path::{Path, PathBuf};

/// Why a PUBDIR does not check out. `verdict` says what kind of failure it is.
#[derive(Debug, thiserror::Error)]
pub enum PubdirError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not UTF-8 text", path.display())]
    NotUtf8 { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Signature { path: PathBuf, source: VerifyError },
    #[error("{} is already serial {newer} but {} still signs an older one: an interrupted publish? Re-run `idhal sign`", manifest.display(), signature.display())]
    Interrupted {
        manifest: PathBuf,
        signature: PathBuf,
        newer: u64,
    },
    #[error("{} differs from {}", original.display(), copy.display())]
    Differs { original: PathBuf, copy: PathBuf },
    #[error("cannot read {}: {source}", copy.display())]
    CopyUnreadable {
        copy: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is key {served_id} ({served_fingerprint}), not the key {given_id} given with --pub: first-boot nodes pinned by fingerprint would refuse it", path.display())]
    OtherKey {
        path: PathBuf,
        served_id: String,
        served_fingerprint: String,
        given_id: String,
    },
    #[error("{}: {source}", path.display())]
    BadServedKey { path: PathBuf, source: KeyError },
}

/// What a failed check means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A file could not be read at all: nothing was checked.
    Unreadable,
    /// The manifest or its signature fails verification: an agent would refuse it.
    Refused,
    /// Agents may accept it, but PUBDIR's files disagree (an interrupted publish, another key).
    Inconsistent,
}

impl PubdirError {
    pub fn verdict(&self) -> Verdict {
        match self {
            PubdirError::Read { .. } => Verdict::Unreadable,
            PubdirError::NotUtf8 { .. } | PubdirError::Signature { .. } => Verdict::Refused,
            PubdirError::Interrupted { .. }
            | PubdirError::Differs { .. }
            | PubdirError::CopyUnreadable { .. }
            | PubdirError::OtherKey { .. }
            | PubdirError::BadServedKey { .. } => Verdict::Inconsistent,
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, PubdirError> {
    std::fs::read(path).map_err(|source| PubdirError::Read {
        path: path.to_owned(),
        source,
    })
}

/// If `body` is byte for byte a version in PUBDIR/manifests whose own signature verifies,
/// its serial. The serial is read from unverified bytes only to pick the file to check.
fn signed_version_of(key: &PublicKey, body: &[u8], dir: &Path, policy: &Policy) -> Option<u64> {
    let serial = Manifest::parse(body).ok()?.serial;
    let copy = std::fs::read(dir.join(paths::versioned_manifest(serial))).ok()?;
    let sig = std::fs::read_to_string(dir.join(paths::versioned_signature(serial))).ok()?;
    (copy == body && verify(key, &copy, &sig, policy).is_ok()).then_some(serial)
}

/// Verifies PUBDIR `dir` with `key` at `now`, then checks that its files agree; returns the
/// verified manifest, borrowing from `buf` (which receives PUBDIR/manifest).
pub fn verify_pubdir<'a>(
    key: &PublicKey,
    dir: &Path,
    now: u64,
    expiry: Expiry,
    buf: &'a mut Vec<u8>,
) -> Result<Manifest<'a>, PubdirError> {
    let sig_path = dir.join(paths::SIGNATURE);
    let manifest_path = dir.join(paths::MANIFEST);
    let sig_bytes = read(&sig_path)?;
    *buf = read(&manifest_path)?;
    let body: &'a [u8] = buf;
    let Ok(sig_text) = std::str::from_utf8(&sig_bytes) else {
        return Err(PubdirError::NotUtf8 { path: sig_path });
    };
    let policy = Policy {
        now,
        expiry,
        last_serial: None,
    };
    let m = match verify(key, body, sig_text, &policy) {
        Ok(m) => m,
        Err(VerifyError::BadSignature) => {
            // A publish interrupted between its last two renames leaves `manifest` one version
            // ahead of `manifest.minisig`. Agents are unaffected (they read manifests/<serial>);
            // say so instead of "tampered" when `manifest` is a newer, validly signed version.
            if let Some(newer) = signed_version_of(key, body, dir, &policy) {
                return Err(PubdirError::Interrupted {
                    manifest: manifest_path,
                    signature: sig_path,
                    newer,
                });
            }
            return Err(PubdirError::Signature {
                path: manifest_path,
                source: VerifyError::BadSignature,
            });
        }
        Err(source) => {
            return Err(PubdirError::Signature {
                path: manifest_path,
                source,
            })
        }
    };

    let versioned = dir.join(paths::versioned_manifest(m.serial));
    let versioned_sig = dir.join(paths::versioned_signature(m.serial));
    // Agents fetch manifests/<serial>, humans and minisign read `manifest`: they must agree.
    for (copy, original, expected) in [
        (versioned, &manifest_path, body),
        (versioned_sig, &sig_path, &sig_bytes[..]),
    ] {
        match std::fs::read(&copy) {
            Ok(b) if b == *expected => {}
            Ok(_) => {
                return Err(PubdirError::Differs {
                    original: original.clone(),
                    copy,
                })
            }
            Err(source) => return Err(PubdirError::CopyUnreadable { copy, source }),
        }
    }
    let served_key = dir.join(paths::PUBLIC_KEY);
    if served_key.exists() {
        let text = std::fs::read_to_string(&served_key).map_err(|source| PubdirError::Read {
            path: served_key.clone(),
            source,
        })?;
        match PublicKey::parse(&text) {
            Ok(k) if k == *key => {}
            Ok(k) => {
                return Err(PubdirError::OtherKey {
                    path: served_key,
                    served_id: k.id().to_string(),
                    served_fingerprint: k.fingerprint().to_string(),
                    given_id: key.id().to_string(),
                })
            }
            Err(source) => {
                return Err(PubdirError::BadServedKey {
                    path: served_key,
                    source,
                })
            }
        }
    }
    Ok(m)
}
