//! OpenVPN configurations: `idhal openvpn server-config` renders a project's server config in
//! the classic shape (TCP, tun, fixed addresses given by the hook, CRL, hooks), and
//! `client_config` is what every enrolled node receives.

use crate::ca::project::{server_config, HookPaths};
use crate::ca::project_name;
use crate::cmd::{load_config, Exit, Global};
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
    /// Print a server config: TCP, dev tun, the project's address pool without a dynamic pool
    /// or client-config-dir (the client-connect hook gives each enrolled node its fixed address
    /// from the state database and refuses unknown or revoked ones), tmp-dir (created 0700),
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
    let idhal = match &cfg.openvpn.idhal {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this idhal binary")?,
    };
    let hooks = HookPaths {
        idhal: &idhal,
        config: global
            .config
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        state_dir: &std::path::absolute(&global.state_dir)?,
    };
    let rendered = server_config(&global.state_dir, &cfg, &project, &name, hooks)?;
    if let Some(pw) = &rendered.password_made {
        eprintln!(
            "idhal openvpn server-config: management password created in {} (0600)",
            pw.display()
        );
    }
    // OpenVPN refuses to start when its tmp-dir is missing: made here, 0700, like the
    // password file (the worker makes it too).
    let tmp_dir = cfg
        .openvpn
        .tmp_dir(&std::path::absolute(&global.state_dir)?);
    if !tmp_dir.is_dir() {
        std::fs::create_dir_all(&tmp_dir)
            .and_then(|()| {
                std::fs::set_permissions(
                    &tmp_dir,
                    std::os::unix::fs::PermissionsExt::from_mode(0o700),
                )
            })
            .with_context(|| format!("creating OpenVPN's tmp-dir {}", tmp_dir.display()))?;
        eprintln!(
            "idhal openvpn server-config: OpenVPN's tmp-dir {} created (0700)",
            tmp_dir.display()
        );
    }
    print!("{}", rendered.config);
    Ok(Exit::Ok)
}
