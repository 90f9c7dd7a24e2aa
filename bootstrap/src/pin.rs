//! First-boot key pinning. The key comes from the image, or from the server only if it matches
//! the fingerprint the admin pinned; once pinned it is never fetched again and no other key is
//! accepted. Trusting the first key offered exists only behind an explicit, loud opt-in.

use crate::config::{Config, KeyTrust};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::log;
use crate::state::{write_atomic, StateDir};
use idhal_manifest::PublicKey;

pub const PINNED: &str = "server.pub";

fn baked_key(cfg: &Config) -> Result<Option<PublicKey>, AgentError> {
    match std::fs::read_to_string(&cfg.key) {
        Ok(text) => PublicKey::parse(&text)
            .map(Some)
            .map_err(|e| AgentError::Config(format!("{}: {e}", cfg.key.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::Config(format!("{}: {e}", cfg.key.display()))),
    }
}

/// The key already pinned in the state directory, if any.
pub fn load_pinned(state: &StateDir) -> Result<Option<PublicKey>, AgentError> {
    let path = state.path(PINNED);
    state
        .read(&path)?
        .map(|t| {
            PublicKey::parse(&t).map_err(|e| {
                AgentError::state(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()),
                )
            })
        })
        .transpose()
}

/// Returns the pinned key, pinning it first if this is the first boot.
pub fn pinned_key(
    cfg: &Config,
    state: &StateDir,
    fetcher: &Fetcher,
) -> Result<PublicKey, AgentError> {
    let baked = baked_key(cfg)?;
    if let Some(pinned) = load_pinned(state)? {
        if let Some(b) = baked.filter(|b| *b != pinned) {
            return Err(AgentError::Pin(format!(
                "the image's key {} ({}) differs from the key {} pinned in {}; \
                 refusing both (remove the pinned key only if you re-keyed on purpose)",
                b.id(),
                cfg.key.display(),
                pinned.id(),
                state.path(PINNED).display()
            )));
        }
        return Ok(pinned);
    }

    let key = match baked {
        Some(key) => {
            if let Some(pin) = cfg.pin.filter(|p| *p != key.fingerprint()) {
                return Err(AgentError::Pin(format!(
                    "the image's key {} has fingerprint {}, but idhal.pin is {pin}",
                    key.id(),
                    key.fingerprint()
                )));
            }
            log(&format!(
                "pinning the image's key {} ({})",
                key.id(),
                key.fingerprint()
            ));
            key
        }
        None => {
            let offered = fetcher.public_key()?;
            let key = std::str::from_utf8(&offered)
                .ok()
                .and_then(|t| PublicKey::parse(t).ok())
                .ok_or_else(|| {
                    AgentError::Pin("the server's idhal.pub is not a minisign public key".into())
                })?;
            match (cfg.pin, cfg.trust) {
                (Some(pin), _) if pin == key.fingerprint() => {
                    log(&format!(
                        "pinning server key {} (matches idhal.pin)",
                        key.id()
                    ));
                }
                (Some(pin), _) => {
                    return Err(AgentError::Pin(format!(
                        "the server offered key {} with fingerprint {}, but idhal.pin is {pin}",
                        key.id(),
                        key.fingerprint()
                    )))
                }
                (None, KeyTrust::TrustFirstUse) => {
                    for _ in 0..3 {
                        log(&format!(
                            "WARNING: INSECURE trust-on-first-use: pinning key {} ({}) offered by \
                             the server WITHOUT any check; anyone on the path could have sent it",
                            key.id(),
                            key.fingerprint()
                        ));
                    }
                }
                (None, KeyTrust::Pinned) => {
                    return Err(AgentError::Pin(format!(
                        "no key baked in at {} and no idhal.pin fingerprint: refusing to trust the \
                         first key offered (bake the key in, or pass idhal.pin=sha256:...)",
                        cfg.key.display()
                    )))
                }
            }
            key
        }
    };
    write_atomic(&state.path(PINNED), key.to_file_text().as_bytes(), 0o644)?;
    Ok(key)
}
