//! Where a connect storm's time goes in OAR 2.5 (real PostgreSQL and Almighty on 127.0.0.1,
//! each test its own instance): today's hook path under load, and OAR's own calls for one host
//! and for many. Prints figures, asserts only that the work was done. Run with
//! `cargo test -p idhal-server-tools --release --test oar_bench -- --ignored --nocapture`.
//! Library-level figures (the batch API beside `node_up`) live in the `idhal` binary's own
//! unit tests: the crate has no library target an integration test could call.

mod hook_support;

use hook_support::*;
use idhal_test_support::oar::logged_calls;
use idhal_test_support::ok;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn config(section: &str) -> String {
    format!(
        "[names]\ndomain = \"bench.test\"\npool = \"10.134.0.0/16\"\n\
         [limits]\nhook_budget_ms = 300000\ncommand_timeout_ms = 120000\nstate_confirm_ms = 120000\nlock_wait_ms = 300000\n\
         {section}"
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// (p50, p99, max) in ms.
fn pcts(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    (at(0.50), at(0.99), v[v.len() - 1])
}

fn host(octet3: u32, i: u32) -> String {
    format!("vnode-{octet3}-{i}.bench.test")
}

fn in_sql(hosts: &[String]) -> String {
    let list: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
    format!("network_address IN ({})", list.join(","))
}

/// One OAR tool run directly, as idhal runs it; must succeed. Its wall time.
fn tool(oar: &Oar, name: &str, args: &[String]) -> Duration {
    let t = Instant::now();
    ok(Command::new(format!("{OARDIR}/{name}"))
        .envs(oar.env())
        .args(args)
        .output()
        .unwrap());
    t.elapsed()
}

fn props(h: &str, i: u32, since: u64) -> Vec<String> {
    let label = h.split('.').next().unwrap();
    [
        format!("ip=10.134.99.{i}"),
        "cluster=vnode".into(),
        "idhaltype=vnode".into(),
        format!("idhalcn=bench-{label}"),
        "idhalclientip=127.0.0.1".into(),
        "idhalclientport=40000".into(),
        format!("idhalconnectedsince={since}"),
        "idhalclientname=127.0.0.1".into(),
        "idhalclientnamecheck=off".into(),
        "idhalserver=bench".into(),
    ]
    .into_iter()
    .flat_map(|p| ["-p".to_string(), p])
    .collect()
}

fn states(oar: &Oar, hosts: &[String]) -> Vec<String> {
    oar.resources(Some(&in_sql(hosts)))
        .iter()
        .map(|r| r["state"].as_str().unwrap().to_owned())
        .collect()
}

/// idhal's config and state dir, and the log of OAR calls its wrappers write.
struct Rig {
    cfg: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

/// `idhal hook client-connect` for `n` new nodes (third octet `octet3`), `workers` at a time:
/// today's `node_up` as the hook runs it (plus the hook's own start and state lookup).
fn hook_storm(rig: &Rig, octet3: u32, n: u32, workers: usize, since: u64, event: &str) -> String {
    let Rig { cfg, state, log } = rig;
    let before = logged_calls(log).len();
    let next = AtomicUsize::new(1);
    let lat = Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as u32;
                if i > n {
                    break;
                }
                let env = node_env(
                    &format!("b{octet3}-{i}"),
                    &format!("10.134.{octet3}.{i}"),
                    since,
                );
                let t = Instant::now();
                ok(hook(cfg, state, event, &env));
                lat.lock().unwrap().push(ms(t.elapsed()));
            });
        }
    });
    let wall = t.elapsed().as_secs_f64();
    let calls = logged_calls(log).len() - before;
    let (p50, p99, max) = pcts(&lat.into_inner().unwrap());
    format!(
        "N={n:>3} workers={workers:>2}: wall {wall:6.1} s ({:5.1} nodes/s), per node p50 {p50:5.0} ms p99 {p99:5.0} ms max {max:5.0} ms, OAR processes {calls} ({:.1}/node)",
        f64::from(n) / wall,
        calls as f64 / f64::from(n)
    )
}

