//! OpenVPN configurations: `idhal openvpn server-config` renders a project's server config in
//! the classic shape (TCP, tun, fixed addresses from the client-config-dir, CRL, hooks), and
//! `client_config` is what every enrolled node receives.

use crate::ca::db::{Db, Open};
use crate::ca::pki::ProjectDir;
use crate::ca::{project_name, require_inside_names_pool, require_project};
use crate::cmd::{load_config, Exit, Global};
use crate::names::Ipv4Net;
use crate::openvpn::config::ServerSetup;
use crate::openvpn::management::{ensure_password_file, password_file};
use anyhow::Context as _;

#[derive(Debug, clap::Args)]
#[command(
    about = "Render OpenVPN configurations for a project",
    long_about = "Renders OpenVPN 2.6 configurations from the project's state and [openvpn] \
        in --config (see docs/enrollment.md)."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a server config: TCP, dev tun, the project's address pool with every node's fixed
    /// address in the client-config-dir (ccd-exclusive: only enrolled nodes get in),
    /// crl-verify, keepalive, pushed routes and DNS, a management interface on loopback with a
    /// password (the file is created 0600 when missing, never overwritten; none only with
    /// [openvpn] management_auth = "none"), and `idhal hook` as client-connect /
    /// client-disconnect.
    #[command(after_help = "Example:\n  \
        idhal ca issue-server vpn1\n  \
        idhal --config /etc/idhal/server.toml openvpn server-config --name vpn1 \\\n      \
        > /etc/openvpn/server/idhal.conf\n  \
        systemctl enable --now openvpn-server@idhal")]
    ServerConfig {
        /// The server certificate to use (made by `idhal ca issue-server NAME`).
        #[arg(long)]
        name: String,
        /// Project (default: [ca] project).
        #[arg(long)]
        project: Option<String>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Command::ServerConfig { name, project } = args.command;
    let project = project_name(project, &cfg)?;
    let db = Db::open(&global.state_dir, Open::Existing)?;
    let row = require_project(&db, &project)?;
    let pool = Ipv4Net::parse(&row.pool)?;
    require_inside_names_pool(&cfg, &project, &pool)?;
    let paths = ProjectDir::new(&global.state_dir, &project);
    let cert = paths.servers().join(format!("{name}.crt"));
    anyhow::ensure!(
        cert.is_file(),
        "no server certificate {}: run `idhal ca issue-server {name} --project {project}`",
        cert.display()
    );
    let idhal = match &cfg.openvpn.idhal {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this idhal binary")?,
    };
    let management_password = match password_file(&cfg, &global.state_dir, &project) {
        Some(pw) => {
            if ensure_password_file(&pw)? {
                eprintln!(
                    "idhal openvpn server-config: management password created in {} (0600)",
                    pw.display()
                );
            }
            Some(pw)
        }
        None => None,
    };
    let server = ServerSetup {
        project: &project,
        management_password,
        name: &name,
        pool,
        files: paths.server_files(&name),
        openvpn: &cfg.openvpn_for(&project),
        idhal: &idhal,
        config: global
            .config
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        state_dir: &std::path::absolute(&global.state_dir)?,
    };
    print!("{}", server.render()?);
    Ok(Exit::Ok)
}
