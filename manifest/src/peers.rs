//! Peers wire format v1 (docs/direct-paths.md): how an enrolled node registers its WireGuard key
//! and candidate endpoints with `POST /peers`, and the signed list of its project's peers it gets
//! back. The agent (`idhal-bootstrap peers`) and `idhal serve` both use these types.
//!
//! - The request is signed with the node's own enrollment key (the Ed25519 key its certificate
//!   certifies, `enroll/node.key`): the server checks it against the key it stored at enrollment,
//!   so only that node can register or move its WireGuard key, and a revoked node cannot at all.
//! - The answer is signed by the project's enrollment key the node already trusts (from its signed
//!   manifest) and names the SHA-256 of the request it answers, like an enrollment answer: a man in
//!   the middle can neither add a peer, swap a key or an endpoint, nor replay an old list (which
//!   would bring back a revoked node).
//! - The WireGuard private key never leaves the node; X25519 is not in the agent (`wg genkey` on
//!   the node makes the pair, the agent only carries the public half).

use crate::enroll::{EnrollKey, KeyPair};
use crate::id::{NodeId, ProjectName};
use crate::wire::{self, b64, hex, unhex, Lines, Malformed};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

pub const REQUEST_FORMAT: &str = "idhal-peers-request 1";
pub const RESPONSE_FORMAT: &str = "idhal-peers-response 1";
/// Where the exchange is served, relative to the manifest server's base URL.
pub const PATH: &str = "peers";
pub const CONTENT_TYPE: &str = "application/x-idhal-peers";
/// Largest request the server reads (8 endpoints: ~600 bytes).
pub const MAX_REQUEST: usize = 4 << 10;
/// Most candidate endpoints one node registers.
pub const MAX_ENDPOINTS: usize = 8;
/// Most peers one answer lists.
pub const MAX_PEERS: usize = 4096;
/// Longest `peer` line: `peer `, a 64-character node id, a 15-character address, a 44-character
/// key, then `MAX_ENDPOINTS` × (a space and `[8 groups of 4 hex digits]:65535`, 47 characters:
/// no scope id, `endpoint_problem` refuses one), and the newline.
const MAX_PEER_LINE: usize = 5 + 64 + 1 + 15 + 1 + 44 + MAX_ENDPOINTS * (1 + 47) + 1;
/// Everything of an answer but its peer lines: the head with the longest names, pool and
/// timings, `end` and the signature line come to 410 bytes; the rest is spare.
const MAX_FRAME: usize = 1 << 10;
/// Largest answer the agent reads, and the server signs: `MAX_PEERS` peers with
/// `MAX_ENDPOINTS` IPv6 endpoints each, every text at its longest (2,110,464 bytes).
pub const MAX_RESPONSE: usize = MAX_PEERS * MAX_PEER_LINE + MAX_FRAME;
/// The manifest parameter that overrides where the exchange is served (default: server + PATH).
pub const URL_PARAM: &str = "peers-url";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeersError {
    #[error("malformed peers {what}: {why}")]
    Malformed { what: &'static str, why: String },
    #[error("the request is not signed by the node's enrollment key")]
    RequestSignature,
    #[error("the peer list is not signed by the enrollment key the signed manifest names")]
    ResponseSignature,
    #[error("the peer list answers another request (replayed or substituted)")]
    WrongRequest,
}

impl From<Malformed> for PeersError {
    fn from(m: Malformed) -> Self {
        PeersError::Malformed {
            what: m.what,
            why: m.why,
        }
    }
}

fn malformed(what: &'static str, why: impl Into<String>) -> PeersError {
    wire::malformed(what, why).into()
}

/// A WireGuard public key (Curve25519), in `wg pubkey`'s spelling: 44 characters of padded base64.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WgKey(pub [u8; 32]);

impl fmt::Display for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64(&self.0))
    }
}

impl fmt::Debug for WgKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgKey({self})")
    }
}

