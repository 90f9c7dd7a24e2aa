//! `idhal hook client-connect|client-disconnect`: OpenVPN's scripts. Reads OpenVPN's
//! environment, hands it to `node::connect` / `node::disconnect`, and maps the outcome to an exit
//! code by policy ([hook] on_failure).

use crate::cmd::{load_config, Exit, Global};
use crate::config::{OnFailure, ServerConfig};
use crate::node::{self, one_line, Failure};
use std::collections::HashMap;
use std::path::PathBuf;

const HOOK_HELP: &str = "\
Used directly as OpenVPN's client-connect / client-disconnect scripts:

  script-security 2
  client-connect    \"/usr/local/bin/idhal hook client-connect --config /etc/idhal/server.toml\"
  client-disconnect \"/usr/local/bin/idhal hook client-disconnect --config /etc/idhal/server.toml\"

They read OpenVPN's environment (common_name, ifconfig_pool_remote_ip, trusted_ip, trusted_port,
time_unix) and refuse any value that is not a valid node id or address (the pools' network,
broadcast and VPN server addresses included). The node's name comes from its VPN
address through [names] template (vnode-{3}-{4} → vnode-7-38 for 10.134.7.38).

On connect: OAR resource created once, properties set (idhalserver: this server's [openvpn]
name), state Alive (read back to confirm); DNS A and PTR replaced ([dns] update = \"rfc2136\").
On disconnect: OAR state Absent (never removed), unless a newer session of the node is
registered (later, or the same second from another client port); DNS records removed when
[dns] on_disconnect = \"remove\".

Exit codes: 0 done (or failed with [hook] on_failure = \"admit\"); 1 refused: invalid input, or a
backend failed with on_failure = \"refuse\" (OpenVPN then refuses the client); 2 usage or config
error. Every backend call has a timeout and the whole hook is capped by [limits] hook_budget_ms.
See docs/hooks.md.";

#[derive(Debug, clap::Args)]
#[command(about = "OpenVPN client-connect / client-disconnect hooks (OAR + DNS)", long_about = HOOK_HELP)]
pub struct Args {
    #[command(subcommand)]
    pub event: Event,
}

#[derive(Debug, clap::Subcommand)]
pub enum Event {
    /// A client connected: register it in the scheduler and DNS.
    ClientConnect {
        /// The file OpenVPN passes for dynamic client options; idhal adds none and leaves it.
        #[arg(value_name = "OPENVPN_TMPFILE")]
        options_file: Option<PathBuf>,
    },
    /// A client disconnected: mark it Absent in the scheduler (and drop DNS if configured).
    ClientDisconnect,
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
    let (name, result) = match args.event {
        Event::ClientConnect { .. } => (
            "client-connect",
            node::connect(&cfg, &global.state_dir, &env),
        ),
        Event::ClientDisconnect => (
            "client-disconnect",
            node::disconnect(&cfg, &global.state_dir, &env),
        ),
    };
    Ok(exit_code(name, &cfg, result))
}

fn exit_code(name: &str, cfg: &ServerConfig, result: Result<String, Failure>) -> Exit {
    match result {
        Ok(line) => {
            eprintln!("idhal hook {name}: {line}");
            Exit::Ok
        }
        Err(Failure::Refused(e)) => {
            eprintln!("idhal hook {name}: REFUSED: {}", one_line(&e));
            Exit::Failed
        }
        Err(Failure::Backend(errors)) => {
            for e in &errors {
                eprintln!("idhal hook {name}: error: {}", one_line(e));
            }
            match cfg.hook.on_failure {
                OnFailure::Refuse => {
                    eprintln!("idhal hook {name}: failing (on_failure = \"refuse\"); `idhal reconcile` repairs missed events");
                    Exit::Failed
                }
                OnFailure::Admit => {
                    eprintln!("idhal hook {name}: admitting anyway (on_failure = \"admit\"); `idhal reconcile` will repair it");
                    Exit::Ok
                }
            }
        }
    }
}
