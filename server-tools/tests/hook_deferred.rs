//! `idhal hook worker` and the deferred hand-off, with the real binary: the hook writes `2` and
//! hands off, the worker writes `1`/`0`; hostile requests on the worker's socket (huge, empty,
//! malformed, slow, concurrent, naming files outside OpenVPN's tmp-dir) change nothing and never
//! stop it. The first tests have no scheduler (`backend = "none"`); the batch tests at the end
//! run against a real OAR (the OpenVPN path is hook_deferred_openvpn.rs).

mod hook_support;

use hook_support::*;
use idhal_test_support::wait_for;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

const CONFIG: &str = "[scheduler]\nbackend = \"none\"\n\
    [hook]\nrequest_timeout_ms = 500\nmax_request_bytes = 4096\nworkers = 4\n";

/// One raw request on the worker's socket, and its answer.
fn raw(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // The worker may answer (and close) before taking everything: that is its right.
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    answer
}

fn request(env: &[(&str, &str)], c: &Path, r: &Path) -> Vec<u8> {
    let env: serde_json::Map<String, serde_json::Value> = env
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let mut line = serde_json::to_vec(&serde_json::json!({
        "event": "client-connect", "env": env, "config_file": c, "deferred_file": r,
    }))
    .unwrap();
    line.push(b'\n');
    line
}

#[test]
fn the_hook_hands_off_and_the_worker_answers() {
    let s = setup_with(CONFIG);
    let w = worker(&s);
    // The socket is the worker's own: 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        (mode(&s.socket), mode(s.socket.parent().unwrap())),
        (0o600, 0o700)
    );

    let f = files(&s, "a1");
    let env = with_files(&node_env("client501", "10.134.5.1", now()), &f);
    let t = std::time::Instant::now();
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    // A figure, not an assertion: the whole process run, checks, hand-off and exit.
    eprintln!(
        "idhal hook client-connect (deferred) returned in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o)
            .contains("client501 → vnode-5-1.idhal.internal (10.134.5.1): handed to the worker"),
        "{}",
        stderr(&o)
    );
    verdict(&f.1, "1\n", &w);
    // A node certified outside idhal's CA (no record): OpenVPN's address, nothing pushed.
    assert_eq!(read(&f.0), "");

    // The worker re-checks what it is handed: a hostile CN gets 0.
    let f = files(&s, "a2");
    let answer = raw(
        &s.socket,
        &request(
            &[
                ("common_name", "x' OR '1'='1"),
                ("ifconfig_pool_remote_ip", "10.134.5.2"),
                ("trusted_ip", "127.0.0.1"),
            ],
            &f.0,
            &f.1,
        ),
    );
    assert_eq!(answer, "queued\n");
    verdict(&f.1, "0\n", &w);
    wait_for("the refusal is logged", Duration::from_secs(10), || {
        w.log()
            .contains("client-connect: REFUSED: OpenVPN variable common_name")
    });

    // A disconnect is handed off too (OpenVPN waits for no verdict); the worker does it.
    let env = node_env("client501", "10.134.5.1", now());
    let o = hook(&s.cfg, &s.state, "client-disconnect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("client-disconnect: client501: handed to the worker"),
        "{}",
        stderr(&o)
    );
    wait_for(
        "the worker did the disconnect",
        Duration::from_secs(30),
        || {
            w.log()
                .contains("idhal hook worker: client-disconnect: client501: vnode-5-1")
        },
    );
    // A session that never came up (no address) is not handed off: nothing to take down.
    let never: Vec<_> = env
        .iter()
        .filter(|(k, _)| k != "ifconfig_pool_remote_ip")
        .cloned()
        .collect();
    let o = hook(&s.cfg, &s.state, "client-disconnect", &never);
    assert!(!stderr(&o).contains("worker"), "{}", stderr(&o));

    // A second worker on the same socket refuses to start.
    let o = Command::new(IDHAL)
        .arg("--config")
        .arg(&s.cfg)
        .arg("--state-dir")
        .arg(&s.state)
        .args(["hook", "worker"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("another worker answers on"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn without_a_worker_the_hook_works_synchronously_and_says_so() {
    let s = setup_with(CONFIG);
    let f = files(&s, "b1");
    let env = with_files(&node_env("client502", "10.134.5.3", now()), &f);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("worker not reached (worker socket") && err.contains("doing it synchronously"),
        "{err}"
    );
    assert!(err.contains("client502 → vnode-5-3"), "{err}");
    // Empty again: with exit 0 that is "accepted" on OpenVPN's synchronous path, never a
    // `2` left with nobody to answer.
    assert_eq!(read(&f.1), "");
    let o = hook(&s.cfg, &s.state, "client-disconnect", &env);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("client-disconnect: worker not reached (worker socket")
            && err.contains("doing it synchronously"),
        "{err}"
    );
    assert!(err.contains("client-disconnect: client502: "), "{err}");

    // sync mode never hands off, even with a worker running.
    let s = setup_with(&format!("{CONFIG}mode = \"sync\"\n"));
    let _w = worker(&s);
    let f = files(&s, "b2");
    let env = with_files(&node_env("client503", "10.134.5.4", now()), &f);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("worker"), "{}", stderr(&o));
    assert_eq!(read(&f.1), "");
    let o = hook(&s.cfg, &s.state, "client-disconnect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("worker"), "{}", stderr(&o));
}

/// A worker that got the whole request and did not answer in time may have queued it: the
/// hook must leave it there (`2` stays, exit 0) and not register the node itself too. A worker
/// that declines has not queued it: the hook does the work.
#[test]
fn a_whole_request_left_unanswered_stays_with_the_worker_a_declined_one_does_not() {
    use std::os::unix::net::UnixListener;
    let s = setup_with(&format!("{CONFIG}handoff_timeout_ms = 300\n"));
    std::fs::create_dir_all(s.socket.parent().unwrap()).unwrap();
    let listener = UnixListener::bind(&s.socket).unwrap();
    // A stand-in worker: reads each request whole, then answers per the script below.
    let (tx, rx) = std::sync::mpsc::channel::<(String, Option<&'static str>)>();
    let answers: std::sync::Arc<std::sync::Mutex<Vec<Option<&'static str>>>> =
        std::sync::Arc::new(std::sync::Mutex::new(vec![None, Some("busy: test")]));
    let script = answers.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while stream.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            let answer = script.lock().unwrap().remove(0);
            match answer {
                // Silent past the hook's timeout, holding the connection open.
                None => std::thread::sleep(Duration::from_secs(2)),
                Some(a) => {
                    let _ = writeln!(stream, "{a}");
                }
            }
            let _ = tx.send((String::from_utf8_lossy(&line).into_owned(), answer));
        }
    });

    let f = files(&s, "u1");
    let env = with_files(&node_env("client520", "10.134.5.20", now()), &f);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("no answer to the whole request") && err.contains("left to the worker"),
        "{err}"
    );
    assert!(!err.contains("synchronously"), "{err}");
    assert!(
        !err.contains("connected"),
        "registered in the hook too: {err}"
    );
    assert_eq!(
        read(&f.1).trim_end(),
        "2",
        "the deferral must stay for the worker"
    );
    let (got, _) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(got.contains("client520"), "{got}");

    let f = files(&s, "u2");
    let env = with_files(&node_env("client521", "10.134.5.21", now()), &f);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("said: busy: test") && err.contains("doing it synchronously"),
        "{err}"
    );
    assert_eq!(read(&f.1), "", "declined: the hook answered itself");
    assert!(answers.lock().unwrap().is_empty());
}

