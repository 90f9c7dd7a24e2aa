//! `idhal reconcile`: reads who OpenVPN says is connected (its status file or management
//! interface) and has `node::reconcile` replay the missed events. Idempotent, for a timer.

use crate::cmd::{load_config, Exit, Global};
use crate::config::ServerConfig;
use crate::names::ServerName;
use crate::node::reconcile::{
    list_managed, reconcile, require_fresh, Listing, Options, Reconciled, StatusAge,
};
use crate::openvpn::status::{Source, Status};
use crate::process::{Deadline, NodeLock};
use idhal_manifest::time::now;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, clap::Args)]
#[command(
    about = "Repair scheduler/DNS state from OpenVPN's status file (safe from a timer)",
    long_about = "Reads who is connected from OpenVPN's status file ([reconcile] status_file; \
        OpenVPN needs `status FILE 10` and `status-version 2` or 3) or asks its management \
        interface ([reconcile] source = \"management\", `management 127.0.0.1 7505 PWFILE` in \
        OpenVPN's config; the password from [reconcile] management_password_file, else the \
        [ca] project's, as `idhal openvpn server-config` renders it), and compares the connected clients with the scheduler:\n\
        - a connected node that is missing, not Alive, or registered with another CN or address \
          is registered again (exactly as `idhal hook client-connect` does, DNS included); \
          except a node the scheduler holds down from the very session listed (same start: its \
          disconnect ran): only a status written after the scheduler was listed can show that \
          session is still connected, so reconcile waits up to [reconcile] status_wait_secs \
          for OpenVPN to rewrite its status file, else leaves the node for a newer status;\n\
        - a node idhal manages that this server registered ([openvpn] name, default the host \
          name; OAR property idhalserver) and that is Alive but no longer connected is set \
          Absent (never removed), unless its session started less than a grace before the \
          status was written (2 x [limits] hook_budget_ms + [reconcile] status_interval_secs: \
          a deferred connect answered after the write is not listed yet). A node that really \
          left within that grace is taken down by a later run. A node whose id is listed at \
          all (a client still connecting has no address yet) is left alone, and so are other \
          servers' nodes. With [hook] down_grace_secs, a node is taken down only once it has \
          been gone that long, counted from the first run that saw it gone \
          (STATE/reconcile-gone): a node moving to another server is not.\n\
        - with [routing] table, the table is made to hold exactly the listed nodes' routes \
          (one ip -batch).\n\n\
        The scheduler is listed first (only idhal's nodes, within [reconcile] \
        listing_timeout_ms), then the status is read. A status file older than [reconcile] \
        max_status_age_secs is refused (OpenVPN is not writing it: acting on it could take \
        every node down). Runs hold the same per-node locks as the hooks, and a second \
        concurrent reconcile exits at once.\n\n\
        Exit codes: 0 all consistent (or repaired); 1 the status was unreadable or stale, a \
        repair failed or an entry was \
        invalid; 2 usage or config error.\n\n\
        Example systemd timer: OnBootSec=1min, OnUnitActiveSec=1min running\n  \
        idhal --config /etc/idhal/server.toml reconcile"
)]
pub struct Args {
    /// Print what would change without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Also re-assert the A and PTR records of every connected node the scheduler already has
    /// right (repairs a DNS update that failed under on_failure = "admit"). One signed update
    /// per zone and node: meant for an hourly run rather than every minute.
    #[arg(long)]
    pub refresh_dns: bool,
    /// Status file to read instead of [reconcile]'s source.
    #[arg(long, value_name = "FILE", conflicts_with = "management")]
    pub status_file: Option<std::path::PathBuf>,
    /// OpenVPN management interface (IP:port) to ask instead of [reconcile]'s source.
    #[arg(long, value_name = "ADDR")]
    pub management: Option<SocketAddr>,
    /// Another VPN server ([openvpn] name) that is gone for good (its host died, it was
    /// removed): take down its nodes that no server has registered again, as its own
    /// reconcile would with nobody connected. Run it on any server once the gone server's
    /// nodes have had time to move (a minute): a node registered again elsewhere is left up.
    #[arg(long, value_name = "NAME", value_parser = ServerName::parse, conflicts_with_all = ["status_file", "management", "refresh_dns"])]
    pub gone_server: Option<ServerName>,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    let state_dir = &global.state_dir;
    let Ok(_running) = NodeLock::acquire(state_dir, "reconcile", Duration::ZERO) else {
        eprintln!("idhal reconcile: another reconcile is running; nothing done");
        return Ok(Exit::Ok);
    };
    if let Some(gone) = args.gone_server {
        return for_gone_server(&cfg, state_dir, gone, args.dry_run);
    }
    let source = Source::pick(args.status_file, args.management, &cfg);
    // The scheduler first, then the status: a status written after the listing proves that
    // the clients it lists were connected after the scheduler was looked at.
    let listing = list_managed(&cfg, state_dir)?;
    let mut status = read_fresh(&source, &cfg, state_dir)?;
    let live = matches!(source, Source::Management(_));
    let mut age = listing.status_age(&status, live);
    let held = listing.held_down(&status);
    if age == StatusAge::MaybeBefore && held > 0 {
        if let Some(newer) = wait_for_newer(&source, &cfg, state_dir, &listing, held) {
            status = newer;
            age = StatusAge::AfterListing;
        }
    }
    let options = Options {
        dry_run: args.dry_run,
        refresh_dns: args.refresh_dns,
        gone_server: None,
    };
    let done = reconcile(&cfg, state_dir, &listing, &status, age, options)?;
    Ok(exit(done))
}

