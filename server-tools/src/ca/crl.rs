//! The project's certificate revocation list: re-signed when due (`refresh_due`, for
//! `idhal crl refresh` and `idhal serve`'s timer) or at once on a revocation (`regenerate`).

use crate::ca::db::Db;
use crate::ca::pki::ProjectCa;
use crate::config::{CaSection, ServerConfig};
use crate::publish::write_atomic;
use anyhow::Context as _;
use rusqlite::params;
use std::path::Path;

/// Re-signs the CRL of every project that is due (or all with `force`). Returns each project
/// with the new nextUpdate, or `None` when it was not due.
pub fn refresh_due(
    db: &mut Db,
    state_dir: &Path,
    cfg: &ServerConfig,
    now: u64,
    force: bool,
) -> anyhow::Result<Vec<(String, Option<u64>)>> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    let mut out = Vec::new();
    for p in db.projects()? {
        let due = force || p.crl_next_update.saturating_sub(now) < validity / 2;
        let next = if due {
            let ca = ProjectCa::load(state_dir, &p.name)?;
            Some(regenerate(db, &ca, cfg, now)?)
        } else {
            None
        };
        out.push((p.name, next));
    }
    Ok(out)
}

/// Signs a new CRL for `ca`'s project (next CRL number, every revoked certificate not yet
/// expired) and publishes it atomically. Returns its nextUpdate.
pub fn regenerate(
    db: &mut Db,
    ca: &ProjectCa,
    cfg: &ServerConfig,
    now: u64,
) -> anyhow::Result<u64> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    db.immediate(|tx, err| {
        let number: i64 = tx
            .query_row(
                "UPDATE projects SET crl_number = crl_number + 1, crl_next_update = ?2
                 WHERE name = ?1 RETURNING crl_number",
                params![ca.project, (now + validity) as i64],
                |r| r.get(0),
            )
            .map_err(err)?;
        let mut stmt = tx
            .prepare(
                "SELECT serial, revoked_at FROM certs
                 WHERE project = ?1 AND revoked_at IS NOT NULL AND not_after > ?2 ORDER BY serial",
            )
            .map_err(err)?;
        let revoked = stmt
            .query_map(params![ca.project, now as i64], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })
            .map_err(err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(err)?;
        let pem = ca.crl(&revoked, number as u64, now, validity)?;
        // Published before the commit: if the commit fails, the next run signs a newer number.
        write_atomic(&ca.paths.crl(), pem.as_bytes(), 0o644)
            .with_context(|| format!("publishing the CRL of project {}", ca.project))?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(now + validity)
}
