//! `idhal hook` and `idhal reconcile` against a real OAR 2.5 (PostgreSQL + Almighty) started by
//! the tests on 127.0.0.1. Tests share one OAR and keep apart by using distinct nodes (the third
//! octet of the VPN address is the test's own).

mod enroll_support;
mod hook_support;

use hook_support::*;
use idhal_test_support::ok;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::{OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Instant;

fn oar() -> Option<&'static Oar> {
    static OAR: OnceLock<Option<Oar>> = OnceLock::new();
    OAR.get_or_init(|| Oar::available().then(Oar::start))
        .as_ref()
}

/// Tests share OAR; the one that proves "OAR unchanged" compares the whole resource table, so
/// it runs alone (write) while the others run side by side (read).
static GATE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    GATE.read().unwrap_or_else(|e| e.into_inner())
}

fn alone() -> RwLockWriteGuard<'static, ()> {
    GATE.write().unwrap_or_else(|e| e.into_inner())
}

/// Generous limits: 50 hooks at once on 2 cores queue behind each other's Perl start-ups.
fn config(oar: &Oar, domain: &str, extra: &str) -> String {
    format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {extra}\n{}",
        oar.config_section()
    )
}

fn prop(r: &serde_json::Value, k: &str) -> String {
    match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("{k} = {other}"),
    }
}

#[test]
fn connect_disconnect_reconnect() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (_d, cfg, state) = setup(&config(oar, "idhal.test", ""));
    let since = now() - 100;
    let env = node_env("client101", "10.134.1.1", since);

    // As OpenVPN runs it, with one certificate field that is not UTF-8 (used for nothing).
    let o = std::process::Command::new(IDHAL)
        .env_clear()
        .envs(env.clone())
        .env("X509_0_O", std::ffi::OsStr::from_bytes(b"Soci\xe9t\xe9"))
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .args(["hook", "client-connect", "/tmp/openvpn_cc_unused.tmp"])
        .output()
        .unwrap();
    ok(o.clone());
    assert!(stderr(&o).contains("(created)"), "{}", stderr(&o));
    let r = oar.host("vnode-1-1.idhal.test");
    assert_eq!(r.len(), 1, "{r:?}");
    let r = &r[0];
    assert_eq!(prop(r, "state"), "Alive");
    assert_eq!(prop(r, "ip"), "10.134.1.1");
    assert_eq!(prop(r, "cluster"), "vnode");
    assert_eq!(prop(r, "idhaltype"), "vnode");
    assert_eq!(prop(r, "idhalcn"), "client101");
    assert_eq!(prop(r, "idhalclientip"), "127.0.0.1");
    assert_eq!(prop(r, "idhalconnectedsince"), since.to_string());
    // [client_name] lookup is off by default: the client's address, and the check says so.
    assert_eq!(prop(r, "idhalclientname"), "127.0.0.1");
    assert_eq!(prop(r, "idhalclientnamecheck"), "off");
    let id = prop(r, "resource_id");

    ok(hook(&cfg, &state, "client-disconnect", &env));
    let r = oar.host("vnode-1-1.idhal.test");
    assert_eq!((r.len(), prop(&r[0], "state")), (1, "Absent".to_string()));

    let env2 = node_env("client101", "10.134.1.1", since + 50);
    ok(hook(&cfg, &state, "client-connect", &env2));
    let r = oar.host("vnode-1-1.idhal.test");
    assert_eq!(r.len(), 1);
    assert_eq!(prop(&r[0], "state"), "Alive");
    assert_eq!(
        prop(&r[0], "resource_id"),
        id,
        "reconnect must keep the resource id"
    );
    assert_eq!(prop(&r[0], "idhalconnectedsince"), (since + 50).to_string());

    // The old session's disconnect arriving late must not take the new session down.
    let o = hook(&cfg, &state, "client-disconnect", &env);
    ok(o.clone());
    assert!(stderr(&o).contains("newer session"), "{}", stderr(&o));
    assert_eq!(prop(&oar.host("vnode-1-1.idhal.test")[0], "state"), "Alive");
}

