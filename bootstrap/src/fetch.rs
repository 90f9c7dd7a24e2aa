//! Fetching from the manifest server: retries with exponential backoff and full jitter (so a
//! thousand nodes booting together spread out), and the publish-safe order: signature first,
//! then the immutable versioned manifest it names.

use crate::config::Limits;
use crate::error::AgentError;
use crate::http::{self, HttpError, Tls, Url};
use crate::log;
use idhal_manifest::paths;
use std::time::Duration;

pub struct Fetcher {
    pub base: Url,
    pub limits: Limits,
    pub tls: Tls,
}

/// A random u64 from the kernel (for jitter; not security-relevant).
pub fn random_u64() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)) {
        Ok(()) => u64::from_le_bytes(b),
        Err(_) => u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos(),
        ),
    }
}

/// Full jitter: uniform in [0, min(cap, base * 2^attempt)].
pub fn backoff(attempt: u32, limits: &Limits) -> Duration {
    let ceiling = limits
        .backoff_base
        .saturating_mul(1u32 << attempt.min(20))
        .min(limits.backoff_cap);
    let ms = ceiling.as_millis() as u64;
    Duration::from_millis(if ms == 0 { 0 } else { random_u64() % (ms + 1) })
}

impl Fetcher {
    fn get(&self, rel: &str, limit: usize) -> Result<Vec<u8>, (Url, HttpError)> {
        let url = self.base.join(rel);
        http::get(&url, limit, &self.limits, &self.tls).map_err(|e| (url, e))
    }

    /// Runs `attempt` until it succeeds, fails for good, or retries run out.
    fn with_retries<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, (Url, HttpError)>,
    ) -> Result<T, AgentError> {
        let mut n = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err((url, e)) if e.is_transient() && n < self.limits.retries => {
                    let wait = backoff(n, &self.limits);
                    n += 1;
                    log(&format!(
                        "fetch {url}: {e}; retry {n}/{} in {} ms",
                        self.limits.retries,
                        wait.as_millis()
                    ));
                    std::thread::sleep(wait);
                }
                Err((url, e)) => {
                    return Err(AgentError::Fetch {
                        url: url.to_string(),
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// The server's public key, for first boot without a baked-in key.
    pub fn public_key(&self) -> Result<Vec<u8>, AgentError> {
        self.with_retries(|| self.get(paths::PUBLIC_KEY, self.limits.max_key))
    }

    /// The latest signature and the manifest it signs.
    pub fn manifest(&self) -> Result<(Vec<u8>, String), AgentError> {
        self.with_retries(|| {
            let sig = self.get(paths::SIGNATURE, self.limits.max_signature)?;
            let sig = String::from_utf8_lossy(&sig).into_owned();
            // The serial is read before verification only to pick the file; verification of
            // the pair decides everything. An unparsable one falls back to the latest copy and
            // lets the verifier name the problem.
            let rel = match idhal_manifest::verify::unverified_serial(&sig) {
                Some(serial) => paths::versioned_manifest(serial),
                None => paths::MANIFEST.to_owned(),
            };
            let manifest = self.get(&rel, self.limits.max_manifest)?;
            Ok((manifest, sig))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_and_jittered() {
        let l = Limits::default();
        for attempt in 0..40 {
            let d = backoff(attempt, &l);
            assert!(d <= l.backoff_cap);
            assert!(d <= l.backoff_base * 2u32.pow(attempt.min(20)));
        }
        let samples: std::collections::HashSet<_> = (0..20).map(|_| backoff(5, &l)).collect();
        assert!(samples.len() > 1, "no jitter");
    }
}
