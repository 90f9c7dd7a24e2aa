//! `idhal token create | list`: one-time enrollment tokens. The token is printed once; the
//! database keeps only its verifier (the public half of the key derived from it).

use crate::ca::db::Open;
use crate::ca::state::{self, StateStore};
use crate::ca::tokens;
use crate::ca::{project_name, require_project};
use crate::cmd::{load_config, Exit, Global};
use crate::names::Label;
use idhal_manifest::time::{now, parse_duration, rfc3339};

#[derive(Debug, clap::Args)]
#[command(
    about = "One-time enrollment tokens",
    long_about = "A token lets a node enroll (get a node id, an address and a certificate) at \
        most --uses times before --ttl runs out. Give it to the VM in a file (`idhal-bootstrap enroll --token-file`), \
        through QEMU fw_cfg (-fw_cfg name=opt/idhal/token,file=FILE), or on the kernel command \
        line (idhal.token=...) — readable by every local user of the node there, so only a \
        1-use token (the agent warns). The node's type comes from the token, never from the node. The token is printed \
        once, alone on stdout; the server stores only a verifier that can check a request but \
        not make one."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create a token and print it (once).
    #[command(after_help = "Examples:\n  \
        idhal token create --type vnode\n  \
        idhal token create --type gpu --uses 50 --ttl 2d --comment 'batch of 50 cloud VMs'")]
    Create {
        /// The node type (OAR `cluster` and `idhaltype`) of nodes enrolled with it.
        #[arg(long = "type", value_name = "TYPE")]
        node_type: String,
        /// How many nodes may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        uses: u32,
        /// How long it stays valid: 90s, 15m, 12h, 30d, 2w.
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Project (default: [ca] project, "default").
        #[arg(long)]
        project: Option<String>,
        /// Free text shown by `token list`.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// List tokens (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut db = state::open(&cfg, &global.state_dir, Open::Existing)?;
    match args.command {
        Command::Create {
            node_type,
            uses,
            ttl,
            project,
            comment,
        } => {
            let project = project_name(project, &cfg)?;
            require_project(db.as_mut(), &project)?;
            let node_type = Label::parse(&node_type)?;
            let ttl = parse_duration(&ttl).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(ttl > 0, "--ttl must be positive");
            anyhow::ensure!(
                !comment.chars().any(char::is_control),
                "--comment must be one line"
            );
            let now = now();
            let token =
                tokens::create(db.as_mut(), &project, &node_type, uses, now, ttl, &comment)?;
            eprintln!(
                "token {} (project {project}): type {node_type}, {uses} use{}, expires {}; \
                 shown once, only its verifier is stored",
                token.id,
                if uses == 1 { "" } else { "s" },
                rfc3339(now + ttl)
            );
            println!("{token}");
        }
        Command::List { json } => list(db.as_mut(), json)?,
    }
    Ok(Exit::Ok)
}

fn list(db: &mut dyn StateStore, json: bool) -> anyhow::Result<()> {
    let rows = tokens::list(db, now())?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<16}  {:<12} {:<10} {:>9}  {:<8} {:<20}  COMMENT",
        "TOKEN", "PROJECT", "TYPE", "USED", "STATE", "EXPIRES"
    );
    for t in rows {
        println!(
            "{:<16}  {:<12} {:<10} {:>9}  {:<8} {:<20}  {}",
            t.id,
            t.project,
            t.node_type,
            format!("{}/{}", t.used, t.uses),
            t.state,
            rfc3339(t.expires),
            t.comment
        );
    }
    Ok(())
}
