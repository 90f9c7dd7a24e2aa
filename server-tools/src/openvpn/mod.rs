//! OpenVPN as idhal sees it: the hooks' environment (env) and the management interface
//! (management).

pub mod config;
pub mod env;
pub mod management;
pub mod status;
pub mod tmpfile;
