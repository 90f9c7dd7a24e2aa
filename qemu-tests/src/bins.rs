//! The binaries under test: the `idhal` server tools and the static musl agent, built in
//! release mode (what users run; the agent must be static to live in the initramfs) through
//! idhal-test-support's one way of building workspace binaries. `IDHAL_BIN` /
//! `IDHAL_AGENT_BIN` point at prebuilt ones instead.
use idhal_test_support::bins::{self as tsb, Profile};
use std::path::PathBuf;

const MUSL: &str = "x86_64-unknown-linux-musl";

pub use tsb::{target_dir, workspace_dir};

/// Returns (idhal, agent). Release builds lock `target/release` and `target/<musl>/release`,
/// not the `target/debug` of the running tests.
pub fn build() -> Result<(PathBuf, PathBuf), String> {
    let idhal = match std::env::var_os("IDHAL_BIN") {
        Some(p) => PathBuf::from(p),
        None => tsb::build("idhal-server-tools", "idhal", Profile::Release, None)?,
    };
    let agent = match std::env::var_os("IDHAL_AGENT_BIN") {
        Some(p) => PathBuf::from(p),
        None => tsb::build(
            "idhal-bootstrap",
            "idhal-bootstrap",
            Profile::Release,
            Some(MUSL),
        )
        .map_err(|e| format!("{e} (is the {MUSL} target installed? `rustup target add {MUSL}`)"))?,
    };
    Ok((idhal, agent))
}
