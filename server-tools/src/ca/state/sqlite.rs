//! [`StateStore`] on the SQLite state file ([`Db`]).

use super::migrate::{Migration, SET_VERSION_SQLITE};
use super::{
    Allocation, CheckProjects, Claim, Enrollment, NewToken, NodeCert, NodeKey, PeerRegistration,
    PeerRow, PublishCert, Registered, Renewal, Renewed, Resign, SignCert, SignCrl, SignNode,
    Snapshot, StateError, StateStore, StoredCert, StoredNode, StoredToken, TokenInfo, TokenRecord,
    CERT_NOT_AFTER,
};
use crate::ca::db::{Db, NodeRow, ProjectRow};
use crate::ca::enroll::{internal, Refusal};
use crate::ca::ProjectError;
use crate::names::Ipv4Net;
use rusqlite::{params, OptionalExtension};

impl StateStore for Db {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn schema_version(&mut self) -> Result<i64, StateError> {
        let found = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get::<_, i64>(0),
            )
            .optional();
        match found {
            Ok(v) => Ok(v.unwrap_or(0)),
            Err(rusqlite::Error::SqliteFailure(_, Some(m))) if m.contains("no such table") => Ok(0),
            Err(e) => Err(self.err(e)),
        }
    }

    fn apply_migration(&mut self, m: &Migration) -> Result<bool, StateError> {
        // BEGIN IMMEDIATE takes the write lock first: the version read inside is final.
        let applied = self.immediate(|tx, err| {
            let has_meta: i64 = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let found: i64 = if has_meta == 0 {
                0
            } else {
                tx.query_row(
                    "SELECT value FROM meta WHERE key = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(err)?
                .unwrap_or(0)
            };
            if found >= m.version {
                return Ok::<_, StateError>(false);
            }
            tx.execute_batch(m.sqlite).map_err(err)?;
            tx.execute(SET_VERSION_SQLITE, [m.version]).map_err(err)?;
            Ok(true)
        })?;
        Ok(applied)
    }

    fn create_token(&mut self, t: &NewToken) -> Result<(), StateError> {
        self.conn
            .execute(
                "INSERT INTO tokens (id, project, node_type, verifier, uses, created, expires,
                                     comment)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    t.id,
                    t.project,
                    t.node_type,
                    &t.verifier[..],
                    t.uses,
                    t.created as i64,
                    t.expires as i64,
                    t.comment
                ],
            )
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn tokens(&mut self) -> Result<Vec<TokenRecord>, StateError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT id, project, node_type, uses, used, created, expires, comment FROM tokens
                 ORDER BY created, id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(TokenRecord {
                    id: r.get(0)?,
                    project: r.get(1)?,
                    node_type: r.get(2)?,
                    uses: r.get(3)?,
                    used: r.get(4)?,
                    created: r.get::<_, i64>(5)? as u64,
                    expires: r.get::<_, i64>(6)? as u64,
                    comment: r.get(7)?,
                })
            })
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
        drop(stmt);
        rows.map_err(|e| self.err(e))
    }

    fn token_for_enroll(&mut self, id: &str) -> Result<Option<TokenInfo>, StateError> {
        self.conn
            .query_row(
                "SELECT project, node_type, verifier FROM tokens WHERE id = ?1",
                [id],
                |r| {
                    Ok(TokenInfo {
                        project: r.get(0)?,
                        node_type: r.get(1)?,
                        verifier: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    fn project(&mut self, name: &str) -> Result<Option<ProjectRow>, StateError> {
        let sql = format!(
            "SELECT {} FROM projects WHERE name = ?1",
            ProjectRow::COLUMNS
        );
        self.conn
            .query_row(&sql, [name], ProjectRow::from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    fn insert_project(
        &mut self,
        name: &str,
        created: u64,
        pool: &str,
        check: CheckProjects<'_>,
    ) -> Result<(), ProjectError> {
        // BEGIN IMMEDIATE: nobody inserts between the check and the insert.
        self.immediate(|tx, err| {
            let sql = format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS);
            let mut stmt = tx.prepare(&sql).map_err(err)?;
            let others = stmt
                .query_map([], ProjectRow::from_row)
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            drop(stmt);
            check(&others)?;
            tx.execute(
                "INSERT INTO projects (name, created, pool, next_host, next_serial, crl_number,
                                       crl_next_update)
                 VALUES (?1, ?2, ?3, 2, 1, 0, 0)",
                params![name, created as i64, pool],
            )
            .map_err(err)?;
            Ok(())
        })
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
        self.immediate(|tx, err| {
            let serial: i64 = tx
                .query_row(
                    "UPDATE projects SET next_serial = next_serial + 1 WHERE name = ?1
                     RETURNING next_serial - 1",
                    [project],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let pem = sign(serial as u64)?;
            tx.execute(
                "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
                 VALUES (?1, ?2, 'server', ?3, ?4, ?5, ?6)",
                params![
                    project,
                    serial,
                    subject,
                    issued as i64,
                    not_after as i64,
                    pem
                ],
            )
            .map_err(err)?;
            publish(&pem)?;
            Ok(serial as u64)
        })
    }

    fn enroll(&mut self, claim: &Claim<'_>, sign: SignNode<'_>) -> Result<Enrollment, Refusal> {
        self.immediate(|tx, err| {
            let existing = tx
                .query_row(
                    "SELECT n.id, n.address, n.token, n.revoked_at, c.pem FROM nodes n
                 JOIN certs c ON c.project = n.project AND c.serial = n.cert_serial
                 WHERE n.public_key = ?1",
                    [claim.public_key],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, String>(4)?,
                        ))
                    },
                )
                .optional()
                .map_err(err)?;
            if let Some((id, address, token, revoked, pem)) = existing {
                if token != claim.token || revoked.is_some() {
                    return Err(Refusal::KeyInUse);
                }
                let address = address.parse().map_err(internal)?;
                return Ok(Enrollment {
                    node: id,
                    address,
                    pem,
                    fresh: false,
                });
            }
            // The claim itself: one conditional UPDATE. Only when it changed nothing is the reason
            // looked up.
            let claimed = tx
            .execute(
                "UPDATE tokens SET used = used + 1 WHERE id = ?1 AND used < uses AND expires > ?2",
                params![claim.token, claim.now as i64],
            )
            .map_err(err)?;
            if claimed != 1 {
                let expires: i64 = tx
                    .query_row(
                        "SELECT expires FROM tokens WHERE id = ?1",
                        [claim.token],
                        |r| r.get(0),
                    )
                    .optional()
                    .map_err(err)?
                    .ok_or(Refusal::UnknownToken)?;
                return Err(if expires as u64 <= claim.now {
                    Refusal::Expired
                } else {
                    Refusal::UsedUp
                });
            }
            let num: i64 = tx
                .query_row(
                    "UPDATE meta SET value = value + 1 WHERE key = 'next_node' RETURNING value - 1",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let (host, serial, pool): (i64, i64, String) = tx
                .query_row(
                    "UPDATE projects SET next_host = next_host + 1, next_serial = next_serial + 1
                 WHERE name = ?1 RETURNING next_host - 1, next_serial - 1, pool",
                    [claim.project],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .map_err(err)?;
            let pool = Ipv4Net::parse(&pool).map_err(internal)?;
            let address = u32::try_from(host)
                .ok()
                .and_then(|h| pool.host(h))
                .ok_or_else(|| Refusal::PoolExhausted(pool.to_string()))?;
            let node = format!("client{num}");
            let allocation = Allocation {
                node,
                serial: serial as u64,
            };
            let pem = sign(&allocation)?;
            let Allocation { node, .. } = &allocation;
            tx.execute(
                "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
             VALUES (?1, ?2, 'node', ?3, ?4, ?5, ?6)",
                params![
                    claim.project,
                    serial,
                    node,
                    claim.now as i64,
                    claim.not_after as i64,
                    pem
                ],
            )
            .map_err(err)?;
            tx.execute(
                "INSERT INTO nodes (id, num, project, node_type, address, enrolled_at, cert_serial,
                                public_key, token)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    node,
                    num,
                    claim.project,
                    claim.node_type,
                    address.to_string(),
                    claim.now as i64,
                    serial,
                    claim.public_key,
                    claim.token
                ],
            )
            .map_err(err)?;
            Ok(Enrollment {
                node: allocation.node,
                address,
                pem,
                fresh: true,
            })
        })
    }

    fn projects(&mut self) -> Result<Vec<ProjectRow>, StateError> {
        let sql = format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS);
        rows(self, &sql, [], ProjectRow::from_row)
    }

    fn node(&mut self, id: &str) -> Result<Option<NodeRow>, StateError> {
        let sql = format!("SELECT {} FROM nodes WHERE id = ?1", NodeRow::COLUMNS);
        self.conn
            .query_row(&sql, [id], NodeRow::from_row)
            .optional()
            .map_err(|e| self.err(e))
    }

    fn nodes(&mut self, project: Option<&str>) -> Result<Vec<NodeRow>, StateError> {
        let sql = format!(
            "SELECT {} FROM nodes WHERE ?1 IS NULL OR project = ?1 ORDER BY num",
            NodeRow::COLUMNS
        );
        rows(self, &sql, params![project], NodeRow::from_row)
    }

    fn revoke(&mut self, id: &str, now: u64) -> Result<Option<NodeRow>, StateError> {
        self.immediate(|tx, err| {
            let sql = format!("SELECT {} FROM nodes WHERE id = ?1", NodeRow::COLUMNS);
            let Some(node) = tx
                .query_row(&sql, [id], NodeRow::from_row)
                .optional()
                .map_err(err)?
            else {
                return Ok(None);
            };
            if node.revoked_at.is_none() {
                tx.execute(
                    "UPDATE nodes SET revoked_at = ?2 WHERE id = ?1",
                    params![node.id, now as i64],
                )
                .map_err(err)?;
            }
            // Also for a node revoked before: a certificate left valid (revoked by an older
            // `idhal revoke` that marked only the current one) goes on the CRL now.
            let at = node.revoked_at.unwrap_or(now);
            tx.execute(
                REVOKE_CERTS_SQLITE,
                params![node.project, node.id, at as i64],
            )
            .map_err(err)?;
            Ok::<_, StateError>(Some(node))
        })
    }

    fn node_key(&mut self, id: &str) -> Result<Option<NodeKey>, StateError> {
        let sql = format!(
            "SELECT {}, public_key, {CERT_NOT_AFTER} FROM nodes WHERE id = ?1",
            NodeRow::COLUMNS
        );
        self.conn
            .query_row(&sql, [id], |r| {
                Ok(NodeKey {
                    row: NodeRow::from_row(r)?,
                    public_key: r.get(9)?,
                    cert_not_after: r.get::<_, Option<i64>>(10)?.map(|t| t as u64),
                })
            })
            .optional()
            .map_err(|e| self.err(e))
    }

    fn renew(&mut self, r: &Renewal<'_>, sign: SignCert<'_>) -> Result<Renewed, ProjectError> {
        // BEGIN IMMEDIATE: no revocation, and no other renewal of this node, in between.
        self.immediate(|tx, err| {
            let node: Option<(String, String, Option<i64>)> = tx
                .query_row(
                    "SELECT project, address, revoked_at FROM nodes WHERE id = ?1",
                    [r.node],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .optional()
                .map_err(err)?;
            let (project, address) = match node {
                None => return Ok(Renewed::NoNode),
                Some((_, _, Some(_))) => return Ok(Renewed::Revoked),
                Some((project, address, None)) => (project, address),
            };
            let current = tx
                .query_row(CURRENT_CERT_SQLITE, [r.node], |row| {
                    Ok(NodeCert {
                        project: project.clone(),
                        address: address.clone(),
                        serial: row.get::<_, i64>(0)? as u64,
                        issued: row.get::<_, i64>(1)? as u64,
                        not_after: row.get::<_, i64>(2)? as u64,
                        pem: row.get(3)?,
                    })
                })
                .optional()
                .map_err(err)?;
            let current = match current {
                Some(c) if c.not_after > r.now => c,
                other => return Ok(Renewed::Expired(other.map_or(0, |c| c.not_after))),
            };
            if r.now.saturating_sub(current.issued) < r.min_interval {
                return Ok(Renewed::Current(current));
            }
            let serial: i64 = tx
                .query_row(
                    "UPDATE projects SET next_serial = next_serial + 1 WHERE name = ?1
                     RETURNING next_serial - 1",
                    [&project],
                    |row| row.get(0),
                )
                .map_err(err)?;
            let pem = sign(serial as u64)?;
            tx.execute(
                "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
                 VALUES (?1, ?2, 'node', ?3, ?4, ?5, ?6)",
                params![
                    project,
                    serial,
                    r.node,
                    r.now as i64,
                    r.not_after as i64,
                    pem
                ],
            )
            .map_err(err)?;
            tx.execute(
                "UPDATE nodes SET cert_serial = ?2 WHERE id = ?1",
                params![r.node, serial],
            )
            .map_err(err)?;
            Ok(Renewed::Issued(NodeCert {
                project,
                address,
                serial: serial as u64,
                issued: r.now,
                not_after: r.not_after,
                pem,
            }))
        })
    }

    fn register_peer(&mut self, reg: &PeerRegistration<'_>) -> Result<Registered, StateError> {
        // BEGIN IMMEDIATE: no revocation nor other registration between the reads and the write.
        self.immediate(|tx, err| {
            let node: Option<(Option<i64>, Option<i64>)> = tx
                .query_row(
                    "SELECT revoked_at, wg_request_time FROM nodes WHERE id = ?1",
                    [reg.node],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(err)?;
            match node {
                None => return Ok(Registered::NoNode),
                Some((Some(_), _)) => return Ok(Registered::Revoked),
                Some((None, Some(last))) if last as u64 > reg.request_time => {
                    return Ok(Registered::Older { last: last as u64 })
                }
                Some(_) => {}
            }
            let holder: Option<String> = tx
                .query_row(
                    "SELECT id FROM nodes WHERE wg_key = ?1 AND id <> ?2",
                    params![&reg.wg_key[..], reg.node],
                    |r| r.get(0),
                )
                .optional()
                .map_err(err)?;
            if let Some(h) = holder {
                return Ok(Registered::KeyHeldBy(h));
            }
            tx.execute(
                "UPDATE nodes SET wg_key = ?2, wg_endpoints = ?3, wg_registered_at = ?4,
                                  wg_request_time = ?5
                 WHERE id = ?1",
                params![
                    reg.node,
                    &reg.wg_key[..],
                    reg.endpoints,
                    reg.now as i64,
                    reg.request_time as i64
                ],
            )
            .map_err(err)?;
            Ok::<_, StateError>(Registered::Done)
        })
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
             WHERE project = ?1 AND id <> ?2 AND wg_key IS NOT NULL AND revoked_at IS NULL
                   AND wg_registered_at >= ?4 AND {CERT_NOT_AFTER} > ?5
             ORDER BY num LIMIT ?3"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(
                params![
                    project,
                    except,
                    i64::try_from(limit).unwrap_or(i64::MAX),
                    i64::try_from(registered_since).unwrap_or(i64::MAX),
                    i64::try_from(now).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok(PeerRow {
                        node: r.get(0)?,
                        address: r.get(1)?,
                        wg_key: r.get(2)?,
                        endpoints: r.get(3)?,
                    })
                },
            )
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>());
        drop(stmt);
        rows.map_err(|e| self.err(e))
    }

    fn export(&mut self) -> Result<Snapshot, StateError> {
        let path = self.path.clone();
        let err = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        // A read transaction: one consistent view of every table.
        let tx = self.conn.transaction().map_err(err)?;
        let version: i64 = tx
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .map_err(err)?;
        let next_node: i64 = tx
            .query_row("SELECT value FROM meta WHERE key = 'next_node'", [], |r| {
                r.get(0)
            })
            .map_err(err)?;
        let projects = {
            let sql = format!("SELECT {} FROM projects ORDER BY name", ProjectRow::COLUMNS);
            let mut stmt = tx.prepare(&sql).map_err(err)?;
            let rows = stmt
                .query_map([], ProjectRow::from_row)
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            rows
        };
        let tokens = {
            let sql = format!("SELECT {} FROM tokens ORDER BY id", Snapshot::TOKEN_COLUMNS);
            let mut stmt = tx.prepare(&sql).map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredToken {
                        id: r.get(0)?,
                        project: r.get(1)?,
                        node_type: r.get(2)?,
                        verifier: r.get(3)?,
                        uses: r.get(4)?,
                        used: r.get(5)?,
                        created: r.get(6)?,
                        expires: r.get(7)?,
                        comment: r.get(8)?,
                    })
                })
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            rows
        };
        let certs = {
            let sql = format!(
                "SELECT {} FROM certs ORDER BY project, serial",
                Snapshot::CERT_COLUMNS
            );
            let mut stmt = tx.prepare(&sql).map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredCert {
                        project: r.get(0)?,
                        serial: r.get(1)?,
                        kind: r.get(2)?,
                        subject: r.get(3)?,
                        issued: r.get(4)?,
                        not_after: r.get(5)?,
                        revoked_at: r.get(6)?,
                        pem: r.get(7)?,
                    })
                })
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            rows
        };
        let nodes = {
            let sql = format!("SELECT {} FROM nodes ORDER BY num", Snapshot::NODE_COLUMNS);
            let mut stmt = tx.prepare(&sql).map_err(err)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(StoredNode {
                        id: r.get(0)?,
                        num: r.get(1)?,
                        project: r.get(2)?,
                        node_type: r.get(3)?,
                        address: r.get(4)?,
                        enrolled_at: r.get(5)?,
                        cert_serial: r.get(6)?,
                        public_key: r.get(7)?,
                        token: r.get(8)?,
                        revoked_at: r.get(9)?,
                        wg_key: r.get(10)?,
                        wg_endpoints: r.get(11)?,
                        wg_registered_at: r.get(12)?,
                        wg_request_time: r.get(13)?,
                    })
                })
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            rows
        };
        Ok(Snapshot {
            schema_version: version,
            next_node,
            projects,
            tokens,
            certs,
            nodes,
        })
    }

    fn import(&mut self, snap: &Snapshot) -> Result<(), StateError> {
        let db = self.describe();
        self.immediate(|tx, err| {
            let version: i64 = tx
                .query_row(
                    "SELECT value FROM meta WHERE key = 'schema_version'",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            if version != snap.schema_version {
                return Err(StateError::CopyVersion {
                    db: db.clone(),
                    found: version,
                    source_version: snap.schema_version,
                });
            }
            let rows: i64 = tx
                .query_row(
                    "SELECT (SELECT count(*) FROM projects) + (SELECT count(*) FROM tokens)
                          + (SELECT count(*) FROM certs) + (SELECT count(*) FROM nodes)
                          + (SELECT value - 1 FROM meta WHERE key = 'next_node')",
                    [],
                    |r| r.get(0),
                )
                .map_err(err)?;
            if rows != 0 {
                return Err(StateError::NotEmpty(db.clone()));
            }
            for p in &snap.projects {
                tx.execute(
                    &format!(
                        "INSERT INTO projects ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                        ProjectRow::COLUMNS
                    ),
                    params![
                        p.name,
                        p.created as i64,
                        p.pool,
                        i64::from(p.next_host),
                        p.next_serial as i64,
                        p.crl_number as i64,
                        p.crl_next_update as i64
                    ],
                )
                .map_err(err)?;
            }
            for t in &snap.tokens {
                tx.execute(
                    &format!(
                        "INSERT INTO tokens ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                        Snapshot::TOKEN_COLUMNS
                    ),
                    params![
                        t.id,
                        t.project,
                        t.node_type,
                        t.verifier,
                        t.uses,
                        t.used,
                        t.created,
                        t.expires,
                        t.comment
                    ],
                )
                .map_err(err)?;
            }
            for c in &snap.certs {
                tx.execute(
                    &format!(
                        "INSERT INTO certs ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        Snapshot::CERT_COLUMNS
                    ),
                    params![
                        c.project,
                        c.serial,
                        c.kind,
                        c.subject,
                        c.issued,
                        c.not_after,
                        c.revoked_at,
                        c.pem
                    ],
                )
                .map_err(err)?;
            }
            for n in &snap.nodes {
                tx.execute(
                    &format!(
                        "INSERT INTO nodes ({}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10,
                                                     ?11, ?12, ?13, ?14)",
                        Snapshot::NODE_COLUMNS
                    ),
                    params![
                        n.id,
                        n.num,
                        n.project,
                        n.node_type,
                        n.address,
                        n.enrolled_at,
                        n.cert_serial,
                        n.public_key,
                        n.token,
                        n.revoked_at,
                        n.wg_key,
                        n.wg_endpoints,
                        n.wg_registered_at,
                        n.wg_request_time
                    ],
                )
                .map_err(err)?;
            }
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'next_node'",
                [snap.next_node],
            )
            .map_err(err)?;
            Ok(())
        })
    }

    fn resign_crl(
        &mut self,
        project: &str,
        now: u64,
        next_update: u64,
        when: Resign,
        sign: SignCrl<'_>,
    ) -> Result<Option<u64>, ProjectError> {
        // BEGIN IMMEDIATE: one re-signing at a time across processes, and "due?" read inside.
        self.immediate(|tx, err| {
            let (current, none_stored): (i64, bool) = tx
                .query_row(
                    "SELECT crl_next_update, crl_pem = '' FROM projects WHERE name = ?1",
                    [project],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(err)?;
            if !none_stored && !when.due(current as u64, now) {
                return Ok(None);
            }
            let number: i64 = tx
                .query_row(
                    "UPDATE projects SET crl_number = crl_number + 1, crl_next_update = ?2
                     WHERE name = ?1 RETURNING crl_number",
                    params![project, next_update as i64],
                    |r| r.get(0),
                )
                .map_err(err)?;
            let mut stmt = tx
                .prepare(
                    "SELECT serial, revoked_at FROM certs
                     WHERE project = ?1 AND revoked_at IS NOT NULL AND not_after > ?2
                     ORDER BY serial",
                )
                .map_err(err)?;
            let revoked = stmt
                .query_map(params![project, now as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })
                .map_err(err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(err)?;
            drop(stmt);
            let pem = sign(number as u64, &revoked)?;
            tx.execute(
                "UPDATE projects SET crl_pem = ?2 WHERE name = ?1",
                params![project, pem],
            )
            .map_err(err)?;
            Ok(Some(number as u64))
        })
    }

    fn newest_crl(&mut self, project: &str) -> Result<Option<(u64, String)>, StateError> {
        self.conn
            .query_row(
                "SELECT crl_number, crl_pem FROM projects WHERE name = ?1 AND crl_pem <> ''",
                [project],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}

/// Revokes every certificate of node ?2 of project ?1 not revoked yet, at ?3: the current one and
/// those it had before a renewal (node ids are never reused, so the subject is the node's own).
const REVOKE_CERTS_SQLITE: &str = "UPDATE certs SET revoked_at = ?3
     WHERE project = ?1 AND kind = 'node' AND subject = ?2 AND revoked_at IS NULL";

/// Serial, issue time, not_after and PEM of node ?1's current certificate.
const CURRENT_CERT_SQLITE: &str = "SELECT c.serial, c.issued, c.not_after, c.pem
     FROM nodes n JOIN certs c ON c.project = n.project AND c.serial = n.cert_serial
     WHERE n.id = ?1";

/// Every row of `sql`, mapped by `f`.
fn rows<T>(
    db: &Db,
    sql: &str,
    params: impl rusqlite::Params,
    f: fn(&rusqlite::Row) -> rusqlite::Result<T>,
) -> Result<Vec<T>, StateError> {
    let mut stmt = db.conn.prepare(sql).map_err(|e| db.err(e))?;
    let rows = stmt.query_map(params, f).map_err(|e| db.err(e))?;
    rows.collect::<Result<_, _>>().map_err(|e| db.err(e))
}
