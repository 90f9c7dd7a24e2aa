//! One node's connect and disconnect: validate the session, then register it with the
//! scheduler and DNS under the node's lock within one time budget. Shared by the hooks
//! (`cmd/hook.rs`) and `idhal reconcile` (`node/reconcile.rs`).

pub mod deferred;
mod gone;
pub mod reconcile;

use crate::ca::db::{lookup_node, lookup_projects, DbError, NodeRow, ProjectRow};
use crate::client_name::{client_names, ClientName, Found};
use crate::config::{ClientNameLookup, OnDisconnect, OnFailure, ServerConfig};
use crate::dns::{self, DnsError};
use crate::names::{HostName, Ipv4Net, Label, NameError, NodeId, ServerName};
use crate::openvpn::env::{has_pool_address, node_from_env, EnvError, NodeAddresses, Session};
use crate::openvpn::status::StatusError;
use crate::process::{Deadline, LockError, NodeLock};
use crate::routing::{Route, RoutingError, Withdrawn};
use crate::scheduler::{backend, DownGuard, DownOutcome, NodeUp, SchedulerError, UpOutcome};
use idhal_manifest::time::{now, rfc3339};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

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
    #[error("node {node} is not enrolled (no record in the state database) and OpenVPN gave it no address (ifconfig_pool_remote_ip)")]
    Unknown { node: NodeId },
    /// A disconnect without an address: OpenVPN runs client-disconnect after a refused connect
    /// too. Reported as a refusal (OpenVPN ignores the exit code) so that it is never mistaken
    /// for a node going down.
    #[error("node {node} never came up (no ifconfig_pool_remote_ip: its connect was refused or never finished): nothing changed")]
    NeverUp { node: NodeId },
    #[error("node {node}: its address in the state database, {address:?}, is not usable: {why}")]
    StoredAddress {
        node: NodeId,
        address: String,
        why: String,
    },
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
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error("OpenVPN status from {from} was written {age} s ago (limit {limit} s): is OpenVPN running and writing it? Nothing changed")]
    StaleStatus { from: String, age: u64, limit: u64 },
}

pub use crate::report::one_line;

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

/// What OpenVPN is told about a client-connect, and the log lines saying why.
pub struct Verdict {
    pub accept: bool,
    pub lines: Vec<String>,
}

/// The one policy for a node event's outcome, shared by the hook (an exit code) and the worker
/// (a verdict byte): refusals always refuse; backend failures follow `[hook] on_failure`.
pub fn decide(event: &str, cfg: &ServerConfig, result: Result<String, Failure>) -> Verdict {
    match result {
        Ok(line) => Verdict {
            accept: true,
            lines: vec![format!("{event}: {line}")],
        },
        Err(Failure::Refused(e)) => Verdict {
            accept: false,
            lines: vec![format!("{event}: REFUSED: {}", one_line(&e))],
        },
        Err(Failure::Backend(errors)) => {
            let mut lines: Vec<String> = errors
                .iter()
                .map(|e| format!("{event}: error: {}", one_line(e)))
                .collect();
            let accept = match cfg.hook.on_failure {
                OnFailure::Refuse => {
                    lines.push(format!("{event}: failing (on_failure = \"refuse\"); `idhal reconcile` repairs missed events"));
                    false
                }
                OnFailure::Admit => {
                    lines.push(format!("{event}: admitting anyway (on_failure = \"admit\"); `idhal reconcile` will repair it"));
                    true
                }
            };
            Verdict { accept, lines }
        }
    }
}

/// What node/ reads from the state database: every project, and one node's record.
struct StateView {
    projects: Vec<ProjectRow>,
    node: Option<NodeRow>,
}

/// The one place node/ reads the state database (the PostgreSQL backend replaces only this).
fn state_view(
    cfg: &ServerConfig,
    state_dir: &Path,
    node: Option<&str>,
) -> Result<StateView, DbError> {
    Ok(StateView {
        projects: lookup_projects(cfg, state_dir)?,
        node: match node {
            Some(id) => lookup_node(cfg, state_dir, id)?,
            None => None,
        },
    })
}

/// The addresses nodes may hold: `[names] pool` without the network, broadcast and VPN
/// server addresses of it and of every project's pool in the state database.
pub fn node_addresses(cfg: &ServerConfig, state_dir: &Path) -> Result<NodeAddresses, NodeError> {
    addresses_of(cfg, &state_view(cfg, state_dir, None)?.projects)
}

fn addresses_of(cfg: &ServerConfig, projects: &[ProjectRow]) -> Result<NodeAddresses, NodeError> {
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
    let host = host_of(cfg, &session)?;
    Ok((session, host))
}

