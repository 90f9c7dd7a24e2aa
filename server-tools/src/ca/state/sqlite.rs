//! [`StateStore`] on the SQLite state file ([`Db`]).

use super::{NewToken, StateError, StateStore, TokenInfo, TokenRecord};
use crate::ca::db::Db;
use rusqlite::{params, OptionalExtension};

impl StateStore for Db {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::db::Open;

    fn token(id: &str, created: u64) -> NewToken {
        NewToken {
            id: id.into(),
            project: "p".into(),
            node_type: "worker".into(),
            verifier: [7; 32],
            uses: 2,
            created,
            expires: created + 60,
            comment: "c".into(),
        }
    }

    #[test]
    fn tokens_round_trip_through_the_trait() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path(), Open::Create).unwrap();
        db.conn
            .execute(
                "INSERT INTO projects VALUES ('p', 0, '10.8.0.0/24', 2, 2, 1, 0)",
                [],
            )
            .unwrap();
        let store: &mut dyn StateStore = &mut db;
        assert_eq!(store.token_for_enroll("b").unwrap(), None);
        store.create_token(&token("b", 5)).unwrap();
        store.create_token(&token("a", 5)).unwrap();
        store.create_token(&token("z", 1)).unwrap();
        // The id is the primary key; an unknown project is refused (foreign key).
        assert!(store.create_token(&token("a", 9)).is_err());
        let mut orphan = token("o", 1);
        orphan.project = "nope".into();
        assert!(store.create_token(&orphan).is_err());
        let ids: Vec<_> = store.tokens().unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(ids, ["z", "a", "b"]);
        let info = store.token_for_enroll("b").unwrap().unwrap();
        assert_eq!(
            (info.project.as_str(), info.node_type.as_str()),
            ("p", "worker")
        );
        assert_eq!(info.verifier, vec![7; 32]);
    }
}
