//! The checks `POST /renew` and `POST /peers` both make on a request an enrolled node signed
//! with its enrollment key, in one fixed order, each with its own refusal: the node is known,
//! the signature is by the key stored at its enrollment, it is not revoked, its certificate has
//! not expired (`not_after <= now`, the CRL's rule: no certificate row at all is the same), and
//! the request's time is within `[ca] max_clock_skew_secs`. Each service maps a refusal onto
//! its own (same order, same HTTP status) and goes on with what passed.
use crate::ca::db::{DbError, NodeRow};
use crate::ca::enroll::{Enroller, PoolFailure};
use crate::ca::state::NodeKey;

/// Why the shared checks refused a node's request.
#[derive(Debug)]
pub enum Gate {
    Malformed(String),
    UnknownNode(String),
    BadSignature(String),
    Revoked(String),
    Expired { node: String, at: u64 },
    ClockSkew(i64),
    Internal(String),
}

impl From<DbError> for Gate {
    fn from(e: DbError) -> Self {
        Gate::Internal(format!("{e:#}"))
    }
}

impl PoolFailure for Gate {
    fn closes_connection(&self) -> bool {
        matches!(self, Gate::Internal(_))
    }
}

/// How a service's own signature check failed: not this node's key, or not a request at all.
pub enum Verify {
    Signature,
    Malformed(String),
}

/// A node whose request passed: its row and the enrollment key that signed it.
pub struct Admitted {
    pub row: NodeRow,
    pub key: [u8; 32],
}

impl Enroller {
    /// The shared checks on `node`'s request made at `time` (the node's clock), at `now`;
    /// `verify` checks the request's signature with the node's stored key.
    pub(crate) fn admit_node(
        &self,
        node: &str,
        time: u64,
        now: u64,
        verify: impl FnOnce(&[u8; 32]) -> Result<(), Verify>,
    ) -> Result<Admitted, Gate> {
        let NodeKey {
            row,
            public_key,
            cert_not_after,
        } = self
            .with_db(|db| Ok::<_, Gate>(db.node_key(node)?))?
            .ok_or_else(|| Gate::UnknownNode(node.to_owned()))?;
        let key: [u8; 32] = public_key
            .try_into()
            .map_err(|_| Gate::Internal(format!("stored key of node {node} is not 32 bytes")))?;
        verify(&key).map_err(|e| match e {
            Verify::Signature => Gate::BadSignature(node.to_owned()),
            Verify::Malformed(why) => Gate::Malformed(why),
        })?;
        if row.revoked_at.is_some() {
            return Err(Gate::Revoked(node.to_owned()));
        }
        match cert_not_after {
            Some(at) if at > now => {}
            at => {
                return Err(Gate::Expired {
                    node: node.to_owned(),
                    at: at.unwrap_or(0),
                })
            }
        }
        let skew = crate::ca::clock_skew(time, now);
        if skew.unsigned_abs() > self.config().ca.max_clock_skew_secs {
            return Err(Gate::ClockSkew(skew));
        }
        Ok(Admitted { row, key })
    }
}