fn host_of(cfg: &ServerConfig, session: &Session) -> Result<HostName, Failure> {
    let label = cfg
        .names
        .template
        .render(session.vpn_ip)
        .map_err(|e| Failure::Refused(e.into()))?;
    Ok(HostName {
        label,
        domain: cfg.names.domain.clone(),
    })
}

/// A client-connect that passed the synchronous checks: the session to register, and the
/// per-client config OpenVPN must get (`ifconfig-push`), when idhal gives the address.
#[derive(Debug)]
pub struct Admission {
    pub session: Session,
    pub host: HostName,
    pub push: Option<String>,
}

/// The checks a client-connect gets before anything else, fast (one database read): the CN is
/// a valid node id; an enrolled node must not be revoked and gets its address from the state
/// database (checked against the pools); a CN with no record is refused unless OpenVPN itself
/// gave it an address (a pool or ccd of the admin's own: nodes certified outside idhal's CA).
/// The config `idhal openvpn server-config` renders has neither, so there every unknown CN is
/// refused. Every failure here is a refusal: without the database nobody can tell a node from
/// a stranger.
pub fn admit(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<Admission, Failure> {
    let refused = |e: NodeError| Failure::Refused(e);
    let node = node_from_env(env).map_err(|e| refused(e.into()))?;
    let view = state_view(cfg, state_dir, Some(node.as_str())).map_err(|e| refused(e.into()))?;
    let addresses = addresses_of(cfg, &view.projects).map_err(refused)?;
    let (session, push) = match &view.node {
        Some(record) => {
            if let Some(at) = record.revoked_at {
                return Err(refused(NodeError::Revoked { node, at }));
            }
            let (ip, mask) = stored_address(&node, record, &view.projects, &addresses)?;
            let session =
                Session::with_address(env, &addresses, now(), ip).map_err(|e| refused(e.into()))?;
            (session, Some(format!("ifconfig-push {ip} {mask}\n")))
        }
        None if has_pool_address(env) => (
            Session::from_env(env, &addresses, now()).map_err(|e| refused(e.into()))?,
            None,
        ),
        None => return Err(refused(NodeError::Unknown { node })),
    };
    if cfg.routing.table.is_some() && session.dev.is_none() {
        return Err(refused(EnvError::Missing { var: "dev" }.into()));
    }
    let host = host_of(cfg, &session)?;
    Ok(Admission {
        session,
        host,
        push,
    })
}

/// An enrolled node's address and its project pool's netmask, checked: inside its project's
/// pool and a node address of `[names] pool` (not a network, broadcast or server address).
fn stored_address(
    node: &NodeId,
    record: &NodeRow,
    projects: &[ProjectRow],
    addresses: &NodeAddresses,
) -> Result<(Ipv4Addr, Ipv4Addr), Failure> {
    let bad = |why: String| {
        Failure::Refused(NodeError::StoredAddress {
            node: node.clone(),
            address: record.address.chars().take(40).collect(),
            why,
        })
    };
    let ip: Ipv4Addr = record
        .address
        .parse()
        .map_err(|_| bad("not an IPv4 address".into()))?;
    let pool = projects
        .iter()
        .find(|p| p.name == record.project)
        .ok_or_else(|| {
            bad(format!(
                "its project {:?} is not in the database",
                record.project
            ))
        })?;
    let pool =
        Ipv4Net::parse(&pool.pool).map_err(|e| Failure::Refused(NodeError::StoredPool(e)))?;
    if !pool.contains(ip) {
        return Err(bad(format!(
            "outside its project {:?}'s pool {pool}",
            record.project
        )));
    }
    if let Some(why) = addresses.refusal(ip) {
        return Err(bad(why));
    }
    Ok((ip, pool.netmask()))
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

/// The node's route, when `[routing] table` is set and the session names its device (a
/// session read from a status names none: reconcile syncs the table itself).
fn route_of(cfg: &ServerConfig, session: &Session) -> Option<Result<Route, RoutingError>> {
    cfg.routing
        .table
        .and(session.dev.as_ref())
        .map(|dev| Route::of_session(session.vpn_ip, dev, session.since))
}

/// Writes the node's route (replacing any other route of its address): a step of its connect,
/// after the scheduler's and before the verdict. Failing it is a backend failure.
fn route_up(
    cfg: &ServerConfig,
    session: &Session,
    deadline: Deadline,
) -> Result<Option<String>, NodeError> {
    let (Some(table), Some(route)) = (cfg.routing.table(), route_of(cfg, session)) else {
        return Ok(None);
    };
    let route = route?;
    let started = Instant::now();
    table.announce(&route, deadline.cap(cfg.limits.command_timeout()))?;
    Ok(Some(format!(
        "route {route} in table {} ({:.1} ms)",
        table.table,
        started.elapsed().as_secs_f64() * 1000.0
    )))
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
        Ok(Self::holding(lock))
    }

    fn holding(lock: NodeLock) -> Self {
        Self {
            started: Instant::now(),
            done: Vec::new(),
            errors: Vec::new(),
            _lock: lock,
        }
    }

    /// The node's lock if it is free now, `None` if another holder has it (a batch never waits).
    fn try_lock(state_dir: &Path, host: &HostName) -> Result<Option<Self>, Failure> {
        match NodeLock::acquire(
            state_dir,
            &format!("node-{}", host.label),
            std::time::Duration::ZERO,
        ) {
            Ok(lock) => Ok(Some(Self::holding(lock))),
            Err(LockError::Busy { .. }) => Ok(None),
            Err(e) => Err(Failure::backend(e)),
        }
    }

    fn record(&mut self, r: Result<Option<String>, NodeError>) {
        match r {
            Ok(Some(line)) => self.done.push(line),
            Ok(None) => {}
            Err(e) => self.errors.push(e),
        }
    }

    /// Whether the node will be accepted as things stand: no error yet, or `on_failure =
    /// "admit"`. Its route is written only then, last (a refused node would leave one behind).
    fn admitted(&self, cfg: &ServerConfig) -> bool {
        self.errors.is_empty() || cfg.hook.on_failure == OnFailure::Admit
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
            "{subject}: {what}; {:.2} s in all",
            self.started.elapsed().as_secs_f64()
        ))
    }
}

