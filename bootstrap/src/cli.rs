//! Argument parsing, as a plain function unit tests can call. Flags become the same settings
//! the config file uses, applied last.

use crate::config::DEFAULT_CONFIG;
use crate::error::AgentError;
use std::ffi::OsString;
use std::path::PathBuf;

pub const HELP: &str = "\
idhal-bootstrap: the idhal node agent

Fetches the server's signed manifest, verifies it against the pinned server key (signature,
serial never going back, expiry), and runs each due shell scriptlet in order, recording a
marker only after success. Meant to run at boot and periodically (systemd timer or cron).

USAGE:
    idhal-bootstrap run [OPTIONS]      fetch, verify, run pending scriptlets
    idhal-bootstrap status [--json]    show what was pinned, accepted and run (no network)
    idhal-bootstrap --help | --version

OPTIONS (run and status):
    --config FILE       settings file [default: /etc/idhal/bootstrap.conf]
    --state-dir DIR     node state [default: /var/lib/idhal]
    --proc DIR          where to read cmdline and boot_id [default: /proc]
OPTIONS (run only; each overrides bootstrap.conf and the kernel command line):
    --server URL        manifest server, e.g. http://10.0.2.100:8080/ (kernel: idhal.server=)
    --key FILE          server key baked into the image [default: /etc/idhal/server.pub]
    --pin FINGERPRINT   sha256:... of the server key, checked when it must be fetched
                        (kernel: idhal.pin=)
    --insecure-trust-first-use
                        with no baked key and no pin, accept the first key offered (unsafe)
    --retries N         fetch retries, exponential backoff with jitter [default: 5]
    --timeout DURATION  deadline for one request, e.g. 60s [default: 60s]
    --splay DURATION    sleep a random time up to DURATION first (for cron) [default: 0]

EXIT CODES:
    0 ok    2 usage    3 configuration    4 fetch failed (after retries)
    5 refused (signature, key, pin, rollback, expiry)    6 a scriptlet failed
    7 another run holds the lock    8 state directory error
    9 (status) nothing failed but scriptlets are pending or no manifest was accepted yet

FILES:
    /etc/idhal/bootstrap.conf   key = value settings: server, key, pin, state_dir,
                                trust_first_use, ca_bundle, timeout, connect_timeout,
                                retries, max_manifest_size, splay
    /var/lib/idhal/             server.pub (pinned key), serial, manifest, manifest.minisig,
                                last-run, scriptlets/<id>/{script,log,done,failed}
";

#[derive(Debug, PartialEq, Eq)]
pub struct Common {
    pub config: PathBuf,
    /// True when --config was given: then the file must exist.
    pub config_required: bool,
    pub proc_root: PathBuf,
    /// Settings from flags, applied over the file and the kernel command line.
    pub overrides: Vec<(String, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Cli {
    Run(Common),
    Status { common: Common, json: bool },
    Help,
    Version,
}

pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Cli, AgentError> {
    use lexopt::prelude::*;
    let usage = |e: lexopt::Error| AgentError::Usage(e.to_string());
    let mut p = lexopt::Parser::from_args(args);
    let cmd = match p.next().map_err(usage)? {
        Some(Value(v)) => v.string().map_err(usage)?,
        Some(Long("help") | Short('h')) => return Ok(Cli::Help),
        Some(Long("version") | Short('V')) => return Ok(Cli::Version),
        Some(other) => return Err(usage(other.unexpected())),
        None => {
            return Err(AgentError::Usage(
                "missing command: run or status (see --help)".into(),
            ))
        }
    };
    let mut common = Common {
        config: DEFAULT_CONFIG.into(),
        config_required: false,
        proc_root: "/proc".into(),
        overrides: Vec::new(),
    };
    let mut json = false;
    while let Some(arg) = p.next().map_err(usage)? {
        let setting = match arg {
            Long("help") | Short('h') => return Ok(Cli::Help),
            Long("config") => {
                common.config = p.value().map_err(usage)?.into();
                common.config_required = true;
                continue;
            }
            Long("proc") => {
                common.proc_root = p.value().map_err(usage)?.into();
                continue;
            }
            Long("json") if cmd == "status" => {
                json = true;
                continue;
            }
            Long("state-dir") => "state_dir",
            Long("server") if cmd == "run" => "server",
            Long("key") if cmd == "run" => "key",
            Long("pin") if cmd == "run" => "pin",
            Long("retries") if cmd == "run" => "retries",
            Long("timeout") if cmd == "run" => "timeout",
            Long("splay") if cmd == "run" => "splay",
            Long("insecure-trust-first-use") if cmd == "run" => {
                common
                    .overrides
                    .push(("trust_first_use".into(), "yes".into()));
                continue;
            }
            other => return Err(usage(other.unexpected())),
        };
        let value = p.value().map_err(usage)?.string().map_err(usage)?;
        common.overrides.push((setting.into(), value));
    }
    match cmd.as_str() {
        "run" => Ok(Cli::Run(common)),
        "status" => Ok(Cli::Status { common, json }),
        other => Err(AgentError::Usage(format!(
            "unknown command {other:?}: expected run or status (see --help)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn parses_run_and_status() {
        let Cli::Run(c) = parse(args(
            "run --server http://a/ --state-dir /s --insecure-trust-first-use",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.overrides,
            vec![
                ("server".into(), "http://a/".into()),
                ("state_dir".into(), "/s".into()),
                ("trust_first_use".into(), "yes".into())
            ]
        );
        assert!(!c.config_required);
        let Cli::Status { json, common } = parse(args("status --json --config /c")).unwrap() else {
            panic!()
        };
        assert!(json && common.config_required);
        assert_eq!(parse(args("--help")).unwrap(), Cli::Help);
    }

    #[test]
    fn refuses_bad_usage() {
        for bad in [
            "",
            "frobnicate",
            "run --bogus",
            "status --server x",
            "run --server",
            "run --json",
        ] {
            assert!(
                matches!(parse(args(bad)), Err(AgentError::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
