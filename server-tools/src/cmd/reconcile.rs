//! `idhal reconcile`: compares who OpenVPN says is connected (its status file) with what the
//! scheduler holds, and replays the missed connect/disconnect events. Idempotent, for a timer.

use crate::cmd::hook::{
    connect_session, disconnect_host, node_addresses, refresh_node_dns, HookFailure,
};
use crate::cmd::Global;
use crate::config::ServerConfig;
use crate::config::{DnsUpdate, StatusSource};
use crate::names::HostName;
use crate::openvpn::env::Session;
use crate::openvpn::management::{password_file, Answer, Management};
use crate::process::{Deadline, NodeLock};
use crate::scheduler::{self, DownGuard};
use anyhow::Context as _;
use idhal_manifest::time::now;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::ExitCode;
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
          is registered again (exactly as `idhal hook client-connect` does, DNS included);\n\
        - a node idhal manages that this server registered ([openvpn] name, default the host \
          name; OAR property idhalserver) and that is Alive but no longer connected is set \
          Absent (never removed), unless it registered in or after the second the status was \
          written. A node whose id is listed at all (a client still connecting has no address \
          yet) is left alone, and so are other servers' nodes.\n\n\
        A status file older than [reconcile] max_status_age_secs is refused (OpenVPN is not \
        writing it: acting on it could take every node down). Runs hold the same per-node locks \
        as the hooks, and a second concurrent reconcile exits at once.\n\n\
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
}

/// One `CLIENT_LIST` entry, still unvalidated.
#[derive(Debug, Clone)]
struct StatusEntry {
    line: usize,
    fields: HashMap<&'static str, String>,
}

/// Parsed status file: its write time and client entries.
#[derive(Debug)]
struct Status {
    written: u64,
    clients: Vec<StatusEntry>,
}

fn parse_status(text: &str) -> anyhow::Result<Status> {
    let mut written = None;
    let mut columns: Option<Vec<String>> = None;
    let mut clients = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // Version 2 separates with commas, version 3 with tabs.
        let sep = if line.contains('\t') { '\t' } else { ',' };
        let f: Vec<&str> = line.split(sep).collect();
        match f.first().copied() {
            Some("TIME") => written = f.get(2).and_then(|t| t.parse::<u64>().ok()),
            Some("HEADER") if f.get(1) == Some(&"CLIENT_LIST") => {
                columns = Some(f[2..].iter().map(|s| s.to_string()).collect());
            }
            Some("CLIENT_LIST") => {
                let cols = columns
                    .as_ref()
                    .context("CLIENT_LIST before its HEADER line (status-version 2 or 3 needed)")?;
                let get = |name: &str| {
                    cols.iter()
                        .position(|c| c == name)
                        .and_then(|p| f.get(p + 1))
                        .map(|s| s.to_string())
                };
                let mut fields = HashMap::new();
                for (key, col) in [
                    ("common_name", "Common Name"),
                    ("real", "Real Address"),
                    ("ifconfig_pool_remote_ip", "Virtual Address"),
                    ("time_unix", "Connected Since (time_t)"),
                ] {
                    if let Some(v) = get(col) {
                        fields.insert(key, v);
                    }
                }
                clients.push(StatusEntry {
                    line: i + 1,
                    fields,
                });
            }
            _ => {}
        }
    }
    let written = written.context("no TIME line (status-version 2 or 3 needed)")?;
    Ok(Status { written, clients })
}

fn read_status_file(path: &Path, limit: u64) -> anyhow::Result<Status> {
    use std::io::Read as _;
    let what = || format!("reading OpenVPN status file {}", path.display());
    let mut text = String::new();
    // Bounded read: the size is checked on what is read, not on what metadata says.
    std::fs::File::open(path)
        .with_context(what)?
        .take(limit + 1)
        .read_to_string(&mut text)
        .with_context(what)?;
    anyhow::ensure!(
        text.len() as u64 <= limit,
        "OpenVPN status file {} is larger than [reconcile] max_status_bytes ({limit}); nothing changed",
        path.display()
    );
    parse_status(&text).with_context(|| format!("status file {}", path.display()))
}

/// Asks OpenVPN's management interface for `status 2` (the same text as a version-2 status
/// file, but current). Every read and write has the command timeout.
fn read_management(
    addr: SocketAddr,
    cfg: &ServerConfig,
    state_dir: &Path,
) -> anyhow::Result<Status> {
    let password = match &cfg.reconcile.management_password_file {
        Some(p) => Some(p.clone()),
        None => password_file(cfg, state_dir, &cfg.ca.project),
    };
    let m = Management {
        addr,
        password_file: password.as_deref(),
        timeout: cfg.limits.command_timeout(),
    };
    let text = m.command("status 2", Answer::UntilEnd)?;
    parse_status(&text).with_context(|| format!("OpenVPN management interface {addr}"))
}

