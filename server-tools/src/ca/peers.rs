//! The peers service behind `POST /peers` (mounted by `idhal serve` beside enrollment, sharing
//! its connections and CA cache): a node registers its WireGuard key and endpoints in a request
//! signed with its enrollment key, and gets its project's peer list signed with the project's
//! enrollment key (docs/direct-paths.md).
//!
//! Checks run in one fixed order, each with its own refusal: parse, node known, signature with
//! the key stored at enrollment, revoked, certificate expired, clock, endpoints outside the project's pool, then the
//! registration (one transaction that checks the revocation again, that no later request of
//! the node registered already, and the key's holder).

use crate::ca::db::DbError;
use crate::ca::enroll::{Enroller, PoolFailure};
use crate::ca::node_request::{Admitted, Gate, Verify};
use crate::ca::state::{PeerRegistration, PeerRow, Registered};
use idhal_manifest::enroll::KeyPair;
use idhal_manifest::id::NodeId;
use idhal_manifest::peers::{
    endpoint_problem, Net4, Peer, PeersError, Request, Response, WgKey, MAX_ENDPOINTS, MAX_PEERS,
    MAX_RESPONSE,
};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// Why a registration was refused. `status` and the Display text are what the node sees (one
/// line); the one mapping to HTTP is here and in docs/direct-paths.md.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unknown node {0}: enroll it first")]
    UnknownNode(String),
    #[error("the request is not signed by node {0}'s enrollment key")]
    BadSignature(String),
    #[error("node {0} was revoked")]
    Revoked(String),
    #[error("certificate of node {node} expired at {}", idhal_manifest::time::rfc3339(*at))]
    Expired { node: String, at: u64 },
    #[error("request time is {0} s away from the server's clock (more than the allowed skew): fix the node's clock")]
    ClockSkew(i64),
    #[error("endpoint {endpoint} is {why} {pool}: register addresses other nodes reach without the tunnel")]
    Endpoint {
        endpoint: SocketAddr,
        why: &'static str,
        pool: Net4,
    },
    #[error("this WireGuard key is registered by another node: make a new key pair (wg genkey)")]
    KeyInUse {
        /// Who holds it: for the server's log only.
        holder: String,
    },
    #[error("request time {time} is older than the node's last registration ({last}): a replayed request, or the node's clock went back")]
    Older { time: u64, last: u64 },
    #[error("project {project} has more than {MAX_PEERS} registered peers: a list cannot carry them all")]
    TooManyPeers { project: String },
    #[error("the peer list of project {project} would be {bytes} bytes, more than the {limit} a node reads: fewer nodes or endpoints per project")]
    ListTooLarge {
        project: String,
        bytes: usize,
        limit: usize,
    },
    #[error("internal error")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) | Refusal::Endpoint { .. } => 400,
            Refusal::BadSignature(_) => 401,
            Refusal::UnknownNode(_) => 403,
            Refusal::KeyInUse { .. } | Refusal::Older { .. } => 409,
            Refusal::Revoked(_) | Refusal::Expired { .. } => 410,
            Refusal::ClockSkew(_) => 422,
            Refusal::Internal(_) => 500,
            Refusal::TooManyPeers { .. } | Refusal::ListTooLarge { .. } => 503,
        }
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Self {
        Refusal::Internal(format!("{e:#}"))
    }
}

impl PoolFailure for Refusal {
    fn closes_connection(&self) -> bool {
        matches!(self, Refusal::Internal(_))
    }
}

