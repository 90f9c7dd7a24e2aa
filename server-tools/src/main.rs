//! `idhal`: the server-side tools. This file only parses arguments and dispatches; each
//! subcommand lives in its own module with its own `Args` and `run`.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

mod ca;
mod config;
mod crl;
mod db;
mod dns;
mod dnsupdate;
mod enroll;
mod hook;
mod http;
mod keygen;
mod keys;
mod management;
mod names;
mod nodes;
mod oar;
mod openvpn;
mod openvpn_env;
mod pki;
mod process;
mod publish;
mod reconcile;
mod revoke;
mod scheduler;
mod scriptlet;
mod serve;
mod sign;
mod token;
mod verify;

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

#[derive(Debug, Parser)]
#[command(
    name = "idhal",
    version,
    about = "idhal server tools: sign and serve manifests, run the project CA and enrollment, the OpenVPN hooks",
    long_about = "idhal server tools.\n\n\
        Typical flow: `idhal keygen --dir keys` once, bake keys/idhal.pub into the node image, then \
        from CI `idhal sign --key keys/idhal.key --out /srv/idhal scriptlets/` and serve /srv/idhal \
        with `idhal serve --root /srv/idhal` (or any static web server).\n\n\
        Enrollment: `idhal ca init` once per project, `idhal ca issue-server vpn1`, \
        `idhal openvpn server-config --name vpn1`, then `idhal token create --type vnode` per \
        node (or batch); sign manifests with `--param enroll-key=$(idhal ca enroll-key)`; \
        `idhal serve --root /srv/idhal` then also answers POST /enroll. `idhal nodes` lists \
        nodes, `idhal revoke NODE` cuts one off."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Keygen(keygen::Args),
    Sign(sign::Args),
    Verify(verify::Args),
    Serve(serve::Args),
    Hook(hook::Args),
    Dns(dns::Args),
    Reconcile(reconcile::Args),
    Scriptlet(scriptlet::Args),
    Ca(ca::Args),
    Token(token::Args),
    Nodes(nodes::Args),
    Revoke(revoke::Args),
    Crl(crl::Args),
    Openvpn(openvpn::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => keygen::run(a, &cli.global),
        Command::Sign(a) => sign::run(a, &cli.global),
        Command::Verify(a) => verify::run(a, &cli.global),
        Command::Serve(a) => serve::run(a, &cli.global),
        Command::Hook(a) => hook::run(a, &cli.global),
        Command::Dns(a) => dns::run(a, &cli.global),
        Command::Reconcile(a) => reconcile::run(a, &cli.global),
        Command::Scriptlet(a) => scriptlet::run(a, &cli.global),
        Command::Ca(a) => ca::run(a, &cli.global),
        Command::Token(a) => token::run(a, &cli.global),
        Command::Nodes(a) => nodes::run(a, &cli.global),
        Command::Revoke(a) => revoke::run(a, &cli.global),
        Command::Crl(a) => crl::run(a, &cli.global),
        Command::Openvpn(a) => openvpn::run(a, &cli.global),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idhal: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
