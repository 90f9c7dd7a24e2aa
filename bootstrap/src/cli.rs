//! Argument parsing, as a plain function unit tests can call. Flags become the same settings
//! the config file uses, applied last.

use crate::config::DEFAULT_CONFIG;
use crate::enroll::{self, Args as EnrollArgs};
use crate::error::AgentError;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

pub const HELP: &str = "\
idhal-bootstrap: the idhal node agent

Fetches the server's signed manifest, verifies it against the pinned server key (signature,
serial never going back, expiry), and runs each due shell scriptlet in order, recording a
marker only after success. Meant to run at boot and periodically (systemd timer or cron).

USAGE:
    idhal-bootstrap run [OPTIONS]      fetch, verify, run pending scriptlets
    idhal-bootstrap enroll [OPTIONS]   get this node's identity, certificate and OpenVPN config
                                       with a one-time token (from the first scriptlet)
    idhal-bootstrap peers [OPTIONS]    register this node's WireGuard key and endpoints, get
                                       the signed list of its project's peers (from a scriptlet)
    idhal-bootstrap renew [--force]    renew this node's certificate once it is due (a scriptlet)
    idhal-bootstrap status [--json] [--wait [--timeout DURATION]]
                                       show what was pinned, accepted, run, enrolled (no network);
                                       --wait: once this boot's work is done or failed
    idhal-bootstrap --help | --version

OPTIONS (all commands):
    --config FILE       settings file [default: /etc/idhal/bootstrap.conf]
    --state-dir DIR     node state [default: /var/lib/idhal]
    --proc DIR          where to read cmdline, boot_id, net/route [default: /proc]
OPTIONS (run, enroll, peers and renew; each overrides bootstrap.conf and the kernel command
line):
    --server URL        manifest server, e.g. http://10.0.2.100:8080/ (kernel: idhal.server=)
    --retries N         retries after a transient failure, exponential backoff with jitter
                        [default: 5]
    --timeout DURATION  deadline for one request, e.g. 60s [default: 60s]
OPTIONS (run only):
    --key FILE          server key baked into the image [default: /etc/idhal/server.pub]
    --pin FINGERPRINT   sha256:... of the server key, checked when it must be fetched
                        (kernel: idhal.pin=)
    --insecure-trust-first-use
                        with no baked key and no pin, accept the first key offered (unsafe)
    --splay DURATION    sleep a random time up to DURATION first (for cron) [default: 0]
OPTIONS (enroll only):
    --token-file FILE   the one-time token (`idhal token create`). Else, first found:
                        kernel command line idhal.token=, then QEMU fw_cfg opt/idhal/token
    --fw-cfg DIR        where fw_cfg is in sysfs [default: /sys/firmware/qemu_fw_cfg]
OPTIONS (renew only):
    --force             renew now, due or not

