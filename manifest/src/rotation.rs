//! Signing-key rotation: the statement "key K(n-1) is replaced by K(n)" (wire format v1), signed by
//! both keys, and the one walk every reader uses, the agent over HTTP and `idhal sign`/`idhal key
//! rotate` over a publication directory: from a trusted key, statement by statement, each checked
//! completely before the next is looked at.
//!
//! Published as `keys/N` (the statement), `keys/N.minisig` (by the old key, so stock
//! `minisign -Vm keys/N -p old.pub` checks it) and `keys/N.new.minisig` (by the new key). Both
//! trusted comments repeat the statement (`idhal-key-rotation 1 sequence=N from=ID to=ID`), so what
//! minisign prints is what was signed. Like TUF's root rotation, one key alone cannot rotate: the
//! old key vouches for the new one and the new one proves it is held.

use crate::format::canonical_u64;
use crate::key::{KeyId, PublicKey};
use crate::verify::{check_signature, VerifyError};

/// Largest statement read: the real ones are about 140 bytes.
pub const MAX_STATEMENT: usize = 1024;
/// Statements a walk looks at before it gives up: far more rotations than a project makes in its
/// life, and small enough that a hostile server cannot keep a node fetching.
pub const MAX_CHAIN: u64 = 32;

const HEADER: &str = "idhal-key-rotation 1";

/// Whether `bytes` claim to be a rotation statement at all (unauthenticated: only to tell a
/// statement from what a web server answers for a missing file with 200 — an index page, an
/// error text). What does not claim it ends the chain like a 404: that can only stop updates,
/// which withholding the files does too; what claims it is checked whole.
pub fn is_statement(bytes: &[u8]) -> bool {
    bytes.starts_with(HEADER.as_bytes()) && bytes.get(HEADER.len()) == Some(&b'\n')
}

/// One rotation: at `sequence`, `from` is replaced by `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub sequence: u64,
    pub from: PublicKey,
    pub to: PublicKey,
}

/// Which of a statement's two signatures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// `keys/N.minisig`, by the key being replaced.
    Old,
    /// `keys/N.new.minisig`, by the key replacing it.
    New,
}

impl std::fmt::Display for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Signer::Old => "old",
            Signer::New => "new",
        })
    }
}

/// Why a statement or a chain was refused; each names the statement at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RotationError {
    #[error("key rotation statement {file}: over {MAX_STATEMENT} bytes")]
    TooLarge { file: u64 },
    #[error("key rotation statement {file} does not match its {signer} key's signature: the statement or the signature was tampered with or truncated")]
    Tampered { file: u64, signer: Signer },
    #[error("key rotation statement {file}: the {signer} key's signature: {source}")]
    Signature {
        file: u64,
        signer: Signer,
        #[source]
        source: VerifyError,
    },
    #[error("key rotation statement {file} has no signature by its {signer} key {key}: both keys must sign")]
    Unsigned {
        file: u64,
        signer: Signer,
        key: KeyId,
    },
    #[error("key rotation statement {file} is signed by key {got} where its {signer} key {key} must sign: both keys must sign")]
    NotSignedBy {
        file: u64,
        signer: Signer,
        key: KeyId,
        got: KeyId,
    },
    #[error("key rotation statement {file} is malformed: {why}")]
    Malformed { file: u64, why: &'static str },
    #[error("key rotation statement {file}: the {signer} key's trusted comment {got:?} is not the statement's")]
    Comment {
        file: u64,
        signer: Signer,
        got: String,
    },
    #[error("key rotation statement {file} says sequence {got}: a statement is valid only at its own place (a replayed or reordered statement)")]
    Sequence { file: u64, got: u64 },
    #[error("key rotation statement {file} replaces key {from}, but the chain is at key {current}: a step is missing")]
    SkippedStep {
        file: u64,
        from: KeyId,
        current: KeyId,
    },
    #[error("key rotation statement {file} replaces key {key} with itself")]
    SameKey { file: u64, key: KeyId },
    #[error("key rotation statement {file} goes back to key {key}, already replaced earlier in the chain")]
    KeyReused { file: u64, key: KeyId },
    #[error("the manifest is signed by key {signer}, but the published key rotations end at key {last} (rotation {sequence}): a manifest signed by a replaced or unknown key is refused")]
    NotLast {
        signer: KeyId,
        last: KeyId,
        sequence: u64,
    },
    #[error("key rotation chain from statement {first} is longer than {MAX_CHAIN} statements")]
    TooLong { first: u64 },
}