#[test]
fn hostile_requests_change_nothing_and_the_worker_carries_on() {
    let s = setup_with(CONFIG);
    let w = worker(&s);
    let good = |n: &str| {
        let f = files(&s, n);
        let req = request(
            &[
                ("common_name", "client504"),
                ("ifconfig_pool_remote_ip", "10.134.5.5"),
                ("trusted_ip", "127.0.0.1"),
            ],
            &f.0,
            &f.1,
        );
        (f, req)
    };
    let (f, req) = good("c0");

    // Huge: cut at max_request_bytes.
    let mut huge = req.clone();
    huge.splice(0..0, std::iter::repeat_n(b' ', 1 << 20));
    assert_eq!(raw(&s.socket, &huge), "refused: over 4096 bytes\n");
    // Empty: no answer, nothing done.
    assert_eq!(raw(&s.socket, b""), "");
    // Malformed.
    for (bad, says) in [
        (&b"hello\n"[..], "refused: not a hand-off request"),
        (
            b"{}\n",
            "refused: not a hand-off request: missing field `event`",
        ),
        (
            b"{\"event\":\"client-connect\"}\n",
            "refused: not a hand-off request: missing field `env`",
        ),
        (
            b"{\"event\":\"learn-address\",\"env\":{}}\n",
            "refused: not a hand-off request: unknown variant `learn-address`",
        ),
        // A disconnect carries no files: one that names some is not one the hook sends.
        (
            b"{\"event\":\"client-disconnect\",\"env\":{},\"deferred_file\":\"/etc/passwd\"}\n",
            "refused: not a hand-off request: unknown field `deferred_file`",
        ),
        (b"\xff\xfe\n", "refused: not a hand-off request"),
        (&req[..req.len() - 1], "refused: no end of line"),
        (
            &[&req[..], &req[..]].concat()[..],
            "refused: more than one line",
        ),
    ] {
        let a = raw(&s.socket, bad);
        assert!(
            a.starts_with(says),
            "{:?}: {a:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let smuggled = request(&[("LD_PRELOAD", "/x.so")], &f.0, &f.1);
    assert_eq!(
        raw(&s.socket, &smuggled),
        "refused: variable \"LD_PRELOAD\" is not one a hand-off carries\n"
    );
    let disconnect = |env: serde_json::Value| {
        let mut line =
            serde_json::to_vec(&serde_json::json!({"event": "client-disconnect", "env": env}))
                .unwrap();
        line.push(b'\n');
        raw(&s.socket, &line)
    };
    assert_eq!(
        disconnect(serde_json::json!({"LD_PRELOAD": "/x.so"})),
        "refused: variable \"LD_PRELOAD\" is not one a hand-off carries\n"
    );
    assert_eq!(
        disconnect(serde_json::json!({"common_name": "a".repeat(300)})),
        "refused: common_name is over 256 bytes\n"
    );
    // Queued, then refused by the same checks as the synchronous hook: nothing taken down.
    assert_eq!(
        disconnect(
            serde_json::json!({"common_name": "x' OR '1'='1", "ifconfig_pool_remote_ip": "10.134.5.5"})
        ),
        "queued\n"
    );
    wait_for(
        "the hostile disconnect is refused",
        Duration::from_secs(30),
        || {
            w.log()
                .contains("client-disconnect: REFUSED: OpenVPN variable common_name")
        },
    );
    let long = "a".repeat(300);
    let a = raw(
        &s.socket,
        &request(&[("common_name", long.as_str())], &f.0, &f.1),
    );
    assert_eq!(a, "refused: common_name is over 256 bytes\n");

    // Files outside the tmp-dir, a symlink inside it, a name that is not OpenVPN's: refused,
    // and nothing is written anywhere.
    let outside = s.state.parent().unwrap().join("openvpn_ccr_out.tmp");
    std::fs::write(&outside, "keep").unwrap();
    let link = s.tmp.join("openvpn_ccr_link.tmp");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let not_openvpns = s.tmp.join("passwd");
    std::fs::write(&not_openvpns, "keep").unwrap();
    let env = [("common_name", "client504"), ("trusted_ip", "127.0.0.1")];
    for (c, r, says) in [
        (
            &f.0,
            &outside,
            "is not an OpenVPN client-connect deferred result file",
        ),
        (&f.0, &link, "not a regular file"),
        (
            &f.0,
            &not_openvpns,
            "is not an OpenVPN client-connect deferred result file",
        ),
        (
            &outside,
            &f.1,
            "is not an OpenVPN client-connect config file",
        ),
        (&f.0, &s.tmp.join("openvpn_ccr_gone.tmp"), "is gone"),
    ] {
        let a = raw(&s.socket, &request(&env, c, r));
        assert!(a.starts_with("refused: ") && a.contains(says), "{r:?}: {a}");
    }
    assert_eq!(read(&outside), "keep");
    assert_eq!(read(&not_openvpns), "keep");
    assert_eq!(read(&f.1), "");

    // Slow: a writer that stops half-way is cut off after request_timeout_ms, while requests
    // from others are served meanwhile.
    let mut slow = UnixStream::connect(&s.socket).unwrap();
    slow.write_all(&req[..20]).unwrap();
    let (f2, req2) = good("c2");
    assert_eq!(raw(&s.socket, &req2), "queued\n");
    verdict(&f2.1, "1\n", &w);
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    let _ = slow.read_to_string(&mut answer);
    assert_eq!(answer, "refused: not complete within 500 ms\n");

    // Concurrent: 40 hand-offs at once, each gets its verdict.
    let all: Vec<_> = (0..40).map(|i| good(&format!("d{i}"))).collect();
    std::thread::scope(|sc| {
        for (_, req) in &all {
            let socket = &s.socket;
            sc.spawn(move || assert_eq!(raw(socket, req), "queued\n"));
        }
    });
    for (f, _) in &all {
        verdict(&f.1, "1\n", &w);
    }
    // And 20 disconnects at once: each queued, each done.
    let before = w
        .log()
        .matches("client-disconnect: client504: vnode-5-5")
        .count();
    let mut down = serde_json::to_vec(&serde_json::json!({"event": "client-disconnect", "env": {
        "common_name": "client504", "ifconfig_pool_remote_ip": "10.134.5.5", "trusted_ip": "127.0.0.1",
    }}))
    .unwrap();
    down.push(b'\n');
    std::thread::scope(|sc| {
        for _ in 0..20 {
            let (socket, down) = (&s.socket, &down);
            sc.spawn(move || assert_eq!(raw(socket, down), "queued\n"));
        }
    });
    wait_for("20 disconnects done", Duration::from_secs(60), || {
        w.log()
            .matches("client-disconnect: client504: vnode-5-5")
            .count()
            == before + 20
    });
    // Still serving, and it said why it refused each one.
    assert_eq!(raw(&s.socket, &req), "queued\n");
    verdict(&f.1, "1\n", &w);
    assert!(w
        .log()
        .contains("idhal hook worker: request refused: over 4096 bytes"));
}

#[test]
fn a_hand_off_from_another_user_is_refused_even_when_the_socket_is_opened_up() {
    let s = setup_with(CONFIG);
    let w = worker(&s);
    // An admin loosens the socket and its directory: the peer's uid still decides.
    use std::os::unix::fs::PermissionsExt as _;
    let open_up = |p: &Path, mode| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
    };
    for dir in [
        s.state.parent().unwrap(),
        &s.state,
        s.socket.parent().unwrap(),
        &s.tmp,
    ] {
        open_up(dir, 0o755);
    }
    open_up(&s.socket, 0o666);
    let f = files(&s, "nobody");
    let req = request(
        &[
            ("common_name", "client504"),
            ("ifconfig_pool_remote_ip", "10.134.5.5"),
            ("trusted_ip", "127.0.0.1"),
        ],
        &f.0,
        &f.1,
    );
    // The same bytes from user nobody (65534), through a real client process.
    // Perl: in every Debian base system (and OAR's language), readable by nobody.
    // SIGPIPE ignored: the worker refuses before reading, and may close before this client has
    // written its request (a print to a closed socket must not kill it before it reads).
    let send = "$SIG{PIPE} = 'IGNORE'; use IO::Socket::UNIX; \
        my $s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die $!; \
        print $s $ARGV[1]; shutdown($s, 1); local $/; print scalar <$s>;";
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/perl",
            "-e",
            send,
        ])
        .arg(&s.socket)
        .arg(String::from_utf8(req.clone()).unwrap())
        .output()
        .expect("setpriv (util-linux) and perl");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "refused: peer uid 65534 is neither this worker's (0) nor root\n"
    );
    assert_eq!(read(&f.1), "");
    // Root (this test) is still served.
    assert_eq!(raw(&s.socket, &req), "queued\n");
    verdict(&f.1, "1\n", &w);
}

