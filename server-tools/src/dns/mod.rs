//! DNS for the nodes behind one small trait: live RFC 2136 updates (rfc2136.rs) or none (the
//! pool declared in static zone files, zone.rs); `backend::open` is the one place that picks
//! from [dns] update.

pub mod backend;
pub mod rfc2136;
pub mod zone;

use crate::names::HostName;
use crate::process::Deadline;
use std::net::Ipv4Addr;

pub use rfc2136::DnsError;

/// What a node's connect and disconnect do to its A and PTR records.
pub trait NodeDns {
    /// Replaces the node's A and PTR. `Ok(false)`: this backend makes no live updates.
    fn upsert(&self, host: &HostName, ip: Ipv4Addr, deadline: Deadline) -> Result<bool, DnsError>;
    /// `upsert` for several nodes, one result per entry in order; a backend sends what it can
    /// together (the hook worker's batches).
    fn upsert_many(
        &self,
        nodes: &[(&HostName, Ipv4Addr)],
        deadline: Deadline,
    ) -> Vec<Result<bool, DnsError>> {
        nodes
            .iter()
            .map(|(host, ip)| self.upsert(host, *ip, deadline))
            .collect()
    }
    /// Deletes the node's A and PTR. `Ok(false)`: this backend makes no live updates.
    fn remove(&self, host: &HostName, ip: Ipv4Addr, deadline: Deadline) -> Result<bool, DnsError>;
    /// Whether records change per node (`idhal reconcile --refresh-dns` has work to do).
    fn is_live(&self) -> bool;
}
