//! Enrollment wire format v1 (docs/enrollment.md): the one-time token, the request a node sends
//! to `POST /enroll`, and the signed response. The agent and `idhal serve` both use these types.
//!
//! - The token's secret never crosses the network: it is the seed of an Ed25519 key, and the
//!   request is signed with that key. The server keeps only the public half (the *verifier*),
//!   which can check a request but not make one, so a leaked server database enrolls nobody.
//! - The response is signed by the project's enrollment key, which the node learns from its
//!   signed manifest (`param enroll-key`), and names the SHA-256 of the request it answers: a
//!   man in the middle can neither substitute a CA, a certificate or an OpenVPN server, nor
//!   replay an old answer.

use crate::der;
use crate::id::{NodeId, ProjectName};
use crate::wire::{self, b64, hex, unhex, Lines, Malformed};
use ct_codecs::{Base64, Base64UrlSafeNoPadding, Decoder, Encoder};
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// The key types `der::ed25519_csr` and `Response::sign` take, for crates (the agent) that do
/// not depend on ed25519-compact themselves.
pub use ed25519_compact::{KeyPair, Seed};

pub const REQUEST_FORMAT: &str = "idhal-enroll-request 1";
pub const RESPONSE_FORMAT: &str = "idhal-enroll-response 1";
/// Where enrollment is served, relative to the manifest server's base URL.
pub const PATH: &str = "enroll";
pub const CONTENT_TYPE: &str = "application/x-idhal-enroll";
/// Largest request the server reads (a CSR is ~150 bytes).
pub const MAX_REQUEST: usize = 8 << 10;
/// Largest response the agent reads (certificates and an OpenVPN config: a few KiB).
pub const MAX_RESPONSE: usize = 256 << 10;
/// The manifest parameter that names the enrollment key.
pub const KEY_PARAM: &str = "enroll-key";
/// The manifest parameter that overrides where enrollment is served (default: server + PATH).
pub const URL_PARAM: &str = "enroll-url";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("malformed enrollment {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("invalid token: expected <16 hex digits>.<43 base64url characters> (as `idhal token create` prints it)")]
    Token,
    #[error("invalid enrollment key {0:?}: expected the base64 of a 32-byte Ed25519 key (as `idhal ca init` prints it)")]
    Key(String),
    #[error("the request is not signed by its token")]
    RequestSignature,
    #[error("the response is not signed by the enrollment key the signed manifest names")]
    ResponseSignature,
    #[error("the response answers another request (replayed or substituted)")]
    WrongRequest,
}

fn malformed(what: &'static str, why: impl Into<String>) -> EnrollError {
    wire::malformed(what, why).into()
}

impl From<Malformed> for EnrollError {
    fn from(m: Malformed) -> Self {
        EnrollError::Malformed {
            what: m.what,
            why: m.why,
        }
    }
}

/// The public id of a token: how the server finds it. Not secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenId(pub [u8; 8]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl FromStr for TokenId {
    type Err = EnrollError;
    fn from_str(s: &str) -> Result<Self, EnrollError> {
        unhex(s).map(TokenId).ok_or(EnrollError::Token)
    }
}

/// A one-time enrollment token: `<id>.<secret>`. Printed once by `idhal token create`; the
/// server stores only `verifier()`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub id: TokenId,
    secret: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}.<secret>)", self.id)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secret = Base64UrlSafeNoPadding::encode_to_string(self.secret).expect("32 bytes");
        write!(f, "{}.{secret}", self.id)
    }
}

impl FromStr for Token {
    type Err = EnrollError;
    fn from_str(s: &str) -> Result<Self, EnrollError> {
        let (id, secret) = s.trim().split_once('.').ok_or(EnrollError::Token)?;
        let secret = Base64UrlSafeNoPadding::decode_to_vec(secret, None)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .ok_or(EnrollError::Token)?;
        Ok(Token {
            id: id.parse()?,
            secret,
        })
    }
}

impl Token {
    /// A token from 40 random bytes (8 for the id, 32 for the secret).
    pub fn from_random(bytes: [u8; 40]) -> Token {
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[..8]);
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&bytes[8..]);
        Token {
            id: TokenId(id),
            secret,
        }
    }

    /// The key requests are signed with, derived from the secret (domain-separated).
    pub fn signing_key(&self) -> KeyPair {
        let mut h = hmac_sha256::Hash::new();
        h.update(b"idhal-enroll-token-v1\0");
        h.update(self.secret);
        KeyPair::from_seed(Seed::new(h.finalize()))
    }

    /// What the server stores: checks a request's signature, cannot make one.
    pub fn verifier(&self) -> [u8; 32] {
        *self.signing_key().pk
    }
}

