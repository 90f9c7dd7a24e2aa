//! What the hook tests share beyond idhal-test-support's real components (OAR on PostgreSQL,
//! Knot, OpenVPN, each on 127.0.0.1 with ephemeral ports, stopped by pid): an OpenVPN-like
//! environment for one node and `idhal hook` run the way OpenVPN runs it.
#![allow(dead_code, unused_imports)]

pub use idhal_test_support::knot::{empty_zone, Knot, TSIG_SECRET};
pub use idhal_test_support::oar::{Oar, OARDIR};
pub use idhal_test_support::pg::pg_available;
pub use idhal_test_support::process::{listening, signal, Reaper};
use idhal_test_support::Logged;
pub use idhal_test_support::{free_port, now, require};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

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

// The deferred worker: a state dir, the worker process, OpenVPN's per-client files.

/// A state dir and config for the worker tests, with the paths they use.
pub struct Setup {
    pub _d: tempfile::TempDir,
    pub cfg: PathBuf,
    pub state: PathBuf,
    pub tmp: PathBuf,
    pub socket: PathBuf,
}

pub fn setup_with(toml: &str) -> Setup {
    let (d, cfg, state) = setup(toml);
    Setup {
        tmp: state.join("openvpn-tmp"),
        socket: state.join("hook/worker.sock"),
        _d: d,
        cfg,
        state,
    }
}

pub fn worker(s: &Setup) -> Logged {
    let mut cmd = Command::new(IDHAL);
    cmd.arg("--config")
        .arg(&s.cfg)
        .arg("--state-dir")
        .arg(&s.state)
        .args(["hook", "worker"]);
    let mut w = Logged::spawn(&mut cmd, s.state.parent().unwrap().join("worker.log"));
    w.wait_log("idhal hook worker: listening on", Duration::from_secs(30));
    w
}

/// OpenVPN's two empty files for one client-connect, in the tmp-dir.
pub fn files(s: &Setup, n: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(&s.tmp).unwrap();
    let c = s.tmp.join(format!("openvpn_cc_{n}.tmp"));
    let r = s.tmp.join(format!("openvpn_ccr_{n}.tmp"));
    std::fs::write(&c, "").unwrap();
    std::fs::write(&r, "").unwrap();
    (c, r)
}

pub fn with_files(env: &[(String, String)], (c, r): &(PathBuf, PathBuf)) -> Vec<(String, String)> {
    let mut env = env.to_vec();
    env.push(("client_connect_config_file".into(), c.display().to_string()));
    env.push((
        "client_connect_deferred_file".into(),
        r.display().to_string(),
    ));
    env
}

pub fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("<{e}>"))
}

pub fn verdict(p: &Path, want: &str, worker: &Logged) {
    let mut last = String::new();
    let limit = Duration::from_secs(30);
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        last = read(p);
        if last == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{}: {last:?}, not {want:?}\n{}", p.display(), worker.log());
}
