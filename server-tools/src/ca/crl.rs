//! The project's certificate revocation list: re-signed when due (`refresh_due`, for
//! `idhal crl refresh` and `idhal serve`'s timer) or at once on a revocation (`regenerate`).

use crate::ca::db::Open;
use crate::ca::pki::ProjectCa;
use crate::ca::state::{self, Resign, StateStore};
use crate::ca::ProjectError;
use crate::config::{CaSection, ServerConfig};
use crate::publish::write_atomic;
use idhal_manifest::time::{now, rfc3339};
use std::path::{Path, PathBuf};

/// Re-signs the CRL of every project that is due (or all with `force`). Returns each project
/// with the new nextUpdate, or `None` when it was not due.
pub fn refresh_due(
    db: &mut dyn StateStore,
    state_dir: &Path,
    cfg: &ServerConfig,
    now: u64,
    force: bool,
) -> Result<Vec<(String, Option<u64>)>, ProjectError> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    let when = if force {
        Resign::Always
    } else {
        Resign::IfDue { validity }
    };
    let mut out = Vec::new();
    for p in db.projects()? {
        // Looked at here to skip loading the CA, and again inside the store's transaction:
        // another server may have re-signed since.
        let next = if when.due(p.crl_next_update, now) {
            let ca = ProjectCa::load(state_dir, &p.name)?;
            resign(db, &ca, cfg, now, when)?
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
    db: &mut dyn StateStore,
    ca: &ProjectCa,
    cfg: &ServerConfig,
    now: u64,
) -> Result<u64, ProjectError> {
    Ok(resign(db, ca, cfg, now, Resign::Always)?.unwrap_or(now))
}

/// Signs a new CRL for `ca`'s project when `when` says so (checked inside the store's
/// transaction) and publishes it atomically. Returns its nextUpdate, or `None` if not due.
fn resign(
    db: &mut dyn StateStore,
    ca: &ProjectCa,
    cfg: &ServerConfig,
    now: u64,
    when: Resign,
) -> Result<Option<u64>, ProjectError> {
    let validity = CaSection::secs(&cfg.ca.crl_validity);
    let number = db.resign_crl(
        &ca.project,
        now,
        now + validity,
        when,
        &mut |number, revoked| {
            let pem = ca.crl(revoked, number, now, validity)?;
            // Published before the commit: if the commit fails, the next run signs a newer number.
            write_atomic(&ca.paths.crl(), pem.as_bytes(), 0o644).map_err(|source| {
                ProjectError::PublishCrl {
                    project: ca.project.clone(),
                    source,
                }
            })
        },
    )?;
    Ok(number.map(|_| now + validity))
}

/// Starts `idhal serve`'s background thread that re-signs due CRLs, checking every tenth of
/// their validity (at most hourly), so a server left running never lets a CRL expire. Each
/// re-signed CRL and each failure is one line on stderr.
pub fn spawn_refresher(state_dir: PathBuf, cfg: ServerConfig) -> std::io::Result<()> {
    let every = (CaSection::secs(&cfg.ca.crl_validity) / 10).clamp(1, 3600);
    std::thread::Builder::new()
        .name("crl-refresh".into())
        .spawn(move || loop {
            let result = state::open(&cfg, &state_dir, Open::Existing)
                .map_err(ProjectError::from)
                .and_then(|mut db| refresh_due(db.as_mut(), &state_dir, &cfg, now(), false));
            match result {
                Ok(done) => {
                    for (project, next) in done {
                        if let Some(next) = next {
                            eprintln!(
                                "idhal serve: CRL of project {project} re-signed, valid until {}",
                                rfc3339(next)
                            );
                        }
                    }
                }
                Err(e) => eprintln!(
                    "idhal serve: error: CRL refresh: {:#}",
                    anyhow::Error::new(e)
                ),
            }
            std::thread::sleep(std::time::Duration::from_secs(every));
        })?;
    Ok(())
}
