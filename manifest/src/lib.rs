//! The one definition of idhal's wire format: the signed manifest (v1), the minisign key and
//! signature containers, and the fixed-order verification the agent runs before acting on anything.
//!
//! The signer (`idhal sign`) and the verifier (`idhal-bootstrap`, `idhal verify`) both use these
//! types, so they cannot drift. Signing itself lives in the server tools (the `minisign` crate), so
//! the agent's dependency tree holds only what it needs to verify.

pub mod der;
pub mod enroll;
pub mod format;
pub mod id;
pub mod key;
pub mod peers;
pub mod renew;
pub mod rotation;
pub mod sig;
#[cfg(feature = "test-signing")]
pub mod testsign;
pub mod time;
pub mod verify;
mod wire;

pub use format::{Frequency, Manifest, Param, Scriptlet, MAX_MANIFEST};
pub use id::{IdError, NodeId, ParamName, ProjectName, ScriptletId};
pub use key::{Fingerprint, KeyId, PublicKey};
pub use sig::{SigAlgorithm, SignatureFile, TrustedMeta};
pub use verify::{verify, Expiry, Policy, VerifyError};

/// Names of the files a publication directory holds; agents and `idhal serve` use the same names.
pub mod paths {
    /// The server's public key, fetched on first boot only when no key is baked in (and then only
    /// accepted if it matches the pinned fingerprint).
    pub const PUBLIC_KEY: &str = "idhal.pub";
    /// The latest manifest, for humans and stock `minisign -Vm manifest -p idhal.pub`.
    pub const MANIFEST: &str = "manifest";
    /// The latest signature. Agents fetch this first and then the immutable versioned manifest it
    /// names, so a publish in between can never pair a new manifest with an old signature.
    pub const SIGNATURE: &str = "manifest.minisig";
    /// Directory of immutable, versioned copies: `manifests/<serial>` and `manifests/<serial>.minisig`.
    pub const VERSIONS_DIR: &str = "manifests";

    pub fn versioned_manifest(serial: u64) -> String {
        format!("{VERSIONS_DIR}/{serial}")
    }
    pub fn versioned_signature(serial: u64) -> String {
        format!("{VERSIONS_DIR}/{serial}.minisig")
    }

    /// Directory of key rotation statements (`crate::rotation`), kept forever: `keys/1`, `keys/2`…
    pub const KEYS_DIR: &str = "keys";

    /// Rotation statement `n`, the old key's signature of it, the new key's.
    pub fn rotation_statement(n: u64) -> String {
        format!("{KEYS_DIR}/{n}")
    }
    pub fn rotation_old_signature(n: u64) -> String {
        format!("{KEYS_DIR}/{n}.minisig")
    }
    pub fn rotation_new_signature(n: u64) -> String {
        format!("{KEYS_DIR}/{n}.new.minisig")
    }
}
