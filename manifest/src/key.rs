//! The server's Ed25519 public key in minisign's format, its key id, and the fingerprint admins pin
//! on the kernel command line (`idhal.pin=sha256:…`).

use ct_codecs::{Base64, Decoder, Encoder};
use std::fmt;
use std::str::FromStr;

/// minisign's algorithm tag for Ed25519 keys (and for legacy, non-prehashed signatures).
pub(crate) const ALG_ED: [u8; 2] = *b"Ed";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("public key is not valid minisign base64")]
    Base64,
    #[error("public key has the wrong length ({0} bytes, expected 42)")]
    Length(usize),
    #[error("public key algorithm {0:?} is not Ed25519")]
    Algorithm(String),
    #[error("public key file has no key line")]
    Missing,
    #[error("fingerprint {0:?} is invalid: expected sha256: followed by 64 hex digits")]
    Fingerprint(String),
}

/// minisign's random 8-byte key id, printed the way minisign prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", u64::from_le_bytes(self.0))
    }
}

/// An Ed25519 public key with its minisign key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: KeyId,
    key: [u8; 32],
}

impl PublicKey {
    pub fn new(id: KeyId, key: [u8; 32]) -> Self {
        PublicKey { id, key }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn ed25519(&self) -> &[u8; 32] {
        &self.key
    }

    /// The 42 bytes minisign encodes: algorithm, key id, key.
    pub fn to_bytes(&self) -> [u8; 42] {
        let mut out = [0u8; 42];
        out[..2].copy_from_slice(&ALG_ED);
        out[2..10].copy_from_slice(&self.id.0);
        out[10..].copy_from_slice(&self.key);
        out
    }

    /// Decodes the base64 key line (what `minisign -P` takes).
    pub fn from_base64(line: &str) -> Result<Self, KeyError> {
        let raw = Base64::decode_to_vec(line.trim(), None).map_err(|_| KeyError::Base64)?;
        if raw.len() != 42 {
            return Err(KeyError::Length(raw.len()));
        }
        if raw[..2] != ALG_ED {
            return Err(KeyError::Algorithm(
                String::from_utf8_lossy(&raw[..2]).into(),
            ));
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&raw[2..10]);
        let mut key = [0u8; 32];
        key.copy_from_slice(&raw[10..]);
        Ok(PublicKey { id: KeyId(id), key })
    }

    /// Parses a minisign public key file: an optional `untrusted comment:` line, then the key.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or(KeyError::Missing)?;
        Self::from_base64(line)
    }

    pub fn to_base64(&self) -> String {
        Base64::encode_to_string(self.to_bytes()).expect("42 bytes always encode")
    }

    /// The file text stock minisign writes and reads.
    pub fn to_file_text(&self) -> String {
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.id,
            self.to_base64()
        )
    }

    /// SHA-256 over the 42 encoded bytes: binds both the key and its id.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint(hmac_sha256::Hash::hash(&self.to_bytes()))
    }
}

/// What an admin pins when the key is not baked into the image: `sha256:<64 hex digits>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Fingerprint {
    type Err = KeyError;
    fn from_str(s: &str) -> Result<Self, KeyError> {
        let bad = || KeyError::Fingerprint(s.chars().take(80).collect());
        let hex = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        if hex.len() != 64 || !hex.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Fingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_fingerprint() {
        let pk = PublicKey::new(KeyId([1, 2, 3, 4, 5, 6, 7, 8]), [9u8; 32]);
        let text = pk.to_file_text();
        assert!(text.starts_with("untrusted comment: minisign public key 0807060504030201\n"));
        assert_eq!(PublicKey::parse(&text).unwrap(), pk);
        let fp = pk.fingerprint();
        // SHA-256 of b"Ed" ‖ id ‖ key, as Python's hashlib computes it.
        assert_eq!(
            fp.to_string(),
            "sha256:199df25f0a50af0a155ab75961b53a6480b7ed3341ca63eb3796b6a56e1095c2"
        );
        assert_eq!(fp.to_string().parse::<Fingerprint>().unwrap(), fp);
        assert_eq!(
            fp.to_string().to_uppercase()[7..]
                .parse::<Fingerprint>()
                .unwrap(),
            fp
        );
        assert_eq!(
            "sha256:abc".parse::<Fingerprint>(),
            Err(KeyError::Fingerprint("sha256:abc".into()))
        );
        let not_hex = format!("sha256:{}", "g".repeat(64));
        assert_eq!(
            not_hex.parse::<Fingerprint>(),
            Err(KeyError::Fingerprint(not_hex.clone()))
        );
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(
            PublicKey::parse("untrusted comment: x\n"),
            Err(KeyError::Missing)
        );
        assert_eq!(PublicKey::from_base64("!!!"), Err(KeyError::Base64));
        assert_eq!(PublicKey::from_base64("RWQ="), Err(KeyError::Length(2)));
    }
}
