//! The server's state behind one interface, so that the rest of the CA never writes SQL: a
//! SQLite file in `--state-dir` ([`sqlite`], the embedded default) or a PostgreSQL database
//! shared by several servers ([`postgres`], `[state] database`). [`open`] is the one place that
//! chooses. Each method is one transaction unless its comment says "read"; errors are
//! [`StateError`] (which database, and why, on one line).
//!
//! Every SQL statement of the CA is behind the trait: tokens, enrollment, projects, server
//! certificates, nodes, revocation and CRLs. Signing and file writes stay with the callers, as
//! callbacks the store runs inside its transaction, so "a certificate row exists" still means
//! "it was signed with this serial" and its files are written before the commit.

pub mod migrate;
pub mod postgres;
pub mod sqlite;
#[cfg(test)]
mod tests;

use crate::ca::db::{Db, NodeRow, Open, ProjectRow};
use crate::ca::enroll::Refusal;
use crate::ca::ProjectError;
use crate::config::ServerConfig;
pub use migrate::SCHEMA_VERSION;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Why the state could not be read or changed: one line naming the database (a path, or a
/// PostgreSQL URL without its password).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// PostgreSQL's own words (its error message, or why the connection failed).
    #[error("state database {url}: {reason}")]
    Postgres { url: String, reason: String },
    #[error("state database {db} has schema version {found}; this idhal knows {SCHEMA_VERSION} (upgrade idhal)")]
    Newer { db: String, found: i64 },
    #[error(
        "state database {0} has no idhal schema yet: run `idhal db migrate` (or `idhal ca init`)"
    )]
    Empty(String),
    #[error("state database {db} has schema version {found}, older than this idhal's {SCHEMA_VERSION}: run `idhal db migrate`")]
    Older { db: String, found: i64 },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no state database in {0}: run `idhal ca init` first (or pass the right --state-dir)")]
    Missing(PathBuf),
    #[error("state database {0} is not empty: `idhal db copy` only fills an empty database (nothing copied)")]
    NotEmpty(String),
    #[error("state database {db} has schema version {found}, the copy's source {source_version}: run `idhal db migrate` on the older one first (nothing copied)")]
    CopyVersion {
        db: String,
        found: i64,
        source_version: i64,
    },
    /// `[state] database` or `password_file` that cannot be used as given.
    #[error("[state] database {url}: {why}")]
    Config { url: String, why: String },
}

/// The state database of this configuration: `[state] database` on PostgreSQL, else the SQLite
/// file in `state_dir`. `Open::Create` (`idhal ca init`, `idhal db migrate`) creates what is
/// missing and applies pending migrations; `Open::Existing` refuses a missing SQLite file and a
/// schema older or newer than this idhal's.
pub fn open(
    cfg: &ServerConfig,
    state_dir: &Path,
    mode: Open,
) -> Result<Box<dyn StateStore>, StateError> {
    match &cfg.state.database {
        Some(url) => Ok(Box::new(postgres::PgStore::connect_within(
            url,
            cfg.state.password_file.as_deref(),
            postgres::Timeouts {
                connect: std::time::Duration::from_secs(cfg.state.connect_timeout_secs.max(1)),
                statement: std::time::Duration::from_millis(cfg.state.statement_timeout_ms),
            },
            mode,
        )?)),
        None => Ok(Box::new(Db::open(state_dir, mode)?)),
    }
}

/// Whether this configuration has a state database to open: always on PostgreSQL, on SQLite
/// when `state_dir` holds the file (hooks and `idhal serve` work without one).
pub fn configured(cfg: &ServerConfig, state_dir: &Path) -> bool {
    cfg.state.database.is_some() || Db::exists(state_dir)
}

/// Where the state is, for messages: the SQLite path, or the URL without its password.
pub fn describe(cfg: &ServerConfig, state_dir: &Path) -> String {
    match &cfg.state.database {
        Some(url) => postgres::redact(url),
        None => Db::path(state_dir).display().to_string(),
    }
}