impl FromStr for WgKey {
    type Err = PeersError;
    fn from_str(s: &str) -> Result<Self, PeersError> {
        wire::unb64(s).map(WgKey).ok_or_else(|| {
            malformed(
                "key",
                format!(
                    "{:?} is not a WireGuard public key (44 characters of base64, as `wg pubkey` prints)",
                    s.chars().take(60).collect::<String>()
                ),
            )
        })
    }
}

/// An IPv4 network, `ADDR/PREFIX` with no host bits set (a project's address pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net4 {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Net4 {
    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr)
    }
}

impl fmt::Display for Net4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Net4 {
    type Err = PeersError;
    fn from_str(s: &str) -> Result<Self, PeersError> {
        let bad = || {
            malformed(
                "network",
                format!("{s:?} is not ADDR/PREFIX with no host bits"),
            )
        };
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let prefix = crate::format::canonical_u64(p)
            .filter(|p| *p <= 32)
            .ok_or_else(bad)? as u8;
        let net = Net4 {
            addr: a.parse().map_err(|_| bad())?,
            prefix,
        };
        if u32::from(net.addr) & !net.mask() != 0 || net.to_string() != s {
            return Err(bad());
        }
        Ok(net)
    }
}

/// Why an endpoint cannot be registered or used: `None` when it can. The pool check needs the
/// project's pool, so the server and the agent both call this with it: traffic to an endpoint
/// inside the pool would go through the tunnel (WireGuard over OpenVPN), the opposite of a
/// direct path, and WireGuard's roaming would keep it there.
pub fn endpoint_problem(e: &SocketAddr, pool: Option<&Net4>) -> Option<&'static str> {
    if e.port() == 0 {
        return Some("port 0");
    }
    match e.ip() {
        IpAddr::V4(a) => {
            // Link-local (169.254.0.0/16, as fe80::/10 below): an address the host gave itself
            // for one link, the same on many hosts.
            if a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.is_link_local()
            {
                return Some("not a unicast address another host can reach");
            }
            if pool.is_some_and(|p| p.contains(a)) {
                return Some("inside the VPN address pool");
            }
        }
        IpAddr::V6(a) => {
            if let SocketAddr::V6(v6) = e {
                if v6.scope_id() != 0 {
                    return Some("an interface scope id, which means nothing to another host");
                }
            }
            let link_local = a.segments()[0] & 0xffc0 == 0xfe80;
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() || link_local {
                return Some("not a unicast address another host can reach");
            }
            if let Some(v4) = a.to_ipv4_mapped() {
                return endpoint_problem(&SocketAddr::new(v4.into(), e.port()), pool);
            }
        }
    }
    None
}

/// `ADDR:PORT` or `[ADDR]:PORT`, in the one spelling Rust prints it.
fn endpoint(s: &str, what: &'static str) -> Result<SocketAddr, PeersError> {
    s.parse::<SocketAddr>()
        .ok()
        .filter(|e| e.to_string() == s)
        .ok_or_else(|| malformed(what, format!("bad endpoint {s:?}")))
}

