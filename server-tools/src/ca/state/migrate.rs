//! The state's schema, as hand-written migrations: one ordered table for both backends, each
//! step in SQLite's and in PostgreSQL's dialect, applied in its own transaction and recorded in
//! `meta.schema_version`. A database newer than this idhal is refused, never downgraded.

use super::{StateError, StateStore};

/// One schema step: the SQL that takes the schema from `version - 1` to `version`. The runner
/// records `version` in `meta` in the same transaction.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub sqlite: &'static str,
    pub postgres: &'static str,
}

/// Every step, oldest first. Append only: a released step is never edited.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: V1_SQLITE,
        postgres: V1_POSTGRES,
    },
    Migration {
        version: 2,
        sqlite: V2_SQLITE,
        postgres: V2_POSTGRES,
    },
    Migration {
        version: 3,
        sqlite: V3_SQLITE,
        postgres: V3_POSTGRES,
    },
];

/// The version this idhal reads and writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// The projects, tokens, certificates and nodes; counters live in rows (`meta.next_node`,
/// `projects.next_*`), bumped inside each transaction, so nothing is ever handed out twice nor
/// skipped.
const V1_SQLITE: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT;
CREATE TABLE projects (
    name TEXT PRIMARY KEY,
    created INTEGER NOT NULL,
    pool TEXT NOT NULL,
    next_host INTEGER NOT NULL,
    next_serial INTEGER NOT NULL,
    crl_number INTEGER NOT NULL,
    crl_next_update INTEGER NOT NULL
) STRICT;
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL REFERENCES projects(name),
    node_type TEXT NOT NULL,
    verifier BLOB NOT NULL,
    uses INTEGER NOT NULL,
    used INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE TABLE certs (
    project TEXT NOT NULL REFERENCES projects(name),
    serial INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('node', 'server')),
    subject TEXT NOT NULL,
    issued INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    revoked_at INTEGER,
    pem TEXT NOT NULL,
    PRIMARY KEY (project, serial)
) STRICT;
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    num INTEGER NOT NULL UNIQUE,
    project TEXT NOT NULL REFERENCES projects(name),
    node_type TEXT NOT NULL,
    address TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,
    cert_serial INTEGER NOT NULL,
    public_key BLOB NOT NULL UNIQUE,
    token TEXT NOT NULL REFERENCES tokens(id),
    revoked_at INTEGER,
    UNIQUE (project, address)
) STRICT;
INSERT INTO meta (key, value) VALUES ('next_node', 1);
";

/// V1 in PostgreSQL's dialect: BIGINT for every integer (idhal reads them as i64), BYTEA for
/// bytes.
const V1_POSTGRES: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL);
CREATE TABLE projects (
    name TEXT PRIMARY KEY,
    created BIGINT NOT NULL,
    pool TEXT NOT NULL,
    next_host BIGINT NOT NULL,
    next_serial BIGINT NOT NULL,
    crl_number BIGINT NOT NULL,
    crl_next_update BIGINT NOT NULL
);
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    project TEXT NOT NULL REFERENCES projects(name),
    node_type TEXT NOT NULL,
    verifier BYTEA NOT NULL,
    uses BIGINT NOT NULL,
    used BIGINT NOT NULL DEFAULT 0,
    created BIGINT NOT NULL,
    expires BIGINT NOT NULL,
    comment TEXT NOT NULL DEFAULT ''
);
CREATE TABLE certs (
    project TEXT NOT NULL REFERENCES projects(name),
    serial BIGINT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('node', 'server')),
    subject TEXT NOT NULL,
    issued BIGINT NOT NULL,
    not_after BIGINT NOT NULL,
    revoked_at BIGINT,
    pem TEXT NOT NULL,
    PRIMARY KEY (project, serial)
);
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    num BIGINT NOT NULL UNIQUE,
    project TEXT NOT NULL REFERENCES projects(name),
    node_type TEXT NOT NULL,
    address TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL,
    cert_serial BIGINT NOT NULL,
    public_key BYTEA NOT NULL UNIQUE,
    token TEXT NOT NULL REFERENCES tokens(id),
    revoked_at BIGINT,
    UNIQUE (project, address)
);
INSERT INTO meta (key, value) VALUES ('next_node', 1);
";