/// A backend step's line with the time its call took (in a batch: the one call for all), so an
/// admin sees where a connect's time went: `OAR resource [1] Alive in 0.36 s`.
fn timed(
    step: Result<Option<String>, NodeError>,
    took: std::time::Duration,
) -> Result<Option<String>, NodeError> {
    step.map(|line| line.map(|l| format!("{l} in {:.2} s", took.as_secs_f64())))
}

/// What `prepare` found about a connect it accepted: what the scheduler is told besides the
/// session and the client's name.
struct Accepted {
    node_type: Label,
    server: ServerName,
}

impl Accepted {
    fn node_up(self, session: &Session, host: &HostName, client_name: ClientName) -> NodeUp {
        NodeUp {
            node: session.node.clone(),
            host: host.clone(),
            vpn_ip: session.vpn_ip,
            client_ip: session.client_ip,
            client_port: session.client_port,
            client_name,
            since: session.since,
            node_type: self.node_type,
            server: self.server,
        }
    }
}

/// The checks a registration repeats under the worker's time (a node revoked in the database
/// since, or since `admit`). Before the client's name is looked up: a refused node costs no
/// DNS query, and nobody waits for one.
fn prepare(cfg: &ServerConfig, state_dir: &Path, session: &Session) -> Result<Accepted, Failure> {
    // Defence in depth behind OpenVPN's crl-verify and `admit`: a node revoked in the database
    // since is refused even if OpenVPN let it through (a stale CRL on another server).
    let record = state_view(cfg, state_dir, Some(session.node.as_str()))
        .map_err(Failure::backend)?
        .node;
    if let Some(at) = record.as_ref().and_then(|r| r.revoked_at) {
        return Err(Failure::Refused(NodeError::Revoked {
            node: session.node.clone(),
            at,
        }));
    }
    Ok(Accepted {
        node_type: node_type(cfg, record.as_ref()),
        server: cfg.server_name().map_err(Failure::backend)?,
    })
}

/// One node's scheduler verdict as a step of its event.
fn registered_line(
    backend: &'static str,
    host: &HostName,
    r: Result<UpOutcome, SchedulerError>,
) -> Result<Option<String>, NodeError> {
    r.map(|o| {
        let created = if o.created { " (created)" } else { "" };
        Some(format!(
            "{backend} resource {:?} Alive{created}",
            o.resource_ids
        ))
    })
    .map_err(|source| NodeError::Scheduler {
        backend,
        doing: format!("registering {host}"),
        source,
    })
}

/// The client name as a step of the node's line, when names are looked up at all.
fn name_step(cfg: &ServerConfig, found: &Found, took: Duration) -> Option<String> {
    (cfg.client_name.lookup != ClientNameLookup::Off).then(|| {
        format!(
            "{} in {:.1} ms",
            found.describe(),
            took.as_secs_f64() * 1000.0
        )
    })
}

fn connected(session: &Session, host: &HostName) -> String {
    format!("{} → {host} ({})", session.node, session.vpn_ip)
}

