//! [`StateStore`] on PostgreSQL (`[state] database`), shared by several `idhal serve`: the same
//! transactions as on SQLite, made safe under READ COMMITTED with row locks (`FOR UPDATE`, and
//! the `UPDATE … RETURNING` of counters, held until commit) and advisory locks where a check
//! reads other rows (CRL re-signing, migrations). No TLS: a Unix socket or loopback.
//!
//! The client is synchronous (it runs its own small runtime): call it from plain or blocking
//! threads, never from an async worker, where it panics.

use super::migrate::{migrate, require_current, Migration, MIGRATIONS, SET_VERSION_POSTGRES};
use super::{
    Allocation, CheckProjects, Claim, Enrollment, NewToken, NodeCert, NodeKey, PeerRegistration,
    PeerRow, PublishCert, Registered, Renewal, Renewed, Resign, SignCert, SignCrl, SignNode,
    Snapshot, StateError, StateStore, StoredCert, StoredNode, StoredToken, TokenInfo, TokenRecord,
    CERT_NOT_AFTER,
};
use crate::ca::db::{wg_key_text, NodeRow, Open, ProjectRow};
use crate::ca::enroll::{internal, Refusal};
use crate::ca::ProjectError;
use crate::names::Ipv4Net;
use postgres::error::SqlState;
use postgres::{Client, IsolationLevel, NoTls, Row};
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// How long connecting may take before the command (or enrollment) fails, when the config does
/// not say (`[state] connect_timeout_secs`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one statement may run, lock waits included, when the config does not say
/// (`[state] statement_timeout_ms`).
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest statement timeout set: below it, ordinary statements on a busy machine fail.
pub const MIN_STATEMENT_TIMEOUT: Duration = Duration::from_millis(100);

/// How long PostgreSQL may keep idhal waiting: to connect (answer included), and for each
/// statement (`SET statement_timeout` on every connection), so a frozen server or a lock
/// held elsewhere fails a hook or an enrollment in one line instead of hanging it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub statement: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: CONNECT_TIMEOUT,
            statement: STATEMENT_TIMEOUT,
        }
    }
}

/// Advisory lock taken by each migration step (two servers starting at once apply it once).
const MIGRATE_LOCK: i64 = 0x6964_6861_6c00_0001; // "idhal" 0 1
/// Advisory lock taken while a project is created (its pool checked against the others).
const PROJECTS_LOCK: i64 = 0x6964_6861_6c00_0002;
/// Advisory lock class of CRL re-signing; the project's name is hashed into the key.
const CRL_LOCK: &str = "idhal crl ";

/// One connection to the state on PostgreSQL.
pub struct PgStore {
    client: Client,
    /// The URL as configured, without a password: what messages show.
    url: String,
}

