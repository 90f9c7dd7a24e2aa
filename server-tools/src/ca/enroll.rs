//! The enrollment service behind `POST /enroll` (mounted by `idhal serve`): checks the token
//! signature, the clock and the CSR, then in ONE transaction spends a token use, allocates the
//! node id, the address and the certificate serial, issues the certificate and writes the
//! node's client-config-dir entry. The answer is signed with the project's enrollment key.
//!
//! Retrying is safe: a request for a public key already enrolled with the same token gets the
//! same node back without spending another use (a node that crashed before saving the answer
//! is not locked out).

use crate::ca::db::{DbError, Open};
use crate::ca::pki::{Leaf, NodePublicKey, ProjectCa, Role};
use crate::ca::state::{self, Claim, StateStore, TokenInfo};
use crate::config::{CaSection, ServerConfig};
use crate::openvpn::config::client_config;
use idhal_manifest::enroll::{EnrollError, Request, Response};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// Why an enrollment was refused. `status` and the Display text are what the node sees (one
/// line); the one mapping to HTTP is here and in docs/enrollment.md.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("unknown token")]
    UnknownToken,
    #[error("bad token signature (wrong token secret?)")]
    BadSignature,
    #[error("request time is {0} s away from the server's clock (more than the allowed skew): fix the node's clock")]
    ClockSkew(i64),
    #[error("token expired")]
    Expired,
    #[error("token used up")]
    UsedUp,
    #[error(
        "this node key is already enrolled with another token, or was revoked: make a new key"
    )]
    KeyInUse,
    #[error("bad CSR: {0}")]
    BadCsr(String),
    #[error("address pool {0} of this project is exhausted")]
    PoolExhausted(String),
    #[error("internal error")]
    Internal(String),
}

impl Refusal {
    pub fn status(&self) -> u16 {
        match self {
            Refusal::Malformed(_) | Refusal::BadCsr(_) => 400,
            Refusal::BadSignature => 401,
            Refusal::UnknownToken => 403,
            Refusal::UsedUp | Refusal::KeyInUse => 409,
            Refusal::Expired => 410,
            Refusal::ClockSkew(_) => 422,
            Refusal::Internal(_) => 500,
            Refusal::PoolExhausted(_) => 503,
        }
    }
}

impl From<DbError> for Refusal {
    fn from(e: DbError) -> Self {
        Refusal::Internal(format!("{e:#}"))
    }
}

/// A refusal of a service that borrows the pool's connections (enrollment, peers): whether the
/// connection it came through is to be closed rather than kept (the database failed).
pub(crate) trait PoolFailure: From<DbError> {
    fn closes_connection(&self) -> bool;
}

impl PoolFailure for Refusal {
    fn closes_connection(&self) -> bool {
        matches!(self, Refusal::Internal(_))
    }
}

pub(crate) fn internal(e: impl std::fmt::Display) -> Refusal {
    Refusal::Internal(e.to_string())
}

/// What one enrollment gave.
#[derive(Debug)]
pub struct Enrolled {
    pub response: Vec<u8>,
    pub project: String,
    pub node: String,
    pub address: Ipv4Addr,
    /// False when a retry got an existing node back.
    pub fresh: bool,
}

pub struct Enroller {
    state_dir: PathBuf,
    cfg: ServerConfig,
    /// Connections to the state: idle ones, and how many exist (at most `[state]
    /// max_connections`; a PostgreSQL server shared with OAR has only so many).
    conns: Mutex<Conns>,
    /// Signalled when a connection goes back idle or is closed.
    conn_free: Condvar,
    cas: RwLock<HashMap<String, Arc<ProjectCa>>>,
    /// One writer at a time in this process: SQLite would serialise the transactions anyway,
    /// but its busy handler sleeps in steps of milliseconds; other processes still wait on it.
    writer: Mutex<()>,
}

/// Extracts the 32-byte Ed25519 key from a CSR after checking its self-signature (proof that
/// the node holds the private key). Subject, extensions and anything else asked for are
/// ignored: the certificate is built from scratch.
pub fn csr_public_key(der: &[u8]) -> Result<NodePublicKey, Refusal> {
    let parsed = rcgen::CertificateSigningRequestParams::from_der(&der.to_vec().into())
        .map_err(|e| Refusal::BadCsr(e.to_string()))?;
    if parsed.public_key.algorithm() != &rcgen::PKCS_ED25519 {
        return Err(Refusal::BadCsr("only Ed25519 keys are accepted".into()));
    }
    use rcgen::PublicKeyData;
    let raw: [u8; 32] = parsed
        .public_key
        .der_bytes()
        .try_into()
        .map_err(|_| Refusal::BadCsr("Ed25519 key of the wrong length".into()))?;
    Ok(NodePublicKey(raw))
}

#[derive(Default)]
struct Conns {
    idle: Vec<Box<dyn StateStore>>,
    open: usize,
}

impl Enroller {
    pub fn new(state_dir: &Path, cfg: ServerConfig) -> Self {
        Self {
            state_dir: state_dir.to_owned(),
            cfg,
            conns: Mutex::new(Conns::default()),
            conn_free: Condvar::new(),
            cas: RwLock::new(HashMap::new()),
            writer: Mutex::new(()),
        }
    }

