//! Signed manifests: the signing key (keys) and turning a scriptlet directory into a signed,
//! published manifest (sign), checking a published one (verify), the SSH key scriptlet (ssh_key),
//! replacing the key without reimaging nodes (rotate).

pub mod keys;
pub mod rotate;
pub mod sign;
pub mod ssh_key;
pub mod verify;