#[test]
fn the_janitor_sweeps_openvpns_leftovers() {
    let s = setup_with(CONFIG);
    let (old_c, old_r) = files(&s, "old1");
    let (new_c, _) = files(&s, "new1");
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for p in [&old_c, &old_r] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    let w = worker(&s);
    wait_for("the old files are gone", Duration::from_secs(30), || {
        !old_c.exists() && !old_r.exists()
    });
    assert!(new_c.exists());
    assert!(
        w.log()
            .contains("janitor: removed 2 stale client-connect file(s)"),
        "{}",
        w.log()
    );
}

/// SIGTERM: the socket goes at once (new hooks work synchronously), and the hand-off the worker
/// holds is still answered before it exits. The registration here is a DNS update to a port
/// where nothing listens: it fails after `dns_timeout_ms`, so the verdict is `0`.
#[test]
fn a_stopped_worker_answers_what_it_holds_first() {
    let dns_port = idhal_test_support::free_port();
    let s = setup_with(CONFIG);
    let key = s.state.parent().unwrap().join("tsig.key");
    std::fs::write(
        &key,
        format!("key \"idhal-update\" {{ algorithm hmac-sha256; secret \"{TSIG_SECRET}\"; }};\n"),
    )
    .unwrap();
    let mut toml = std::fs::read_to_string(&s.cfg).unwrap();
    toml.push_str(&format!(
        "[dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{dns_port}\"\ntsig_key_file = \"{}\"\n\
         [limits]\ndns_timeout_ms = 4000\n",
        key.display()
    ));
    std::fs::write(&s.cfg, toml).unwrap();
    let log = s.state.parent().unwrap().join("stopping-worker.log");
    let mut child = Command::new(IDHAL)
        .arg("--config")
        .arg(&s.cfg)
        .arg("--state-dir")
        .arg(&s.state)
        .args(["hook", "worker"])
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let reaper = Reaper::new(&s.state.parent().unwrap().join("nothing-to-remove"));
    reaper.watch(child.id());
    wait_for("the worker listens", Duration::from_secs(30), || {
        read(&log).contains("listening on")
    });
    let f = files(&s, "e1");
    let env = with_files(&node_env("client505", "10.134.5.6", now()), &f);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    assert!(
        stderr(&o).contains("handed to the worker"),
        "{}",
        stderr(&o)
    );
    signal("TERM", &child.id().to_string());
    wait_for("the socket is gone", Duration::from_secs(10), || {
        !s.socket.exists()
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let said = read(&log);
    assert_eq!(status.code(), Some(0), "{said}");
    assert_eq!(read(&f.1), "0\n", "{said}");
    assert!(
        said.contains("stopping: socket removed, finishing 1 queued hand-off(s)")
            && said.contains("stopped (0 hand-off(s) left unanswered)"),
        "{said}"
    );
    // The next hook finds no worker and works itself.
    let f = files(&s, "e2");
    let o = hook(
        &s.cfg,
        &s.state,
        "client-connect",
        &with_files(&node_env("client506", "10.134.5.7", now()), &f),
    );
    assert!(stderr(&o).contains("worker not reached"), "{}", stderr(&o));
}

// ---- Batches: the worker registers the connects that arrive together with one `nodes_up`,
// against a real OAR (its tools behind wrappers that log each call, and can refuse or hold
// one host). Tests keep apart by domain and third octet.

fn oar() -> Option<&'static Oar> {
    static OAR: std::sync::OnceLock<Option<Oar>> = std::sync::OnceLock::new();
    OAR.get_or_init(|| Oar::available().then(Oar::start))
        .as_ref()
}

/// OAR's tools behind logging wrappers; `oarnodesetting` exits 1 for `refuse`, and for
/// `hold` touches `started` and waits for `gate` before doing the real call.
struct Wrapped {
    section: String,
    log: PathBuf,
    started: PathBuf,
    gate: PathBuf,
}

fn wrapped(oar: &Oar, dir: &Path, refuse: Option<&str>, hold: Option<&str>) -> Wrapped {
    use std::os::unix::fs::PermissionsExt as _;
    let (section, log) = oar.logged_config_section(dir);
    let (started, gate) = (dir.join("held.started"), dir.join("held.gate"));
    let mut script = format!(
        "#!/bin/sh\nprintf '%s\\n' \"oarnodesetting $*\" >> '{}'\n",
        log.display()
    );
    if let Some(h) = refuse {
        script.push_str(&format!(
            "case \" $* \" in *\" -h {h} \"*) echo 'refused by the test' >&2; exit 1;; esac\n"
        ));
    }
    if let Some(h) = hold {
        script.push_str(&format!(
            "case \" $* \" in *\" -h {h} \"*) touch '{}'; while [ ! -e '{}' ]; do sleep 0.05; done;; esac\n",
            started.display(),
            gate.display()
        ));
    }
    script.push_str(&format!("exec {OARDIR}/oarnodesetting \"$@\"\n"));
    let w = dir.join("oarnodesetting");
    std::fs::write(&w, script).unwrap();
    std::fs::set_permissions(&w, std::fs::Permissions::from_mode(0o755)).unwrap();
    Wrapped {
        section,
        log,
        started,
        gate,
    }
}

/// A worker that gathers up to `n` connects per batch (the window is long: the batch closes
/// when `n` are in), generous limits (2 cores, many Perl start-ups at once).
fn batch_config(domain: &str, n: usize, oar_section: &str) -> String {
    format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [hook]\nworkers = 2\nmax_batch = {n}\nbatch_window_ms = 20000\n\
         [limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {oar_section}"
    )
}

/// `n` nodes `client{octet}{k}` at 10.134.OCTET.k, one session each.
fn batch_nodes(octet: u8, n: u8, since: u64) -> Vec<(String, Vec<(String, String)>)> {
    (1..=n)
        .map(|k| {
            let cn = format!("client{octet}{k:02}");
            let env = node_env(&cn, &format!("10.134.{octet}.{k}"), since);
            (format!("vnode-{octet}-{k}"), env)
        })
        .collect()
}

/// Runs every node's client-connect hook at once (deferred: each hands off and returns);
/// returns each node's result file.
fn connect_all(s: &Setup, nodes: &[(String, Vec<(String, String)>)], tag: &str) -> Vec<PathBuf> {
    let handed: Vec<(PathBuf, std::process::Output)> = std::thread::scope(|sc| {
        let runs: Vec<_> = nodes
            .iter()
            .enumerate()
            .map(|(k, (_, env))| {
                sc.spawn(move || {
                    let f = files(s, &format!("{tag}{k}"));
                    let o = hook(&s.cfg, &s.state, "client-connect", &with_files(env, &f));
                    (f.1, o)
                })
            })
            .collect();
        runs.into_iter().map(|r| r.join().unwrap()).collect()
    });
    handed
        .into_iter()
        .map(|(r, o)| {
            assert!(
                o.status.success() && stderr(&o).contains("handed to the worker"),
                "{}",
                stderr(&o)
            );
            r
        })
        .collect()
}

fn oar_prop(r: &serde_json::Value, k: &str) -> String {
    match &r[k] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        other => format!("{other}"),
    }
}

