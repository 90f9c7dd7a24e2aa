//! Renewal wire format v1 (docs/enrollment.md, "Renewal"): how an enrolled node asks
//! `POST /renew` for a new certificate before its current one expires. The agent
//! (`idhal-bootstrap renew`) and `idhal serve` both use these types.
//!
//! - The request is signed with the node's own enrollment key (the Ed25519 key its certificate
//!   certifies, `enroll/node.key`), like a peers request: the server checks it against the key
//!   it stored at enrollment, so only that node can renew, and a revoked one cannot at all.
//! - The answer is an enrollment answer ([`crate::enroll::Response`]): the same signed format,
//!   signed by the project's enrollment key the node already trusts, naming the SHA-256 of this
//!   request. One answer format, one verifier: a renewal cannot be told something an enrollment
//!   could not.
//! - The nonce keeps two requests of the same second apart: each answer names its own request,
//!   so an old answer cannot be replayed to a node whose clock went back.

use crate::enroll::KeyPair;
use crate::id::NodeId;
use crate::wire::{self, hex, unhex, Lines, Malformed};

pub const REQUEST_FORMAT: &str = "idhal-renew-request 1";
/// Where renewal is served, relative to the manifest server's base URL.
pub const PATH: &str = "renew";
pub const CONTENT_TYPE: &str = "application/x-idhal-renew";
/// Largest request the server reads (one at its longest, a 64-character node id and a 20-digit
/// time, is 256 bytes).
pub const MAX_REQUEST: usize = 1 << 10;
/// The manifest parameter that overrides where renewal is served (default: server + PATH).
pub const URL_PARAM: &str = "renew-url";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenewError {
    #[error("malformed renewal {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("the request is not signed by the node's enrollment key")]
    RequestSignature,
}

impl From<Malformed> for RenewError {
    fn from(m: Malformed) -> Self {
        RenewError::Malformed {
            what: m.what,
            why: m.why,
        }
    }
}

fn malformed(what: &'static str, why: impl Into<String>) -> RenewError {
    wire::malformed(what, why).into()
}

/// What a node asks for: a new certificate for the key it holds, same id, same address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Whose enrollment key signs this.
    pub node: NodeId,
    /// Unix seconds when it was made; the server refuses requests far from its own clock.
    pub time: u64,
    pub nonce: [u8; 16],
}

/// A parsed request whose signature is still to be checked with the node's stored key.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub request: Request,
    /// SHA-256 of the whole request: the answer names it.
    pub digest: [u8; 32],
    signed: Vec<u8>,
    signature: [u8; 64],
}

impl Request {
    fn body(&self) -> String {
        format!(
            "{REQUEST_FORMAT}\nnode {}\ntime {}\nnonce {}\n",
            self.node,
            self.time,
            hex(&self.nonce)
        )
    }

    /// The encoded request, signed with the node's enrollment key (every field valid by its
    /// type: `parse` accepts whatever this signs).
    pub fn sign(&self, node_key: &KeyPair) -> Vec<u8> {
        wire::sign(self.body(), node_key)
    }

    /// Parses a request strictly (canonical encoding only). The signature is not checked yet:
    /// that needs the key stored for `node`.
    pub fn parse(buf: &[u8]) -> Result<SignedRequest, RenewError> {
        const W: &str = "request";
        if buf.len() > MAX_REQUEST {
            return Err(malformed(W, "too large"));
        }
        let (signed, signature) = wire::split_signed(buf, W)?;
        let mut l = Lines::new(signed, W);
        if l.line()? != REQUEST_FORMAT {
            return Err(malformed(W, format!("expected {REQUEST_FORMAT:?}")));
        }
        let node: NodeId = l
            .field("node")?
            .parse()
            .map_err(|e: crate::IdError| malformed(W, e.to_string()))?;
        let time = l.number("time")?;
        let nonce = unhex(l.field("nonce")?).ok_or_else(|| malformed(W, "bad nonce"))?;
        if !l.at_end() {
            return Err(malformed(W, "data after the nonce"));
        }
        let request = Request { node, time, nonce };
        if request.body().as_bytes() != signed {
            return Err(malformed(W, "not in canonical form"));
        }
        Ok(SignedRequest {
            request,
            digest: wire::sha256(buf),
            signed: signed.to_vec(),
            signature,
        })
    }
}

impl SignedRequest {
    /// Checks the signature against the node key the server stored at enrollment.
    pub fn verify(&self, node_key: &[u8; 32]) -> Result<(), RenewError> {
        if wire::signed_by(&self.signed, &self.signature, node_key) {
            Ok(())
        } else {
            Err(RenewError::RequestSignature)
        }
    }
}

