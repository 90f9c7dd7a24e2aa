//! `idhal db`: the state database itself: its schema version (`status`), bringing it to this
//! idhal's (`migrate`), and moving it to PostgreSQL (`copy`), on SQLite in --state-dir or on
//! PostgreSQL (`[state] database`).

use crate::ca::db::Open;
use crate::ca::state::migrate::{migrate, MIGRATIONS, SCHEMA_VERSION};
use crate::ca::state::postgres::PgStore;
use crate::ca::state::{self, StateError, StateStore};
use crate::cmd::{load_config, Exit, Global};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    about = "The state database: its schema version, migrating it, copying it to PostgreSQL",
    long_about = "The CA's state (projects, tokens, node ids, addresses, certificate serials, \
        CRL numbers) lives in SQLite (STATE/idhal.sqlite, the default) or, with [state] database \
        in --config, in PostgreSQL, where several `idhal serve` can share it (docs/state.md).\n\n\
        The schema has a version (meta.schema_version). Every command refuses a database whose \
        version is not this idhal's: newer means upgrade idhal, older means run `idhal db \
        migrate`. `migrate` applies the missing steps in order, each in its own transaction (on \
        PostgreSQL under an advisory lock, so servers starting together apply each step once); \
        it creates the schema in an empty database, so a new PostgreSQL database needs only \
        `idhal db migrate` (or `idhal ca init`, which migrates too). It never downgrades.\n\n\
        `copy --to URL` moves the state to PostgreSQL (from SQLite, or from another PostgreSQL \
        database): every row in one transaction, counters (next node number, next address and \
        serial of each project, CRL numbers, token uses) copied verbatim, so nothing handed out \
        is ever handed out again. The target is migrated to this idhal's schema first and must \
        be empty; the source must be at this idhal's version too. Stop `idhal serve` (and \
        enrollment) first, then point [state] database at the target. The source is left as \
        it was. Keys stay files in --state-dir (docs/state.md).\n\n\
        The PostgreSQL password comes from [state] password_file or PGPASSWORD, never from the \
        command line or the URL.\n\n\
        Exit codes: 0 done (status: the schema is this idhal's); 1 error (status: the database \
        is missing, unreachable, older or newer); 2 usage or config error.",
    after_help = "Examples:\n  \
        idhal --config /etc/idhal/server.toml db status\n  \
        PGPASSWORD=... idhal --config /etc/idhal/server.toml db migrate\n  \
        idhal --state-dir /var/lib/idhal-server db copy --to postgresql://idhal@127.0.0.1:5432/idhal --to-password-file /etc/idhal/pg-password\n\n\
        With /etc/idhal/server.toml holding:\n  \
        [state]\n  \
        database = \"postgresql://idhal@127.0.0.1:5432/idhal\"\n  \
        password_file = \"/etc/idhal/pg-password\""
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Show where the state is and its schema version against this idhal's.
    Status,
    /// Create the schema or apply the missing steps (never downgrades).
    Migrate,
    /// Copy every row into an empty PostgreSQL database, counters verbatim.
    Copy {
        /// The target: postgresql://USER@HOST:PORT/DB (or host=… user=… dbname=…), no
        /// password in it.
        #[arg(long, value_name = "URL")]
        to: String,
        /// A file whose first line is the target's password; else PGPASSWORD, else none.
        #[arg(long, value_name = "FILE")]
        to_password_file: Option<PathBuf>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    match args.command {
        Command::Status => {
            let where_ = state::describe(&cfg, &global.state_dir);
            let mut db = match state::open(&cfg, &global.state_dir, Open::Existing) {
                Ok(db) => db,
                Err(
                    e
                    @ (StateError::Older { .. } | StateError::Newer { .. } | StateError::Empty(_)),
                ) => {
                    println!("{where_}: {e}");
                    return Ok(Exit::Failed);
                }
                Err(e) => return Err(e.into()),
            };
            let version = db.schema_version()?;
            println!(
                "{where_}: schema version {version} (this idhal: {SCHEMA_VERSION}), up to date"
            );
            Ok(Exit::Ok)
        }
        Command::Migrate => {
            // Open::Existing would refuse the very databases this is for: connect and migrate.
            let mut db = state::open(&cfg, &global.state_dir, Open::Migrate)?;
            let done = migrate(db.as_mut(), MIGRATIONS)?;
            if done.from == done.to {
                println!("{}: schema version {}, up to date", db.describe(), done.to);
            } else {
                println!(
                    "{}: schema migrated from version {} to {}",
                    db.describe(),
                    done.from,
                    done.to
                );
            }
            Ok(Exit::Ok)
        }
        Command::Copy {
            to,
            to_password_file,
        } => {
            let mut from = state::open(&cfg, &global.state_dir, Open::Existing)?;
            let snapshot = from.export()?;
            let mut target = PgStore::connect(&to, to_password_file.as_deref(), Open::Create)?;
            target.import(&snapshot)?;
            println!(
                "copied {} project(s), {} token(s), {} certificate(s), {} node(s) from {} to {} \
                 (schema version {}, next node number {}); set [state] database to use it",
                snapshot.projects.len(),
                snapshot.tokens.len(),
                snapshot.certs.len(),
                snapshot.nodes.len(),
                from.describe(),
                target.describe(),
                snapshot.schema_version,
                snapshot.next_node
            );
            Ok(Exit::Ok)
        }
    }
}
