//! `idhal hook client-connect|client-disconnect`: OpenVPN's scripts. They turn OpenVPN's
//! environment into a validated session, then register the node with the scheduler and DNS under
//! a per-node lock, within one time budget, and map the outcome to an exit code by policy.

use crate::ca::db::{lookup_node, lookup_projects};
use crate::cmd::Global;
use crate::config::{DnsUpdate, OnDisconnect, OnFailure, ServerConfig};
use crate::dns::rfc2136::{DnsError, TsigKey, Updater};
use crate::names::{Domain, HostName, Ipv4Net};
use crate::openvpn::env::{NodeAddresses, Session};
use crate::process::{Deadline, NodeLock};
use crate::scheduler::{self, DownGuard, DownOutcome, NodeUp};
use anyhow::Context as _;
use idhal_manifest::time::now;
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

const HOOK_HELP: &str = "\
Used directly as OpenVPN's client-connect / client-disconnect scripts:

  script-security 2
  client-connect    \"/usr/local/bin/idhal hook client-connect --config /etc/idhal/server.toml\"
  client-disconnect \"/usr/local/bin/idhal hook client-disconnect --config /etc/idhal/server.toml\"

They read OpenVPN's environment (common_name, ifconfig_pool_remote_ip, trusted_ip, trusted_port,
time_unix) and refuse any value that is not a valid node id or address (the pools' network,
broadcast and VPN server addresses included). The node's name comes from its VPN
address through [names] template (vnode-{3}-{4} → vnode-7-38 for 10.134.7.38).

