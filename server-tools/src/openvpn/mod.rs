//! OpenVPN as idhal sees it: the hooks' environment (env), the management interface
//! (management) and draining a server through it (drain).

pub mod config;
pub mod drain;
pub mod env;
pub mod management;
pub mod status;
pub mod tmpfile;
