//! `idhal openvpn server-config` renders a project's server config in the classic shape (TCP,
//! tun, fixed addresses given by the hook, CRL, hooks); `idhal openvpn drain` moves every node
//! off this server (openvpn/drain.rs).

use crate::ca::project::{server_config, HookPaths};
use crate::ca::project_name;
use crate::cmd::{load_config, Exit, Global};
use crate::config::ServerConfig;
use crate::node::one_line;
use crate::openvpn::drain;
use crate::openvpn::management::{own_password_file, Management};
use crate::openvpn::status::read_management;
use anyhow::Context as _;
use std::net::SocketAddr;

#[derive(Debug, clap::Args)]
#[command(
    about = "Render a project's OpenVPN server config; drain a server",
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
    /// Move every node off this VPN server without marking it Absent: tell each connected
    /// node to move on to its next remote (`client-kill CID RESTART,[N]` on the management
    /// interface), a few per second, and nodes that connect meanwhile too, until none is
    /// connected. Then stop OpenVPN: a node that connects after the drain ended moves on when
    /// the server stops.
    #[command(
        after_help = "With [hook] down_grace_secs above the time a node takes to move \
        (a few seconds), nodes stay Alive in the scheduler throughout; without it each goes \
        Absent and back. Nodes need another remote in their config ([openvpn] remotes). \
        Nodes are moved, not refused: a refused OpenVPN 2.6 client retries the same server.\n\n\
        Exit codes: 0 no node is connected any more; 1 some still are after --timeout (named), \
        or the management interface failed.\n\n\
        Example:\n  \
        idhal --config /etc/idhal/server.toml openvpn drain --rate 20 \\\n      \
        && systemctl stop openvpn-server@idhal"
    )]
    Drain {
        /// Nodes told to move per second (the other servers take them at this rate).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rate: u32,
        /// Give up after this many seconds if nodes are still connected.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// This server's management interface (default: the first of [openvpn] management).
        #[arg(long)]
        management: Option<std::net::SocketAddr>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let (name, project) = match args.command {
        Command::ServerConfig { name, project } => (name, project),
        Command::Drain {
            rate,
            timeout,
            management,
        } => return drain(&cfg, global, rate, timeout, management),
    };
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

fn drain(
    cfg: &ServerConfig,
    global: &Global,
    rate: u32,
    timeout: u64,
    management: Option<SocketAddr>,
) -> anyhow::Result<Exit> {
    let state_dir = &global.state_dir;
    let say = |line: &str| eprintln!("idhal openvpn drain: {line}");
    let addr = management
        .or_else(|| cfg.openvpn.management.first().copied())
        .context("no management interface: give --management or set [openvpn] management")?;
    let password = own_password_file(cfg, state_dir);
    let m = Management {
        addr,
        password_file: password.as_deref(),
        timeout: cfg.limits.command_timeout(),
    };
    let pace = drain::Pace {
        per_second: rate,
        timeout: std::time::Duration::from_secs(timeout),
    };
    let started = std::time::Instant::now();
    match drain::move_everyone(
        &m,
        || read_management(addr, cfg, state_dir),
        &pace,
        |line| say(line),
    ) {
        Ok(d) => {
            say(&format!(
                "done in {:.1} s: {} node(s) told to move on ({} gone before), none connected now: stop OpenVPN",
                started.elapsed().as_secs_f64(),
                d.told,
                d.gone
            ));
            Ok(Exit::Ok)
        }
        Err(e) => {
            say(&one_line(&e));
            Ok(Exit::Failed)
        }
    }
}
