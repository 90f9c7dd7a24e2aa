//! `nodes_up` against a real OAR 2.5 (PostgreSQL + Almighty on 127.0.0.1, this test binary's
//! own instance). OAR's tools run behind wrappers that log each call, so the tests check the
//! calls the batch makes as well as what OAR ends up holding. Tests keep apart by domain.

use super::*;
use crate::config::ServerConfig;
use crate::names::{node_id, Domain, Label, ServerName};
use crate::scheduler::{DownGuard, Scheduler};
use idhal_test_support::oar::{logged_calls, Oar as TestOar};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn oar() -> Option<&'static TestOar> {
    static OAR: OnceLock<Option<TestOar>> = OnceLock::new();
    OAR.get_or_init(|| TestOar::available().then(TestOar::start))
        .as_ref()
}

/// idhal's OAR backend pointed at the fixture through logging wrappers.
struct Rig {
    _dir: tempfile::TempDir,
    sched: Oar,
    log: PathBuf,
}

impl Rig {
    fn new(oar: &TestOar) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (section, log) = oar.logged_config_section(dir.path());
        let text = format!(
            "[limits]\nhook_budget_ms = 300000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 60000\nlock_wait_ms = 120000\n{section}"
        );
        let cfg = ServerConfig::parse(&text, Path::new("test.toml")).unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        Rig {
            sched: Oar::new(&cfg, &state),
            _dir: dir,
            log,
        }
    }

    /// The calls logged since the last `take`.
    fn take(&self) -> Vec<String> {
        let calls = logged_calls(&self.log);
        std::fs::write(&self.log, "").unwrap();
        calls
    }
}

fn deadline() -> Deadline {
    Deadline::after(Duration::from_secs(300))
}

fn node(domain: &str, octet3: u8, i: u8, since: u64) -> NodeUp {
    NodeUp {
        node: node_id(&format!("c{octet3}-{i}")).unwrap(),
        host: HostName {
            label: Label::parse(&format!("vnode-{octet3}-{i}")).unwrap(),
            domain: Domain::parse(domain).unwrap(),
        },
        vpn_ip: Ipv4Addr::new(10, 134, octet3, i),
        client_ip: "127.0.0.1".parse().unwrap(),
        client_port: Some(40000),
        client_name: crate::client_name::ClientName::address(
            "127.0.0.1".parse().unwrap(),
            crate::client_name::Check::Off,
        ),
        since,
        node_type: Label::parse("vnode").unwrap(),
        server: ServerName::parse("vpn1").unwrap(),
    }
}

fn down(rig: &Rig, up: &NodeUp) {
    let guard = DownGuard::Session {
        since: up.since,
        client: (up.client_ip, up.client_port),
    };
    rig.sched.node_down(&up.host, guard, deadline()).unwrap();
}

fn prop(r: &serde_json::Value, k: &str) -> String {
    match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("{k} = {other}"),
    }
}

/// The node as OAR holds it: (state, idhalcn, ip, idhalconnectedsince).
fn held(oar: &TestOar, up: &NodeUp) -> Vec<(String, String, String, String)> {
    oar.host(&up.host.to_string())
        .iter()
        .map(|r| {
            (
                prop(r, "state"),
                prop(r, "idhalcn"),
                prop(r, "ip"),
                prop(r, "idhalconnectedsince"),
            )
        })
        .collect()
}

fn expected(up: &NodeUp) -> Vec<(String, String, String, String)> {
    vec![(
        "Alive".into(),
        up.node.to_string(),
        up.vpn_ip.to_string(),
        up.since.to_string(),
    )]
}

