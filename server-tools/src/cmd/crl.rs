//! `idhal crl refresh` and the one place a project's CRL is (re)signed: after a revocation, and
//! before its nextUpdate (by this command from a timer, and by `idhal serve` on its own), so an
//! expired CRL never locks every node out of OpenVPN's `crl-verify`.

use crate::ca::db::{Db, Open};
use crate::ca::pki::ProjectCa;
use crate::cmd::Global;
use crate::config::{CaSection, ServerConfig};
use crate::publish::write_atomic;
use anyhow::Context as _;
use idhal_manifest::time::{now, rfc3339};
use rusqlite::params;
use std::path::Path;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
#[command(
    about = "Re-sign the CRLs that are due (for a timer; `idhal serve` does it too)",
    long_about = "Re-signs each project's CRL (STATE/projects/P/crl.pem, OpenVPN's crl-verify \
        file) when less than half of [ca] crl_validity is left, or always with --force. A CRL \
        past its nextUpdate makes OpenVPN refuse every node, so run this from a timer (daily is \
        plenty with the default 30d validity) unless `idhal serve` runs on the same state.\n\n\
        Exit codes: 0 done; 1 error; 2 usage or config error.",
    after_help = "Example: idhal crl refresh --state-dir /var/lib/idhal-server"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Re-sign every project's CRL that is due.
    Refresh {
        /// Re-sign even if not due.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match ServerConfig::load_or_exit(global.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Command::Refresh { force } = args.command;
    let mut db = Db::open(&global.state_dir, Open::Existing)?;
    for (project, outcome) in refresh_due(&mut db, &global.state_dir, &cfg, now(), force)? {
        match outcome {
            Some(next) => println!("{project}: CRL re-signed, valid until {}", rfc3339(next)),
            None => println!("{project}: CRL not due"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

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
