//! Verification in one fixed order: algorithm, key id, signature over the manifest, signature over
//! the trusted comment, then the signed metadata (serial never going back, expiry), and only then
//! the manifest body is parsed. Nothing is acted on before all of it passed.

use crate::format::{FormatError, Manifest};
use crate::key::{KeyId, PublicKey};
use crate::sig::{SigAlgorithm, SignatureFile, TrustedMeta};
use crate::time::rfc3339;
use blake2::{Blake2b512, Digest};

/// Whether the signed expiry is enforced. `Ignore` exists only for forensic inspection
/// (`idhal verify --ignore-expiry`); the agent always enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    Enforce,
    Ignore,
}

/// What the verifier must check beyond the signature.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Current time, unix seconds.
    pub now: u64,
    pub expiry: Expiry,
    /// The last serial this node accepted; a lower one is a rollback. `None` on first use.
    pub last_serial: Option<u64>,
}

/// Why a manifest was refused. Each variant is one line an admin can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("signature file is malformed: {0}")]
    MalformedSignature(&'static str),
    #[error("signature uses unsupported algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("legacy (non-prehashed) minisign signature refused: sign with `idhal sign` or a current minisign")]
    LegacySignature,
    #[error("manifest is signed by key {got}, but this node pinned key {pinned}")]
    WrongKey { pinned: KeyId, got: KeyId },
    #[error("signature does not match the manifest: manifest or signature was tampered with or truncated")]
    BadSignature,
    #[error("trusted comment signature is invalid: the signed metadata was tampered with")]
    BadTrustedComment,
    #[error("trusted comment is not idhal metadata: {0:?}")]
    MalformedTrustedComment(String),
    #[error(
        "rollback refused: manifest serial {got} is older than serial {last} already accepted"
    )]
    Rollback { got: u64, last: u64 },
    #[error("manifest serial {serial} expired at {} (now {}); re-sign it with `idhal sign`", rfc3339(*.expired_at), rfc3339(*.now))]
    Expired {
        serial: u64,
        expired_at: u64,
        now: u64,
    },
    #[error("signed manifest is malformed: {0}")]
    Format(#[from] FormatError),
    #[error("signed metadata (serial {meta_serial}, expires {meta_expires}) disagrees with the manifest body (serial {body_serial}, expires {body_expires})")]
    MetadataMismatch {
        meta_serial: u64,
        meta_expires: u64,
        body_serial: u64,
        body_expires: u64,
    },
}

/// The serial a signature file claims, before any check: only good for choosing which versioned
/// manifest to download. Never trust it for anything else.
pub fn unverified_serial(signature: &str) -> Option<u64> {
    let sig = SignatureFile::parse(signature).ok()?;
    TrustedMeta::parse(&sig.trusted_comment)
        .ok()
        .map(|m| m.serial)
}

/// Checks a minisign signature file over `bytes` with `key`, in the fixed order (algorithm, key id,
/// signature over the bytes, signature over the trusted comment), and returns it; its trusted
/// comment is authenticated once this returned. The caller checks what the comment says.
pub fn check_signature(
    key: &PublicKey,
    bytes: &[u8],
    signature: &str,
) -> Result<SignatureFile, VerifyError> {
    let sig = SignatureFile::parse(signature)?;
    if sig.algorithm == SigAlgorithm::Legacy {
        return Err(VerifyError::LegacySignature);
    }
    if sig.key_id != key.id() {
        return Err(VerifyError::WrongKey {
            pinned: key.id(),
            got: sig.key_id,
        });
    }
    let pk = ed25519_compact::PublicKey::new(*key.ed25519());
    let prehash = Blake2b512::digest(bytes);
    pk.verify(prehash, &ed25519_compact::Signature::new(sig.signature))
        .map_err(|_| VerifyError::BadSignature)?;

    let mut signed_comment = Vec::with_capacity(64 + sig.trusted_comment.len());
    signed_comment.extend_from_slice(&sig.signature);
    signed_comment.extend_from_slice(sig.trusted_comment.as_bytes());
    pk.verify(
        &signed_comment,
        &ed25519_compact::Signature::new(sig.global_signature),
    )
    .map_err(|_| VerifyError::BadTrustedComment)?;
    Ok(sig)
}

/// Verifies `manifest` against `signature` (minisign file text) with the pinned key.
pub fn verify<'a>(
    key: &PublicKey,
    manifest: &'a [u8],
    signature: &str,
    policy: &Policy,
) -> Result<Manifest<'a>, VerifyError> {
    let sig = check_signature(key, manifest, signature)?;
    let meta = TrustedMeta::parse(&sig.trusted_comment)?;
    if let Some(last) = policy.last_serial {
        if meta.serial < last {
            return Err(VerifyError::Rollback {
                got: meta.serial,
                last,
            });
        }
    }
    if policy.expiry == Expiry::Enforce && policy.now >= meta.expires {
        return Err(VerifyError::Expired {
            serial: meta.serial,
            expired_at: meta.expires,
            now: policy.now,
        });
    }

    let body = Manifest::parse(manifest)?;
    if (body.serial, body.expires) != (meta.serial, meta.expires) {
        return Err(VerifyError::MetadataMismatch {
            meta_serial: meta.serial,
            meta_expires: meta.expires,
            body_serial: body.serial,
            body_expires: body.expires,
        });
    }
    Ok(body)
}
