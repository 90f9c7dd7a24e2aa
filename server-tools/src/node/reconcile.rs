//! `idhal reconcile`'s repair: compares the clients OpenVPN lists with what the scheduler
//! holds and replays the missed connect/disconnect events through `node`, as the hooks would.

use crate::config::ServerConfig;
use crate::dns;
use crate::names::{HostName, ServerName};
use crate::node::gone::Gone;
use crate::node::{
    connect_session, disconnect_hosts, node_addresses, one_line, refresh_node_dns, Down, Failure,
    NodeError,
};
use crate::openvpn::env::Session;
use crate::openvpn::status::{real_ip, Status};
use crate::process::Deadline;
use crate::routing::{plan, Change, Keep, Route, RoutingError};
use crate::scheduler::{self, backend, DownGuard, Scheduler};
use idhal_manifest::time::now;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::Path;

/// What `reconcile` may do besides repairing.
#[derive(Debug, Clone)]
pub struct Options {
    /// Print what would change without changing anything.
    pub dry_run: bool,
    /// Also re-assert the A and PTR records of nodes the scheduler already has right.
    pub refresh_dns: bool,
    /// Act for this other server, gone for good (`--gone-server`), as if its OpenVPN listed no
    /// client: its nodes no server registered again are taken down at once (no down grace:
    /// the admin says the server is gone), this host's routes are left alone.
    pub gone_server: Option<ServerName>,
}

/// How a run ended: every repair tried, `failures` of them (or of the entries) failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    pub failures: usize,
}

/// Refuses a status older than `limit` seconds at `now`: OpenVPN is not writing it, and acting
/// on it could take every node down. `from` names where it was read.
pub fn require_fresh(status: &Status, from: &str, limit: u64, now: u64) -> Result<(), NodeError> {
    let age = now.saturating_sub(status.written);
    if age > limit {
        return Err(NodeError::StaleStatus {
            from: from.to_owned(),
            age,
            limit,
        });
    }
    Ok(())
}

/// What the scheduler held when reconcile looked, taken BEFORE the status is read.
pub struct Listing {
    sched: Option<Box<dyn Scheduler>>,
    pub managed: Vec<scheduler::ManagedNode>,
    /// The unix second right after the scheduler answered: a status whose TIME is later was
    /// written after the listing.
    pub at: u64,
}

/// Asks the scheduler for idhal's nodes, under `[reconcile] listing_timeout_ms`.
pub fn list_managed(cfg: &ServerConfig, state_dir: &Path) -> Result<Listing, NodeError> {
    let sched = backend::open(cfg, state_dir);
    let managed = match &sched {
        Some(s) => s
            .managed_nodes(Deadline::after(cfg.reconcile.listing_timeout()))
            .map_err(|source| NodeError::Scheduler {
                backend: s.name(),
                doing: "listing idhal's nodes".into(),
                source,
            })?,
        None => Vec::new(),
    };
    Ok(Listing {
        sched,
        managed,
        at: now(),
    })
}

/// Whether a status is known to have been written after the scheduler's listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusAge {
    /// A management interface's live answer, or a status file whose TIME is past the
    /// listing's second.
    AfterListing,
    /// Written in the listing's second or before: it may predate a disconnect the listing
    /// already shows.
    MaybeBefore,
}

impl Listing {
    /// `live`: the status was asked for after the listing returned (management interface).
    pub fn status_age(&self, status: &Status, live: bool) -> StatusAge {
        if live || status.written > self.at {
            StatusAge::AfterListing
        } else {
            StatusAge::MaybeBefore
        }
    }

    /// How many of `status`'s clients the scheduler holds down from that very session (same
    /// node id, same start): their disconnect hook ran. Only a status written after the
    /// listing tells whether they are still connected (a half-failed connect) or gone (the
    /// status predates their disconnect). Raw fields: the run validates each line later.
    pub fn held_down(&self, status: &Status) -> usize {
        let Some(sched) = &self.sched else { return 0 };
        status
            .clients
            .iter()
            .filter(|e| {
                let cn = e.fields.get("common_name");
                let since = e
                    .fields
                    .get("time_unix")
                    .and_then(|t| t.parse::<u64>().ok());
                self.managed.iter().any(|m| {
                    !sched.is_up_state(&m.state)
                        && m.node.as_ref().is_some_and(|n| Some(n) == cn)
                        && since.is_some()
                        && m.since == since
                })
            })
            .count()
    }
}

