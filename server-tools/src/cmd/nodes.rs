//! `idhal nodes`: every enrolled node with its id, type, address, enrollment time, certificate
//! serial, revocation, and when it last registered a WireGuard key (direct paths).

use crate::ca::db::Open;
use crate::ca::state;
use crate::cmd::{load_config, Exit, Global};
use idhal_manifest::time::rfc3339;

#[derive(Debug, clap::Args)]
#[command(
    about = "List enrolled nodes",
    long_about = "Lists every enrolled node: id (its certificate's CN), type, VPN address, \
        enrollment time, certificate serial, whether it is revoked, and when it last registered \
        a WireGuard key for direct paths (`POST /peers`; `no`: never, so no other node reaches it \
        directly). Read-only.\n\n\
        --json adds `wg_key` (as `wg pubkey` prints it, or null) and `wg_registered_at`."
)]
pub struct Args {
    /// Machine-readable output (an array of objects; times in unix seconds; null: never).
    #[arg(long)]
    pub json: bool,
    /// Only this project's nodes.
    #[arg(long)]
    pub project: Option<String>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut db = state::open(&cfg, &global.state_dir, Open::Existing)?;
    let nodes = db.nodes(args.project.as_deref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
        return Ok(Exit::Ok);
    }
    println!(
        "{:<14} {:<12} {:<10} {:<15} {:<20}  {:>6}  {:<20}  WIREGUARD",
        "NODE", "PROJECT", "TYPE", "ADDRESS", "ENROLLED", "SERIAL", "REVOKED"
    );
    let or_no = |t: Option<u64>| t.map_or_else(|| "no".to_owned(), rfc3339);
    for n in nodes {
        println!(
            "{:<14} {:<12} {:<10} {:<15} {:<20}  {:>6}  {:<20}  {}",
            n.id,
            n.project,
            n.node_type,
            n.address,
            rfc3339(n.enrolled_at),
            n.cert_serial,
            or_no(n.revoked_at),
            or_no(n.wg_registered_at)
        );
    }
    Ok(Exit::Ok)
}