/// What a node registers: its WireGuard public key and where other nodes may reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// A valid `NodeId` (checked by `sign` and `parse`): whose enrollment key signs this.
    pub node: String,
    /// Unix seconds when it was made; the server refuses requests far from its own clock.
    pub time: u64,
    pub nonce: [u8; 16],
    pub wg_key: WgKey,
    /// At most `MAX_ENDPOINTS`, each free of `endpoint_problem` (but the pool: the server checks
    /// that one), no duplicates. May be empty: the node then only dials out.
    pub endpoints: Vec<SocketAddr>,
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
        let mut s = format!(
            "{REQUEST_FORMAT}\nnode {}\ntime {}\nnonce {}\nwg-key {}\n",
            self.node,
            self.time,
            hex(&self.nonce),
            self.wg_key
        );
        for e in &self.endpoints {
            s.push_str(&format!("endpoint {e}\n"));
        }
        s
    }

    /// The encoded request, signed with the node's enrollment key; refused (nothing signed)
    /// when `parse` would refuse it: a bad node id or endpoint.
    pub fn sign(&self, node_key: &KeyPair) -> Result<Vec<u8>, PeersError> {
        NodeId::try_from(self.node.as_str()).map_err(|e| malformed("request", e.to_string()))?;
        self.check_endpoints()?;
        Ok(wire::sign(self.body(), node_key))
    }

    fn check_endpoints(&self) -> Result<(), PeersError> {
        const W: &str = "request";
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(malformed(W, format!("more than {MAX_ENDPOINTS} endpoints")));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            if let Some(why) = endpoint_problem(e, None) {
                return Err(malformed(W, format!("endpoint {e}: {why}")));
            }
            if self.endpoints[..i].contains(e) {
                return Err(malformed(W, format!("endpoint {e} twice")));
            }
        }
        Ok(())
    }

    /// Parses a request strictly (canonical encoding only). The signature is not checked yet:
    /// that needs the key stored for `node`.
    pub fn parse(buf: &[u8]) -> Result<SignedRequest, PeersError> {
        const W: &str = "request";
        if buf.len() > MAX_REQUEST {
            return Err(malformed(W, "too large"));
        }
        let (signed, signature) = wire::split_signed(buf, W)?;
        let mut l = Lines::new(signed, W);
        if l.line()? != REQUEST_FORMAT {
            return Err(malformed(W, format!("expected {REQUEST_FORMAT:?}")));
        }
        let node = l.field("node")?.to_owned();
        NodeId::try_from(node.as_str()).map_err(|e| malformed(W, e.to_string()))?;
        let time = l.number("time")?;
        let nonce = unhex(l.field("nonce")?).ok_or_else(|| malformed(W, "bad nonce"))?;
        let wg_key = l.field("wg-key")?.parse()?;
        let mut endpoints = Vec::new();
        while !l.at_end() {
            if endpoints.len() == MAX_ENDPOINTS {
                return Err(malformed(W, format!("more than {MAX_ENDPOINTS} endpoints")));
            }
            endpoints.push(endpoint(l.field("endpoint")?, W)?);
        }
        let request = Request {
            node,
            time,
            nonce,
            wg_key,
            endpoints,
        };
        request.check_endpoints()?;
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
    pub fn verify(&self, node_key: &[u8; 32]) -> Result<(), PeersError> {
        if wire::signed_by(&self.signed, &self.signature, node_key) {
            Ok(())
        } else {
            Err(PeersError::RequestSignature)
        }
    }
}

/// SHA-256 of an encoded request, as the answer names it.
pub fn request_digest(encoded: &[u8]) -> [u8; 32] {
    wire::sha256(encoded)
}

/// One other node of the project, as the list gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// A valid `NodeId`.
    pub node: String,
    /// Its VPN address: the /32 that goes direct while the path is alive.
    pub address: Ipv4Addr,
    pub wg_key: WgKey,
    /// As the node registered them (at most `MAX_ENDPOINTS`, none in the pool).
    pub endpoints: Vec<SocketAddr>,
}

/// The signed answer: this node's project's peers (every other node with a registered key,
/// revoked ones left out) and the path-switch timings, which the server's configuration sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// SHA-256 of the request this answers.
    pub request: [u8; 32],
    /// A valid `ProjectName`.
    pub project: String,
    /// The node that asked (a valid `NodeId`), never one of `peers`.
    pub node: String,
    /// The project's VPN pool: no endpoint may lie in it.
    pub pool: Net4,
    /// Seconds between two refreshes of this list: how long a revoked node stays a peer at most.
    pub refresh: u32,
    /// WireGuard persistent keepalive, seconds.
    pub keepalive: u32,
    /// A peer not heard from for this many seconds loses its direct route (back to the tunnel).
    pub fallback: u32,
    /// At most `MAX_PEERS`; node ids, addresses and keys each unique.
    pub peers: Vec<Peer>,
}

