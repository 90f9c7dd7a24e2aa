//! The project CA and enrollment: keys and certificates (pki), the state database (db), creating
//! a project and its VPN servers (project), the enrollment protocol (enroll), certificate
//! renewal (renew), WireGuard peer registration (peers), CRLs (crl), tokens
//! (tokens) and revocation (revoke); here the project checks every command shares and their error.

pub mod crl;
pub mod db;
pub mod enroll;
pub mod node_request;
pub mod peers;
pub mod pki;
pub mod project;
pub mod renew;
pub mod revoke;
pub mod state;
pub mod tokens;

use crate::config::ServerConfig;
use crate::names::{Ipv4Net, NameError};
use crate::openvpn::config::RenderError;
use crate::publish::PublishError;
use db::DbError;
use pki::CaError;
use std::path::PathBuf;

/// How far a request's `time` is from the server's clock `now`, in seconds (positive: ahead),
/// saturated: a signed time near `u64::MAX` is far off, not an overflow. Enrollment, peers and
/// renewal compare it with `[ca] max_clock_skew_secs`.
pub fn clock_skew(time: u64, now: u64) -> i64 {
    let off = i64::try_from(time.abs_diff(now)).unwrap_or(i64::MAX);
    if time >= now {
        off
    } else {
        -off
    }
}

/// Why a project-level step (a check, `ca init`, `ca issue-server`, a CRL) failed or was
/// refused: one line for the admin, naming the project, pool, server or file.
#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    /// `--project` or `[ca] project` breaks the manifest crate's rule for project names.
    #[error(transparent)]
    BadName(#[from] idhal_manifest::IdError),
    #[error("project {project:?}'s pool {pool} is not inside [names] pool {names}: the hooks would refuse its nodes; widen [names] pool (and its template) or pick a pool inside it")]
    PoolOutsideNames {
        project: String,
        pool: Ipv4Net,
        names: Ipv4Net,
    },
    #[error("no project {0:?}: run `idhal ca init --project {0}`")]
    NoProject(String),
    #[error("no node {0} (see `idhal nodes`); nothing changed")]
    NoNode(String),
    #[error("project {project:?} already exists (its CA is in {dir}); nothing changed")]
    Exists { project: String, dir: PathBuf },
    #[error("pool {pool} overlaps project {other:?}'s pool {theirs}: give each project its own (--pool)")]
    PoolOverlap {
        pool: Ipv4Net,
        other: String,
        theirs: Ipv4Net,
    },
    #[error("{dir} holds a CA key but the database has no project {project:?} (an interrupted `ca init`?): move that directory away and run `idhal ca init` again")]
    OrphanKey { project: String, dir: PathBuf },
    #[error("{path} exists: server {name:?} already has a key (pick another name, or revoke and remove it)")]
    ServerKeyExists { path: PathBuf, name: String },
    #[error(
        "no server certificate {path}: run `idhal ca issue-server {name} --project {project}`"
    )]
    NoServerCert {
        path: PathBuf,
        name: String,
        project: String,
    },
    #[error(transparent)]
    Render(#[from] RenderError),
    #[error("publishing the CRL of project {project}")]
    PublishCrl {
        project: String,
        #[source]
        source: PublishError,
    },
    /// A server name, or a pool stored in the database, that does not parse.
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Write(#[from] PublishError),
}

/// The project a command acts on: `--project`, else `[ca] project`; validated.
pub fn project_name(arg: Option<String>, cfg: &ServerConfig) -> Result<String, ProjectError> {
    let p = arg.unwrap_or_else(|| cfg.ca.project.clone());
    idhal_manifest::ProjectName::try_from(p.as_str())?;
    Ok(p)
}

/// A project's pool must lie inside `[names] pool`: the hooks refuse any other address, and
/// the name template is only one-to-one over that pool.
pub fn require_inside_names_pool(
    cfg: &ServerConfig,
    project: &str,
    pool: &Ipv4Net,
) -> Result<(), ProjectError> {
    if !cfg.names.pool.contains_net(pool) {
        return Err(ProjectError::PoolOutsideNames {
            project: project.to_owned(),
            pool: *pool,
            names: cfg.names.pool,
        });
    }
    Ok(())
}

/// Used by token/nodes/revoke: the project row, or a clear error.
pub fn require_project(
    db: &mut dyn state::StateStore,
    project: &str,
) -> Result<db::ProjectRow, ProjectError> {
    db.project(project)?
        .ok_or_else(|| ProjectError::NoProject(project.to_owned()))
}

#[cfg(test)]
mod skew_tests {
    #[test]
    fn clock_skew_saturates() {
        use super::clock_skew;
        assert_eq!(clock_skew(110, 100), 10);
        assert_eq!(clock_skew(90, 100), -10);
        assert_eq!(clock_skew(u64::MAX, 100), i64::MAX);
        assert_eq!(clock_skew(0, u64::MAX), -i64::MAX);
        assert_eq!(clock_skew(u64::MAX, 0), i64::MAX);
    }
}