/// The project's enrollment public key, as the manifest's `param enroll-key` carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollKey(pub [u8; 32]);

impl fmt::Display for EnrollKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64(&self.0))
    }
}

impl FromStr for EnrollKey {
    type Err = EnrollError;
    fn from_str(s: &str) -> Result<Self, EnrollError> {
        Base64::decode_to_vec(s.trim(), None)
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
            .map(EnrollKey)
            .ok_or_else(|| EnrollError::Key(s.chars().take(80).collect()))
    }
}

/// What a node asks for: a certificate for the key in `csr`, paid with token `token`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub token: TokenId,
    /// Unix seconds when it was made; the server refuses requests far from its own clock.
    pub time: u64,
    pub nonce: [u8; 16],
    /// DER PKCS#10 request (the agent's is `der::ed25519_csr`).
    pub csr: Vec<u8>,
}

/// A parsed request whose token signature is still to be checked with the stored verifier.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub request: Request,
    /// SHA-256 of the whole request: the response names it.
    pub digest: [u8; 32],
    signed: Vec<u8>,
    signature: [u8; 64],
}

impl Request {
    fn body(&self) -> String {
        format!(
            "{REQUEST_FORMAT}\ntoken {}\ntime {}\nnonce {}\ncsr {}\n",
            self.token,
            self.time,
            hex(&self.nonce),
            b64(&self.csr)
        )
    }

    /// The encoded request, signed with the token's key.
    pub fn sign(&self, token: &Token) -> Vec<u8> {
        assert_eq!(token.id, self.token, "signing with another token");
        wire::sign(self.body(), &token.signing_key())
    }

    /// Parses a request strictly (canonical encoding only). The signature is not checked yet:
    /// that needs the verifier stored for `token`.
    pub fn parse(buf: &[u8]) -> Result<SignedRequest, EnrollError> {
        const W: &str = "request";
        if buf.len() > MAX_REQUEST {
            return Err(malformed(W, "too large"));
        }
        let (signed, signature) = wire::split_signed(buf, W)?;
        let mut l = Lines::new(signed, W);
        if l.line()? != REQUEST_FORMAT {
            return Err(malformed(W, format!("expected {REQUEST_FORMAT:?}")));
        }
        let token = l.field("token")?.parse()?;
        let time = l.number("time")?;
        let nonce = unhex(l.field("nonce")?).ok_or_else(|| malformed(W, "bad nonce"))?;
        let csr = Base64::decode_to_vec(l.field("csr")?, None)
            .map_err(|_| malformed(W, "csr is not base64"))?;
        if !l.at_end() {
            return Err(malformed(W, "data after the csr"));
        }
        let request = Request {
            token,
            time,
            nonce,
            csr,
        };
        if request.body().as_bytes() != signed {
            return Err(malformed(W, "not in canonical form"));
        }
        Ok(SignedRequest {
            request,
            digest: hmac_sha256::Hash::hash(buf),
            signed: signed.to_vec(),
            signature,
        })
    }
}

impl SignedRequest {
    /// Checks the token signature against the verifier the server stored for the token.
    pub fn verify(&self, verifier: &[u8; 32]) -> Result<(), EnrollError> {
        if wire::signed_by(&self.signed, &self.signature, verifier) {
            Ok(())
        } else {
            Err(EnrollError::RequestSignature)
        }
    }
}

/// SHA-256 of an encoded request, as a response names it.
pub fn request_digest(encoded: &[u8]) -> [u8; 32] {
    hmac_sha256::Hash::hash(encoded)
}

/// What the server answers: the node's identity, certificate, CA and OpenVPN client config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// `request_digest` of the request this answers.
    pub request: [u8; 32],
    /// A valid `ProjectName` (checked by `sign` and `verify`).
    pub project: String,
    /// The node id, also its certificate's CN (`client317`): a valid `NodeId` (checked by `sign`
    /// and `verify`).
    pub node: String,
    /// Its VPN address, the same on every connection.
    pub address: Ipv4Addr,
    /// PEM.
    pub certificate: String,
    /// PEM: the project CA.
    pub ca: String,
    /// OpenVPN client configuration, referring to `ca.crt`, `node.crt` and `node.key` in its
    /// own directory (run it with `openvpn --cd DIR --config openvpn.conf`).
    pub openvpn: String,
}

