//! The server's state behind one interface, so that the rest of the CA never writes SQL: today
//! a SQLite file ([`sqlite`]), later PostgreSQL (issue 13). Each method is one transaction
//! unless its comment says "read"; errors are [`StateError`] (the database, its path, its
//! schema version).
//!
//! Every SQL statement of the CA is behind the trait: tokens, enrollment, projects, server
//! certificates, nodes, revocation and CRLs. Signing and file writes stay with the callers, as
//! callbacks the store runs inside its transaction, so "a certificate row exists" still means
//! "it was signed with this serial" and its files are written before the commit.

pub mod sqlite;

use crate::ca::db::SCHEMA_VERSION;
use crate::ca::db::{NodeRow, ProjectRow};
use crate::ca::enroll::Refusal;
use crate::ca::ProjectError;
use crate::names::Ipv4Net;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Why the state could not be read or changed: one line naming the database.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database {path} has schema version {found}; this idhal knows {SCHEMA_VERSION} (upgrade idhal)")]
    Version { path: PathBuf, found: i64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no state database in {0}: run `idhal ca init` first (or pass the right --state-dir)")]
    Missing(PathBuf),
}

/// Signs and publishes a CRL: its number, then every revoked certificate (serial, time).
pub type SignCrl<'a> = &'a mut dyn FnMut(u64, &[(u64, u64)]) -> Result<(), ProjectError>;

/// Signs a certificate with the serial given (returns its PEM).
pub type SignCert<'a> = &'a mut dyn FnMut(u64) -> Result<String, ProjectError>;
/// Writes a certificate's files (given its PEM) before the transaction commits.
pub type PublishCert<'a> = &'a mut dyn FnMut(&str) -> Result<(), ProjectError>;

/// One enrollment's request to the store: the token to claim, for a node of `node_type` with
/// `public_key`, whose certificate runs until `not_after`.
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub project: &'a str,
    pub token: &'a str,
    pub node_type: &'a str,
    pub public_key: &'a [u8],
    pub now: u64,
    pub not_after: u64,
}

/// What the store handed out to a new node: its id, address (in `pool`) and certificate serial.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub node: String,
    pub address: Ipv4Addr,
    pub serial: u64,
    pub pool: Ipv4Net,
}

/// The node enrolled: new (`fresh`), or the same key's earlier enrollment with the same token.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub node: String,
    pub address: Ipv4Addr,
    pub pem: String,
    pub fresh: bool,
}

/// Signs a new node's certificate (returns its PEM).
pub type SignNode<'a> = &'a mut dyn FnMut(&Allocation) -> Result<String, Refusal>;
/// Writes what the node needs on disk before the transaction commits.
pub type PublishNode<'a> = &'a mut dyn FnMut(&Allocation) -> Result<(), Refusal>;

/// A token to store: only its verifier, never its secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewToken {
    pub id: String,
    pub project: String,
    pub node_type: String,
    pub verifier: [u8; 32],
    pub uses: u32,
    pub created: u64,
    pub expires: u64,
    pub comment: String,
}

/// A stored token as listed (no verifier).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub project: String,
    pub node_type: String,
    pub uses: u32,
    pub used: u32,
    pub created: u64,
    pub expires: u64,
    pub comment: String,
}

/// What enrollment needs of a token before it checks the request's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub project: String,
    pub node_type: String,
    /// As stored; the caller checks that it is 32 bytes.
    pub verifier: Vec<u8>,
}

/// The state database, whatever holds it. Synchronous: callers are threads of `idhal serve`
/// and one-shot commands.
pub trait StateStore: Send {
    /// Stores a new token; refused if its id exists or its project does not.
    fn create_token(&mut self, token: &NewToken) -> Result<(), StateError>;
    /// Every token, oldest first (read).
    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StateError>;
    /// The token `id`, if any (read; the claim itself happens in the enrollment transaction).
    fn token_for_enroll(&mut self, id: &str) -> Result<Option<TokenInfo>, StateError>;
    /// The project `name`, if any (read).
    fn project(&mut self, name: &str) -> Result<Option<ProjectRow>, StateError>;
    /// Enrolls: the key's earlier enrollment with this token if any (refused with another token
    /// or when revoked); else claims one use of the token (refused when used up or expired),
    /// takes the next node number, address and serial, has `sign` make the certificate, records
    /// certificate and node, and calls `publish`. One transaction, committed only when all succeed.
    fn enroll(
        &mut self,
        claim: &Claim<'_>,
        sign: SignNode<'_>,
        publish: PublishNode<'_>,
    ) -> Result<Enrollment, Refusal>;
    /// Stores a new project `name` with `pool`, its counters at their start (host 2, serial 1,
    /// CRL 0); refused if it exists.
    fn insert_project(&mut self, name: &str, created: u64, pool: &str) -> Result<(), StateError>;
    /// Takes `project`'s next serial, has `sign` make the server certificate `subject` with it,
    /// records it, and has `publish` write its files; one transaction, committed only when all
    /// succeed (no certificate row without its files). Returns the serial.
    fn issue_server_cert(
        &mut self,
        project: &str,
        subject: &str,
        issued: u64,
        not_after: u64,
        sign: SignCert<'_>,
        publish: PublishCert<'_>,
    ) -> Result<u64, ProjectError>;
    /// Every project, by name (read).
    fn projects(&mut self) -> Result<Vec<ProjectRow>, StateError>;
    /// The enrolled node `id`, if any (read).
    fn node(&mut self, id: &str) -> Result<Option<NodeRow>, StateError>;
    /// Every enrolled node, of `project` or of all, in enrollment order (read).
    fn nodes(&mut self, project: Option<&str>) -> Result<Vec<NodeRow>, StateError>;
    /// Marks `node` and its certificate revoked at `now`; a node already revoked keeps its time.
    fn mark_revoked(&mut self, node: &NodeRow, now: u64) -> Result<(), StateError>;
    /// Takes `project`'s next CRL number, sets its nextUpdate to `next_update`, and calls `sign`
    /// with that number and every revoked certificate (serial, time) not expired at `now`, in
    /// serial order. One transaction: committed only when `sign` succeeds.
    fn resign_crl(
        &mut self,
        project: &str,
        now: u64,
        next_update: u64,
        sign: SignCrl<'_>,
    ) -> Result<(), ProjectError>;
}