/// The hooks' and reconcile's store, opened once per process and kept: a connect hook reads
/// the projects and then its node through the same connection. Dropped after an error, so the
/// next call reconnects.
static LOOKUP: Mutex<Option<(String, Box<dyn StateStore>)>> = Mutex::new(None);

fn with_lookup<T: Default>(
    cfg: &ServerConfig,
    state_dir: &Path,
    f: impl FnOnce(&mut dyn StateStore) -> Result<T, StateError>,
) -> Result<T, StateError> {
    if !configured(cfg, state_dir) {
        return Ok(T::default());
    }
    let key = describe(cfg, state_dir);
    let mut slot = LOOKUP.lock().unwrap_or_else(|p| p.into_inner());
    let mut store = match slot.take() {
        Some((k, store)) if k == key => store,
        _ => open(cfg, state_dir, Open::Existing)?,
    };
    let out = f(store.as_mut());
    if out.is_ok() {
        *slot = Some((key, store));
    }
    out
}

/// The enrolled node `id`, when there is a state database: hooks work without one (nodes
/// certified some other way), and then nothing is known about the node.
pub fn lookup_node(
    cfg: &ServerConfig,
    state_dir: &Path,
    id: &str,
) -> Result<Option<NodeRow>, StateError> {
    with_lookup(cfg, state_dir, |s| s.node(id))
}

/// Every project, when there is a state database (none: no projects, as for `lookup_node`).
pub fn lookup_projects(
    cfg: &ServerConfig,
    state_dir: &Path,
) -> Result<Vec<ProjectRow>, StateError> {
    with_lookup(cfg, state_dir, |s| s.projects())
}

/// When `resign_crl` signs: always (`ca init`, a revocation, `crl refresh --force`), or only
/// when less than `half of validity` is left, checked inside the transaction (several servers
/// re-signing at once: the first one does it, the others find it not due).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resign {
    Always,
    IfDue { validity: u64 },
}

/// Signs a CRL given its number and every revoked certificate (serial, time); returns its PEM,
/// which the store keeps with the number.
pub type SignCrl<'a> = &'a mut dyn FnMut(u64, &[(u64, u64)]) -> Result<String, ProjectError>;

/// Accepts or refuses a new project given every existing one.
pub type CheckProjects<'a> = &'a mut dyn FnMut(&[ProjectRow]) -> Result<(), ProjectError>;

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

/// What the store handed out to a new node for its certificate: its id and serial.
#[derive(Debug, Clone)]
pub struct Allocation {
    pub node: String,
    pub serial: u64,
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

/// Everything the state holds, rows as stored and counters verbatim: what `idhal db copy`
/// moves from one database to another.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub schema_version: i64,
    pub next_node: i64,
    pub projects: Vec<ProjectRow>,
    pub tokens: Vec<StoredToken>,
    pub certs: Vec<StoredCert>,
    pub nodes: Vec<StoredNode>,
}

/// A `tokens` row, verifier and use count included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub id: String,
    pub project: String,
    pub node_type: String,
    pub verifier: Vec<u8>,
    pub uses: i64,
    pub used: i64,
    pub created: i64,
    pub expires: i64,
    pub comment: String,
}

/// A `certs` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCert {
    pub project: String,
    pub serial: i64,
    pub kind: String,
    pub subject: String,
    pub issued: i64,
    pub not_after: i64,
    pub revoked_at: Option<i64>,
    pub pem: String,
}

/// A `nodes` row, its number, key and token included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredNode {
    pub id: String,
    pub num: i64,
    pub project: String,
    pub node_type: String,
    pub address: String,
    pub enrolled_at: i64,
    pub cert_serial: i64,
    pub public_key: Vec<u8>,
    pub token: String,
    pub revoked_at: Option<i64>,
    pub wg_key: Option<Vec<u8>>,
    pub wg_endpoints: String,
    pub wg_registered_at: Option<i64>,
    pub wg_request_time: Option<i64>,
}

/// A node's WireGuard registration (`POST /peers`, checked by the caller): its public key and
/// its candidate endpoints in their canonical text, space-separated.
#[derive(Debug, Clone, Copy)]
pub struct PeerRegistration<'a> {
    pub node: &'a str,
    pub wg_key: &'a [u8; 32],
    pub endpoints: &'a str,
    pub now: u64,
    /// The time the signed request carries (node time).
    pub request_time: u64,
}

