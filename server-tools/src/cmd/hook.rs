//! `idhal hook client-connect|client-disconnect|worker`: OpenVPN's scripts and the deferred
//! worker. Reads OpenVPN's environment, checks the node and gives it its address
//! (`node::admit`), then registers it here or hands it to the worker (`node::deferred`), and
//! maps the outcome to an exit code by policy ([hook] on_failure, `node::decide`).

use crate::cmd::{load_config, Exit, Global};
use crate::config::{HookMode, ServerConfig};
use crate::node::{self, deferred, one_line, Admission, Failure};
use crate::openvpn::tmpfile::{Kind, TmpFile};
use crate::process::Deadline;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const HOOK_HELP: &str = "\
Used directly as OpenVPN's client-connect / client-disconnect scripts:

  script-security 2
  setenv IDHAL_CONFIG /etc/idhal/server.toml
  setenv IDHAL_STATE_DIR /var/lib/idhal-server
  tmp-dir /var/lib/idhal-server/openvpn-tmp
  client-connect    \"/usr/local/bin/idhal hook client-connect\"
  client-disconnect \"/usr/local/bin/idhal hook client-disconnect\"

(`idhal openvpn server-config` renders these lines.)

They read OpenVPN's environment (common_name, trusted_ip, trusted_port, time_unix,
ifconfig_pool_remote_ip) and refuse any value that is not a valid node id or address (the pools'
network, broadcast and VPN server addresses included). An enrolled node gets its address from the
state database (`ifconfig-push` into OpenVPN's client-connect config file); a revoked node, or a
CN with no record that OpenVPN gave no address, is refused at once (exit 1). The node's name comes
from its VPN address through [names] template (vnode-{3}-{4} → vnode-7-38 for 10.134.7.38).

[hook] mode = \"deferred\" (default, OpenVPN >= 2.5): after those checks the hook writes 2 to
client_connect_deferred_file, hands the node to `idhal hook worker` (a service; its unix socket is
[hook] socket) and exits at once; the worker registers the node and writes 1 (accept) or 0
(refuse) within [hook] deferred_budget_ms (45 s: below the clients' 60 s hand-window). If the
worker cannot be reached or declines, the hook does the work itself and says so; a request the
worker got whole but did not answer within [hook] handoff_timeout_ms stays with it (never done
twice). OpenVPN's files must be in [openvpn] tmp_dir (rendered as tmp-dir). A disconnect is
handed to the worker too (OpenVPN waits for no verdict, and serves nobody while the script runs).
mode = \"sync\": always the hook itself.

On connect: OAR resource created once, properties set (idhalserver: this server's [openvpn]
name), state Alive (read back to confirm); DNS A and PTR replaced ([dns] update = \"rfc2136\").
On disconnect: OAR state Absent (never removed), unless a newer session of the node is
registered (later, or the same second from another client port); DNS records removed when
[dns] on_disconnect = \"remove\".

Exit codes: 0 done, handed to the worker, or failed with [hook] on_failure = \"admit\"; 1 refused:
invalid, unknown or revoked node, or a backend failed with on_failure = \"refuse\" (OpenVPN then
refuses the client); 2 usage or config error. Every backend call has a timeout and the whole
registration is capped by [limits] hook_budget_ms (in the hook) or [hook] deferred_budget_ms (in
the worker). The worker exits 1 if it cannot start (another
worker answers on the socket). See docs/hooks.md.";

#[derive(Debug, clap::Args)]
#[command(about = "OpenVPN client-connect / client-disconnect hooks (OAR + DNS), and their deferred worker", long_about = HOOK_HELP)]
pub struct Args {
    #[command(subcommand)]
    pub event: Event,
}

#[derive(Debug, clap::Subcommand)]
pub enum Event {
    /// A client connected: check it, give it its address, register it in the scheduler and DNS
    /// (here, or through the worker).
    ClientConnect {
        /// The client-connect config file OpenVPN passes (also `client_connect_config_file`):
        /// where an enrolled node's `ifconfig-push` goes.
        #[arg(value_name = "OPENVPN_TMPFILE")]
        options_file: Option<PathBuf>,
    },
    /// A client disconnected: mark it Absent in the scheduler (and drop DNS if configured),
    /// through the worker in deferred mode.
    ClientDisconnect,
    /// The deferred worker (connects and disconnects): a service that listens on [hook] socket
    /// until stopped.
    #[command(after_help = "systemd unit (docs/hooks.md):\n  \
        [Service]\n  \
        ExecStart=/usr/local/bin/idhal hook worker\n  \
        Environment=IDHAL_CONFIG=/etc/idhal/server.toml IDHAL_STATE_DIR=/var/lib/idhal-server\n  \
        Restart=always")]
    Worker,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    // vars_os: `env::vars` panics on a non-UTF-8 value, and certificate fields can hold any
    // bytes. Lossy text still fails validation, so such a value is refused, not trusted.
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let state_dir = &global.state_dir;
    Ok(match args.event {
        Event::ClientConnect { options_file } => {
            connect(&cfg, state_dir, &env, options_file.as_deref())
        }
        Event::ClientDisconnect => disconnect(&cfg, state_dir, &env),
        Event::Worker => {
            deferred::serve(cfg, state_dir.clone())?;
            Exit::Ok
        }
    })
}

const CONNECT: &str = "client-connect";

fn say(line: &str) {
    eprintln!("idhal hook {CONNECT}: {line}");
}

fn refuse(e: impl std::error::Error) -> Exit {
    say(&format!("REFUSED: {}", one_line(&e)));
    Exit::Failed
}

/// Checks the node (refused at once), writes its address, then registers it: through the worker
/// when deferred, else here.
fn connect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
    options_file: Option<&Path>,
) -> Exit {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let admission = match node::admit(cfg, state_dir, env) {
        Ok(a) => a,
        Err(f) => return exit_code(CONNECT, cfg, Err(f)),
    };
    let tmp_dir = cfg.openvpn.tmp_dir(state_dir);
    let config_file = env
        .get("client_connect_config_file")
        .map(PathBuf::from)
        .or_else(|| options_file.map(Path::to_owned));
    match (&admission.push, &config_file) {
        (Some(push), Some(path)) => {
            let written =
                TmpFile::check(path, Kind::Config, &tmp_dir).and_then(|f| f.write_config(push));
            if let Err(e) = written {
                return refuse(e);
            }
        }
        // No file to write to (not OpenVPN's way of running a hook): only when OpenVPN gave
        // the node its database address already (a pool or client-config-dir of the
        // admin's own).
        (Some(_), None)
            if env.get("ifconfig_pool_remote_ip").map(String::as_str)
                != Some(admission.session.vpn_ip.to_string().as_str()) =>
        {
            say(&format!(
                "REFUSED: {}: OpenVPN passed no client-connect config file, so the node cannot get its address {}",
                admission.session.node, admission.session.vpn_ip
            ));
            return Exit::Failed;
        }
        _ => {}
    }
    let deferred_file = env.get("client_connect_deferred_file").map(PathBuf::from);
    if let (HookMode::Deferred, Some(result), Some(config)) =
        (cfg.hook.mode, &deferred_file, &config_file)
    {
        match defer(cfg, state_dir, env, &tmp_dir, config, result, &admission) {
            Ok(exit) => return exit,
            Err(why) => say(&format!("{why}: doing it synchronously")),
        }
    }
    let result = node::connect_session(
        cfg,
        state_dir,
        &admission.session,
        &admission.host,
        deadline,
    );
    exit_code(CONNECT, cfg, result)
}

/// Writes `2`, then hands off (in that order: the worker's verdict must never be overwritten by
/// the `2`). `Err` says why the hook must do the work itself; the result file is empty again then.
fn defer(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
    tmp_dir: &Path,
    config: &Path,
    result: &Path,
    admission: &Admission,
) -> Result<Exit, String> {
    let file = TmpFile::check(result, Kind::Result, tmp_dir).map_err(|e| one_line(&e))?;
    file.write_result(Some(b'2')).map_err(|e| one_line(&e))?;
    match deferred::hand_off(cfg, state_dir, env, config, result) {
        Ok(()) => {
            say(&format!(
                "{} → {} ({}): handed to the worker",
                admission.session.node, admission.host, admission.session.vpn_ip
            ));
            Ok(Exit::Ok)
        }
        Err(e @ deferred::HandOffError::Unanswered { .. }) => {
            // The worker may have queued it: registering here too would do it twice (and its
            // verdict could land after this one). The `2` stays; the worker answers, or the
            // client gives up after its hand-window and connects again.
            say(&format!(
                "{} → {}: {}: left to the worker",
                admission.session.node,
                admission.host,
                one_line(&e)
            ));
            Ok(Exit::Ok)
        }
        Err(e) => {
            if let Err(w) = file.write_result(None) {
                // `2` would stay with nobody to answer: refuse, the client retries.
                say(&format!("{}; and {}", one_line(&e), one_line(&w)));
                return Ok(Exit::Failed);
            }
            Err(format!("worker not reached ({})", one_line(&e)))
        }
    }
}

const DISCONNECT: &str = "client-disconnect";

/// Checks the session (a refusal is said here, in one line, and never reaches the worker),
/// then in deferred mode hands the disconnect to the worker and returns (OpenVPN serves nobody
/// while this script runs, and waits for no verdict); without a worker, or in sync mode, takes
/// the node down here, unless `[hook] down_grace_secs` leaves it up for a while.
fn disconnect(cfg: &ServerConfig, state_dir: &Path, env: &HashMap<String, String>) -> Exit {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let say = |line: String| eprintln!("idhal hook {DISCONNECT}: {line}");
    let (node, down) = match node::session_down(cfg, state_dir, env) {
        Ok(checked) => checked,
        Err(f) => return exit_code(DISCONNECT, cfg, Err(f)),
    };
    if cfg.hook.mode == HookMode::Deferred {
        match deferred::hand_off_disconnect(cfg, state_dir, env) {
            Ok(()) => {
                say(format!("{node}: handed to the worker"));
                return Exit::Ok;
            }
            Err(e @ deferred::HandOffError::Unanswered { .. }) => {
                say(format!("{node}: {}: left to the worker", one_line(&e)));
                return Exit::Ok;
            }
            // Without the node's name, like the connect's: the line that names it says what
            // was done.
            Err(e) => say(format!(
                "worker not reached ({}): doing it synchronously",
                one_line(&e)
            )),
        }
    }
    if cfg.hook.down_grace_secs > 0 {
        // No process here outlives the hook to wait out the grace: reconcile counts it.
        say(format!(
            "{node}: left up for [hook] down_grace_secs ({} s): `idhal reconcile` takes it down if it stays gone",
            cfg.hook.down_grace_secs
        ));
        return Exit::Ok;
    }
    let done = node::disconnect_host(cfg, state_dir, &down, deadline);
    exit_code(DISCONNECT, cfg, done.map(|d| format!("{node}: {}", d.line)))
}

fn exit_code(name: &str, cfg: &ServerConfig, result: Result<String, Failure>) -> Exit {
    let verdict = node::decide(name, cfg, result);
    for line in &verdict.lines {
        eprintln!("idhal hook {line}");
    }
    if verdict.accept {
        Exit::Ok
    } else {
        Exit::Failed
    }
}
