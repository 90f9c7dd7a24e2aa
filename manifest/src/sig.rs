//! minisign's detached signature file and the trusted comment idhal signs into it, which carries
//! the manifest's serial and expiry so stock `minisign -V` shows (and authenticates) them too.

use crate::key::{KeyId, ALG_ED};
use crate::verify::VerifyError;
use ct_codecs::{Base64, Decoder};

/// minisign's tag for prehashed (BLAKE2b-512) Ed25519 signatures, the only kind idhal accepts.
pub(crate) const ALG_PREHASHED: [u8; 2] = *b"ED";
const TRUSTED_PREFIX: &str = "trusted comment: ";

/// Which kind of minisign signature a file holds; only `Prehashed` is ever accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigAlgorithm {
    /// `ED`: Ed25519 over BLAKE2b-512 of the file (minisign ≥ 0.8 default).
    Prehashed,
    /// `Ed`: Ed25519 over the raw file (legacy; refused).
    Legacy,
}

/// A parsed (not yet verified) minisign signature file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureFile {
    pub algorithm: SigAlgorithm,
    pub key_id: KeyId,
    pub signature: [u8; 64],
    pub trusted_comment: String,
    pub global_signature: [u8; 64],
}

impl SignatureFile {
    /// Parses the four-line minisign format. Nothing here is trusted yet.
    pub fn parse(text: &str) -> Result<Self, VerifyError> {
        let malformed = VerifyError::MalformedSignature;
        let mut lines = text.lines();
        let untrusted = lines.next().ok_or(malformed("empty file"))?;
        if !untrusted.starts_with("untrusted comment:") {
            return Err(malformed("first line is not an untrusted comment"));
        }
        let sig_line = lines.next().ok_or(malformed("no signature line"))?;
        let raw = Base64::decode_to_vec(sig_line.trim(), None)
            .map_err(|_| malformed("signature line is not base64"))?;
        if raw.len() != 74 {
            return Err(malformed("signature line has the wrong length"));
        }
        let algorithm = match [raw[0], raw[1]] {
            ALG_PREHASHED => SigAlgorithm::Prehashed,
            ALG_ED => SigAlgorithm::Legacy,
            other => {
                return Err(VerifyError::UnsupportedAlgorithm(
                    String::from_utf8_lossy(&other).into(),
                ))
            }
        };
        let mut key_id = [0u8; 8];
        key_id.copy_from_slice(&raw[2..10]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&raw[10..]);

        let trusted = lines.next().ok_or(malformed("no trusted comment line"))?;
        let trusted_comment = trusted
            .strip_suffix('\r')
            .unwrap_or(trusted)
            .strip_prefix(TRUSTED_PREFIX)
            .ok_or(malformed("third line is not a trusted comment"))?
            .to_owned();
        let global_line = lines.next().ok_or(malformed("no global signature line"))?;
        let global = Base64::decode_to_vec(global_line.trim(), None)
            .map_err(|_| malformed("global signature line is not base64"))?;
        let global_signature: [u8; 64] = global
            .as_slice()
            .try_into()
            .map_err(|_| malformed("global signature has the wrong length"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(malformed("trailing data after the global signature"));
        }
        Ok(SignatureFile {
            algorithm,
            key_id: KeyId(key_id),
            signature,
            trusted_comment,
            global_signature,
        })
    }
}

/// The signed metadata in the trusted comment: `idhal-manifest 1 serial=N expires=UNIXTIME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedMeta {
    pub serial: u64,
    pub expires: u64,
}

impl TrustedMeta {
    const PREFIX: &'static str = "idhal-manifest 1 ";

    pub fn to_comment(self) -> String {
        format!(
            "{}serial={} expires={}",
            Self::PREFIX,
            self.serial,
            self.expires
        )
    }

    pub fn parse(comment: &str) -> Result<Self, VerifyError> {
        let bad = || VerifyError::MalformedTrustedComment(comment.chars().take(120).collect());
        let rest = comment.strip_prefix(Self::PREFIX).ok_or_else(bad)?;
        let mut words = rest.split(' ');
        let mut field = |name: &str| {
            words
                .next()
                .and_then(|w| w.strip_prefix(name))
                .and_then(crate::format::canonical_u64)
                .ok_or_else(bad)
        };
        let serial = field("serial=")?;
        let expires = field("expires=")?;
        if words.next().is_some() {
            return Err(bad());
        }
        Ok(TrustedMeta { serial, expires })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_meta_roundtrip() {
        let m = TrustedMeta {
            serial: 42,
            expires: 1_767_225_600,
        };
        assert_eq!(
            m.to_comment(),
            "idhal-manifest 1 serial=42 expires=1767225600"
        );
        assert_eq!(TrustedMeta::parse(&m.to_comment()).unwrap(), m);
        for bad in [
            "timestamp:1700000000",
            "idhal-manifest 1 serial=42",
            "idhal-manifest 1 serial=042 expires=1",
            "idhal-manifest 1 serial=42 expires=1 extra",
            "idhal-manifest 1 expires=1 serial=42",
            "idhal-manifest 1 serial=-1 expires=1",
        ] {
            assert_eq!(
                TrustedMeta::parse(bad),
                Err(VerifyError::MalformedTrustedComment(bad.into())),
                "{bad}"
            );
        }
    }
}
