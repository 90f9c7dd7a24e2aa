//! What the enrollment and peers exchanges share (docs/enrollment.md, docs/direct-paths.md):
//! `\n`-terminated lines of printable ASCII, `keyword VALUE` fields, length-prefixed text blocks,
//! and a body followed by one `signature <base64 Ed25519>` line over every byte before it.

use ct_codecs::{Base64, Decoder, Encoder, Hex};
use ed25519_compact::{KeyPair, PublicKey, Signature};

/// Why a message could not be read: which message, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed {
    pub what: &'static str,
    pub why: String,
}

pub(crate) fn malformed(what: &'static str, why: impl Into<String>) -> Malformed {
    Malformed {
        what,
        why: why.into(),
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    Hex::encode_to_string(bytes).expect("hex of a small buffer")
}

/// Lower-case hex of exactly N bytes.
pub(crate) fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || s.bytes().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    Hex::decode_to_vec(s, None).ok()?.try_into().ok()
}

pub(crate) fn b64(bytes: &[u8]) -> String {
    Base64::encode_to_string(bytes).expect("base64 of a small buffer")
}

/// Standard padded base64 of exactly N bytes, in its one canonical spelling.
pub(crate) fn unb64<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes: [u8; N] = Base64::decode_to_vec(s, None).ok()?.try_into().ok()?;
    (b64(&bytes) == s).then_some(bytes)
}

/// `body` followed by its signature line, signed with `key`.
pub(crate) fn sign(body: String, key: &KeyPair) -> Vec<u8> {
    let sig = key.sk.sign(body.as_bytes(), None);
    format!("{body}signature {}\n", b64(sig.as_ref())).into_bytes()
}

/// Splits a message into the signed body and its 64-byte signature (the last line). Nothing
/// is checked but the shape of that last line.
pub(crate) fn split_signed<'a>(
    buf: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8], [u8; 64]), Malformed> {
    let body_end = buf
        .strip_suffix(b"\n")
        .map(|b| b.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1))
        .ok_or_else(|| malformed(what, "no signature line"))?;
    let (body, sig_line) = buf.split_at(body_end);
    let sig = std::str::from_utf8(sig_line)
        .ok()
        .and_then(|l| l.strip_prefix("signature "))
        .and_then(|l| l.strip_suffix('\n'))
        .and_then(|l| Base64::decode_to_vec(l, None).ok())
        .and_then(|v| <[u8; 64]>::try_from(v).ok())
        .ok_or_else(|| malformed(what, "bad signature line"))?;
    Ok((body, sig))
}

/// Whether `sig` is `key`'s Ed25519 signature of `body`.
pub(crate) fn signed_by(body: &[u8], sig: &[u8; 64], key: &[u8; 32]) -> bool {
    PublicKey::from_slice(key).is_ok_and(|k| k.verify(body, &Signature::new(*sig)).is_ok())
}

/// Reads `\n`-terminated lines of printable ASCII and length-prefixed blocks.
pub(crate) struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Lines<'a> {
    pub fn new(buf: &'a [u8], what: &'static str) -> Self {
        Lines { buf, pos: 0, what }
    }

    pub fn err(&self, why: impl Into<String>) -> Malformed {
        malformed(self.what, why)
    }

    pub fn at_end(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub fn line(&mut self) -> Result<&'a str, Malformed> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("ends without a newline"))?;
        let line = &rest[..end];
        if line.iter().any(|&b| !(0x20..0x7f).contains(&b)) {
            return Err(self.err("control or non-ASCII byte in a line"));
        }
        self.pos += end + 1;
        Ok(std::str::from_utf8(line).expect("ASCII"))
    }

    /// `keyword VALUE`, exactly.
    pub fn field(&mut self, keyword: &str) -> Result<&'a str, Malformed> {
        let line = self.line()?;
        line.strip_prefix(keyword)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| self.err(format!("expected `{keyword} ...`")))
    }

    /// `keyword N` with N a canonical decimal number.
    pub fn number(&mut self, keyword: &str) -> Result<u64, Malformed> {
        let v = self.field(keyword)?;
        crate::format::canonical_u64(v)
            .ok_or_else(|| self.err(format!("{keyword} is not a number")))
    }

    /// `keyword LEN`, LEN bytes of UTF-8 text, `\n`.
    pub fn block(&mut self, keyword: &str) -> Result<&'a str, Malformed> {
        let len: usize = self
            .field(keyword)?
            .parse()
            .map_err(|_| self.err(format!("{keyword}: bad length")))?;
        let rest = &self.buf[self.pos..];
        if rest.len() < len + 1 || rest[len] != b'\n' {
            return Err(self.err(format!("{keyword}: truncated")));
        }
        let text = std::str::from_utf8(&rest[..len])
            .ok()
            .filter(|t| !t.contains('\0'))
            .ok_or_else(|| self.err(format!("{keyword}: not text")))?;
        self.pos += len + 1;
        Ok(text)
    }
}

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    hmac_sha256::Hash::hash(bytes)
}
