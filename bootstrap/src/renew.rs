//! `idhal-bootstrap renew`, top to bottom: enrollment → the current certificate's validity →
//! due? → trust chain → signed request → verify the answer → record. Shares `enroll.lock` and
//! `enroll/` with `enroll` (docs/enrollment.md, "Renewal").
//!
//! Nothing is sent before renewal is due (unless `--force`), and nothing is written unless the
//! answer is signed by the enrollment key the signed manifest names, answers this very request,
//! and is for this node id and address with a certificate of this node's key, not expired.

use crate::config::Config;
use crate::enroll;
use crate::error::AgentError;
use crate::state::{write_atomic, StateDir};
use crate::trust::{self, NodeExchange, Refusals};
use idhal_manifest::der;
use idhal_manifest::enroll::{Response, MAX_RESPONSE};
use idhal_manifest::renew::{self, Request};
use idhal_manifest::time::{now, rfc3339};

/// As `enroll` (401, 403, 410, 422 here), never retried, nothing written.
static REFUSALS: Refusals = Refusals {
    cmd: "renew",
    statuses: &enroll::REFUSALS,
    error: AgentError::EnrollRefused,
    suffix: "",
};

/// A PEM certificate's (notBefore, notAfter), unix seconds.
// Not inlined: one copy for the certificate held and the one received.
#[inline(never)]
fn validity(pem: &str) -> Option<(u64, u64)> {
    der::cert_validity(&der::pem_decode("CERTIFICATE", pem)?)
}

/// When a certificate valid `from`..`until` is due: `percent` (below 100) of its lifetime in.
pub fn due_at((from, until): (u64, u64), percent: u64) -> u64 {
    from + (until - from) / 100 * percent
}

/// Renews if due (or `force`), then prints the one line for scripts on stdout: `renewed
/// NOT-AFTER`, `unchanged NOT-AFTER` or `not-due RENEW-AFTER`.
// Not inlined into main, like `enroll` and `peers`.
#[inline(never)]
pub fn renew(cfg: &Config, force: bool) -> Result<(), AgentError> {
    let (said, time) = renewal(cfg, force)?;
    println!("{said} {}", rfc3339(time));
    Ok(())
}

fn renewal(cfg: &Config, force: bool) -> Result<(&'static str, u64), AgentError> {
    let state = StateDir::new(&cfg.state_dir);
    // Due or not is known without the network, but only for a node that is enrolled (a state
    // directory that does not exist is "not enrolled" too).
    let x = trust::node_exchange(cfg, &state, "renew", renew::URL_PARAM, renew::PATH)?;
    let _lock = state.lock(enroll::LOCK)?;
    let dir = state.path(enroll::DIR);
    // Unreadable is as good as gone: due (below).
    let current = std::fs::read_to_string(dir.join(enroll::NODE_CRT)).unwrap_or_default();
    // A certificate whose validity cannot be read (gone, damaged) is due: renewing mends it.
    if let Some(v) = validity(&current).filter(|_| !force) {
        let due = due_at(v, cfg.renew_at);
        if now() < due {
            return Ok(("not-due", due));
        }
    }
    let NodeExchange {
        node,
        address,
        key,
        enroll_key,
        fetcher,
    } = &*x;
    let (body, digest) = trust::post(
        fetcher,
        renew::CONTENT_TYPE,
        MAX_RESPONSE,
        &REFUSALS,
        &mut |time, nonce| {
            Request {
                node: node.clone(),
                time,
                nonce,
            }
            .sign(key)
        },
    )?;
    let r = Response::verify(&body, enroll_key, &digest)
        .map_err(|e| AgentError::EnrollRefused(format!("renewal answer: {e}")))?;
    // Signed, so only a server's mistake gets these wrong; each would break the tunnel (a
    // certificate of another key: OpenVPN refuses to start with node.key).
    let pem = der::pem_decode("CERTIFICATE", &r.certificate).unwrap_or_default();
    let until = match der::cert_validity_and_key(&pem) {
        Some((_, until, spki))
            if r.node == node.as_str()
                && address.parse() == Ok(r.address)
                && until > now()
                && spki == &der::ed25519_spki(&key.pk)[2..] =>
        {
            until
        }
        _ => {
            return Err(AgentError::EnrollRefused(
                "renewal answer: not for this node's id, address and key, or no validity left"
                    .into(),
            ))
        }
    };
    if r.certificate == current {
        // Within the server's renew_min_interval of the certificate this node has.
        return Ok(("unchanged", until));
    }
    // node.crt last: a crash before it leaves the node due, and it asks again (the server
    // answers with the same certificate within its renew_min_interval).
    for (name, text, mode) in [
        ("ca.crt", &r.ca, 0o644),
        ("openvpn.conf", &r.openvpn, 0o600),
        (enroll::NODE_CRT, &r.certificate, 0o644),
    ] {
        write_atomic(&dir.join(name), text.as_bytes(), mode)?;
    }
    Ok(("renewed", until))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_at_a_fraction_of_the_lifetime() {
        let day = 86_400;
        // 30 days from the 5 minutes' back-dating, at 66 %: 19 days 19 h 15 min 18 s in,
        // 10 days 4 h 49 min 42 s before it expires.
        let (from, until) = (1000, 1000 + 30 * day + 300);
        let due = due_at((from, until), 66);
        assert_eq!(due - from, 19 * day + 19 * 3600 + 15 * 60 + 18);
        assert_eq!(until - due, 10 * day + 4 * 3600 + 49 * 60 + 42);
        assert_eq!(due_at((1000, 2000), 0), 1000);
        assert_eq!(due_at((1000, 2000), 99), 1990);
        // A lifetime near u64's end does not wrap.
        assert_eq!(due_at((0, u64::MAX), 99), u64::MAX / 100 * 99);
    }

    /// The answer names the request by the digest `trust::post` computes (enrollment's).
    #[test]
    fn the_request_digest_is_the_one_the_server_computes() {
        let kp =
            idhal_manifest::enroll::KeyPair::from_seed(idhal_manifest::enroll::Seed::new([7; 32]));
        let enc = Request {
            node: "client3".parse().unwrap(),
            time: 1,
            nonce: [0; 16],
        }
        .sign(&kp);
        let digest = idhal_manifest::enroll::request_digest(&enc);
        assert_eq!(Request::parse(&enc).unwrap().digest, digest);
    }
}