/// `192.0.2.7:1194`, `[2001:db8::1]:1194` or a bare address → the address and the port.
fn real_ip(s: &str) -> Option<(String, Option<String>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once(']')?;
        return Some((a.to_owned(), p.strip_prefix(':').map(str::to_owned)));
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Some((s.to_owned(), None));
    }
    s.rsplit_once(':')
        .map(|(a, p)| (a.to_owned(), Some(p.to_owned())))
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match ServerConfig::load_or_exit(global.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    let state_dir = &global.state_dir;
    let Ok(_running) = NodeLock::acquire(state_dir, "reconcile", Duration::ZERO) else {
        eprintln!("idhal reconcile: another reconcile is running; nothing done");
        return Ok(ExitCode::SUCCESS);
    };
    let (status, source) = match (&args.status_file, &args.management, cfg.reconcile.source) {
        (Some(path), _, _) => (
            read_status_file(path, cfg.reconcile.max_status_bytes)?,
            path.display().to_string(),
        ),
        (None, Some(addr), _) => (
            read_management(*addr, &cfg, state_dir)?,
            format!("management {addr}"),
        ),
        (None, None, StatusSource::Management) => (
            read_management(cfg.reconcile.management, &cfg, state_dir)?,
            format!("management {}", cfg.reconcile.management),
        ),
        (None, None, StatusSource::StatusFile) => (
            read_status_file(&cfg.reconcile.status_file, cfg.reconcile.max_status_bytes)?,
            cfg.reconcile.status_file.display().to_string(),
        ),
    };
    let age = now().saturating_sub(status.written);
    if age > cfg.reconcile.max_status_age_secs {
        anyhow::bail!(
            "OpenVPN status from {source} was written {age} s ago (limit {} s): is OpenVPN running and writing it? Nothing changed",
            cfg.reconcile.max_status_age_secs
        );
    }
    reconcile(&cfg, state_dir, &status, &args)
}

fn reconcile(
    cfg: &ServerConfig,
    state_dir: &Path,
    status: &Status,
    args: &Args,
) -> anyhow::Result<ExitCode> {
    let dry_run = args.dry_run;
    let server = cfg.server_name()?;
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
            .map_err(anyhow::Error::from)
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
                    "idhal reconcile: status line {}: skipped: {e:#}",
                    entry.line
                );
            }
        }
    }

    let sched = scheduler::open(cfg, state_dir);
    let managed = match &sched {
        Some(s) => s
            .managed_nodes(Deadline::after(cfg.limits.hook_budget()))
            .with_context(|| format!("{}: listing nodes", s.name()))?,
        None => Vec::new(),
    };
    let by_host: HashMap<&str, &scheduler::ManagedNode> =
        managed.iter().map(|m| (m.host.as_str(), m)).collect();

    let (mut repaired, mut downed, mut refreshed, mut others) = (0usize, 0usize, 0usize, 0usize);
    let refresh_dns = args.refresh_dns && cfg.dns.update == DnsUpdate::Rfc2136;
    for (name, (session, host)) in &connected {
        let ok = match (&sched, by_host.get(name.as_str())) {
            (Some(_), Some(m)) if m.since.is_some_and(|since| since > session.since) => {
                // Registered from a newer session than this listing shows (the node moved
                // to another server, or reconnected since): the newer registration stands.
                println!(
                    "idhal reconcile: {host}: registered from a newer session than listed here, left alone"
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
    for m in &managed {
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
        if dry_run {
            println!("would take down {host} ({vpn_ip})");
            continue;
        }
        let deadline = Deadline::after(cfg.limits.hook_budget());
        // A node that registered in or after the second the status was written is simply
        // not in it yet, and must stay up.
        let guard = DownGuard::ListedAt {
            written: status.written,
        };
        match disconnect_host(cfg, state_dir, &host, vpn_ip, guard, deadline) {
            Ok(d) if d.spared => println!("idhal reconcile: left up {}", d.line),
            Ok(d) => {
                downed += 1;
                println!("idhal reconcile: took down {}", d.line);
            }
            Err(e) => {
                failures += 1;
                report(&e, &host);
            }
        }
    }
    let mut tail = String::new();
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
    println!(
        "idhal reconcile ({server}): {} connected, {repaired} registered again, {downed} taken down{tail}",
        connected.len()
    );
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn report(e: &HookFailure, host: &HostName) {
    match e {
        HookFailure::Refused(e) => eprintln!("idhal reconcile: {host}: refused: {e:#}"),
        HookFailure::Backend(errors) => {
            for e in errors {
                eprintln!("idhal reconcile: {host}: error: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_v2_and_v3() {
        let v2 = "TITLE,OpenVPN 2.6\nTIME,2026-11-22 23:00:00,1795000000\n\
            HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n\
            CLIENT_LIST,client317,192.0.2.7:1194,10.134.7.38,,1,2,2026-11-22 22:59:00,1794999940,UNDEF,0,0,AES-256-GCM\nEND\n";
        let s = parse_status(v2).unwrap();
        assert_eq!(s.written, 1_795_000_000);
        assert_eq!(s.clients[0].fields["common_name"], "client317");
        assert_eq!(s.clients[0].fields["time_unix"], "1794999940");
        let v3 = v2.replace(',', "\t");
        assert_eq!(parse_status(&v3).unwrap().clients.len(), 1);
        assert!(parse_status("CLIENT_LIST,a\n").is_err());
        assert_eq!(
            real_ip("192.0.2.7:1194").unwrap(),
            ("192.0.2.7".into(), Some("1194".into()))
        );
        assert_eq!(
            real_ip("[2001:db8::1]:5").unwrap(),
            ("2001:db8::1".into(), Some("5".into()))
        );
        assert_eq!(
            real_ip("2001:db8::1").unwrap(),
            ("2001:db8::1".into(), None)
        );
    }
}