/// Registers one connected node. Shared by the hook (sync mode), `idhal reconcile`, and the
/// worker for a node a batch could not take.
pub fn connect_session(
    cfg: &ServerConfig,
    state_dir: &Path,
    session: &Session,
    host: &HostName,
    deadline: Deadline,
) -> Result<String, Failure> {
    let accepted = prepare(cfg, state_dir, session)?;
    // Then the name: one of the properties the scheduler's one call writes. Bounded by
    // [client_name] timeout_ms and a quarter of this connect's time left; it never fails the
    // connect.
    let names = client_names(cfg, state_dir, &[(session.client_ip, deadline)]);
    let found = names
        .found
        .into_iter()
        .next()
        .expect("one name per address");
    let up = accepted.node_up(session, host, found.name.clone());
    register(
        cfg,
        state_dir,
        session,
        &up,
        name_step(cfg, &found, names.took),
        deadline,
    )
}

/// `connect_session` with the client's name already looked up (and how long that took): the
/// checks again, then the registration.
fn connect_named(
    cfg: &ServerConfig,
    state_dir: &Path,
    session: &Session,
    host: &HostName,
    (found, took): (&Found, Duration),
    deadline: Deadline,
) -> Result<String, Failure> {
    let up = prepare(cfg, state_dir, session)?.node_up(session, host, found.name.clone());
    register(
        cfg,
        state_dir,
        session,
        &up,
        name_step(cfg, found, took),
        deadline,
    )
}

/// One accepted node, under its lock: the scheduler, DNS, then its route if it will be
/// accepted. `name`: the client-name step of its log line.
fn register(
    cfg: &ServerConfig,
    state_dir: &Path,
    session: &Session,
    up: &NodeUp,
    name: Option<String>,
    deadline: Deadline,
) -> Result<String, Failure> {
    let host = &up.host;
    let mut steps = Steps::lock(cfg, state_dir, host, deadline)?;
    steps.record(Ok(name));
    if let Some(sched) = backend::open(cfg, state_dir) {
        let started = Instant::now();
        let r = sched.node_up(up, deadline);
        steps.record(timed(
            registered_line(sched.name(), host, r),
            started.elapsed(),
        ));
    }
    let started = Instant::now();
    let dns = dns_upsert(cfg, session, host, deadline);
    steps.record(timed(dns, started.elapsed()));
    if steps.admitted(cfg) {
        steps.record(route_up(cfg, session, deadline));
    }
    steps.finish(connected(session, host))
}

/// One connect of a batch: its checked session and its own time budget.
pub struct Connect {
    pub session: Session,
    pub host: HostName,
    pub deadline: Deadline,
}

/// What `connect_batch` did: each connect's result, in order, and figures for the log.
pub struct Batch {
    pub results: Vec<Result<String, Failure>>,
    /// Nodes registered in the one scheduler call (the others were refused first, or their
    /// lock was busy and they went alone).
    pub together: usize,
    /// Nodes whose lock was busy: registered alone after the batch, as `connect_session`.
    pub alone: usize,
    /// Time of the one scheduler call.
    pub scheduler: std::time::Duration,
    /// Client names looked up (not cached) and the time of all lookups, when names are on.
    pub client_names: Option<(usize, Duration)>,
}