fn run_parallel(
    cfg: &Path,
    state: &Path,
    envs: Vec<Vec<(String, String)>>,
) -> Vec<std::process::Output> {
    std::thread::scope(|s| {
        let handles: Vec<_> = envs
            .iter()
            .map(|env| s.spawn(move || hook(cfg, state, "client-connect", env)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn fifty_concurrent_connects_make_fifty_resources() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (_d, cfg, state) = setup(&config(oar, "idhal.test", ""));
    let envs = (1..=50)
        .map(|i| node_env(&format!("c2-{i}"), &format!("10.134.2.{i}"), now()))
        .collect();
    let t = Instant::now();
    for o in run_parallel(&cfg, &state, envs) {
        ok(o.clone());
    }
    eprintln!("50 concurrent connects: {:.1} s", t.elapsed().as_secs_f64());
    let r = oar.resources(Some("network_address LIKE 'vnode-2-%'"));
    let mut hosts: Vec<String> = r.iter().map(|r| prop(r, "network_address")).collect();
    assert_eq!(hosts.len(), 50, "{hosts:?}");
    hosts.sort();
    hosts.dedup();
    assert_eq!(hosts.len(), 50, "duplicates");
    assert!(r.iter().all(|r| prop(r, "state") == "Alive"));
}

#[test]
fn ten_concurrent_connects_of_one_node_make_one_resource() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (_d, cfg, state) = setup(&config(oar, "idhal.test", ""));
    let since = now();
    let envs = (0..10)
        .map(|_| node_env("client301", "10.134.3.1", since))
        .collect();
    for o in run_parallel(&cfg, &state, envs) {
        ok(o.clone());
    }
    let r = oar.host("vnode-3-1.idhal.test");
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(prop(&r[0], "state"), "Alive");
}

#[test]
fn hostile_environment_is_refused_and_oar_unchanged() {
    let Some(oar) = oar() else { return };
    let _alone = alone();
    let (_d, cfg, state) = setup(&config(oar, "idhal.test", ""));
    let table = || {
        let mut all: Vec<String> = oar.resources(None).iter().map(|r| r.to_string()).collect();
        all.sort();
        all
    };
    let snapshot = table();
    let payloads = [
        "x' OR '1'='1",
        "'; DELETE FROM resources; --",
        "10.134.4.1'--",
        "$(touch /tmp/idhal-pwned)",
        "`id`",
        "a\nb",
        "10.134.4.1 ",
        "../../etc/passwd",
        "",
        "10.134.4.1\0",
    ];
    let vars = [
        "common_name",
        "X509_0_CN",
        "ifconfig_pool_remote_ip",
        "trusted_ip",
        "time_unix",
    ];
    let before = oar
        .resources(Some("network_address LIKE 'vnode-4-%'"))
        .len();
    assert_eq!(before, 0);
    let mut runs = 0;
    for var in vars {
        for p in payloads {
            if p.contains('\0') {
                continue; // cannot be put into an environment at all
            }
            for event in ["client-connect", "client-disconnect"] {
                let mut env = node_env("client401", "10.134.4.1", now());
                for (k, v) in env.iter_mut() {
                    if k == var {
                        *v = p.to_string();
                    }
                }
                let o = hook(&cfg, &state, event, &env);
                assert_eq!(
                    o.status.code(),
                    Some(1),
                    "{var}={p:?} {event}: {}",
                    stderr(&o)
                );
                let e = stderr(&o);
                assert!(e.contains("REFUSED") && e.contains(var), "{var}={p:?}: {e}");
                // One line per refusal: a hostile value cannot forge log lines.
                assert_eq!(e.lines().count(), 1, "{e}");
                runs += 1;
            }
        }
    }
    // Bytes that are not UTF-8 (certificate fields can hold any): refused, no panic.
    let bad = std::ffi::OsStr::from_bytes(b"client\xff401");
    let o = std::process::Command::new(IDHAL)
        .env_clear()
        .envs(node_env("client401", "10.134.4.1", now()))
        .env("common_name", bad)
        .arg("--config")
        .arg(&cfg)
        .arg("--state-dir")
        .arg(&state)
        .args(["hook", "client-connect"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("REFUSED"), "{}", stderr(&o));
    // Outside the pool is refused too.
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client401", "10.135.4.1", now()),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("pool"), "{}", stderr(&o));
    assert!(runs > 80);
    assert!(oar
        .resources(Some("network_address LIKE 'vnode-4-%'"))
        .is_empty());
    assert!(oar.resources(Some("idhalcn = 'client401'")).is_empty());
    assert_eq!(table(), snapshot, "OAR's resource table changed");
    assert!(!Path::new("/tmp/idhal-pwned").exists());
}

fn status_file(dir: &Path, written: u64, clients: &[(&str, &str, u64)]) -> PathBuf {
    let mut s = format!(
        "TITLE,OpenVPN 2.6.3 x86_64-pc-linux-gnu\nTIME,2026-01-01 00:00:00,{written}\n\
         HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n"
    );
    for (cn, ip, since) in clients {
        s.push_str(&format!(
            "CLIENT_LIST,{cn},127.0.0.1:40000,{ip},,100,200,2026-01-01 00:00:00,{since},UNDEF,1,0,AES-256-GCM\n"
        ));
    }
    s.push_str("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\nGLOBAL_STATS,Max bcast/mcast queue length,0\nEND\n");
    let p = dir.join("status.log");
    std::fs::write(&p, s).unwrap();
    p
}

fn reconcile(cfg: &Path, state: &Path, status: &Path) -> std::process::Output {
    std::process::Command::new(IDHAL)
        .arg("--config")
        .arg(cfg)
        .arg("--state-dir")
        .arg(state)
        .arg("reconcile")
        .arg("--status-file")
        .arg(status)
        .output()
        .unwrap()
}

#[test]
fn reconcile_replays_missed_events() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    // Its own domain: reconcile leaves other tests' nodes (other domain) alone.
    let (d, cfg, state) = setup(&config(oar, "rec.test", ""));
    let t0 = now() - 1000;
    // 502 connected and then its disconnect was seen; 503 is Alive but gone.
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client502", "10.134.5.2", t0),
    ));
    ok(hook(
        &cfg,
        &state,
        "client-disconnect",
        &node_env("client502", "10.134.5.2", t0),
    ));
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client503", "10.134.5.3", t0),
    ));
    // OpenVPN says: 501 (never registered: the server crashed) and 502 (reconnected) are here.
    let status = status_file(
        d.path(),
        now(),
        &[
            ("client501", "10.134.5.1", t0 + 10),
            ("client502", "10.134.5.2", t0 + 20),
        ],
    );
    let o = reconcile(&cfg, &state, &status);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.contains("2 registered again, 1 taken down, 0 failures"),
        "{out}"
    );
    let state_of = |h: &str| {
        let r = oar.host(h);
        assert_eq!(r.len(), 1, "{h}: {r:?}");
        prop(&r[0], "state")
    };
    assert_eq!(state_of("vnode-5-1.rec.test"), "Alive");
    assert_eq!(state_of("vnode-5-2.rec.test"), "Alive");
    assert_eq!(state_of("vnode-5-3.rec.test"), "Absent");

    // Idempotent: a second run changes nothing.
    let o = reconcile(&cfg, &state, &status);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        out.contains("0 registered again, 0 taken down, 0 failures"),
        "{out}"
    );

    // A stale status file is refused and changes nothing.
    let stale = status_file(d.path(), now() - 3600, &[]);
    let o = reconcile(&cfg, &state, &stale);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("is OpenVPN running"), "{}", stderr(&o));
    assert_eq!(state_of("vnode-5-1.rec.test"), "Alive");
}