impl Response {
    fn body(&self) -> String {
        let mut s = format!(
            "{RESPONSE_FORMAT}\nrequest {}\nproject {}\nnode {}\naddress {}\n",
            hex(&self.request),
            self.project,
            self.node,
            self.address
        );
        for (k, v) in [
            ("certificate", &self.certificate),
            ("ca", &self.ca),
            ("openvpn", &self.openvpn),
        ] {
            s.push_str(&format!("{k} {}\n{v}\n", v.len()));
        }
        s.push_str("end\n");
        s
    }

    /// The encoded response signed with the project's enrollment key.
    pub fn sign(&self, key: &KeyPair) -> Vec<u8> {
        assert!(
            NodeId::try_from(self.node.as_str()).is_ok()
                && ProjectName::try_from(self.project.as_str()).is_ok(),
            "the server made an invalid node id or project name"
        );
        wire::sign(self.body(), key)
    }

    /// Verifies, in order: the signature with the key the manifest named, then the format, then
    /// that it answers `request` (the digest of what this node sent).
    pub fn verify(
        buf: &[u8],
        key: &EnrollKey,
        request: &[u8; 32],
    ) -> Result<Response, EnrollError> {
        const W: &str = "response";
        if buf.len() > MAX_RESPONSE {
            return Err(malformed(W, "too large"));
        }
        let (body, sig) = wire::split_signed(buf, W)?;
        if !wire::signed_by(body, &sig, &key.0) {
            return Err(EnrollError::ResponseSignature);
        }
        let mut l = Lines::new(body, W);
        if l.line()? != RESPONSE_FORMAT {
            return Err(malformed(W, format!("expected {RESPONSE_FORMAT:?}")));
        }
        let answered: [u8; 32] =
            unhex(l.field("request")?).ok_or_else(|| malformed(W, "bad request digest"))?;
        let project = l.field("project")?.to_owned();
        let node = l.field("node")?.to_owned();
        ProjectName::try_from(project.as_str()).map_err(|e| malformed(W, e.to_string()))?;
        NodeId::try_from(node.as_str()).map_err(|e| malformed(W, e.to_string()))?;
        let address = l
            .field("address")?
            .parse()
            .map_err(|_| malformed(W, "bad address"))?;
        let certificate = l.block("certificate")?.to_owned();
        let ca = l.block("ca")?.to_owned();
        let openvpn = l.block("openvpn")?.to_owned();
        if l.line()? != "end" || !l.at_end() {
            return Err(malformed(W, "expected end"));
        }
        if &answered != request {
            return Err(EnrollError::WrongRequest);
        }
        Ok(Response {
            request: answered,
            project,
            node,
            address,
            certificate,
            ca,
            openvpn,
        })
    }
}