ENROLL:
    Runs from a scriptlet (see 000-enroll.sh.example) of a manifest signed with
    --param enroll-key=$(idhal ca enroll-key). The node makes its own key, proves it holds
    the token without sending it, accepts only an answer signed by that key, and enrolls
    once (later: \"already enrolled\", exit 0, no network).

STATUS --WAIT:
    Looks again (waiting for a run that holds the lock) until this boot's work is done or
    failed and exits with the boot run's code: 0, 6, or 5, 4, 3, 8; 10 at the deadline,
    never later. --json adds \"wait\". --timeout: 90s, 5m, 2h, 1s to 365d [default: 30m].

PEERS:
    Runs from a scriptlet (see 050-direct-paths.sh.example) after `enroll`, every refresh.
    Reads STATE/peers/wg.pub (`wg pubkey` output; wg.key is never read) and
    STATE/peers/endpoints (one ADDR:PORT per line, at most 8, may be empty), sends them signed
    with the node's enrollment key to the manifest's param peers-url (else SERVER/peers), and
    accepts only a list signed by the enrollment key that answers this very request. Then it
    writes STATE/peers/wg.conf (per peer its key, the endpoint it picked, a keepalive; no
    AllowedIPs; input for `wg set` peer by peer, never `wg addconf`, which empties AllowedIPs)
    and STATE/peers/list (`refresh N`, `keepalive N`, `fallback N`, then `peer KEY VPNADDR
    NODEID` lines), both at every verified answer. Per peer it picks the first endpoint in one
    of this node's connected subnets (/proc/net/route), else the first other one, never its own
    address nor one in the VPN pool. Refused (exit 5), unknown (403) and revoked (410) too:
    nothing is written; the path switch drops every peer once `list` is older than 3 x refresh.

RENEW:
    Once renew_at % of enroll/node.crt's lifetime is over, gets a new one like enroll and
    prints `renewed TIME` (then SIGHUP OpenVPN: 990-renew.sh.example), `unchanged TIME` or
    `not-due TIME`.

EXIT CODES:
    0 ok    2 usage    3 configuration    4 fetch failed (after retries)
    5 refused (signature, key, pin, rollback, expiry; enroll, peers, renew: the server said no,
      or its answer is not signed by the enrollment key)    6 a scriptlet failed
    7 a lock is held: another run, enroll or peers, or a scriptlet an earlier run started
    8 state directory error
    9 (status) nothing failed but scriptlets are pending or no manifest was accepted yet
    10 (status --wait) no outcome before the deadline

FILES:
    /etc/idhal/bootstrap.conf   key = value settings: server, key, pin, state_dir,
                                trust_first_use, ca_bundle, timeout, connect_timeout,
                                retries, max_manifest_size, splay, renew_at
    /var/lib/idhal/             server.pub (pinned key), serial, manifest, manifest.minisig,
                                last-run, scriptlets/<id>/{script,log,done,failed,lock},
                                enroll/{node.key,node.crt,ca.crt,openvpn.conf,address,node-id},
                                peers/{wg.pub,endpoints (the scriptlet's), wg.conf,list,state.lock}
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
    Enroll {
        common: Common,
        args: EnrollArgs,
    },
    Peers(Common),
    Renew {
        common: Common,
        force: bool,
    },
    Status {
        common: Common,
        json: bool,
        /// `--wait`, with `--timeout` if given (else `Limits::wait_timeout`).
        wait: Option<Option<Duration>>,
    },
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
                "missing command: run, enroll, peers, renew or status (see --help)".into(),
            ))
        }
    };
    let mut common = Common {
        config: DEFAULT_CONFIG.into(),
        config_required: false,
        proc_root: "/proc".into(),
        overrides: Vec::new(),
    };
    let (mut json, mut wait, mut timeout) = (false, false, None);
    let mut force = false;
    let mut args = EnrollArgs {
        token_file: None,
        fw_cfg: enroll::FW_CFG.into(),
    };
    let run = cmd == "run";
    let net = matches!(cmd.as_str(), "run" | "enroll" | "peers" | "renew");
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
            Long("wait") if cmd == "status" => {
                wait = true;
                continue;
            }
            Long("timeout") if cmd == "status" => {
                let v = p.value().map_err(usage)?.string().map_err(usage)?;
                timeout = Some(wait_timeout(&v)?);
                continue;
            }
            Long("force") if cmd == "renew" => {
                force = true;
                continue;
            }
            Long("token-file") if cmd == "enroll" => {
                args.token_file = Some(p.value().map_err(usage)?.into());
                continue;
            }
            Long("fw-cfg") if cmd == "enroll" => {
                args.fw_cfg = p.value().map_err(usage)?.into();
                continue;
            }
            Long("state-dir") => "state_dir",
            Long("server") if net => "server",
            Long("retries") if net => "retries",
            Long("timeout") if net => "timeout",
            Long("key") if run => "key",
            Long("pin") if run => "pin",
            Long("splay") if run => "splay",
            Long("insecure-trust-first-use") if run => {
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
        "enroll" => Ok(Cli::Enroll { common, args }),
        "peers" => Ok(Cli::Peers(common)),
        "renew" => Ok(Cli::Renew { common, force }),
        "status" if timeout.is_some() && !wait => {
            Err(AgentError::Usage("status --timeout needs --wait".into()))
        }
        "status" => Ok(Cli::Status {
            common,
            json,
            wait: wait.then_some(timeout),
        }),
        other => Err(AgentError::Usage(format!(
            "unknown command {other:?}: expected run, enroll, peers, renew or status (see --help)"
        ))),
    }
}