/// Connect-hook latency with real OAR: `cargo test -p idhal-server-tools --test hook_oar --
/// --ignored --nocapture bench_connect_hook_latency`. Prints figures, asserts none.
#[test]
#[ignore]
fn bench_connect_hook_latency() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (_d, cfg, state) = setup(&config(oar, "bench.test", ""));
    let n = 60;
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
    };
    let run = |label: &str, since: u64, disconnect_first: bool| {
        let mut ms = Vec::new();
        for i in 1..=n {
            let env = node_env(&format!("b-{i}"), &format!("10.134.200.{i}"), since);
            if disconnect_first {
                ok(hook(
                    &cfg,
                    &state,
                    "client-disconnect",
                    &node_env(&format!("b-{i}"), &format!("10.134.200.{i}"), since - 1),
                ));
            }
            let t = Instant::now();
            ok(hook(&cfg, &state, "client-connect", &env));
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "bench_connect_hook_latency: {label}: n={n} p50={:.0} ms p99={:.0} ms max={:.0} ms",
            pct(&mut ms, 0.50),
            pct(&mut ms, 0.99),
            ms.iter().cloned().fold(0.0, f64::max)
        );
    };
    let t = now();
    // The very first connect also creates idhal's property columns (once per OAR database).
    let first = Instant::now();
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("b-0", "10.134.201.1", t),
    ));
    println!(
        "bench_connect_hook_latency: first connect ever (creates the 9 property columns): {:.0} ms",
        first.elapsed().as_secs_f64() * 1000.0
    );
    run("new node (create + properties)", t, false);
    run("reconnect of an Alive node (properties)", t + 1, false);
    run(
        "reconnect after disconnect (properties + Absent→Alive via Almighty)",
        t + 2,
        true,
    );
}

