//! The server's state behind one interface, so that the rest of the CA never writes SQL: today
//! a SQLite file ([`sqlite`]), later PostgreSQL (issue 13). Each method is one transaction
//! unless its comment says "read"; errors are [`StateError`] (the database, its path, its
//! schema version).
//!
//! Moved behind the trait so far: tokens (create, list, the enrollment lookup), the reads of
//! projects and nodes, new projects, server certificates, revocation marks and CRL re-signing. Still in the callers: the enrollment
//! transaction (issue 13, plan step 1, to finish).

pub mod sqlite;

pub use crate::ca::db::DbError as StateError;
use crate::ca::db::{NodeRow, ProjectRow};
use crate::ca::ProjectError;

/// Signs and publishes a CRL: its number, then every revoked certificate (serial, time).
pub type SignCrl<'a> = &'a mut dyn FnMut(u64, &[(u64, u64)]) -> Result<(), ProjectError>;

/// Signs a certificate with the serial given (returns its PEM).
pub type SignCert<'a> = &'a mut dyn FnMut(u64) -> Result<String, ProjectError>;
/// Writes a certificate's files (given its PEM) before the transaction commits.
pub type PublishCert<'a> = &'a mut dyn FnMut(&str) -> Result<(), ProjectError>;

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
