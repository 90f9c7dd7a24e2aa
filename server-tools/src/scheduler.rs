//! The batch-scheduler side of the hooks behind one small trait, so a Slurm backend can follow
//! OAR; `open` is the one place that picks the backend from the configuration.

use crate::config::{SchedulerBackend, ServerConfig};
use crate::db::NodeRow;
use crate::names::{HostName, Label, NodeId};
use crate::oar::{Oar, OarError};
use crate::process::Deadline;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

/// Everything a scheduler is told about a connected node; every field is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUp {
    pub node: NodeId,
    pub host: HostName,
    pub vpn_ip: Ipv4Addr,
    pub client_ip: IpAddr,
    pub since: u64,
    /// The node's type: OAR's `cluster` and `idhaltype`.
    pub node_type: Label,
}

/// A node the scheduler knows and idhal manages (it carries an idhal node id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedNode {
    pub host: String,
    pub node: Option<String>,
    pub vpn_ip: Option<String>,
    pub state: String,
}

/// What `node_up` did, for the log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpOutcome {
    pub created: bool,
    pub resource_ids: Vec<u64>,
}

/// What `node_down` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownOutcome {
    MarkedDown,
    AlreadyDown,
    Unknown,
    /// A newer session is registered: this disconnect is stale and was ignored.
    NewerSession,
}

pub trait Scheduler {
    /// Registers the node (creating it once), sets its properties and makes it usable; returns
    /// only once the scheduler confirms the state, or fails before `deadline`.
    fn node_up(&self, up: &NodeUp, deadline: Deadline) -> Result<UpOutcome, SchedulerError>;
    /// Takes the node out of scheduling without forgetting it (jobs on it are killed). When
    /// `session_since` is given and the scheduler holds a newer session for the node (a late
    /// disconnect of an old tunnel after the node reconnected), nothing is changed.
    fn node_down(
        &self,
        host: &HostName,
        session_since: Option<u64>,
        deadline: Deadline,
    ) -> Result<DownOutcome, SchedulerError>;
    /// Nodes that carry idhal's properties, for `idhal reconcile`.
    fn managed_nodes(&self, deadline: Deadline) -> Result<Vec<ManagedNode>, SchedulerError>;
    /// Whether `managed_nodes` state means "usable".
    fn is_up_state(&self, state: &str) -> bool;
    fn name(&self) -> &'static str;
}

#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Oar(#[from] OarError),
}

/// The backend the configuration asks for, or `None` when scheduling is switched off.
pub fn open(cfg: &ServerConfig, state_dir: &Path) -> Option<Box<dyn Scheduler>> {
    match cfg.scheduler.backend {
        SchedulerBackend::Oar => Some(Box::new(Oar::new(cfg, state_dir))),
        SchedulerBackend::None => None,
    }
}

/// The node's type: from its enrollment record (the token it enrolled with decided it), else
/// the configured default (nodes certified outside idhal's CA).
pub fn node_type(cfg: &ServerConfig, record: Option<&NodeRow>) -> Label {
    record
        .and_then(|n| Label::parse(&n.node_type).ok())
        .unwrap_or_else(|| cfg.names.default_type.clone())
}