#[test]
fn dropped_property_column_is_recreated() {
    let Some(oar) = oar() else { return };
    // Alone: the other tests' hooks would meet the missing column too.
    let _alone = alone();
    let (_d, cfg, state) = setup(&config(oar, "idhal.test", ""));
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client901", "10.134.9.1", now()),
    ));
    // An admin drops a column; the hook's marker still says the columns exist.
    let o = std::process::Command::new(format!("{OARDIR}/oarproperty"))
        .envs(oar.env())
        .args(["-d", "idhalclientname"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client902", "10.134.9.2", now()),
    );
    ok(o.clone());
    let r = oar.host("vnode-9-2.idhal.test");
    assert_eq!(prop(&r[0], "idhalclientname"), "127.0.0.1");
    assert_eq!(prop(&r[0], "state"), "Alive");
}

#[test]
fn an_enrolled_nodes_type_comes_from_its_token() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let p = enroll_support::Project::new(&config(oar, "idhal.test", ""));
    let server = p.serve();
    let token = p.token(&["--type", "gpu"]);
    let r = enroll_support::enroll(
        &server.addr,
        &p.enroll_key,
        &token,
        &enroll_support::NodeKey::random(),
    )
    .unwrap();
    let env = node_env(&r.node, &r.address.to_string(), now());
    ok(hook(&p.config, &p.state, "client-connect", &env));
    let host = format!(
        "vnode-{}-{}.idhal.test",
        r.address.octets()[2],
        r.address.octets()[3]
    );
    let res = oar.host(&host);
    assert_eq!(res.len(), 1, "{res:?}");
    assert_eq!(prop(&res[0], "cluster"), "gpu");
    assert_eq!(prop(&res[0], "idhaltype"), "gpu");
    assert_eq!(prop(&res[0], "idhalcn"), r.node);
}

