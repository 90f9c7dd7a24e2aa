//! The subcommands, one module each: every one parses its own arguments (`Args`) and calls the
//! domain code in the sibling folders (`run`). Nothing outside `cmd/` imports from here.

pub mod ca;
pub mod crl;
pub mod dns;
pub mod hook;
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