/// Registers many connected nodes with ONE `Scheduler::nodes_up` call, each under its lock,
/// then DNS per node; every node gets its own verdict (a refused or failed node never fails the
/// others). Locks are taken in label order without waiting: a node whose lock is busy (its
/// disconnect is running, or it is twice in the batch) is registered alone afterwards, waiting
/// for its lock as `connect_session` does, so two lock holders never wait for each other.
pub fn connect_batch(cfg: &ServerConfig, state_dir: &Path, batch: &[Connect]) -> Batch {
    let mut results: Vec<Option<Result<String, Failure>>> = batch.iter().map(|_| None).collect();
    let mut accepted = Vec::new();
    for (i, c) in batch.iter().enumerate() {
        match prepare(cfg, state_dir, &c.session) {
            Ok(a) => accepted.push((i, a)),
            Err(f) => results[i] = Some(Err(f)),
        }
    }
    // The accepted clients' names at once (each address once, lookups side by side), before
    // the one scheduler call that writes them.
    let wanted: Vec<(IpAddr, Deadline)> = accepted
        .iter()
        .map(|&(i, _)| (batch[i].session.client_ip, batch[i].deadline))
        .collect();
    let names = client_names(cfg, state_dir, &wanted);
    let client_names =
        (cfg.client_name.lookup != ClientNameLookup::Off).then_some((names.asked, names.took));
    let mut found: Vec<Option<Found>> = batch.iter().map(|_| None).collect();
    let mut ready = Vec::new();
    for ((i, a), f) in accepted.into_iter().zip(names.found) {
        let c = &batch[i];
        ready.push((i, a.node_up(&c.session, &c.host, f.name.clone())));
        found[i] = Some(f);
    }
    let name_of = |i: usize| {
        found[i]
            .as_ref()
            .expect("every accepted connect has a name")
    };
    let (mut locked, alone) = lock_in_order(state_dir, ready, |up| &up.host, &mut results);
    for (i, _, steps) in locked.iter_mut() {
        steps.record(Ok(name_step(cfg, name_of(*i), names.took)));
    }
    let mut took = std::time::Duration::ZERO;
    if let Some(sched) = backend::open(cfg, state_dir).filter(|_| !locked.is_empty()) {
        let ups: Vec<NodeUp> = locked.iter().map(|(_, up, _)| up.clone()).collect();
        // The batch runs until its latest connect's budget ends. A node registered after its
        // own budget is still accepted: refusing it would leave it Alive for a client told to
        // go away, and its retry would do the work again (a client that left has no verdict
        // file any more, and the verdict is only logged).
        let deadline = latest(locked.iter().map(|&(i, _, _)| batch[i].deadline));
        let started = Instant::now();
        let verdicts = sched.nodes_up(&ups, deadline);
        took = started.elapsed();
        for ((_, up, steps), r) in locked.iter_mut().zip(verdicts) {
            steps.record(timed(registered_line(sched.name(), &up.host, r), took));
        }
    }
    let together = locked.len();
    // DNS for the whole batch at once (with RFC 2136: a few messages per zone, not two per
    // node), then each node's verdict from its own steps.
    let hosts: Vec<(&HostName, Ipv4Addr)> = locked
        .iter()
        .map(|&(i, _, _)| (&batch[i].host, batch[i].session.vpn_ip))
        .collect();
    let dns_started = Instant::now();
    let dns = if hosts.is_empty() {
        Vec::new()
    } else {
        // At least one DNS timeout after a scheduler step that took the budget: the nodes are
        // registered and will be accepted; their records must not fail for want of time.
        let deadline = latest(
            locked
                .iter()
                .map(|&(i, _, _)| batch[i].deadline)
                .chain([Deadline::after(cfg.limits.dns_timeout())]),
        );
        dns::backend::open(cfg).upsert_many(&hosts, deadline)
    };
    let dns_took = dns_started.elapsed();
    for ((_, _, steps), d) in locked.iter_mut().zip(dns) {
        steps.record(timed(
            d.map(|did| did.then(|| "DNS A+PTR set".to_owned()))
                .map_err(NodeError::from),
            dns_took,
        ));
    }
    // The routes of the nodes that will be accepted, in one `ip -batch`, before any verdict.
    if let Some(table) = cfg.routing.table().filter(|_| !locked.is_empty()) {
        let mut routes = Vec::new();
        let mut whose = Vec::new();
        for (k, (i, _, steps)) in locked.iter_mut().enumerate() {
            if !steps.admitted(cfg) {
                continue;
            }
            match route_of(cfg, &batch[*i].session) {
                Some(Ok(r)) => {
                    routes.push(r);
                    whose.push(k);
                }
                Some(Err(e)) => steps.record(Err(e.into())),
                None => {}
            }
        }
        let deadline = latest(locked.iter().map(|&(i, _, _)| batch[i].deadline));
        let done = table.announce_many(&routes, deadline.cap(cfg.limits.command_timeout()));
        for ((k, route), r) in whose.into_iter().zip(&routes).zip(done) {
            locked[k].2.record(
                r.map(|()| Some(format!("route {route} in table {}", table.table)))
                    .map_err(NodeError::from),
            );
        }
    }
    for (i, _, steps) in locked {
        let c = &batch[i];
        results[i] = Some(steps.finish(connected(&c.session, &c.host)));
    }
    // The batch's locks are released: a node whose lock was busy waits for it now (with the
    // name the batch found: never a second lookup).
    for &i in &alone {
        let c = &batch[i];
        results[i] = Some(connect_named(
            cfg,
            state_dir,
            &c.session,
            &c.host,
            (name_of(i), names.took),
            c.deadline,
        ));
    }
    Batch {
        results: results
            .into_iter()
            .map(|r| r.expect("every connect has a result"))
            .collect(),
        together,
        alone: alone.len(),
        scheduler: took,
        client_names,
    }
}

