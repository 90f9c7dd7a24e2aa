//! OpenVPN as idhal sees it: the hooks' environment (env) and the management interface
//! (management).

pub mod env;
pub mod management;
