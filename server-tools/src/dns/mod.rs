//! DNS for the nodes: live RFC 2136 updates (rfc2136).

pub mod rfc2136;
pub mod zone;