impl Rotation {
    /// The statement's bytes, the only encoding: `parse` refuses anything else.
    pub fn encode(&self) -> String {
        format!(
            "{HEADER}\nsequence {}\nfrom {}\nto {}\n",
            self.sequence,
            self.from.to_base64(),
            self.to.to_base64()
        )
    }

    /// The trusted comment both signatures carry.
    pub fn comment(&self) -> String {
        format!(
            "{HEADER} sequence={} from={} to={}",
            self.sequence,
            self.from.id(),
            self.to.id()
        )
    }

    /// Parses a statement's bytes (only once its old-key signature verified). `file` names it in
    /// errors.
    pub fn parse(bytes: &[u8], file: u64) -> Result<Self, RotationError> {
        let bad = |why| RotationError::Malformed { file, why };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8"))?;
        let mut lines = text.split('\n');
        if lines.next() != Some(HEADER) {
            return Err(bad("first line is not `idhal-key-rotation 1`"));
        }
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .and_then(|l| l.strip_prefix(' '))
                .ok_or(bad("expected the lines sequence, from, to"))
        };
        let sequence = canonical_u64(field("sequence")?).ok_or(bad("sequence is not a number"))?;
        let from = PublicKey::from_base64(field("from")?).map_err(|_| bad("from is not a key"))?;
        let to = PublicKey::from_base64(field("to")?).map_err(|_| bad("to is not a key"))?;
        let r = Rotation { sequence, from, to };
        // Canonical: one byte string per statement, so what was signed is what was read.
        if r.encode().as_bytes() != bytes {
            return Err(bad("not in canonical form"));
        }
        Ok(r)
    }
}

/// A published statement's three files, as fetched.
#[derive(Debug, Clone, Default)]
pub struct StatementFiles {
    pub statement: Vec<u8>,
    /// `keys/N.minisig`.
    pub old_signature: String,
    /// `keys/N.new.minisig`.
    pub new_signature: String,
}

/// Checks statement `file` against the key the chain is at, in a fixed order: size, the old key's
/// signature over the bytes (so nothing unauthenticated is parsed), the statement, its place, its
/// keys, the new key's signature, both trusted comments.
pub fn check_statement(
    current: &PublicKey,
    file: u64,
    files: &StatementFiles,
) -> Result<Rotation, RotationError> {
    if files.statement.len() > MAX_STATEMENT {
        return Err(RotationError::TooLarge { file });
    }
    // Signed by another key than the one reached: a statement in between is missing (or this one
    // is forged; either way the chain stops here). Said as such rather than as a wrong key id.
    if let Ok(sig) = crate::SignatureFile::parse(&files.old_signature) {
        if sig.key_id != current.id() {
            return Err(RotationError::SkippedStep {
                file,
                from: sig.key_id,
                current: current.id(),
            });
        }
    }
    let check = |key: &PublicKey, text: &str, signer| {
        if text.trim().is_empty() {
            return Err(RotationError::Unsigned {
                file,
                signer,
                key: key.id(),
            });
        }
        check_signature(key, &files.statement, text).map_err(|source| match source {
            VerifyError::WrongKey { got, .. } => RotationError::NotSignedBy {
                file,
                signer,
                key: key.id(),
                got,
            },
            VerifyError::BadSignature | VerifyError::BadTrustedComment => {
                RotationError::Tampered { file, signer }
            }
            source => RotationError::Signature {
                file,
                signer,
                source,
            },
        })
    };
    let old = check(current, &files.old_signature, Signer::Old)?;
    let r = Rotation::parse(&files.statement, file)?;
    if r.sequence != file {
        return Err(RotationError::Sequence {
            file,
            got: r.sequence,
        });
    }
    if r.from != *current {
        return Err(RotationError::SkippedStep {
            file,
            from: r.from.id(),
            current: current.id(),
        });
    }
    if r.to.id() == r.from.id() || r.to.ed25519() == r.from.ed25519() {
        return Err(RotationError::SameKey {
            file,
            key: r.from.id(),
        });
    }
    let new = check(&r.to, &files.new_signature, Signer::New)?;
    let comment = r.comment();
    for (signer, sig) in [(Signer::Old, old), (Signer::New, new)] {
        if sig.trusted_comment != comment {
            return Err(RotationError::Comment {
                file,
                signer,
                got: sig.trusted_comment.chars().take(160).collect(),
            });
        }
    }
    Ok(r)
}

