//! The server's TOML configuration (`--config FILE`): one struct per section, every key optional
//! with a documented default (docs/server-config.md). Values are validated while parsing, so a
//! bad name template or domain stops every command at start, not a node at connect time.

use crate::bird::BirdSection;
use crate::names::{Domain, Ipv4Net, Label, NameError, NameTemplate, ServerName};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("config {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub names: NamesSection,
    pub hook: HookSection,
    pub scheduler: SchedulerSection,
    pub oar: OarSection,
    pub dns: DnsSection,
    pub reconcile: ReconcileSection,
    pub limits: Limits,
    pub ca: CaSection,
    pub state: StateSection,
    /// Direct paths: the timings `POST /peers` hands to nodes.
    pub peers: PeersSection,
    pub openvpn: OpenVpnSection,
    pub routing: RoutingSection,
    /// OAR `idhalclientname`: the host name of the machine a node connects from.
    pub client_name: ClientNameSection,
    /// Per-project overrides of `[openvpn]`, keyed by project name.
    pub projects: BTreeMap<String, ProjectSection>,
    /// Several VPN servers: the BIRD 2 configs `idhal bird config` renders.
    pub bird: BirdSection,
}

impl ServerConfig {
    /// Reads `path`, or returns the defaults when no file was given.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        let invalid = |msg: String| ConfigError::Invalid {
            path: path.to_owned(),
            msg,
        };
        cfg.names
            .template
            .check_one_to_one(&cfg.names.pool)
            .map_err(|e| invalid(format!("[names] template: {e}")))?;
        if cfg.scheduler.backend == SchedulerBackend::Oar {
            // The longest name of the pool: its broadcast address has the most digits in
            // every octet the prefix leaves free.
            let longest = cfg
                .names
                .template
                .render(cfg.names.pool.broadcast())
                .map(|l| format!("{l}.{}", cfg.names.domain))
                .map_err(|e| invalid(format!("[names] template: {e}")))?;
            let max = crate::scheduler::oar::NETWORK_ADDRESS_MAX;
            if longest.len() > max {
                return Err(invalid(format!(
                    "[names] template and domain make host names of up to {} characters ({longest}), over the {max} OAR stores (network_address): OAR would silently create nothing for them; shorten the template or the domain",
                    longest.len()
                )));
            }
        }
        if cfg.dns.update == DnsUpdate::Rfc2136 && cfg.dns.tsig_key_file.is_none() {
            return Err(invalid(
                "[dns] update = \"rfc2136\" needs tsig_key_file (unsigned updates are not sent)"
                    .into(),
            ));
        }
        if cfg.dns.update == DnsUpdate::Rfc2136 {
            cfg.reverse_zone().map_err(|e| invalid(e.to_string()))?;
        }
        cfg.limits.http.check().map_err(invalid)?;
        cfg.peers.check().map_err(invalid)?;
        for name in cfg.projects.keys() {
            if let Err(e) = idhal_manifest::ProjectName::try_from(name.as_str()) {
                return Err(invalid(format!("[projects.{name:?}]: {e}")));
            }
        }
        for (what, d) in [
            ("[ca] node_cert_validity", &cfg.ca.node_cert_validity),
            ("[ca] server_cert_validity", &cfg.ca.server_cert_validity),
            ("[ca] crl_validity", &cfg.ca.crl_validity),
        ] {
            match idhal_manifest::time::parse_duration(d) {
                Ok(secs) if secs >= 10 => {}
                Ok(_) => return Err(invalid(format!("{what} = {d:?} is too short"))),
                Err(e) => return Err(invalid(format!("{what}: {e}"))),
            }
        }
        let renew_min = idhal_manifest::time::parse_duration(&cfg.ca.renew_min_interval)
            .map_err(|e| invalid(format!("[ca] renew_min_interval: {e}")))?;
        // Nodes renew at 2/3 of the validity: a renewal inside the interval gets the same
        // certificate back, so an interval of half the validity or more would let none renew.
        if renew_min >= CaSection::secs(&cfg.ca.node_cert_validity) / 2 {
            return Err(invalid(format!(
                "[ca] renew_min_interval = {:?} is not under half of node_cert_validity ({:?}): nodes could not get a new certificate before theirs expires",
                cfg.ca.renew_min_interval, cfg.ca.node_cert_validity
            )));
        }
        for p in cfg.projects.values() {
            for r in p.remotes.iter().flatten() {
                Remote::parse(r).map_err(|e| invalid(format!("[projects] remotes: {e}")))?;
            }
        }
        for (key, n) in [
            ("[hook] workers", cfg.hook.workers),
            ("[hook] max_batch", cfg.hook.max_batch),
            ("[hook] max_queued", cfg.hook.max_queued),
            ("[hook] max_connections", cfg.hook.max_connections),
            ("[hook] max_request_bytes", cfg.hook.max_request_bytes),
            ("[oar] parallel_calls", cfg.oar.parallel_calls),
        ] {
            if n == 0 {
                return Err(invalid(format!("{key} must be at least 1")));
            }
        }
        for (key, ms) in [
            ("request_timeout_ms", cfg.hook.request_timeout_ms),
            ("handoff_timeout_ms", cfg.hook.handoff_timeout_ms),
        ] {
            if ms == 0 {
                return Err(invalid(format!("[hook] {key} must be at least 1 (ms)")));
            }
        }
        if cfg.hook.batch_window() >= cfg.hook.deferred_budget() {
            return Err(invalid(format!(
                "[hook] batch_window_ms ({}) must be below [hook] deferred_budget_ms ({}): the window is part of each deferred connect's budget",
                cfg.hook.batch_window_ms, cfg.hook.deferred_budget_ms
            )));
        }
        if cfg.hook.deferred_budget_ms > MAX_DEFERRED_BUDGET_MS {
            return Err(invalid(format!(
                "[hook] deferred_budget_ms ({}) is over {MAX_DEFERRED_BUDGET_MS}: OpenVPN's clients give up after their hand-window (60 s unless raised); keep the budget below it",
                cfg.hook.deferred_budget_ms
            )));
        }
        if cfg.hook.down_grace_secs > MAX_DOWN_GRACE_SECS {
            return Err(invalid(format!(
                "[hook] down_grace_secs ({}) is over {MAX_DOWN_GRACE_SECS}: the scheduler would keep giving jobs to nodes that are gone; a failover takes seconds",
                cfg.hook.down_grace_secs
            )));
        }
        let (first, max) = cfg.openvpn.connect_retry;
        if first == 0 || max < first || max > 300 {
            return Err(invalid(format!(
                "[openvpn] connect_retry = [{first}, {max}]: the first pause must be at least 1 s and the longest between it and 300 s"
            )));
        }
        if !(1..=120).contains(&cfg.openvpn.server_poll_timeout_secs) {
            return Err(invalid(format!(
                "[openvpn] server_poll_timeout_secs = {}: 1 to 120 (how long a node waits on a remote before trying the next one)",
                cfg.openvpn.server_poll_timeout_secs
            )));
        }
        if cfg.reconcile.listing_timeout_ms == 0 {
            return Err(invalid(
                "[reconcile] listing_timeout_ms must be at least 1 (ms)".into(),
            ));
        }
        for r in &cfg.openvpn.remotes {
            Remote::parse(r).map_err(|e| invalid(format!("[openvpn] remotes: {e}")))?;
        }
        cfg.client_name
            .check(&cfg.limits, &cfg.hook)
            .map_err(invalid)?;
        Ok(cfg)
    }

    /// This VPN server's name, recorded with every node it registers (OAR `idhalserver`) so
    /// that its `idhal reconcile` takes down only its own nodes: `[openvpn] name`, else the
    /// host's name (its first label).
    pub fn server_name(&self) -> Result<ServerName, NameError> {
        if let Some(n) = &self.openvpn.name {
            return Ok(n.clone());
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let first = host.trim().split('.').next().unwrap_or("");
        ServerName::parse(first).map_err(|_| NameError::Invalid {
            what: "[openvpn] name",
            value: first.to_owned(),
            why: format!(
                "not set, and the host name is not usable as one: set it ({})",
                idhal_manifest::id::SAFE_NAME_RULE
            )
            .into(),
        })
    }

    /// The zone forward records go to: `[dns] forward_zone`, else `[names] domain`.
    pub fn forward_zone(&self) -> Domain {
        self.dns
            .forward_zone
            .clone()
            .unwrap_or_else(|| self.names.domain.clone())
    }

    /// The reverse zone: `[dns] reverse_zone`, else derived from the pool when its prefix is
    /// 8, 16 or 24 bits (10.134.0.0/16 → 134.10.in-addr.arpa).
    pub fn reverse_zone(&self) -> Result<Domain, NameError> {
        if let Some(z) = &self.dns.reverse_zone {
            return Ok(z.clone());
        }
        let pool = self.names.pool;
        let o = pool.addr.octets();
        let n = match pool.prefix {
            8 => 1,
            16 => 2,
            24 => 3,
            _ => {
                return Err(NameError::Invalid {
                    what: "[dns] reverse_zone",
                    value: String::new(),
                    why: "must be set when the pool's prefix is not 8, 16 or 24".into(),
                })
            }
        };
        let labels: Vec<String> = o[..n].iter().rev().map(u8::to_string).collect();
        Domain::parse(&format!("{}.in-addr.arpa", labels.join(".")))
    }
}