#[test]
#[ignore = "benchmark: prints figures"]
fn oar_under_a_connect_storm() {
    if !Oar::available() {
        return;
    }
    let oar = Oar::start();
    let d = tempfile::tempdir().unwrap();
    let (section, log) = oar.logged_config_section(d.path());
    let cfg = d.path().join("server.toml");
    std::fs::write(&cfg, config(&section)).unwrap();
    let state: PathBuf = d.path().join("state");
    let rig = Rig {
        cfg: cfg.clone(),
        state: state.clone(),
        log,
    };
    let since = now();
    println!(
        "oar_bench: load average at start: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
    // The first connect creates the property columns: not part of any figure.
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("b9-1", "10.134.9.1", since),
    ));

    // 1. Today's per-node path, new nodes.
    let mut octet3 = 10;
    for n in [1u32, 50, 200] {
        for workers in [1usize, 8, 32] {
            let line = hook_storm(&rig, octet3, n, workers, since, "client-connect");
            println!("oar_bench: hook, new nodes:          {line}");
            let hosts: Vec<String> = (1..=n).map(|i| host(octet3, i)).collect();
            assert!(states(&oar, &hosts).iter().all(|s| s == "Alive"));
            octet3 += 1;
        }
    }
    // The same 200 nodes (the last sequential run's, octet 16): disconnected, then back.
    let o200 = 16;
    // Each round disconnects the session the previous one registered (since + k).
    for (k, workers) in [1usize, 8, 32].into_iter().enumerate() {
        let s = since + k as u64;
        let down = hook_storm(&rig, o200, 200, workers, s, "client-disconnect");
        println!("oar_bench: hook, disconnect:         {down}");
        let up = hook_storm(&rig, o200, 200, workers, s + 1, "client-connect");
        println!("oar_bench: hook, reconnect (Absent): {up}");
    }

    println!(
        "oar_bench: load average at end: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
}

