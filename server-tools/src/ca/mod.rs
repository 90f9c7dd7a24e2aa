//! The project CA and enrollment: keys and certificates (pki), the state database (db), the
//! enrollment protocol (enroll), CRLs (crl), tokens (tokens) and revocation (revoke); here the
//! project checks every command shares.

pub mod crl;
pub mod db;
pub mod enroll;
pub mod pki;
pub mod revoke;
pub mod tokens;

use crate::config::ServerConfig;
use crate::names::Ipv4Net;
use anyhow::Context as _;
use db::Db;

/// The project a command acts on: `--project`, else `[ca] project`; validated.
pub fn project_name(arg: Option<String>, cfg: &ServerConfig) -> anyhow::Result<String> {
    let p = arg.unwrap_or_else(|| cfg.ca.project.clone());
    anyhow::ensure!(
        idhal_manifest::ProjectName::try_from(p.as_str()).is_ok(),
        "project name {p:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
    );
    Ok(p)
}

/// A project's pool must lie inside `[names] pool`: the hooks refuse any other address, and
/// the name template is only one-to-one over that pool.
pub fn require_inside_names_pool(
    cfg: &ServerConfig,
    project: &str,
    pool: &Ipv4Net,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        cfg.names.pool.contains_net(pool),
        "project {project:?}'s pool {pool} is not inside [names] pool {}: the hooks would refuse its nodes; widen [names] pool (and its template) or pick a pool inside it",
        cfg.names.pool
    );
    Ok(())
}

/// Used by token/nodes/revoke: the project row, or a clear error.
pub fn require_project(db: &Db, project: &str) -> anyhow::Result<db::ProjectRow> {
    db.project(project)?
        .with_context(|| format!("no project {project:?}: run `idhal ca init --project {project}`"))
}