/// The newest CRL of each project, beside its number: every server publishes it to its own
/// crl.pem, so servers that do not share `--state-dir` need no copying. Empty until the first
/// re-signing after the upgrade (which an empty one makes due).
const V2_SQLITE: &str = "ALTER TABLE projects ADD COLUMN crl_pem TEXT NOT NULL DEFAULT '';";
const V2_POSTGRES: &str = "ALTER TABLE projects ADD COLUMN crl_pem TEXT NOT NULL DEFAULT '';";

/// Direct paths (docs/direct-paths.md): a node's WireGuard public key (32 bytes, unique over
/// every node: one key is one node's, even after a revocation), its candidate endpoints (the
/// canonical `ADDR:PORT` texts, space-separated, as `POST /peers` accepted them) and when it
/// last registered (server time). NULL key: never registered. A unique index, not a column
/// constraint: SQLite's ALTER TABLE cannot add one; both treat NULLs as distinct.
const V3_SQLITE: &str = "
ALTER TABLE nodes ADD COLUMN wg_key BLOB CHECK (wg_key IS NULL OR length(wg_key) = 32);
ALTER TABLE nodes ADD COLUMN wg_endpoints TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN wg_registered_at INTEGER;
CREATE UNIQUE INDEX nodes_wg_key ON nodes (wg_key);
";
const V3_POSTGRES: &str = "
ALTER TABLE nodes ADD COLUMN wg_key BYTEA CHECK (wg_key IS NULL OR length(wg_key) = 32);
ALTER TABLE nodes ADD COLUMN wg_endpoints TEXT NOT NULL DEFAULT '';
ALTER TABLE nodes ADD COLUMN wg_registered_at BIGINT;
CREATE UNIQUE INDEX nodes_wg_key ON nodes (wg_key);
";

/// Records `version` in `meta` (both dialects): the last statement of each step's transaction.
pub(crate) const SET_VERSION_SQLITE: &str =
    "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";
pub(crate) const SET_VERSION_POSTGRES: &str =
    "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
     ON CONFLICT (key) DO UPDATE SET value = excluded.value";

/// What `migrate` did: the version found and the version left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migrated {
    pub from: i64,
    pub to: i64,
}

/// Applies every step of `steps` the database lacks, each in its own transaction (a failed step
/// leaves the earlier ones committed). A database newer than the last step is refused.
pub fn migrate(store: &mut dyn StateStore, steps: &[Migration]) -> Result<Migrated, StateError> {
    let latest = steps.last().map_or(0, |m| m.version);
    let from = store.schema_version()?;
    if from > latest {
        return Err(StateError::Newer {
            db: store.describe(),
            found: from,
        });
    }
    for m in steps.iter().filter(|m| m.version > from) {
        store.apply_migration(m)?;
    }
    let to = store.schema_version()?;
    if to > latest {
        // Another, newer idhal migrated while this one ran.
        return Err(StateError::Newer {
            db: store.describe(),
            found: to,
        });
    }
    Ok(Migrated { from, to })
}

/// Refuses a database whose schema is not this idhal's (`Open::Existing`).
pub fn require_current(store: &mut dyn StateStore) -> Result<(), StateError> {
    let found = store.schema_version()?;
    let db = store.describe();
    match found {
        0 => Err(StateError::Empty(db)),
        f if f > SCHEMA_VERSION => Err(StateError::Newer { db, found }),
        f if f < SCHEMA_VERSION => Err(StateError::Older { db, found }),
        _ => Ok(()),
    }
}