macro_rules! try_from_string {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                <$t>::parse(&s)
            }
        }
    };
}
try_from_string!(Domain);
try_from_string!(Label);
try_from_string!(NameTemplate);
try_from_string!(Ipv4Net);
try_from_string!(ServerName);

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamesSection {
    #[serde(deserialize_with = "de_try")]
    pub domain: Domain,
    #[serde(deserialize_with = "de_try")]
    pub template: NameTemplate,
    #[serde(deserialize_with = "de_try")]
    pub pool: Ipv4Net,
    /// The node type (OAR `cluster` and `idhaltype`) when no node record says otherwise.
    #[serde(deserialize_with = "de_try")]
    pub default_type: Label,
}

impl Default for NamesSection {
    fn default() -> Self {
        Self {
            domain: Domain::parse("idhal.internal").expect("valid default"),
            template: NameTemplate::parse("vnode-{3}-{4}").expect("valid default"),
            pool: Ipv4Net::parse("10.134.0.0/16").expect("valid default"),
            default_type: Label::parse("vnode").expect("valid default"),
        }
    }
}

fn de_try<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<String, Error = NameError>,
{
    let s = String::deserialize(d)?;
    T::try_from(s).map_err(serde::de::Error::custom)
}

fn de_try_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<String, Error = NameError>,
{
    let s = String::deserialize(d)?;
    T::try_from(s).map(Some).map_err(serde::de::Error::custom)
}

/// What the hook's exit code says when a backend fails. OpenVPN refuses the client on a
/// non-zero client-connect exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Exit 1: OpenVPN refuses the connection; the node retries and the event is not lost.
    #[default]
    Refuse,
    /// Exit 0: the node gets its tunnel; the error is logged and `idhal reconcile` repairs it.
    Admit,
}

/// How `idhal hook client-connect` answers OpenVPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookMode {
    /// OpenVPN >= 2.5: check the node and write its address at once, write `2` (deferred) and
    /// hand the OAR/DNS work to `idhal hook worker`, which writes the verdict later. OpenVPN
    /// serves other clients meanwhile. Without a reachable worker (or when OpenVPN passes no
    /// `client_connect_deferred_file`) the hook does the work itself, as in `sync`, and says so.
    #[default]
    Deferred,
    /// Do everything before exiting (OpenVPN < 2.5): OpenVPN serves nobody else meanwhile.
    Sync,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookSection {
    pub on_failure: OnFailure,
    pub mode: HookMode,
    /// The worker's unix socket; default `STATE/hook/worker.sock` (the directory 0700, the
    /// socket 0600).
    pub socket: Option<PathBuf>,
    /// Connects the worker registers at once (each runs the OAR and DNS steps, under
    /// `deferred_budget_ms` counted from the hand-off).
    pub workers: u32,
    /// A deferred connect's budget, from the hand-off to its verdict (queue wait included).
    /// OpenVPN serves everyone else meanwhile: only this client waits, and it gives up after its
    /// `hand-window` (60 s by default, counted from its first packet). So this is longer than
    /// `[limits] hook_budget_ms` (which bounds a hook OpenVPN waits for) and below the
    /// hand-window: a connect that cannot be registered within it is refused (the client
    /// retries) rather than registered for a client that has already left.
    pub deferred_budget_ms: u64,
    /// Most connects one worker thread registers together (one `nodes_up` call: with OAR one
    /// read and one read-back for all, instead of per node).
    pub max_batch: u32,
    /// How long a worker thread, once it holds a connect, gathers more for its batch (it stops
    /// earlier at `max_batch`). The first connect's wait; each still has its `hook_budget_ms`.
    pub batch_window_ms: u64,
    /// Hand-offs waiting for a worker; past it the hook is told "busy" and does the work itself.
    pub max_queued: u32,
    /// Requests being read at once; past it a new one is told "busy" at once.
    pub max_connections: u32,
    /// Largest hand-off request (OpenVPN's few variables and two paths fit in 2 KiB).
    pub max_request_bytes: u32,
    /// A hand-off request must arrive whole within this (a slow writer is cut off).
    pub request_timeout_ms: u64,
    /// How long the hook waits for the worker's answer to a hand-off. A refusal or a worker
    /// that cannot be reached makes the hook do the work itself; a whole request left
    /// unanswered stays with the worker (it may have queued it: doing it here too would
    /// register the node twice), and the client retries after its hand-window if it never
    /// gets a verdict.
    pub handoff_timeout_ms: u64,
    /// The worker's janitor removes OpenVPN's client-connect files older than this from
    /// `[openvpn] tmp_dir` (OpenVPN leaks them for clients that leave while deferred). Keep it
    /// well above hook_budget_ms and the clients' hand-window (60 s).
    pub stale_tmp_secs: u64,
    /// How long a node that disconnected stays Alive in the scheduler before it is taken
    /// down, in case it comes back (to this server or another one): a failover or a drain then
    /// moves it without marking it Absent, and its jobs live on. The take-down, when it comes,
    /// is guarded by the session as always (a node registered again meanwhile is left up).
    /// 0: at once. Done by the worker in deferred mode; in sync mode, and when the worker
    /// cannot be reached, the hook leaves the node up and `idhal reconcile` takes it down
    /// once it has been gone this long. Its route is withdrawn at once either way.
    pub down_grace_secs: u64,
}

impl Default for HookSection {
    fn default() -> Self {
        Self {
            on_failure: OnFailure::Refuse,
            mode: HookMode::Deferred,
            socket: None,
            // Measured with the 1,000-node storm (docs/benchmarks.md): 16 threads gathering
            // for 100 ms made batches of 1–4 while connects trickled in, each paying its own
            // read and read-backs (229.5 s for all); 4 threads of up to 100 gathered for
            // 500 ms took 152.9 s. A lone connect waits the 500 ms once.
            workers: 4,
            deferred_budget_ms: 45_000,
            max_batch: 100,
            batch_window_ms: 500,
            max_queued: 4096,
            max_connections: 64,
            max_request_bytes: 16 << 10,
            request_timeout_ms: 2_000,
            handoff_timeout_ms: 2_000,
            stale_tmp_secs: 600,
            down_grace_secs: 0,
        }
    }
}