impl From<Gate> for Refusal {
    fn from(g: Gate) -> Self {
        match g {
            Gate::Malformed(why) => Refusal::Malformed(why),
            Gate::UnknownNode(node) => Refusal::UnknownNode(node),
            Gate::BadSignature(node) => Refusal::BadSignature(node),
            Gate::Revoked(node) => Refusal::Revoked(node),
            Gate::Expired { node, at } => Refusal::Expired { node, at },
            Gate::ClockSkew(skew) => Refusal::ClockSkew(skew),
            Gate::Internal(why) => Refusal::Internal(why),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::Internal(e.to_string())
}

/// What one registration gave: the signed list, and what the log line names.
#[derive(Debug)]
pub struct Registration {
    pub response: Vec<u8>,
    pub node: String,
    pub project: String,
    pub wg_key: WgKey,
    pub endpoints: usize,
    pub peers: usize,
    /// Stored rows left out of the list, each with why (for the server's log: one line each).
    pub skipped: Vec<String>,
}

pub struct Peers {
    enroller: Arc<Enroller>,
}

impl Peers {
    /// Borrows `enroller`'s connections, CA cache and configuration.
    pub fn new(enroller: Arc<Enroller>) -> Self {
        Self { enroller }
    }

    /// Handles one encoded request at time `now`.
    pub fn register(&self, body: &[u8], now: u64) -> Result<Registration, Refusal> {
        let signed = Request::parse(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let req = &signed.request;
        // An expired certificate (revoked by the clock) gets no new key, and `peers` leaves it
        // out of every list.
        let Admitted { row, .. } = self.enroller.admit_node(&req.node, req.time, now, |key| {
            signed.verify(key).map_err(|e| match e {
                PeersError::RequestSignature => Verify::Signature,
                other => Verify::Malformed(other.to_string()),
            })
        })?;
        let cfg = self.enroller.config();
        let project = self
            .enroller
            .with_db(|db| Ok::<_, Refusal>(db.project(&row.project)?))?
            .ok_or_else(|| internal(format!("node {}'s project is missing", req.node)))?;
        let pool: Net4 = project
            .pool
            .parse()
            .map_err(|e| internal(format!("project {}'s pool: {e}", project.name)))?;
        for e in &req.endpoints {
            if let Some(why) = endpoint_problem(e, Some(&pool)) {
                return Err(Refusal::Endpoint {
                    endpoint: *e,
                    why,
                    pool,
                });
            }
        }
        let endpoints = req
            .endpoints
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        let registration = PeerRegistration {
            node: &req.node,
            wg_key: &req.wg_key.0,
            endpoints: &endpoints,
            now,
            request_time: req.time,
        };
        let rows = self.enroller.with_writer(|db| {
            match db.register_peer(&registration)? {
                Registered::Done => {}
                Registered::NoNode => return Err(Refusal::UnknownNode(req.node.clone())),
                Registered::Revoked => return Err(Refusal::Revoked(req.node.clone())),
                Registered::KeyHeldBy(holder) => return Err(Refusal::KeyInUse { holder }),
                Registered::Older { last } => {
                    return Err(Refusal::Older {
                        time: req.time,
                        last,
                    })
                }
            }
            // Read through the same connection right after the commit: the list holds this
            // node's own registration's effects (none: it is never listed) and every other
            // committed one.
            Ok(db.peers(
                &project.name,
                &req.node,
                cfg.peers.registered_since(now),
                now,
                MAX_PEERS + 1,
            )?)
        })?;
        if rows.len() > MAX_PEERS {
            return Err(Refusal::TooManyPeers {
                project: project.name.clone(),
            });
        }
        let (peers, skipped) = checked_peers(rows, &pool);
        let ca = self.enroller.ca(&project.name).map_err(|e| match e {
            crate::ca::enroll::Refusal::Internal(d) => Refusal::Internal(d),
            other => internal(other),
        })?;
        let response = Response {
            request: signed.digest,
            project: project.name.clone(),
            node: req.node.clone(),
            pool,
            refresh: cfg.peers.refresh_secs,
            keepalive: cfg.peers.keepalive_secs,
            fallback: cfg.peers.fallback_secs,
            peers,
        };
        let count = response.peers.len();
        let response = sign_list(&response, &ca.enroll, MAX_RESPONSE)?;
        Ok(Registration {
            response,
            skipped,
            node: req.node.clone(),
            project: project.name,
            wg_key: req.wg_key,
            endpoints: req.endpoints.len(),
            peers: count,
        })
    }
}

/// `list` signed, unless its encoding is over `limit` (the most a node reads: it would refuse
/// the list whole) or it breaks a rule of the format (the rows were checked: a bug).
fn sign_list(list: &Response, key: &KeyPair, limit: usize) -> Result<Vec<u8>, Refusal> {
    let signed = list.sign(key).map_err(|e| {
        internal(format!(
            "the peer list of project {} for {}: {e}",
            list.project, list.node
        ))
    })?;
    if signed.len() > limit {
        return Err(Refusal::ListTooLarge {
            project: list.project.clone(),
            bytes: signed.len(),
            limit,
        });
    }
    Ok(signed)
}

/// A stored row as the list carries it, checked by every rule the agent's verifier applies to a
/// peer (`Response::check`); a row that breaks one gives the reason, naming the node, and is
/// left out of the list: one bad row never costs every node its list (nor panics the server).
fn peer(r: PeerRow, pool: &Net4) -> Result<Peer, String> {
    let bad = |why: String| format!("stored peer {:?}: {why}", r.node);
    NodeId::try_from(r.node.as_str()).map_err(|e| bad(e.to_string()))?;
    let address = r
        .address
        .parse()
        .ok()
        .filter(|a| pool.contains(*a))
        .ok_or_else(|| bad(format!("address {:?} not in pool {pool}", r.address)))?;
    let wg_key = WgKey(
        r.wg_key
            .as_slice()
            .try_into()
            .map_err(|_| bad("key is not 32 bytes".into()))?,
    );
    let mut endpoints: Vec<SocketAddr> = Vec::new();
    for e in r.endpoints.split_ascii_whitespace() {
        let a = e
            .parse::<SocketAddr>()
            .ok()
            .filter(|a| a.to_string() == e)
            .ok_or_else(|| bad(format!("endpoint {e:?} is not ADDR:PORT")))?;
        if let Some(why) = endpoint_problem(&a, Some(pool)) {
            return Err(bad(format!("endpoint {e}: {why}")));
        }
        if endpoints.contains(&a) {
            return Err(bad(format!("endpoint {e} twice")));
        }
        if endpoints.len() == MAX_ENDPOINTS {
            return Err(bad(format!("more than {MAX_ENDPOINTS} endpoints")));
        }
        endpoints.push(a);
    }
    Ok(Peer {
        node: r.node,
        address,
        wg_key,
        endpoints,
    })
}

/// The rows a list can carry, in order, and why each other one was left out. Node ids are
/// unique in the table, addresses per project and keys over all nodes, but the list's rule is
/// checked here all the same: the first holder of an address or key stays.
fn checked_peers(rows: Vec<PeerRow>, pool: &Net4) -> (Vec<Peer>, Vec<String>) {
    let (mut peers, mut skipped) = (Vec::new(), Vec::new());
    let (mut nodes, mut addresses, mut keys) = (HashSet::new(), HashSet::new(), HashSet::new());
    for r in rows {
        match peer(r, pool) {
            Ok(p)
                if nodes.contains(&p.node)
                    || addresses.contains(&p.address)
                    || keys.contains(&p.wg_key) =>
            {
                skipped.push(format!(
                    "stored peer {:?}: its id, address or key is listed already",
                    p.node
                ))
            }
            Ok(p) => {
                nodes.insert(p.node.clone());
                addresses.insert(p.address);
                keys.insert(p.wg_key);
                peers.push(p);
            }
            Err(why) => skipped.push(why),
        }
    }
    (peers, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use idhal_manifest::enroll::Seed;

    fn list() -> Response {
        Response {
            request: [1; 32],
            project: "default".into(),
            node: "client3".into(),
            pool: "10.134.0.0/16".parse().unwrap(),
            refresh: 60,
            keepalive: 5,
            fallback: 15,
            peers: vec![Peer {
                node: "client4".into(),
                address: "10.134.0.4".parse().unwrap(),
                wg_key: WgKey([4; 32]),
                endpoints: vec!["[2001:db8::4]:51820".parse().unwrap()],
            }],
        }
    }

    #[test]
    fn a_list_over_the_limit_is_not_signed_and_is_503() {
        let key = KeyPair::from_seed(Seed::new([3; 32]));
        let len = sign_list(&list(), &key, MAX_RESPONSE).unwrap().len();
        assert_eq!(sign_list(&list(), &key, len).unwrap().len(), len);
        let r = sign_list(&list(), &key, len - 1).unwrap_err();
        assert_eq!(r.status(), 503);
        assert_eq!(
            r.to_string(),
            format!("the peer list of project default would be {len} bytes, more than the {} a node reads: fewer nodes or endpoints per project", len - 1)
        );
        // A list the format refuses is never signed: an internal error, not a panic.
        let mut bad = list();
        bad.peers[0].node = "client3".into();
        assert!(matches!(
            sign_list(&bad, &key, MAX_RESPONSE),
            Err(Refusal::Internal(d)) if d.contains("the asking node itself")
        ));
    }
}