/// `status --wait --timeout`: `90s`, `5m`, `2h` or plain seconds (the agent's one duration
/// syntax), from 1 s (a zero deadline would race the first look) to 365 days.
fn wait_timeout(v: &str) -> Result<Duration, AgentError> {
    match idhal_manifest::time::parse_duration(v) {
        Ok(s @ 1..=31_536_000) => Ok(Duration::from_secs(s)),
        _ => Err(AgentError::Usage(format!(
            "--timeout {v:?}: expected 1s to 365d, such as 90s, 5m or 2h"
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
        let Cli::Status { json, common, wait } = parse(args("status --json --config /c")).unwrap()
        else {
            panic!()
        };
        assert!(json && common.config_required && wait.is_none());
        assert_eq!(parse(args("--help")).unwrap(), Cli::Help);
    }

    #[test]
    fn parses_status_wait() {
        let wait = |s: &str| match parse(args(s)) {
            Ok(Cli::Status { wait, common, .. }) => {
                assert!(common.overrides.is_empty(), "{s}: {:?}", common.overrides);
                Ok(wait)
            }
            Ok(other) => panic!("{s}: {other:?}"),
            Err(e) => Err(e.to_string()),
        };
        let secs = |n| Ok(Some(Some(Duration::from_secs(n))));
        assert_eq!(wait("status --wait"), Ok(Some(None)));
        assert_eq!(wait("status --wait --timeout 90s"), secs(90));
        assert_eq!(wait("status --timeout 5m --wait --json"), secs(300));
        assert_eq!(wait("status --wait --timeout 90"), secs(90));
        assert_eq!(wait("status --wait --timeout 2h"), secs(7200));
        assert_eq!(wait("status --wait --timeout 1s"), secs(1));
        assert_eq!(wait("status --wait --timeout 365d"), secs(31_536_000));
        // The last one given wins, as for every other flag.
        assert_eq!(wait("status --wait --timeout 1s --timeout 2s"), secs(2));
        let range =
            |v: &str| format!("usage: --timeout {v:?}: expected 1s to 365d, such as 90s, 5m or 2h");
        for (bad, why) in [
            (
                "status --timeout 5m",
                "usage: status --timeout needs --wait".into(),
            ),
            ("status --wait --timeout 0", range("0")),
            ("status --wait --timeout 0s", range("0s")),
            ("status --wait --timeout 366d", range("366d")),
            (
                "status --wait --timeout 18446744073709551615",
                range("18446744073709551615"),
            ),
            (
                "status --wait --timeout 99999999999999999999d",
                range("99999999999999999999d"),
            ),
            ("status --wait --timeout 1y", range("1y")),
            ("status --wait --timeout -5s", range("-5s")),
            ("status --wait --timeout ''", range("''")),
            (
                "status --wait --timeout",
                "usage: missing argument for option '--timeout'".into(),
            ),
            (
                "status --wait=yes",
                "usage: unexpected argument for option '--wait': \"yes\"".into(),
            ),
            ("run --wait", "usage: invalid option '--wait'".into()),
            ("enroll --wait", "usage: invalid option '--wait'".into()),
            ("peers --wait", "usage: invalid option '--wait'".into()),
        ] {
            assert_eq!(wait(bad), Err(why), "{bad}");
        }
        // `--timeout` of run, enroll and peers is still the request deadline (a setting).
        let Cli::Run(c) = parse(args("run --timeout 5s")).unwrap() else {
            panic!()
        };
        assert_eq!(c.overrides, vec![("timeout".into(), "5s".into())]);
    }

    #[test]
    fn parses_enroll() {
        let Cli::Enroll { common, args: a } = parse(args(
            "enroll --state-dir /s --server http://a/ --token-file /t --retries 1 --timeout 5s",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            common.overrides,
            vec![
                ("state_dir".into(), "/s".into()),
                ("server".into(), "http://a/".into()),
                ("retries".into(), "1".into()),
                ("timeout".into(), "5s".into()),
            ]
        );
        assert_eq!(a.token_file, Some("/t".into()));
        assert_eq!(a.fw_cfg, PathBuf::from(enroll::FW_CFG));
        let Cli::Enroll { args: a, common } =
            parse(args("enroll --fw-cfg /f --proc /p --config /c")).unwrap()
        else {
            panic!()
        };
        assert_eq!((a.token_file, a.fw_cfg), (None, "/f".into()));
        assert_eq!(common.proc_root, PathBuf::from("/p"));
        assert!(common.config_required && common.overrides.is_empty());
    }

    #[test]
    fn parses_peers() {
        let Cli::Peers(c) = parse(args(
            "peers --state-dir /s --config /c --server http://a/ --retries 2 --timeout 9s --proc /p",
        ))
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            c.overrides,
            vec![
                ("state_dir".into(), "/s".into()),
                ("server".into(), "http://a/".into()),
                ("retries".into(), "2".into()),
                ("timeout".into(), "9s".into()),
            ]
        );
        assert!(c.config_required);
        assert_eq!(c.proc_root, PathBuf::from("/p"));
        assert_eq!(parse(args("peers --help")).unwrap(), Cli::Help);
    }

    #[test]
    fn parses_renew() {
        let Cli::Renew { common, force } = parse(args(
            "renew --state-dir /s --server http://a/ --retries 2 --timeout 9s --force",
        ))
        .unwrap() else {
            panic!()
        };
        assert!(force);
        assert_eq!(
            common.overrides,
            vec![
                ("state_dir".into(), "/s".into()),
                ("server".into(), "http://a/".into()),
                ("retries".into(), "2".into()),
                ("timeout".into(), "9s".into()),
            ]
        );
        let Cli::Renew { force, .. } = parse(args("renew")).unwrap() else {
            panic!()
        };
        assert!(!force);
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
            "run --token-file /t",
            "status --fw-cfg /f",
            "enroll --key /k",
            "enroll --pin sha256:x",
            "enroll --splay 1m",
            "enroll --insecure-trust-first-use",
            "enroll --json",
            "enroll --token-file",
            "peers --token-file /t",
            "peers --fw-cfg /f",
            "peers --key /k",
            "peers --pin sha256:x",
            "peers --splay 1m",
            "peers --insecure-trust-first-use",
            "peers --json",
            "peers --server",
            "peers extra",
            "run --force",
            "peers --force",
            "status --force",
            "renew --json",
            "renew --token-file /t",
            "renew --key /k",
            "renew --force=yes",
            "renew now",
        ] {
            assert!(
                matches!(parse(args(bad)), Err(AgentError::Usage(_))),
                "{bad:?}"
            );
        }
    }
}
