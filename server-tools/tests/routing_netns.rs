//! `[routing]` against real kernel tables: each test makes its own network namespace
//! (`idhal-t-PID-N`, removed on drop, panics included) with a veth pair standing in for tun0,
//! and runs the `idhal` binary inside it with `ip netns exec`: the hooks write and delete node
//! /32s, `idhal reconcile` syncs the table with a status file. Only the hanging `ip` is a fake.

mod hook_support;

use hook_support::{node_env, now, out, setup, stderr, IDHAL};
use idhal_test_support::Logged;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A network namespace of this test's own, with `tun0` (one end of a veth pair) up.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "idhal-t-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        for args in [
            &["link", "set", "lo", "up"][..],
            &[
                "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p",
            ],
            &["link", "set", "tun0", "up"],
            &["link", "set", "tun0p", "up"],
        ] {
            ns.ip(args);
        }
        ns
    }

    /// `ip -n NS ARGS`, which must succeed.
    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// Routes in `table` as `ADDR dev DEV metric M`, sorted.
    fn routes(&self, table: u32) -> Vec<String> {
        let o = Command::new("ip")
            .args([
                "-n",
                &self.name,
                "route",
                "show",
                "table",
                &table.to_string(),
            ])
            .output()
            .unwrap();
        let mut routes: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                let at = |k: &str| {
                    w.iter()
                        .position(|x| *x == k)
                        .map(|i| w[i + 1])
                        .unwrap_or("-")
                };
                format!("{} dev {} metric {}", w[0], at("dev"), at("metric"))
            })
            .collect();
        routes.sort();
        routes
    }

    /// Writes many routes at once (a test's starting table).
    fn batch(&self, lines: &str) {
        let path = std::env::temp_dir().join(format!("{}.batch", self.name));
        std::fs::write(&path, lines).unwrap();
        self.ip(&["-batch", path.to_str().unwrap()]);
        let _ = std::fs::remove_file(path);
    }

    /// `idhal ARGS` inside the namespace, with exactly `env` (as OpenVPN runs its scripts).
    fn idhal(&self, env: &[(String, String)], args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, IDHAL])
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    fn hook(&self, cfg: &Path, state: &Path, event: &str, env: &[(String, String)]) -> Output {
        let (c, s) = (cfg.to_str().unwrap(), state.to_str().unwrap());
        self.idhal(env, &["--config", c, "--state-dir", s, "hook", event])
    }

    fn reconcile(&self, cfg: &Path, state: &Path, status: &Path, extra: &[&str]) -> Output {
        let (c, s, f) = (
            cfg.to_str().unwrap(),
            state.to_str().unwrap(),
            status.to_str().unwrap(),
        );
        let mut args = vec![
            "--config",
            c,
            "--state-dir",
            s,
            "reconcile",
            "--status-file",
            f,
        ];
        args.extend_from_slice(extra);
        self.idhal(&[], &args)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
}

fn config(extra: &str) -> String {
    format!(
        "[names]\ndomain = \"idhal.test\"\n[scheduler]\nbackend = \"none\"\n\
         [routing]\ntable = 100\n{extra}\n"
    )
}

fn env(cn: &str, vpn_ip: &str, since: u64) -> Vec<(String, String)> {
    node_env(cn, vpn_ip, since)
}

fn with(mut env: Vec<(String, String)>, key: &str, value: &str) -> Vec<(String, String)> {
    env.retain(|(k, _)| k != key);
    env.push((key.into(), value.into()));
    env
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", out(&o));
    o
}

fn fails(o: Output, needle: &str) -> Output {
    assert!(!o.status.success(), "{}", out(&o));
    assert!(
        out(&o).contains(needle),
        "wanted {needle:?} in:\n{}",
        out(&o)
    );
    o
}

/// A version-2 status file written at `written` listing (CN, virtual address, session start).
fn write_status(path: &Path, written: u64, rows: &[(String, String, u64)]) {
    let mut s = format!(
        "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\nTIME,2026-01-01 00:00:00,{written}\n\
         HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n"
    );
    for (i, (cn, vaddr, since)) in rows.iter().enumerate() {
        s.push_str(&format!(
            "CLIENT_LIST,{cn},127.0.0.1:40000,{vaddr},,100,200,2026-01-01 00:00:00,{since},UNDEF,{i},{i},AES-256-GCM\n"
        ));
    }
    s.push_str("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\nGLOBAL_STATS,Max bcast/mcast queue length,0\nEND\n");
    std::fs::write(path, s).unwrap();
}

