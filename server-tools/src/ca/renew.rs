//! The renewal service behind `POST /renew` (mounted by `idhal serve` beside enrollment and
//! peers, sharing their connections and CA cache): an enrolled node asks for a new certificate
//! in a request signed with its enrollment key and gets an enrollment answer (same id, key and
//! address; a new serial) signed with the project's enrollment key (docs/enrollment.md,
//! "Renewal").
//!
//! Checks run in one fixed order, each with its own refusal: parse, node known, signature with
//! the key stored at enrollment, revoked, certificate expired (a node switched off past its
//! validity enrolls again), clock (those five shared with `POST /peers`: `node_request.rs`);
//! then one transaction that checks revocation and expiry
//! again and either signs or, within `[ca] renew_min_interval` of the last certificate, hands
//! that one out again.

use crate::ca::db::DbError;
use crate::ca::enroll::{Enroller, PoolFailure};
use crate::ca::node_request::{Admitted, Gate, Verify};
use crate::ca::pki::{Leaf, NodePublicKey, Role};
use crate::ca::state::{NodeCert, Renewal, Renewed};
use crate::config::CaSection;
use crate::openvpn::config::client_config;
use idhal_manifest::enroll::Response;
use idhal_manifest::renew::{RenewError, Request};
use idhal_manifest::time::rfc3339;
use std::sync::Arc;

/// Why a renewal was refused. `status` and the Display text are what the node sees (one line);
/// the one mapping to HTTP is here and in docs/enrollment.md.
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
    #[error("certificate of node {node} expired at {}: enroll it again with a new token", rfc3339(*at))]
    Expired { node: String, at: u64 },
    #[error("request time is {0} s away from the server's clock (more than the allowed skew): fix the node's clock")]
    ClockSkew(i64),
    #[error("internal error")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) => 400,
            Refusal::BadSignature(_) => 401,
            Refusal::UnknownNode(_) => 403,
            Refusal::Revoked(_) | Refusal::Expired { .. } => 410,
            Refusal::ClockSkew(_) => 422,
            Refusal::Internal(_) => 500,
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

/// What one renewal gave: the signed answer, and what the log line names.
#[derive(Debug)]
pub struct Answered {
    pub response: Vec<u8>,
    pub node: String,
    pub project: String,
    pub serial: u64,
    pub not_after: u64,
    /// False when the current certificate was handed out again (within the minimum interval).
    pub fresh: bool,
}

pub struct Renewer {
    enroller: Arc<Enroller>,
}

impl Renewer {
    /// Borrows `enroller`'s connections, CA cache and configuration.
    pub fn new(enroller: Arc<Enroller>) -> Self {
        Self { enroller }
    }

    /// Handles one encoded request at time `now`.
    pub fn renew(&self, body: &[u8], now: u64) -> Result<Answered, Refusal> {
        let signed = Request::parse(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let node = signed.request.node.as_str();
        let Admitted { row, key } =
            self.enroller
                .admit_node(node, signed.request.time, now, |key| {
                    signed.verify(key).map_err(|e| match e {
                        RenewError::RequestSignature => Verify::Signature,
                        other => Verify::Malformed(other.to_string()),
                    })
                })?;
        let key = NodePublicKey(key);
        // An expired certificate is revoked by the clock: a node off for longer than its
        // validity enrolls again, with a token an admin gives it.
        let expired = |at: u64| Refusal::Expired {
            node: node.to_owned(),
            at,
        };
        let cfg = self.enroller.config();

        let ca = self.enroller.ca(&row.project).map_err(|e| match e {
            crate::ca::enroll::Refusal::Internal(d) => Refusal::Internal(d),
            other => internal(other),
        })?;
        let validity = CaSection::secs(&cfg.ca.node_cert_validity);
        let renewal = Renewal {
            node,
            now,
            not_after: now + validity,
            min_interval: CaSection::secs(&cfg.ca.renew_min_interval),
        };
        let outcome = self.enroller.with_writer(|db| {
            db.renew(&renewal, &mut |serial| {
                Ok(ca.issue(
                    &Leaf {
                        role: Role::Node,
                        cn: node,
                        serial,
                        // As at enrollment: five minutes of slack for a node clock behind ours.
                        not_before: now.saturating_sub(300),
                        not_after: renewal.not_after,
                    },
                    &key,
                )?)
            })
            .map_err(|e| match e {
                crate::ca::ProjectError::Db(d) => Refusal::from(d),
                other => internal(other),
            })
        })?;
        let (cert, fresh) = match outcome {
            Renewed::Issued(c) => (c, true),
            Renewed::Current(c) => (c, false),
            Renewed::NoNode => return Err(Refusal::UnknownNode(node.to_owned())),
            Renewed::Revoked => return Err(Refusal::Revoked(node.to_owned())),
            Renewed::Expired(at) => return Err(expired(at)),
        };
        let NodeCert {
            project,
            address,
            serial,
            not_after,
            pem,
            ..
        } = cert;
        if project != ca.project {
            return Err(internal(format!(
                "node {node} moved from project {} to {project} during its renewal",
                ca.project
            )));
        }
        let response = Response {
            request: signed.digest,
            project: project.clone(),
            node: node.to_owned(),
            address: address
                .parse()
                .map_err(|_| internal(format!("stored address {address:?} of node {node}")))?,
            certificate: pem,
            ca: ca.cert_pem.clone(),
            openvpn: client_config(&project, node, &cfg.openvpn_for(&project)),
        }
        .sign(&ca.enroll);
        Ok(Answered {
            response,
            node: node.to_owned(),
            project,
            serial,
            not_after,
            fresh,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::pki::ProjectCa;
    use idhal_manifest::der;

    /// The agent reads the validity the project CA writes, both time forms (UTCTime before
    /// 2050, GeneralizedTime after), to the second.
    #[test]
    fn the_agent_reads_the_validity_the_ca_writes() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProjectCa::create(dir.path(), "p", 1_800_000_000).unwrap();
        let key = NodePublicKey([9; 32]);
        for (not_before, not_after) in [
            (1_800_000_000 - 300, 1_800_000_000 + 30 * 86_400),
            (1_800_000_123, 2_524_607_999), // 2049-12-31T23:59:59Z
            (2_524_608_000, 4_107_542_400), // 2050 to 2100: GeneralizedTime
        ] {
            let pem = ca
                .issue(
                    &Leaf {
                        role: Role::Node,
                        cn: "client1",
                        serial: 7,
                        not_before,
                        not_after,
                    },
                    &key,
                )
                .unwrap();
            let cert = der::pem_decode("CERTIFICATE", &pem).unwrap();
            assert_eq!(der::cert_validity(&cert), Some((not_before, not_after)));
            // And it certifies the key it was made for, where the agent looks for it.
            let spki = der::ed25519_spki(&key.0);
            assert!(cert.windows(spki.len()).any(|w| w == spki));
        }
    }
}