/// Where a walk starts: a trusted key and the sequence of the statement that made it (0 for a key
/// that came from the image or an admin, not from a statement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    pub key: PublicKey,
    pub sequence: u64,
}

/// How a walk failed: the statements refused it, or fetching them failed (the caller's error).
#[derive(Debug)]
pub enum WalkError<E> {
    Refused(RotationError),
    Fetch(E),
}

impl<E> From<RotationError> for WalkError<E> {
    fn from(e: RotationError) -> Self {
        WalkError::Refused(e)
    }
}

/// Walks the published chain from `head` to its end: statement `head.sequence + 1`, then the
/// next, each checked by [`check_statement`] against the key reached so far, until one is not
/// published. `fetch(n)` returns statement `n`'s files, or `None` when it is not published.
///
/// Always to the end, not to the key a manifest names: a node that has not caught up must not
/// stop at a key replaced since (one that leaked, say). A head of sequence 0 (its place in the
/// chain unknown) passes over statements its key did not sign until one does; past that first
/// step every statement must continue the chain. Follows at most [`MAX_CHAIN`] statements.
/// Returns the chain's last key (`head` itself when there was nothing to follow).
pub fn walk<E>(
    head: &ChainHead,
    fetch: &mut dyn FnMut(u64) -> Result<Option<StatementFiles>, E>,
) -> Result<ChainHead, WalkError<E>> {
    let mut at = head.clone();
    let mut replaced: Vec<KeyId> = Vec::new();
    let first = head.sequence.saturating_add(1);
    // MAX_CHAIN statements, and one more look to see that the chain ends there.
    for file in first..=first.saturating_add(MAX_CHAIN) {
        let Some(files) = fetch(file)
            .map_err(WalkError::Fetch)?
            .filter(|f| is_statement(&f.statement))
        else {
            return Ok(at);
        };
        if file == first.saturating_add(MAX_CHAIN) {
            break;
        }
        let r = match check_statement(&at.key, file, &files) {
            // Before its first step, a key of unknown place passes over statements it did not
            // sign: earlier ones than its own, which prove nothing either way.
            Err(RotationError::SkippedStep { .. }) if at.sequence == 0 => continue,
            r => r?,
        };
        if replaced.contains(&r.to.id()) {
            return Err(RotationError::KeyReused {
                file,
                key: r.to.id(),
            }
            .into());
        }
        replaced.push(r.from.id());
        at = ChainHead {
            key: r.to,
            sequence: file,
        };
    }
    Err(RotationError::TooLong { first }.into())
}

/// The key a manifest signed by `signer` is verified with, once the chain from `head` ended at
/// `end`: the chain's last key, and only it. When nothing was followed, `head`'s own key: the
/// signature check then refuses another signer as a wrong key.
pub fn manifest_key<'a>(
    head: &ChainHead,
    end: &'a ChainHead,
    signer: KeyId,
) -> Result<&'a PublicKey, RotationError> {
    if end != head && signer != end.key.id() {
        return Err(RotationError::NotLast {
            signer,
            last: end.key.id(),
            sequence: end.sequence,
        });
    }
    Ok(&end.key)
}