/// Connect writes the session's route (metric = its start); a reconnect replaces it (one route
/// left); the OLD session's disconnect, arriving late, leaves the newer route; the newer
/// session's disconnect removes it. Another node's route is never touched.
#[test]
fn hooks_write_and_delete_the_sessions_own_route() {
    let ns = Netns::new();
    let (_d, cfg, state) = setup(&config(""));
    let old = env("client738", "10.134.7.38", 1_000_000);
    let new = env("client738", "10.134.7.38", 2_000_000);
    let other = env("client739", "10.134.7.39", 1_500_000);
    let o = ok(ns.hook(&cfg, &state, "client-connect", &old));
    assert!(
        stderr(&o).contains("route 10.134.7.38/32 dev tun0 metric 1000000 in table 100"),
        "{}",
        out(&o)
    );
    ok(ns.hook(&cfg, &state, "client-connect", &other));
    assert_eq!(
        ns.routes(100),
        [
            "10.134.7.38 dev tun0 metric 1000000",
            "10.134.7.39 dev tun0 metric 1500000"
        ]
    );
    ok(ns.hook(&cfg, &state, "client-connect", &new));
    assert_eq!(
        ns.routes(100),
        [
            "10.134.7.38 dev tun0 metric 2000000",
            "10.134.7.39 dev tun0 metric 1500000"
        ]
    );
    let o = ok(ns.hook(&cfg, &state, "client-disconnect", &old));
    assert!(stderr(&o).contains("was not in table 100"), "{}", out(&o));
    assert_eq!(
        ns.routes(100),
        [
            "10.134.7.38 dev tun0 metric 2000000",
            "10.134.7.39 dev tun0 metric 1500000"
        ]
    );
    let o = ok(ns.hook(&cfg, &state, "client-disconnect", &new));
    assert!(
        stderr(&o).contains("route 10.134.7.38/32 dev tun0 metric 2000000 deleted from table 100"),
        "{}",
        out(&o)
    );
    assert_eq!(ns.routes(100), ["10.134.7.39 dev tun0 metric 1500000"]);
    // A disconnect whose connect was refused (no address) changes no route.
    let mut never_up = env("client739", "10.134.7.39", 1_500_000);
    never_up.retain(|(k, _)| k != "ifconfig_pool_remote_ip");
    fails(
        ns.hook(&cfg, &state, "client-disconnect", &never_up),
        "never came up",
    );
    assert_eq!(ns.routes(100), ["10.134.7.39 dev tun0 metric 1500000"]);
}

/// Deferred mode with no worker listening: the disconnect hook still deletes the route itself
/// before it tries the hand-off.
#[test]
fn deferred_disconnect_deletes_the_route_in_the_hook() {
    let ns = Netns::new();
    let (_d, cfg, state) = setup(&config("[hook]\nmode = \"deferred\"\n"));
    let e = env("client738", "10.134.7.38", 1_000_000);
    ns.batch("route add 10.134.7.38/32 dev tun0 table 100 proto static metric 1000000\n");
    let o = ok(ns.hook(&cfg, &state, "client-disconnect", &e));
    assert!(stderr(&o).contains("deleted from table 100"), "{}", out(&o));
    assert_eq!(ns.routes(100), Vec::<String>::new());
}

