//! `idhal dns zone`: static forward and reverse zone files for the whole VPN address pool, the
//! classic setup where every virtual address is declared in advance (no live updates needed).

use crate::cmd::{Exit, Global};
use crate::config::ServerConfig;
use crate::dns::zone::{render_zones, write_zones};
use idhal_manifest::time::now;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(about = "DNS for the node pool: static zone files")]
pub struct Args {
    #[command(subcommand)]
    pub command: DnsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DnsCommand {
    /// Render forward and reverse zones declaring every address of [names] pool.
    #[command(
        long_about = "Render forward and reverse zone files that declare every address of \
        [names] pool under its template name (vnode-{3}-{4} → vnode-7-38.DOMAIN A 10.134.7.38, \
        and the matching PTR).\n\n\
        Zones: [dns] forward_zone (default [names] domain) and [dns] reverse_zone (default \
        derived from a /8, /16 or /24 pool). SOA and NS use [dns] zone_ns and zone_contact.\n\n\
        Example:\n  idhal --config /etc/idhal/server.toml dns zone --out /etc/knot/zones\n\
        writes idhal.internal.zone and 134.10.in-addr.arpa.zone (atomically: temp file, fsync, rename)."
    )]
    Zone {
        /// Directory to write `<zone>.zone` files into; without it both zones go to stdout.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// SOA serial; defaults to the current unix time, which always increases.
        #[arg(long, value_name = "N")]
        serial: Option<u32>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = ServerConfig::load(global.config.as_deref())?;
    match args.command {
        DnsCommand::Zone { out, serial } => {
            // A clock before 1970 reads 0; a zone serial of 1 keeps the old behaviour.
            let serial = serial.unwrap_or_else(|| match now() {
                0 => 1,
                t => t as u32,
            });
            let zones = render_zones(&cfg, serial)?;
            match out {
                None => {
                    let mut stdout = std::io::stdout().lock();
                    for (_, text) in &zones {
                        stdout.write_all(text.as_bytes())?;
                    }
                }
                Some(dir) => {
                    for path in write_zones(&dir, &zones)? {
                        eprintln!("idhal dns zone: wrote {}", path.display());
                    }
                }
            }
            Ok(Exit::Ok)
        }
    }
}