/// OAR's own calls, timed one by one: its own OAR, 200 hosts made Alive with one
/// `oarnodesetting -a` carrying 200 `-h`.
#[test]
#[ignore = "benchmark: prints figures"]
fn oar_calls_one_host_and_many() {
    if !Oar::available() {
        return;
    }
    let oar = Oar::start();
    let since = now();
    println!(
        "oar_calls: load average at start: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
    let o200 = 16;
    let mut a: Vec<String> = Vec::new();
    for p in [
        "ip",
        "cluster",
        "idhaltype",
        "idhalcn",
        "idhalclientip",
        "idhalclientport",
        "idhalconnectedsince",
        "idhalclientname",
        "idhalclientnamecheck",
        "idhalserver",
    ] {
        a.extend(["-a".to_string(), p.to_string()]);
    }
    a.push("-c".into());
    tool(&oar, "oarproperty", &a);
    let all: Vec<String> = (1..=200).map(|i| host(o200, i)).collect();
    let mut a: Vec<String> = vec!["-a".into()];
    for h in &all {
        a.extend(["-h".to_string(), h.clone()]);
    }
    a.extend(["-p".to_string(), "cluster=vnode".to_string()]);
    println!(
        "oar_calls: oarnodesetting -a with 200 -h: {:.0} ms",
        ms(tool(&oar, "oarnodesetting", &a))
    );
    assert!(states(&oar, &all).iter().all(|s| s == "Alive"));

    // 2. One oarnodesetting per call: -p alone, -s alone, -s and -p merged (30 Alive nodes).
    let hosts30: Vec<String> = (1..=30).map(|i| host(o200, i)).collect();
    let (mut p_only, mut s_only, mut merged) = (Vec::new(), Vec::new(), Vec::new());
    for (i, h) in hosts30.iter().enumerate() {
        let i = i as u32 + 1;
        let mut a = vec!["-h".to_string(), h.clone()];
        a.extend(props(h, i, since + 10));
        p_only.push(ms(tool(&oar, "oarnodesetting", &a)));
        let a: Vec<String> = ["-n", "-s", "Absent", "-h", h]
            .iter()
            .map(|s| s.to_string())
            .collect();
        s_only.push(ms(tool(&oar, "oarnodesetting", &a)));
        let mut a: Vec<String> = ["-n", "-s", "Alive", "-h", h]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(props(h, i, since + 11));
        merged.push(ms(tool(&oar, "oarnodesetting", &a)));
    }
    for (what, v) in [
        ("-h H -p ×9 (properties only)", &p_only),
        ("-n -s Absent -h H (state only)", &s_only),
        ("-n -s Alive -h H -p ×9 (merged)", &merged),
    ] {
        let (p50, p99, max) = pcts(v);
        println!("oar_calls: oarnodesetting {what}: n=30 p50 {p50:.0} ms p99 {p99:.0} ms max {max:.0} ms");
    }
    // Each host got Absent then Alive within a second or two: print what OAR makes of it.
    let t = Instant::now();
    let settled = || states(&oar, &hosts30).iter().all(|s| s == "Alive");
    while !settled() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(200));
    }
    if !settled() {
        let stuck: Vec<String> = oar
            .resources(Some(&in_sql(&hosts30)))
            .iter()
            .filter(|r| r["state"] != "Alive")
            .map(|r| format!("{}/{}", r["state"], r["next_state"]))
            .collect();
        println!(
            "oar_calls: after 60 s, {} of 30 hosts not Alive (state/next_state): {}; pinging Almighty again",
            stuck.len(),
            stuck.join(" ")
        );
        let mut a: Vec<String> = vec!["-n".into(), "-s".into(), "Alive".into()];
        for h in &hosts30 {
            a.extend(["-h".to_string(), h.clone()]);
        }
        tool(&oar, "oarnodesetting", &a);
    }
    wait_for("30 merged nodes Alive", Duration::from_secs(120), settled);
    println!(
        "oar_calls: 30 × (Absent, then merged Alive) settled {:.1} s after the last call",
        t.elapsed().as_secs_f64()
    );
    let r = oar.host(&hosts30[0]);
    assert_eq!(
        r[0]["idhalconnectedsince"].as_str().unwrap(),
        (since + 11).to_string(),
        "merged call stored its properties"
    );

    // 3. oarnodes read-back: one --sql IN (…) vs one call per host.
    for n in [1u32, 50, 200] {
        let hosts: Vec<String> = (1..=n).map(|i| host(o200, i)).collect();
        let mut one = Vec::new();
        for _ in 0..5 {
            one.push(ms(tool(
                &oar,
                "oarnodes",
                &["-J".into(), "--sql".into(), in_sql(&hosts)],
            )));
        }
        let t = Instant::now();
        for h in &hosts {
            tool(
                &oar,
                "oarnodes",
                &[
                    "-J".into(),
                    "--sql".into(),
                    format!("network_address='{h}'"),
                ],
            );
        }
        println!(
            "oar_calls: oarnodes read-back of {n:>3} hosts: one --sql IN call p50 {:.0} ms; one call per host {:.0} ms in all",
            pcts(&one).0,
            ms(t.elapsed())
        );
    }

    // 4. NodeChangeState: N pending changes queued with Almighty stopped (oarnodesetting only
    // writes next_state), then one NodeChangeState run, timed, as Almighty would start it.
    oar.stop_almighty();
    for n in [1u32, 50, 200] {
        let hosts: Vec<String> = (1..=n).map(|i| host(o200, i)).collect();
        for (to, from) in [("Absent", "Alive"), ("Alive", "Absent")] {
            assert!(states(&oar, &hosts).iter().all(|s| s == from));
            let mut a: Vec<String> = vec!["-n".into(), "-s".into(), to.into()];
            for h in &hosts {
                a.extend(["-h".to_string(), h.clone()]);
            }
            let queued = tool(&oar, "oarnodesetting", &a);
            let t = Instant::now();
            let o = Command::new("/usr/bin/perl")
                .arg(format!("{OARDIR}/NodeChangeState"))
                .envs(oar.env())
                .env("OARDO_USER", "oar")
                .current_dir(&oar.dir)
                .output()
                .unwrap();
            let took = t.elapsed();
            assert!(
                states(&oar, &hosts).iter().all(|s| s == to),
                "NodeChangeState ({:?}) did not apply {n} changes: {}",
                o.status.code(),
                String::from_utf8_lossy(&o.stderr)
            );
            println!(
                "oar_calls: {n:>3} pending {from}→{to}: queued by one oarnodesetting with {n} -h in {:.0} ms; NodeChangeState applied them in {:.0} ms",
                ms(queued),
                ms(took)
            );
        }
    }
    oar.start_almighty();
    println!(
        "oar_calls: load average at end: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
}

fn wait_for(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    idhal_test_support::wait_for(what, limit, cond)
}