/// The timings a list may carry: keepalive 1-3600 s, fallback at least twice the keepalive (one
/// lost keepalive is not a dead path), refresh 1 s to a day.
pub fn timings_problem(refresh: u32, keepalive: u32, fallback: u32) -> Option<String> {
    if !(1..=86_400).contains(&refresh) {
        return Some(format!("refresh {refresh} s: use 1-86400"));
    }
    if !(1..=3600).contains(&keepalive) {
        return Some(format!("keepalive {keepalive} s: use 1-3600"));
    }
    if fallback < 2 * keepalive || fallback > 86_400 {
        return Some(format!(
            "fallback {fallback} s: use at least twice the keepalive ({keepalive} s), at most 86400"
        ));
    }
    None
}

impl Response {
    fn body(&self) -> String {
        let mut s = format!(
            "{RESPONSE_FORMAT}\nrequest {}\nproject {}\nnode {}\npool {}\nrefresh {}\nkeepalive {}\nfallback {}\n",
            hex(&self.request),
            self.project,
            self.node,
            self.pool,
            self.refresh,
            self.keepalive,
            self.fallback
        );
        for p in &self.peers {
            s.push_str(&format!("peer {} {} {}", p.node, p.address, p.wg_key));
            for e in &p.endpoints {
                s.push_str(&format!(" {e}"));
            }
            s.push('\n');
        }
        s.push_str("end\n");
        s
    }

    /// Every rule `verify` applies to what was signed (not the signature nor the request).
    fn check(&self) -> Result<(), PeersError> {
        const W: &str = "response";
        ProjectName::try_from(self.project.as_str()).map_err(|e| malformed(W, e.to_string()))?;
        NodeId::try_from(self.node.as_str()).map_err(|e| malformed(W, e.to_string()))?;
        if let Some(why) = timings_problem(self.refresh, self.keepalive, self.fallback) {
            return Err(malformed(W, why));
        }
        if self.peers.len() > MAX_PEERS {
            return Err(malformed(W, format!("more than {MAX_PEERS} peers")));
        }
        for (i, p) in self.peers.iter().enumerate() {
            let bad = |why: String| malformed(W, format!("peer {}: {why}", p.node));
            NodeId::try_from(p.node.as_str()).map_err(|e| malformed(W, e.to_string()))?;
            if p.node == self.node {
                return Err(bad("the asking node itself".into()));
            }
            if !self.pool.contains(p.address) {
                return Err(bad(format!(
                    "address {} outside pool {}",
                    p.address, self.pool
                )));
            }
            // Against every earlier peer, not through hash sets, whose code cost the size-budgeted
            // agent 6.8 KB (a sort per field: more). Measured, release build: 31 ms for a list
            // of 4,096 peers (the most a list holds), about 2 ms for 1,000.
            if self.peers[..i]
                .iter()
                .any(|q| q.node == p.node || q.address == p.address || q.wg_key == p.wg_key)
            {
                return Err(bad("node id, address or key listed twice".into()));
            }
            if p.endpoints.len() > MAX_ENDPOINTS {
                return Err(bad(format!("more than {MAX_ENDPOINTS} endpoints")));
            }
            for (i, e) in p.endpoints.iter().enumerate() {
                if let Some(why) = endpoint_problem(e, Some(&self.pool)) {
                    return Err(bad(format!("endpoint {e}: {why}")));
                }
                if p.endpoints[..i].contains(e) {
                    return Err(bad(format!("endpoint {e} twice")));
                }
            }
        }
        Ok(())
    }

    /// The encoded answer signed with the project's enrollment key; refused (nothing signed)
    /// when `verify` would refuse the list: the server never signs what no agent accepts.
    pub fn sign(&self, key: &KeyPair) -> Result<Vec<u8>, PeersError> {
        self.check()?;
        Ok(wire::sign(self.body(), key))
    }

