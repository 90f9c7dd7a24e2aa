//! One-time enrollment tokens: created with a random secret of which only the verifier is
//! stored, listed with their state (active, used-up, expired).

use crate::ca::db::{Db, DbError};
use crate::ca::pki::{random_40, CaError};
use crate::names::Label;
use idhal_manifest::enroll::Token;
use rusqlite::params;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Random(#[from] CaError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Stores a new token for `project` valid `ttl` seconds from `now`; the caller shows it once.
pub fn create(
    db: &Db,
    project: &str,
    node_type: &Label,
    uses: u32,
    now: u64,
    ttl: u64,
    comment: &str,
) -> Result<Token, TokenError> {
    let token = Token::from_random(random_40()?);
    db.conn
        .execute(
            "INSERT INTO tokens (id, project, node_type, verifier, uses, created, expires,
                                 comment)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                token.id.to_string(),
                project,
                node_type.to_string(),
                &token.verifier()[..],
                uses,
                now as i64,
                (now + ttl) as i64,
                comment
            ],
        )
        .map_err(|e| db.err(e))?;
    Ok(token)
}

/// One token as `idhal token list` shows it (the JSON field names are an interface).
#[derive(serde::Serialize)]
pub struct TokenRow {
    pub id: String,
    pub project: String,
    #[serde(rename = "type")]
    pub node_type: String,
    pub uses: u32,
    pub used: u32,
    pub created: u64,
    pub expires: u64,
    pub state: &'static str,
    pub comment: String,
}

/// Every token, oldest first, with its state at `now` (never its secret).
pub fn list(db: &Db, now: u64) -> Result<Vec<TokenRow>, DbError> {
    let mut stmt = db
        .conn
        .prepare(
            "SELECT id, project, node_type, uses, used, created, expires, comment FROM tokens
             ORDER BY created, id",
        )
        .map_err(|e| db.err(e))?;
    let rows = stmt
        .query_map([], |r| {
            let (uses, used, expires) = (r.get(3)?, r.get(4)?, r.get::<_, i64>(6)? as u64);
            Ok(TokenRow {
                id: r.get(0)?,
                project: r.get(1)?,
                node_type: r.get(2)?,
                uses,
                used,
                created: r.get::<_, i64>(5)? as u64,
                expires,
                state: if used >= uses {
                    "used-up"
                } else if expires <= now {
                    "expired"
                } else {
                    "active"
                },
                comment: r.get(7)?,
            })
        })
        .map_err(|e| db.err(e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| db.err(e))?;
    Ok(rows)
}