/// `url` without its password (`postgresql://u:SECRET@h/db` → `postgresql://u@h/db`,
/// `password=SECRET` dropped), for messages.
pub fn redact(url: &str) -> String {
    if let Some(rest) = url
        .strip_prefix("postgresql://")
        .map(|r| ("postgresql://", r))
        .or_else(|| url.strip_prefix("postgres://").map(|r| ("postgres://", r)))
    {
        let (scheme, rest) = rest;
        let (auth_end, _) = rest
            .char_indices()
            .find(|&(_, c)| c == '/' || c == '?')
            .unwrap_or((rest.len(), ' '));
        if let Some(at) = rest[..auth_end].rfind('@') {
            let user = rest[..at].split(':').next().unwrap_or("");
            return format!("{scheme}{user}{}", &rest[at..]);
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .filter(|kv| !kv.starts_with("password="))
        .collect::<Vec<_>>()
        .join(" ")
}

/// PostgreSQL's own words for `e`: the server's message, or why the connection failed.
fn reason(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        if db.code() == &SqlState::QUERY_CANCELED {
            return format!(
                "{} ([state] statement_timeout_ms): is the database stalled, or is a lock held elsewhere?",
                db.message()
            );
        }
        return db.message().to_owned();
    }
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

fn pg_err(url: &str) -> impl Fn(postgres::Error) -> StateError + '_ {
    move |e| StateError::Postgres {
        url: url.to_owned(),
        reason: reason(&e),
    }
}

/// A stable 64-bit key for an advisory lock (FNV-1a): the same on every server.
fn lock_key(class: &str, name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in class.bytes().chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

impl PgStore {
    /// Connects to `url` (its password from `password_file`, else `PGPASSWORD`), then applies
    /// pending migrations (`Open::Create`) or refuses a schema not this idhal's.
    pub fn connect(
        url: &str,
        password_file: Option<&Path>,
        mode: Open,
    ) -> Result<PgStore, StateError> {
        Self::connect_within(url, password_file, Timeouts::default(), mode)
    }

    /// `connect`, giving up after `timeouts.connect` (connection and PostgreSQL's answer),
    /// each statement then limited to `timeouts.statement`.
    pub fn connect_within(
        url: &str,
        password_file: Option<&Path>,
        timeouts: Timeouts,
        mode: Open,
    ) -> Result<PgStore, StateError> {
        let timeout = timeouts.connect;
        let shown = redact(url);
        let refuse = |why: &str| StateError::Config {
            url: shown.clone(),
            why: why.to_owned(),
        };
        if url.trim().is_empty() {
            return Err(refuse(
                "is empty: write postgresql://USER@HOST:PORT/DB, or remove it for SQLite in --state-dir",
            ));
        }
        let mut config = postgres::Config::from_str(url).map_err(|e| {
            refuse(&format!(
                "not a PostgreSQL connection string ({}): write postgresql://USER@HOST:PORT/DB",
                reason(&e)
            ))
        })?;
        if config.get_password().is_some() {
            return Err(refuse(
                "holds a password: put it in [state] password_file or PGPASSWORD instead",
            ));
        }
        if config.get_dbname().is_none() {
            return Err(refuse(
                "names no database: add it (postgresql://USER@HOST:PORT/DB, or dbname=DB)",
            ));
        }
        if config.get_user().is_none() {
            return Err(refuse(
                "names no user: add it (postgresql://USER@HOST:PORT/DB, or user=USER)",
            ));
        }
        if config.get_hosts().is_empty() {
            return Err(refuse(
                "names no host: add it (127.0.0.1:5432, or host=/var/run/postgresql)",
            ));
        }
        let password = match password_file {
            Some(path) => Some(read_password(path).map_err(|why| refuse(&why))?),
            None => std::env::var("PGPASSWORD").ok(),
        };
        if let Some(pw) = password {
            config.password(pw);
        }
        config.connect_timeout(timeout).application_name("idhal");
        // The client's own timeout covers the TCP connect only: a peer that accepts and never
        // answers would hold a hook (and OpenVPN behind it) for ever. Connect on a thread and
        // stop waiting at the deadline; that thread ends when the peer closes or the process
        // exits.
        let (sent, answer) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("pg-connect".into())
            .spawn(move || {
                let _ = sent.send(config.connect(NoTls));
            })
            .map_err(|e| refuse(&format!("cannot start a thread to connect: {e}")))?;
        let client = match answer.recv_timeout(timeout) {
            Ok(connected) => connected.map_err(pg_err(&shown))?,
            Err(_) => {
                return Err(StateError::Postgres {
                    url: shown,
                    reason: format!(
                        "no answer within {} s ([state] connect_timeout_secs): is PostgreSQL listening there?",
                        timeout.as_secs()
                    ),
                })
            }
        };
        let mut store = PgStore { client, url: shown };
        // PostgreSQL takes at most i32::MAX ms (24 days); 0 would mean "for ever".
        let statement = timeouts
            .statement
            .clamp(
                MIN_STATEMENT_TIMEOUT,
                Duration::from_millis(i32::MAX as u64),
            )
            .as_millis();
        store
            .client
            .batch_execute(&format!("SET statement_timeout = {statement}"))
            .map_err(pg_err(&store.url))?;
        match mode {
            Open::Create => migrate(&mut store, MIGRATIONS).map(|_| ())?,
            Open::Existing => require_current(&mut store)?,
            Open::Migrate => {}
        }
        Ok(store)
    }
}

/// The longest password file read (a password is a line, not a file of any size).
pub const MAX_PASSWORD_FILE: u64 = 4096;

/// The first line of `path`, bounded: why not, in words, when it is missing, empty, too big or
/// not text.
fn read_password(path: &Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PASSWORD_FILE + 1).read_to_end(&mut text))
        .map_err(|e| format!("password_file {shown}: {e}"))?;
    if text.len() as u64 > MAX_PASSWORD_FILE {
        return Err(format!(
            "password_file {shown} is larger than {MAX_PASSWORD_FILE} bytes: not a password file"
        ));
    }
    let text =
        String::from_utf8(text).map_err(|_| format!("password_file {shown} is not UTF-8 text"))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!(
            "password_file {shown} has an empty first line: write the password there"
        ));
    }
    Ok(line.to_owned())
}