fn count(calls: &[String], tool: &str) -> usize {
    calls
        .iter()
        .filter(|c| c.starts_with(&format!("{tool} ")))
        .count()
}

#[test]
fn twenty_hand_offs_are_registered_in_one_batch() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let w = wrapped(oar, d.path(), None, None);
    let domain = "batch.test";
    let s = setup_with(&batch_config(domain, 20, &w.section));
    let wk = worker(&s);
    let since = now() - 100;
    let nodes = batch_nodes(41, 20, since);
    let t = std::time::Instant::now();
    for r in connect_all(&s, &nodes, "n") {
        verdict(&r, "1\n", &wk);
    }
    eprintln!(
        "20 new nodes through the worker: {:.2} s from the hand-offs to the last verdict",
        t.elapsed().as_secs_f64()
    );
    for (label, env) in &nodes {
        let r = oar.host(&format!("{label}.{domain}"));
        assert_eq!(r.len(), 1, "{label}: {r:?}");
        let cn = &env[0].1;
        let ip = &env[2].1;
        assert_eq!(
            [
                oar_prop(&r[0], "state"),
                oar_prop(&r[0], "idhalcn"),
                oar_prop(&r[0], "ip"),
                oar_prop(&r[0], "idhalclientname"),
                oar_prop(&r[0], "idhalconnectedsince"),
            ],
            [
                "Alive".to_string(),
                cn.clone(),
                ip.clone(),
                "127.0.0.1".to_string(),
                since.to_string()
            ]
        );
    }
    // One by one, each node costs a read, an `-a` and at least one read-back (60 calls); a
    // batch reads all 20 in one call and reads them back together.
    let calls = idhal_test_support::oar::logged_calls(&w.log);
    let (reads, sets) = (count(&calls, "oarnodes"), count(&calls, "oarnodesetting"));
    eprintln!("new nodes: {reads} oarnodes, {sets} oarnodesetting calls for 20 nodes");
    assert!(reads < 20 && reads + sets < 40, "{calls:#?}");
    assert!(
        wk.log().contains("batch of 20: 20 registered together"),
        "{}",
        wk.log()
    );

    // OAR took them all down (an admin, or a lost state): the same sessions handed off again
    // are made Alive in ONE oarnodesetting call (properties are already right).
    let mut down = Command::new(format!("{OARDIR}/oarnodesetting"));
    down.envs(oar.env()).args(["-n", "-s", "Absent"]);
    for (label, _) in &nodes {
        down.args(["-h", &format!("{label}.{domain}")]);
    }
    assert!(down.output().unwrap().status.success());
    wait_for("OAR applied Absent", Duration::from_secs(60), || {
        oar.resources(Some("network_address LIKE 'vnode-41-%'"))
            .iter()
            .all(|r| oar_prop(r, "state") == "Absent")
    });
    std::fs::write(&w.log, "").unwrap();
    for r in connect_all(&s, &nodes, "again") {
        verdict(&r, "1\n", &wk);
    }
    let calls = idhal_test_support::oar::logged_calls(&w.log);
    let sets = count(&calls, "oarnodesetting");
    eprintln!("Absent again: {sets} oarnodesetting calls for 20 nodes");
    assert!(sets < 20, "{calls:#?}");
    let r = oar.resources(Some("network_address LIKE 'vnode-41-%'"));
    assert_eq!(r.len(), 20);
    assert!(r.iter().all(|r| oar_prop(r, "state") == "Alive"), "{r:?}");

    // All 20 disconnect at once: each hook hands off and returns; the worker takes them down
    // together, in ONE oarnodesetting call (one by one: 20, each after its own read).
    std::fs::write(&w.log, "").unwrap();
    std::thread::scope(|sc| {
        for (_, env) in &nodes {
            let s = &s;
            sc.spawn(move || {
                let o = hook(&s.cfg, &s.state, "client-disconnect", env);
                assert!(
                    o.status.success() && stderr(&o).contains("handed to the worker"),
                    "{}",
                    stderr(&o)
                );
            });
        }
    });
    wait_for(
        "the worker took the 20 down",
        Duration::from_secs(120),
        || wk.log().contains("disconnects: batch of 20: 20 done"),
    );
    let r = oar.resources(Some("network_address LIKE 'vnode-41-%'"));
    assert!(r.iter().all(|r| oar_prop(r, "state") == "Absent"), "{r:?}");
    let calls = idhal_test_support::oar::logged_calls(&w.log);
    let (reads, sets) = (count(&calls, "oarnodes"), count(&calls, "oarnodesetting"));
    eprintln!("disconnects: {reads} oarnodes, {sets} oarnodesetting calls for 20 nodes");
    assert_eq!(sets, 1, "{calls:#?}");
    assert!(reads < 10, "{calls:#?}");
}

