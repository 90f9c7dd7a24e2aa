//! The hook path: nodes that connect without an OpenVPN client process. Each runs
//! `idhal hook client-connect` exactly as OpenVPN 2.6 runs it (research notes §1): the
//! environment OpenVPN sets (`ifconfig_pool_remote_ip` from the ccd file when one exists, as
//! OpenVPN's ccd handler runs before the script), a fresh `client_connect_config_file` and
//! `client_connect_deferred_file`, the config file as last argument. Exit ≠ 0 refuses; exit 0
//! with `2` in the deferred file defers until a worker writes `1` or `0` (waited for off the
//! loop, up to the client's 60 s hand-window); anything else accepts. So the same code measures
//! today's synchronous hooks and deferred ones. A loop runs one hook at a time, like OpenVPN's;
//! a refused node tries again 2 s later (the client's connect-retry).

use crate::args::Args;
use crate::clients::{Shared, SimState};
use crate::enroll::Node;
use crate::setup::Rig;
use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A client gives up waiting for its PUSH_REPLY after `hand-window` (60 s by default).
const HAND_WINDOW: Duration = Duration::from_secs(60);
/// The client's connect-retry before it tries again after a refusal.
const RETRY: Duration = Duration::from_secs(2);

enum Verdict {
    Accepted(Option<String>),
    /// The config file, the deferred (result) file, the ccd address.
    Deferred(PathBuf, PathBuf, Option<String>),
}

/// Connects nodes `first..` through the hook path, node i not before `at(i)`, until each was
/// accepted or the deadline passed.
pub fn connect_all(
    a: &Args,
    rig: &Rig,
    nodes: &[Node],
    shared: &Shared,
    first: usize,
    at: impl Fn(usize) -> Instant + Sync,
    failures: &Mutex<Vec<String>>,
) {
    let queue: Mutex<VecDeque<(usize, Instant, u32)>> =
        Mutex::new((first..nodes.len()).map(|i| (i, at(i), 0)).collect());
    // A node starts when it boots (its scheduled time), not when the loop gets to it: the wait
    // in the queue is part of its connect-to-Alive, as a real client's wait in OpenVPN's is.
    {
        let (now, clock) = (Instant::now(), shared.now());
        let mut g = shared.nodes.lock().unwrap();
        for i in first..nodes.len() {
            g[i].start = Some(clock + at(i).saturating_duration_since(now).as_secs_f64());
        }
    }
    let give_up = Instant::now() + Duration::from_secs(a.deadline_secs());
    let pending = std::sync::atomic::AtomicUsize::new(nodes.len() - first);
    // OpenVPN's tmp-dir as the rendered config names it ([openvpn] tmp_dir's default): the
    // hook writes only files there.
    let tmp = rig.state.join("openvpn-tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let refuse = |i: usize, attempt: u32, why: String| {
        let mut f = failures.lock().unwrap();
        if f.len() < 50 {
            f.push(format!("{}: {why}", nodes[i].id));
        }
        let mut g = shared.nodes.lock().unwrap();
        g[i].restarts += 1;
        g[i].sim = SimState::Connecting;
        drop(g);
        queue
            .lock()
            .unwrap()
            .push_back((i, Instant::now() + RETRY, attempt + 1));
    };
    let accept = |i: usize, given: Option<String>| {
        let now = shared.now();
        let mut g = shared.nodes.lock().unwrap();
        let t = &mut g[i];
        t.tunnel.get_or_insert(now);
        t.given = given;
        t.sim = SimState::Connected;
        t.connected = t.down_start.is_none();
        pending.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    };
    std::thread::scope(|s| {
        for _ in 0..a.hook_concurrency {
            s.spawn(|| loop {
                if pending.load(std::sync::atomic::Ordering::Relaxed) == 0
                    || Instant::now() > give_up
                {
                    break;
                }
                let next = {
                    let mut q = queue.lock().unwrap();
                    // The earliest due entry (retries go to the back with a later time).
                    let due = q
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, e)| e.1)
                        .map(|(k, _)| k);
                    due.and_then(|k| q.remove(k))
                };
                let Some((i, when, attempt)) = next else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                if let Some(wait) = when.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let (port, since) = (
                    10_000 + ((i as u32 * 7 + attempt) % 50_000) as u16,
                    idhal_test_support::now(),
                );
                {
                    let now = shared.now();
                    let mut g = shared.nodes.lock().unwrap();
                    let t = &mut g[i];
                    t.start.get_or_insert(now);
                    t.sim = SimState::Connecting;
                    t.sim_port = port;
                    t.sim_since = since;
                }
                match connect_once(rig, &nodes[i], &tmp, (i, attempt), (port, since)) {
                    Ok(Verdict::Accepted(given)) => accept(i, given),
                    Ok(Verdict::Deferred(cc, ccr, ccd)) => {
                        let (accept, refuse) = (&accept, &refuse);
                        s.spawn(move || match wait_verdict(&ccr) {
                            Ok(()) => accept(i, pushed(&cc).or(ccd)),
                            Err(why) => refuse(i, attempt, why),
                        });
                    }
                    Err(why) => refuse(i, attempt, why),
                }
            });
        }
    });
}

