//! Signed manifests: the signing key (keys) and turning a scriptlet directory into a signed,
//! published manifest (sign).

pub mod keys;
pub mod sign;