#[test]
fn a_batch_of_new_and_existing_hosts_comes_up_with_each_hosts_own_properties() {
    let Some(oar) = oar() else { return };
    let rig = Rig::new(oar);
    let d = "mixed.test";
    let t0 = idhal_test_support::now() - 100;
    // Before the batch: 1 Alive and right, 2 Absent and right, 3 Alive with an older
    // session, 4 Absent with an older session; 5 and 6 do not exist.
    let before: Vec<NodeUp> = (1..=4).map(|i| node(d, 1, i, t0)).collect();
    for up in &before {
        rig.sched.node_up(up, deadline()).unwrap();
    }
    down(&rig, &before[1]);
    down(&rig, &before[3]);
    let batch = vec![
        node(d, 1, 1, t0),
        node(d, 1, 2, t0),
        node(d, 1, 3, t0 + 5),
        node(d, 1, 4, t0 + 5),
        node(d, 1, 5, t0 + 5),
        node(d, 1, 6, t0 + 5),
    ];
    rig.take();
    let t = Instant::now();
    let verdicts = rig.sched.nodes_up(&batch, deadline());
    eprintln!("batch of 6: {:.2} s", t.elapsed().as_secs_f64());
    for (up, v) in batch.iter().zip(&verdicts) {
        let v = v.as_ref().unwrap_or_else(|e| panic!("{}: {e}", up.host));
        assert_eq!(v.created, up.host.label.to_string().ends_with(['5', '6']));
        assert_eq!(v.resource_ids.len(), 1);
        assert_eq!(held(oar, up), expected(up), "{}", up.host);
    }
    // The calls: no oarproperty (the columns are known), the whole batch read in one
    // oarnodes, and per host only what it needs.
    let calls = rig.take();
    let h = |i: u8| format!("vnode-1-{i}.{d}");
    assert!(
        !calls.iter().any(|c| c.starts_with("oarproperty")),
        "{calls:#?}"
    );
    let all: Vec<String> = (1..=6).map(|i| format!("'{}'", h(i))).collect();
    assert_eq!(
        calls[0],
        format!("oarnodes -J --sql network_address IN ({})", all.join(",")),
        "{calls:#?}"
    );
    let mut set: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("oarnodesetting"))
        .collect();
    set.sort();
    let starts: Vec<String> = set
        .iter()
        .map(|c| c.split(" -p ").next().unwrap().to_owned())
        .collect();
    assert_eq!(
        starts,
        vec![
            format!("oarnodesetting -a -h {}", h(5)),
            format!("oarnodesetting -a -h {}", h(6)),
            format!("oarnodesetting -h {}", h(3)),
            format!("oarnodesetting -n -s Alive -h {}", h(2)),
            format!("oarnodesetting -n -s Alive -h {}", h(4)),
        ],
        "{calls:#?}"
    );
    // Host 2 (right properties) got the state alone; every call with values names one host.
    assert!(set
        .iter()
        .any(|c| **c == format!("oarnodesetting -n -s Alive -h {}", h(2))));
    for c in &set {
        if c.contains(" -p ") {
            assert_eq!(c.matches(" -h ").count(), 1, "{c}");
        }
    }
    // The rest are read-backs of the pending hosts, one call per round.
    assert!(calls[1..]
        .iter()
        .filter(|c| c.starts_with("oarnodes "))
        .all(|c| c.starts_with("oarnodes -J --sql network_address IN (")));

    // An empty batch: nothing to say, nothing asked of OAR.
    assert!(rig.sched.nodes_up(&[], deadline()).is_empty());
    assert_eq!(rig.take(), Vec::<String>::new());
}