/// A status file (version 2) with the given `CLIENT_LIST` rows: (CN, real address, virtual
/// address, connected since). An empty virtual address is what OpenVPN writes while the
/// client is still connecting.
fn status_rows(dir: &Path, name: &str, written: u64, rows: &[(&str, &str, &str, u64)]) -> PathBuf {
    let mut s = format!(
        "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\nTIME,2026-01-01 00:00:00,{written}\n\
         HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n"
    );
    for (i, (cn, real, vaddr, since)) in rows.iter().enumerate() {
        s.push_str(&format!(
            "CLIENT_LIST,{cn},{real},{vaddr},,100,200,2026-01-01 00:00:00,{since},UNDEF,{i},{i},AES-256-GCM\n"
        ));
    }
    s.push_str("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\nGLOBAL_STATS,Max bcast/mcast queue length,0\nEND\n");
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn reconcile_never_takes_down_a_client_that_is_still_connecting() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (d, cfg, state) = setup(&config(oar, "connecting.test", ""));
    let t0 = now() - 1000;
    for (cn, ip) in [("client1101", "10.134.11.1"), ("client1102", "10.134.11.2")] {
        ok(hook(&cfg, &state, "client-connect", &node_env(cn, ip, t0)));
    }
    // OpenVPN lists 1101 before its client-connect gave it an address (a reconnect in
    // progress), and 1102 on a line that does not validate (address outside the pool).
    let status = status_rows(
        d.path(),
        "status.log",
        now(),
        &[
            ("client1101", "127.0.0.1:40001", "", t0 + 10),
            ("client1102", "127.0.0.1:40002", "10.135.11.2", t0 + 10),
        ],
    );
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(
        text.contains("\"client1101\" is still connecting (status line 4, no VPN address yet)"),
        "{text}"
    );
    assert!(
        text.contains("vnode-11-2.connecting.test: its node id is listed as connected, left alone"),
        "{text}"
    );
    // The bad line is a failure (exit 1), the connecting one is not.
    assert!(
        text.contains(
            "0 connected, 0 registered again, 0 taken down, 1 failures, 1 still connecting"
        ),
        "{text}"
    );
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert_eq!(state_of(oar, "vnode-11-1.connecting.test"), "Alive");
    assert_eq!(state_of(oar, "vnode-11-2.connecting.test"), "Alive");

    // Once neither is listed, both go.
    let status = status_rows(d.path(), "status.log", now(), &[]);
    let o = reconcile(&cfg, &state, &status);
    assert!(out(&o).contains("2 taken down, 0 failures"), "{}", out(&o));
    assert_eq!(state_of(oar, "vnode-11-1.connecting.test"), "Absent");
}

#[test]
fn each_servers_reconcile_leaves_the_other_servers_nodes_alone() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (d, cfg1, state1) = setup(&config(oar, "two.test", "[openvpn]\nname = \"vpn1\""));
    let cfg2 = d.path().join("vpn2.toml");
    std::fs::write(&cfg2, config(oar, "two.test", "[openvpn]\nname = \"vpn2\"")).unwrap();
    let state2 = d.path().join("state2");
    let t0 = now() - 1000;
    ok(hook(
        &cfg1,
        &state1,
        "client-connect",
        &node_env("client1201", "10.134.12.1", t0),
    ));
    ok(hook(
        &cfg2,
        &state2,
        "client-connect",
        &node_env("client1202", "10.134.12.2", t0),
    ));
    assert_eq!(
        prop(&oar.host("vnode-12-1.two.test")[0], "idhalserver"),
        "vpn1"
    );
    assert_eq!(
        prop(&oar.host("vnode-12-2.two.test")[0], "idhalserver"),
        "vpn2"
    );
    let s1 = status_rows(
        d.path(),
        "s1.log",
        now(),
        &[("client1201", "127.0.0.1:40000", "10.134.12.1", t0)],
    );
    let s2 = status_rows(
        d.path(),
        "s2.log",
        now(),
        &[("client1202", "127.0.0.1:40000", "10.134.12.2", t0)],
    );
    for (cfg, state, status, name) in [(&cfg1, &state1, &s1, "vpn1"), (&cfg2, &state2, &s2, "vpn2")]
    {
        let o = reconcile(cfg, state, status);
        let text = out(&o);
        assert!(o.status.success(), "{text}");
        assert!(
            text.contains(&format!("idhal reconcile ({name}): 1 connected, 0 registered again, 0 taken down, 0 failures, 1 left to other servers")),
            "{text}"
        );
    }
    assert_eq!(state_of(oar, "vnode-12-1.two.test"), "Alive");
    assert_eq!(state_of(oar, "vnode-12-2.two.test"), "Alive");
    // vpn1's node leaves vpn1: vpn1's reconcile takes it down, and only it.
    let s1 = status_rows(d.path(), "s1.log", now(), &[]);
    let o = reconcile(&cfg1, &state1, &s1);
    assert!(out(&o).contains("1 taken down, 0 failures"), "{}", out(&o));
    assert_eq!(state_of(oar, "vnode-12-1.two.test"), "Absent");
    assert_eq!(state_of(oar, "vnode-12-2.two.test"), "Alive");
}

