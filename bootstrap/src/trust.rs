//! What `enroll` and `peers` trust before they talk to the server: the manifest `run` accepted,
//! verified again here (expiry enforced), the enrollment key it names, and the exchange's URL.
//!
//! The state directory is trusted no more than the network: the key that signs the server's
//! answers comes only from a manifest that verifies now against the pinned server key.

use crate::config::Config;
use crate::error::AgentError;
use crate::http::Url;
use crate::pin;
use crate::state::StateDir;
use idhal_manifest::enroll::{self, EnrollKey};
use idhal_manifest::{time::now, Expiry, Policy};

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