    /// Verifies, in order: the size, the signature with the key the manifest named, then the
    /// format and every rule of `check`, then that it answers `request`.
    pub fn verify(buf: &[u8], key: &EnrollKey, request: &[u8; 32]) -> Result<Response, PeersError> {
        const W: &str = "response";
        if buf.len() > MAX_RESPONSE {
            return Err(malformed(W, "too large"));
        }
        let (body, sig) = wire::split_signed(buf, W)?;
        if !wire::signed_by(body, &sig, &key.0) {
            return Err(PeersError::ResponseSignature);
        }
        let mut l = Lines::new(body, W);
        if l.line()? != RESPONSE_FORMAT {
            return Err(malformed(W, format!("expected {RESPONSE_FORMAT:?}")));
        }
        let answered: [u8; 32] =
            unhex(l.field("request")?).ok_or_else(|| malformed(W, "bad request digest"))?;
        let project = l.field("project")?.to_owned();
        let node = l.field("node")?.to_owned();
        let pool = l.field("pool")?.parse()?;
        let mut timing = |k: &str| -> Result<u32, PeersError> {
            u32::try_from(l.number(k)?).map_err(|_| malformed(W, format!("{k} is too large")))
        };
        let (refresh, keepalive, fallback) = (
            timing("refresh")?,
            timing("keepalive")?,
            timing("fallback")?,
        );
        let mut peers = Vec::new();
        loop {
            let line = l.line()?;
            if line == "end" {
                break;
            }
            if peers.len() == MAX_PEERS {
                return Err(malformed(W, format!("more than {MAX_PEERS} peers")));
            }
            let mut words = line
                .strip_prefix("peer ")
                .ok_or_else(|| malformed(W, "expected `peer ...` or `end`"))?
                .split(' ');
            let mut word = |what: &str| {
                words
                    .next()
                    .ok_or_else(|| malformed(W, format!("peer line without {what}")))
            };
            let node = word("a node id")?.to_owned();
            let address = word("an address")?
                .parse()
                .map_err(|_| malformed(W, "bad peer address"))?;
            let wg_key = word("a key")?.parse()?;
            let endpoints = words
                .map(|e| endpoint(e, W))
                .collect::<Result<Vec<_>, _>>()?;
            peers.push(Peer {
                node,
                address,
                wg_key,
                endpoints,
            });
        }
        if !l.at_end() {
            return Err(malformed(W, "data after `end`"));
        }
        let r = Response {
            request: answered,
            project,
            node,
            pool,
            refresh,
            keepalive,
            fallback,
            peers,
        };
        r.check()?;
        if r.body().as_bytes() != body {
            return Err(malformed(W, "not in canonical form"));
        }
        if &r.request != request {
            return Err(PeersError::WrongRequest);
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::Seed;

    fn node_key() -> KeyPair {
        KeyPair::from_seed(Seed::new([7; 32]))
    }

    fn request() -> Request {
        Request {
            node: "client3".into(),
            time: 1_800_000_000,
            nonce: [4; 16],
            wg_key: WgKey([9; 32]),
            endpoints: vec![
                "192.168.77.11:51820".parse().unwrap(),
                "[2001:db8::1]:51820".parse().unwrap(),
            ],
        }
    }

    #[test]
    fn request_roundtrip_verify_and_tamper() {
        let enc = request().sign(&node_key()).unwrap();
        let parsed = Request::parse(&enc).unwrap();
        assert_eq!(parsed.request, request());
        assert_eq!(parsed.digest, wire::sha256(&enc));
        parsed.verify(&node_key().pk).unwrap();
        let other = KeyPair::from_seed(Seed::new([8; 32]));
        assert_eq!(parsed.verify(&other.pk), Err(PeersError::RequestSignature));
        let forged = Request::parse(&request().sign(&other).unwrap()).unwrap();
        assert_eq!(
            forged.verify(&node_key().pk),
            Err(PeersError::RequestSignature)
        );
        for n in 0..enc.len() {
            assert!(
                matches!(Request::parse(&enc[..n]), Err(PeersError::Malformed { .. })),
                "prefix {n} parsed"
            );
        }
        // Every flipped bit is refused by the parser or by the signature.
        for i in 0..enc.len() {
            let mut t = enc.clone();
            t[i] ^= 0x01;
            if let Ok(p) = Request::parse(&t) {
                assert_eq!(
                    p.verify(&node_key().pk),
                    Err(PeersError::RequestSignature),
                    "flip at {i}"
                );
            }
        }
    }

    #[test]
    fn a_request_parse_would_refuse_is_not_signed() {
        let mut bad_node = request();
        bad_node.node = "../x".into();
        let mut bad_endpoint = request();
        bad_endpoint
            .endpoints
            .push("127.0.0.1:51820".parse().unwrap());
        let mut twice = request();
        twice.endpoints.push(twice.endpoints[0]);
        for (r, want) in [
            (bad_node, "node id"),
            (bad_endpoint, "not a unicast address"),
            (twice, "twice"),
        ] {
            let err = r.sign(&node_key()).unwrap_err().to_string();
            assert!(
                err.starts_with("malformed peers request: ") && err.contains(want),
                "{err}"
            );
        }
    }

    #[test]
    fn hostile_requests_are_malformed() {
        let text = String::from_utf8(request().sign(&node_key()).unwrap()).unwrap();
        let sig_line = text.lines().last().unwrap().to_owned();
        let with_body = |body: &str| format!("{body}{sig_line}\n").into_bytes();
        let head = "idhal-peers-request 1\nnode client3\ntime 1800000000\nnonce 04040404040404040404040404040404\n";
        let key = format!("wg-key {}\n", WgKey([9; 32]));
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "without a newline"),
            (format!("{head}wg-key AAAA\n"), "not a WireGuard public key"),
            (
                format!("{head}{key}endpoint 0.0.0.0:1\n"),
                "not a unicast address",
            ),
            (
                format!("{head}{key}endpoint 127.0.0.1:51820\n"),
                "not a unicast address",
            ),
            (format!("{head}{key}endpoint 192.168.1.1:0\n"), "port 0"),
            (
                format!("{head}{key}endpoint 192.168.1.1:51820\nendpoint 192.168.1.1:51820\n"),
                "twice",
            ),
            (
                format!("{head}{key}endpoint 192.168.001.1:51820\n"),
                "bad endpoint",
            ),
            (
                format!("{head}{key}endpoint [fe80::1]:51820\n"),
                "not a unicast address",
            ),
            (
                format!("{head}{key}endpoint 169.254.10.1:51820\n"),
                "not a unicast address",
            ),
            (
                format!("{head}{key}endpoint [::ffff:169.254.10.1]:51820\n"),
                "not a unicast address",
            ),
            (
                format!("{head}{key}{}", "endpoint 192.168.1.1:1\n".repeat(9)),
                "more than 8",
            ),
            (head.replace("client3", "../x") + &key, "node id"),
            (
                head.replace("time 1800000000", "time 01") + &key,
                "time is not a number",
            ),
        ];
        for (body, want) in cases {
            let err = Request::parse(&with_body(&body)).unwrap_err().to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
        assert!(Request::parse(&vec![b'a'; MAX_REQUEST + 1])
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }

    fn enroll_key() -> KeyPair {
        KeyPair::from_seed(Seed::new([3; 32]))
    }

    fn response() -> Response {
        Response {
            request: [5; 32],
            project: "default".into(),
            node: "client3".into(),
            pool: "10.134.0.0/16".parse().unwrap(),
            refresh: 30,
            keepalive: 1,
            fallback: 3,
            peers: vec![
                Peer {
                    node: "client4".into(),
                    address: "10.134.0.4".parse().unwrap(),
                    wg_key: WgKey([1; 32]),
                    endpoints: vec!["192.168.77.12:51820".parse().unwrap()],
                },
                Peer {
                    node: "client5".into(),
                    address: "10.134.0.5".parse().unwrap(),
                    wg_key: WgKey([2; 32]),
                    endpoints: vec![],
                },
            ],
        }
    }

    #[test]
    fn response_roundtrip_and_refusals() {
        let key = EnrollKey(*enroll_key().pk);
        let enc = response().sign(&enroll_key()).unwrap();
        assert_eq!(Response::verify(&enc, &key, &[5; 32]).unwrap(), response());
        assert_eq!(
            Response::verify(&enc, &key, &[6; 32]),
            Err(PeersError::WrongRequest)
        );
        let other = EnrollKey(*KeyPair::from_seed(Seed::new([4; 32])).pk);
        assert_eq!(
            Response::verify(&enc, &other, &[5; 32]),
            Err(PeersError::ResponseSignature)
        );
        let body_len = response().body().len();
        for i in 0..enc.len() {
            let mut t = enc.clone();
            t[i] ^= 0x01;
            let r = Response::verify(&t, &key, &[5; 32]);
            if i < body_len - 1 {
                assert_eq!(r, Err(PeersError::ResponseSignature), "flip at {i}");
            } else {
                assert!(r.is_err(), "flip at {i}");
            }
        }
        assert!(
            Response::verify(&vec![b'a'; MAX_RESPONSE + 1], &key, &[5; 32])
                .unwrap_err()
                .to_string()
                .contains("too large")
        );
    }

    /// A list signed by the right key is still refused when it breaks a rule: each rule once.
    #[test]
    fn signed_lists_that_break_a_rule_are_refused() {
        let key = EnrollKey(*enroll_key().pk);
        let signed = |r: &Response| wire::sign(r.body(), &enroll_key());
        let mut cases: Vec<(Response, &str)> = Vec::new();
        let mut r = response();
        r.peers[1].wg_key = r.peers[0].wg_key;
        cases.push((r, "listed twice"));
        let mut r = response();
        r.peers[1].address = r.peers[0].address;
        cases.push((r, "listed twice"));
        let mut r = response();
        r.peers[1].node = "client3".into();
        cases.push((r, "the asking node itself"));
        let mut r = response();
        r.peers[0].address = "10.135.0.1".parse().unwrap();
        cases.push((r, "outside pool"));
        let mut r = response();
        r.peers[0].endpoints = vec!["10.134.0.9:51820".parse().unwrap()];
        cases.push((r, "inside the VPN address pool"));
        let mut r = response();
        r.peers[0].endpoints = vec!["[::ffff:10.134.0.9]:51820".parse().unwrap()];
        cases.push((r, "inside the VPN address pool"));
        let mut r = response();
        r.fallback = 1;
        cases.push((r, "at least twice the keepalive"));
        let mut r = response();
        r.refresh = 0;
        cases.push((r, "refresh 0"));
        let mut r = response();
        r.peers[0].node = "..".into();
        cases.push((r, "node id"));
        for (r, want) in cases {
            let err = Response::verify(&signed(&r), &key, &[5; 32])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{r:?}: {err}");
            // The signer refuses it with the very error the verifier gives: nothing signed.
            assert_eq!(r.sign(&enroll_key()).unwrap_err().to_string(), err);
        }
        let text = String::from_utf8(response().body().into_bytes()).unwrap();
        for (from, to, want) in [
            ("refresh 30", "refresh 030", "refresh is not a number"),
            ("keepalive 1", "keepalive 4294967296", "too large"),
            ("\nend\n", "\nend\nextra\n", "data after `end`"),
            (
                "192.168.77.12:51820\n",
                "192.168.77.12:51820 \n",
                "bad endpoint",
            ),
            ("pool 10.134.0.0/16", "pool 10.134.0.1/16", "no host bits"),
        ] {
            let body = text.replacen(from, to, 1);
            let enc = wire::sign(body.clone(), &enroll_key());
            let err = Response::verify(&enc, &key, &[5; 32])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{body:?}: {err}");
        }
    }

    #[test]
    fn a_full_list_fits_and_one_more_peer_is_refused() {
        let mut r = response();
        r.pool = "10.0.0.0/8".parse().unwrap();
        r.peers = (0..MAX_PEERS as u32)
            .map(|i| Peer {
                node: format!("client{}", i + 10),
                address: Ipv4Addr::from(0x0a00_0000 + 10 + i),
                wg_key: WgKey(hmac_sha256::Hash::hash(&i.to_le_bytes())),
                endpoints: (1..=MAX_ENDPOINTS as u16)
                    .map(|p| SocketAddr::new(Ipv4Addr::new(192, 168, 200, 200).into(), 50000 + p))
                    .collect(),
            })
            .collect();
        let enc = r.sign(&enroll_key()).unwrap();
        assert!(enc.len() <= MAX_RESPONSE, "{} bytes", enc.len());
        let key = EnrollKey(*enroll_key().pk);
        assert_eq!(
            Response::verify(&enc, &key, &[5; 32]).unwrap().peers.len(),
            MAX_PEERS
        );
        let mut body = r.body();
        body.insert_str(
            body.len() - "end\n".len(),
            &format!("peer client1 10.0.0.1 {}\n", WgKey([0xee; 32])),
        );
        let err = Response::verify(&wire::sign(body, &enroll_key()), &key, &[5; 32]).unwrap_err();
        assert!(err.to_string().contains("more than 4096 peers"), "{err}");
    }

    /// The longest list the rules allow: every id, address, endpoint and timing at its longest
    /// text. It fits `MAX_RESPONSE`, which is no more than 1 KiB above it.
    #[test]
    fn the_worst_case_list_fits_max_response() {
        let longest_ep = |k: usize| -> SocketAddr {
            format!("[2fff:ffff:ffff:ffff:ffff:ffff:ffff:fff{k}]:65535")
                .parse()
                .unwrap()
        };
        assert_eq!(longest_ep(0).to_string().len(), 47);
        let r = Response {
            request: [0xff; 32],
            project: "p".repeat(64),
            node: "n".repeat(64),
            pool: "100.64.0.0/10".parse().unwrap(),
            refresh: 86_400,
            keepalive: 3600,
            fallback: 86_400,
            peers: (0..MAX_PEERS)
                .map(|i| Peer {
                    node: format!("c{i:063}"),
                    address: Ipv4Addr::new(100, 100 + (i / 156) as u8, 100 + (i % 156) as u8, 200),
                    wg_key: WgKey(hmac_sha256::Hash::hash(&i.to_le_bytes())),
                    endpoints: (0..MAX_ENDPOINTS).map(longest_ep).collect(),
                })
                .collect(),
        };
        assert!(r.peers.iter().all(|p| p.address.to_string().len() == 15));
        assert_eq!(r.pool.to_string().len(), 13);
        let enc = r.sign(&enroll_key()).unwrap();
        println!(
            "worst-case list: {} bytes, MAX_RESPONSE {MAX_RESPONSE}",
            enc.len()
        );
        // The pool at its longest spelling ("255.255.255.255/32") is 5 more bytes.
        assert!(enc.len() + 5 <= MAX_RESPONSE, "{} bytes", enc.len());
        assert!(MAX_RESPONSE - enc.len() <= 1 << 10, "{} bytes", enc.len());
        let key = EnrollKey(*enroll_key().pk);
        assert_eq!(Response::verify(&enc, &key, &[0xff; 32]).unwrap(), r);
        let mut scoped = r.clone();
        scoped.peers[0].endpoints[0] = "[2fff::1%4294967295]:65535".parse().unwrap();
        let err = scoped.sign(&enroll_key()).unwrap_err().to_string();
        assert!(err.contains("an interface scope id"), "{err}");
    }

    #[test]
    fn keys_and_networks_have_one_spelling() {
        let k = WgKey([0xfb; 32]);
        assert_eq!(k.to_string().len(), 44);
        assert_eq!(k.to_string().parse::<WgKey>().unwrap(), k);
        for bad in [
            "",
            "AAAA",
            &"A".repeat(44),
            &format!("{k} "),
            &k.to_string()[..43],
        ] {
            assert!(bad.parse::<WgKey>().is_err(), "{bad:?}");
        }
        let n: Net4 = "10.134.0.0/16".parse().unwrap();
        assert!(n.contains("10.134.255.1".parse().unwrap()));
        assert!(!n.contains("10.135.0.1".parse().unwrap()));
        assert!("0.0.0.0/0"
            .parse::<Net4>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        for bad in [
            "10.134.0.0",
            "10.134.0.0/33",
            "10.134.0.1/16",
            "10.134.0.0/016",
            "x/8",
        ] {
            assert!(bad.parse::<Net4>().is_err(), "{bad:?}");
        }
    }
}
