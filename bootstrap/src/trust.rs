//! What `enroll`, `peers` and `renew` trust before they talk to the server: the manifest `run`
//! accepted, verified again here (expiry enforced), the enrollment key it names, and the
//! exchange's URL; for an enrolled node's own exchanges (`peers`, `renew`), its id, address and
//! key, and the signed POST both make.
//!
//! The state directory is trusted no more than the network: the key that signs the server's
//! answers comes only from a manifest that verifies now against the pinned server key.

use crate::config::Config;
use crate::enroll::{enrolled, read_node_key, DIR, NODE_KEY};
use crate::error::AgentError;
use crate::fetch::{fetch_error, Fetcher};
use crate::http::{HttpError, Url};
use crate::pin;
use crate::random::fill_random;
use crate::state::StateDir;
use idhal_manifest::enroll::{self, EnrollKey, KeyPair};
use idhal_manifest::{time::now, Expiry, NodeId, Policy};

/// The refusal of a command (`enroll`, `peers`) called before `run` accepted a manifest.
pub fn no_manifest(cfg: &Config, cmd: &str) -> AgentError {
    AgentError::Config(format!(
        "{}: no accepted manifest yet: `{cmd}` runs after `idhal-bootstrap run` accepted a \
         signed manifest (call it from a scriptlet)",
        cfg.state_dir.display()
    ))
}

/// The enrollment key the accepted manifest names (`param enroll-key`), and where the exchange is
/// served: the manifest's `url_param` if it has one, else the configured server joined with `path`.
pub fn exchange(
    cfg: &Config,
    state: &StateDir,
    cmd: &str,
    url_param: &str,
    path: &str,
) -> Result<(EnrollKey, Url), AgentError> {
    let key = pin::load_pinned(state)?.ok_or_else(|| no_manifest(cfg, cmd))?;
    let policy = Policy {
        now: now(),
        expiry: Expiry::Enforce,
        last_serial: state.last_serial()?,
    };
    let mut bytes = Vec::new();
    let manifest = state
        .accepted_manifest(&key, &policy, &mut bytes)?
        .ok_or_else(|| no_manifest(cfg, cmd))?;
    let param_error = |why: String| {
        AgentError::Config(format!(
            "the signed manifest (serial {}) {why}: sign it with `idhal sign --param {}=$(idhal ca \
             enroll-key) ...`",
            manifest.serial,
            enroll::KEY_PARAM
        ))
    };
    let enroll_key: EnrollKey = manifest
        .param(enroll::KEY_PARAM)
        .ok_or_else(|| param_error(format!("has no param {}", enroll::KEY_PARAM)))?
        .parse()
        .map_err(|e| param_error(format!("has a bad param {}: {e}", enroll::KEY_PARAM)))?;
    let url = match manifest.param(url_param) {
        Some(u) => Url::parse(u).map_err(|e| {
            AgentError::Config(format!("the signed manifest's param {url_param}: {e}"))
        })?,
        None => cfg.server_url()?.join(path),
    };
    Ok((enroll_key, url))
}

/// An enrolled node about to make one of its own signed exchanges (`peers`, `renew`).
pub struct NodeExchange {
    pub node: NodeId,
    pub address: String,
    /// `enroll/node.key`: what signs the requests.
    pub key: KeyPair,
    /// What must sign the answers.
    pub enroll_key: EnrollKey,
    /// At the exchange's URL.
    pub fetcher: Fetcher,
}

/// This node's enrollment (`enroll/node-id`, `address`, `node.key`; else "not enrolled", exit
/// 3), then `exchange`'s key and URL. One copy for `peers` and `renew` (the agent's size is
/// budgeted). The state directory is no more trusted than the network: a node id the wire
/// formats refuse is refused here (exit 3), before anything is signed.
#[inline(never)]
pub fn node_exchange(
    cfg: &Config,
    state: &StateDir,
    cmd: &str,
    url_param: &str,
    path: &str,
) -> Result<Box<NodeExchange>, AgentError> {
    let not_enrolled = || {
        AgentError::Config(format!(
            "{}: not enrolled: `{cmd}` runs after `idhal-bootstrap enroll` succeeded",
            cfg.state_dir.display()
        ))
    };
    let (node, address) = enrolled(state)?.ok_or_else(not_enrolled)?;
    let dir = state.path(DIR);
    let node = node
        .parse()
        .map_err(|e| AgentError::Config(format!("{}/node-id: {e}", dir.display())))?;
    let key = read_node_key(&dir.join(NODE_KEY))?.ok_or_else(not_enrolled)?;
    let (enroll_key, url) = exchange(cfg, state, cmd, url_param, path)?;
    Ok(Box::new(NodeExchange {
        node,
        address,
        key,
        enroll_key,
        fetcher: Fetcher {
            base: url,
            limits: cfg.limits.clone(),
            tls: cfg.tls()?,
        },
    }))
}

/// How one exchange reports the server's refusals: which statuses are refusals (exit 5, never
/// retried; any other failure is exit 4), as which error, with what said after the status.
pub struct Refusals {
    pub cmd: &'static str,
    pub statuses: &'static [u16],
    pub error: fn(String) -> AgentError,
    pub suffix: &'static str,
}

/// POSTs the request `make(time, nonce)` encodes and signs to `fetcher`'s URL, with retries
/// (`enroll`, `peers`, `renew`); each attempt is a new request (fresh time, next nonce), so a
/// retry after a long backoff is neither stale nor a replay. Returns the answer and the SHA-256
/// of the request it must name.
pub fn post(
    fetcher: &Fetcher,
    content_type: &str,
    limit: usize,
    refusals: &Refusals,
    make: &mut dyn FnMut(u64, [u8; 16]) -> Vec<u8>,
) -> Result<(Vec<u8>, [u8; 32]), AgentError> {
    let mut nonce = [0u8; 16];
    fill_random(&mut nonce)?;
    let mut digest = [0u8; 32];
    let body = fetcher
        .post(content_type, limit, &mut || {
            let encoded = make(now(), nonce);
            nonce = u128::from_le_bytes(nonce).wrapping_add(1).to_le_bytes();
            digest = enroll::request_digest(&encoded);
            encoded
        })
        .map_err(|(url, e)| match e {
            // A status is no signature: acting on it would let anyone on the path decide.
            HttpError::Status { code, .. } if refusals.statuses.contains(&code) => {
                (refusals.error)(format!("{} {url}: {e}{}", refusals.cmd, refusals.suffix))
            }
            e => fetch_error((url, e)),
        })?;
    Ok((body, digest))
}