/// What `register_peer` did, decided inside its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Registered {
    /// Stored (a key and endpoints registered before are replaced).
    Done,
    /// No node has that id.
    NoNode,
    /// The node is revoked: nothing stored.
    Revoked,
    /// Another node (named) holds that key: nothing stored.
    KeyHeldBy(String),
    /// The node registered with a later request time (`last`) already: this one is a replay,
    /// or its clock went back; nothing stored.
    Older { last: u64 },
}

/// The `not_after` of a `nodes` row's certificate, as an SQL expression both backends run (the
/// certificate is the row of `certs` with the node's project and `cert_serial`).
pub(crate) const CERT_NOT_AFTER: &str = "(SELECT c.not_after FROM certs c \
     WHERE c.project = nodes.project AND c.serial = nodes.cert_serial)";

/// A node as `POST /peers` checks it: its row, the Ed25519 key its certificate certifies, and
/// that certificate's `not_after` (`None`: no certificate row, which enrollment never leaves).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeKey {
    pub row: NodeRow,
    pub public_key: Vec<u8>,
    pub cert_not_after: Option<u64>,
}

/// One renewal's request to the store (`POST /renew`, checked by the caller): a new certificate
/// for `node`, valid until `not_after`, unless its current one was issued less than
/// `min_interval` seconds before `now`.
#[derive(Debug, Clone, Copy)]
pub struct Renewal<'a> {
    pub node: &'a str,
    pub now: u64,
    pub not_after: u64,
    pub min_interval: u64,
}

/// A node's certificate as a renewal hands it out, with what the answer carries besides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    pub project: String,
    pub address: String,
    pub serial: u64,
    pub issued: u64,
    pub not_after: u64,
    pub pem: String,
}

/// What `renew` did, decided inside its transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewed {
    /// A new certificate, now the node's current one.
    Issued(NodeCert),
    /// The current one, issued less than `min_interval` ago: nothing signed.
    Current(NodeCert),
    /// No node has that id.
    NoNode,
    /// The node is revoked: nothing signed.
    Revoked,
    /// Its current certificate expired at this time (or it has none: 0): it must enroll again.
    Expired(u64),
}

/// One row of a project's peer list, as stored (the caller parses and checks it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    pub node: String,
    pub address: String,
    pub wg_key: Vec<u8>,
    pub endpoints: String,
}

impl Snapshot {
    pub(crate) const TOKEN_COLUMNS: &'static str =
        "id, project, node_type, verifier, uses, used, created, expires, comment";
    pub(crate) const CERT_COLUMNS: &'static str =
        "project, serial, kind, subject, issued, not_after, revoked_at, pem";
    pub(crate) const NODE_COLUMNS: &'static str =
        "id, num, project, node_type, address, enrolled_at, cert_serial, public_key, token, revoked_at, \
         wg_key, wg_endpoints, wg_registered_at, wg_request_time";
}