/// Registers the connected nodes the scheduler lacks (or has wrong) and takes down this
/// server's nodes `status` no longer lists, under the hooks' per-node locks. `listing` was
/// taken before `status` was read; `age` says whether `status` is known to be newer.
pub fn reconcile(
    cfg: &ServerConfig,
    state_dir: &Path,
    listing: &Listing,
    status: &Status,
    age: StatusAge,
    options: Options,
) -> Result<Reconciled, NodeError> {
    let dry_run = options.dry_run;
    let server = match &options.gone_server {
        Some(gone) => gone.clone(),
        None => cfg.server_name()?,
    };
    let addresses = node_addresses(cfg, state_dir)?;
    let mut failures = 0usize;
    let mut connected: BTreeMap<String, (Session, HostName)> = BTreeMap::new();
    // Every CN the status lists, valid or not: a listed client is connected (or connecting),
    // and its node is never taken down on this status.
    let mut listed: BTreeSet<String> = BTreeSet::new();
    let mut connecting = 0usize;
    for entry in &status.clients {
        let cn = entry.fields.get("common_name").filter(|c| !c.is_empty());
        if let Some(cn) = cn {
            listed.insert(cn.clone());
        }
        let vaddr = entry.fields.get("ifconfig_pool_remote_ip");
        if let (Some(cn), None | Some("")) = (cn, vaddr.map(String::as_str)) {
            // OpenVPN lists a client before its client-connect hook gave it an address.
            connecting += 1;
            let shown: String = cn.chars().take(64).collect();
            println!(
                "idhal reconcile: {shown:?} is still connecting (status line {}, no VPN address yet): its node is left alone",
                entry.line
            );
            continue;
        }
        let mut env: HashMap<String, String> = entry
            .fields
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        if let Some((ip, port)) = entry.fields.get("real").and_then(|r| real_ip(r)) {
            let key = if ip.contains(':') {
                "trusted_ip6"
            } else {
                "trusted_ip"
            };
            env.insert(key.into(), ip);
            if let Some(port) = port {
                env.insert("trusted_port".into(), port);
            }
        }
        // The same validation as the hook: a status file is input too.
        let parsed = Session::from_env(&env, &addresses, status.written)
            .map_err(NodeError::from)
            .and_then(|s| {
                let label = cfg.names.template.render(s.vpn_ip)?;
                let host = HostName {
                    label,
                    domain: cfg.names.domain.clone(),
                };
                Ok((s, host))
            });
        match parsed {
            Ok((s, host)) => {
                connected.insert(host.to_string(), (s, host));
            }
            Err(e) => {
                failures += 1;
                eprintln!(
                    "idhal reconcile: status line {}: skipped: {}",
                    entry.line,
                    one_line(&e)
                );
            }
        }
    }

    let sched = &listing.sched;
    let managed = &listing.managed;
    let by_host: HashMap<&str, &scheduler::ManagedNode> =
        managed.iter().map(|m| (m.host.as_str(), m)).collect();

    let (mut repaired, mut downed, mut refreshed, mut others) = (0usize, 0usize, 0usize, 0usize);
    let mut waiting = 0usize;
    let refresh_dns = options.refresh_dns && dns::backend::open(cfg).is_live();
    for (name, (session, host)) in &connected {
        let ok = match (sched, by_host.get(name.as_str())) {
            (Some(_), Some(m)) if m.since.is_some_and(|since| since > session.since) => {
                // Registered from a newer session than this listing shows (the node moved
                // to another server, or reconnected since): the newer registration stands.
                println!(
                    "idhal reconcile: {host}: registered from a newer session than listed here, left alone"
                );
                continue;
            }
            (Some(s), Some(m))
                if age == StatusAge::MaybeBefore
                    && !s.is_up_state(&m.state)
                    && m.since == Some(session.since)
                    && m.node.as_deref() == Some(session.node.as_str()) =>
            {
                // This very session's disconnect hook took it down, maybe after the status
                // was written: registering it again from this status could make a ghost.
                // OpenVPN drops a client from its status once its disconnect script is done,
                // so a status written after the listing will tell.
                waiting += 1;
                println!(
                    "idhal reconcile: {host}: {} holds this very session down (its disconnect may have run after the status was written), and the status (written {}) is not newer than the listing ({}): left for a newer status",
                    s.name(),
                    status.written,
                    listing.at
                );
                continue;
            }
            (Some(s), Some(m)) => {
                s.is_up_state(&m.state)
                    && m.node.as_deref() == Some(session.node.as_str())
                    && m.vpn_ip.as_deref() == Some(session.vpn_ip.to_string().as_str())
                    && m.server.as_deref() == Some(server.as_str())
            }
            (Some(_), None) => false,
            // Without a scheduler only DNS is left to assert, which is idempotent.
            (None, _) => false,
        };
        if ok && refresh_dns && !dry_run {
            match refresh_node_dns(
                cfg,
                state_dir,
                session,
                host,
                Deadline::after(cfg.limits.hook_budget()),
            ) {
                Ok(_) => refreshed += 1,
                Err(e) => {
                    failures += 1;
                    report(&e, host);
                }
            }
        }
        if ok {
            continue;
        }
        if dry_run {
            println!(
                "would register {} → {host} ({})",
                session.node, session.vpn_ip
            );
            continue;
        }
        let deadline = Deadline::after(cfg.limits.hook_budget());
        match connect_session(cfg, state_dir, session, host, deadline) {
            Ok(line) => {
                repaired += 1;
                println!("idhal reconcile: registered {line}");
            }
            Err(e) => {
                failures += 1;
                report(&e, host);
            }
        }
    }
    let grace_secs = cfg.reconcile.take_down_grace_secs(&cfg.limits);
    let down_grace = match options.gone_server {
        Some(_) => 0,
        None => cfg.hook.down_grace_secs,
    };
    let (mut gone, why) = if down_grace > 0 {
        Gone::load(state_dir)
    } else {
        (Gone::default(), None)
    };
    if let Some(why) = why {
        eprintln!("idhal reconcile: {why}");
    }
    // Gone nodes still within their down grace, and take-downs that failed: kept in the
    // record for the next run.
    let mut still_gone: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut within_grace = 0usize;
    let mut take_down = Vec::new();
    for m in managed {
        let is_up = sched.as_ref().is_some_and(|s| s.is_up_state(&m.state));
        if !is_up || connected.contains_key(&m.host) {
            continue;
        }
        if m.node.as_ref().is_some_and(|n| listed.contains(n)) {
            println!(
                "idhal reconcile: {}: its node id is listed as connected, left alone",
                m.host
            );
            continue;
        }
        let Ok(host) = HostName::parse_in(&m.host, &cfg.names.domain) else {
            eprintln!(
                "idhal reconcile: {}: not in domain {}, left alone",
                m.host, cfg.names.domain
            );
            continue;
        };
        match m.server.as_deref() {
            Some(s) if s == server.as_str() => {}
            Some(_) => {
                // Another VPN server's node: its own reconcile reads its own status.
                others += 1;
                continue;
            }
            None => {
                println!(
                    "idhal reconcile: {}: no idhalserver recorded (registered by an older idhal), left alone",
                    m.host
                );
                continue;
            }
        }
        let Some(vpn_ip) = m.vpn_ip.as_deref().and_then(|v| v.parse::<Ipv4Addr>().ok()) else {
            eprintln!(
                "idhal reconcile: {}: no valid ip property, left alone",
                m.host
            );
            continue;
        };
        if down_grace > 0 {
            // Gone from the status, maybe on its way to another server: down only once it has
            // been gone [hook] down_grace_secs.
            let key = (m.host.clone(), m.since.unwrap_or(0));
            let gone_for = gone.gone_for(&key.0, key.1, now());
            if gone_for < down_grace {
                within_grace += 1;
                println!(
                    "idhal reconcile: {host}: gone from the status for {gone_for} s, left up within [hook] down_grace_secs ({down_grace} s)"
                );
                still_gone.insert(key);
                continue;
            }
        }
        // A session that started shortly before the status was written may have been
        // answered (deferred) after it: simply not in it yet, it must stay up.
        let guard = DownGuard::ListedAt {
            written: status.written,
            grace_secs,
        };
        if dry_run {
            // The same guard as the real run, on the session OAR listed (the real run reads
            // it again under the node's lock).
            let spared = m.since.is_some_and(|since| {
                guard.spares(&scheduler::Registered {
                    since,
                    client: None,
                })
            });
            if spared {
                println!("would leave up {host} ({vpn_ip}): its session started within {grace_secs} s of the status");
            } else {
                println!("would take down {host} ({vpn_ip})");
            }
            continue;
        }
        take_down.push(Down {
            host,
            vpn_ip,
            guard,
        });
    }
    // Together, as the hook worker takes its batches down (with OAR: one read, one state
    // change, one read-back per round for each batch), each batch within one hook budget.
    for batch in take_down.chunks(cfg.hook.max_batch as usize) {
        let deadline = Deadline::after(cfg.limits.hook_budget());
        for (d, r) in batch
            .iter()
            .zip(disconnect_hosts(cfg, state_dir, batch, deadline))
        {
            match r {
                Ok(r) if r.spared => println!("idhal reconcile: left up {}", r.line),
                Ok(r) => {
                    downed += 1;
                    println!("idhal reconcile: took down {}", r.line);
                }
                Err(e) => {
                    failures += 1;
                    report(&e, &d.host);
                    if let Some(m) = by_host.get(d.host.to_string().as_str()) {
                        still_gone.insert((m.host.clone(), m.since.unwrap_or(0)));
                    }
                }
            }
        }
    }
    if down_grace > 0 && !dry_run {
        gone.retain(|h, s| still_gone.contains(&(h.to_owned(), s)));
        if let Err(e) = gone.save(state_dir) {
            failures += 1;
            eprintln!("idhal reconcile: error: {}", one_line(&e));
        }
    }
    let routes = match options.gone_server {
        // The table here is this server's: nothing of the gone one's.
        Some(_) => Ok(None),
        None => sync_routes(cfg, &connected, status, dry_run),
    };
    let routes = match routes {
        Ok(Some(line)) => Some(line),
        Ok(None) => None,
        Err(e) => {
            failures += 1;
            eprintln!("idhal reconcile: error: {}", one_line(&e));
            None
        }
    };
    let mut tail = String::new();
    if let Some(line) = routes {
        tail.push_str(&format!(", {line}"));
    }
    if refresh_dns {
        tail.push_str(&format!(", {refreshed} DNS refreshed"));
    }
    tail.push_str(&format!(", {failures} failures"));
    if connecting > 0 {
        tail.push_str(&format!(", {connecting} still connecting"));
    }
    if others > 0 {
        tail.push_str(&format!(", {others} left to other servers"));
    }
    if waiting > 0 {
        tail.push_str(&format!(", {waiting} left for a newer status"));
    }
    if within_grace > 0 {
        tail.push_str(&format!(", {within_grace} gone within their down grace"));
    }
    println!(
        "idhal reconcile ({server}): {} connected, {repaired} registered again, {downed} taken down{tail}",
        connected.len()
    );
    Ok(Reconciled { failures })
}

