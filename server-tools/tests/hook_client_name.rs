//! The client's host name (OAR `idhalclientname` and `idhalclientnamecheck`) with the real
//! binary: PTRs served by a real Knot on 127.0.0.1 (confirmed, unconfirmed, hostile, missing),
//! a UDP socket on 127.0.0.1 that never answers, the synchronous hook and the worker's batches,
//! the properties read back from a real OAR. Every lookup goes to a 127.0.0.1 resolver
//! (`[client_name] resolver`): nothing is sent anywhere else. The hostile cases one by one, with
//! their exact reasons, are client_name/against_dns.rs's.

mod hook_support;

use hook_support::*;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::UdpSocket;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

fn oar() -> Option<&'static Oar> {
    static OAR: OnceLock<Option<Oar>> = OnceLock::new();
    OAR.get_or_init(|| Oar::available().then(Oar::start))
        .as_ref()
}

/// The longest name DNS allows (253 characters), in lab.test.
fn longest() -> String {
    format!(
        "{}.{}.{}.{}.lab.test",
        "x".repeat(63),
        "y".repeat(63),
        "z".repeat(63),
        "w".repeat(52)
    )
}

fn knot() -> Option<&'static Knot> {
    static KNOT: OnceLock<Option<Knot>> = OnceLock::new();
    KNOT.get_or_init(|| {
        if !Knot::available() {
            return None;
        }
        let mut fwd = empty_zone("lab.test");
        fwd.push_str(&format!(
            "desk1 A 192.0.2.10\ndesk2 A 192.0.2.99\n{}. A 192.0.2.25\n",
            longest()
        ));
        let mut rev = empty_zone("2.0.192.in-addr.arpa");
        rev.push_str(&format!(
            "10 PTR desk1.lab.test.\n11 PTR desk2.lab.test.\n20 PTR bad\\032name.lab.test.\n\
             25 PTR {}.\n",
            longest()
        ));
        Some(Knot::start(&[
            ("lab.test", fwd),
            ("2.0.192.in-addr.arpa", rev),
        ]))
    })
    .as_ref()
}

fn config(resolver: &str, extra: &str, scheduler: &str) -> String {
    format!(
        "[names]\ndomain = \"idhal.test\"\n\
         [client_name]\nlookup = \"ptr\"\nresolver = \"{resolver}\"\n{extra}\n\
         [limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {scheduler}"
    )
}

/// A node connecting from `client` (OpenVPN's trusted_ip).
fn from(cn: &str, vpn_ip: &str, client: &str) -> Vec<(String, String)> {
    let mut env = node_env(cn, vpn_ip, now());
    for (k, v) in &mut env {
        if k == "trusted_ip" {
            *v = client.into();
        }
    }
    env
}

fn prop(r: &serde_json::Value, k: &str) -> String {
    match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        other => panic!("{k} = {other}"),
    }
}

fn names_of(oar: &Oar, host: &str) -> (String, String) {
    let r = oar.host(host);
    assert_eq!(r.len(), 1, "{host}: {r:?}");
    (
        prop(&r[0], "idhalclientname"),
        prop(&r[0], "idhalclientnamecheck"),
    )
}

fn connect(cfg: &Path, state: &Path, env: &[(String, String)]) -> (String, Duration) {
    let t = Instant::now();
    let o = hook(cfg, state, "client-connect", env);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    (stderr(&o), took)
}

