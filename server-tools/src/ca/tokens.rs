//! One-time enrollment tokens: created with a random secret of which only the verifier is
//! stored, listed with their state (active, used-up, expired).

use crate::ca::db::DbError;
use crate::ca::pki::{random_40, CaError};
use crate::ca::state::{NewToken, StateStore};
use crate::names::Label;
use idhal_manifest::enroll::Token;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(transparent)]
    Random(#[from] CaError),
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Stores a new token for `project` valid `ttl` seconds from `now`; the caller shows it once.
pub fn create(
    db: &mut dyn StateStore,
    project: &str,
    node_type: &Label,
    uses: u32,
    now: u64,
    ttl: u64,
    comment: &str,
) -> Result<Token, TokenError> {
    let token = Token::from_random(random_40()?);
    db.create_token(&NewToken {
        id: token.id.to_string(),
        project: project.to_owned(),
        node_type: node_type.to_string(),
        verifier: token.verifier(),
        uses,
        created: now,
        expires: now + ttl,
        comment: comment.to_owned(),
    })?;
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
pub fn list(db: &mut dyn StateStore, now: u64) -> Result<Vec<TokenRow>, DbError> {
    Ok(db
        .tokens()?
        .into_iter()
        .map(|t| TokenRow {
            state: if t.used >= t.uses {
                "used-up"
            } else if t.expires <= now {
                "expired"
            } else {
                "active"
            },
            id: t.id,
            project: t.project,
            node_type: t.node_type,
            uses: t.uses,
            used: t.used,
            created: t.created,
            expires: t.expires,
            comment: t.comment,
        })
        .collect())
}