/// Deferred mode: the worker (running in the namespace) writes the route before it writes the
/// client's `1`, all of its batch in one `ip -batch`; a route `ip` refuses is a backend failure
/// (`0` with the default on_failure). The disconnect hook deletes the route itself.
#[test]
fn the_worker_writes_the_route_before_its_verdict() {
    let ns = Netns::new();
    let (d, cfg, state) = setup(&config("[hook]\nmode = \"deferred\"\n"));
    let (c, s) = (cfg.to_str().unwrap(), state.to_str().unwrap());
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.name, IDHAL]).args([
        "--config",
        c,
        "--state-dir",
        s,
        "hook",
        "worker",
    ]);
    let mut worker = Logged::spawn(&mut cmd, d.path().join("worker.log"));
    worker.wait_log("idhal hook worker: listening on", Duration::from_secs(30));
    let tmp = state.join("openvpn-tmp");
    let connect = |n: &str, env: Vec<(String, String)>| {
        let (cf, rf) = (
            tmp.join(format!("openvpn_cc_{n}.tmp")),
            tmp.join(format!("openvpn_ccr_{n}.tmp")),
        );
        std::fs::write(&cf, "").unwrap();
        std::fs::write(&rf, "").unwrap();
        let env = with(
            with(env, "client_connect_config_file", cf.to_str().unwrap()),
            "client_connect_deferred_file",
            rf.to_str().unwrap(),
        );
        let o = ok(ns.hook(&cfg, &state, "client-connect", &env));
        assert!(stderr(&o).contains("handed to the worker"), "{}", out(&o));
        rf
    };
    let verdict = |rf: &Path| {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let v = std::fs::read_to_string(rf).unwrap_or_default();
            if (v.trim() != "2" && !v.is_empty()) || Instant::now() > until {
                return v;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let e = env("client738", "10.134.7.38", 1_000_000);
    let rf = connect("a", e.clone());
    assert_eq!(verdict(&rf), "1\n", "{}", worker.log());
    assert_eq!(ns.routes(100), ["10.134.7.38 dev tun0 metric 1000000"]);
    let rf = connect(
        "b",
        env("client739", "10.134.7.39", 1_000_001)
            .into_iter()
            .map(|(k, v)| {
                if k == "dev" {
                    (k, "tun9".into())
                } else {
                    (k, v)
                }
            })
            .collect(),
    );
    assert_eq!(verdict(&rf), "0\n", "{}", worker.log());
    // The verdict is written first, then logged.
    worker.wait_log("Cannot find device \"tun9\"", Duration::from_secs(30));
    let o = ok(ns.hook(&cfg, &state, "client-disconnect", &e));
    assert!(
        stderr(&o).contains("deleted from table 100")
            && stderr(&o).contains("handed to the worker"),
        "{}",
        out(&o)
    );
    assert_eq!(ns.routes(100), Vec::<String>::new());
}

/// A `dev` that could smuggle words into an `ip` command, or name no interface, refuses the
/// node; so does an address outside the pool. Nothing is written.
#[test]
fn hostile_dev_and_address_write_nothing() {
    let ns = Netns::new();
    let (_d, cfg, state) = setup(&config(""));
    let base = env("client738", "10.134.7.38", 1_000_000);
    for dev in [
        "tun0 table 254",
        "",
        "tun0/../x",
        "tun01234567890123456789",
        "tun0\nroute flush",
    ] {
        fails(
            ns.hook(
                &cfg,
                &state,
                "client-connect",
                &with(base.clone(), "dev", dev),
            ),
            "OpenVPN variable dev=",
        );
    }
    let mut no_dev = base.clone();
    no_dev.retain(|(k, _)| k != "dev");
    fails(
        ns.hook(&cfg, &state, "client-connect", &no_dev),
        "OpenVPN variable dev is missing",
    );
    fails(
        ns.hook(
            &cfg,
            &state,
            "client-connect",
            &with(base.clone(), "ifconfig_pool_remote_ip", "10.135.0.5"),
        ),
        "inside the configured pool",
    );
    // A device the kernel does not have: `ip` refuses the add, a backend failure.
    fails(
        ns.hook(&cfg, &state, "client-connect", &with(base, "dev", "tun9")),
        "Cannot find device \"tun9\"",
    );
    assert_eq!(ns.routes(100), Vec::<String>::new());
}

/// A node refused for another backend's failure (DNS unreachable, default on_failure) gets no
/// route: it is written last, and only for a node that will be accepted; with on_failure =
/// "admit" it is written.
#[test]
fn a_node_refused_for_another_backend_gets_no_route() {
    let ns = Netns::new();
    let (d, _, _) = setup("");
    let key = d.path().join("tsig.key");
    std::fs::write(
        &key,
        "key \"idhal-update\" {\n\talgorithm hmac-sha256;\n\tsecret \"aWRoYWwtdGVzdC1rZXktaWRoYWwtdGVzdC1rZXk=\";\n};\n",
    )
    .unwrap();
    // Nothing listens on port 9 of the namespace's own loopback.
    let dns = |on_failure: &str| {
        format!(
            "[names]\ndomain = \"idhal.test\"\n[scheduler]\nbackend = \"none\"\n\
             [hook]\non_failure = \"{on_failure}\"\n\
             [dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:9\"\ntsig_key_file = \"{}\"\n\
             [limits]\ndns_timeout_ms = 300\n[routing]\ntable = 100\n",
            key.display()
        )
    };
    let e = env("client738", "10.134.7.38", 1_000_000);
    let (_d1, cfg, state) = setup(&dns("refuse"));
    fails(
        ns.hook(&cfg, &state, "client-connect", &e),
        "failing (on_failure = \"refuse\")",
    );
    assert_eq!(ns.routes(100), Vec::<String>::new());
    let (_d2, cfg, state) = setup(&dns("admit"));
    let o = ok(ns.hook(&cfg, &state, "client-connect", &e));
    assert!(stderr(&o).contains("admitting anyway"), "{}", out(&o));
    assert_eq!(ns.routes(100), ["10.134.7.38 dev tun0 metric 1000000"]);
}

/// The kernel's own tables are refused when the config is read.
#[test]
fn kernel_tables_are_refused_at_config_load() {
    let ns = Netns::new();
    for t in ["0", "253", "254", "255"] {
        let (_d, cfg, state) = setup(&format!(
            "[scheduler]\nbackend = \"none\"\n[routing]\ntable = {t}\n"
        ));
        fails(
            ns.hook(
                &cfg,
                &state,
                "client-connect",
                &env("client738", "10.134.7.38", 1),
            ),
            "needs a table of its own",
        );
    }
    assert_eq!(ns.routes(254).len(), 0, "{:?}", ns.routes(254));
}

/// An `ip` that is missing, and one that hangs: the connect fails within its deadline as a
/// backend failure (`on_failure` decides), and says why.
#[test]
fn missing_or_hanging_ip_is_a_backend_failure() {
    let ns = Netns::new();
    let e = env("client738", "10.134.7.38", 1_000_000);
    let (_d, cfg, state) = setup(&config("ip = \"/nonexistent/ip\""));
    fails(
        ns.hook(&cfg, &state, "client-connect", &e),
        "cannot start /nonexistent/ip",
    );
    let (d, _, _) = setup("");
    let fake = d.path().join("ip");
    std::fs::write(&fake, "#!/bin/sh\nexec /bin/sleep 600\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_d2, cfg, state) = setup(&format!(
        "{}[limits]\ncommand_timeout_ms = 300\n[hook]\non_failure = \"admit\"\n",
        config(&format!("ip = \"{}\"", fake.display()))
    ));
    let t = Instant::now();
    let o = ok(ns.hook(&cfg, &state, "client-connect", &e));
    assert!(
        stderr(&o).contains("did not finish within 300ms and was killed"),
        "{}",
        out(&o)
    );
    assert!(stderr(&o).contains("admitting anyway"), "{}", out(&o));
    eprintln!("hanging ip: hook returned after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(120));
}

/// `idhal reconcile` makes the table what the status says: a listed client without its route
/// gets it, a route with an older metric or on another device is replaced, a route no client
/// holds goes unless its session started within the grace of the status (it may simply not be
/// listed yet). `--dry-run` only says so.
#[test]
fn reconcile_syncs_the_table_with_the_status() {
    let ns = Netns::new();
    ns.ip(&[
        "link", "add", "tun1", "type", "veth", "peer", "name", "tun1p",
    ]);
    ns.ip(&["link", "set", "tun1", "up"]);
    let (d, cfg, state) = setup(&config(""));
    let status = d.path().join("status.log");
    let t = now() as u32;
    let old = t - 3600;
    ns.batch(&format!(
        "route add 10.134.0.3/32 dev tun0 table 100 proto static metric {old}\n\
         route add 10.134.0.4/32 dev tun0 table 100 proto static metric {old}\n\
         route add 10.134.0.5/32 dev tun1 table 100 proto static metric {t}\n\
         route add 10.134.0.6/32 dev tun0 table 100 proto static metric {t}\n\
         route add 10.134.0.7/32 dev tun0 table 100 proto static metric {old}\n\
         route add 10.134.0.0/24 dev tun0 table 100 proto static\n"
    ));
    let row = |n: u32, since: u32| (format!("client{n}"), format!("10.134.0.{n}"), since as u64);
    // .2 missing; .3 older metric; .4 nobody's (old); .5 wrong device; .6 nobody's but
    // young; .7 right.
    write_status(
        &status,
        t as u64,
        &[row(2, t), row(3, t), row(5, t), row(7, old)],
    );
    let before = ns.routes(100);
    let o = ok(ns.reconcile(&cfg, &state, &status, &["--dry-run"]));
    let text = out(&o);
    for want in [
        format!("would add route 10.134.0.2/32 dev tun0 metric {t} to table 100"),
        format!("would delete route 10.134.0.3/32 dev tun0 metric {old} from table 100"),
        format!("would add route 10.134.0.3/32 dev tun0 metric {t} to table 100"),
        format!("would delete route 10.134.0.4/32 dev tun0 metric {old} from table 100"),
        format!("would delete route 10.134.0.5/32 dev tun1 metric {t} from table 100"),
    ] {
        assert!(text.contains(&want), "{want:?} in:\n{text}");
    }
    assert!(
        !text.contains("10.134.0.6/32") && !text.contains("10.134.0.7/32"),
        "{text}"
    );
    assert_eq!(ns.routes(100), before);
    let o = ok(ns.reconcile(&cfg, &state, &status, &[]));
    assert!(
        out(&o).contains("table 100: 3 routes added, 3 deleted"),
        "{}",
        out(&o)
    );
    let mut want = vec![
        "10.134.0.0/24 dev tun0 metric -".to_owned(),
        format!("10.134.0.2 dev tun0 metric {t}"),
        format!("10.134.0.3 dev tun0 metric {t}"),
        format!("10.134.0.5 dev tun0 metric {t}"),
        format!("10.134.0.6 dev tun0 metric {t}"),
        format!("10.134.0.7 dev tun0 metric {old}"),
    ];
    want.sort();
    assert_eq!(ns.routes(100), want);
    // Nothing left to do.
    let o = ok(ns.reconcile(&cfg, &state, &status, &[]));
    assert!(
        out(&o).contains("table 100: 0 routes added, 0 deleted"),
        "{}",
        out(&o)
    );
}

/// `ip`'s listing is read up to `[routing] max_output_bytes`: a table too large to read is
/// refused, nothing changed.
#[test]
fn an_oversized_listing_is_refused() {
    let ns = Netns::new();
    let (d, cfg, state) = setup(&config("max_output_bytes = 4096"));
    let mut lines = String::new();
    for i in 0..400u32 {
        lines.push_str(&format!(
            "route add 10.134.{}.{}/32 dev tun0 table 100 proto static metric 5\n",
            2 + i / 200,
            2 + i % 200
        ));
    }
    ns.batch(&lines);
    let status = d.path().join("status.log");
    write_status(&status, now(), &[]);
    fails(
        ns.reconcile(&cfg, &state, &status, &[]),
        "printed more than 4096 bytes ([routing] max_output_bytes)",
    );
    assert_eq!(ns.routes(100).len(), 400);
}

/// Figures (printed, not asserted): one connect's announce, and a reconcile writing 1,000
/// routes into an empty table in one batch, then deleting them.
#[test]
fn figures_announce_and_sync_of_1000() {
    let ns = Netns::new();
    let (d, cfg, state) = setup(&config(""));
    let mut ms = Vec::new();
    for i in 0..20u64 {
        let o = ok(ns.hook(
            &cfg,
            &state,
            "client-connect",
            &env(
                &format!("client{i}"),
                &format!("10.134.9.{}", i + 2),
                1_000 + i,
            ),
        ));
        let text = stderr(&o);
        let at = text.find("in table 100 (").expect("route line");
        let rest = &text[at + "in table 100 (".len()..];
        ms.push(rest[..rest.find(" ms)").unwrap()].parse::<f64>().unwrap());
    }
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "announce (one ip -batch, fork+exec included): median {:.2} ms, min {:.2}, max {:.2} (n=20)",
        ms[10], ms[0], ms[19]
    );
    let status = d.path().join("status.log");
    let rows: Vec<(String, String, u64)> = (0..1000u64)
        .map(|i| {
            (
                format!("client{}", 100 + i),
                format!("10.134.{}.{}", 20 + i / 200, 2 + i % 200),
                1_000,
            )
        })
        .collect();
    write_status(&status, now(), &rows);
    let o = ok(ns.reconcile(&cfg, &state, &status, &[]));
    let line = |o: &Output| {
        out(o)
            .lines()
            .find(|l| l.contains("table 100:"))
            .unwrap_or_default()
            .to_owned()
    };
    eprintln!(
        "sync, 1,000 to add and the 20 announced above to delete: {}",
        line(&o)
    );
    assert_eq!(ns.routes(100).len(), 1000);
    write_status(&status, now(), &[]);
    let o = ok(ns.reconcile(&cfg, &state, &status, &[]));
    eprintln!("sync, 1,000 to delete: {}", line(&o));
    assert_eq!(ns.routes(100).len(), 0);
}
