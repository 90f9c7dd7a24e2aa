//! The agent end to end against a real HTTP server on 127.0.0.1: each failure mode with its
//! exact refusal, once-only semantics, retries, crash safety and status.

mod common;
use common::*;
use idhal_manifest::sig::TrustedMeta;
use idhal_manifest::Frequency::{Always, Boot, Once};
use std::path::Path;

fn append(out: &Path, word: &str) -> String {
    format!("#!/bin/sh\necho {word} >> '{}'\n", out.display())
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

struct Setup {
    pubdir: tempfile::TempDir,
    server: TestServer,
    key: Key,
    node: Node,
}

fn setup() -> Setup {
    let pubdir = tempfile::tempdir().unwrap();
    let server = TestServer::start(pubdir.path());
    let key = Key::new();
    let node = Node::new(&server.url);
    node.bake(&key);
    Setup {
        pubdir,
        server,
        key,
        node,
    }
}

impl Setup {
    fn out(&self) -> std::path::PathBuf {
        self.node.path("out")
    }
    fn publish(&self, serial: u64, specs: &[Spec]) {
        publish(
            self.pubdir.path(),
            &self.key,
            serial,
            now() + NOW_PLUS_DAY,
            specs,
        );
    }
    fn three(&self) -> Vec<Spec<'static>> {
        let out = self.out();
        vec![
            ("000-a", Once, append(&out, "a")),
            ("010-b", Once, append(&out, "b")),
            ("020-c", Once, append(&out, "c")),
        ]
    }
    /// Asserts nothing ran and no state was written besides the report.
    #[track_caller]
    fn assert_untouched(&self, serial_before: Option<&str>) {
        assert!(lines(&self.out()).is_empty(), "a scriptlet ran");
        assert_eq!(self.node.read("state/serial").as_deref(), serial_before);
    }
}