/// SHA-256 of an encoded request, as the answer names it (`enroll::Response::request`).
pub fn request_digest(encoded: &[u8]) -> [u8; 32] {
    wire::sha256(encoded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::{EnrollKey, Response, Seed};

    fn node_key() -> KeyPair {
        KeyPair::from_seed(Seed::new([7; 32]))
    }

    fn request() -> Request {
        Request {
            node: "client3".parse().unwrap(),
            time: 1_800_000_000,
            nonce: [4; 16],
        }
    }

    #[test]
    fn exact_text_roundtrip_and_signature() {
        let enc = request().sign(&node_key());
        let text = String::from_utf8(enc.clone()).unwrap();
        let (body, sig) = text.rsplit_once("signature ").unwrap();
        assert_eq!(
            body,
            "idhal-renew-request 1\nnode client3\ntime 1800000000\n\
             nonce 04040404040404040404040404040404\n"
        );
        assert_eq!(sig.len(), 88 + 1, "base64 of 64 bytes and a newline");
        let parsed = Request::parse(&enc).unwrap();
        assert_eq!(parsed.request, request());
        assert_eq!(parsed.digest, request_digest(&enc));
        assert_eq!(parsed.digest, crate::enroll::request_digest(&enc));
        parsed.verify(&node_key().pk).unwrap();

        // Another node's key: refused whichever way round.
        let other = KeyPair::from_seed(Seed::new([8; 32]));
        assert_eq!(parsed.verify(&other.pk), Err(RenewError::RequestSignature));
        let forged = Request::parse(&request().sign(&other)).unwrap();
        assert_eq!(
            forged.verify(&node_key().pk),
            Err(RenewError::RequestSignature)
        );
        // Every flipped bit is refused by the parser or by the signature.
        for i in 0..enc.len() {
            let mut t = enc.clone();
            t[i] ^= 0x01;
            if let Ok(p) = Request::parse(&t) {
                assert_eq!(
                    p.verify(&node_key().pk),
                    Err(RenewError::RequestSignature),
                    "flip at {i}"
                );
            }
        }
        // A signature by the same key over a peers request's bytes is no renewal: the first
        // line differs, so the parser refuses it before any signature is checked.
        let peers = text.replacen("idhal-renew-request 1", "idhal-peers-request 1", 1);
        assert_eq!(
            Request::parse(peers.as_bytes()).unwrap_err(),
            malformed("request", "expected \"idhal-renew-request 1\"")
        );
    }

    #[test]
    fn hostile_requests_are_malformed() {
        let enc = request().sign(&node_key());
        let text = String::from_utf8(enc.clone()).unwrap();
        let sig_line = text.lines().last().unwrap().to_owned();
        let with_body = |body: &str| format!("{body}{sig_line}\n").into_bytes();
        let body = text.strip_suffix(&format!("{sig_line}\n")).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "no signature line"),
            (b"\n".to_vec(), "bad signature line"),
            (with_body(""), "ends without a newline"),
            (
                with_body(&body.replace("time ", "time 0")),
                "time is not a number",
            ),
            (
                with_body(&body.replace("time 1800000000", "time -1")),
                "time is not a number",
            ),
            (
                with_body(&body.replace("time 1800000000", "time 18446744073709551616")),
                "time is not a number",
            ),
            (with_body(&body.replace("nonce 04", "nonce 4")), "bad nonce"),
            (
                with_body(&body.replace("nonce 0404", "nonce 0A04")),
                "bad nonce",
            ),
            (with_body(&body.replace("client3", "../x")), "node id"),
            (with_body(&body.replace("node ", "node  ")), "node id"),
            (
                with_body(&body.replace("\nnode", "\nNode")),
                "expected `node ...`",
            ),
            (
                with_body(&format!("{body}extra 1\n")),
                "data after the nonce",
            ),
            (with_body(&body.replace('\n', "\r\n")), "control"),
            (
                with_body(&body.replace("client3", "client\u{e9}")),
                "non-ASCII",
            ),
            (vec![b'a'; MAX_REQUEST + 1], "too large"),
        ];
        for (buf, want) in cases {
            let err = Request::parse(&buf).unwrap_err().to_string();
            assert!(
                err.starts_with("malformed renewal request: ") && err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(&buf)
            );
        }
        for n in 0..enc.len() {
            assert!(
                matches!(Request::parse(&enc[..n]), Err(RenewError::Malformed { .. })),
                "prefix {n} parsed"
            );
        }
        // The longest request the format allows fits MAX_REQUEST with room to spare.
        let longest = Request {
            node: "n".repeat(64).parse().unwrap(),
            time: u64::MAX,
            nonce: [0xff; 16],
        }
        .sign(&node_key());
        assert_eq!(longest.len(), 256);
        assert!(Request::parse(&longest).is_ok());
    }

    /// The answer is an enrollment answer naming this request's digest: it verifies for this
    /// request only.
    #[test]
    fn the_answer_is_an_enrollment_response_for_this_request() {
        let enroll_key = KeyPair::from_seed(Seed::new([3; 32]));
        let enc = request().sign(&node_key());
        let digest = Request::parse(&enc).unwrap().digest;
        let answer = Response {
            request: digest,
            project: "default".into(),
            node: "client3".into(),
            address: "10.134.0.4".parse().unwrap(),
            certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ca: "ca\n".into(),
            openvpn: "client\n".into(),
        };
        let signed = answer.sign(&enroll_key);
        let key = EnrollKey(*enroll_key.pk);
        assert_eq!(Response::verify(&signed, &key, &digest).unwrap(), answer);
        let again = Request {
            nonce: [5; 16],
            ..request()
        }
        .sign(&node_key());
        assert_eq!(
            Response::verify(&signed, &key, &request_digest(&again)).unwrap_err(),
            crate::enroll::EnrollError::WrongRequest
        );
    }
}