/// Above any hand-window an admin would set: a budget past it only registers nodes whose
/// client has left.
const MAX_DEFERRED_BUDGET_MS: u64 = 600_000;

/// A node gone longer than this is not coming back by itself: a longer grace only keeps dead
/// nodes Alive (OAR keeps scheduling jobs on them).
const MAX_DOWN_GRACE_SECS: u64 = 3_600;

impl HookSection {
    pub fn batch_window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.batch_window_ms)
    }

    pub fn deferred_budget(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.deferred_budget_ms)
    }

    pub fn socket(&self, state_dir: &Path) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(|| state_dir.join("hook").join("worker.sock"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerBackend {
    #[default]
    Oar,
    /// No scheduler registration (DNS only).
    None,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSection {
    pub backend: SchedulerBackend,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OarSection {
    pub oarnodes: PathBuf,
    pub oarnodesetting: PathBuf,
    pub oarproperty: PathBuf,
    /// Extra environment for the OAR commands. OAR's setuid wrappers reset it; it matters when
    /// the Perl tools in /usr/lib/oar are run directly as root with another `OARCONFFILE`.
    pub env: BTreeMap<String, String>,
    /// Per-node `oarnodesetting` calls (a new node's creation, changed properties) one process
    /// runs at once, across all its batches: the hook worker runs `[hook] workers` batches at
    /// once, and each call is a Perl start-up (mostly CPU) behind OAR's table lock, so more
    /// calls than cores only make each slower.
    pub parallel_calls: u32,
}

impl Default for OarSection {
    fn default() -> Self {
        Self {
            oarnodes: "/usr/bin/oarnodes".into(),
            oarnodesetting: "/usr/sbin/oarnodesetting".into(),
            oarproperty: "/usr/sbin/oarproperty".into(),
            env: BTreeMap::new(),
            parallel_calls: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DnsUpdate {
    /// No live updates (static zones from `idhal dns zone`, or no DNS at all).
    #[default]
    Off,
    /// RFC 2136 dynamic updates signed with TSIG.
    Rfc2136,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDisconnect {
    /// Leave the records: the address stays the node's while the pool is static.
    #[default]
    Keep,
    /// Delete the node's A and PTR records.
    Remove,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DnsSection {
    pub update: DnsUpdate,
    /// The primary server's address (IP:port); updates go over UDP.
    pub server: SocketAddr,
    /// BIND-style key file (`tsig-keygen` output): `key "NAME" { algorithm hmac-sha256; secret "…"; };`
    pub tsig_key_file: Option<PathBuf>,
    #[serde(deserialize_with = "de_try_opt")]
    pub forward_zone: Option<Domain>,
    #[serde(deserialize_with = "de_try_opt")]
    pub reverse_zone: Option<Domain>,
    pub ttl: u32,
    pub on_disconnect: OnDisconnect,
    /// `idhal dns zone`: the primary name server (SOA MNAME and NS), a full name.
    pub zone_ns: String,
    /// `idhal dns zone`: the contact mailbox in SOA form (`hostmaster.example.org`).
    pub zone_contact: String,
}

impl Default for DnsSection {
    fn default() -> Self {
        Self {
            update: DnsUpdate::Off,
            server: "127.0.0.1:53".parse().expect("valid default"),
            tsig_key_file: None,
            forward_zone: None,
            reverse_zone: None,
            ttl: 300,
            on_disconnect: OnDisconnect::Keep,
            zone_ns: "ns.idhal.internal".into(),
            zone_contact: "hostmaster.idhal.internal".into(),
        }
    }
}

/// Where `idhal reconcile` learns who is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StatusSource {
    /// OpenVPN's status file (`status FILE 10`, `status-version 2` or 3).
    #[default]
    StatusFile,
    /// OpenVPN's management interface (`status 2`), always current.
    Management,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileSection {
    pub source: StatusSource,
    /// OpenVPN's `status` file (written with `status FILE 10` and `status-version 2` or 3).
    pub status_file: PathBuf,
    /// OpenVPN's management interface; keep it on 127.0.0.1 (anyone who reaches it controls
    /// the VPN server).
    pub management: SocketAddr,
    /// The management password file; default: the one `[openvpn]` uses for `[ca] project`.
    pub management_password_file: Option<PathBuf>,
    /// A status file older than this means OpenVPN is not writing it: reconcile refuses to act.
    pub max_status_age_secs: u64,
    /// A status file larger than this is refused unread (about 200 bytes a client).
    pub max_status_bytes: u64,
    /// The scheduler's one listing of idhal's nodes (hundreds of them, under load, take longer
    /// than a hook's `command_timeout_ms`).
    pub listing_timeout_ms: u64,
    /// How long a run waits for OpenVPN to rewrite its status file when only a status written
    /// after the scheduler's listing can tell whether a node held down is still connected.
    pub status_wait_secs: u64,
    /// How often OpenVPN writes its status file (`status FILE 10`, as `idhal openvpn
    /// server-config` renders it): part of the take-down grace.
    pub status_interval_secs: u64,
}

impl ReconcileSection {
    pub fn listing_timeout(&self) -> Duration {
        Duration::from_millis(self.listing_timeout_ms)
    }

    /// How long before a status was written a session may have started and still be missing
    /// from it: a deferred connect is answered up to two hook budgets after its session
    /// started (the hand-off wait, then the worker's budget), and OpenVPN lists it at its next
    /// status write. Reconcile never takes down a node registered from such a session.
    pub fn take_down_grace_secs(&self, limits: &Limits) -> u64 {
        2 * limits.hook_budget_ms.div_ceil(1000) + self.status_interval_secs
    }
}

impl Default for ReconcileSection {
    fn default() -> Self {
        Self {
            source: StatusSource::StatusFile,
            status_file: "/run/openvpn-server/status-server.log".into(),
            management: "127.0.0.1:7505".parse().expect("valid default"),
            management_password_file: None,
            max_status_age_secs: 120,
            max_status_bytes: 64 << 20,
            listing_timeout_ms: 30_000,
            status_wait_secs: 15,
            status_interval_secs: 10,
        }
    }
}

/// Whether the connect path asks DNS for the client's host name (OAR `idhalclientname`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientNameLookup {
    /// No query is sent: the client's address is its name. The default: a reverse lookup sends
    /// every client's address to a resolver and costs a connect up to `timeout_ms` when the
    /// resolver is slow (OpenSSH turned `UseDNS` off by default for the same reasons).
    #[default]
    Off,
    /// The PTR of the client's address, checked against the name's A/AAAA (forward-confirmed).
    Ptr,
}

/// The DNS server asked for client names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NameResolver {
    /// The first `nameserver` of /etc/resolv.conf (port 53), read at each lookup.
    #[default]
    System,
    /// This server (`IP:PORT`), over UDP.
    At(SocketAddr),
}

impl<'de> Deserialize<'de> for NameResolver {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "system" {
            return Ok(Self::System);
        }
        s.parse().map(Self::At).map_err(|_| {
            serde::de::Error::custom(format!(
                "{:?} is neither \"system\" nor IP:PORT (e.g. \"127.0.0.1:53\")",
                s.chars().take(80).collect::<String>()
            ))
        })
    }
}

/// `[client_name]`: the reverse DNS name of the client's address (OpenVPN's `trusted_ip`),
/// shown in OAR so an admin sees which machine a node runs on. Informational only: never an
/// identity (whoever controls an address's reverse zone chooses its PTR).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientNameSection {
    pub lookup: ClientNameLookup,
    pub resolver: NameResolver,
    /// The whole lookup of one address (PTR, then the forward confirmation). At most a
    /// quarter of the connect's budget (checked at load), and cut at run time to a quarter of
    /// what the connect has left (`CLIENT_NAME_SHARE`). Past it the address is stored.
    pub timeout_ms: u64,
    /// How long a name found is reused without asking again.
    pub cache_secs: u64,
    /// How long a failure (no name, a refused answer, a timeout) is reused: shorter, so a
    /// fixed PTR shows soon, long enough that a dead resolver costs one timeout per address
    /// per period, not one per connect.
    pub failure_cache_secs: u64,
    /// Addresses the cache file holds at most (the soonest to expire are dropped first); at
    /// most `MAX_CLIENT_NAME_CACHE_ENTRIES`: every connect reads the whole file.
    pub cache_entries: u32,
    /// Lookups in flight at once (the worker's batches look their clients up together).
    pub parallel: u32,
}

impl Default for ClientNameSection {
    fn default() -> Self {
        Self {
            lookup: ClientNameLookup::Off,
            resolver: NameResolver::System,
            timeout_ms: 1_000,
            cache_secs: 3_600,
            failure_cache_secs: 300,
            cache_entries: 4_096,
            parallel: 32,
        }
    }
}

/// Above this a client's name would hold a connect longer than its registration.
const MAX_CLIENT_NAME_TIMEOUT_MS: u64 = 10_000;

/// A client's name may take at most 1/`CLIENT_NAME_SHARE` of a connect's time: `timeout_ms`
/// against the budget at load, and at run time against what the connect has left. The rest is
/// the scheduler's: the name runs first, and OAR's registration is what the connect needs
/// (with `on_failure = "refuse"`, a registration out of time refuses the node). Docs say "a
/// quarter".
pub const CLIENT_NAME_SHARE: u32 = 4;

/// The cache file is read whole by every connect (and merged again before it is written): at
/// ~320 bytes a line, 65,536 lines are ~20 MiB at most.
const MAX_CLIENT_NAME_CACHE_ENTRIES: u32 = 65_536;

impl ClientNameSection {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    fn check(&self, limits: &Limits, hook: &HookSection) -> Result<(), String> {
        if !(1..=MAX_CLIENT_NAME_TIMEOUT_MS).contains(&self.timeout_ms) {
            return Err(format!(
                "[client_name] timeout_ms = {}: 1 to {MAX_CLIENT_NAME_TIMEOUT_MS} (a name is worth less than a connect)",
                self.timeout_ms
            ));
        }
        if self.lookup == ClientNameLookup::Off {
            // timeout_ms is not used: a short hook budget needs no change here.
            return self.check_cache();
        }
        // The sync hook (and its fallback when the worker cannot take a connect) has
        // hook_budget_ms; the worker's connects have deferred_budget_ms.
        let mut budgets = vec![("[limits] hook_budget_ms", limits.hook_budget_ms)];
        if hook.mode == HookMode::Deferred {
            budgets.push(("[hook] deferred_budget_ms", hook.deferred_budget_ms));
        }
        let (key, budget) = budgets
            .into_iter()
            .min_by_key(|&(_, ms)| ms)
            .expect("one budget at least");
        let most = budget / u64::from(CLIENT_NAME_SHARE);
        if self.timeout_ms > most {
            return Err(format!(
                "[client_name] timeout_ms ({}) is over a quarter of {key} ({budget}), {most}: the scheduler needs the rest of the connect's time",
                self.timeout_ms
            ));
        }
        self.check_cache()
    }

    fn check_cache(&self) -> Result<(), String> {
        if !(1..=MAX_CLIENT_NAME_CACHE_ENTRIES).contains(&self.cache_entries) {
            return Err(format!(
                "[client_name] cache_entries = {}: 1 to {MAX_CLIENT_NAME_CACHE_ENTRIES}",
                self.cache_entries
            ));
        }
        if !(1..=256).contains(&self.parallel) {
            return Err(format!(
                "[client_name] parallel = {}: 1 to 256",
                self.parallel
            ));
        }
        Ok(())
    }
}

/// `[routing]`: the kernel table idhal writes each connected node's /32 into, for BIRD to
/// export (several VPN servers). Without `table`, no route is written (one server).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingSection {
    /// 1-252 or 256-2147483647 (0 and the kernel's default/main/local 253-255 are refused).
    pub table: Option<crate::routing::TableId>,
    /// The ip(8) binary.
    pub ip: PathBuf,
    /// The device `idhal reconcile` writes a missing route on (the hooks use OpenVPN's `dev`;
    /// a status names none).
    pub dev: crate::names::IfName,
    /// Most output read from one `ip` run (`ip -j route show` prints ~90 bytes a route).
    pub max_output_bytes: u64,
}

impl Default for RoutingSection {
    fn default() -> Self {
        Self {
            table: None,
            ip: "/usr/sbin/ip".into(),
            dev: crate::names::IfName::parse("tun0").expect("valid default"),
            max_output_bytes: 16 << 20,
        }
    }
}

impl RoutingSection {
    /// The table to write, when routing is on.
    pub fn table(&self) -> Option<crate::routing::RouteTable> {
        self.table
            .map(|t| crate::routing::RouteTable::new(t, &self.ip, self.max_output_bytes))
    }
}

/// The project CA (`idhal ca`, enrollment, revocation).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CaSection {
    /// The project commands act on when `--project` is not given.
    pub project: String,
    /// Validity of node certificates (`idhal-bootstrap enroll` and `renew`): short, so a lost
    /// node's certificate expires by itself; nodes renew at 2/3 of it (docs/enrollment.md).
    pub node_cert_validity: String,
    /// Validity of VPN server certificates (`idhal ca issue-server`).
    pub server_cert_validity: String,
    /// Validity of each CRL; `idhal serve` and `idhal crl refresh` re-sign it when less than
    /// half is left.
    pub crl_validity: String,
    /// Enrollment requests whose time is further than this from the server's are refused.
    pub max_clock_skew_secs: u64,
    /// A renewal within this time of the node's last certificate gets that certificate again
    /// (`POST /renew`): a node that lost the answer gets the same one, and no node makes the CA
    /// sign in a loop. 0: every renewal signs.
    pub renew_min_interval: String,
}

impl Default for CaSection {
    fn default() -> Self {
        Self {
            project: "default".into(),
            node_cert_validity: "30d".into(),
            server_cert_validity: "825d".into(),
            crl_validity: "30d".into(),
            max_clock_skew_secs: 600,
            renew_min_interval: "1h".into(),
        }
    }
}

impl CaSection {
    /// A validated duration field in seconds (checked at load time).
    pub fn secs(field: &str) -> u64 {
        idhal_manifest::time::parse_duration(field).unwrap_or(0)
    }
}

/// `[peers]`: the path-switch timings every peer list carries (docs/direct-paths.md), the same
/// for every node of every project, so all of them switch paths alike.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PeersSection {
    /// Seconds between two refreshes of a node's peer list: how long a revoked node stays
    /// another node's peer at most.
    pub refresh_secs: u32,
    /// WireGuard persistent keepalive, seconds.
    pub keepalive_secs: u32,
    /// A peer not heard from this long loses its direct route (traffic goes back through the
    /// tunnel): at least twice the keepalive.
    pub fallback_secs: u32,
}

impl Default for PeersSection {
    fn default() -> Self {
        Self {
            refresh_secs: 60,
            keepalive_secs: 5,
            fallback_secs: 15,
        }
    }
}

/// A node's registration stays in the lists this many refresh intervals after it was made:
/// a live node re-registers every interval, so missing three in a row means it is gone (a
/// vnode deleted without `idhal revoke`), and it leaves every list by itself.
pub const REGISTRATION_LIFETIME_REFRESHES: u64 = 3;

impl PeersSection {
    /// The oldest registration time (server clock) a list made at `now` still carries.
    pub fn registered_since(&self, now: u64) -> u64 {
        now.saturating_sub(REGISTRATION_LIFETIME_REFRESHES * u64::from(self.refresh_secs))
    }

    /// The wire format's own rule (`peers::timings_problem`): a list the agents would refuse
    /// is refused here, at load, in one line.
    fn check(&self) -> Result<(), String> {
        match idhal_manifest::peers::timings_problem(
            self.refresh_secs,
            self.keepalive_secs,
            self.fallback_secs,
        ) {
            None => Ok(()),
            Some(why) => Err(format!(
                "[peers] {why} (refresh_secs = {}, keepalive_secs = {}, fallback_secs = {})",
                self.refresh_secs, self.keepalive_secs, self.fallback_secs
            )),
        }
    }
}

/// Where the CA's state lives (docs/state.md): SQLite in `--state-dir` unless `database` names
/// a PostgreSQL database, which several `idhal serve` can share.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StateSection {
    /// `postgresql://USER@HOST:PORT/DB` or `host=/var/run/postgresql user=U dbname=DB`; no
    /// password in it (see `password_file`). None: SQLite in `--state-dir`.
    pub database: Option<String>,
    /// A file holding the PostgreSQL password (its first line); else `PGPASSWORD` from the
    /// environment, else none (peer or trust authentication).
    pub password_file: Option<PathBuf>,
    /// Connections one `idhal serve` opens at most for enrollments (each idle one is kept).
    pub max_connections: u32,
    /// How long connecting to PostgreSQL may take, answer included (a server that accepts
    /// and never answers is given up on after this).
    pub connect_timeout_secs: u64,
    /// How long one PostgreSQL statement may run, lock waits included (`SET
    /// statement_timeout` on every connection; at least 100).
    pub statement_timeout_ms: u64,
    /// How often `idhal serve` looks for a newer CRL in the database (signed by another
    /// server) to publish to its crl.pem.
    pub crl_publish_secs: u64,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            database: None,
            password_file: None,
            max_connections: 8,
            connect_timeout_secs: 10,
            statement_timeout_ms: 10_000,
            crl_publish_secs: 10,
        }
    }
}