#[test]
fn a_node_oar_refuses_gets_0_and_the_rest_of_its_batch_1() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let domain = "batchrefuse.test";
    let refused = format!("vnode-42-3.{domain}");
    let w = wrapped(oar, d.path(), Some(&refused), None);
    let s = setup_with(&batch_config(domain, 5, &w.section));
    let wk = worker(&s);
    let nodes = batch_nodes(42, 5, now() - 100);
    let results = connect_all(&s, &nodes, "r");
    for (k, r) in results.iter().enumerate() {
        verdict(r, if k == 2 { "0\n" } else { "1\n" }, &wk);
    }
    assert!(oar.host(&refused).is_empty());
    for (label, _) in nodes.iter().filter(|(l, _)| l != "vnode-42-3") {
        let r = oar.host(&format!("{label}.{domain}"));
        assert_eq!(oar_prop(&r[0], "state"), "Alive", "{label}");
    }
    let log = wk.log();
    assert!(log.contains("batch of 5: 5 registered together"), "{log}");
    assert!(
        log.contains(&format!("registering {refused}")) && log.contains("refused by the test"),
        "{log}"
    );
}

#[test]
fn a_disconnect_during_its_batch_leaves_the_node_absent() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let domain = "batchdown.test";
    let held = format!("vnode-43-2.{domain}");
    let w = wrapped(oar, d.path(), None, Some(&held));
    let s = setup_with(&batch_config(domain, 4, &w.section));
    let wk = worker(&s);
    let nodes = batch_nodes(43, 4, now() - 100);
    let batch = std::thread::scope(|sc| {
        let batch = sc.spawn(|| connect_all(&s, &nodes, "d"));
        wait_for(
            "the batch is inside OAR for the held node",
            Duration::from_secs(120),
            || w.started.exists(),
        );
        // OpenVPN's disconnect of that node's session, while the batch holds its lock: the
        // hook hands it off and returns (OpenVPN serves nobody while it runs) with OAR still
        // held; done here, it would wait for the lock until lock_wait_ms and fail.
        let o = hook(&s.cfg, &s.state, "client-disconnect", &nodes[1].1);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("client4302: handed to the worker"),
            "{}",
            stderr(&o)
        );
        std::fs::write(&w.gate, "").unwrap();
        batch.join().unwrap()
    });
    // The worker takes the node down after the batch that holds its lock.
    wait_for("the disconnect is done", Duration::from_secs(120), || {
        wk.log()
            .contains("idhal hook worker: client-disconnect: client4302: vnode-43-2")
    });
    assert!(
        wk.log()
            .contains("client-disconnect: client4302: vnode-43-2"),
        "{}",
        wk.log()
    );
    assert!(wk.log().contains("OAR Absent"), "{}", wk.log());
    for r in &batch {
        verdict(r, "1\n", &wk);
    }
    // Batch, then disconnect: the node ends Absent (with its session's properties).
    let r = oar.host(&held);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(oar_prop(&r[0], "state"), "Absent", "{r:?}");
    assert_eq!(oar_prop(&r[0], "idhalcn"), "client4302");
    for label in ["vnode-43-1", "vnode-43-3", "vnode-43-4"] {
        let r = oar.host(&format!("{label}.{domain}"));
        assert_eq!(oar_prop(&r[0], "state"), "Alive", "{label}");
    }
}