/// Waits for a worker's `1` (Ok) or `0` (refused) in the deferred file, as OpenVPN does.
fn wait_verdict(ccr: &Path) -> Result<(), String> {
    let until = Instant::now() + HAND_WINDOW;
    loop {
        match std::fs::read(ccr).ok().and_then(|b| b.first().copied()) {
            Some(b'1') => return Ok(()),
            Some(b'0') => return Err("the deferred verdict was 0 (refused)".into()),
            Some(b'2') | None => {}
            Some(other) => return Err(format!("deferred file holds {:?}", other as char)),
        }
        if Instant::now() > until {
            return Err(format!(
                "no deferred verdict within the client's hand-window ({HAND_WINDOW:?})"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `ifconfig-push` address of an OpenVPN client config file (ccd or the hook's).
fn pushed(file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("ifconfig-push "))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_owned)
}

/// What OpenVPN puts in every script's environment for this server (the rendered config's
/// `setenv` lines included) and for this client.
fn base_env(
    rig: &Rig,
    node: &Node,
    (port, since): (u16, u64),
    event: &str,
) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("IDHAL_CONFIG".into(), rig.config.display().to_string()),
        ("IDHAL_STATE_DIR".into(), rig.state.display().to_string()),
        ("script_type".into(), event.into()),
        ("dev".into(), "tun0".into()),
        ("common_name".into(), node.id.clone()),
        ("X509_0_CN".into(), node.id.clone()),
        ("trusted_ip".into(), "127.0.0.1".into()),
        ("trusted_port".into(), port.to_string()),
        ("untrusted_ip".into(), "127.0.0.1".into()),
        ("untrusted_port".into(), port.to_string()),
        ("time_unix".into(), since.to_string()),
        ("ifconfig_local".into(), "10.134.0.1".into()),
        ("ifconfig_netmask".into(), "255.255.0.0".into()),
        ("IV_VER".into(), "2.6.14".into()),
        ("IV_PLAT".into(), "linux".into()),
    ];
    env.sort();
    env
}

fn connect_once(
    rig: &Rig,
    node: &Node,
    tmp: &Path,
    (i, attempt): (usize, u32),
    session: (u16, u64),
) -> Result<Verdict, String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // Named as OpenVPN names them (a hex random part): the hook refuses any other name.
    let cc = tmp.join(format!("openvpn_cc_{i:08x}{attempt:04x}.tmp"));
    let ccr = tmp.join(format!("openvpn_ccr_{i:08x}{attempt:04x}.tmp"));
    for f in [&cc, &ccr] {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(f)
            .map_err(|e| format!("{}: {e}", f.display()))?;
    }
    let ccd = pushed(&rig.state.join("projects/default/ccd").join(&node.id));
    let mut env = base_env(rig, node, session, "client-connect");
    if let Some(ip) = &ccd {
        env.push(("ifconfig_pool_remote_ip".into(), ip.clone()));
    }
    env.push((
        "client_connect_config_file".into(),
        cc.display().to_string(),
    ));
    env.push((
        "client_connect_deferred_file".into(),
        ccr.display().to_string(),
    ));
    let out = run_hook(rig, &env, "client-connect", Some(&cc))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "client-connect exit {:?}: {}",
            out.status.code(),
            err.lines().last().unwrap_or("")
        ));
    }
    match std::fs::read(&ccr).ok().and_then(|b| b.first().copied()) {
        Some(b'2') => Ok(Verdict::Deferred(cc, ccr, ccd)),
        _ => Ok(Verdict::Accepted(pushed(&cc).or(ccd))),
    }
}