/// A `remote` line of client configs: `HOST PORT` or `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub host: String,
    pub port: u16,
}

impl Remote {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not HOST:PORT");
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-');
        if host.is_empty() || host.len() > 253 || !host.chars().all(ok) || port == 0 {
            return Err(bad());
        }
        Ok(Self {
            host: host.to_owned(),
            port,
        })
    }
}

/// Who may use an OpenVPN management interface. Anyone who reaches it controls the server
/// (kill clients, read every session), and loopback is shared by every local user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ManagementAuth {
    /// `management IP PORT FILE`: OpenVPN asks for the password in FILE.
    #[default]
    Password,
    /// No password: only on a host where every local user may control the VPN server.
    None,
}

/// OpenVPN servers of the project: what `idhal openvpn server-config` renders and what
/// enrolled nodes' client configs point at.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenVpnSection {
    /// Where nodes connect (`HOST:PORT`), in order; every one becomes a `remote` line.
    pub remotes: Vec<String>,
    /// The server's `local` address and `port`.
    pub listen: SocketAddr,
    /// Management interfaces of the project's OpenVPN servers (loopback): `idhal revoke` drops
    /// a revoked node from each at once; server-config renders the first.
    pub management: Vec<SocketAddr>,
    /// Whether the management interfaces ask for a password (default) or not.
    pub management_auth: ManagementAuth,
    /// The management password (its first line); default `STATE/projects/NAME/management.pw`.
    /// `idhal ca issue-server` and `openvpn server-config` create it (0600) when missing and
    /// never overwrite it.
    pub management_password_file: Option<PathBuf>,
    /// This server's name, recorded with the nodes it registers (default: the host name).
    #[serde(deserialize_with = "de_try_opt")]
    pub name: Option<ServerName>,
    /// Networks pushed to nodes as routes (`10.0.0.0/8`).
    pub push_routes: Vec<String>,
    /// DNS servers pushed to nodes (`dhcp-option DNS`).
    pub push_dns: Vec<std::net::Ipv4Addr>,
    /// `client-to-client`: OpenVPN passes node-to-node packets between its clients itself
    /// instead of handing them to the server's kernel. Off by default: with it, that traffic
    /// never meets the server's firewall. Needed where the server's tun device has no address
    /// (the QEMU tests run OpenVPN with --ifconfig-noexec); direct paths (docs/direct-paths.md)
    /// fall back to whichever way node-to-node traffic takes through the tunnel.
    pub client_to_client: bool,
    /// `keepalive PING RESTART` seconds. With several servers, a short restart (`[1, 3]`)
    /// makes nodes leave a server whose host died within seconds (docs/multi-server.md).
    pub keepalive: (u32, u32),
    /// Nodes' `connect-retry FIRST MAX` seconds. Every pause between two connection attempts
    /// is at most MAX, and with `auth-retry nointeract` (which nodes use) OpenVPN starts each
    /// pause at 10 s: MAX is the pause a node waits after losing its server before it tries
    /// again (the same one first, then the next remote), so it bounds failover time; it also
    /// spaces the retries of nodes a busy server refused.
    pub connect_retry: (u32, u32),
    /// Nodes' `server-poll-timeout` (rendered with several remotes): how long a node waits
    /// for a remote's first answer before trying the next. OpenVPN's default, 120 s, keeps
    /// nodes on a dead host for two minutes; a server too busy to answer within it (a boot
    /// storm) sends nodes to the next remote.
    pub server_poll_timeout_secs: u32,
    /// The `idhal` binary OpenVPN runs as its hook (default: this one).
    pub idhal: Option<PathBuf>,
    /// OpenVPN's status file (`status FILE 10`), read by `idhal reconcile`.
    pub status_file: PathBuf,
    /// OpenVPN's `tmp-dir`, where it makes each client's client-connect files; default
    /// `STATE/openvpn-tmp`. idhal writes only OpenVPN's own files there. Not /tmp: Debian's
    /// openvpn-server@ unit has PrivateTmp, so the worker would not see OpenVPN's /tmp.
    pub tmp_dir: Option<PathBuf>,
}