/// The state database, whatever holds it. Synchronous: callers are threads of `idhal serve`
/// (never its async workers: the PostgreSQL client blocks) and one-shot commands.
pub trait StateStore: Send {
    /// Where it is, for messages: the SQLite path, or the URL without its password.
    fn describe(&self) -> String;
    /// The schema version stored (0: no schema yet) (read).
    fn schema_version(&mut self) -> Result<i64, StateError>;
    /// Applies `m` in one transaction unless the schema is at its version or beyond already
    /// (checked inside the transaction, under a lock, so two servers never apply it twice).
    /// Returns whether it applied it.
    fn apply_migration(&mut self, m: &migrate::Migration) -> Result<bool, StateError>;
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
    /// takes the next node number, address and serial, has `sign` make the certificate, and
    /// records certificate and node. One transaction, committed only when all succeed. Nothing
    /// goes to disk: OpenVPN's connect hook reads the address from here.
    fn enroll(&mut self, claim: &Claim<'_>, sign: SignNode<'_>) -> Result<Enrollment, Refusal>;
    /// Stores a new project `name` with `pool`, its counters at their start (host 2, serial 1,
    /// CRL 0), once `check` accepts the projects there are (read in the same transaction, one
    /// creation at a time: two overlapping pools created at once cannot both pass); refused if
    /// it exists.
    fn insert_project(
        &mut self,
        name: &str,
        created: u64,
        pool: &str,
        check: CheckProjects<'_>,
    ) -> Result<(), ProjectError>;
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
    /// Marks node `id` and every certificate it was ever given revoked at `now` (a renewed node's
    /// earlier certificates stay valid until they expire: the CRL must list them all), reading
    /// and marking in one transaction; a node already revoked keeps its time. Returns the row as
    /// it was before (`revoked_at` set: it was revoked already), or `None` for no such node.
    fn revoke(&mut self, id: &str, now: u64) -> Result<Option<NodeRow>, StateError>;
    /// The node `id`, the Ed25519 key its certificate certifies (what signs its `POST /peers`
    /// requests) and that certificate's `not_after`, if any (read).
    fn node_key(&mut self, id: &str) -> Result<Option<NodeKey>, StateError>;
    /// Renews node `r.node`'s certificate, in one transaction that reads the node (unknown,
    /// revoked, or its current certificate expired at `now`: nothing signed) and its current
    /// certificate: issued less than `min_interval` before `now`, that one is the answer;
    /// else takes the project's next serial, has `sign` make the certificate with it, records
    /// it and makes it the node's current one. Same node id, key and address; the earlier
    /// certificates stay valid until they expire.
    fn renew(&mut self, r: &Renewal<'_>, sign: SignCert<'_>) -> Result<Renewed, ProjectError>;
    /// Stores `reg`'s key and endpoints for its node, in one transaction that reads the node
    /// (unknown or revoked: nothing stored), its last request time (later than this one's:
    /// nothing stored) and the key's holder (another node: nothing stored); a registration of
    /// the node before is replaced whole.
    fn register_peer(&mut self, reg: &PeerRegistration<'_>) -> Result<Registered, StateError>;
    /// `project`'s peers as a node gets them: every node whose key was registered at or after
    /// `registered_since` (server time), in enrollment order, at most `limit`; left out: revoked
    /// nodes, nodes whose certificate expired at `now` (`not_after <= now`, as for the CRL), and
    /// `except` (the asker) (read).
    fn peers(
        &mut self,
        project: &str,
        except: &str,
        registered_since: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<PeerRow>, StateError>;
    /// Every row, read in one transaction (a consistent copy while servers run).
    fn export(&mut self) -> Result<Snapshot, StateError>;
    /// Writes every row of `snapshot` and its counters, in one transaction; refused unless
    /// this database is empty and at the snapshot's schema version.
    fn import(&mut self, snapshot: &Snapshot) -> Result<(), StateError>;
    /// Takes `project`'s next CRL number, sets its nextUpdate to `next_update`, calls `sign`
    /// with that number and every revoked certificate (serial, time) not expired at `now`, in
    /// serial order, and stores the PEM it returns as the project's newest CRL. One
    /// transaction, serialised with every other re-signing of the project: committed only when
    /// `sign` succeeds. Returns the number, or `None` when `when` found it not due (a project
    /// with no stored CRL yet is always due).
    fn resign_crl(
        &mut self,
        project: &str,
        now: u64,
        next_update: u64,
        when: Resign,
        sign: SignCrl<'_>,
    ) -> Result<Option<u64>, ProjectError>;
    /// `project`'s newest CRL: its number and PEM, or `None` if none is stored yet (read).
    fn newest_crl(&mut self, project: &str) -> Result<Option<(u64, String)>, StateError>;
}

impl Resign {
    /// Whether a CRL valid until `next_update` is to be re-signed at `now`.
    pub fn due(self, next_update: u64, now: u64) -> bool {
        match self {
            Resign::Always => true,
            Resign::IfDue { validity } => next_update.saturating_sub(now) < validity / 2,
        }
    }
}
