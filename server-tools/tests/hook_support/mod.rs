//! What the hook tests share beyond idhal-test-support's real components (OAR on PostgreSQL,
//! Knot, OpenVPN, each on 127.0.0.1 with ephemeral ports, stopped by pid): an OpenVPN-like
//! environment for one node and `idhal hook` run the way OpenVPN runs it.
#![allow(dead_code, unused_imports)]

pub use idhal_test_support::knot::{empty_zone, Knot, TSIG_SECRET};
pub use idhal_test_support::oar::{Oar, OARDIR};
pub use idhal_test_support::pg::pg_available;
pub use idhal_test_support::process::{listening, signal, Reaper};
pub use idhal_test_support::{free_port, now, require};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const IDHAL: &str = env!("CARGO_BIN_EXE_idhal");

/// OpenVPN-like environment for one node.
pub fn node_env(cn: &str, vpn_ip: &str, since: u64) -> Vec<(String, String)> {
    vec![
        ("common_name".into(), cn.into()),
        ("X509_0_CN".into(), cn.into()),
        ("ifconfig_pool_remote_ip".into(), vpn_ip.into()),
        ("trusted_ip".into(), "127.0.0.1".into()),
        ("trusted_port".into(), "40000".into()),
        ("time_unix".into(), since.to_string()),
        ("dev".into(), "tun0".into()),
        ("script_type".into(), "client-connect".into()),
    ]
}

/// Runs `idhal hook EVENT` the way OpenVPN does: a clean environment holding only its variables.
pub fn hook(config: &Path, state_dir: &Path, event: &str, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(IDHAL);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["hook", event]);
    cmd.output().unwrap()
}

/// A run's stdout then stderr, for assertions and failure messages.
pub fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The OAR state of `host`'s one resource (panics when it has none or several).
pub fn state_of(oar: &Oar, host: &str) -> String {
    let r = oar.host(host);
    assert_eq!(r.len(), 1, "{host}: {r:?}");
    r[0]["state"].as_str().unwrap().to_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A fresh state dir and config file holding `toml`.
pub fn setup(toml: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("server.toml");
    std::fs::write(&cfg, toml).unwrap();
    let state = d.path().join("state");
    (d, cfg, state)
}