impl OpenVpnSection {
    pub fn tmp_dir(&self, state_dir: &Path) -> PathBuf {
        self.tmp_dir
            .clone()
            .unwrap_or_else(|| state_dir.join("openvpn-tmp"))
    }
}

impl Default for OpenVpnSection {
    fn default() -> Self {
        Self {
            remotes: vec!["10.0.2.100:1194".into()],
            listen: "0.0.0.0:1194".parse().expect("valid default"),
            management: vec!["127.0.0.1:7505".parse().expect("valid default")],
            management_auth: ManagementAuth::Password,
            management_password_file: None,
            name: None,
            push_routes: Vec::new(),
            push_dns: Vec::new(),
            client_to_client: false,
            keepalive: (10, 60),
            connect_retry: (1, 2),
            server_poll_timeout_secs: 4,
            idhal: None,
            status_file: "/run/openvpn-server/status-server.log".into(),
            tmp_dir: None,
        }
    }
}

/// `[projects.NAME]`: a project's own OpenVPN servers, when it has some.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectSection {
    pub remotes: Option<Vec<String>>,
    pub listen: Option<SocketAddr>,
    pub management: Option<Vec<SocketAddr>>,
}

impl ServerConfig {
    /// `[openvpn]` with the project's overrides applied.
    pub fn openvpn_for(&self, project: &str) -> OpenVpnSection {
        let mut o = self.openvpn.clone();
        if let Some(p) = self.projects.get(project) {
            if let Some(r) = &p.remotes {
                o.remotes = r.clone();
            }
            if let Some(l) = p.listen {
                o.listen = l;
            }
            if let Some(m) = &p.management {
                o.management = m.clone();
            }
        }
        o
    }
}