/// A batch's node locks, taken in label order without waiting: `(locked, busy)`. A busy node
/// is done alone once the batch has released its locks, waiting for its lock then, so two lock
/// holders never wait for each other; a lock that cannot be taken at all is that item's result.
fn lock_in_order<T, R>(
    state_dir: &Path,
    mut items: Vec<(usize, T)>,
    host: impl Fn(&T) -> &HostName,
    results: &mut [Option<Result<R, Failure>>],
) -> (Vec<(usize, T, Steps)>, Vec<usize>) {
    items.sort_by(|a, b| host(&a.1).label.cmp(&host(&b.1).label));
    let (mut locked, mut busy) = (Vec::new(), Vec::new());
    for (i, item) in items {
        match Steps::try_lock(state_dir, host(&item)) {
            Ok(Some(steps)) => locked.push((i, item, steps)),
            Ok(None) => busy.push(i),
            Err(f) => results[i] = Some(Err(f)),
        }
    }
    (locked, busy)
}

/// The deadline of several that ends last.
fn latest(deadlines: impl Iterator<Item = Deadline>) -> Deadline {
    deadlines
        .max_by_key(|d| d.remaining())
        .expect("at least one deadline")
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
    steps.finish(connected(session, host))
}

/// What `disconnect_host` did: its log line, and whether a newer session was left up.
pub struct Disconnected {
    pub line: String,
    pub spared: bool,
}

/// One node to take down: `disconnect_host`'s arguments.
#[derive(Debug, Clone)]
pub struct Down {
    pub host: HostName,
    pub vpn_ip: Ipv4Addr,
    pub guard: DownGuard,
}

/// The scheduler's side of a take-down, as a step of the node's log line; whether a newer
/// session was left up.
fn down_step(
    name: &'static str,
    host: &HostName,
    outcome: Result<DownOutcome, SchedulerError>,
) -> (Result<Option<String>, NodeError>, bool) {
    let stale = matches!(outcome, Ok(DownOutcome::NewerSession));
    let step = outcome
        .map_err(|source| NodeError::Scheduler {
            backend: name,
            doing: format!("taking {host} down"),
            source,
        })
        .map(|o| {
            Some(match o {
                DownOutcome::MarkedDown => format!("{name} Absent"),
                DownOutcome::AlreadyDown => format!("{name} already Absent"),
                DownOutcome::Unknown => format!("unknown to {name}"),
                DownOutcome::NewerSession => {
                    format!("ignored: {name} holds a newer session for this node")
                }
            })
        });
    (step, stale)
}

/// The rest of a take-down once the scheduler's step is recorded: DNS (unless a newer session
/// was left up), then the node's line.
fn finish_down(
    cfg: &ServerConfig,
    mut steps: Steps,
    d: &Down,
    stale: bool,
    deadline: Deadline,
) -> Result<Disconnected, Failure> {
    if cfg.dns.on_disconnect == OnDisconnect::Remove && !stale {
        steps.record(
            dns::backend::open(cfg)
                .remove(&d.host, d.vpn_ip, deadline)
                .map(|did| did.then(|| "DNS A+PTR removed".to_owned()))
                .map_err(NodeError::from),
        );
    }
    steps
        .finish(format!("{} ({})", d.host, d.vpn_ip))
        .map(|line| Disconnected {
            line,
            spared: stale,
        })
}

/// Takes one node down, unless the scheduler holds a session `guard` spares (a newer one).
pub fn disconnect_host(
    cfg: &ServerConfig,
    state_dir: &Path,
    d: &Down,
    deadline: Deadline,
) -> Result<Disconnected, Failure> {
    let mut steps = Steps::lock(cfg, state_dir, &d.host, deadline)?;
    let mut stale = false;
    if let Some(sched) = backend::open(cfg, state_dir) {
        let (step, spared) = down_step(
            sched.name(),
            &d.host,
            sched.node_down(&d.host, d.guard, deadline),
        );
        steps.record(step);
        stale = spared;
    }
    finish_down(cfg, steps, d, stale, deadline)
}