    /// The configuration it was started with (`POST /peers` reads `[peers]` and `[ca]` there).
    pub(crate) fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Runs `f` with an idle connection, or a new one while fewer than `[state]
    /// max_connections exist, or waits for one. A connection whose call failed is closed (a
    /// PostgreSQL server restarted: the next call reconnects). `POST /peers` borrows the same
    /// connections.
    pub(crate) fn with_db<T, E: PoolFailure>(
        &self,
        f: impl FnOnce(&mut dyn StateStore) -> Result<T, E>,
    ) -> Result<T, E> {
        let max = self.cfg.state.max_connections.max(1) as usize;
        let mut conns = self.conns.lock().expect("pool lock");
        let pooled = loop {
            if let Some(db) = conns.idle.pop() {
                break Some(db);
            }
            if conns.open < max {
                conns.open += 1;
                break None;
            }
            conns = self.conn_free.wait(conns).expect("pool lock");
        };
        drop(conns);
        let mut db = match pooled {
            Some(db) => db,
            None => match state::open(&self.cfg, &self.state_dir, Open::Existing) {
                Ok(db) => db,
                Err(e) => {
                    self.conns.lock().expect("pool lock").open -= 1;
                    self.conn_free.notify_one();
                    return Err(e.into());
                }
            },
        };
        let out = f(db.as_mut());
        let mut conns = self.conns.lock().expect("pool lock");
        match &out {
            Err(e) if e.closes_connection() => conns.open -= 1,
            _ => conns.idle.push(db),
        }
        drop(conns);
        self.conn_free.notify_one();
        out
    }

    /// `with_db` as the one writer of this process (see `writer`).
    pub(crate) fn with_writer<T, E: PoolFailure>(
        &self,
        f: impl FnOnce(&mut dyn StateStore) -> Result<T, E>,
    ) -> Result<T, E> {
        self.with_db(|db| {
            let _one_writer = self.writer.lock().expect("writer lock");
            f(db)
        })
    }

    pub(crate) fn ca(&self, project: &str) -> Result<Arc<ProjectCa>, Refusal> {
        if let Some(ca) = self.cas.read().expect("ca lock").get(project) {
            return Ok(ca.clone());
        }
        let ca = Arc::new(ProjectCa::load(&self.state_dir, project).map_err(internal)?);
        self.cas
            .write()
            .expect("ca lock")
            .insert(project.to_owned(), ca.clone());
        Ok(ca)
    }

    /// Handles one encoded request at time `now`.
    pub fn enroll(&self, body: &[u8], now: u64) -> Result<Enrolled, Refusal> {
        let signed = Request::parse(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
        let req = &signed.request;
        let token_id = req.token.to_string();
        let TokenInfo {
            project,
            node_type,
            verifier,
        } = self
            .with_db(|db| Ok::<_, Refusal>(db.token_for_enroll(&token_id)?))?
            .ok_or(Refusal::UnknownToken)?;
        let verifier: [u8; 32] = verifier
            .try_into()
            .map_err(|_| internal("stored token verifier is not 32 bytes"))?;
        signed.verify(&verifier).map_err(|e| match e {
            EnrollError::RequestSignature => Refusal::BadSignature,
            other => Refusal::Malformed(other.to_string()),
        })?;
        let skew = crate::ca::clock_skew(req.time, now);
        if skew.unsigned_abs() > self.cfg.ca.max_clock_skew_secs {
            return Err(Refusal::ClockSkew(skew));
        }
        let public_key = csr_public_key(&req.csr)?;
        let ca = self.ca(&project)?;

        let (node, address, cert_pem, fresh) =
            self.with_writer(|db| self.allocate(db, &ca, &token_id, &node_type, &public_key, now))?;
        let response = Response {
            request: signed.digest,
            project: project.clone(),
            node: node.clone(),
            address,
            certificate: cert_pem,
            ca: ca.cert_pem.clone(),
            openvpn: client_config(&project, &node, &self.cfg.openvpn_for(&project)),
        }
        .sign(&ca.enroll);
        Ok(Enrolled {
            response,
            project,
            node,
            address,
            fresh,
        })
    }

    /// The one transaction: token use, node id, address, serial, certificate. Nothing is
    /// written to disk: OpenVPN's connect hook reads the address from the state database.
    fn allocate(
        &self,
        db: &mut dyn StateStore,
        ca: &ProjectCa,
        token_id: &str,
        node_type: &str,
        key: &NodePublicKey,
        now: u64,
    ) -> Result<(String, Ipv4Addr, String, bool), Refusal> {
        let validity = CaSection::secs(&self.cfg.ca.node_cert_validity);
        let claim = Claim {
            project: &ca.project,
            token: token_id,
            node_type,
            public_key: &key.0[..],
            now,
            not_after: now + validity,
        };
        let e = db.enroll(&claim, &mut |a| {
            ca.issue(
                &Leaf {
                    role: Role::Node,
                    cn: &a.node,
                    serial: a.serial,
                    not_before: now.saturating_sub(300),
                    not_after: now + validity,
                },
                key,
            )
            .map_err(internal)
        })?;
        Ok((e.node, e.address, e.pem, e.fresh))
    }
}