On connect: OAR resource created once, properties set (idhalserver: this server's [openvpn]
name), state Alive (read back to confirm); DNS A and PTR replaced ([dns] update = \"rfc2136\").
On disconnect: OAR state Absent (never removed), unless a newer session of the node is
registered (later, or the same second from another client port); DNS records removed when
[dns] on_disconnect = \"remove\".

Exit codes: 0 done (or failed with [hook] on_failure = \"admit\"); 1 refused: invalid input, or a
backend failed with on_failure = \"refuse\" (OpenVPN then refuses the client); 2 usage or config
error. Every backend call has a timeout and the whole hook is capped by [limits] hook_budget_ms.
See docs/hooks.md.";

#[derive(Debug, clap::Args)]
#[command(about = "OpenVPN client-connect / client-disconnect hooks (OAR + DNS)", long_about = HOOK_HELP)]
pub struct Args {
    #[command(subcommand)]
    pub event: Event,
}

#[derive(Debug, clap::Subcommand)]
pub enum Event {
    /// A client connected: register it in the scheduler and DNS.
    ClientConnect {
        /// The file OpenVPN passes for dynamic client options; idhal adds none and leaves it.
        #[arg(value_name = "OPENVPN_TMPFILE")]
        options_file: Option<PathBuf>,
    },
    /// A client disconnected: mark it Absent in the scheduler (and drop DNS if configured).
    ClientDisconnect,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match ServerConfig::load_or_exit(global.config.as_deref()) {
        Ok(cfg) => cfg,
        Err(code) => return Ok(code),
    };
    // vars_os: `env::vars` panics on a non-UTF-8 value, and certificate fields can hold any
    // bytes. Lossy text still fails validation, so such a value is refused, not trusted.
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    let (name, result) = match args.event {
        Event::ClientConnect { .. } => ("client-connect", connect(&cfg, &global.state_dir, &env)),
        Event::ClientDisconnect => (
            "client-disconnect",
            disconnect(&cfg, &global.state_dir, &env),
        ),
    };
    Ok(exit_code(name, &cfg, result))
}

/// Why a hook did not complete.
#[derive(Debug)]
pub enum HookFailure {
    /// The environment held a value that is not acceptable: always refused.
    Refused(anyhow::Error),
    /// A backend failed or timed out: `on_failure` decides.
    Backend(Vec<anyhow::Error>),
}

fn exit_code(name: &str, cfg: &ServerConfig, result: Result<String, HookFailure>) -> ExitCode {
    match result {
        Ok(line) => {
            eprintln!("idhal hook {name}: {line}");
            ExitCode::SUCCESS
        }
        Err(HookFailure::Refused(e)) => {
            eprintln!("idhal hook {name}: REFUSED: {e:#}");
            ExitCode::from(1)
        }
        Err(HookFailure::Backend(errors)) => {
            for e in &errors {
                eprintln!("idhal hook {name}: error: {e:#}");
            }
            match cfg.hook.on_failure {
                OnFailure::Refuse => {
                    eprintln!("idhal hook {name}: failing (on_failure = \"refuse\"); `idhal reconcile` repairs missed events");
                    ExitCode::from(1)
                }
                OnFailure::Admit => {
                    eprintln!("idhal hook {name}: admitting anyway (on_failure = \"admit\"); `idhal reconcile` will repair it");
                    ExitCode::SUCCESS
                }
            }
        }
    }
}

/// The addresses nodes may hold: `[names] pool` without the network, broadcast and VPN
/// server addresses of it and of every project's pool in the state database.
pub fn node_addresses(cfg: &ServerConfig, state_dir: &Path) -> anyhow::Result<NodeAddresses> {
    let projects = lookup_projects(state_dir)?;
    let pools = projects
        .iter()
        .map(|p| Ok((p.name.as_str(), Ipv4Net::parse(&p.pool)?)))
        .collect::<anyhow::Result<Vec<_>>>()
        .context("a project pool in the state database")?;
    Ok(NodeAddresses::new(cfg.names.pool, pools))
}

fn session_and_host(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(Session, HostName), HookFailure> {
    let addresses = node_addresses(cfg, state_dir).map_err(|e| HookFailure::Backend(vec![e]))?;
    let session =
        Session::from_env(env, &addresses, now()).map_err(|e| HookFailure::Refused(e.into()))?;
    let label = cfg
        .names
        .template
        .render(session.vpn_ip)
        .map_err(|e| HookFailure::Refused(e.into()))?;
    let host = HostName {
        label,
        domain: cfg.names.domain.clone(),
    };
    Ok((session, host))
}

/// The DNS step, when live updates are on: `f` gets the updater and both zones.
fn dns_step(
    cfg: &ServerConfig,
    deadline: Deadline,
    f: impl FnOnce(&Updater, &Domain, &Domain) -> Result<(), DnsError>,
) -> anyhow::Result<bool> {
    if cfg.dns.update == DnsUpdate::Off {
        return Ok(false);
    }
    let path = cfg
        .dns
        .tsig_key_file
        .as_deref()
        .context("[dns] tsig_key_file is not set")?;
    let updater = Updater {
        server: cfg.dns.server,
        key: TsigKey::load(path)?,
        timeout: deadline.cap(cfg.limits.dns_timeout()),
    };
    f(&updater, &cfg.forward_zone(), &cfg.reverse_zone()?)?;
    Ok(true)
}

/// Replaces the node's A and PTR, when live DNS is on.
fn dns_upsert(
    cfg: &ServerConfig,
    session: &Session,
    host: &HostName,
    deadline: Deadline,
) -> anyhow::Result<Option<String>> {
    dns_step(cfg, deadline, |u, fwd, rev| {
        u.upsert(host, session.vpn_ip, fwd, rev, cfg.dns.ttl)
    })
    .map(|did| did.then(|| "DNS A+PTR set".to_owned()))
}

/// What one node's event did: one line for the log, or every error (all backends are tried).
struct Steps {
    started: Instant,
    done: Vec<String>,
    errors: Vec<anyhow::Error>,
    _lock: NodeLock,
}

impl Steps {
    /// Takes the node's lock: every change to one node happens under it.
    fn lock(
        cfg: &ServerConfig,
        state_dir: &Path,
        host: &HostName,
        deadline: Deadline,
    ) -> Result<Self, HookFailure> {
        let lock = NodeLock::acquire(
            state_dir,
            &format!("node-{}", host.label),
            deadline.cap(cfg.limits.lock_wait()),
        )
        .map_err(|e| HookFailure::Backend(vec![e.into()]))?;
        Ok(Self {
            started: Instant::now(),
            done: Vec::new(),
            errors: Vec::new(),
            _lock: lock,
        })
    }

    fn record(&mut self, r: anyhow::Result<Option<String>>) {
        match r {
            Ok(Some(line)) => self.done.push(line),
            Ok(None) => {}
            Err(e) => self.errors.push(e),
        }
    }

    fn finish(self, subject: String) -> Result<String, HookFailure> {
        if !self.errors.is_empty() {
            return Err(HookFailure::Backend(self.errors));
        }
        let what = if self.done.is_empty() {
            "nothing to do (no backend configured)".to_owned()
        } else {
            self.done.join(", ")
        };
        Ok(format!(
            "{subject}: {what} in {:.2} s",
            self.started.elapsed().as_secs_f64()
        ))
    }
}

/// Registers one connected node. Shared by the hook and `idhal reconcile`.
pub fn connect_session(
    cfg: &ServerConfig,
    state_dir: &Path,
    session: &Session,
    host: &HostName,
    deadline: Deadline,
) -> Result<String, HookFailure> {
    // Defence in depth behind OpenVPN's crl-verify and ccd-exclusive: a node revoked in the
    // database is refused even if OpenVPN let it through (a stale CRL on another server).
    let record = lookup_node(state_dir, session.node.as_str())
        .map_err(|e| HookFailure::Backend(vec![e.into()]))?;
    if let Some(at) = record.as_ref().and_then(|r| r.revoked_at) {
        return Err(HookFailure::Refused(anyhow::anyhow!(
            "node {} was revoked at {}",
            session.node,
            idhal_manifest::time::rfc3339(at)
        )));
    }
    let server = cfg
        .server_name()
        .map_err(|e| HookFailure::Backend(vec![e.into()]))?;
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    if let Some(sched) = scheduler::open(cfg, state_dir) {
        let up = NodeUp {
            node: session.node.clone(),
            host: host.clone(),
            vpn_ip: session.vpn_ip,
            client_ip: session.client_ip,
            client_port: session.client_port,
            since: session.since,
            node_type: scheduler::node_type(cfg, record.as_ref()),
            server,
        };
        steps.record(
            sched
                .node_up(&up, deadline)
                .map(|o| {
                    let created = if o.created { " (created)" } else { "" };
                    Some(format!(
                        "{} resource {:?} Alive{created}",
                        sched.name(),
                        o.resource_ids
                    ))
                })
                .with_context(|| format!("{}: registering {host}", sched.name())),
        );
    }
    steps.record(dns_upsert(cfg, session, host, deadline));
    steps.finish(format!("{} → {host} ({})", session.node, session.vpn_ip))
}

/// Re-asserts one node's A and PTR records only (`idhal reconcile --refresh-dns`).
pub fn refresh_node_dns(
    cfg: &ServerConfig,
    state_dir: &Path,
    session: &Session,
    host: &HostName,
    deadline: Deadline,
) -> Result<String, HookFailure> {
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    steps.record(dns_upsert(cfg, session, host, deadline));
    steps.finish(format!("{} → {host} ({})", session.node, session.vpn_ip))
}

/// What `disconnect_host` did: its log line, and whether a newer session was left up.
pub struct Disconnected {
    pub line: String,
    pub spared: bool,
}

/// Takes one node down, unless the scheduler holds a session `guard` spares (a newer one).
pub fn disconnect_host(
    cfg: &ServerConfig,
    state_dir: &Path,
    host: &HostName,
    vpn_ip: Ipv4Addr,
    guard: DownGuard,
    deadline: Deadline,
) -> Result<Disconnected, HookFailure> {
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    let mut stale = false;
    if let Some(sched) = scheduler::open(cfg, state_dir) {
        let name = sched.name();
        let outcome = sched
            .node_down(host, guard, deadline)
            .with_context(|| format!("{name}: taking {host} down"));
        stale = matches!(outcome, Ok(DownOutcome::NewerSession));
        steps.record(outcome.map(|o| {
            Some(match o {
                DownOutcome::MarkedDown => format!("{name} Absent"),
                DownOutcome::AlreadyDown => format!("{name} already Absent"),
                DownOutcome::Unknown => format!("unknown to {name}"),
                DownOutcome::NewerSession => {
                    format!("ignored: {name} holds a newer session for this node")
                }
            })
        }));
    }
    if cfg.dns.on_disconnect == OnDisconnect::Remove && !stale {
        steps.record(
            dns_step(cfg, deadline, |u, fwd, rev| {
                u.remove(host, vpn_ip, fwd, rev)
            })
            .map(|did| did.then(|| "DNS A+PTR removed".to_owned())),
        );
    }
    steps
        .finish(format!("{host} ({vpn_ip})"))
        .map(|line| Disconnected {
            line,
            spared: stale,
        })
}

fn connect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<String, HookFailure> {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let (session, host) = session_and_host(cfg, state_dir, env)?;
    connect_session(cfg, state_dir, &session, &host, deadline)
}

fn disconnect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<String, HookFailure> {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let (session, host) = session_and_host(cfg, state_dir, env)?;
    let guard = DownGuard::Session {
        since: session.since,
        client: (session.client_ip, session.client_port),
    };
    disconnect_host(cfg, state_dir, &host, session.vpn_ip, guard, deadline)
        .map(|d| format!("{}: {}", session.node, d.line))
}
