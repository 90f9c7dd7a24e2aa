//! `idhal ca init | issue-server | enroll-key`: creating a project's CA and what it needs to
//! run (the first CRL, the address pool), VPN server certificates, and the enrollment key the
//! manifests must name.

use crate::ca::crl;
use crate::ca::db::{Db, Open};
use crate::ca::pki::{new_key, Leaf, ProjectCa, ProjectDir, Role};
use crate::ca::{project_name, require_inside_names_pool};
use crate::cmd::{load_config, Exit, Global};
use crate::config::{CaSection, ServerConfig};
use crate::names::Ipv4Net;
use crate::openvpn::management::{ensure_password_file, password_file};
use crate::publish::{write_atomic, write_new};
use idhal_manifest::time::{now, rfc3339};
use idhal_manifest::NodeId;
use rusqlite::params;

#[derive(Debug, clap::Args)]
#[command(
    about = "The project CA: create it, issue VPN server certificates, show the enrollment key",
    long_about = "Each project has its own CA, enrollment key and address pool: nodes of one \
        project are never trusted by another's VPN servers. State lives under --state-dir \
        (default /var/lib/idhal-server): idhal.sqlite (node ids, addresses, tokens, serials) and \
        projects/NAME/ (keys 0600, ca.crt, crl.pem, ccd/, servers/). Back up the whole \
        directory; see docs/enrollment.md."
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
        Command::Init { project, pool } => init(global, &cfg, project_name(project, &cfg)?, pool),
        Command::IssueServer { name, project } => {
            issue_server(global, &cfg, &project_name(project, &cfg)?, &name)
        }
        Command::EnrollKey { project } => {
            let project = project_name(project, &cfg)?;
            let ca = ProjectCa::load(&global.state_dir, &project)?;
            println!("{}", ca.enroll_public());
            Ok(Exit::Ok)
        }
    }
}

fn init(
    global: &Global,
    cfg: &ServerConfig,
    project: String,
    pool: Option<String>,
) -> anyhow::Result<Exit> {
    let pool = match pool {
        Some(p) => Ipv4Net::parse(&p)?,
        None => cfg.names.pool,
    };
    require_inside_names_pool(cfg, &project, &pool)?;
    let mut db = Db::open(&global.state_dir, Open::Create)?;
    if db.project(&project)?.is_some() {
        anyhow::bail!(
            "project {project:?} already exists (its CA is in {}); nothing changed",
            ProjectDir::new(&global.state_dir, &project).dir.display()
        );
    }
    for other in db.projects()? {
        let theirs = Ipv4Net::parse(&other.pool)?;
        anyhow::ensure!(
            !theirs.overlaps(&pool),
            "pool {pool} overlaps project {:?}'s pool {theirs}: give each project its own (--pool)",
            other.name
        );
    }
    if ProjectCa::exists(&global.state_dir, &project) {
        anyhow::bail!(
            "{} holds a CA key but the database has no project {project:?} (an interrupted `ca init`?): \
             move that directory away and run `idhal ca init` again",
            ProjectDir::new(&global.state_dir, &project).dir.display()
        );
    }
    let now = now();
    let ca = ProjectCa::create(&global.state_dir, &project, now)?;
    db.conn
        .execute(
            "INSERT INTO projects (name, created, pool, next_host, next_serial, crl_number,
                                   crl_next_update)
             VALUES (?1, ?2, ?3, 2, 1, 0, 0)",
            params![project, now as i64, pool.to_string()],
        )
        .map_err(|e| db.err(e))?;
    let crl_until = crl::regenerate(&mut db, &ca, cfg, now)?;
    let key = ca.enroll_public();
    println!(
        "project {project}: CA created in {}",
        ca.paths.dir.display()
    );
    println!("  CA certificate  {}", ca.paths.ca_cert().display());
    println!(
        "  CRL             {} (re-signed by `idhal serve` / `idhal crl refresh`; valid until {})",
        ca.paths.crl().display(),
        rfc3339(crl_until)
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
    Ok(Exit::Ok)
}

fn issue_server(
    global: &Global,
    cfg: &ServerConfig,
    project: &str,
    name: &str,
) -> anyhow::Result<Exit> {
    anyhow::ensure!(
        NodeId::try_from(name).is_ok(),
        "server name {name:?} is invalid: use 1-64 of A-Z a-z 0-9 . _ -"
    );
    let mut db = Db::open(&global.state_dir, Open::Existing)?;
    let ca = ProjectCa::load(&global.state_dir, project)?;
    let dir = ca.paths.servers();
    let (key_path, cert_path) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.crt")),
    );
    anyhow::ensure!(
        !key_path.exists(),
        "{} exists: server {name:?} already has a key (pick another name, or revoke and remove it)",
        key_path.display()
    );
    let (key_pem, key) = new_key()?;
    let now = now();
    let validity = CaSection::secs(&cfg.ca.server_cert_validity);
    let serial = db.immediate(|tx, err| {
        let serial: i64 = tx
            .query_row(
                "UPDATE projects SET next_serial = next_serial + 1 WHERE name = ?1
                 RETURNING next_serial - 1",
                [project],
                |r| r.get(0),
            )
            .map_err(err)?;
        let pem = ca.issue(
            &Leaf {
                role: Role::Server,
                cn: name,
                serial: serial as u64,
                not_before: now.saturating_sub(300),
                not_after: now + validity,
            },
            &key,
        )?;
        tx.execute(
            "INSERT INTO certs (project, serial, kind, subject, issued, not_after, pem)
             VALUES (?1, ?2, 'server', ?3, ?4, ?5, ?6)",
            params![
                project,
                serial,
                name,
                now as i64,
                (now + validity) as i64,
                pem
            ],
        )
        .map_err(err)?;
        // Files before the commit: a failure leaves no certificate row without its files.
        write_new(&key_path, key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, pem.as_bytes(), 0o644)?;
        Ok::<_, anyhow::Error>(serial)
    })?;
    println!(
        "server {name} (project {project}): certificate serial {serial}, valid until {}",
        rfc3339(now + validity)
    );
    println!("  key          {} (0600)", key_path.display());
    println!("  certificate  {}", cert_path.display());
    if let Some(pw) = password_file(cfg, &global.state_dir, project) {
        let made = ensure_password_file(&pw)?;
        println!(
            "  management   password in {} (0600{})",
            pw.display(),
            if made { ", new" } else { ", kept" }
        );
    }
    println!("next: idhal openvpn server-config --name {name} --project {project}");
    Ok(Exit::Ok)
}
