//! The agent's settings: `/etc/idhal/bootstrap.conf`, overridden by the kernel command line
//! (`idhal.server=`, `idhal.pin=`), overridden by flags. Every limit has a documented default.

use crate::error::AgentError;
use crate::http::{Tls, Url};
use idhal_manifest::Fingerprint;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const DEFAULT_CONFIG: &str = "/etc/idhal/bootstrap.conf";
pub const DEFAULT_KEY: &str = "/etc/idhal/server.pub";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/idhal";

/// How a node comes to trust the server key on first boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTrust {
    /// The key baked into the image, or a fetched key matching the pinned fingerprint.
    Pinned,
    /// Accept whatever key the server offers first (the old, unsafe way). Explicit opt-in only.
    TrustFirstUse,
}

/// Sizes, timeouts and retries, in one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Time to establish one TCP connection.
    pub connect_timeout: Duration,
    /// Deadline for one whole request, so a server that trickles bytes cannot hold us forever.
    pub request_timeout: Duration,
    /// Largest manifest accepted; the download stops as soon as it is exceeded.
    pub max_manifest: usize,
    pub max_signature: usize,
    pub max_key: usize,
    /// Retries after a failed fetch (not after a refusal), with exponential backoff and jitter.
    pub retries: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// `status --wait` without `--timeout`: the boot run's own bound (`TimeoutStartSec=` of
    /// idhal-bootstrap.service); past it systemd has stopped that run, so nothing will come.
    pub wait_timeout: Duration,
    /// `status --wait` looks at the state directory again after 50 ms, doubling up to this: a
    /// quick answer for a short wait, at most a few looks a second (each one verifies the stored
    /// manifest) beside a boot run that shares the CPU.
    pub wait_poll_cap: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_manifest: idhal_manifest::MAX_MANIFEST,
            max_signature: 8 << 10,
            max_key: 4 << 10,
            retries: 5,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
            wait_timeout: Duration::from_secs(30 * 60),
            wait_poll_cap: Duration::from_millis(500),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Base URL of the publication directory, e.g. `http://10.0.2.100:8080/`.
    pub server: Option<String>,
    /// The key baked into the image.
    pub key: PathBuf,
    pub pin: Option<Fingerprint>,
    pub trust: KeyTrust,
    pub state_dir: PathBuf,
    pub ca_bundle: Option<PathBuf>,
    /// Random delay before starting, in seconds (for cron; the systemd timer randomizes itself).
    pub splay: u64,
    /// `renew`: the percentage of its lifetime after which a certificate is renewed.
    pub renew_at: u64,
    pub limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: None,
            key: DEFAULT_KEY.into(),
            pin: None,
            trust: KeyTrust::Pinned,
            state_dir: DEFAULT_STATE_DIR.into(),
            ca_bundle: None,
            splay: 0,
            renew_at: 66,
            limits: Limits::default(),
        }
    }
}

/// Where the kernel tells us things (`--proc`, default `/proc`; tests and containers point it
/// elsewhere): the command line is a configuration layer, the boot id keys `boot` scriptlets.
pub struct Proc<'a> {
    pub root: &'a Path,
}

