//! `idhal ca init | issue-server | enroll-key`: creating a project's CA and what it needs to
//! run (the first CRL, the address pool), VPN server certificates, and the enrollment key the
//! manifests must name.

use crate::ca::pki::ProjectCa;
use crate::ca::project::{self, Created, IssuedServer};
use crate::ca::project_name;
use crate::cmd::{load_config, Exit, Global};
use crate::names::Ipv4Net;
use idhal_manifest::time::{now, rfc3339};

#[derive(Debug, clap::Args)]
#[command(
    about = "The project CA: create it, issue VPN server certificates, show the enrollment key",
    long_about = "Each project has its own CA, enrollment key and address pool: nodes of one \
        project are never trusted by another's VPN servers. State lives under --state-dir \
        (default /var/lib/idhal-server): idhal.sqlite (node ids, addresses, tokens, serials, CRLs; \
        or PostgreSQL with [state] database) and projects/NAME/ (keys 0600, ca.crt, crl.pem, \
        servers/). Back up the whole directory (and the database); see docs/state.md."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a project's CA (Ed25519), enrollment key, first CRL and address pool.
    #[command(
        after_help = "Example:\n  idhal --state-dir /var/lib/idhal-server ca init --project default --pool 10.134.0.0/16"
    )]
    Init {
        /// Project (default: [ca] project, "default").
        #[arg(long)]
        project: Option<String>,
        /// The project's VPN address pool. Its first address is the VPN server's; nodes get
        /// the following ones, each its own for good (default: [names] pool).
        #[arg(long, value_name = "CIDR")]
        pool: Option<String>,
    },
    /// Issue a certificate for an OpenVPN server (key made here, 0600): servers/NAME.{key,crt};
    /// also the project's management password file (0600) when missing, unless
    /// [openvpn] management_auth = "none".
    IssueServer {
        /// Server name: its certificate's CN and file names.
        name: String,
        /// Project (default: [ca] project, "default").
        #[arg(long)]
        project: Option<String>,
    },
    /// Print the project's enrollment public key, for `idhal sign --param enroll-key=...`.
    #[command(
        after_help = "Example:\n  idhal sign --key keys/idhal.key --param enroll-key=$(idhal ca enroll-key) --out /srv/idhal scriptlets/"
    )]
    EnrollKey {
        /// Project (default: [ca] project, "default").
        #[arg(long)]
        project: Option<String>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match args.command {
        Command::Init { project, pool } => {
            let project = project_name(project, &cfg)?;
            let pool = match pool {
                Some(p) => Ipv4Net::parse(&p)?,
                None => cfg.names.pool,
            };
            let created = project::init(&global.state_dir, &cfg, &project, pool, now())?;
            print_created(&project, &created);
        }
        Command::IssueServer { name, project } => {
            let project = project_name(project, &cfg)?;
            let issued = project::issue_server(&global.state_dir, &cfg, &project, &name, now())?;
            print_issued(&project, &name, issued)?;
        }
        Command::EnrollKey { project } => {
            let project = project_name(project, &cfg)?;
            let ca = ProjectCa::load(&global.state_dir, &project)?;
            println!("{}", ca.enroll_public());
        }
    }
    Ok(Exit::Ok)
}

fn print_created(project: &str, created: &Created) {
    let (ca, pool) = (&created.ca, created.pool);
    let key = ca.enroll_public();
    println!(
        "project {project}: CA created in {}",
        ca.paths.dir.display()
    );
    println!("  CA certificate  {}", ca.paths.ca_cert().display());
    println!(
        "  CRL             {} (re-signed by `idhal serve` / `idhal crl refresh`; valid until {})",
        ca.paths.crl().display(),
        rfc3339(created.crl_until)
    );
    println!(
        "  address pool    {pool} (VPN server {}, nodes from {})",
        pool.host(1).map(|a| a.to_string()).unwrap_or_default(),
        pool.host(2).map(|a| a.to_string()).unwrap_or_default()
    );
    println!("  enrollment key  {key}");
    println!("next:");
    println!("  idhal ca issue-server vpn1 --project {project}");
    println!("  idhal token create --type vnode --project {project}");
    println!(
        "  idhal sign --key keys/idhal.key --param enroll-key={key} --out PUBDIR SCRIPTLETDIR"
    );
}

/// Shows the certificate first, so it is known even when the management password file then
/// cannot be made (the error follows).
fn print_issued(project: &str, name: &str, issued: IssuedServer) -> anyhow::Result<()> {
    println!(
        "server {name} (project {project}): certificate serial {}, valid until {}",
        issued.serial,
        rfc3339(issued.not_after)
    );
    println!("  key          {} (0600)", issued.key.display());
    println!("  certificate  {}", issued.cert.display());
    if let Some((pw, made)) = issued.management {
        println!(
            "  management   password in {} (0600{})",
            pw.display(),
            if made? { ", new" } else { ", kept" }
        );
    }
    println!("next: idhal openvpn server-config --name {name} --project {project}");
    Ok(())
}
