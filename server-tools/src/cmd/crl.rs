//! `idhal crl refresh` and the one place a project's CRL is (re)signed: after a revocation, and
//! before its nextUpdate (by this command from a timer, and by `idhal serve` on its own), so an
//! expired CRL never locks every node out of OpenVPN's `crl-verify`.

use crate::ca::crl::refresh_due;
use crate::ca::db::Open;
use crate::ca::state;
use crate::cmd::{load_config, Exit, Global};
use idhal_manifest::time::{now, rfc3339};

#[derive(Debug, clap::Args)]
#[command(
    about = "Re-sign the CRLs that are due (for a timer; `idhal serve` does it too)",
    long_about = "Re-signs each project's CRL (STATE/projects/P/crl.pem, OpenVPN's crl-verify \
        file) when less than half of [ca] crl_validity is left, or always with --force. A CRL \
        past its nextUpdate makes OpenVPN refuse every node, so run this from a timer (daily is \
        plenty with the default 30d validity) unless `idhal serve` runs on the same state. \
        The newest CRL is kept in the state database: each run also replaces crl.pem with it \
        when the database's CRL number is above the file's (a revocation made on another \
        server), atomically; the number on disk never goes back.\n\n\
        Exit codes: 0 done; 1 error; 2 usage or config error.",
    after_help = "Example: idhal crl refresh --state-dir /var/lib/idhal-server"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Re-sign every project's CRL that is due.
    Refresh {
        /// Re-sign even if not due.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Command::Refresh { force } = args.command;
    let mut db = state::open(&cfg, &global.state_dir, Open::Existing)?;
    for r in refresh_due(db.as_mut(), &global.state_dir, &cfg, now(), force)? {
        let project = &r.project;
        match (r.resigned_until, r.published) {
            (Some(next), _) => println!("{project}: CRL re-signed, valid until {}", rfc3339(next)),
            (None, Some(n)) => {
                println!("{project}: CRL not due; crl.pem updated to the database's number {n}")
            }
            (None, None) => println!("{project}: CRL not due"),
        }
    }
    Ok(Exit::Ok)
}