#[test]
fn the_client_name_reaches_oar_confirmed_unconfirmed_or_as_the_address() {
    let (Some(oar), Some(knot)) = (oar(), knot()) else {
        return;
    };
    let resolver = format!("127.0.0.1:{}", knot.port);
    let (_d, cfg, state) = setup(&config(&resolver, "", &oar.config_section()));
    for (k, client, name, check, says) in [
        (1, "192.0.2.10", "desk1.lab.test", "confirmed", "client desk1.lab.test (confirmed) in "),
        (
            2,
            "192.0.2.11",
            "desk2.lab.test",
            "unconfirmed",
            "client desk2.lab.test (unconfirmed: its 1 A record(s) do not hold 192.0.2.11) in ",
        ),
        (
            3,
            "192.0.2.20",
            "192.0.2.20",
            "invalid",
            "client 192.0.2.20 (invalid: PTR not a host name: label \"bad name\" holds a character other than a-z 0-9 -) in ",
        ),
        (4, "192.0.2.29", "192.0.2.29", "none", "client 192.0.2.29 (none: NXDOMAIN) in "),
    ] {
        let (log, took) = connect(&cfg, &state, &from(&format!("cn61-{k}"), &format!("10.134.61.{k}"), client));
        eprintln!(
            "connect from {client}: {:.0} ms: {}",
            took.as_secs_f64() * 1e3,
            log.trim()
        );
        assert!(log.contains(says), "{log}");
        assert_eq!(
            names_of(oar, &format!("vnode-61-{k}.idhal.test")),
            (name.to_string(), check.to_string())
        );
    }
    // The longest host name fits OAR's VARCHAR(255) whole.
    connect(&cfg, &state, &from("cn61-5", "10.134.61.5", "192.0.2.25"));
    assert_eq!(
        names_of(oar, "vnode-61-5.idhal.test"),
        (longest(), "confirmed".to_string())
    );
    // A second node on the same desktop: from the cache, no query.
    let (log, _) = connect(&cfg, &state, &from("cn61-6", "10.134.61.6", "192.0.2.10"));
    assert!(
        log.contains("client desk1.lab.test (confirmed: cached) in "),
        "{log}"
    );
    assert_eq!(
        names_of(oar, "vnode-61-6.idhal.test"),
        ("desk1.lab.test".to_string(), "confirmed".to_string())
    );
    // Lookups off (the default): the address, and the check says so.
    let (_d2, cfg_off, state_off) = setup(&format!(
        "[names]\ndomain = \"idhal.test\"\n[limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n{}",
        oar.config_section()
    ));
    let (log, _) = connect(
        &cfg_off,
        &state_off,
        &from("cn61-7", "10.134.61.7", "192.0.2.10"),
    );
    assert!(!log.contains("client "), "{log}");
    assert_eq!(
        names_of(oar, "vnode-61-7.idhal.test"),
        ("192.0.2.10".to_string(), "off".to_string())
    );
    assert!(!idhal_cache(&state_off).exists());
}

fn idhal_cache(state: &Path) -> std::path::PathBuf {
    state.join("client-names")
}