fn project_row(r: &Row) -> ProjectRow {
    ProjectRow {
        name: r.get(0),
        created: r.get::<_, i64>(1) as u64,
        pool: r.get(2),
        next_host: r.get::<_, i64>(3) as u32,
        next_serial: r.get::<_, i64>(4) as u64,
        crl_number: r.get::<_, i64>(5) as u64,
        crl_next_update: r.get::<_, i64>(6) as u64,
    }
}

fn node_row(r: &Row) -> NodeRow {
    NodeRow {
        id: r.get(0),
        project: r.get(1),
        node_type: r.get(2),
        address: r.get(3),
        enrolled_at: r.get::<_, i64>(4) as u64,
        cert_serial: r.get::<_, i64>(5) as u64,
        revoked_at: r.get::<_, Option<i64>>(6).map(|t| t as u64),
        wg_key: r.get::<_, Option<Vec<u8>>>(7).map(wg_key_text),
        wg_registered_at: r.get::<_, Option<i64>>(8).map(|t| t as u64),
    }
}

/// The stored schema version through `q` (0 when there is no `meta` table yet).
fn version_in(q: &mut impl postgres::GenericClient) -> Result<i64, postgres::Error> {
    // Not to_regclass('meta'): it answers from the session's catalog cache, which still says
    // "no such table" after another server's migration committed while this one waited for
    // the lock. pg_tables is read with the statement's own snapshot.
    let has_meta: bool = q
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_tables
                            WHERE schemaname = current_schema() AND tablename = 'meta')",
            &[],
        )?
        .get(0);
    if !has_meta {
        return Ok(0);
    }
    Ok(
        q.query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])?
            .map_or(0, |r| r.get(0)),
    )
}

