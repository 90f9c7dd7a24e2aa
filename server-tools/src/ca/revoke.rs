//! Revocation in the state database: the node and its certificate marked revoked in one
//! transaction (the CRL and the sessions follow: `ca::crl::regenerate`,
//! `openvpn::management::kill_everywhere`).

use crate::ca::db::{Db, DbError, NodeRow};
use rusqlite::params;

/// Marks `node` and its certificate revoked at `now`; a node already revoked keeps its time.
pub fn mark(db: &mut Db, node: &NodeRow, now: u64) -> Result<(), DbError> {
    db.immediate(|tx, err| {
        tx.execute(
            "UPDATE nodes SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
            params![node.id, now as i64],
        )
        .map_err(err)?;
        tx.execute(
            "UPDATE certs SET revoked_at = ?3 WHERE project = ?1 AND serial = ?2",
            params![node.project, node.cert_serial as i64, now as i64],
        )
        .map_err(err)?;
        Ok::<_, DbError>(())
    })
}
