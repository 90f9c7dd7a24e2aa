//! Signing-key rotation on the publishing side: reading and checking a PUBDIR's chain of rotation
//! statements (`keys/N`, wire format and rules in `idhal_manifest::rotation`) and appending one,
//! signed by the key it replaces and by its successor (`idhal key rotate`).

use crate::publish::{self, PublishError};
use crate::signing::keys::SigningKey;
use crate::signing::sign::lock_pubdir;
use idhal_manifest::rotation::{
    self, check_statement, ChainHead, Rotation, RotationError, StatementFiles, WalkError,
    MAX_STATEMENT,
};
use idhal_manifest::{paths, KeyId, PublicKey, SignatureFile};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest signature file read back from PUBDIR (a real one is about 300 bytes).
const MAX_SIGNATURE: u64 = 8 << 10;

#[derive(Debug, thiserror::Error)]
pub(crate) enum RotateError {
    #[error("cannot {doing} {}", path.display())]
    Io {
        doing: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the published chain is broken, nothing was written: {source}", dir.display())]
    Broken {
        dir: PathBuf,
        #[source]
        source: RotationError,
    },
    #[error("{}: statement {missing} is missing but {present} is published: statements are kept forever, restore it", dir.display())]
    Gap {
        dir: PathBuf,
        missing: u64,
        present: u64,
    },
    #[error("--from and --to are the same key {0}")]
    SameKey(KeyId),
    #[error("--from is key {from}, but the chain in {} ends at key {end} (statement {sequence}): rotate from the chain's last key", dir.display())]
    NotChainEnd {
        from: KeyId,
        end: KeyId,
        sequence: u64,
        dir: PathBuf,
    },
    #[error("--from is key {from}, but {} is signed by key {signed_by}: nodes pinned to {signed_by} would never find a statement from {from}", path.display())]
    NotCurrentSigner {
        from: KeyId,
        signed_by: KeyId,
        path: PathBuf,
    },
    #[error("--to key {0} was already used earlier in the chain: a rotation never goes back to an old key")]
    KeyReused(KeyId),
    #[error("{} is not a valid signature", .0.display())]
    SignatureFile(PathBuf, #[source] idhal_manifest::VerifyError),
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("internal error: the new statement does not verify; nothing was published")]
    SelfCheck(#[source] RotationError),
    #[error(transparent)]
    Publish(#[from] PublishError),
}

fn io<'a>(doing: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> RotateError + 'a {
    move |source| RotateError::Io {
        doing,
        path: path.to_owned(),
        source,
    }
}

/// Reads at most `cap` bytes past which the caller refuses anyway; `None` when absent.
fn read_capped(path: &Path, cap: u64) -> Result<Option<Vec<u8>>, RotateError> {
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("read", path)(e)),
    };
    let mut out = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut out)
        .map_err(io("read", path))?;
    Ok(Some(out))
}

/// Statement `n`'s files in `pubdir`, as an agent would fetch them (a missing signature reads as
/// empty, and the check refuses it).
pub(crate) fn read_statement(pubdir: &Path, n: u64) -> Result<Option<StatementFiles>, RotateError> {
    let Some(statement) = read_capped(
        &pubdir.join(paths::rotation_statement(n)),
        MAX_STATEMENT as u64,
    )?
    else {
        return Ok(None);
    };
    let sig = |rel: String| -> Result<String, RotateError> {
        Ok(read_capped(&pubdir.join(rel), MAX_SIGNATURE)?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    };
    Ok(Some(StatementFiles {
        statement,
        old_signature: sig(paths::rotation_old_signature(n))?,
        new_signature: sig(paths::rotation_new_signature(n))?,
    }))
}

/// The numbers of the statements published in `pubdir/keys`, checked to run 1..=N without a gap.
fn published(pubdir: &Path) -> Result<u64, RotateError> {
    let dir = pubdir.join(paths::KEYS_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("read", &dir)(e)),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io("read", &dir))?;
        let name = entry.file_name();
        if let Some(n) = name.to_str().and_then(|n| n.parse::<u64>().ok()) {
            if n.to_string() == name.to_string_lossy() && n > 0 {
                numbers.push(n);
            }
        }
    }
    numbers.sort_unstable();
    for (i, &n) in numbers.iter().enumerate() {
        let expected = i as u64 + 1;
        if n != expected {
            return Err(RotateError::Gap {
                dir,
                missing: expected,
                present: n,
            });
        }
    }
    Ok(numbers.len() as u64)
}