impl StateStore for PgStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn schema_version(&mut self) -> Result<i64, StateError> {
        version_in(&mut self.client).map_err(pg_err(&self.url))
    }

    fn apply_migration(&mut self, m: &Migration) -> Result<bool, StateError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .map_err(&err)?;
        if version_in(&mut tx).map_err(&err)? >= m.version {
            return Ok(false);
        }
        tx.batch_execute(m.postgres).map_err(&err)?;
        tx.execute(SET_VERSION_POSTGRES, &[&m.version])
            .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(true)
    }

    fn create_token(&mut self, t: &NewToken) -> Result<(), StateError> {
        self.client
            .execute(
                "INSERT INTO tokens (id, project, node_type, verifier, uses, created, expires,
                                     comment)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &t.id,
                    &t.project,
                    &t.node_type,
                    &&t.verifier[..],
                    &i64::from(t.uses),
                    &(t.created as i64),
                    &(t.expires as i64),
                    &t.comment,
                ],
            )
            .map_err(pg_err(&self.url))?;
        Ok(())
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StateError> {
        let rows = self
            .client
            .query(
                "SELECT id, project, node_type, uses, used, created, expires, comment FROM tokens
                 ORDER BY created, id",
                &[],
            )
            .map_err(pg_err(&self.url))?;
        Ok(rows
            .iter()
            .map(|r| TokenRecord {
                id: r.get(0),
                project: r.get(1),
                node_type: r.get(2),
                uses: r.get::<_, i64>(3) as u32,
                used: r.get::<_, i64>(4) as u32,
                created: r.get::<_, i64>(5) as u64,
                expires: r.get::<_, i64>(6) as u64,
                comment: r.get(7),
            })
            .collect())
    }

    fn token_for_enroll(&mut self, id: &str) -> Result<Option<TokenInfo>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT project, node_type, verifier FROM tokens WHERE id = $1",
                &[&id],
            )
            .map_err(pg_err(&self.url))?;
        Ok(row.map(|r| TokenInfo {
            project: r.get(0),
            node_type: r.get(1),
            verifier: r.get(2),
        }))
    }

    fn project(&mut self, name: &str) -> Result<Option<ProjectRow>, StateError> {
        let sql = format!(
            "SELECT {} FROM projects WHERE name = $1",
            ProjectRow::COLUMNS
        );
        let row = self
            .client
            .query_opt(&sql, &[&name])
            .map_err(pg_err(&self.url))?;
        Ok(row.as_ref().map(project_row))
    }

    fn insert_project(
        &mut self,
        name: &str,
        created: u64,
        pool: &str,
        check: CheckProjects<'_>,
    ) -> Result<(), ProjectError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // One creation at a time: the check reads rows another server may be inserting.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PROJECTS_LOCK])
            .map_err(&err)?;
        let sql = format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS);
        let others: Vec<_> = tx
            .query(&sql, &[])
            .map_err(&err)?
            .iter()
            .map(project_row)
            .collect();
        check(&others)?;
        tx.execute(
            "INSERT INTO projects (name, created, pool, next_host, next_serial, crl_number,
                                   crl_next_update)
             VALUES ($1, $2, $3, 2, 1, 0, 0)",
            &[&name, &(created as i64), &pool],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn issue_server_cert(
        &mut self,
        project: &str,
        subject: &str,
        issued: u64,
        not_after: u64,
        sign: SignCert<'_>,
        publish: PublishCert<'_>,
    ) -> Result<u64, ProjectError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        let serial: i64 = tx
            .query_one(
                "UPDATE projects SET next_serial = next_serial + 1 WHERE name = $1
                 RETURNING next_serial - 1",
                &[&project],
            )
            .map_err(&err)?
            .get(0);
        let pem = sign(serial as u64)?;
        tx.execute(
            "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
             VALUES ($1, $2, 'server', $3, $4, $5, $6)",
            &[
                &project,
                &serial,
                &subject,
                &(issued as i64),
                &(not_after as i64),
                &pem,
            ],
        )
        .map_err(&err)?;
        publish(&pem)?;
        tx.commit().map_err(&err)?;
        Ok(serial as u64)
    }

    fn enroll(&mut self, claim: &Claim<'_>, sign: SignNode<'_>) -> Result<Enrollment, Refusal> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // Locks are taken in one order (token, meta, project) by every enrollment: no deadlock.
        // The token's row first: requests with the same token queue here, so "same key, same
        // token: same node" holds under READ COMMITTED.
        if tx
            .query_opt(
                "SELECT id FROM tokens WHERE id = $1 FOR UPDATE",
                &[&claim.token],
            )
            .map_err(&err)?
            .is_none()
        {
            return Err(Refusal::UnknownToken);
        }
        let existing = tx
            .query_opt(
                "SELECT n.id, n.address, n.token, n.revoked_at, c.pem FROM nodes n
                 JOIN certs c ON c.project = n.project AND c.serial = n.cert_serial
                 WHERE n.public_key = $1",
                &[&claim.public_key],
            )
            .map_err(&err)?;
        if let Some(r) = existing {
            let (id, address, token, revoked, pem): (String, String, String, Option<i64>, String) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            if token != claim.token || revoked.is_some() {
                return Err(Refusal::KeyInUse);
            }
            return Ok(Enrollment {
                node: id,
                address: address.parse().map_err(internal)?,
                pem,
                fresh: false,
            });
        }
        let claimed = tx
            .execute(
                "UPDATE tokens SET used = used + 1 WHERE id = $1 AND used < uses AND expires > $2",
                &[&claim.token, &(claim.now as i64)],
            )
            .map_err(&err)?;
        if claimed != 1 {
            let expires: i64 = tx
                .query_one("SELECT expires FROM tokens WHERE id = $1", &[&claim.token])
                .map_err(&err)?
                .get(0);
            return Err(if expires as u64 <= claim.now {
                Refusal::Expired
            } else {
                Refusal::UsedUp
            });
        }
        // Counters in rows, locked until commit: never handed out twice, never skipped (a
        // sequence would leave gaps, that is lost addresses, on every rollback).
        let num: i64 = tx
            .query_one(
                "UPDATE meta SET value = value + 1 WHERE key = 'next_node' RETURNING value - 1",
                &[],
            )
            .map_err(&err)?
            .get(0);
        let r = tx
            .query_one(
                "UPDATE projects SET next_host = next_host + 1, next_serial = next_serial + 1
                 WHERE name = $1 RETURNING next_host - 1, next_serial - 1, pool",
                &[&claim.project],
            )
            .map_err(&err)?;
        let (host, serial, pool): (i64, i64, String) = (r.get(0), r.get(1), r.get(2));
        let pool = Ipv4Net::parse(&pool).map_err(internal)?;
        let address = u32::try_from(host)
            .ok()
            .and_then(|h| pool.host(h))
            .ok_or_else(|| Refusal::PoolExhausted(pool.to_string()))?;
        let allocation = Allocation {
            node: format!("client{num}"),
            serial: serial as u64,
        };
        let pem = sign(&allocation)?;
        let node = &allocation.node;
        tx.execute(
            "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
             VALUES ($1, $2, 'node', $3, $4, $5, $6)",
            &[
                &claim.project,
                &serial,
                node,
                &(claim.now as i64),
                &(claim.not_after as i64),
                &pem,
            ],
        )
        .map_err(&err)?;
        let inserted = tx.execute(
            "INSERT INTO nodes (id, num, project, node_type, address, enrolled_at, cert_serial,
                                public_key, token)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            &[
                node,
                &num,
                &claim.project,
                &claim.node_type,
                &address.to_string(),
                &(claim.now as i64),
                &serial,
                &claim.public_key,
                &claim.token,
            ],
        );
        match inserted {
            // The same key enrolled at the same moment with another token (which committed
            // first): as if it had been seen above.
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                return Err(Refusal::KeyInUse)
            }
            other => other.map_err(&err)?,
        };
        tx.commit().map_err(&err)?;
        Ok(Enrollment {
            node: allocation.node,
            address,
            pem,
            fresh: true,
        })
    }

    fn projects(&mut self) -> Result<Vec<ProjectRow>, StateError> {
        let sql = format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS);
        let rows = self.client.query(&sql, &[]).map_err(pg_err(&self.url))?;
        Ok(rows.iter().map(project_row).collect())
    }

    fn node(&mut self, id: &str) -> Result<Option<NodeRow>, StateError> {
        let sql = format!("SELECT {} FROM nodes WHERE id = $1", NodeRow::COLUMNS);
        let row = self
            .client
            .query_opt(&sql, &[&id])
            .map_err(pg_err(&self.url))?;
        Ok(row.as_ref().map(node_row))
    }

    fn nodes(&mut self, project: Option<&str>) -> Result<Vec<NodeRow>, StateError> {
        let sql = format!(
            "SELECT {} FROM nodes WHERE $1::text IS NULL OR project = $1 ORDER BY num",
            NodeRow::COLUMNS
        );
        let rows = self
            .client
            .query(&sql, &[&project])
            .map_err(pg_err(&self.url))?;
        Ok(rows.iter().map(node_row).collect())
    }

    fn revoke(&mut self, id: &str, now: u64) -> Result<Option<NodeRow>, StateError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        let sql = format!(
            "SELECT {} FROM nodes WHERE id = $1 FOR UPDATE",
            NodeRow::COLUMNS
        );
        let Some(node) = tx
            .query_opt(&sql, &[&id])
            .map_err(&err)?
            .as_ref()
            .map(node_row)
        else {
            return Ok(None);
        };
        if node.revoked_at.is_none() {
            tx.execute(
                "UPDATE nodes SET revoked_at = $2 WHERE id = $1",
                &[&node.id, &(now as i64)],
            )
            .map_err(&err)?;
        }
        // Every certificate of the node, not only the current one: a renewal leaves the
        // earlier ones valid until they expire. Also for a node revoked before (by an older
        // `idhal revoke` that marked only the current one). The node's row is locked: no
        // renewal adds one meanwhile.
        let at = node.revoked_at.unwrap_or(now) as i64;
        tx.execute(
            "UPDATE certs SET revoked_at = $3
             WHERE project = $1 AND kind = 'node' AND subject = $2 AND revoked_at IS NULL",
            &[&node.project, &node.id, &at],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Some(node))
    }

    fn node_key(&mut self, id: &str) -> Result<Option<NodeKey>, StateError> {
        let sql = format!(
            "SELECT {}, public_key, {CERT_NOT_AFTER} FROM nodes WHERE id = $1",
            NodeRow::COLUMNS
        );
        let row = self
            .client
            .query_opt(&sql, &[&id])
            .map_err(pg_err(&self.url))?;
        Ok(row.map(|r| NodeKey {
            row: node_row(&r),
            public_key: r.get(9),
            cert_not_after: r.get::<_, Option<i64>>(10).map(|t| t as u64),
        }))
    }

    fn renew(&mut self, r: &Renewal<'_>, sign: SignCert<'_>) -> Result<Renewed, ProjectError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // The node's row locked until commit, then the project's (for the serial): renewals of
        // one node queue here, so 20 at once sign once, and a revocation (which locks the same
        // row first) either waits for this one or is seen by it.
        let node = tx
            .query_opt(
                "SELECT project, address, revoked_at FROM nodes WHERE id = $1 FOR UPDATE",
                &[&r.node],
            )
            .map_err(&err)?;
        let (project, address): (String, String) = match node {
            None => return Ok(Renewed::NoNode),
            Some(row) if row.get::<_, Option<i64>>(2).is_some() => return Ok(Renewed::Revoked),
            Some(row) => (row.get(0), row.get(1)),
        };
        let current = tx
            .query_opt(
                "SELECT c.serial, c.issued, c.not_after, c.pem
                 FROM nodes n JOIN certs c ON c.project = n.project AND c.serial = n.cert_serial
                 WHERE n.id = $1",
                &[&r.node],
            )
            .map_err(&err)?
            .map(|row| NodeCert {
                project: project.clone(),
                address: address.clone(),
                serial: row.get::<_, i64>(0) as u64,
                issued: row.get::<_, i64>(1) as u64,
                not_after: row.get::<_, i64>(2) as u64,
                pem: row.get(3),
            });
        let current = match current {
            Some(c) if c.not_after > r.now => c,
            other => return Ok(Renewed::Expired(other.map_or(0, |c| c.not_after))),
        };
        if r.now.saturating_sub(current.issued) < r.min_interval {
            return Ok(Renewed::Current(current));
        }
        let serial: i64 = tx
            .query_one(
                "UPDATE projects SET next_serial = next_serial + 1 WHERE name = $1
                 RETURNING next_serial - 1",
                &[&project],
            )
            .map_err(&err)?
            .get(0);
        let pem = sign(serial as u64)?;
        tx.execute(
            "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
             VALUES ($1, $2, 'node', $3, $4, $5, $6)",
            &[
                &project,
                &serial,
                &r.node,
                &(r.now as i64),
                &(r.not_after as i64),
                &pem,
            ],
        )
        .map_err(&err)?;
        tx.execute(
            "UPDATE nodes SET cert_serial = $2 WHERE id = $1",
            &[&r.node, &serial],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Renewed::Issued(NodeCert {
            project,
            address,
            serial: serial as u64,
            issued: r.now,
            not_after: r.not_after,
            pem,
        }))
    }

    fn register_peer(&mut self, reg: &PeerRegistration<'_>) -> Result<Registered, StateError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // The node's row locked until commit: a revocation waits for this registration, or
        // this one sees it.
        let node: Option<(Option<i64>, Option<i64>)> = tx
            .query_opt(
                "SELECT revoked_at, wg_request_time FROM nodes WHERE id = $1 FOR UPDATE",
                &[&reg.node],
            )
            .map_err(&err)?
            .map(|r| (r.get(0), r.get(1)));
        match node {
            None => return Ok(Registered::NoNode),
            Some((Some(_), _)) => return Ok(Registered::Revoked),
            Some((None, Some(last))) if last as u64 > reg.request_time => {
                return Ok(Registered::Older { last: last as u64 })
            }
            Some(_) => {}
        }
        let key = &reg.wg_key[..];
        let holder = |tx: &mut postgres::Transaction| -> Result<Option<String>, StateError> {
            Ok(tx
                .query_opt(
                    "SELECT id FROM nodes WHERE wg_key = $1 AND id <> $2",
                    &[&key, &reg.node],
                )
                .map_err(&err)?
                .map(|r| r.get(0)))
        };
        if let Some(h) = holder(&mut tx)? {
            return Ok(Registered::KeyHeldBy(h));
        }
        let updated = tx.execute(
            "UPDATE nodes SET wg_key = $2, wg_endpoints = $3, wg_registered_at = $4,
                              wg_request_time = $5
             WHERE id = $1",
            &[
                &reg.node,
                &key,
                &reg.endpoints,
                &(reg.now as i64),
                &(reg.request_time as i64),
            ],
        );
        match updated {
            // Another node registered the same key at the same moment and committed first: the
            // unique index refused this one (the transaction is over; the holder is read anew).
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                drop(tx);
                let mut tx = self.client.transaction().map_err(&err)?;
                let h = holder(&mut tx)?.unwrap_or_else(|| "another node".into());
                return Ok(Registered::KeyHeldBy(h));
            }
            other => other.map_err(&err)?,
        };
        tx.commit().map_err(&err)?;
        Ok(Registered::Done)
    }

    fn peers(
        &mut self,
        project: &str,
        except: &str,
        registered_since: u64,
        now: u64,
        limit: usize,
    ) -> Result<Vec<PeerRow>, StateError> {
        let sql = format!(
            "SELECT id, address, wg_key, wg_endpoints FROM nodes
             WHERE project = $1 AND id <> $2 AND wg_key IS NOT NULL AND revoked_at IS NULL
                   AND wg_registered_at >= $4 AND {CERT_NOT_AFTER} > $5
             ORDER BY num LIMIT $3"
        );
        let big = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(
                &sql,
                &[
                    &project,
                    &except,
                    &big(limit as u64),
                    &big(registered_since),
                    &big(now),
                ],
            )
            .map_err(pg_err(&self.url))?;
        Ok(rows
            .iter()
            .map(|r| PeerRow {
                node: r.get(0),
                address: r.get(1),
                wg_key: r.get(2),
                endpoints: r.get(3),
            })
            .collect())
    }

    fn export(&mut self) -> Result<Snapshot, StateError> {
        let err = pg_err(&self.url);
        // REPEATABLE READ: every table read in one snapshot while servers keep writing.
        let mut tx = self
            .client
            .build_transaction()
            .isolation_level(IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(&err)?;
        let meta = |tx: &mut postgres::Transaction, key: &str| -> Result<i64, StateError> {
            Ok(tx
                .query_one("SELECT value FROM meta WHERE key = $1", &[&key])
                .map_err(&err)?
                .get(0))
        };
        let schema_version = meta(&mut tx, "schema_version")?;
        let next_node = meta(&mut tx, "next_node")?;
        let q = |tx: &mut postgres::Transaction, sql: String| tx.query(&sql, &[]).map_err(&err);
        let projects = q(
            &mut tx,
            format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS),
        )?
        .iter()
        .map(project_row)
        .collect();
        let tokens = q(
            &mut tx,
            format!("SELECT {} FROM tokens ORDER BY id", Snapshot::TOKEN_COLUMNS),
        )?
        .iter()
        .map(|r| StoredToken {
            id: r.get(0),
            project: r.get(1),
            node_type: r.get(2),
            verifier: r.get(3),
            uses: r.get(4),
            used: r.get(5),
            created: r.get(6),
            expires: r.get(7),
            comment: r.get(8),
        })
        .collect();
        let certs = q(
            &mut tx,
            format!(
                "SELECT {} FROM certs ORDER BY project, serial",
                Snapshot::CERT_COLUMNS
            ),
        )?
        .iter()
        .map(|r| StoredCert {
            project: r.get(0),
            serial: r.get(1),
            kind: r.get(2),
            subject: r.get(3),
            issued: r.get(4),
            not_after: r.get(5),
            revoked_at: r.get(6),
            pem: r.get(7),
        })
        .collect();
        let nodes = q(
            &mut tx,
            format!("SELECT {} FROM nodes ORDER BY num", Snapshot::NODE_COLUMNS),
        )?
        .iter()
        .map(|r| StoredNode {
            id: r.get(0),
            num: r.get(1),
            project: r.get(2),
            node_type: r.get(3),
            address: r.get(4),
            enrolled_at: r.get(5),
            cert_serial: r.get(6),
            public_key: r.get(7),
            token: r.get(8),
            revoked_at: r.get(9),
            wg_key: r.get(10),
            wg_endpoints: r.get(11),
            wg_registered_at: r.get(12),
            wg_request_time: r.get(13),
        })
        .collect();
        tx.commit().map_err(&err)?;
        Ok(Snapshot {
            schema_version,
            next_node,
            projects,
            tokens,
            certs,
            nodes,
        })
    }

    fn import(&mut self, snap: &Snapshot) -> Result<(), StateError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // Nobody else writes while this fills the tables (a server started too early waits).
        tx.batch_execute("LOCK TABLE meta, projects, tokens, certs, nodes IN EXCLUSIVE MODE")
            .map_err(&err)?;
        let version = version_in(&mut tx).map_err(&err)?;
        if version != snap.schema_version {
            return Err(StateError::CopyVersion {
                db: self.url.clone(),
                found: version,
                source_version: snap.schema_version,
            });
        }
        let rows: i64 = tx
            .query_one(
                "SELECT (SELECT count(*) FROM projects) + (SELECT count(*) FROM tokens)
                      + (SELECT count(*) FROM certs) + (SELECT count(*) FROM nodes)
                      + (SELECT value - 1 FROM meta WHERE key = 'next_node')",
                &[],
            )
            .map_err(&err)?
            .get(0);
        if rows != 0 {
            return Err(StateError::NotEmpty(self.url.clone()));
        }
        for p in &snap.projects {
            tx.execute(
                &format!(
                    "INSERT INTO projects ({}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    ProjectRow::COLUMNS
                ),
                &[
                    &p.name,
                    &(p.created as i64),
                    &p.pool,
                    &i64::from(p.next_host),
                    &(p.next_serial as i64),
                    &(p.crl_number as i64),
                    &(p.crl_next_update as i64),
                ],
            )
            .map_err(&err)?;
        }
        for t in &snap.tokens {
            tx.execute(
                &format!(
                    "INSERT INTO tokens ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                    Snapshot::TOKEN_COLUMNS
                ),
                &[
                    &t.id,
                    &t.project,
                    &t.node_type,
                    &t.verifier,
                    &t.uses,
                    &t.used,
                    &t.created,
                    &t.expires,
                    &t.comment,
                ],
            )
            .map_err(&err)?;
        }
        for c in &snap.certs {
            tx.execute(
                &format!(
                    "INSERT INTO certs ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                    Snapshot::CERT_COLUMNS
                ),
                &[
                    &c.project,
                    &c.serial,
                    &c.kind,
                    &c.subject,
                    &c.issued,
                    &c.not_after,
                    &c.revoked_at,
                    &c.pem,
                ],
            )
            .map_err(&err)?;
        }
        for n in &snap.nodes {
            tx.execute(
                &format!(
                    "INSERT INTO nodes ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                                                     $11, $12, $13, $14)",
                    Snapshot::NODE_COLUMNS
                ),
                &[
                    &n.id,
                    &n.num,
                    &n.project,
                    &n.node_type,
                    &n.address,
                    &n.enrolled_at,
                    &n.cert_serial,
                    &n.public_key,
                    &n.token,
                    &n.revoked_at,
                    &n.wg_key,
                    &n.wg_endpoints,
                    &n.wg_registered_at,
                    &n.wg_request_time,
                ],
            )
            .map_err(&err)?;
        }
        tx.execute(
            "UPDATE meta SET value = $1 WHERE key = 'next_node'",
            &[&snap.next_node],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(())
    }

    fn resign_crl(
        &mut self,
        project: &str,
        now: u64,
        next_update: u64,
        when: Resign,
        sign: SignCrl<'_>,
    ) -> Result<Option<u64>, ProjectError> {
        let err = pg_err(&self.url);
        let mut tx = self.client.transaction().map_err(&err)?;
        // One re-signing of this project at a time, across servers; "due?" is read under the
        // lock, so servers re-signing together sign once, and the numbers only grow.
        tx.execute(
            "SELECT pg_advisory_xact_lock($1)",
            &[&lock_key(CRL_LOCK, project)],
        )
        .map_err(&err)?;
        let r = tx
            .query_one(
                "SELECT crl_next_update, crl_pem = '' FROM projects WHERE name = $1",
                &[&project],
            )
            .map_err(&err)?;
        let (current, none_stored): (i64, bool) = (r.get(0), r.get(1));
        if !none_stored && !when.due(current as u64, now) {
            return Ok(None);
        }
        let number: i64 = tx
            .query_one(
                "UPDATE projects SET crl_number = crl_number + 1, crl_next_update = $2
                 WHERE name = $1 RETURNING crl_number",
                &[&project, &(next_update as i64)],
            )
            .map_err(&err)?
            .get(0);
        let revoked: Vec<(u64, u64)> = tx
            .query(
                "SELECT serial, revoked_at FROM certs
                 WHERE project = $1 AND revoked_at IS NOT NULL AND not_after > $2
                 ORDER BY serial",
                &[&project, &(now as i64)],
            )
            .map_err(&err)?
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u64, r.get::<_, i64>(1) as u64))
            .collect();
        let pem = sign(number as u64, &revoked)?;
        tx.execute(
            "UPDATE projects SET crl_pem = $2 WHERE name = $1",
            &[&project, &pem],
        )
        .map_err(&err)?;
        tx.commit().map_err(&err)?;
        Ok(Some(number as u64))
    }

    fn newest_crl(&mut self, project: &str) -> Result<Option<(u64, String)>, StateError> {
        let row = self
            .client
            .query_opt(
                "SELECT crl_number, crl_pem FROM projects WHERE name = $1 AND crl_pem <> ''",
                &[&project],
            )
            .map_err(pg_err(&self.url))?;
        Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_drops_passwords_only() {
        assert_eq!(
            redact("postgresql://idhal:s3cret@127.0.0.1:5432/idhal"),
            "postgresql://idhal@127.0.0.1:5432/idhal"
        );
        assert_eq!(
            redact("postgres://idhal@db/x?sslmode=disable"),
            "postgres://idhal@db/x?sslmode=disable"
        );
        assert_eq!(
            redact("host=/var/run/postgresql password=s3cret dbname=idhal"),
            "host=/var/run/postgresql dbname=idhal"
        );
    }
}
