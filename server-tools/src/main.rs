//! `idhal`: the server-side tools. This file only parses arguments and dispatches; each
//! subcommand lives in its own module with its own `Args` and `run`.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

mod bird;
mod ca;
mod client_name;
mod cmd;
mod config;
mod dns;
mod http;
mod names;
mod node;
mod openvpn;
mod process;
mod publish;
mod report;
mod routing;
mod scheduler;
mod signing;

use cmd::{Exit, Global};

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
        nodes, `idhal revoke NODE` cuts one off.\n\n\
        Several VPN servers: `idhal bird config` renders BIRD 2 configs that route each node's \
        address to the server it is on (docs/multi-server.md)."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Keygen(cmd::keygen::Args),
    Key(cmd::key::Args),
    Sign(cmd::sign::Args),
    Verify(cmd::verify::Args),
    Serve(cmd::serve::Args),
    Hook(cmd::hook::Args),
    Dns(cmd::dns::Args),
    Reconcile(cmd::reconcile::Args),
    Scriptlet(cmd::scriptlet::Args),
    Ca(cmd::ca::Args),
    Token(cmd::token::Args),
    Nodes(cmd::nodes::Args),
    Revoke(cmd::revoke::Args),
    Crl(cmd::crl::Args),
    Db(cmd::db::Args),
    Openvpn(cmd::openvpn::Args),
    Bird(cmd::bird::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(a) => cmd::keygen::run(a, &cli.global),
        Command::Key(a) => cmd::key::run(a, &cli.global),
        Command::Sign(a) => cmd::sign::run(a, &cli.global),
        Command::Verify(a) => cmd::verify::run(a, &cli.global),
        Command::Serve(a) => cmd::serve::run(a, &cli.global),
        Command::Hook(a) => cmd::hook::run(a, &cli.global),
        Command::Dns(a) => cmd::dns::run(a, &cli.global),
        Command::Reconcile(a) => cmd::reconcile::run(a, &cli.global),
        Command::Scriptlet(a) => cmd::scriptlet::run(a, &cli.global),
        Command::Ca(a) => cmd::ca::run(a, &cli.global),
        Command::Token(a) => cmd::token::run(a, &cli.global),
        Command::Nodes(a) => cmd::nodes::run(a, &cli.global),
        Command::Revoke(a) => cmd::revoke::run(a, &cli.global),
        Command::Crl(a) => cmd::crl::run(a, &cli.global),
        Command::Db(a) => cmd::db::run(a, &cli.global),
        Command::Openvpn(a) => cmd::openvpn::run(a, &cli.global),
        Command::Bird(a) => cmd::bird::run(a, &cli.global),
    };
    let exit = result.unwrap_or_else(|e| {
        eprintln!("idhal: error: {e:#}");
        Exit::Failed
    });
    ExitCode::from(exit.code())
}