#[test]
fn a_node_twice_in_a_batch_goes_alone_after_it_and_stays_one_resource() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let domain = "batchtwice.test";
    let w = wrapped(oar, d.path(), None, None);
    let s = setup_with(&batch_config(domain, 3, &w.section));
    let wk = worker(&s);
    let since = now() - 100;
    let mut nodes = batch_nodes(44, 2, since);
    // A second session of vnode-44-1 (a reconnect a second later) in the same batch.
    nodes.push((
        "vnode-44-1".into(),
        node_env("client4401", "10.134.44.1", since + 1),
    ));
    for r in connect_all(&s, &nodes, "t") {
        verdict(&r, "1\n", &wk);
    }
    let r = oar.host(&format!("vnode-44-1.{domain}"));
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(oar_prop(&r[0], "state"), "Alive");
    let log = wk.log();
    assert!(
        log.contains("batch of 3: 2 registered together") && log.contains(", 1 alone,"),
        "{log}"
    );
}

/// In the worker a connect has `[hook] deferred_budget_ms` from its hand-off, not the hook's
/// `[limits] hook_budget_ms` (which bounds what OpenVPN itself waits for): an OAR slower than
/// the hook's budget still gets the node registered and accepted.
#[test]
fn a_deferred_connect_has_the_deferred_budget_not_the_hooks() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let domain = "budget.test";
    let w = wrapped(oar, d.path(), None, Some(&format!("vnode-47-1.{domain}")));
    let s = setup_with(&format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [hook]\nworkers = 2\ndeferred_budget_ms = 60000\n\
         [limits]\nhook_budget_ms = 2000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {}",
        w.section
    ));
    let wk = worker(&s);
    let nodes = batch_nodes(47, 1, now() - 10);
    let r = connect_all(&s, &nodes, "budget");
    wait_for("the held oarnodesetting", Duration::from_secs(60), || {
        w.started.exists()
    });
    // Held past the hook's whole budget (2 s) before OAR does the work.
    std::thread::sleep(Duration::from_secs(3));
    std::fs::write(&w.gate, "").unwrap();
    verdict(&r[0], "1\n", &wk);
    assert_eq!(
        oar_prop(&oar.host(&format!("vnode-47-1.{domain}"))[0], "state"),
        "Alive"
    );
}

