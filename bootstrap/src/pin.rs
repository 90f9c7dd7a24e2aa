//! First-boot key pinning. The key comes from the image, or from the server only if it matches
//! the fingerprint the admin pinned; once pinned it is never fetched again and no other key is
//! accepted. Trusting the first key offered exists only behind an explicit, loud opt-in.
//!
//! The one way the pinned key changes: a chain of rotation statements, each signed by the key
//! pinned so far and by its successor (`idhal_manifest::rotation`), followed only when a manifest
//! is signed by another key, and pinned only once that manifest verified with the chain's key.

use crate::config::{Config, KeyTrust};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::log;
use crate::state::{write_atomic, StateDir};
use idhal_manifest::rotation::{self, ChainHead, Rotation, WalkError};
use idhal_manifest::{Fingerprint, KeyId, PublicKey};

pub const PINNED: &str = "server.pub";
/// The line `server.pub` gains once a rotation was followed: the statement that made the key.
/// minisign reads only the first two lines, so the file stays a minisign public key.
const ROTATION_LINE: &str = "idhal-rotation ";

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
    Ok(load_head(state)?.map(|h| h.key))
}

/// The pinned key and the rotation statement it came from (0: the image's or the first key).
pub fn load_head(state: &StateDir) -> Result<Option<ChainHead>, AgentError> {
    let path = state.path(PINNED);
    let bad = |why: String| {
        AgentError::state(
            &path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, why),
        )
    };
    let Some(text) = state.read(&path)? else {
        return Ok(None);
    };
    let key = PublicKey::parse(&text).map_err(|e| bad(e.to_string()))?;
    let sequence = match text.lines().find_map(|l| l.strip_prefix(ROTATION_LINE)) {
        None => 0,
        Some(n) => n
            .parse()
            .map_err(|_| bad(format!("bad {ROTATION_LINE}line")))?,
    };
    Ok(Some(ChainHead { key, sequence }))
}

fn pin(state: &StateDir, head: &ChainHead) -> Result<(), AgentError> {
    let mut text = head.key.to_file_text();
    if head.sequence > 0 {
        text += &format!("{ROTATION_LINE}{}\n", head.sequence);
    }
    write_atomic(&state.path(PINNED), text.as_bytes(), 0o644)
}

/// Follows the published rotation chain from `head` to the key `target` that signed a manifest.
/// Returns the new head; nothing is pinned here (see [`pin_rotated`]).
pub fn follow(fetcher: &Fetcher, head: &ChainHead, target: KeyId) -> Result<ChainHead, AgentError> {
    rotation::walk(head, Some(target), &mut |n| fetcher.statement(n)).map_err(|e| match e {
        WalkError::Refused(r) => AgentError::Pin(r.to_string()),
        WalkError::Fetch(e) => e,
    })
}

/// Pins a key reached by [`follow`], once a manifest verified with it: from now on the old key
/// signs nothing this node accepts.
pub fn pin_rotated(state: &StateDir, old: &ChainHead, new: &ChainHead) -> Result<(), AgentError> {
    pin(state, new)?;
    log(&format!(
        "pinned key {} (rotation {}) in place of key {}",
        new.key.id(),
        new.sequence,
        old.key.id()
    ));
    Ok(())
}

/// Returns the pinned key, pinning it first if this is the first boot.
pub fn pinned_key(
    cfg: &Config,
    state: &StateDir,
    fetcher: &Fetcher,
) -> Result<ChainHead, AgentError> {
    let baked = baked_key(cfg)?;
    if let Some(head) = load_head(state)? {
        let pinned = &head.key;
        // A rotated key differs from the image's by design: the image's was the chain's start.
        if let Some(b) = baked.filter(|b| b != pinned && head.sequence == 0) {
            return Err(AgentError::Pin(format!(
                "the image's key {} ({}) differs from the key {} pinned in {}; \
                 refusing both (remove the pinned key only if you re-keyed on purpose)",
                b.id(),
                cfg.key.display(),
                pinned.id(),
                state.path(PINNED).display()
            )));
        }
        return Ok(head);
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
                (Some(pin), _) => match pinned_in_chain(fetcher, pin)? {
                    Some(old) => {
                        log(&format!(
                            "pinning key {} (matches idhal.pin; the server has rotated to key {} \
                             since, the chain is followed next)",
                            old.id(),
                            key.id()
                        ));
                        return pin_head(state, old);
                    }
                    None => {
                        return Err(AgentError::Pin(format!(
                            "the server offered key {} with fingerprint {}, but idhal.pin is {pin}",
                            key.id(),
                            key.fingerprint()
                        )))
                    }
                },
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
    pin_head(state, key)
}

/// Pins `key` as the chain's start, its place in the chain unknown (sequence 0).
fn pin_head(state: &StateDir, key: PublicKey) -> Result<ChainHead, AgentError> {
    let head = ChainHead { key, sequence: 0 };
    pin(state, &head)?;
    Ok(head)
}

/// After a rotation the server offers its current key, while an image's `idhal.pin` names an
/// older one: that key is in the published chain (a statement's `from` or `to`). It is taken
/// for its fingerprint alone, with no place in the chain (sequence 0): the statements are
/// checked later, by the walk from it, like for a key baked into the image.
fn pinned_in_chain(fetcher: &Fetcher, pin: Fingerprint) -> Result<Option<PublicKey>, AgentError> {
    for n in 1..=rotation::MAX_CHAIN {
        let Some(files) = fetcher.statement(n)? else {
            break;
        };
        if let Ok(r) = Rotation::parse(&files.statement, n) {
            if let Some(k) = [r.from, r.to].into_iter().find(|k| k.fingerprint() == pin) {
                return Ok(Some(k));
            }
        }
    }
    Ok(None)
}