/// Makes `[routing] table` hold exactly the listed clients' routes, in one `ip -batch`: a
/// client without its route gets it (on `[routing] dev`, metric = its session's start), a
/// route no client holds goes, unless its session started within the take-down grace of the
/// status (it may be connected and simply not listed yet). Counts failed lines as failures.
fn sync_routes(
    cfg: &ServerConfig,
    connected: &BTreeMap<String, (Session, HostName)>,
    status: &Status,
    dry_run: bool,
) -> Result<Option<String>, NodeError> {
    let Some(table) = cfg.routing.table() else {
        return Ok(None);
    };
    let wanted = connected
        .values()
        .map(|(s, _)| Route::of_session(s.vpn_ip, &cfg.routing.dev, s.since))
        .collect::<Result<Vec<_>, _>>()?;
    let grace = cfg.reconcile.take_down_grace_secs(&cfg.limits);
    let keep = Keep {
        from_metric: u32::try_from(status.written.saturating_sub(grace)).unwrap_or(u32::MAX),
        // Every address the status lists, usable line or not: a listed client is connected.
        listed: status
            .clients
            .iter()
            .filter_map(|e| e.fields.get("ifconfig_pool_remote_ip")?.parse().ok())
            .collect(),
    };
    let timeout = cfg.reconcile.listing_timeout();
    let t = table.table;
    if dry_run {
        let changes = plan(&table.list(timeout)?, &wanted, &keep);
        for r in &changes.del {
            println!("would delete route {r} from table {t}");
        }
        for r in &changes.add {
            println!("would add route {r} to table {t}");
        }
        return Ok(None);
    }
    let started = std::time::Instant::now();
    let (changes, applied) = table.sync(&wanted, &keep, timeout)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let failed: Vec<&Change> = applied.failed.iter().map(|(c, _)| c).collect();
    for (c, why) in &applied.failed {
        let (doing, r) = match c {
            Change::Add(r) => ("adding", r),
            Change::Del(r) => ("deleting", r),
        };
        eprintln!("idhal reconcile: error: {doing} route {r} in table {t}: {why}");
    }
    for r in &changes.del {
        if !failed.contains(&&Change::Del(r.clone())) {
            println!("idhal reconcile: deleted route {r} from table {t}");
        }
    }
    for r in &changes.add {
        if !failed.contains(&&Change::Add(r.clone())) {
            println!("idhal reconcile: added route {r} to table {t}");
        }
    }
    if !applied.failed.is_empty() {
        return Err(NodeError::Routing(RoutingError::Batch {
            doing: format!("repairing table {t}"),
            why: format!(
                "{} of {} changes failed",
                applied.failed.len(),
                changes.add.len() + changes.del.len()
            ),
        }));
    }
    Ok(Some(format!(
        "table {t}: {} routes added, {} deleted in {ms:.1} ms",
        applied.added, applied.deleted
    )))
}

