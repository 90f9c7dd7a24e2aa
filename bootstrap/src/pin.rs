//! First-boot key pinning. The key comes from the image, or from the server only if it matches
//! the fingerprint the admin pinned; once pinned it is never fetched again and no other key is
//! accepted. Trusting the first key offered exists only behind an explicit, loud opt-in.
//!
//! The one way the pinned key changes: a chain of rotation statements, each signed by the key
//! pinned so far and by its successor (`idhal_manifest::rotation`), walked to its end at every
//! run (one 404 when nothing changed), and the chain's last key pinned only once a manifest
//! verified with it.

use crate::config::{Config, KeyTrust};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::log;
use crate::state::{write_atomic, StateDir};
use idhal_manifest::rotation::{self, ChainHead, Rotation, WalkError};
use idhal_manifest::{Fingerprint, KeyId, PublicKey};

pub const PINNED: &str = "server.pub";
/// The line `server.pub` gains once a rotation was followed: `idhal-rotation N ORIGIN`, the
/// statement that made the key and the id of the key this node started from (the image's, or
/// the one `idhal.pin` named). minisign reads only the first two lines, so the file stays a
/// minisign public key.
const ROTATION_LINE: &str = "idhal-rotation ";
/// More rotations than any project makes: a larger number in `server.pub` is damage.
const MAX_SEQUENCE: u64 = 1 << 20;

/// The pinned key, where it stands in the rotation chain, and the key this node started from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub head: ChainHead,
    pub origin: KeyId,
}

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
    Ok(load(state)?.map(|p| p.head.key))
}

/// What `server.pub` holds, refused unless it is what `pin` writes.
pub fn load(state: &StateDir) -> Result<Option<Pinned>, AgentError> {
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
    let (sequence, origin) = match text.lines().find_map(|l| l.strip_prefix(ROTATION_LINE)) {
        None => (0, key.id()),
        Some(rest) => {
            let (n, origin) = rest.split_once(' ').unwrap_or((rest, ""));
            let n = n
                .parse::<u64>()
                .ok()
                .filter(|v| (1..=MAX_SEQUENCE).contains(v) && v.to_string() == n);
            let origin = u64::from_str_radix(origin, 16)
                .ok()
                .filter(|_| origin.len() == 16)
                .map(|id| KeyId(id.to_le_bytes()));
            match (n, origin) {
                (Some(n), Some(o)) => (n, o),
                _ => return Err(bad(format!("bad {ROTATION_LINE}line"))),
            }
        }
    };
    Ok(Some(Pinned {
        head: ChainHead { key, sequence },
        origin,
    }))
}

fn pin(state: &StateDir, p: &Pinned) -> Result<(), AgentError> {
    let mut text = p.head.key.to_file_text();
    if p.head.sequence > 0 {
        text += &format!("{ROTATION_LINE}{} {}\n", p.head.sequence, p.origin);
    }
    write_atomic(&state.path(PINNED), text.as_bytes(), 0o644)
}

/// Walks the published rotation chain from the pinned key to its end; nothing is pinned here
/// (see [`pin_rotated`]). One request (a 404) when nothing changed.
pub fn follow(fetcher: &Fetcher, head: &ChainHead) -> Result<ChainHead, AgentError> {
    let deadline = std::time::Instant::now() + fetcher.limits.request_timeout;
    rotation::walk(head, &mut |n| fetcher.statement(n, deadline)).map_err(|e| match e {
        WalkError::Refused(r) => AgentError::Pin(r.to_string()),
        WalkError::Fetch(e) => e,
    })
}

/// Pins the chain's last key `new`, once a manifest verified with it: from now on the keys it
/// replaced sign nothing this node accepts. A crash between this and accepting the manifest
/// leaves the previous manifest stored under the new key: `enroll`, `peers` and `status` refuse
/// it until the next run accepts the new one.
pub fn pin_rotated(state: &StateDir, old: &Pinned, new: ChainHead) -> Result<(), AgentError> {
    log(&format!(
        "pinned key {} (rotation {}) in place of key {}",
        new.key.id(),
        new.sequence,
        old.head.key.id()
    ));
    pin(
        state,
        &Pinned {
            head: new,
            origin: old.origin,
        },
    )
}

/// Returns the pinned key, pinning it first if this is the first boot.
pub fn pinned_key(cfg: &Config, state: &StateDir, fetcher: &Fetcher) -> Result<Pinned, AgentError> {
    let baked = baked_key(cfg)?;
    if let Some(pinned) = load(state)? {
        // A rotated key differs from the image's by design; the key the node started from
        // does not.
        if let Some(b) = baked.filter(|b| {
            b.id() != pinned.origin || (pinned.head.sequence == 0 && *b != pinned.head.key)
        }) {
            return Err(AgentError::Pin(format!(
                "the image's key {} ({}) differs from the key {} this node pinned in {}; \
                 refusing both (remove the pinned key only if you re-keyed on purpose)",
                b.id(),
                cfg.key.display(),
                pinned.origin,
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
                (Some(pin), _) => match pinned_in_chain(fetcher, pin)? {
                    Some(old) => {
                        log(&format!(
                            "pinning key {} (matches idhal.pin; the server has rotated to key {} \
                             since, the chain is followed next)",
                            old.id(),
                            key.id()
                        ));
                        return pin_first(state, old);
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
    pin_first(state, key)
}

/// Pins `key` on first boot: the node's origin, its place in the chain unknown (sequence 0).
fn pin_first(state: &StateDir, key: PublicKey) -> Result<Pinned, AgentError> {
    let p = Pinned {
        origin: key.id(),
        head: ChainHead { key, sequence: 0 },
    };
    pin(state, &p)?;
    Ok(p)
}

/// After a rotation the server offers its current key, while an image's `idhal.pin` names an
/// older one: that key is in the published chain (a statement's `from` or `to`). It is taken
/// for its fingerprint alone, with no place in the chain (sequence 0): the statements are
/// checked later, by the walk from it, like for a key baked into the image.
fn pinned_in_chain(fetcher: &Fetcher, pin: Fingerprint) -> Result<Option<PublicKey>, AgentError> {
    let deadline = std::time::Instant::now() + fetcher.limits.request_timeout;
    for n in 1..=rotation::MAX_CHAIN {
        let Some(files) = fetcher.statement(n, deadline)? else {
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