/// The node's key material: PKCS#8 PEM of its private key, and a CSR for it.
pub fn node_key_pem(seed: &[u8; 32]) -> String {
    der::pem("PRIVATE KEY", &der::ed25519_pkcs8(seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Token {
        let mut r = [0u8; 40];
        r.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        Token::from_random(r)
    }

    #[test]
    fn token_text_roundtrip_and_verifier() {
        let t = token();
        let text = t.to_string();
        assert_eq!(text.len(), 16 + 1 + 43);
        assert_eq!(text.parse::<Token>().unwrap(), t);
        assert!(
            !format!("{t:?}").contains(&text[17..]),
            "Debug shows the secret"
        );
        for bad in [
            "",
            "abc",
            "0001020304050607",
            "0001020304050607.short",
            "zz01020304050607.AAAA",
        ] {
            assert_eq!(bad.parse::<Token>(), Err(EnrollError::Token), "{bad}");
        }
        assert_eq!(t.verifier(), *t.signing_key().pk);
    }

    fn request() -> Request {
        Request {
            token: token().id,
            time: 1_800_000_000,
            nonce: [9; 16],
            csr: vec![0x30, 0x03, 1, 2, 3],
        }
    }

    #[test]
    fn request_roundtrip_verify_and_tamper() {
        let t = token();
        let enc = request().sign(&t);
        let parsed = Request::parse(&enc).unwrap();
        assert_eq!(parsed.request, request());
        assert_eq!(parsed.digest, request_digest(&enc));
        parsed.verify(&t.verifier()).unwrap();

        let mut other = [1u8; 40];
        other[..8].copy_from_slice(&t.id.0);
        let impostor = Token::from_random(other);
        let forged = request().sign(&impostor);
        assert_eq!(
            Request::parse(&forged)
                .unwrap()
                .verify(&t.verifier())
                .unwrap_err(),
            EnrollError::RequestSignature
        );
        let tampered = String::from_utf8(enc.clone())
            .unwrap()
            .replace("time 1800000000", "time 1800000001");
        assert_eq!(
            Request::parse(tampered.as_bytes())
                .unwrap()
                .verify(&t.verifier())
                .unwrap_err(),
            EnrollError::RequestSignature
        );
        for n in 0..enc.len() {
            assert!(
                matches!(
                    Request::parse(&enc[..n]),
                    Err(EnrollError::Malformed {
                        what: "request",
                        ..
                    })
                ),
                "prefix {n} parsed"
            );
        }
        let padded = String::from_utf8(enc).unwrap().replace("time ", "time 0");
        assert_eq!(
            Request::parse(padded.as_bytes()).unwrap_err(),
            malformed("request", "time is not a number")
        );
    }

    fn response() -> Response {
        Response {
            request: [5; 32],
            project: "default".into(),
            node: "client317".into(),
            address: "10.134.7.38".parse().unwrap(),
            certificate: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
            ca: "ca\n".into(),
            openvpn: "client\nremote vpn 1194\nend\n".into(),
        }
    }

    #[test]
    fn response_roundtrip_and_refusals() {
        let kp = KeyPair::from_seed(Seed::new([3; 32]));
        let key = EnrollKey(*kp.pk);
        assert_eq!(key.to_string().parse::<EnrollKey>().unwrap(), key);
        let enc = response().sign(&kp);
        assert_eq!(Response::verify(&enc, &key, &[5; 32]).unwrap(), response());
        assert_eq!(
            Response::verify(&enc, &key, &[6; 32]).unwrap_err(),
            EnrollError::WrongRequest
        );
        let other = EnrollKey(*KeyPair::from_seed(Seed::new([4; 32])).pk);
        assert_eq!(
            Response::verify(&enc, &other, &[5; 32]).unwrap_err(),
            EnrollError::ResponseSignature
        );
        // A flipped bit in the body breaks the signature; in the newline that ends the body or
        // in the signature line, the signature or the line's encoding.
        let body_len = response().body().len();
        for i in 0..enc.len() {
            let mut t = enc.clone();
            t[i] ^= 0x01;
            let r = Response::verify(&t, &key, &[5; 32]);
            if i < body_len - 1 {
                assert_eq!(r, Err(EnrollError::ResponseSignature), "flip at {i}");
            } else {
                assert!(
                    matches!(
                        r,
                        Err(EnrollError::ResponseSignature
                            | EnrollError::Malformed {
                                what: "response",
                                ..
                            })
                    ),
                    "flip at {i}: {r:?}"
                );
            }
        }
    }

    /// A body signed by the right key is still refused when a name in it could escape its role
    /// (a node id or project becomes a file name and a certificate CN on the node).
    #[test]
    fn response_with_unsafe_names_is_refused() {
        let kp = KeyPair::from_seed(Seed::new([3; 32]));
        let key = EnrollKey(*kp.pk);
        let signed = |r: &Response| {
            let body = r.body();
            let sig = kp.sk.sign(body.as_bytes(), None);
            format!("{body}signature {}\n", b64(sig.as_ref())).into_bytes()
        };
        let mut bad = response();
        bad.node = "../etc".into();
        assert_eq!(
            Response::verify(&signed(&bad), &key, &[5; 32]),
            Err(malformed(
                "response",
                "node id \"../etc\" is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, \
                 starting with a letter or digit, without '..'"
            ))
        );
        let mut bad = response();
        bad.project = ".hidden".into();
        assert_eq!(
            Response::verify(&signed(&bad), &key, &[5; 32]),
            Err(EnrollError::Malformed {
                what: "response",
                why: crate::IdError::Project(".hidden".into()).to_string()
            })
        );
        assert_eq!(
            Response::verify(&signed(&response()), &key, &[5; 32]),
            Ok(response())
        );
    }
}