/// A batch runs until its latest connect's budget ends, and a node registered past its own
/// budget is still accepted (refusing it would leave it Alive for a client sent away, and its
/// retry would do the work again). Here A's registration is held past A's 20 s budget, within
/// B's: both are accepted.
#[test]
fn a_batch_runs_to_its_latest_budget_and_late_nodes_are_still_accepted() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let domain = "late.test";
    let w = wrapped(oar, d.path(), None, Some(&format!("vnode-48-1.{domain}")));
    let s = setup_with(&format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [hook]\nworkers = 1\nmax_batch = 2\nbatch_window_ms = 15000\ndeferred_budget_ms = 20000\n\
         [limits]\nhook_budget_ms = 10000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {}",
        w.section
    ));
    let wk = worker(&s);
    let nodes = batch_nodes(48, 2, now() - 10);
    let a = connect_all(&s, &nodes[..1], "latea");
    let t = std::time::Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    let b = connect_all(&s, &nodes[1..], "lateb");
    wait_for("the held oarnodesetting", Duration::from_secs(60), || {
        w.started.exists()
    });
    // Past A's budget (20 s from its hand-off), well inside B's (28 s).
    std::thread::sleep(Duration::from_secs(22).saturating_sub(t.elapsed()));
    std::fs::write(&w.gate, "").unwrap();
    verdict(&a[0], "1\n", &wk);
    verdict(&b[0], "1\n", &wk);
}

