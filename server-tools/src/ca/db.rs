//! The server's state: one SQLite file (`STATE/idhal.sqlite`) holding projects, tokens, node ids,
//! addresses and certificate serials. Every multi-step change is one `BEGIN IMMEDIATE`
//! transaction, so concurrent enrollments (threads of `idhal serve`, or several processes) never
//! hand out an id, an address, a serial or a token use twice. WAL mode with `synchronous=FULL`:
//! a committed enrollment survives power loss.

use crate::ca::state::migrate::{migrate, require_current, MIGRATIONS};
use crate::config::ServerConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a connection waits for another one's lock (SQLite's busy handler, and the retries
/// that handler does not cover).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub const FILE: &str = "idhal.sqlite";
/// The state's error, named for this backend's callers.
pub use crate::ca::state::StateError as DbError;

/// One connection to the state database.
pub struct Db {
    pub conn: Connection,
    pub path: PathBuf,
}

/// Whether opening may create the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// `idhal ca init`: create the file and schema if missing.
    Create,
    /// Everything else: the database must exist, at this idhal's schema version.
    Existing,
    /// `idhal db migrate`: create the file if missing, check nothing (the caller migrates).
    Migrate,
}

impl Db {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(FILE)
    }

    pub fn exists(state_dir: &Path) -> bool {
        Self::path(state_dir).is_file()
    }

    pub fn open(state_dir: &Path, mode: Open) -> Result<Db, DbError> {
        let path = Self::path(state_dir);
        if mode == Open::Existing && !path.is_file() {
            return Err(DbError::Missing(state_dir.to_owned()));
        }
        let err = |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        if mode != Open::Existing {
            std::fs::create_dir_all(state_dir).map_err(|source| DbError::Io {
                path: state_dir.to_owned(),
                source,
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | if mode != Open::Existing {
                OpenFlags::SQLITE_OPEN_CREATE
            } else {
                OpenFlags::empty()
            };
        if mode != Open::Existing {
            // Token verifiers and the address plan: owner only, from creation on. SQLite gives
            // its -wal and -shm files the database file's mode.
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|source| DbError::Io {
                    path: path.clone(),
                    source,
                })?;
        }
        let conn = Connection::open_with_flags(&path, flags).map_err(err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
        // Processes creating the database at once each hold a shared lock while one turns it to
        // WAL: SQLite answers the others BUSY at once, without its busy handler (waiting could
        // deadlock). Retried here, within the same timeout.
        let until = Instant::now() + BUSY_TIMEOUT;
        loop {
            match conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;",
            ) {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && Instant::now() < until =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                done => break done.map_err(err)?,
            }
        }
        let mut db = Db { conn, path };
        // Hooks open the database on every connect: reading the version takes no write lock.
        match mode {
            Open::Create => migrate(&mut db, MIGRATIONS).map(|_| ())?,
            Open::Existing => require_current(&mut db)?,
            Open::Migrate => {}
        }
        Ok(db)
    }

    /// Runs `f` in one `BEGIN IMMEDIATE` transaction (the write lock taken up front, so two
    /// writers never deadlock upgrading), committed only when `f` succeeds. `f` gets the
    /// transaction and the mapping of rusqlite errors to this database's `DbError`.
    pub fn immediate<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction, &dyn Fn(rusqlite::Error) -> DbError) -> Result<T, E>,
    ) -> Result<T, E> {
        let path = self.path.clone();
        let err = move |source| DbError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let out = f(&tx, &err)?;
        tx.commit().map_err(&err)?;
        Ok(out)
    }

    /// Wraps a rusqlite error with this database's path.
    pub fn err(&self, source: rusqlite::Error) -> DbError {
        DbError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }
}

/// The enrolled node `id`, when there is a state database (see [`crate::ca::state::lookup_node`]).
pub fn lookup_node(
    cfg: &ServerConfig,
    state_dir: &Path,
    id: &str,
) -> Result<Option<NodeRow>, DbError> {
    crate::ca::state::lookup_node(cfg, state_dir, id)
}

/// Every project, when there is a state database.
pub fn lookup_projects(cfg: &ServerConfig, state_dir: &Path) -> Result<Vec<ProjectRow>, DbError> {
    crate::ca::state::lookup_projects(cfg, state_dir)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRow {
    pub name: String,
    pub created: u64,
    pub pool: String,
    pub next_host: u32,
    pub next_serial: u64,
    pub crl_number: u64,
    pub crl_next_update: u64,
}

impl ProjectRow {
    /// The columns `from_row` reads, in its order.
    pub(crate) const COLUMNS: &'static str =
        "name, created, pool, next_host, next_serial, crl_number, crl_next_update";

    pub(crate) fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Self> {
        Ok(ProjectRow {
            name: r.get(0)?,
            created: r.get::<_, i64>(1)? as u64,
            pool: r.get(2)?,
            next_host: r.get::<_, i64>(3)? as u32,
            next_serial: r.get::<_, i64>(4)? as u64,
            crl_number: r.get::<_, i64>(5)? as u64,
            crl_next_update: r.get::<_, i64>(6)? as u64,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub id: String,
    pub project: String,
    #[serde(rename = "type")]
    pub node_type: String,
    pub address: String,
    pub enrolled_at: u64,
    pub cert_serial: u64,
    pub revoked_at: Option<u64>,
    /// Its WireGuard public key as `wg pubkey` prints it, once it registered one (`POST
    /// /peers`).
    pub wg_key: Option<String>,
    /// When it last registered its key and endpoints (server time).
    pub wg_registered_at: Option<u64>,
}

/// A stored WireGuard key in `wg pubkey`'s spelling (the schema holds 32 bytes only).
pub(crate) fn wg_key_text(bytes: Vec<u8>) -> String {
    match <[u8; 32]>::try_from(bytes) {
        Ok(k) => idhal_manifest::peers::WgKey(k).to_string(),
        Err(b) => format!("(invalid: {} bytes)", b.len()),
    }
}

impl NodeRow {
    /// The columns `from_row` reads, in its order.
    pub(crate) const COLUMNS: &'static str =
        "id, project, node_type, address, enrolled_at, cert_serial, revoked_at, wg_key, \
         wg_registered_at";

    pub(crate) fn from_row(r: &rusqlite::Row) -> rusqlite::Result<Self> {
        Ok(NodeRow {
            id: r.get(0)?,
            project: r.get(1)?,
            node_type: r.get(2)?,
            address: r.get(3)?,
            enrolled_at: r.get::<_, i64>(4)? as u64,
            cert_serial: r.get::<_, i64>(5)? as u64,
            revoked_at: r.get::<_, Option<i64>>(6)?.map(|t| t as u64),
            wg_key: r.get::<_, Option<Vec<u8>>>(7)?.map(wg_key_text),
            wg_registered_at: r.get::<_, Option<i64>>(8)?.map(|t| t as u64),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_and_refuses_missing() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Db::open(dir.path(), Open::Existing),
            Err(DbError::Missing(_))
        ));
        Db::open(dir.path(), Open::Create).unwrap();
        let mut db = Db::open(dir.path(), Open::Existing).unwrap();
        use crate::ca::state::StateStore;
        assert!(db.projects().unwrap().is_empty());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Db::path(dir.path()))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "database readable by others: {mode:o}");
    }
}
