//! The batch-scheduler side of the hooks behind one small trait, so a Slurm backend can follow
//! OAR; `backend::open` is the one place that picks the backend from the configuration.

pub mod backend;
pub mod oar;

use crate::client_name::ClientName;
use crate::names::{HostName, Label, NodeId, ServerName};
use crate::process::Deadline;
use std::net::{IpAddr, Ipv4Addr};

/// Everything a scheduler is told about a connected node; every field is validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeUp {
    pub node: NodeId,
    pub host: HostName,
    pub vpn_ip: Ipv4Addr,
    pub client_ip: IpAddr,
    pub client_port: Option<u16>,
    /// The client machine's host name (reverse DNS of `client_ip`), or that address.
    pub client_name: ClientName,
    pub since: u64,
    /// The node's type: OAR's `cluster` and `idhaltype`.
    pub node_type: Label,
    /// The VPN server that registers it: only that server's reconcile takes it down.
    pub server: ServerName,
}

/// A node the scheduler knows and idhal manages (it carries an idhal node id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedNode {
    pub host: String,
    pub node: Option<String>,
    pub vpn_ip: Option<String>,
    pub state: String,
    /// The VPN server that registered it (`None`: registered before idhal recorded it).
    pub server: Option<String>,
    /// When its registered session started.
    pub since: Option<u64>,
}

/// Which session a take-down is about, so that it never ends a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownGuard {
    /// The disconnect hook of the session that started at `since` from `client`. A session
    /// registered later, or in the same second from another client address or port (a
    /// reconnect within one second), is not this one: it is left up.
    Session {
        since: u64,
        client: (IpAddr, Option<u16>),
    },
    /// `idhal reconcile`, from a listing written at `written` that does not hold the node:
    /// a session that started less than `grace_secs` before that second (or later) may
    /// simply not be listed yet (its deferred connect was answered after the write), and is
    /// left up; the next run decides. `grace_secs`: `ReconcileSection::take_down_grace_secs`.
    ListedAt { written: u64, grace_secs: u64 },
}

/// The session a scheduler holds for a node, as recorded at registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registered {
    pub since: u64,
    pub client: Option<(IpAddr, Option<u16>)>,
}

impl DownGuard {
    /// Whether `registered` is another, newer (or not older) session than the one ending.
    pub fn spares(&self, registered: &Registered) -> bool {
        match *self {
            DownGuard::Session { since, client } => {
                registered.since > since
                    || (registered.since == since && registered.client.is_some_and(|c| c != client))
            }
            DownGuard::ListedAt {
                written,
                grace_secs,
            } => registered.since >= written.saturating_sub(grace_secs),
        }
    }
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
    /// Registers several nodes as `node_up` does each (same guarantee: a node is reported up
    /// only once the scheduler shows it up with its properties), one verdict per entry, in
    /// order; one node's failure is its own. For the hook worker, which holds every node's
    /// lock while the batch runs. A backend batches what it can; this default goes one by one.
    fn nodes_up(
        &self,
        ups: &[NodeUp],
        deadline: Deadline,
    ) -> Vec<Result<UpOutcome, SchedulerError>> {
        ups.iter().map(|up| self.node_up(up, deadline)).collect()
    }
    /// Takes the node out of scheduling without forgetting it (jobs on it are killed). When
    /// the scheduler holds a session `guard` spares (a late disconnect of an old tunnel after
    /// the node reconnected), nothing is changed.
    fn node_down(
        &self,
        host: &HostName,
        guard: DownGuard,
        deadline: Deadline,
    ) -> Result<DownOutcome, SchedulerError>;
    /// Takes several nodes down as `node_down` does each (same guard, same confirmation), in
    /// as few scheduler calls as it allows; one result per node, in order.
    fn nodes_down(
        &self,
        downs: &[(HostName, DownGuard)],
        deadline: Deadline,
    ) -> Vec<Result<DownOutcome, SchedulerError>> {
        downs
            .iter()
            .map(|(host, guard)| self.node_down(host, *guard, deadline))
            .collect()
    }
    /// Nodes that carry idhal's properties, for `idhal reconcile`.
    fn managed_nodes(&self, deadline: Deadline) -> Result<Vec<ManagedNode>, SchedulerError>;
    /// Whether `managed_nodes` state means "usable".
    fn is_up_state(&self, state: &str) -> bool;
    fn name(&self) -> &'static str;
}

/// A backend's failure. It carries the backend's own typed error (`oar::OarError`) whole, so
/// this module names no backend (a backend converts into it, `backend::open` picks one).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct SchedulerError(Box<dyn std::error::Error + Send + Sync + 'static>);

impl SchedulerError {
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        SchedulerError(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_take_down_never_ends_a_newer_session() {
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let reg = |since, port| Registered {
            since,
            client: Some((ip, port)),
        };
        let ending = DownGuard::Session {
            since: 100,
            client: (ip, Some(40000)),
        };
        // Its own session: taken down.
        assert!(!ending.spares(&reg(100, Some(40000))));
        assert!(!ending.spares(&reg(99, Some(1))));
        // A reconnect in the same second (another port) or later: left up.
        assert!(ending.spares(&reg(100, Some(40001))));
        assert!(ending.spares(&reg(101, Some(40000))));
        // Recorded before ports were: only the time can tell.
        assert!(!ending.spares(&Registered {
            since: 100,
            client: None
        }));
        let listed = DownGuard::ListedAt {
            written: 100,
            grace_secs: 0,
        };
        assert!(listed.spares(&reg(100, None)));
        assert!(!listed.spares(&reg(99, None)));
    }

    #[test]
    fn a_listing_spares_sessions_that_started_within_its_grace() {
        let reg = |since| Registered {
            since,
            client: None,
        };
        let listed = DownGuard::ListedAt {
            written: 1_000,
            grace_secs: 40,
        };
        // Started before the write but answered after it: not listed yet, left up.
        assert!(listed.spares(&reg(995)));
        assert!(listed.spares(&reg(960)));
        assert!(listed.spares(&reg(1_001)));
        // Older than the grace: it would be listed if it were connected.
        assert!(!listed.spares(&reg(959)));
        assert!(!listed.spares(&reg(0)));
        // A grace longer than the clock spares everything rather than wrapping.
        let early = DownGuard::ListedAt {
            written: 10,
            grace_secs: 40,
        };
        assert!(early.spares(&reg(0)));
    }
}