fn exit(done: Reconciled) -> Exit {
    if done.failures == 0 {
        Exit::Ok
    } else {
        Exit::Failed
    }
}

/// `--gone-server NAME`: reconcile for a server that lists nobody any more.
fn for_gone_server(
    cfg: &ServerConfig,
    state_dir: &Path,
    gone: ServerName,
    dry_run: bool,
) -> anyhow::Result<Exit> {
    let me = cfg.server_name()?;
    if gone == me {
        anyhow::bail!(
            "--gone-server {gone} is this server ([openvpn] name): run `idhal reconcile` without it here"
        );
    }
    let known: Vec<String> = cfg
        .bird
        .servers
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    if !known.is_empty() && !known.contains(&gone.to_string()) {
        anyhow::bail!(
            "--gone-server {gone} is not in [bird.servers] ({}): a typo would take down a live server's nodes",
            known.join(", ")
        );
    }
    let listing = list_managed(cfg, state_dir)?;
    // Nobody connected, as of now: the guard still spares sessions younger than the
    // take-down grace, and every take-down keeps its session guard.
    let nobody = Status {
        written: now(),
        clients: Vec::new(),
    };
    let options = Options {
        dry_run,
        refresh_dns: false,
        gone_server: Some(gone),
    };
    let done = reconcile(
        cfg,
        state_dir,
        &listing,
        &nobody,
        StatusAge::AfterListing,
        options,
    )?;
    Ok(exit(done))
}

fn read_fresh(source: &Source, cfg: &ServerConfig, state_dir: &Path) -> anyhow::Result<Status> {
    let status = source.read(cfg, state_dir)?;
    require_fresh(
        &status,
        &source.to_string(),
        cfg.reconcile.max_status_age_secs,
        now(),
    )?;
    Ok(status)
}

/// Re-reads the status file until OpenVPN rewrites it after the listing, for at most
/// `[reconcile] status_wait_secs`; `None` when it did not (the run then leaves the nodes
/// held down for the next run). A management interface's status is live: nothing to wait for.
fn wait_for_newer(
    source: &Source,
    cfg: &ServerConfig,
    state_dir: &Path,
    listing: &Listing,
    held: usize,
) -> Option<Status> {
    if !matches!(source, Source::File(_)) {
        return None;
    }
    let wait = cfg.reconcile.status_wait_secs;
    println!(
        "idhal reconcile: the scheduler holds {held} listed sessions down (same node, same start): waiting up to {wait} s for a status written after {}",
        listing.at
    );
    let until = Deadline::after(Duration::from_secs(wait));
    loop {
        // A read can catch OpenVPN rewriting the file: an error is retried, not acted on.
        let last_error = match read_fresh(source, cfg, state_dir) {
            Ok(s) if s.written > listing.at => return Some(s),
            Ok(_) => None,
            Err(e) => Some(e),
        };
        if until.remaining() < STATUS_POLL {
            let why = last_error
                .map(|e| format!(" (last read: {e:#})"))
                .unwrap_or_default();
            println!(
                "idhal reconcile: no status written after {} within {wait} s{why}",
                listing.at
            );
            return None;
        }
        std::thread::sleep(STATUS_POLL);
    }
}

/// How often the status file is read again while waiting for OpenVPN to rewrite it.
const STATUS_POLL: Duration = Duration::from_millis(250);