/// Takes many nodes down as `disconnect_host` does each, with ONE `Scheduler::nodes_down`
/// call (with OAR: one read, one state change and one read-back per round for all). Locks are
/// taken in label order without waiting: a node whose lock is busy (its connect is running, or
/// it is twice in the batch) is taken down alone afterwards, waiting for its lock, so two lock
/// holders never wait for each other. One result per node, in order.
pub fn disconnect_hosts(
    cfg: &ServerConfig,
    state_dir: &Path,
    downs: &[Down],
    deadline: Deadline,
) -> Vec<Result<Disconnected, Failure>> {
    let mut results: Vec<Option<Result<Disconnected, Failure>>> =
        downs.iter().map(|_| None).collect();
    let (mut locked, alone) = lock_in_order(
        state_dir,
        downs.iter().enumerate().collect(),
        |d| &d.host,
        &mut results,
    );
    let mut stale = vec![false; downs.len()];
    if let Some(sched) = backend::open(cfg, state_dir).filter(|_| !locked.is_empty()) {
        let batch: Vec<(HostName, DownGuard)> = locked
            .iter()
            .map(|(_, d, _)| (d.host.clone(), d.guard))
            .collect();
        let outcomes = sched.nodes_down(&batch, deadline);
        for ((i, d, steps), o) in locked.iter_mut().zip(outcomes) {
            let (step, spared) = down_step(sched.name(), &d.host, o);
            steps.record(step);
            stale[*i] = spared;
        }
    }
    for (i, d, steps) in locked {
        results[i] = Some(finish_down(cfg, steps, d, stale[i], deadline));
    }
    // The batch's locks are released: a node whose lock was busy waits for it now.
    for i in alone {
        results[i] = Some(disconnect_host(cfg, state_dir, &downs[i], deadline));
    }
    results
        .into_iter()
        .map(|r| r.expect("every node has a result"))
        .collect()
}