fn report(e: &Failure, host: &HostName) {
    match e {
        Failure::Refused(e) => eprintln!("idhal reconcile: {host}: refused: {}", one_line(e)),
        Failure::Backend(errors) => {
            for e in errors {
                eprintln!("idhal reconcile: {host}: error: {}", one_line(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openvpn::status::Source;

    #[test]
    fn a_stale_status_is_refused_with_its_source_and_age() {
        let status = Status {
            written: 1_000,
            clients: Vec::new(),
        };
        require_fresh(&status, "s", 60, 1_060).unwrap();
        // A status written "in the future" (clock step) is not stale.
        require_fresh(&status, "s", 60, 900).unwrap();
        let from = Source::Management("127.0.0.1:7505".parse().unwrap()).to_string();
        let e = require_fresh(&status, &from, 60, 1_061).unwrap_err();
        assert_eq!(
            e.to_string(),
            "OpenVPN status from management 127.0.0.1:7505 was written 61 s ago (limit 60 s): \
             is OpenVPN running and writing it? Nothing changed"
        );
        assert!(matches!(
            e,
            NodeError::StaleStatus {
                age: 61,
                limit: 60,
                ..
            }
        ));
    }

    #[test]
    fn only_a_live_or_later_status_is_newer_than_the_listing() {
        let listing = Listing {
            sched: None,
            managed: Vec::new(),
            at: 1_000,
        };
        let written = |written| Status {
            written,
            clients: Vec::new(),
        };
        // Written in the listing's second: maybe before it returned.
        let age = |w, live| listing.status_age(&written(w), live);
        assert_eq!(age(1_000, false), StatusAge::MaybeBefore);
        assert_eq!(age(999, false), StatusAge::MaybeBefore);
        assert_eq!(age(1_001, false), StatusAge::AfterListing);
        // A management interface answers after the listing, whatever its TIME says.
        assert_eq!(age(999, true), StatusAge::AfterListing);
    }

    #[test]
    fn errors_keep_their_causes_on_one_line() {
        let e = NodeError::StoredPool(crate::names::Ipv4Net::parse("x").unwrap_err());
        assert_eq!(
            one_line(&e),
            "a project pool in the state database: address pool \"x\" is not valid: an IPv4 \
             network like 10.134.0.0/16 with no host bits set, prefix 8-30"
        );
        let e = NodeError::Revoked {
            node: crate::names::node_id("client7").unwrap(),
            at: 0,
        };
        assert_eq!(
            one_line(&e),
            "node client7 was revoked at 1970-01-01T00:00:00Z"
        );
    }
}