/// The median of `runs` runs of `f`, in ms.
fn median_ms(runs: usize, mut f: impl FnMut() -> Duration) -> f64 {
    let mut t: Vec<f64> = (0..runs).map(|_| f().as_secs_f64() * 1e3).collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// What a lookup adds to a synchronous connect hook, with nothing else to do (no scheduler, no
/// DNS updates): figures, printed; the only assertion is that a silent resolver does not hold
/// the hook past a generous bound.
#[test]
fn hook_time_with_and_without_lookups() {
    let Some(knot) = knot() else { return };
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let none = "[scheduler]\nbackend = \"none\"\n";
    let knot_at = format!("127.0.0.1:{}", knot.port);
    let silent_at = silent.local_addr().unwrap().to_string();
    let (_a, off, off_state) = setup(&format!("[names]\ndomain = \"idhal.test\"\n{none}"));
    let (_b, ptr, ptr_state) = setup(&config(&knot_at, "", none));
    let (_c, mute, mute_state) = setup(&config(&silent_at, "timeout_ms = 300", none));
    let env = from("cn62-1", "10.134.62.1", "192.0.2.10");
    let run = |cfg: &Path, state: &Path, forget: bool| {
        if forget {
            let _ = std::fs::remove_file(idhal_cache(state));
        }
        connect(cfg, state, &env).1
    };
    let off_ms = median_ms(5, || run(&off, &off_state, false));
    let miss_ms = median_ms(5, || run(&ptr, &ptr_state, true));
    let hit_ms = median_ms(5, || run(&ptr, &ptr_state, false));
    let (log, timeout) = connect(&mute, &mute_state, &env);
    assert!(
        log.contains(&format!(
            "client 192.0.2.10 (timeout: no answer from {silent_at} in time) in "
        )),
        "{log}"
    );
    let (log, cached_timeout) = connect(&mute, &mute_state, &env);
    assert!(
        log.contains("client 192.0.2.10 (timeout: cached) in "),
        "{log}"
    );
    eprintln!(
        "sync client-connect hook, no scheduler (median of 5): lookup off {off_ms:.1} ms; \
         PTR + forward from Knot {miss_ms:.1} ms; from the cache {hit_ms:.1} ms; \
         silent resolver (timeout_ms = 300) {:.0} ms, then cached {:.1} ms",
        timeout.as_secs_f64() * 1e3,
        cached_timeout.as_secs_f64() * 1e3
    );
    // Not a timing assertion: hickory's own timeout is 5 s a query; under it, timeout_ms held.
    assert!(
        timeout < HICKORY_DEFAULT - Duration::from_secs(1),
        "{timeout:?}"
    );
}

/// Hickory's own query timeout when none is given: a bound below it proves ours was used.
const HICKORY_DEFAULT: Duration = Duration::from_secs(5);

/// The worker's batch: twenty clients from twenty addresses whose resolver never answers cost
/// one timeout together (300 ms), not twenty one after the other (6 s), and every node is
/// accepted with its address as its name.
#[test]
fn the_worker_looks_up_a_batch_together() {
    let Some(oar) = oar() else { return };
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_at = silent.local_addr().unwrap().to_string();
    let s = setup_with(&config(
        &silent_at,
        "timeout_ms = 300",
        &format!(
            "[hook]\nworkers = 1\nmax_batch = 20\nbatch_window_ms = 20000\n{}",
            oar.config_section()
        ),
    ));
    let w = worker(&s);
    let nodes: Vec<(String, Vec<(String, String)>)> = (1..=20u8)
        .map(|k| {
            (
                format!("vnode-63-{k}"),
                from(
                    &format!("cn63-{k}"),
                    &format!("10.134.63.{k}"),
                    &format!("198.51.100.{k}"),
                ),
            )
        })
        .collect();
    let results: Vec<std::path::PathBuf> = std::thread::scope(|sc| {
        let runs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(k, (_, env))| {
                let s = &s;
                sc.spawn(move || {
                    let f = files(s, &format!("b{k}"));
                    let o = hook(&s.cfg, &s.state, "client-connect", &with_files(env, &f));
                    assert!(
                        o.status.success() && stderr(&o).contains("handed to the worker"),
                        "{}",
                        stderr(&o)
                    );
                    f.1
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    for r in &results {
        verdict(r, "1\n", &w);
    }
    let log = w.log();
    let line = log
        .lines()
        .find(|l| l.contains("batch of 20:"))
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("{line}");
    let took: f64 = line
        .split("client names: 20 looked up in ")
        .nth(1)
        .and_then(|r| r.strip_suffix(" s"))
        .unwrap_or_else(|| panic!("{line}"))
        .parse()
        .unwrap();
    // One after the other they would take 6 s, and hickory's own timeout is 5 s: under 4 s
    // proves both timeout_ms and the lookups side by side.
    assert!(took < 4.0, "{line}");
    for (k, (label, _)) in nodes.iter().enumerate() {
        assert_eq!(
            names_of(oar, &format!("{label}.idhal.test")),
            (format!("198.51.100.{}", k + 1), "timeout".to_string())
        );
    }
}

/// A connect with little time left: the sync hook after a hand-off the worker refused late
/// (7.5 s of a 10 s budget gone), `timeout_ms` at the most allowed (a quarter of the budget,
/// 2.5 s), a resolver that never answers. The lookup takes at most a quarter of what is left,
/// so OAR still registers the node, its address as its name; without that reserve the lookup
/// took all that was left and the connect was refused (`on_failure = "refuse"`).
#[test]
fn a_late_connect_keeps_its_time_for_the_scheduler() {
    let Some(oar) = oar() else { return };
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_at = silent.local_addr().unwrap().to_string();
    let s = setup_with(&format!(
        "[names]\ndomain = \"idhal.test\"\n\
         [client_name]\nlookup = \"ptr\"\nresolver = \"{silent_at}\"\ntimeout_ms = 2500\n\
         [limits]\nhook_budget_ms = 10000\n\
         [hook]\nhandoff_timeout_ms = 9500\n{}",
        oar.config_section()
    ));
    // A worker that reads the hand-off and answers "busy" only after 7.5 s.
    std::fs::create_dir_all(s.socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&s.socket).unwrap();
    let stalled = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        std::thread::sleep(Duration::from_millis(7_500));
        let _ = c.write_all(b"busy\n");
    });
    let env = with_files(
        &from("cn64-1", "10.134.64.1", "192.0.2.77"),
        &files(&s, "late"),
    );
    let t = Instant::now();
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    let took = t.elapsed();
    stalled.join().unwrap();
    let log = stderr(&o);
    eprintln!("{:.2} s in all: {}", took.as_secs_f64(), log.trim());
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("worker not reached") && log.contains("doing it synchronously"),
        "{log}"
    );
    let says = format!(
        "client 192.0.2.77 (timeout: no answer from {silent_at} in time; not cached: cut to "
    );
    let share: u64 = log
        .split(&says)
        .nth(1)
        .and_then(|r| r.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    eprintln!("the lookup was given {share} ms of the ~2500 ms left (timeout_ms = 2500)");
    assert!(share <= 2_500 / 4, "{log}");
    assert_eq!(
        names_of(oar, "vnode-64-1.idhal.test"),
        ("192.0.2.77".to_string(), "timeout".to_string())
    );
    assert!(!idhal_cache(&s.state).exists());
}

/// Hooks writing the cache file at once (sixteen processes, each its own address): each
/// rewrites it whole and atomically, so it always parses; the last writer's merge may miss
/// another's new entries, which are then asked again (it is a cache).
#[test]
fn hooks_writing_the_cache_at_once_leave_a_file_that_parses() {
    let Some(knot) = knot() else { return };
    let none = "[scheduler]\nbackend = \"none\"\n";
    let (_d, cfg, state) = setup(&config(&format!("127.0.0.1:{}", knot.port), "", none));
    let expected = |ip: &str| -> (String, &'static str) {
        match ip {
            "192.0.2.10" => ("desk1.lab.test".into(), "confirmed"),
            "192.0.2.11" => ("desk2.lab.test".into(), "unconfirmed"),
            "192.0.2.20" => (ip.into(), "invalid"),
            "192.0.2.25" => (longest(), "confirmed"),
            _ => (ip.into(), "none"),
        }
    };
    let clients: Vec<String> = ["192.0.2.10", "192.0.2.11", "192.0.2.20", "192.0.2.25"]
        .into_iter()
        .map(String::from)
        .chain((40..52).map(|i| format!("192.0.2.{i}")))
        .collect();
    let envs: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(k, c)| from(&format!("cn65-{k}"), &format!("10.134.65.{}", k + 1), c))
        .collect();
    std::thread::scope(|sc| {
        for env in &envs {
            let (cfg, state) = (&cfg, &state);
            sc.spawn(move || connect(cfg, state, env));
        }
    });
    let text = std::fs::read_to_string(idhal_cache(&state)).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("# idhal client names: ADDRESS EXPIRES CHECK VALUE")
    );
    let mut kept = Vec::new();
    for l in lines {
        let f: Vec<&str> = l.split(' ').collect();
        assert_eq!(f.len(), 4, "{text}");
        f[1].parse::<u64>().unwrap_or_else(|_| panic!("{text}"));
        let (value, check) = expected(f[0]);
        assert_eq!((f[3], f[2]), (value.as_str(), check), "{text}");
        assert!(
            clients.iter().any(|c| c == f[0]) && !kept.contains(&f[0]),
            "{text}"
        );
        kept.push(f[0]);
    }
    let stray: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".idhal-tmp."))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    eprintln!(
        "{} hooks writing the cache at once: the file parses and holds {} of their addresses",
        clients.len(),
        kept.len()
    );
    assert!(!kept.is_empty());
    // What the file holds is served from it.
    for (k, c) in clients.iter().enumerate() {
        if kept.contains(&c.as_str()) {
            let (log, _) = connect(&cfg, &state, &envs[k]);
            assert!(log.contains(": cached) in "), "{c}: {log}");
        }
    }
}