/// The hook worker runs several batches at once: `[oar] parallel_calls` bounds the per-host
/// `oarnodesetting` processes of all of them together, not of each.
#[test]
fn parallel_calls_bound_the_whole_process_not_each_batch() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(oar) = oar() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (section, _) = oar.logged_config_section(dir.path());
    // oarnodesetting behind a wrapper that marks its start and end (and lasts ≥ 0.3 s, so
    // calls of the two batches overlap unless something keeps them apart).
    let marks = dir.path().join("marks.log");
    std::fs::write(
        dir.path().join("oarnodesetting"),
        format!(
            "#!/bin/sh\necho \"+ $*\" >> '{m}'\nsleep 0.3\n{OARDIR}/oarnodesetting \"$@\"; rc=$?\necho - >> '{m}'\nexit $rc\n",
            m = marks.display(),
            OARDIR = "/usr/lib/oar"
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.path().join("oarnodesetting"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let section = section.replacen("[oar]\n", "[oar]\nparallel_calls = 2\n", 1);
    let text = format!(
        "[limits]\nhook_budget_ms = 300000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 60000\nlock_wait_ms = 120000\n{section}"
    );
    let cfg = ServerConfig::parse(&text, Path::new("test.toml")).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let sched = Oar::new(&cfg, &state);
    let d = "parallel.test";
    let t0 = idhal_test_support::now();
    let batches: Vec<Vec<NodeUp>> = (0..2u8)
        .map(|b| (1..=4).map(|i| node(d, 40 + b, i, t0)).collect())
        .collect();
    // The property columns exist before the batches start (both would create them at once).
    sched.ensure_properties(deadline(), false).unwrap();
    std::fs::write(&marks, "").unwrap();
    let results: Vec<Vec<Result<UpOutcome, OarError>>> = std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .iter()
            .map(|b| s.spawn(|| sched.ups(b, deadline())))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results.iter().flatten() {
        assert!(r.is_ok(), "{r:?}");
    }
    let (mut running, mut most) = (0i32, 0i32);
    // Which batch (third octet) each call belonged to, in the order they started.
    let mut order = String::new();
    for l in std::fs::read_to_string(&marks).unwrap().lines() {
        if let Some(args) = l.strip_prefix("+ ") {
            running += 1;
            most = most.max(running);
            let host = args.split(" -h ").nth(1).unwrap_or("");
            order.push(if host.starts_with("vnode-40-") {
                'A'
            } else {
                'B'
            });
        } else {
            running -= 1;
        }
    }
    // 8 creations, at most 2 at once over both batches (each batch alone allows 2).
    assert_eq!(order.len(), 8, "{order}");
    assert!(
        most <= 2,
        "{most} oarnodesetting at once with parallel_calls = 2"
    );
    assert_eq!(most, 2, "the calls never ran in parallel at all");
    // The batch that reached its calls first has them all before the other's: it finishes in
    // its own time instead of both finishing late.
    assert!(
        order == "AAAABBBB" || order == "BBBBAAAA",
        "calls of the two batches interleaved: {order}"
    );
}

#[test]
fn a_bad_host_or_a_repeated_one_fails_alone() {
    let Some(oar) = oar() else { return };
    let rig = Rig::new(oar);
    let t0 = idhal_test_support::now();
    let good = node("alone.test", 2, 1, t0);
    let other = node("alone.test", 2, 2, t0);
    // A valid host name OAR cannot hold: network_address is varchar(100), and OAR's
    // `oarnodesetting -a` then says "New resource added" and exits 0 without one.
    let mut long = node(
        "a-domain-long-enough-that-oar-cannot-store-the-host-name.alone.test",
        2,
        3,
        t0,
    );
    long.host.label = Label::parse(&format!("vnode-2-3-{}", "x".repeat(50))).unwrap();
    assert!(long.host.to_string().len() > 100);
    let batch = vec![good.clone(), long.clone(), other.clone(), good.clone()];
    let v = rig.sched.nodes_up(&batch, deadline());
    assert_eq!(v.len(), 4);
    assert!(v[0].as_ref().is_ok_and(|o| o.created), "{:?}", v[0]);
    assert!(v[2].as_ref().is_ok_and(|o| o.created), "{:?}", v[2]);
    assert_eq!(
        v[1].as_ref().unwrap_err().to_string(),
        format!("OAR: {}: no resource exists after creating it", long.host)
    );
    assert_eq!(
        v[3].as_ref().unwrap_err().to_string(),
        "OAR: vnode-2-1.alone.test is in this batch twice; only its first entry was acted on"
    );
    assert_eq!(held(oar, &good), expected(&good));
    assert_eq!(held(oar, &other), expected(&other));
    assert!(held(oar, &long).is_empty());
}

#[test]
fn a_host_name_that_would_break_oars_sql_cannot_reach_a_batch() {
    // OAR pastes network_address values into SQL unescaped. A batch only takes HostNames,
    // and the only way to one is through these parsers.
    let domain = Domain::parse("sql.test").unwrap();
    for p in [
        "x' OR '1'='1",
        "a'); DELETE FROM resources; --",
        "vnode-1-1.sql.test'--",
        "vnode 1",
        "vnode\\1",
        "vnode,1",
        "",
        &"a".repeat(64),
    ] {
        assert!(Label::parse(p).is_err(), "{p:?}");
        assert!(Domain::parse(p).is_err(), "{p:?}");
        assert!(HostName::parse_in(p, &domain).is_err(), "{p:?}");
        assert!(
            HostName::parse_in(&format!("{p}.sql.test"), &domain).is_err(),
            "{p:?}"
        );
    }
    let a = node("sql.test", 3, 1, 1);
    let b = node("sql.test", 3, 2, 1);
    assert_eq!(
        in_list(&[&a.host, &b.host]),
        "network_address IN ('vnode-3-1.sql.test','vnode-3-2.sql.test')"
    );
}

#[test]
fn changes_made_are_confirmed_even_when_the_budget_ran_out_meanwhile() {
    // A storm's queue can spend a batch's budget before its read-back: the changes are made
    // by then, and refusing nodes OAR holds Alive would make their retries do it all again.
    let Some(oar) = oar() else { return };
    let rig = Rig::new(oar);
    let t0 = idhal_test_support::now() - 100;
    let ups: Vec<NodeUp> = (1..=3).map(|i| node("late.test", 5, i, t0)).collect();
    for up in &ups {
        rig.sched.node_up(up, deadline()).unwrap();
    }
    rig.take();
    let spent = Deadline::after(Duration::ZERO);
    std::thread::sleep(Duration::from_millis(10));
    assert!(spent.remaining().is_zero());
    let hosts: Vec<&HostName> = ups.iter().map(|u| &u.host).collect();
    let mut v = Verdicts::new(ups.len());
    let props = |i: usize| node_properties(&ups[i]);
    let done = |i: usize, rs: &[Resource]| UpOutcome {
        created: i == 1,
        resource_ids: rs.iter().map(|r| r.id).collect(),
    };
    rig.sched
        .confirm_batch(&hosts, "Alive", &props, &done, &mut v, spent);
    let got: Vec<_> = v.0.into_iter().map(|r| r.expect("a verdict")).collect();
    for (i, r) in got.iter().enumerate() {
        let out = r.as_ref().unwrap_or_else(|e| panic!("node {i}: {e}"));
        assert_eq!(out.created, i == 1, "node {i}: its own created flag");
        assert_eq!(out.resource_ids.len(), 1, "node {i}");
    }
    let calls = rig.take();
    assert_eq!(calls.len(), 1, "one read-back for the batch: {calls:?}");
    assert!(calls[0].contains("oarnodes"), "{calls:?}");
}

#[test]
fn a_batch_of_take_downs_keeps_each_guard_in_three_oar_calls() {
    let Some(oar) = oar() else { return };
    let rig = Rig::new(oar);
    let d = "downs.test";
    let t0 = idhal_test_support::now() - 100;
    // 1–3 Alive from the session that ends; 4 reconnected since (a newer session); 5 Absent
    // already; 6 never registered.
    let ups: Vec<NodeUp> = (1..=5)
        .map(|i| node(d, 6, i, if i == 4 { t0 + 50 } else { t0 }))
        .collect();
    for up in &ups {
        rig.sched.node_up(up, deadline()).unwrap();
    }
    down(&rig, &ups[4]);
    rig.take();
    let guard = DownGuard::Session {
        since: t0,
        client: ("127.0.0.1".parse().unwrap(), Some(40000)),
    };
    let mut batch: Vec<(HostName, DownGuard)> =
        (1..=6).map(|i| (node(d, 6, i, t0).host, guard)).collect();
    batch.push(batch[0].clone());
    let got: Vec<String> = rig
        .sched
        .downs(&batch, deadline())
        .into_iter()
        .map(|r| match r {
            Ok(o) => format!("{o:?}"),
            Err(e) => e.to_string(),
        })
        .collect();
    assert_eq!(
        got[..6],
        [
            "MarkedDown",
            "MarkedDown",
            "MarkedDown",
            "NewerSession",
            "AlreadyDown",
            "Unknown"
        ],
        "{got:?}"
    );
    assert!(got[6].contains("twice"), "{got:?}");
    let state = |i: u8| prop(&oar.host(&node(d, 6, i, t0).host.to_string())[0], "state");
    assert_eq!(
        (1..=5).map(state).collect::<Vec<_>>(),
        ["Absent", "Absent", "Absent", "Alive", "Absent"]
    );
    // One read, ONE state change for the three, and the read-backs.
    let calls = rig.take();
    let set: Vec<&String> = calls
        .iter()
        .filter(|c| c.starts_with("oarnodesetting"))
        .collect();
    assert_eq!(set.len(), 1, "{calls:?}");
    for i in 1..=3 {
        assert!(set[0].contains(&format!("-h vnode-6-{i}.{d}")), "{set:?}");
    }
    assert!(set[0].contains("-s Absent"), "{set:?}");
    assert!(
        !set[0].contains("vnode-6-4") && !set[0].contains("vnode-6-5"),
        "{set:?}"
    );
}

#[test]
fn a_state_request_oar_dropped_is_made_again() {
    // Its own OAR: Almighty is stopped and started here.
    if !TestOar::available() {
        return;
    }
    let oar = TestOar::start();
    let rig = Rig::new(&oar);
    let t0 = idhal_test_support::now() - 100;
    let a = node("dropped.test", 4, 1, t0);
    let b = node("dropped.test", 4, 2, t0);
    for up in [&a, &b] {
        rig.sched.node_up(up, deadline()).unwrap();
        down(&rig, up);
    }
    oar.stop_almighty();
    let next_state = |up: &NodeUp| prop(&oar.host(&up.host.to_string())[0], "next_state");
    std::thread::scope(|s| {
        let one = s.spawn(|| rig.sched.node_up(&a, deadline()));
        let many = s.spawn(|| rig.sched.nodes_up(std::slice::from_ref(&b), deadline()));
        // Both requests written; with Almighty down they stay pending...
        idhal_test_support::wait_for("both requests pending", Duration::from_secs(60), || {
            next_state(&a) == "Alive" && next_state(&b) == "Alive"
        });
        // ...until dropped, as NodeChangeState drops a request written while it runs.
        oar.pg.psql(
            "oar",
            "UPDATE resources SET next_state = 'UnChanged' WHERE network_address LIKE 'vnode-4-%.dropped.test'",
        );
        oar.start_almighty();
        one.join().unwrap().unwrap();
        many.join().unwrap().remove(0).unwrap();
    });
    assert_eq!(held(&oar, &a), expected(&a));
    assert_eq!(held(&oar, &b), expected(&b));
}

/// Batch vs one by one, library level: `cargo test -p idhal-server-tools --release --bin idhal
/// bench_batch_vs_one_by_one -- --ignored --nocapture`. Prints figures, asserts the work.
#[test]
#[ignore = "benchmark: prints figures"]
fn bench_batch_vs_one_by_one() {
    let Some(oar) = oar() else { return };
    let rig = Rig::new(oar);
    let d = "bench.test";
    let t0 = idhal_test_support::now() - 1000;
    println!(
        "bench_batch: load average at start: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap().trim()
    );
    let mut octet3 = 50;
    for n in [50u8, 200] {
        let one: Vec<NodeUp> = (1..=n).map(|i| node(d, octet3, i, t0)).collect();
        let many: Vec<NodeUp> = (1..=n).map(|i| node(d, octet3 + 1, i, t0)).collect();
        octet3 += 2;
        for (what, since) in [("new hosts", t0), ("reconnect after Absent", t0 + 1)] {
            let one: Vec<NodeUp> = one.iter().map(|u| NodeUp { since, ..u.clone() }).collect();
            let many: Vec<NodeUp> = many.iter().map(|u| NodeUp { since, ..u.clone() }).collect();
            rig.take();
            let t = Instant::now();
            for up in &one {
                rig.sched.node_up(up, deadline()).unwrap();
            }
            let (one_s, one_calls) = (t.elapsed().as_secs_f64(), rig.take().len());
            let t = Instant::now();
            for v in rig.sched.nodes_up(&many, deadline()) {
                v.unwrap();
            }
            let (many_s, many_calls) = (t.elapsed().as_secs_f64(), rig.take().len());
            println!(
                "bench_batch: N={n:>3} {what}: node_up one by one {one_s:6.1} s ({:5.1} nodes/s, {one_calls} OAR processes); nodes_up {many_s:6.1} s ({:5.1} nodes/s, {many_calls} OAR processes)",
                f64::from(n) / one_s,
                f64::from(n) / many_s
            );
            for up in one.iter().chain(&many) {
                assert_eq!(held(oar, up), expected(up));
            }
            if since == t0 {
                for up in one.iter().chain(&many) {
                    down(&rig, up);
                }
            }
        }
    }
}