/// Runs the hook with exactly `env`, its output appended to sim-hooks.log (OpenVPN's log
/// would hold it).
fn run_hook(
    rig: &Rig,
    env: &[(String, String)],
    event: &str,
    arg: Option<&Path>,
) -> Result<std::process::Output, String> {
    let mut cmd = Command::new(&rig.idhal);
    cmd.env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["hook", event])
        .stdin(Stdio::null());
    if let Some(a) = arg {
        cmd.arg(a);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("running {}: {e}", rig.idhal.display()))?;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(rig.dir.join("sim-hooks.log"))
    {
        let _ = f.write_all(&out.stdout);
        let _ = f.write_all(&out.stderr);
    }
    Ok(out)
}

/// Every hook-path node that connected runs `idhal hook client-disconnect`, in order,
/// --hook-concurrency at a time; one still connecting just leaves (OpenVPN runs no
/// disconnect script for a client whose connect never completed).
pub fn disconnect_all(
    a: &Args,
    rig: &Rig,
    nodes: &[Node],
    shared: &Shared,
    first: usize,
    failures: &Mutex<Vec<String>>,
) {
    let next = std::sync::atomic::AtomicUsize::new(first);
    std::thread::scope(|s| {
        for _ in 0..a.hook_concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= nodes.len() {
                    break;
                }
                let (was, port, since, given) = {
                    let mut g = shared.nodes.lock().unwrap();
                    let t = &mut g[i];
                    let was = t.sim;
                    t.sim = SimState::Gone;
                    (was, t.sim_port, t.sim_since, t.given.clone())
                };
                if was != SimState::Connected {
                    continue;
                }
                let mut env = base_env(rig, &nodes[i], (port, since), "client-disconnect");
                let duration = idhal_test_support::now().saturating_sub(since);
                env.extend([
                    (
                        "ifconfig_pool_remote_ip".to_owned(),
                        given.unwrap_or_default(),
                    ),
                    ("time_duration".into(), duration.to_string()),
                    ("bytes_received".into(), "4096".into()),
                    ("bytes_sent".into(), "4096".into()),
                ]);
                match run_hook(rig, &env, "client-disconnect", None) {
                    Ok(o) if o.status.success() => {}
                    Ok(o) => {
                        let err = String::from_utf8_lossy(&o.stderr);
                        failures.lock().unwrap().push(format!(
                            "{}: client-disconnect exit {:?}: {}",
                            nodes[i].id,
                            o.status.code(),
                            err.lines().last().unwrap_or("")
                        ));
                    }
                    Err(e) => failures.lock().unwrap().push(e),
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pushed_address_is_read_from_a_ccd_or_hook_config_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("client7");
        for (text, want) in [
            ("ifconfig-push 10.134.0.8 255.255.0.0\n", Some("10.134.0.8")),
            (
                "push \"route 10.0.0.0 255.0.0.0\"\nifconfig-push 10.134.1.2 255.255.0.0\n",
                Some("10.134.1.2"),
            ),
            ("", None),
            ("ifconfig-push\n", None),
            ("# ifconfig-push 10.134.0.8 255.255.0.0\n", None),
        ] {
            std::fs::write(&f, text).unwrap();
            assert_eq!(pushed(&f).as_deref(), want, "{text:?}");
        }
        assert_eq!(pushed(&d.path().join("missing")), None);
    }

    #[test]
    fn a_deferred_verdict_is_its_first_byte() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("openvpn_ccr_1.tmp");
        std::fs::write(&f, "1\n").unwrap();
        assert_eq!(wait_verdict(&f), Ok(()));
        std::fs::write(&f, "0").unwrap();
        assert_eq!(
            wait_verdict(&f).unwrap_err(),
            "the deferred verdict was 0 (refused)"
        );
        std::fs::write(&f, "x").unwrap();
        assert_eq!(wait_verdict(&f).unwrap_err(), "deferred file holds 'x'");
    }
}