#[test]
fn a_reconnect_within_one_second_stays_alive() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (d, cfg, state) = setup(&config(oar, "second.test", ""));
    let t = now();
    let host = "vnode-13-1.second.test";
    let session = |port: &str| {
        let mut env = node_env("client1301", "10.134.13.1", t);
        for (k, v) in env.iter_mut() {
            if k == "trusted_port" {
                *v = port.into();
            }
        }
        env
    };
    // Session A, then session B in the same second (new TCP connection: another port),
    // then A's disconnect, late.
    ok(hook(&cfg, &state, "client-connect", &session("40000")));
    ok(hook(&cfg, &state, "client-connect", &session("40001")));
    assert_eq!(prop(&oar.host(host)[0], "idhalclientport"), "40001");
    let o = hook(&cfg, &state, "client-disconnect", &session("40000"));
    ok(o.clone());
    assert!(stderr(&o).contains("newer session"), "{}", stderr(&o));
    assert_eq!(state_of(oar, host), "Alive");

    // A status written in the second the node registered, before it was listed: too new
    // to judge, left up.
    let status = status_rows(d.path(), "status.log", t, &[]);
    let o = reconcile(&cfg, &state, &status);
    assert!(out(&o).contains("0 taken down, 0 failures"), "{}", out(&o));
    assert_eq!(state_of(oar, host), "Alive");

    // B's own disconnect takes it down.
    let o = hook(&cfg, &state, "client-disconnect", &session("40001"));
    ok(o.clone());
    assert_eq!(state_of(oar, host), "Absent");
}

#[test]
fn network_broadcast_and_server_addresses_are_refused() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (_d, cfg, state) = setup(&config(oar, "reserved.test", ""));
    for (ip, what) in [
        ("10.134.0.0", "network address"),
        ("10.134.255.255", "broadcast address"),
        ("10.134.0.1", "VPN server's own address"),
    ] {
        for event in ["client-connect", "client-disconnect"] {
            let o = hook(&cfg, &state, event, &node_env("client1401", ip, now()));
            assert_eq!(o.status.code(), Some(1), "{ip}: {}", stderr(&o));
            let e = stderr(&o);
            assert!(e.contains("REFUSED") && e.contains(what), "{ip}: {e}");
        }
    }
    assert!(oar.resources(Some("idhalcn = 'client1401'")).is_empty());
}