/// Every time limit in one place. OpenVPN waits for a client-connect script before serving
/// anyone else, so a hook's total time is capped by `hook_budget_ms` whatever the backends do.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub hook_budget_ms: u64,
    pub command_timeout_ms: u64,
    pub state_confirm_ms: u64,
    pub dns_timeout_ms: u64,
    pub lock_wait_ms: u64,
    /// `[limits.http]`: `idhal serve`'s front.
    pub http: HttpLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            hook_budget_ms: 15_000,
            // A node's creation waits behind OAR's table lock under load: killed at 5 s it
            // left resources without their properties (refused nodes) in the storm. A hook's
            // commands are still cut at hook_budget_ms.
            command_timeout_ms: 20_000,
            state_confirm_ms: 3_000,
            dns_timeout_ms: 2_000,
            lock_wait_ms: 10_000,
            http: HttpLimits::default(),
        }
    }
}

impl Limits {
    pub fn hook_budget(&self) -> Duration {
        Duration::from_millis(self.hook_budget_ms)
    }
    pub fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.command_timeout_ms)
    }
    pub fn state_confirm(&self) -> Duration {
        Duration::from_millis(self.state_confirm_ms)
    }
    pub fn dns_timeout(&self) -> Duration {
        Duration::from_millis(self.dns_timeout_ms)
    }
    pub fn lock_wait(&self) -> Duration {
        Duration::from_millis(self.lock_wait_ms)
    }
}