#[test]
fn once_scriptlets_run_once() {
    let s = setup();
    s.publish(1, &s.three());
    s.node.run(&[]).expect(0, "ok: serial 1, ran 3, 0 not due");
    assert_eq!(lines(&s.out()), ["a", "b", "c"]);
    s.node.run(&[]).expect(0, "ran 0, 3 not due");
    assert_eq!(lines(&s.out()), ["a", "b", "c"]);
    assert_eq!(s.node.read("state/serial").as_deref(), Some("1\n"));
    // The agent fetched the signature, then the versioned manifest it names.
    let reqs = s.server.requests.lock().unwrap().clone();
    assert_eq!(reqs[..2], ["/manifest.minisig", "/manifests/1"]);
    // A new serial adding one scriptlet runs only the new one.
    let mut specs = s.three();
    specs.push(("030-d", Once, append(&s.out(), "d")));
    s.publish(2, &specs);
    s.node.run(&[]).expect(0, "ok: serial 2, ran 1, 3 not due");
    assert_eq!(lines(&s.out()), ["a", "b", "c", "d"]);
    let (code, json) = s.node.status_json();
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["serial"], 2, "{json}");
    let states: Vec<&str> = scriptlets(&json)
        .map(|s| s["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["done"; 4], "{json}");
}

#[test]
fn boot_and_always_frequencies() {
    let s = setup();
    let out = s.out();
    s.publish(
        1,
        &[
            ("b", Boot, append(&out, "boot")),
            ("w", Always, append(&out, "always")),
        ],
    );
    s.node.run(&[]).expect(0, "ran 2");
    s.node.run(&[]).expect(0, "ran 1, 1 not due");
    s.node.set_boot_id("boot-2");
    s.node.run(&[]).expect(0, "ran 2");
    assert_eq!(lines(&out), ["boot", "always", "always", "boot", "always"]);
}

#[test]
fn scriptlets_get_params_and_context() {
    let s = setup();
    let out = s.out();
    let m = encode(
        4,
        now() + NOW_PLUS_DAY,
        &[("enroll-url", "http://10.0.2.100:8080/enroll")],
        &[(
            "env",
            Once,
            format!(
                "echo \"$IDHAL_PARAM_ENROLL_URL $IDHAL_SERIAL $IDHAL_SCRIPTLET $PWD\" > '{}'\n",
                out.display()
            ),
        )],
    );
    let sig = s.key.sign(
        &m,
        &TrustedMeta {
            serial: 4,
            expires: now() + NOW_PLUS_DAY,
        }
        .to_comment(),
    );
    publish_raw(s.pubdir.path(), &s.key, 4, &m, &sig);
    s.node.run(&[]).expect(0, "ran 1");
    assert_eq!(lines(&out), ["http://10.0.2.100:8080/enroll 4 env /"]);
}

#[test]
fn tampered_manifest_byte_is_refused() {
    let s = setup();
    s.publish(1, &s.three());
    let p = s.pubdir.path().join("manifests/1");
    let mut m = std::fs::read(&p).unwrap();
    let i = m.len() - 10;
    m[i] ^= 0x20;
    std::fs::write(&p, m).unwrap();
    s.node
        .run(&[])
        .expect(5, "refused: signature does not match the manifest");
    s.assert_untouched(None);
    let (code, json) = s.node.status_json();
    assert_eq!(code, 9);
    assert_eq!(json["last_run"]["exit"], 5, "{json}");
    assert!(
        json["last_run"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature does not match the manifest")),
        "{json}"
    );
}

#[test]
fn tampered_signature_is_refused() {
    let s = setup();
    s.publish(1, &s.three());
    let p = s.pubdir.path().join("manifest.minisig");
    let sig = std::fs::read_to_string(&p).unwrap();
    // Flip one bit in the Ed25519 signature (bytes 10.. of the second line).
    let mut lines: Vec<String> = sig.lines().map(str::to_owned).collect();
    let mut chars: Vec<char> = lines[1].chars().collect();
    chars[40] = if chars[40] == 'A' { 'B' } else { 'A' };
    lines[1] = chars.into_iter().collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    s.node
        .run(&[])
        .expect(5, "refused: signature does not match the manifest");
    s.assert_untouched(None);
    // A forged trusted comment (claiming a later expiry) fails the global signature.
    s.publish(1, &s.three());
    let sig = std::fs::read_to_string(&p).unwrap();
    let forged = sig.replace("expires=", "expires=9");
    std::fs::write(&p, forged).unwrap();
    s.node
        .run(&[])
        .expect(5, "refused: trusted comment signature is invalid");
    s.assert_untouched(None);
}

#[test]
fn wrong_key_is_refused() {
    let s = setup();
    let other = Key::new();
    publish(s.pubdir.path(), &other, 1, now() + NOW_PLUS_DAY, &s.three());
    s.node.run(&[]).expect(
        5,
        &format!(
            "refused: manifest is signed by key {}, but this node pinned key {}",
            other.public().id(),
            s.key.public().id()
        ),
    );
    s.assert_untouched(None);
}

#[test]
fn pinned_key_never_changes() {
    let s = setup();
    s.publish(1, &s.three());
    s.node.run(&[]).expect(0, "pinning the image's key");
    // A different key baked in later (or an attacker's) is refused even if it signed.
    let other = Key::new();
    s.node.bake(&other);
    publish(s.pubdir.path(), &other, 2, now() + NOW_PLUS_DAY, &s.three());
    s.node
        .run(&[])
        .expect(5, "differs from the key")
        .expect(5, "pinned in");
    assert_eq!(s.node.read("state/serial").as_deref(), Some("1\n"));
}

#[test]
fn a_rotated_pin_must_start_from_the_images_key_and_a_damaged_one_is_refused() {
    let s = setup();
    s.publish(1, &s.three());
    s.node.run(&[]).expect(0, "pinning the image's key");
    let pinned = s.node.read("state/server.pub").unwrap();
    let id = s.key.public().id();
    let with = |line: &str| {
        std::fs::write(s.node.path("state/server.pub"), format!("{pinned}{line}\n")).unwrap();
        s.node.run(&[])
    };
    // Started from another key (a state disk kept across a re-imaging with another project's
    // key, or an edit): refused loudly, as before rotations existed.
    with("idhal-rotation 1 0123456789ABCDEF")
        .expect(5, "differs from the key 0123456789ABCDEF this node pinned");
    // Damaged: a state error, never trusted.
    for bad in [
        "idhal-rotation 0 {id}",
        "idhal-rotation 1048577 {id}",
        "idhal-rotation 18446744073709551615 {id}",
        "idhal-rotation +1 {id}",
        "idhal-rotation 01 {id}",
        "idhal-rotation 1",
        "idhal-rotation 1 {id}0",
        "idhal-rotation 1 zzzzzzzzzzzzzzzz",
    ] {
        with(&bad.replace("{id}", &id.to_string())).expect(8, "bad idhal-rotation line");
    }
    assert_eq!(s.node.read("state/serial").as_deref(), Some("1\n"));
    // From the image's own key: fine (this node then looks for statement 2).
    with(&format!("idhal-rotation 1 {id}")).expect(0, "ok: serial 1");
}

#[test]
fn fetched_key_needs_matching_pin() {
    let s = setup();
    std::fs::remove_file(s.node.baked_key()).unwrap();
    s.publish(1, &s.three());
    // No baked key, no pin: refused, nothing fetched but the key.
    s.node
        .run(&[])
        .expect(5, "refusing to trust the first key offered");
    s.assert_untouched(None);
    assert!(s.node.read("state/server.pub").is_none());
    // A pin for another key: refused, names both fingerprints.
    let other = Key::new();
    let wrong = other.public().fingerprint().to_string();
    s.node
        .run(&["--pin", &wrong])
        .expect(5, "the server offered key")
        .expect(5, &format!("but idhal.pin is {wrong}"));
    assert!(s.node.read("state/server.pub").is_none());
    // The right pin, from the kernel command line.
    let right = s.key.public().fingerprint().to_string();
    s.node.set_cmdline(&format!("ro idhal.pin={right}\n"));
    s.node.run(&[]).expect(0, "matches idhal.pin");
    assert_eq!(s.node.read("state/server.pub"), Some(s.key.pub_text()));
    // Once pinned the key is never fetched again.
    s.server.requests.lock().unwrap().clear();
    s.node.run(&[]).expect(0, "ran 0");
    assert!(!s
        .server
        .requests
        .lock()
        .unwrap()
        .contains(&"/idhal.pub".to_owned()));
}

#[test]
fn trust_first_use_only_when_asked_and_loudly() {
    let s = setup();
    std::fs::remove_file(s.node.baked_key()).unwrap();
    s.publish(1, &s.three());
    let r = s.node.run(&["--insecure-trust-first-use"]);
    r.expect(0, "WARNING: INSECURE trust-on-first-use");
    assert_eq!(s.node.read("state/server.pub"), Some(s.key.pub_text()));
}

#[test]
fn rollback_is_refused() {
    let s = setup();
    s.publish(5, &s.three());
    s.node.run(&[]).expect(0, "serial 5");
    let before = lines(&s.out());
    s.publish(4, &[("zzz", Once, append(&s.out(), "evil"))]);
    s.node.run(&[]).expect(
        5,
        "rollback refused: manifest serial 4 is older than serial 5",
    );
    assert_eq!(lines(&s.out()), before);
    assert_eq!(s.node.read("state/serial").as_deref(), Some("5\n"));
}

#[test]
fn expired_manifest_is_refused() {
    let s = setup();
    publish(s.pubdir.path(), &s.key, 1, now() - 10, &s.three());
    s.node.run(&[]).expect(5, "manifest serial 1 expired at");
    s.assert_untouched(None);
}

#[test]
fn legacy_signature_from_stock_minisign_is_refused_and_prehashed_accepted() {
    let minisign = Path::new("/usr/bin/minisign");
    if !minisign.exists() {
        idhal_test_support::skip_or_fail("stock minisign: /usr/bin/minisign not installed");
        return;
    }
    let s = setup();
    let keys = tempfile::tempdir().unwrap();
    let (pk, sk) = (keys.path().join("k.pub"), keys.path().join("k.key"));
    let ok = std::process::Command::new(minisign)
        .args(["-G", "-W", "-p"])
        .arg(&pk)
        .arg("-s")
        .arg(&sk)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    std::fs::copy(&pk, s.node.baked_key()).unwrap();
    let stock_key =
        idhal_manifest::PublicKey::parse(&std::fs::read_to_string(&pk).unwrap()).unwrap();
    let expires = now() + NOW_PLUS_DAY;
    let m = encode(3, expires, &[], &s.three());
    let mfile = keys.path().join("manifest");
    std::fs::write(&mfile, &m).unwrap();
    let comment = TrustedMeta { serial: 3, expires }.to_comment();
    let sign = |legacy: bool| {
        let mut c = std::process::Command::new(minisign);
        c.args(["-S", "-s"])
            .arg(&sk)
            .arg("-m")
            .arg(&mfile)
            .args(["-t", &comment]);
        if legacy {
            c.arg("-l");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{o:?}");
        std::fs::read_to_string(keys.path().join("manifest.minisig")).unwrap()
    };
    let pubdir = s.pubdir.path();
    std::fs::create_dir_all(pubdir.join("manifests")).unwrap();
    let put = |sig: &str| {
        std::fs::write(pubdir.join("manifests/3"), &m).unwrap();
        std::fs::write(pubdir.join("manifest.minisig"), sig).unwrap();
    };
    put(&sign(true));
    s.node
        .run(&[])
        .expect(5, "legacy (non-prehashed) minisign signature refused");
    s.assert_untouched(None);
    put(&sign(false));
    s.node.run(&[]).expect(0, "ran 3");
    assert_eq!(
        s.node.read("state/server.pub").unwrap(),
        stock_key.to_file_text()
    );
}

#[test]
fn oversized_responses_are_cut_off() {
    let s = setup();
    // Declared too large: refused before reading the body.
    let out = s.out();
    let big = format!("# {}\n{}", "x".repeat(3000), append(&out, "big"));
    s.publish(1, &[("big", Once, big)]);
    std::fs::write(s.node.config(), "retries = 0\nmax_manifest_size = 2048\n").unwrap();
    s.node
        .run(&[])
        .expect(4, "/manifests/1: response larger than the 2048-byte limit");
    s.assert_untouched(None);
    // No Content-Length and an endless body: cut off at the cap, not at memory exhaustion.
    s.server.set_fault(Fault::Endless);
    s.node.run(&[]).expect(
        4,
        "/manifest.minisig: response larger than the 8192-byte limit",
    );
    s.assert_untouched(None);
}

#[test]
fn hanging_and_trickling_servers_time_out() {
    let s = setup();
    s.publish(1, &s.three());
    for fault in [Fault::Hang, Fault::Trickle] {
        s.server.set_fault(fault);
        // Without its 2 s deadline the agent would wait 60 s (Hang) or 300 s (Trickle); the
        // test's own deadline only keeps a broken agent from hanging the suite.
        let (run, took) = s.node.run_within(&["--timeout", "2s"], DEADLINE);
        run.expect(4, "timed out");
        eprintln!("{fault:?}: the agent gave up after {took:?} (timeout 2s)");
        s.assert_untouched(None);
    }
}

#[test]
fn transient_failures_are_retried() {
    let s = setup();
    s.publish(1, &s.three());
    s.server.set_fault(Fault::Unavailable(2));
    std::fs::write(s.node.config(), "").unwrap();
    let r = s.node.run(&["--retries", "3"]);
    r.expect(0, "ran 3").expect(0, "HTTP 503; retry 1/3");
    assert!(r.stderr().contains("retry 2/3"));
    // Out of retries: a fetch failure, exit 4.
    s.server.set_fault(Fault::Unavailable(5));
    s.node
        .run(&["--retries", "1"])
        .expect(4, "server answered HTTP 503");
    // Nothing listening at all.
    let dead = Node::new("http://127.0.0.1:1/");
    dead.bake(&s.key);
    dead.run(&[]).expect(4, "cannot connect");
}

#[test]
fn failing_scriptlet_is_retried_and_blocks_later_ones() {
    let s = setup();
    let out = s.out();
    let flag = s.node.path("fixed");
    s.publish(
        1,
        &[
            ("000-a", Once, append(&out, "a")),
            (
                "010-flaky",
                Once,
                format!(
                    "echo flaky >> '{}'\necho to-the-log\n[ -e '{}' ] || exit 3\n",
                    out.display(),
                    flag.display()
                ),
            ),
            ("020-c", Once, append(&out, "c")),
        ],
    );
    s.node
        .run(&[])
        .expect(6, "scriptlet 010-flaky failed with exit 3; see");
    assert_eq!(lines(&out), ["a", "flaky"]);
    let log = s.node.read("state/scriptlets/010-flaky/log").unwrap();
    assert_eq!(log, "to-the-log\n");
    let (code, json) = s.node.status_json();
    assert_eq!(code, 6, "{json}");
    let row = |id: &str| {
        let r = scriptlets(&json)
            .find(|s| s["id"] == id)
            .unwrap_or_else(|| panic!("{id}: {json}"));
        (
            r["frequency"].as_str().unwrap(),
            r["state"].as_str().unwrap(),
        )
    };
    assert_eq!(row("010-flaky"), ("once", "failed"), "{json}");
    assert_eq!(row("020-c"), ("once", "pending"), "{json}");
    s.node.run(&[]).expect(6, "010-flaky failed");
    std::fs::write(&flag, "").unwrap();
    s.node.run(&[]).expect(0, "ran 2, 1 not due");
    assert_eq!(lines(&out), ["a", "flaky", "flaky", "flaky", "c"]);
    assert!(s.node.read("state/scriptlets/010-flaky/failed").is_none());
    assert_eq!(s.node.status_json().0, 0);
}

#[test]
fn kill_during_scriptlet_leaves_it_pending() {
    use std::os::unix::process::CommandExt;
    let s = setup();
    let out = s.out();
    let (started, killed) = (s.node.path("started"), s.node.path("killed-once"));
    s.publish(
        1,
        &[(
            "slow",
            Once,
            format!(
                "echo run >> '{}'\nif [ ! -e '{}' ]; then touch '{}'; sleep 60; fi\n",
                out.display(),
                killed.display(),
                started.display()
            ),
        )],
    );
    let mut child = s.node.command("run", &[]).process_group(0).spawn().unwrap();
    wait_for("the scriptlet to start", DEADLINE, || started.exists());
    // Power loss: the agent and its scriptlet die together.
    let pgid = child.id();
    let k = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .unwrap();
    assert!(k.success());
    child.wait().unwrap();
    std::fs::write(&killed, "").unwrap();
    assert!(s.node.read("state/scriptlets/slow/done").is_none());
    let (code, json) = s.node.status_json();
    assert_eq!(code, 9);
    assert!(scriptlets(&json).any(|s| s["state"] == "pending"), "{json}");
    s.node.run(&[]).expect(0, "ran 1");
    s.node.run(&[]).expect(0, "ran 0");
    assert_eq!(lines(&out), ["run", "run"]);
}

/// Shell that waits until `go` exists; bounded (60 s), and it stops when the test's directory
/// is gone, so a failed test leaves nothing running.
fn shell_wait_for(go: &Path) -> String {
    format!(
        "i=0; while [ ! -e '{}' ] && [ -d '{}' ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); \
         done\n",
        go.display(),
        go.parent().unwrap().display()
    )
}

#[test]
fn concurrent_runs_never_overlap() {
    let s = setup();
    let (started, go) = (s.node.path("started"), s.node.path("go"));
    s.publish(
        1,
        &[(
            "slow",
            Once,
            format!("touch '{}'\n{}", started.display(), shell_wait_for(&go)),
        )],
    );
    let mut first = s.node.command("run", &[]).spawn().unwrap();
    wait_for("the first run's scriptlet to start", DEADLINE, || {
        started.exists()
    });
    s.node
        .run(&[])
        .expect(7, "state/lock is held by another idhal-bootstrap run");
    std::fs::write(&go, "").unwrap();
    assert!(first.wait().unwrap().success());
}

/// Runs the agent until it exits 0, allowing only exit 7 (locked) before that.
fn run_once_unlocked(node: &Node) -> Run {
    let mut last = None;
    wait_for("a run that is not locked out", DEADLINE, || {
        let r = node.run(&[]);
        assert!(matches!(r.code(), 0 | 7), "{}", r.stderr());
        let ok = r.code() == 0;
        last = Some(r);
        ok
    });
    last.unwrap()
}

#[test]
fn a_killed_agents_scriptlet_never_overlaps_the_next_run() {
    let s = setup();
    let out = s.out();
    let [shell, worker, inside, first, go] =
        ["shell.pid", "worker.pid", "inside", "first", "go"].map(|p| s.node.path(p));
    // The work runs in a child of the scriptlet's shell, as most work does, so it outlives the
    // shell. `mkdir` detects an overlap: it fails while another instance is inside. The first
    // instance waits for `go`, the later ones do not.
    s.publish(
        1,
        &[(
            "slow",
            Once,
            format!(
                "echo $$ > '{shell}'\nsh -c '\necho $$ > \"$1\"\n\
                 mkdir \"$2\" || {{ echo overlap >> \"$3\"; exit 1; }}\necho start >> \"$3\"\n\
                 [ -e \"$4\" ] || {{ touch \"$4\"; {wait}}}\necho end >> \"$3\"\nrmdir \"$2\"\n\
                 ' worker '{worker}' '{inside}' '{out}' '{first}'\n",
                shell = shell.display(),
                worker = worker.display(),
                inside = inside.display(),
                out = out.display(),
                first = first.display(),
                wait = shell_wait_for(&go).replace('\'', "'\\''"),
            ),
        )],
    );
    let mut agent = s.node.command("run", &[]).spawn().unwrap();
    wait_for("the scriptlet to start its work", DEADLINE, || {
        first.exists()
    });
    let pid = |p: &Path| -> u32 { std::fs::read_to_string(p).unwrap().trim().parse().unwrap() };
    let (shell_pid, worker_pid) = (pid(&shell), pid(&worker));

    // kill -9 of the agent alone: its scriptlet's work goes on.
    agent.kill().unwrap();
    agent.wait().unwrap();
    s.node.run(&[]).expect(
        7,
        "scriptlets/slow/lock is held by another idhal-bootstrap run or a scriptlet one started",
    );
    assert!(alive(worker_pid), "the worker should still be waiting");
    assert_eq!(lines(&out), ["start"]);
    // The shell itself died with the agent (PR_SET_PDEATHSIG); its worker holds the lock.
    wait_for(
        "the scriptlet's shell to die with the agent",
        DEADLINE,
        || !alive(shell_pid),
    );
    s.node.run(&[]).expect(7, "scriptlets/slow/lock is held");

    std::fs::write(&go, "").unwrap();
    run_once_unlocked(&s.node).expect(0, "ok: serial 1, ran 1");
    assert!(!alive(worker_pid));
    assert_eq!(lines(&out), ["start", "end", "start", "end"]);
    assert!(s.node.read("state/scriptlets/slow/done").is_some());
}

#[test]
fn a_process_a_scriptlet_leaves_running_keeps_its_lock_only_with_its_stdin() {
    let s = setup();
    let (go, out) = (s.node.path("go"), s.out());
    let waiter = format!("( {} )", shell_wait_for(&go).trim_end());
    // A process left running with the scriptlet's standard input (its lock): the scriptlet
    // cannot run again while it lives (`always` is due every run).
    s.publish(
        1,
        &[(
            "keeps",
            Always,
            format!("{}exec 3<&0\n{waiter} <&3 &\n", append(&out, "keeps")),
        )],
    );
    s.node.run(&[]).expect(0, "ran 1");
    s.node.run(&[]).expect(7, "scriptlets/keeps/lock is held");
    std::fs::write(&go, "").unwrap();
    run_once_unlocked(&s.node).expect(0, "ran 1");
    std::fs::remove_file(&go).unwrap();

    // `cmd &` (the shell gives it /dev/null), and daemons, which do the same: the next run
    // goes on.
    s.publish(
        2,
        &[(
            "lets-go",
            Always,
            format!("{}{waiter} &\n", append(&out, "lets-go")),
        )],
    );
    s.node.run(&[]).expect(0, "ran 1");
    s.node.run(&[]).expect(0, "ran 1");
    std::fs::write(&go, "").unwrap();
    assert_eq!(lines(&out), ["keeps", "keeps", "lets-go", "lets-go"]);
}

#[test]
fn usage_and_config_errors_have_their_own_codes() {
    let s = setup();
    Run(s.node.command("run", &["--frobnicate"]).output().unwrap()).expect(2, "usage:");
    std::fs::write(s.node.config(), "sever = http://x/\n").unwrap();
    s.node.run(&[]).expect(
        3,
        "bootstrap.conf:1: sever = \"http://x/\": unknown setting",
    );
    let none = Node::new("");
    none.run(&[]).expect(3, "no server: set server =");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_idhal-bootstrap"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("EXIT CODES"));
}

#[test]
fn relative_state_dir_works_for_scriptlets() {
    let s = setup();
    s.publish(1, &s.three());
    let mut c = s.node.command("run", &["--state-dir", "rel-state"]);
    c.current_dir(s.node.dir.path());
    Run(c.output().unwrap()).expect(0, "ran 3");
    assert!(s.node.path("rel-state/scriptlets/020-c/done").exists());
}