#[test]
fn hostile_status_files_change_nothing() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let (d, cfg, state) = setup(&config(
        oar,
        "hostile-status.test",
        "[reconcile]\nmax_status_bytes = 100000",
    ));
    let t0 = now() - 1000;
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client1501", "10.134.15.1", t0),
    ));
    let host = "vnode-15-1.hostile-status.test";
    let write = |name: &str, bytes: &[u8]| {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let valid = status_rows(d.path(), "valid.log", now(), &[]);
    let header = std::fs::read_to_string(&valid).unwrap();
    let huge = format!("{header}{}", "#".repeat(200_000));
    for (name, bytes, why) in [
        (
            "huge.log",
            huge.as_bytes(),
            "larger than [reconcile] max_status_bytes",
        ),
        ("empty.log", &b""[..], "no TIME line"),
        (
            "binary.log",
            &[0xff, 0xfe, 0, 1, 2][..],
            "reading OpenVPN status file",
        ),
        (
            "order.log",
            &b"TIME,x,1\nCLIENT_LIST,client1501,127.0.0.1:1,10.134.15.1\n"[..],
            "CLIENT_LIST before its HEADER",
        ),
    ] {
        let o = reconcile(&cfg, &state, &write(name, bytes));
        assert_eq!(o.status.code(), Some(1), "{name}: {}", out(&o));
        assert!(out(&o).contains(why), "{name}: {}", out(&o));
        assert_eq!(state_of(oar, host), "Alive", "{name}");
    }
    // Hostile common names and addresses next to the node's own line: each skipped as
    // invalid, nothing of theirs reaches OAR, the node stays up.
    let mut rows = vec![("client1501", "127.0.0.1:40000", "10.134.15.1", t0)];
    let bad = [
        ("x' OR '1'='1", "10.134.15.2"),
        ("client1502", "10.134.15.2'; --"),
        ("$(touch /tmp/idhal-pwned)", "10.134.15.3"),
        ("client1504", "10.134.255.255"),
    ];
    for (cn, ip) in bad {
        rows.push((cn, "127.0.0.1:40001", ip, t0));
    }
    let o = reconcile(
        &cfg,
        &state,
        &status_rows(d.path(), "bad.log", now(), &rows),
    );
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("1 connected, 0 registered again, 0 taken down, 4 failures"),
        "{text}"
    );
    assert_eq!(state_of(oar, host), "Alive");
    assert!(oar
        .resources(Some("network_address LIKE 'vnode-15-%' AND network_address != 'vnode-15-1.hostile-status.test'"))
        .is_empty());
    assert!(!Path::new("/tmp/idhal-pwned").exists());
}

#[test]
fn a_reconnect_sets_state_and_properties_in_one_oar_call() {
    let Some(oar) = oar() else { return };
    let _shared = shared();
    let d = tempfile::tempdir().unwrap();
    let (section, log) = oar.logged_config_section(d.path());
    let toml = config(oar, "merged.test", "").replace(&oar.config_section(), &section);
    let (_d, cfg, state) = setup(&toml);
    let t0 = now() - 100;
    let host = "vnode-16-1.merged.test";
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client1601", "10.134.16.1", t0),
    ));
    ok(hook(
        &cfg,
        &state,
        "client-disconnect",
        &node_env("client1601", "10.134.16.1", t0),
    ));
    assert_eq!(state_of(oar, host), "Absent");
    std::fs::write(&log, "").unwrap();
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client1601", "10.134.16.1", t0 + 10),
    ));
    // One oarnodesetting: Absent → Alive and the new session's properties together (one
    // Perl start-up, not two), still confirmed by reading the node back.
    let calls = idhal_test_support::oar::logged_calls(&log);
    let set: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("oarnodesetting"))
        .collect();
    assert_eq!(set.len(), 1, "{calls:#?}");
    assert!(
        set[0].starts_with(&format!("oarnodesetting -n -s Alive -h {host} -p ")),
        "{}",
        set[0]
    );
    assert!(
        set[0].contains(&format!("-p idhalconnectedsince={}", t0 + 10)),
        "{}",
        set[0]
    );
    assert_eq!(
        calls.last().unwrap(),
        &format!("oarnodes -J --sql network_address='{host}'"),
        "{calls:#?}"
    );
    let r = oar.host(host);
    assert_eq!(prop(&r[0], "state"), "Alive");
    assert_eq!(prop(&r[0], "idhalconnectedsince"), (t0 + 10).to_string());
}