/// Every key of `pubdir`'s chain, in order, with the statement that made it (the first key, the
/// one statement 1 replaces, has sequence 0). Empty when no rotation was ever published. Each
/// statement is checked as an agent checks it.
pub(crate) fn chain(pubdir: &Path) -> Result<Vec<ChainHead>, RotateError> {
    let count = published(pubdir)?;
    let broken = |source| RotateError::Broken {
        dir: pubdir.join(paths::KEYS_DIR),
        source,
    };
    let mut keys: Vec<ChainHead> = Vec::new();
    for n in 1..=count {
        let files = read_statement(pubdir, n)?.ok_or_else(|| RotateError::Gap {
            dir: pubdir.join(paths::KEYS_DIR),
            missing: n,
            present: count,
        })?;
        let current = match keys.last() {
            Some(head) => head.key.clone(),
            // The first statement names the key it starts from; its signature by that key is
            // checked next like every other.
            None if files.statement.len() > MAX_STATEMENT => {
                return Err(broken(RotationError::TooLarge { file: n }))
            }
            None => Rotation::parse(&files.statement, n)
                .map_err(broken)?
                .from
                .clone(),
        };
        let r = check_statement(&current, n, &files).map_err(broken)?;
        if keys.is_empty() {
            keys.push(ChainHead {
                key: r.from.clone(),
                sequence: 0,
            });
        }
        if keys.iter().any(|h| h.key.id() == r.to.id()) {
            return Err(broken(RotationError::KeyReused {
                file: n,
                key: r.to.id(),
            }));
        }
        keys.push(ChainHead {
            key: r.to,
            sequence: n,
        });
    }
    Ok(keys)
}

/// What `idhal sign` with `new` may publish over a manifest signed by `old`: nothing if PUBDIR has
/// no rotation (`None`: the caller's own rule, same key only); else only the chain's last key
/// signs, over a manifest of any key of the chain, whose public key is returned to check it.
pub(crate) fn signing_over(
    pubdir: &Path,
    old: KeyId,
    new: &PublicKey,
) -> Result<Option<Result<PublicKey, SignRefusal>>, RotateError> {
    let keys = chain(pubdir)?;
    let Some(last) = keys.last() else {
        return Ok(None);
    };
    if last.key != *new {
        return Ok(Some(Err(SignRefusal::NotLast {
            last: last.key.id(),
            sequence: last.sequence,
        })));
    }
    Ok(Some(
        keys.iter()
            .find(|h| h.key.id() == old)
            .map(|h| h.key.clone())
            .ok_or(SignRefusal::OutsideChain),
    ))
}

/// Why `idhal sign` may not publish with a key into a PUBDIR that has rotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SignRefusal {
    /// The chain ends at another key (nodes that followed it refuse anything else).
    NotLast { last: KeyId, sequence: u64 },
    /// The current manifest's key is not in the chain.
    OutsideChain,
}

/// What `follow` found when PUBDIR's manifest is signed by a later key than `from`.
pub(crate) enum Followed {
    /// No statement to follow from `from` (or no signature to read).
    Same,
    /// The chain leads from `from` to its last key, which signs the manifest.
    To(ChainHead),
    /// A statement is refused, or the manifest is not signed by the chain's last key: a node
    /// pinned to `from` refuses the manifest.
    Refused(RotationError),
}

/// Follows PUBDIR's rotation chain from `from` (a node's pinned key, place unknown) to its end,
/// with the agent's own walk and rule (`idhal verify --pub OLD.pub`): the manifest must be signed
/// by the chain's last key.
pub(crate) fn follow(pubdir: &Path, from: &PublicKey) -> Result<Followed, RotateError> {
    let sig_path = pubdir.join(paths::SIGNATURE);
    let Some(text) = read_capped(&sig_path, MAX_SIGNATURE)? else {
        return Ok(Followed::Same);
    };
    // An unreadable signature is for `verify_pubdir` to refuse, with its own words.
    let Ok(target) = SignatureFile::parse(&String::from_utf8_lossy(&text)).map(|s| s.key_id) else {
        return Ok(Followed::Same);
    };
    let head = ChainHead {
        key: from.clone(),
        sequence: 0,
    };
    let end = match rotation::walk(&head, &mut |n| read_statement(pubdir, n)) {
        Ok(end) => end,
        Err(WalkError::Refused(e)) => return Ok(Followed::Refused(e)),
        Err(WalkError::Fetch(e)) => return Err(e),
    };
    Ok(match rotation::manifest_key(&head, &end, target) {
        Ok(_) if end == head => Followed::Same,
        Ok(_) => Followed::To(end),
        Err(e) => Followed::Refused(e),
    })
}

