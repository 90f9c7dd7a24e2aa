//! Fetching from the manifest server: retries with exponential backoff and full jitter (so a
//! thousand nodes booting together spread out), and the publish-safe order: signature first,
//! then the immutable versioned manifest it names. Also the one POST of `enroll`.

use crate::config::Limits;
use crate::error::AgentError;
use crate::http::{self, HttpError, Method, Tls, Url};
use crate::log;
use crate::random::random_u64;
use idhal_manifest::paths;
use idhal_manifest::rotation::{self, StatementFiles, MAX_STATEMENT};
use std::time::{Duration, Instant};

pub struct Fetcher {
    pub base: Url,
    pub limits: Limits,
    pub tls: Tls,
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

    /// Runs `attempt` until it succeeds, fails for good (`transient` says which errors are
    /// worth another try), or retries run out. One copy for every caller (`dyn`, not generic):
    /// the agent's size is budgeted.
    fn with_retries(
        &self,
        transient: fn(&HttpError) -> bool,
        attempt: &mut dyn FnMut() -> Result<Vec<u8>, (Url, HttpError)>,
    ) -> Result<Vec<u8>, (Url, HttpError)> {
        let mut n = 0;
        loop {
            match attempt() {
                Ok(v) => return Ok(v),
                Err((url, e)) if transient(&e) && n < self.limits.retries => {
                    let wait = backoff(n, &self.limits);
                    n += 1;
                    log(&format!(
                        "fetch {url}: {e}; retry {n}/{} in {} ms",
                        self.limits.retries,
                        wait.as_millis() as u64
                    ));
                    std::thread::sleep(wait);
                }
                Err(failed) => return Err(failed),
            }
        }
    }

    /// The server's public key, for first boot without a baked-in key.
    pub fn public_key(&self) -> Result<Vec<u8>, AgentError> {
        self.with_retries(HttpError::is_transient, &mut || {
            self.get(paths::PUBLIC_KEY, self.limits.max_key)
        })
        .map_err(fetch_error)
    }

    /// POSTs the body `make` returns to the base URL itself and returns the 200's body. `make`
    /// runs for each attempt: a retry may need a fresh request.
    pub fn post(
        &self,
        content_type: &str,
        limit: usize,
        make: &mut dyn FnMut() -> Vec<u8>,
    ) -> Result<Vec<u8>, (Url, HttpError)> {
        self.with_retries(HttpError::is_transient_post, &mut || {
            let body = make();
            let method = Method::Post {
                content_type,
                body: &body,
            };
            http::request(&self.base, method, limit, &self.limits, &self.tls)
                .map_err(|e| (self.base.clone(), e))
        })
    }

    /// Key rotation statement `n` and its two signatures; `None` when the statement is not
    /// published (the chain ends: 404, or 403/410 as object stores answer for a missing file,
    /// or a body that is no statement at all). A missing signature reads as empty: the check
    /// refuses it. Every request of a walk ends by `deadline`.
    pub fn statement(
        &self,
        n: u64,
        deadline: Instant,
    ) -> Result<Option<StatementFiles>, AgentError> {
        let get = |rel: String, limit| {
            let mut limits = self.limits.clone();
            let attempt = &mut || {
                let url = self.base.join(&rel);
                limits.request_timeout = deadline.saturating_duration_since(Instant::now());
                if limits.request_timeout.is_zero() {
                    return Err((url, HttpError::Timeout(self.limits.request_timeout)));
                }
                http::get(&url, limit, &limits, &self.tls).map_err(|e| (url, e))
            };
            match self.with_retries(HttpError::is_transient_post, attempt) {
                Err((
                    _,
                    HttpError::Status {
                        code: 403 | 404 | 410,
                        ..
                    },
                )) => Ok(None),
                // Over the cap before a byte was read: not a statement this agent will ever
                // accept, and perhaps an index page a web server answers with for a missing
                // file. It ends the chain like a 404 (a statement at most one byte over the
                // cap is read whole and refused as too large).
                Err((_, HttpError::TooLarge { .. })) => Ok(None),
                r => r.map(Some).map_err(fetch_error),
            }
        };
        let Some(statement) = get(paths::rotation_statement(n), MAX_STATEMENT + 1)?
            .filter(|s| rotation::is_statement(s))
        else {
            return Ok(None);
        };
        let sig = |rel| {
            get(rel, self.limits.max_signature)
                .map(|b| String::from_utf8_lossy(&b.unwrap_or_default()).into_owned())
        };
        Ok(Some(StatementFiles {
            statement,
            old_signature: sig(paths::rotation_old_signature(n))?,
            new_signature: sig(paths::rotation_new_signature(n))?,
        }))
    }

    /// The latest signature and the manifest it signs.
    pub fn manifest(&self) -> Result<(Vec<u8>, String), AgentError> {
        let mut sig = String::new();
        let manifest = self
            .with_retries(HttpError::is_transient, &mut || {
                let fetched = self.get(paths::SIGNATURE, self.limits.max_signature)?;
                sig = String::from_utf8_lossy(&fetched).into_owned();
                // The serial is read before verification only to pick the file; verification
                // of the pair decides everything. An unparsable one falls back to the latest
                // copy and lets the verifier name the problem.
                let rel = match idhal_manifest::verify::unverified_serial(&sig) {
                    Some(serial) => paths::versioned_manifest(serial),
                    None => paths::MANIFEST.to_owned(),
                };
                self.get(&rel, self.limits.max_manifest)
            })
            .map_err(fetch_error)?;
        Ok((manifest, sig))
    }
}

/// A fetch that failed for good, as the agent reports it (exit 4).
pub fn fetch_error((url, e): (Url, HttpError)) -> AgentError {
    AgentError::Fetch {
        url: url.to_string(),
        reason: e.to_string(),
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