impl Proc<'_> {
    pub fn cmdline(&self) -> String {
        std::fs::read_to_string(self.root.join("cmdline")).unwrap_or_default()
    }

    /// The kernel's boot id: `boot` scriptlets run once per value.
    pub fn boot_id(&self) -> String {
        std::fs::read_to_string(self.root.join("sys/kernel/random/boot_id"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "yes" | "true" | "1" => Some(true),
        "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

impl Config {
    /// The configured server's base URL.
    pub fn server_url(&self) -> Result<Url, AgentError> {
        let server = self.server.as_deref().ok_or_else(|| {
            AgentError::Config(
                "no server: set server = in bootstrap.conf, idhal.server= on the kernel command \
                 line, or --server"
                    .into(),
            )
        })?;
        Url::parse(server).map_err(AgentError::Config)
    }

    /// The TLS settings for `https://` URLs: exactly the CAs in `ca_bundle`, no public roots.
    pub fn tls(&self) -> Result<Tls, AgentError> {
        match &self.ca_bundle {
            #[cfg(feature = "https")]
            Some(bundle) => Tls::from_bundle(bundle).map_err(AgentError::Config),
            #[cfg(not(feature = "https"))]
            Some(_) => Err(AgentError::Config(
                "ca_bundle is set but this idhal-bootstrap was built without the https feature"
                    .into(),
            )),
            None => Ok(Tls::default()),
        }
    }

    /// Applies one setting; `origin` names its source in errors.
    pub fn set(&mut self, key: &str, value: &str, origin: &str) -> Result<(), AgentError> {
        let bad = |why: &str| AgentError::Config(format!("{origin}: {key} = {value:?}: {why}"));
        let secs = || -> Result<u64, AgentError> {
            idhal_manifest::time::parse_duration(value).map_err(|e| bad(&e))
        };
        let num = || value.parse::<u64>().map_err(|_| bad("not a number"));
        match key {
            "server" => {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    return Err(bad("must start with http:// or https://"));
                }
                self.server = Some(value.to_owned());
            }
            "key" => self.key = value.into(),
            "pin" => self.pin = Some(value.parse().map_err(|e| bad(&format!("{e}")))?),
            "trust_first_use" => {
                let on = parse_bool(value).ok_or_else(|| bad("expected yes or no"))?;
                self.trust = if on {
                    KeyTrust::TrustFirstUse
                } else {
                    KeyTrust::Pinned
                };
            }
            "state_dir" => self.state_dir = value.into(),
            "ca_bundle" => self.ca_bundle = Some(value.into()),
            "splay" => self.splay = secs()?,
            "connect_timeout" => self.limits.connect_timeout = Duration::from_secs(secs()?),
            "timeout" => self.limits.request_timeout = Duration::from_secs(secs()?),
            "retries" => {
                self.limits.retries = u32::try_from(num()?).map_err(|_| bad("too large"))?
            }
            "renew_at" => {
                self.renew_at = Some(num()?)
                    .filter(|p| *p < 100)
                    .ok_or_else(|| bad("a percentage of the lifetime is below 100"))?
            }
            "max_manifest_size" => {
                self.limits.max_manifest = usize::try_from(num()?).map_err(|_| bad("too large"))?
            }
            _ => return Err(bad("unknown setting")),
        }
        Ok(())
    }

    /// Reads `key = value` lines (`#` comments, optional double quotes). A missing file is fine
    /// only when it is the default path.
    pub fn load_file(&mut self, path: &Path, required: bool) -> Result<(), AgentError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
            Err(e) => return Err(AgentError::Config(format!("{}: {e}", path.display()))),
        };
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let origin = format!("{}:{}", path.display(), n + 1);
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| AgentError::Config(format!("{origin}: expected key = value")))?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            self.set(k.trim(), v, &origin)?;
        }
        Ok(())
    }

    /// Applies `idhal.server=` and `idhal.pin=` from a kernel command line. Other `idhal.*`
    /// words (such as `idhal.token=`, read by `enroll`) are not settings and are skipped.
    pub fn load_cmdline(&mut self, cmdline: &str) -> Result<(), AgentError> {
        for word in cmdline.split_ascii_whitespace() {
            let Some((k, v)) = word.strip_prefix("idhal.").and_then(|w| w.split_once('=')) else {
                continue;
            };
            if matches!(k, "server" | "pin") {
                self.set(k, v, "kernel command line")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bootstrap.conf");
        std::fs::write(
            &file,
            "# comment\nserver = \"http://a:1/\"\nretries = 2\ntimeout = 2m\nstate_dir=/s\n",
        )
        .unwrap();
        let mut c = Config::default();
        c.load_file(&file, true).unwrap();
        assert_eq!(c.server.as_deref(), Some("http://a:1/"));
        assert_eq!(c.limits.request_timeout, Duration::from_secs(120));
        let pin = format!("sha256:{}", "ab".repeat(32));
        c.load_cmdline(&format!(
            "ro quiet idhal.server=http://b:2/ idhal.pin={pin} idhal.token=xyz"
        ))
        .unwrap();
        assert_eq!(c.server.as_deref(), Some("http://b:2/"));
        assert_eq!(c.pin.unwrap().to_string(), pin);
        c.set("server", "http://c:3/", "--server").unwrap();
        assert_eq!(c.server.as_deref(), Some("http://c:3/"));
        assert_eq!(c.limits.retries, 2);
        assert_eq!(c.state_dir, PathBuf::from("/s"));
    }

    #[test]
    fn shipped_example_parses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bootstrap.conf");
        std::fs::write(&file, include_str!("../dist/bootstrap.conf.example")).unwrap();
        let mut c = Config::default();
        c.load_file(&file, true).unwrap();
        assert_eq!(c.server.as_deref(), Some("http://10.0.2.100:8080/"));
        assert_eq!(c.limits, Limits::default());
    }

    #[test]
    fn renew_at_is_a_percentage_below_100() {
        let mut c = Config::default();
        assert_eq!(c.renew_at, 66);
        for (v, want) in [("0", 0), ("99", 99), ("50", 50)] {
            c.set("renew_at", v, "f:1").unwrap();
            assert_eq!(c.renew_at, want);
        }
        for bad in ["100", "250", "2/3", "-1", "", "66%"] {
            let e = c.set("renew_at", bad, "f:2").unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("config: f:2: renew_at = {bad:?}: ")),
                "{e}"
            );
            assert_eq!(c.renew_at, 50, "{bad:?} changed it");
        }
        assert_eq!(
            c.set("renew_at", "100", "f:3").unwrap_err().to_string(),
            "config: f:3: renew_at = \"100\": a percentage of the lifetime is below 100"
        );
    }

    #[test]
    fn errors_name_the_origin() {
        let mut c = Config::default();
        let e = c.set("sever", "x", "f:3").unwrap_err().to_string();
        assert_eq!(e, "config: f:3: sever = \"x\": unknown setting");
        let msg = |r: Result<(), AgentError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(c.set("server", "ftp://x", "f:1")),
            "config: f:1: server = \"ftp://x\": must start with http:// or https://"
        );
        assert_eq!(
            msg(c.load_cmdline("idhal.pin=nothex")),
            "config: kernel command line: pin = \"nothex\": fingerprint \"nothex\" is invalid: \
             expected sha256: followed by 64 hex digits"
        );
        c.load_file(Path::new("/nonexistent/x"), false).unwrap();
        assert_eq!(
            msg(c.load_file(Path::new("/nonexistent/x"), true)),
            "config: /nonexistent/x: No such file or directory (os error 2)"
        );
    }
}