fn sign_statement(key: &SigningKey, r: &Rotation, role: &str) -> Result<String, RotateError> {
    let untrusted = format!(
        "idhal key rotation {}: key {} replaced by key {}, signed by the {role} key",
        r.sequence,
        r.from.id(),
        r.to.id()
    );
    Ok(minisign::sign(
        Some(&key.minisign_public),
        &key.secret,
        std::io::Cursor::new(r.encode().as_bytes()),
        Some(&r.comment()),
        Some(&untrusted),
    )
    .map_err(|e| RotateError::Sign(e.to_string()))?
    .into_string())
}

/// What `rotate` published.
pub(crate) struct Rotated {
    pub(crate) rotation: Rotation,
    pub(crate) written: Vec<PathBuf>,
}

/// Appends the statement "`from` is replaced by `to`" to `pubdir`'s chain, under the signing
/// lock: `from` must be where the chain ends (or, for the first statement, the key that signs
/// the current manifest). Signatures first, the statement last, each atomically: a statement an
/// agent can fetch is complete.
pub(crate) fn rotate(
    pubdir: &Path,
    from: &SigningKey,
    to: &SigningKey,
) -> Result<Rotated, RotateError> {
    if from.public.id() == to.public.id() || from.public.ed25519() == to.public.ed25519() {
        return Err(RotateError::SameKey(from.public.id()));
    }
    let dir = pubdir.join(paths::KEYS_DIR);
    fs::create_dir_all(&dir).map_err(io("create", &dir))?;
    let _lock = lock_pubdir(pubdir)?;
    publish::remove_stale_temp_files(&dir)?;

    let keys = chain(pubdir)?;
    match keys.last() {
        Some(end) if end.key != from.public => {
            return Err(RotateError::NotChainEnd {
                from: from.public.id(),
                end: end.key.id(),
                sequence: end.sequence,
                dir,
            })
        }
        Some(_) => {}
        None => {
            let sig_path = pubdir.join(paths::SIGNATURE);
            if let Some(text) = read_capped(&sig_path, MAX_SIGNATURE)? {
                let sig = SignatureFile::parse(&String::from_utf8_lossy(&text))
                    .map_err(|e| RotateError::SignatureFile(sig_path.clone(), e))?;
                if sig.key_id != from.public.id() {
                    return Err(RotateError::NotCurrentSigner {
                        from: from.public.id(),
                        signed_by: sig.key_id,
                        path: sig_path,
                    });
                }
            }
        }
    }
    if keys.iter().any(|h| h.key.id() == to.public.id()) {
        return Err(RotateError::KeyReused(to.public.id()));
    }

    let rotation = Rotation {
        sequence: keys.last().map_or(1, |h| h.sequence + 1),
        from: from.public.clone(),
        to: to.public.clone(),
    };
    let n = rotation.sequence;
    let files = StatementFiles {
        statement: rotation.encode().into_bytes(),
        old_signature: sign_statement(from, &rotation, "old")?,
        new_signature: sign_statement(to, &rotation, "new")?,
    };
    check_statement(&from.public, n, &files).map_err(RotateError::SelfCheck)?;
    let mut written = Vec::new();
    for (rel, bytes) in [
        (
            paths::rotation_old_signature(n),
            files.old_signature.as_bytes(),
        ),
        (
            paths::rotation_new_signature(n),
            files.new_signature.as_bytes(),
        ),
        (paths::rotation_statement(n), &files.statement[..]),
    ] {
        let path = pubdir.join(rel);
        publish::write_atomic(&path, bytes, 0o644)?;
        written.push(path);
    }
    Ok(Rotated { rotation, written })
}