/// `[hook] down_grace_secs`: a disconnect is held for the grace before its take-down, so a node
/// that comes back meanwhile (a failover, a drain: a newer session, here or on another server)
/// is never marked Absent; one that stays gone is, after the grace.
#[test]
fn within_the_down_grace_a_node_that_comes_back_is_never_taken_down() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let w = wrapped(oar, d.path(), None, None);
    let domain = "grace.test";
    let config = format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [hook]\nworkers = 2\nmax_batch = 2\nbatch_window_ms = 200\ndown_grace_secs = 4\n\
         [limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {}",
        w.section
    );
    let s = setup_with(&config);
    let wk = worker(&s);
    let since = now() - 100;
    let nodes = batch_nodes(51, 2, since);
    for r in connect_all(&s, &nodes, "g") {
        verdict(&r, "1\n", &wk);
    }
    for (_, env) in &nodes {
        let o = hook(&s.cfg, &s.state, "client-disconnect", env);
        assert!(
            o.status.success() && stderr(&o).contains("handed to the worker"),
            "{}",
            stderr(&o)
        );
    }
    for cn in ["client5101", "client5102"] {
        wait_for(
            "the worker holds the disconnect",
            Duration::from_secs(30),
            || {
                wk.log().contains(&format!(
                    "client-disconnect: {cn}: left up for [hook] down_grace_secs (4 s)"
                ))
            },
        );
    }
    // Node 1 comes back (a newer session) within the grace; node 2 stays gone.
    let back = node_env("client5101", "10.134.51.1", since + 50);
    let f = files(&s, "back");
    let o = hook(&s.cfg, &s.state, "client-connect", &with_files(&back, &f));
    assert!(o.status.success(), "{}", stderr(&o));
    verdict(&f.1, "1\n", &wk);
    let host = |k: u8| format!("vnode-51-{k}.{domain}");
    wait_for(
        "node 2 taken down after the grace",
        Duration::from_secs(60),
        || {
            oar.host(&host(2))
                .first()
                .is_some_and(|r| oar_prop(r, "state") == "Absent")
        },
    );
    wait_for(
        "both held disconnects worked",
        Duration::from_secs(60),
        || {
            wk.log().contains("disconnects: batch of 2")
                || wk.log().matches("disconnects: batch of 1").count() == 2
        },
    );
    let r = oar.host(&host(1));
    assert_eq!(oar_prop(&r[0], "state"), "Alive", "{r:?}\n{}", wk.log());
    assert_eq!(
        oar_prop(&r[0], "idhalconnectedsince"),
        (since + 50).to_string()
    );
    // Node 1 never went Absent: no take-down named it.
    let calls = std::fs::read_to_string(&w.log).unwrap();
    let downs: Vec<&str> = calls.lines().filter(|l| l.contains("Absent")).collect();
    assert!(
        downs.iter().all(|l| !l.contains(&host(1))),
        "{downs:?}\n{}",
        wk.log()
    );
    assert!(downs.iter().any(|l| l.contains(&host(2))), "{downs:?}");
}

/// In sync mode (and when the worker cannot be reached) no process outlives the hook to wait
/// out the grace: the hook leaves the node up and says who takes it down.
#[test]
fn a_sync_disconnect_within_the_down_grace_leaves_the_node_up() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let w = wrapped(oar, d.path(), None, None);
    let domain = "gracesync.test";
    let config = format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [hook]\nmode = \"sync\"\ndown_grace_secs = 30\n\
         [limits]\nhook_budget_ms = 120000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 120000\n\
         {}",
        w.section
    );
    let s = setup_with(&config);
    let env = node_env("client5201", "10.134.52.1", now() - 100);
    let o = hook(&s.cfg, &s.state, "client-connect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hook(&s.cfg, &s.state, "client-disconnect", &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(
            "client5201: left up for [hook] down_grace_secs (30 s): `idhal reconcile` takes it down"
        ),
        "{}",
        stderr(&o)
    );
    let r = oar.host(&format!("vnode-52-1.{domain}"));
    assert_eq!(oar_prop(&r[0], "state"), "Alive", "{r:?}");
    let calls = std::fs::read_to_string(&w.log).unwrap();
    assert!(!calls.contains("Absent"), "{calls}");
}