/// `idhal serve`'s limits (`[limits.http]`). Every connection costs a task, a socket and hyper's
/// buffers (a few KiB idle, at most `max_header_bytes` + one 64 KiB file chunk busy), so
/// `max_connections` bounds the server's memory; the timeouts bound how long any client can hold
/// one of them without making progress.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpLimits {
    /// Connections served at once. Past it a new connection waits up to `connection_wait_ms`
    /// for a free slot, then gets 503.
    pub max_connections: u32,
    pub connection_wait_ms: u64,
    /// From the moment the server waits for a request (a new connection, or the end of the
    /// previous response on a kept-alive one) until the request's whole head has arrived.
    pub header_timeout_ms: u64,
    /// The whole request body (only `POST /enroll` has one).
    pub body_timeout_ms: u64,
    /// A connection that sends nothing: after accept, or after a response on a kept-alive one.
    pub idle_timeout_ms: u64,
    /// A response write that makes no progress this long (a client that stopped reading).
    pub write_timeout_ms: u64,
    /// Largest request body; a larger Content-Length gets 413 before anything is read, and a
    /// chunked body is cut there. At most the enrollment format's own maximum.
    pub max_body_bytes: u64,
    /// Largest request head (request line and headers); larger gets 431.
    pub max_header_bytes: u64,
    /// After SIGTERM or SIGINT: how long requests in flight may take to finish.
    pub shutdown_grace_ms: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            connection_wait_ms: 1_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 10_000,
            idle_timeout_ms: 5_000,
            write_timeout_ms: 30_000,
            max_body_bytes: idhal_manifest::enroll::MAX_REQUEST as u64,
            max_header_bytes: 16 << 10,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl HttpLimits {
    fn check(&self) -> Result<(), String> {
        let max_body = idhal_manifest::enroll::MAX_REQUEST as u64;
        if self.max_connections == 0 {
            return Err("[limits.http] max_connections must be at least 1".into());
        }
        if !(1..=max_body).contains(&self.max_body_bytes) {
            return Err(format!(
                "[limits.http] max_body_bytes must be 1..={max_body} (the enrollment request's own maximum)"
            ));
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            return Err("[limits.http] max_header_bytes must be 1024..=1048576".into());
        }
        for (key, ms) in [
            ("header_timeout_ms", self.header_timeout_ms),
            ("body_timeout_ms", self.body_timeout_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("write_timeout_ms", self.write_timeout_ms),
        ] {
            if ms == 0 {
                return Err(format!("[limits.http] {key} must be at least 1 (ms)"));
            }
        }
        Ok(())
    }
    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ServerConfig, ConfigError> {
        ServerConfig::parse(s, Path::new("t.toml"))
    }

    #[test]
    fn failover_settings_are_bounded() {
        let c = parse("").unwrap();
        assert_eq!(c.hook.down_grace_secs, 0, "one server: down at once");
        assert_eq!(c.openvpn.connect_retry, (1, 2));
        assert_eq!(c.openvpn.server_poll_timeout_secs, 4);
        let c =
            parse("[hook]\ndown_grace_secs = 60\n[openvpn]\nconnect_retry = [2, 30]\n").unwrap();
        assert_eq!(
            (c.hook.down_grace_secs, c.openvpn.connect_retry),
            (60, (2, 30))
        );
        for (bad, says) in [
            (
                "[hook]\ndown_grace_secs = 3601",
                "down_grace_secs (3601) is over 3600",
            ),
            ("[hook]\ndown_grace_secs = -1", "down_grace_secs"),
            (
                "[openvpn]\nconnect_retry = [0, 2]",
                "connect_retry = [0, 2]",
            ),
            (
                "[openvpn]\nconnect_retry = [5, 2]",
                "connect_retry = [5, 2]",
            ),
            (
                "[openvpn]\nconnect_retry = [1, 301]",
                "connect_retry = [1, 301]",
            ),
            ("[openvpn]\nconnect_retry = [1]", "connect_retry"),
            (
                "[openvpn]\nserver_poll_timeout_secs = 0",
                "server_poll_timeout_secs = 0",
            ),
            (
                "[openvpn]\nserver_poll_timeout_secs = 121",
                "server_poll_timeout_secs = 121",
            ),
        ] {
            let e = format!("{:#}", anyhow::Error::new(parse(bad).unwrap_err()));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn client_name_settings_are_checked_at_load() {
        let c = parse("").unwrap();
        assert_eq!(c.client_name.lookup, ClientNameLookup::Off);
        assert_eq!(c.client_name.resolver, NameResolver::System);
        assert_eq!(c.client_name.timeout(), Duration::from_secs(1));
        let c = parse(
            "[client_name]\nlookup = \"ptr\"\nresolver = \"127.0.0.1:5353\"\ntimeout_ms = 300\n",
        )
        .unwrap();
        assert_eq!(c.client_name.lookup, ClientNameLookup::Ptr);
        assert_eq!(
            c.client_name.resolver,
            NameResolver::At("127.0.0.1:5353".parse().unwrap())
        );
        // The largest allowed: a quarter of the budget, whichever binds; deferred_budget_ms
        // only in deferred mode.
        let ptr = "[client_name]\nlookup = \"ptr\"\n";
        parse(&format!("{ptr}timeout_ms = 3750\ncache_entries = 65536")).unwrap();
        parse(&format!(
            "{ptr}timeout_ms = 3750\n[hook]\nmode = \"sync\"\ndeferred_budget_ms = 4000"
        ))
        .unwrap();
        parse(&format!(
            "{ptr}timeout_ms = 10000\n[limits]\nhook_budget_ms = 40000"
        ))
        .unwrap();
        // Lookups off: timeout_ms is not used, and a short budget needs no change to it.
        parse("[client_name]\ntimeout_ms = 2000\n[limits]\nhook_budget_ms = 2000").unwrap();
        let c = parse("[client_name]\nresolver = \"[::1]:53\"\n").unwrap();
        assert_eq!(
            c.client_name.resolver,
            NameResolver::At("[::1]:53".parse().unwrap())
        );
        assert_eq!(
            parse("[client_name]\nresolver = \"system\"\n")
                .unwrap()
                .client_name
                .resolver,
            NameResolver::System
        );
        for (bad, says) in [
            (
                "[client_name]\ntimeout_ms = 0",
                "config t.toml: [client_name] timeout_ms = 0: 1 to 10000 (a name is worth less than a connect)",
            ),
            (
                "[client_name]\ntimeout_ms = 10001",
                "[client_name] timeout_ms = 10001: 1 to 10000",
            ),
            (
                "[client_name]\nlookup = \"ptr\"\ntimeout_ms = 2000\n[limits]\nhook_budget_ms = 2000",
                "config t.toml: [client_name] timeout_ms (2000) is over a quarter of [limits] hook_budget_ms (2000), 500: the scheduler needs the rest of the connect's time",
            ),
            // The default budget (15 s) allows 3.75 s.
            (
                "[client_name]\nlookup = \"ptr\"\ntimeout_ms = 3751",
                "[client_name] timeout_ms (3751) is over a quarter of [limits] hook_budget_ms (15000), 3750:",
            ),
            // A worker's connect has deferred_budget_ms (when it is the smaller).
            (
                "[client_name]\nlookup = \"ptr\"\ntimeout_ms = 1001\n[hook]\ndeferred_budget_ms = 4000",
                "[client_name] timeout_ms (1001) is over a quarter of [hook] deferred_budget_ms (4000), 1000:",
            ),
            (
                "[client_name]\ncache_entries = 65537",
                "[client_name] cache_entries = 65537: 1 to 65536",
            ),
            (
                "[client_name]\nresolver = \"ns1.example.org:53\"",
                "\"ns1.example.org:53\" is neither \"system\" nor IP:PORT",
            ),
            (
                "[client_name]\nresolver = \"127.0.0.1\"",
                "\"127.0.0.1\" is neither \"system\" nor IP:PORT",
            ),
            ("[client_name]\nlookup = \"yes\"", "unknown variant `yes`"),
            (
                "[client_name]\ncache_entries = 0",
                "[client_name] cache_entries = 0: 1 to 65536",
            ),
            (
                "[client_name]\nparallel = 0",
                "[client_name] parallel = 0: 1 to 256",
            ),
            ("[client_name]\nttl = 5", "unknown field `ttl`"),
        ] {
            let e = format!("{:#}", anyhow::Error::new(parse(bad).unwrap_err()));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn peer_timings_are_checked_at_load_in_one_line() {
        let c = parse("").unwrap();
        assert_eq!(
            (
                c.peers.refresh_secs,
                c.peers.keepalive_secs,
                c.peers.fallback_secs
            ),
            (60, 5, 15)
        );
        let c = parse(
            "[peers]
refresh_secs = 10
keepalive_secs = 1
fallback_secs = 2",
        )
        .unwrap();
        assert_eq!(c.peers.fallback_secs, 2);
        for (bad, says) in [
            (
                "[peers]
fallback_secs = 9",
                "config t.toml: [peers] fallback 9 s: use at least twice the keepalive (5 s), at most 86400 (refresh_secs = 60, keepalive_secs = 5, fallback_secs = 9)",
            ),
            ("[peers]
refresh_secs = 0", "[peers] refresh 0 s: use 1-86400"),
            (
                "[peers]
keepalive_secs = 3601
fallback_secs = 8000",
                "[peers] keepalive 3601 s: use 1-3600",
            ),
            ("[peers]
refresh_secs = -1", "refresh_secs"),
            ("[peers]
refresh = 5", "unknown field `refresh`"),
        ] {
            let e = format!("{:#}", anyhow::Error::new(parse(bad).unwrap_err()));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn reconcile_limits_and_its_take_down_grace() {
        let c = parse("").unwrap();
        assert_eq!(c.reconcile.listing_timeout(), Duration::from_secs(30));
        assert_eq!(c.reconcile.status_wait_secs, 15);
        // Two hook budgets (15 s each) and one status interval (10 s).
        assert_eq!(c.reconcile.take_down_grace_secs(&c.limits), 40);
        let c = parse("[limits]\nhook_budget_ms = 1500\n[reconcile]\nstatus_interval_secs = 60")
            .unwrap();
        // A budget's part of a second counts as a whole one.
        assert_eq!(c.reconcile.take_down_grace_secs(&c.limits), 2 * 2 + 60);
        assert_eq!(
            refusal("[reconcile]\nlisting_timeout_ms = 0"),
            Refusal::Check("[reconcile] listing_timeout_ms must be at least 1 (ms)".into())
        );
    }

    #[test]
    fn defaults_and_derived_zones() {
        let c = parse("").unwrap();
        assert_eq!(
            c.names.template,
            NameTemplate::parse("vnode-{3}-{4}").unwrap()
        );
        assert_eq!(c.reverse_zone().unwrap().as_str(), "134.10.in-addr.arpa");
        assert_eq!(c.forward_zone().as_str(), "idhal.internal");
        assert_eq!(c.hook.on_failure, OnFailure::Refuse);
        assert_eq!(c.hook.mode, HookMode::Deferred);
        let state = Path::new("/s");
        assert_eq!(c.hook.socket(state), Path::new("/s/hook/worker.sock"));
        assert_eq!(c.openvpn.tmp_dir(state), Path::new("/s/openvpn-tmp"));
        let c = parse("[hook]\nmode = \"sync\"\nworkers = 2\n").unwrap();
        assert_eq!((c.hook.mode, c.hook.workers), (HookMode::Sync, 2));
        assert_eq!(
            refusal("[hook]\nworkers = 0"),
            Refusal::Check("[hook] workers must be at least 1".into())
        );
        assert_eq!(
            (
                c.hook.max_batch,
                c.hook.batch_window_ms,
                c.limits.command_timeout_ms
            ),
            (100, 500, 20_000),
            "defaults"
        );
        assert_eq!(
            refusal("[hook]\nmax_batch = 0"),
            Refusal::Check("[hook] max_batch must be at least 1".into())
        );
        assert_eq!(
            (c.hook.deferred_budget_ms, c.oar.parallel_calls),
            (45_000, 4),
            "defaults"
        );
        // The window is part of the deferred budget (the hook's own budget is not involved).
        parse("[hook]\nbatch_window_ms = 3000\n[limits]\nhook_budget_ms = 3000").unwrap();
        assert_eq!(
            refusal("[hook]\nbatch_window_ms = 3000\ndeferred_budget_ms = 3000"),
            Refusal::Check("[hook] batch_window_ms (3000) must be below [hook] deferred_budget_ms (3000): the window is part of each deferred connect's budget".into())
        );
        assert_eq!(
            refusal("[hook]\ndeferred_budget_ms = 600001"),
            Refusal::Check("[hook] deferred_budget_ms (600001) is over 600000: OpenVPN's clients give up after their hand-window (60 s unless raised); keep the budget below it".into())
        );
        assert_eq!(
            refusal("[oar]\nparallel_calls = 0"),
            Refusal::Check("[oar] parallel_calls must be at least 1".into())
        );
        assert_eq!(
            refusal("[hook]\nmode = \"async\""),
            Refusal::Toml("unknown variant `async`, expected `deferred` or `sync`".into())
        );
    }

    #[test]
    fn http_limits() {
        let c = parse("[limits.http]\nmax_connections = 10\nidle_timeout_ms = 250").unwrap();
        assert_eq!(c.limits.http.max_connections, 10);
        assert_eq!(c.limits.http.idle_timeout_ms, 250);
        assert_eq!(c.limits.http.max_body_bytes, 8192);
        for (bad, says) in [
            ("max_connections = 0", "max_connections must be at least 1"),
            ("max_body_bytes = 0", "max_body_bytes must be 1..=8192"),
            ("max_body_bytes = 8193", "max_body_bytes must be 1..=8192"),
            (
                "max_header_bytes = 100",
                "max_header_bytes must be 1024..=1048576",
            ),
            (
                "write_timeout_ms = 0",
                "write_timeout_ms must be at least 1",
            ),
            ("max_connections = -1", "invalid value"),
            ("max_connection = 5", "unknown field `max_connection`"),
        ] {
            let err = parse(&format!("[limits.http]\n{bad}")).unwrap_err();
            let text = format!("{:#}", anyhow::Error::new(err));
            assert!(text.contains(says), "{bad}: {text}");
        }
    }

    #[test]
    fn host_names_must_fit_oars_network_address() {
        // n-255-255 (9) + . + 90 = 100: fits; one more character does not, with OAR (only).
        let domain = |n: usize| format!("{}.{}.test", "a".repeat(40), "b".repeat(n - 46));
        let toml = |d: &str, extra: &str| {
            format!("[names]\npool = \"10.134.0.0/16\"\ntemplate = \"n-{{3}}-{{4}}\"\ndomain = \"{d}\"\n{extra}")
        };
        let e = |n| {
            parse(&toml(&domain(n), ""))
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        assert!(e(90).is_ok(), "{:?}", e(90));
        let err = e(91).unwrap_err();
        assert!(
            err.ends_with(&format!("[names] template and domain make host names of up to 101 characters (n-255-255.{}), over the 100 OAR stores (network_address): OAR would silently create nothing for them; shorten the template or the domain", domain(91))),
            "{err}"
        );
        assert!(parse(&toml(&domain(91), "[scheduler]\nbackend = \"none\"")).is_ok());
        // A /24 leaves one octet free: its fixed octets count as they are.
        let small = format!(
            "[names]\npool = \"10.134.7.0/24\"\ntemplate = \"n-{{3}}-{{4}}\"\ndomain = \"{}\"",
            domain(92)
        );
        assert!(parse(&small).is_ok());
    }

    #[test]
    fn a_template_must_give_every_node_its_own_name() {
        let e = parse("[names]\npool = \"10.0.0.0/8\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks {2}"), "{e}");
        assert!(
            e.contains("10.0.0.1 and 10.1.0.1 would both be \"vnode-0-1\""),
            "{e}"
        );
        let e = parse("[names]\npool = \"10.134.0.0/16\"\ntemplate = \"n{3}{4}\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("{3} and {4} run together"), "{e}");
        let e = parse("[names]\npool = \"10.134.0.0/16\"\ntemplate = \"n{3}1{4}\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("run together"), "{e}");
        let e = parse("[names]\npool = \"10.134.0.0/20\"\ntemplate = \"n-{4}\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lacks {3}"), "{e}");
        for ok in [
            "[names]\npool = \"10.0.0.0/8\"\ntemplate = \"vnode-{2}-{3}-{4}\"",
            "[names]\npool = \"10.134.9.0/24\"\ntemplate = \"n{4}\"",
            "[names]\npool = \"10.134.0.0/16\"\ntemplate = \"n{3}x{4}\"",
            "[names]\npool = \"10.134.0.0/16\"\ntemplate = \"{1}-{2}-{3}-{4}\"",
        ] {
            parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn management_auth_is_explicit() {
        let c = parse("").unwrap();
        assert_eq!(c.openvpn.management_auth, ManagementAuth::Password);
        let c = parse("[openvpn]\nmanagement_auth = \"none\"\nname = \"vpn2\"").unwrap();
        assert_eq!(c.openvpn.management_auth, ManagementAuth::None);
        assert_eq!(c.server_name().unwrap().as_str(), "vpn2");
        assert_eq!(
            refusal("[openvpn]\nmanagement_auth = false"),
            Refusal::Toml("wanted string or table".into())
        );
        assert_eq!(
            refusal("[openvpn]\nname = \"a b\""),
            Refusal::Toml(
                "server name \"a b\" is not valid: 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'".into()
            )
        );
    }

    /// How a config was refused: by TOML parsing (with serde's message) or by the checks
    /// after it.
    #[derive(Debug, PartialEq, Eq)]
    enum Refusal {
        Toml(String),
        Check(String),
    }

    fn refusal(text: &str) -> Refusal {
        match parse(text) {
            Err(ConfigError::Parse { source, .. }) => Refusal::Toml(source.message().to_owned()),
            Err(ConfigError::Invalid { msg, .. }) => Refusal::Check(msg),
            other => panic!("{text:?} was not refused as expected: {other:?}"),
        }
    }

    #[test]
    fn refusals() {
        let toml = |m: &str| Refusal::Toml(m.to_owned());
        let check = |m: &str| Refusal::Check(m.to_owned());
        assert_eq!(
            refusal("[names]\ntemplate = \"x'{4}\""),
            toml("name template \"x'{4}\" is not valid: literal a-z 0-9 - and {1}..{4} for the address octets, at least one octet")
        );
        assert_eq!(
            refusal("[names]\ndomain = \"a b\""),
            toml("domain label \"a b\" is not valid: 1-63 of a-z 0-9 -, not starting or ending with - (upper case is folded)")
        );
        assert_eq!(
            refusal("[hook]\non_failure = \"maybe\""),
            toml("unknown variant `maybe`, expected `refuse` or `admit`")
        );
        assert_eq!(
            refusal("[bogus]\n"),
            toml("unknown field `bogus`, expected one of `names`, `hook`, `scheduler`, `oar`, `dns`, `reconcile`, `limits`, `ca`, `state`, `peers`, `openvpn`, `routing`, `client_name`, `projects`, `bird`")
        );
        assert_eq!(
            refusal("[routing]\ntable = 254"),
            toml("[routing] table = 254 (the kernel's main table) is refused: idhal deletes every /32 in its table that no connected node holds, so it needs a table of its own (1-252 or 256-2147483647)")
        );
        assert_eq!(
            refusal("[routing]\ndev = \"tun 0\""),
            toml("interface name \"tun 0\" is not valid: 1-15 of A-Z a-z 0-9 _ . - (not . or ..)")
        );
        assert_eq!(
            refusal("[dns]\nupdate = \"rfc2136\""),
            check("[dns] update = \"rfc2136\" needs tsig_key_file (unsigned updates are not sent)")
        );
        assert_eq!(
            refusal(
                "[names]\npool = \"10.0.0.0/20\"\n[dns]\nupdate = \"rfc2136\"\ntsig_key_file = \"k\""
            ),
            check("[dns] reverse_zone \"\" is not valid: must be set when the pool's prefix is not 8, 16 or 24")
        );
        // The manifest crate's rule for project names, in its own words.
        assert_eq!(
            refusal("[projects.\"a..b\"]\nremotes = []"),
            check("[projects.\"a..b\"]: project name \"a..b\" is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit, without '..'")
        );
    }
}