/// What a client-disconnect takes down, from OpenVPN's environment: the node and its session.
/// A session without an address never came up (OpenVPN runs the disconnect script after a
/// refused connect too): refused, so that nothing changes, or a refused duplicate would take
/// the live node down.
///
/// The hook's own: with `[routing] table`, it withdraws the session's route at once, before
/// any hand-off or take-down (a node that moved must not stay routed here), and says so.
pub fn session_down(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(NodeId, Down), Failure> {
    let (session, host) = ending_session(cfg, state_dir, env)?;
    if let Some(line) = route_down(cfg, &session) {
        eprintln!("idhal hook client-disconnect: {}: {line}", session.node);
    }
    Ok(take_down_of(session, host))
}

/// As `session_down`, without touching the route: the worker's (the hook withdrew it).
pub fn check_down(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(NodeId, Down), Failure> {
    let (session, host) = ending_session(cfg, state_dir, env)?;
    Ok(take_down_of(session, host))
}

fn ending_session(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(Session, HostName), Failure> {
    if !has_pool_address(env) {
        let node = node_from_env(env).map_err(|e| Failure::Refused(e.into()))?;
        return Err(Failure::Refused(NodeError::NeverUp { node }));
    }
    session_and_host(cfg, state_dir, env)
}

/// Deletes the ending session's own route (its metric): a newer session's stays. The log line;
/// a failure is only said (the take-down goes on; `idhal reconcile` deletes the route).
fn route_down(cfg: &ServerConfig, session: &Session) -> Option<String> {
    let table = cfg.routing.table()?;
    let route = match route_of(cfg, session) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return Some(format!("error: {}", one_line(&e))),
        None => {
            return Some(format!(
                "error: {}: its route cannot be deleted",
                one_line(&EnvError::Missing { var: "dev" })
            ))
        }
    };
    // The hook's first step: within its budget as well as a command's (OpenVPN serves nobody
    // while a disconnect script runs).
    let timeout = cfg.limits.command_timeout().min(cfg.limits.hook_budget());
    Some(match table.withdraw(&route, timeout) {
        Ok(Withdrawn::Removed) => format!("route {route} deleted from table {}", table.table),
        Ok(Withdrawn::AlreadyGone) => format!("route {route} was not in table {} (replaced by a newer session, or gone with its device)", table.table),
        Err(e) => format!("error: {}; `idhal reconcile` deletes it", one_line(&e)),
    })
}

fn take_down_of(session: Session, host: HostName) -> (NodeId, Down) {
    let guard = DownGuard::Session {
        since: session.since,
        client: (session.client_ip, session.client_port),
    };
    (
        session.node,
        Down {
            host,
            vpn_ip: session.vpn_ip,
            guard,
        },
    )
}

/// The node's type: from its enrollment record (the token it enrolled with decided it), else
/// the configured default (nodes certified outside idhal's CA).
pub fn node_type(cfg: &ServerConfig, record: Option<&NodeRow>) -> Label {
    record
        .and_then(|n| Label::parse(&n.node_type).ok())
        .unwrap_or_else(|| cfg.names.default_type.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that did something says how long its call took; one that did nothing or failed
    /// is left as it was (a failure is said by its error, never with a time).
    #[test]
    fn timed_steps_carry_their_call_time() {
        let took = Duration::from_millis(412);
        assert_eq!(
            timed(Ok(Some("OAR resource [1] Alive".into())), took).unwrap(),
            Some("OAR resource [1] Alive in 0.41 s".into())
        );
        assert_eq!(timed(Ok(None), took).unwrap(), None);
        let failed = timed(
            Err(NodeError::Unknown {
                node: NodeId::try_from("client1").unwrap(),
            }),
            took,
        );
        assert!(!failed.unwrap_err().to_string().contains("0.41"));
    }

    /// An address from the state database is checked like one from OpenVPN, and must be inside
    /// its own project's pool: a bad row refuses the node instead of pushing a wrong address.
    #[test]
    fn stored_addresses_are_checked() {
        let projects = vec![ProjectRow {
            name: "p".into(),
            created: 0,
            pool: "10.134.0.0/17".into(),
            next_host: 2,
            next_serial: 1,
            crl_number: 1,
            crl_next_update: 0,
        }];
        let cfg = ServerConfig::default();
        let addresses = addresses_of(&cfg, &projects).unwrap();
        let node = crate::names::node_id("client1").unwrap();
        let check = |project: &str, address: &str| {
            let record = NodeRow {
                id: "client1".into(),
                project: project.into(),
                node_type: "vnode".into(),
                address: address.into(),
                enrolled_at: 0,
                cert_serial: 2,
                revoked_at: None,
                wg_key: None,
                wg_registered_at: None,
            };
            match stored_address(&node, &record, &projects, &addresses) {
                Ok((ip, mask)) => Ok(format!("{ip} {mask}")),
                Err(Failure::Refused(e)) => Err(e.to_string()),
                Err(Failure::Backend(e)) => panic!("{e:?}"),
            }
        };
        assert_eq!(
            check("p", "10.134.0.2"),
            Ok("10.134.0.2 255.255.128.0".into())
        );
        for (project, address, why) in [
            (
                "p",
                "10.134.200.2",
                "outside its project \"p\"'s pool 10.134.0.0/17",
            ),
            (
                "p",
                "10.134.0.1",
                "the VPN server's own address in [names] pool 10.134.0.0/16",
            ),
            (
                "p",
                "10.134.127.255",
                "the broadcast address of project \"p\"'s pool 10.134.0.0/17",
            ),
            ("p", "10.134.0.2 ", "not an IPv4 address"),
            ("p", "ifconfig-push 1.2.3.4", "not an IPv4 address"),
            (
                "q",
                "10.134.0.2",
                "its project \"q\" is not in the database",
            ),
        ] {
            let e = check(project, address).unwrap_err();
            assert!(
                e.starts_with("node client1: its address in the state database")
                    && e.ends_with(why),
                "{address}: {e}"
            );
        }
    }

    /// A connect refused by `prepare` (here: a state database that cannot be read) sends no
    /// DNS query: the client's name is looked up only for a connect that goes on to the
    /// scheduler, so a refused node neither leaks its address to a resolver nor waits for one.
    #[test]
    fn a_connect_refused_before_the_scheduler_asks_no_dns() {
        use crate::config::{ClientNameSection, NameResolver};
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(crate::ca::db::FILE), "not a database").unwrap();
        let resolver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = ServerConfig {
            client_name: ClientNameSection {
                lookup: ClientNameLookup::Ptr,
                resolver: NameResolver::At(resolver.local_addr().unwrap()),
                timeout_ms: 300,
                ..ClientNameSection::default()
            },
            ..ServerConfig::default()
        };
        let env: HashMap<String, String> = [
            ("common_name", "cn1"),
            ("ifconfig_pool_remote_ip", "10.134.0.7"),
            ("trusted_ip", "192.0.2.7"),
            ("trusted_port", "40000"),
            ("time_unix", "1700000000"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let session = Session::from_env(&env, &addresses_of(&cfg, &[]).unwrap(), now()).unwrap();
        let host = host_of(&cfg, &session).unwrap();
        let deadline = Deadline::after(Duration::from_secs(30));
        let refused = |r: Result<String, Failure>| match r {
            Err(Failure::Backend(e)) => assert!(
                e.iter().any(|e| one_line(e).contains("not a database")),
                "{e:?}"
            ),
            other => panic!("{other:?}"),
        };
        refused(connect_session(&cfg, d.path(), &session, &host, deadline));
        let batch = connect_batch(
            &cfg,
            d.path(),
            &[Connect {
                session: session.clone(),
                host: host.clone(),
                deadline,
            }],
        );
        assert_eq!(batch.client_names.map(|(asked, _)| asked), Some(0));
        refused(batch.results.into_iter().next().unwrap());
        resolver.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 512];
        assert_eq!(
            resolver.recv_from(&mut buf).map_err(|e| e.kind()).err(),
            Some(std::io::ErrorKind::WouldBlock),
            "a DNS query was sent for a refused connect"
        );
        assert!(!d.path().join("client-names").exists());
    }
}
