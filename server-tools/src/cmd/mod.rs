//! The subcommands, one module each: every one parses its own arguments (`Args`) and calls the
//! domain code in the sibling folders (`run`). Nothing outside `cmd/` imports from here.

pub mod bird;
pub mod ca;
pub mod crl;
pub mod db;
pub mod dns;
pub mod hook;
pub mod key;
pub mod keygen;
pub mod nodes;
pub mod openvpn;
pub mod reconcile;
pub mod revoke;
pub mod scriptlet;
pub mod serve;
pub mod sign;
pub mod token;
pub mod verify;

use crate::config::ServerConfig;
use std::path::PathBuf;

/// Options every server-side command accepts.
#[derive(Debug, Clone, clap::Args)]
pub struct Global {
    /// Server state (CA, node database, locks). The rendered OpenVPN config passes it to the
    /// hooks as IDHAL_STATE_DIR (`setenv`).
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "IDHAL_STATE_DIR",
        default_value = "/var/lib/idhal-server"
    )]
    pub state_dir: PathBuf,
    /// Server configuration (TOML, see docs/server-config.md). Optional: defaults apply without
    /// it. The rendered OpenVPN config passes it to the hooks as IDHAL_CONFIG (`setenv`).
    #[arg(long, global = true, value_name = "FILE", env = "IDHAL_CONFIG")]
    pub config: Option<PathBuf>,
}

/// How `idhal` exits: the one table of exit codes (`main` turns it into the process status;
/// docs/server-tools.md and docs/hooks.md list them, each subcommand's `--help` says which it uses).
/// Stable: OpenVPN (a hook's 1 refuses the client), timers and scripts key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Done.
    Ok,
    /// An error (any `Err` a subcommand returns); a hook refused the client or a backend failed
    /// with on_failure = "refuse"; reconcile could not repair everything.
    Failed,
    /// The server configuration cannot be read or is invalid (clap's usage errors are 2 too).
    Config,
    /// `verify`: the manifest or its signature fails verification.
    Refused,
    /// `verify`: PUBDIR is inconsistent (manifest differs from its versioned copy, or idhal.pub
    /// is another key).
    Inconsistent,
    /// `revoke`: revoked, but a management interface did not answer, so the node may stay
    /// connected until its next renegotiation.
    NotDropped,
}

impl Exit {
    pub fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Failed => 1,
            Exit::Config => 2,
            Exit::Refused => 3,
            Exit::Inconsistent | Exit::NotDropped => 4,
        }
    }
}

/// The server configuration, or `Exit::Config` once the reason is printed: a broken config is
/// the admin's to fix, not a refused client (1) nor a failed repair.
pub fn load_config(global: &Global) -> Result<ServerConfig, Exit> {
    ServerConfig::load(global.config.as_deref()).map_err(|e| {
        eprintln!("idhal: error: {:#}", anyhow::Error::new(e));
        Exit::Config
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes admins, OpenVPN and timers rely on, as docs/server-tools.md lists them (its
    /// "Code layout" table): a code changed on either side fails here.
    #[test]
    fn exit_codes_are_the_documented_ones() {
        let doc = include_str!("../../../docs/server-tools.md");
        let all = [
            Exit::Ok,
            Exit::Failed,
            Exit::Config,
            Exit::Refused,
            Exit::Inconsistent,
            Exit::NotDropped,
        ];
        for exit in all {
            let key = format!("| `Exit::{exit:?}` | ");
            let row = doc
                .lines()
                .find(|l| l.starts_with(&key))
                .unwrap_or_else(|| panic!("docs/server-tools.md has no row {key:?}"));
            let documented = row[key.len()..].split(' ').next().unwrap();
            assert_eq!(documented, exit.code().to_string(), "{exit:?}");
        }
        // The values OpenVPN (1 refuses a client) and the hooks' docs rely on.
        assert_eq!((Exit::Failed.code(), Exit::Config.code()), (1, 2));
    }
}
