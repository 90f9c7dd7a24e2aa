//! Revocation: the node and its certificate marked revoked in one transaction (`mark_node`),
//! then the project's CRL re-signed and published (`cut_off`);
//! `openvpn::management::kill_everywhere` drops its live sessions. The connect hook refuses the
//! node from the database's mark even before OpenVPN re-reads the CRL.

use crate::ca::crl;
use crate::ca::db::NodeRow;
use crate::ca::pki::ProjectCa;
use crate::ca::state::StateStore;
use crate::ca::ProjectError;
use crate::config::ServerConfig;
use crate::names::NodeId;
use std::path::{Path, PathBuf};

/// What `mark_node` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    /// Revoked now.
    Now,
    /// Already revoked at this time (kept): the later steps run again.
    Already(u64),
}

/// Revokes enrolled node `id` in the database at `now` (its row as it was before).
pub fn mark_node(
    db: &mut dyn StateStore,
    id: &NodeId,
    now: u64,
) -> Result<(NodeRow, Marked), ProjectError> {
    let node = db
        .revoke(id.as_str(), now)?
        .ok_or_else(|| ProjectError::NoNode(id.to_string()))?;
    let marked = match node.revoked_at {
        Some(at) => Marked::Already(at),
        None => Marked::Now,
    };
    Ok((node, marked))
}

/// Where `cut_off` published the new CRL, and its nextUpdate.
pub struct CutOff {
    pub crl: PathBuf,
    pub crl_until: u64,
}

/// Re-signs `node`'s project CRL at once (OpenVPN's crl-verify reads it on the next handshake;
/// the other servers publish it from the database).
pub fn cut_off(
    db: &mut dyn StateStore,
    state_dir: &Path,
    cfg: &ServerConfig,
    node: &NodeRow,
    now: u64,
) -> Result<CutOff, ProjectError> {
    let ca = ProjectCa::load(state_dir, &node.project)?;
    let crl_until = crl::regenerate(db, &ca, cfg, now)?;
    Ok(CutOff {
        crl: ca.paths.crl(),
        crl_until,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::db::Open;
    use crate::ca::project::init;
    use crate::ca::state::{self, Claim, NewToken};
    use crate::names::{node_id, Ipv4Net};

    /// On SQLite, and on PostgreSQL (`[state] database`): the same commands, the same result.
    #[test]
    fn revoke_marks_once_then_cuts_off_on_sqlite() {
        revoke_marks_once_then_cuts_off(ServerConfig::default());
    }

    #[test]
    fn revoke_marks_once_then_cuts_off_on_postgresql() {
        let Some(pg) = idhal_test_support::pg::shared() else {
            return;
        };
        let mut cfg = ServerConfig::default();
        cfg.state.database = Some(pg.fresh_db());
        revoke_marks_once_then_cuts_off(cfg);
    }

    fn revoke_marks_once_then_cuts_off(cfg: ServerConfig) {
        let tmp = tempfile::tempdir().unwrap();
        let state = tmp.path();
        let t0 = 1_800_000_000;
        let created = init(
            state,
            &cfg,
            "p",
            Ipv4Net::parse("10.134.0.0/16").unwrap(),
            t0,
        )
        .unwrap();
        let mut db = state::open(&cfg, state, Open::Existing).unwrap();
        db.create_token(&NewToken {
            id: "t".into(),
            project: "p".into(),
            node_type: "vnode".into(),
            verifier: [0; 32],
            uses: 1,
            created: t0,
            expires: t0 + 60,
            comment: String::new(),
        })
        .unwrap();
        let claim = Claim {
            project: "p",
            token: "t",
            node_type: "vnode",
            public_key: &[1; 32],
            now: t0,
            not_after: 4_000_000_000,
        };
        let e = db.enroll(&claim, &mut |_| Ok(String::new())).unwrap();
        assert_eq!(e.node, "client1");
        let id = node_id("client1").unwrap();

        match mark_node(db.as_mut(), &node_id("client2").unwrap(), t0) {
            Err(ProjectError::NoNode(n)) => assert_eq!(n, "client2"),
            other => panic!("{:?}", other.err()),
        }
        let (row, marked) = mark_node(db.as_mut(), &id, t0 + 10).unwrap();
        assert_eq!((row.revoked_at, marked), (None, Marked::Now));
        // A second revocation keeps the first time.
        let (row, marked) = mark_node(db.as_mut(), &id, t0 + 20).unwrap();
        assert_eq!(
            (row.revoked_at, marked),
            (Some(t0 + 10), Marked::Already(t0 + 10))
        );
        let certs = db.export().unwrap().certs;
        let cert = certs.iter().find(|c| c.subject == "client1").unwrap();
        assert_eq!(cert.revoked_at, Some((t0 + 10) as i64));

        let before = db.project("p").unwrap().unwrap().crl_number;
        let cut = cut_off(db.as_mut(), state, &cfg, &row, t0 + 20).unwrap();
        assert_eq!(cut.crl, created.ca.paths.crl());
        assert_eq!(db.project("p").unwrap().unwrap().crl_number, before + 1);
        // Again: still fine, the CRL re-signed once more.
        cut_off(db.as_mut(), state, &cfg, &row, t0 + 30).unwrap();
        assert_eq!(db.project("p").unwrap().unwrap().crl_number, before + 2);
    }
}
