//! One node's connect and disconnect: validate the session, then register it with the
//! scheduler and DNS under the node's lock within one time budget. Shared by the hooks
//! (`cmd/hook.rs`) and `idhal reconcile` (`node/reconcile.rs`).

pub mod reconcile;

use crate::ca::db::{lookup_node, lookup_projects, DbError, NodeRow};
use crate::config::{OnDisconnect, ServerConfig};
use crate::dns::{self, DnsError};
use crate::names::{HostName, Ipv4Net, Label, NameError, NodeId};
use crate::openvpn::env::{EnvError, NodeAddresses, Session};
use crate::openvpn::status::StatusError;
use crate::process::{Deadline, LockError, NodeLock};
use crate::scheduler::{backend, DownGuard, DownOutcome, NodeUp, SchedulerError};
use idhal_manifest::time::{now, rfc3339};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

/// What went wrong with one node's event, or with a reconcile run: each names the node,
/// host or backend it is about.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// OpenVPN's environment (or a status line) holds an unacceptable value.
    #[error(transparent)]
    Env(#[from] EnvError),
    /// A name that cannot be made or read (the template's label, this server's name).
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("node {node} was revoked at {}", rfc3339(*.at))]
    Revoked { node: NodeId, at: u64 },
    #[error("a project pool in the state database")]
    StoredPool(#[source] NameError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("{backend}: {doing}")]
    Scheduler {
        backend: &'static str,
        /// What was being done: `registering HOST`, `taking HOST down`, `listing nodes`.
        doing: String,
        #[source]
        source: SchedulerError,
    },
    #[error(transparent)]
    Dns(#[from] DnsError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error("OpenVPN status from {from} was written {age} s ago (limit {limit} s): is OpenVPN running and writing it? Nothing changed")]
    StaleStatus { from: String, age: u64, limit: u64 },
}

/// An error and its causes on one line, `a: b: c`, as the hooks' and reconcile's log lines
/// show them.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

/// Why a node event (a hook, or a repair by reconcile) did not complete.
#[derive(Debug)]
pub enum Failure {
    /// The environment held a value that is not acceptable: always refused.
    Refused(NodeError),
    /// A backend failed or timed out: `on_failure` decides.
    Backend(Vec<NodeError>),
}

impl Failure {
    fn backend(e: impl Into<NodeError>) -> Self {
        Failure::Backend(vec![e.into()])
    }
}

/// The addresses nodes may hold: `[names] pool` without the network, broadcast and VPN
/// server addresses of it and of every project's pool in the state database.
pub fn node_addresses(cfg: &ServerConfig, state_dir: &Path) -> Result<NodeAddresses, NodeError> {
    let projects = lookup_projects(state_dir)?;
    let pools = projects
        .iter()
        .map(|p| Ok((p.name.as_str(), Ipv4Net::parse(&p.pool)?)))
        .collect::<Result<Vec<_>, NameError>>()
        .map_err(NodeError::StoredPool)?;
    Ok(NodeAddresses::new(cfg.names.pool, pools))
}

fn session_and_host(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(Session, HostName), Failure> {
    let addresses = node_addresses(cfg, state_dir).map_err(Failure::backend)?;
    let session =
        Session::from_env(env, &addresses, now()).map_err(|e| Failure::Refused(e.into()))?;
    let label = cfg
        .names
        .template
        .render(session.vpn_ip)
        .map_err(|e| Failure::Refused(e.into()))?;
    let host = HostName {
        label,
        domain: cfg.names.domain.clone(),
    };
    Ok((session, host))
}

/// Replaces the node's A and PTR, when the DNS backend updates live.
fn dns_upsert(
    cfg: &ServerConfig,
    session: &Session,
    host: &HostName,
    deadline: Deadline,
) -> Result<Option<String>, NodeError> {
    let did = dns::backend::open(cfg).upsert(host, session.vpn_ip, deadline)?;
    Ok(did.then(|| "DNS A+PTR set".to_owned()))
}

/// What one node's event did: one line for the log, or every error (all backends are tried).
struct Steps {
    started: Instant,
    done: Vec<String>,
    errors: Vec<NodeError>,
    _lock: NodeLock,
}

impl Steps {
    /// Takes the node's lock: every change to one node happens under it.
    fn lock(
        cfg: &ServerConfig,
        state_dir: &Path,
        host: &HostName,
        deadline: Deadline,
    ) -> Result<Self, Failure> {
        let lock = NodeLock::acquire(
            state_dir,
            &format!("node-{}", host.label),
            deadline.cap(cfg.limits.lock_wait()),
        )
        .map_err(Failure::backend)?;
        Ok(Self {
            started: Instant::now(),
            done: Vec::new(),
            errors: Vec::new(),
            _lock: lock,
        })
    }

    fn record(&mut self, r: Result<Option<String>, NodeError>) {
        match r {
            Ok(Some(line)) => self.done.push(line),
            Ok(None) => {}
            Err(e) => self.errors.push(e),
        }
    }

    fn finish(self, subject: String) -> Result<String, Failure> {
        if !self.errors.is_empty() {
            return Err(Failure::Backend(self.errors));
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
) -> Result<String, Failure> {
    // Defence in depth behind OpenVPN's crl-verify and ccd-exclusive: a node revoked in the
    // database is refused even if OpenVPN let it through (a stale CRL on another server).
    let record = lookup_node(state_dir, session.node.as_str()).map_err(Failure::backend)?;
    if let Some(at) = record.as_ref().and_then(|r| r.revoked_at) {
        return Err(Failure::Refused(NodeError::Revoked {
            node: session.node.clone(),
            at,
        }));
    }
    let server = cfg.server_name().map_err(Failure::backend)?;
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    if let Some(sched) = backend::open(cfg, state_dir) {
        let up = NodeUp {
            node: session.node.clone(),
            host: host.clone(),
            vpn_ip: session.vpn_ip,
            client_ip: session.client_ip,
            client_port: session.client_port,
            since: session.since,
            node_type: node_type(cfg, record.as_ref()),
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
                .map_err(|source| NodeError::Scheduler {
                    backend: sched.name(),
                    doing: format!("registering {host}"),
                    source,
                }),
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
) -> Result<String, Failure> {
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
) -> Result<Disconnected, Failure> {
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    let mut stale = false;
    if let Some(sched) = backend::open(cfg, state_dir) {
        let name = sched.name();
        let outcome =
            sched
                .node_down(host, guard, deadline)
                .map_err(|source| NodeError::Scheduler {
                    backend: name,
                    doing: format!("taking {host} down"),
                    source,
                });
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
            dns::backend::open(cfg)
                .remove(host, vpn_ip, deadline)
                .map(|did| did.then(|| "DNS A+PTR removed".to_owned()))
                .map_err(NodeError::from),
        );
    }
    steps
        .finish(format!("{host} ({vpn_ip})"))
        .map(|line| Disconnected {
            line,
            spared: stale,
        })
}

/// The client-connect hook: OpenVPN's environment in, one log line out.
pub fn connect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<String, Failure> {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let (session, host) = session_and_host(cfg, state_dir, env)?;
    connect_session(cfg, state_dir, &session, &host, deadline)
}

/// The client-disconnect hook.
pub fn disconnect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<String, Failure> {
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let (session, host) = session_and_host(cfg, state_dir, env)?;
    let guard = DownGuard::Session {
        since: session.since,
        client: (session.client_ip, session.client_port),
    };
    disconnect_host(cfg, state_dir, &host, session.vpn_ip, guard, deadline)
        .map(|d| format!("{}: {}", session.node, d.line))
}

/// The node's type: from its enrollment record (the token it enrolled with decided it), else
/// the configured default (nodes certified outside idhal's CA).
pub fn node_type(cfg: &ServerConfig, record: Option<&NodeRow>) -> Label {
    record
        .and_then(|n| Label::parse(&n.node_type).ok())
        .unwrap_or_else(|| cfg.names.default_type.clone())
}
