//! `idhal bird config`: the BIRD 2 config of a VPN server or of a head node, from `[bird]`
//! (rendering and checks in `bird/`), printed or written atomically with `--out`.

use crate::bird::{render_head, render_server, Cluster, KernelTable, Rendered};
use crate::cmd::{load_config, Exit, Global};
use crate::names::ServerName;
use crate::publish::write_atomic;
use anyhow::Context as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;

/// The kernel table idhal writes node /32s into.
// TODO(lead, at the r10-route merge): take it from `cfg.routing.table` ([routing] table, owned by
// r10-route) instead of this constant, and drop the constant; `KernelTable::new` still refuses
// 0 and 253-255 here whatever the config section does.
const TABLE: u32 = 100;

#[derive(Debug, clap::Args)]
#[command(about = "BIRD 2 configs: announce each VPN server's nodes to the head node(s)")]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Render the BIRD 2 config of a VPN server (default: this one, [openvpn] name) or of a
    /// head node (--head), from [bird] in --config.
    #[command(
        long_about = "Render the BIRD 2 config of a VPN server (default: this one, [openvpn] \
        name) or of a head node (--head), from [bird] in --config (docs/multi-server.md).\n\n\
        A VPN server's BIRD learns the node /32s idhal writes into kernel table 100 (protocol \
        `nodes`) and announces them over iBGP to every head in [bird] heads, each with \
        local_pref = the route's metric (the node's session start), so the newest session of \
        a node wins; it installs the other servers' nodes in its main table. A head is a route \
        reflector for any server on [bird] lan and installs every node /32 in its main table, \
        via the server the node is on. Only /32s of [names] pool are announced or accepted.\n\n\
        Refused (exit 2, nothing written, an existing --out file kept): a --name not in \
        [bird.servers], a server or head address that is not a host of [bird] lan, an empty \
        [bird] heads, two servers (or a server and a head) with one address, a --router-id not \
        in [bird] heads, [bird] lan overlapping [names] pool, kernel table 0 or 253-255.",
        after_help = "On each VPN server (as root):\n  \
        idhal --config /etc/idhal/server.toml bird config --out /etc/bird/bird.conf\n  \
        bird -p -c /etc/bird/bird.conf     # BIRD parses it; silence means it is good\n  \
        birdc configure                    # the running BIRD loads it\n  \
        birdc show protocols               # head1 ... Established\n\
        On each head node:\n  \
        idhal --config /etc/idhal/server.toml bird config --head --out /etc/bird/bird.conf\n  \
        (a second head: --router-id ITS_ADDRESS, one of [bird] heads), then the same bird -p,\n  \
        birdc configure; `birdc show route count` counts the nodes' /32s.\n\
        Every host renders from the same [bird] (one idhal config for the cluster, or copies)."
    )]
    Config {
        /// The VPN server to render for, a key of [bird.servers] (default: [openvpn] name, else
        /// the host name).
        #[arg(long, value_parser = ServerName::parse, conflicts_with = "head")]
        name: Option<ServerName>,
        /// Render a head node's config instead (route reflector).
        #[arg(long)]
        head: bool,
        /// The head's own address (its router id), one of [bird] heads (default: the first).
        #[arg(long, value_name = "ADDR", requires = "head")]
        router_id: Option<Ipv4Addr>,
        /// Write the config to FILE (atomically: temp file, fsync, rename; mode 0644) instead of
        /// stdout. A refused render leaves FILE as it was.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Command::Config {
        name,
        head,
        router_id,
        out,
    } = args.command;
    let refused = |e: &dyn std::fmt::Display| {
        eprintln!("idhal: error: {e}");
        Ok(Exit::Config)
    };
    let table = match KernelTable::new(TABLE) {
        Ok(t) => t,
        Err(e) => return refused(&e),
    };
    let cluster = match Cluster::check(&cfg.bird, cfg.names.pool, table) {
        Ok(c) => c,
        Err(e) => return refused(&e),
    };
    let config = global
        .config
        .as_deref()
        .map(std::path::absolute)
        .transpose()?;
    let src = Rendered {
        config: config.as_deref(),
    };
    let text = if head {
        render_head(&cluster, router_id, src)
    } else {
        let name = match name {
            Some(n) => n,
            None => match cfg.server_name() {
                Ok(n) => n,
                Err(e) => return refused(&e),
            },
        };
        render_server(&cluster, &name, src)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => return refused(&e),
    };
    match out {
        None => print!("{text}"),
        Some(path) => {
            write_atomic(&path, text.as_bytes(), 0o644)
                .with_context(|| format!("writing {}", path.display()))?;
            eprintln!("idhal bird config: wrote {}", path.display());
        }
    }
    Ok(Exit::Ok)
}
