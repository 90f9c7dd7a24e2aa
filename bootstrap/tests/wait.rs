//! `idhal-bootstrap status --wait`, the built agent against a real HTTP server on 127.0.0.1:
//! each outcome with its exit code and JSON, a wait that starts before the run it waits for,
//! outcomes an earlier boot left (not this boot's answer), and hostile state files.

mod common;
use common::*;
use idhal_manifest::Frequency::{Always, Boot, Once};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Instant;

struct Setup {
    pubdir: tempfile::TempDir,
    _server: TestServer,
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
        _server: server,
        key,
        node,
    }
}

impl Setup {
    fn publish(&self, serial: u64, specs: &[Spec]) {
        publish(
            self.pubdir.path(),
            &self.key,
            serial,
            now() + NOW_PLUS_DAY,
            specs,
        );
    }
}

fn ok_script() -> String {
    "#!/bin/sh\nexit 0\n".into()
}

/// Shell that waits until `go` exists; bounded (60 s), and it stops when the test's directory
/// is gone, so a failed test leaves nothing running.
fn wait_for_go(started: &Path, go: &Path) -> String {
    format!(
        "touch '{}'\ni=0; while [ ! -e '{}' ] && [ -d '{}' ] && [ $i -lt 600 ]; do sleep 0.1; \
         i=$((i+1)); done\n",
        started.display(),
        go.display(),
        go.parent().unwrap().display()
    )
}

/// A `status --wait --json` started in the background, its stdout to a file.
struct Waiter {
    child: Child,
    out: std::path::PathBuf,
    started: Instant,
}

impl Waiter {
    fn start(node: &Node, timeout: &str) -> Waiter {
        let out = node.path(&format!("wait-{}.json", now_nanos()));
        let child = node
            .command("status", &["--wait", "--timeout", timeout, "--json"])
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Waiter {
            child,
            out,
            started: Instant::now(),
        }
    }

    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Its exit code and its one JSON object, once it ended (killed, and the test failed, if it
    /// has not within `DEADLINE`); prints how long it waited.
    #[track_caller]
    fn end(mut self) -> (i32, serde_json::Value) {
        let mut status = None;
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("status --wait to end", DEADLINE, || {
                status = self.child.try_wait().unwrap();
                status.is_some()
            })
        }));
        if let Err(panic) = ended {
            let _ = self.child.kill();
            let _ = self.child.wait();
            std::panic::resume_unwind(panic);
        }
        let text = std::fs::read_to_string(&self.out).unwrap();
        eprintln!(
            "FIGURE status --wait ended after {} ms (host wall time)",
            self.started.elapsed().as_millis()
        );
        (status.unwrap().code().unwrap(), parse_one(&text))
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Exactly one JSON object on one line.
#[track_caller]
fn parse_one(text: &str) -> serde_json::Value {
    assert!(
        text.ends_with("}\n") && text.matches('\n').count() == 1,
        "not one line: {text:?}"
    );
    let v: serde_json::Value = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("status --wait --json is not JSON ({e}): {text}"));
    assert!(v.is_object(), "{text}");
    v
}

/// `status --wait --timeout T --json`, run to its end (bounded by `DEADLINE`).
#[track_caller]
fn wait(node: &Node, timeout: &str) -> (i32, serde_json::Value) {
    Waiter::start(node, timeout).end()
}

#[track_caller]
fn assert_result(json: &serde_json::Value, result: &str, exit: i32) {
    assert_eq!(json["wait"]["result"], result, "{json}");
    assert_eq!(json["wait"]["exit"], exit, "{json}");
    assert!(json["wait"]["waited_ms"].is_u64(), "{json}");
}

fn states(json: &serde_json::Value) -> Vec<String> {
    scriptlets(json)
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn done_when_a_manifest_is_accepted_and_every_scriptlet_done() {
    let s = setup();
    s.publish(
        1,
        &[
            ("000-once", Once, ok_script()),
            ("010-boot", Boot, ok_script()),
            ("020-always", Always, ok_script()),
        ],
    );
    s.node.run(&[]).expect(0, "ran 3");
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 0, "{json}");
    assert_result(&json, "done", 0);
    assert_eq!(states(&json), ["done"; 3], "{json}");
    assert_eq!(json["serial"], 1, "{json}");
    assert_eq!(json["last_run"]["exit"], 0, "{json}");
    assert_eq!(json["last_run"]["this_boot"], true, "{json}");

    // Text: what `status` prints, then the wait's line.
    let o = s
        .node
        .command("status", &["--wait", "--timeout", "30s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{text}");
    let last = text.lines().last().unwrap();
    assert!(
        last.starts_with("wait:       done (exit 0) after ") && last.ends_with(" ms"),
        "{text}"
    );

    // A new boot: its `boot` and `always` scriptlets are this boot's work, pending until this
    // boot's run (the `once` one stays done); `status` alone says pending too.
    s.node.set_boot_id("boot-2");
    let (code, json) = wait(&s.node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_result(&json, "timed-out", 10);
    assert_eq!(states(&json), ["done", "pending", "pending"], "{json}");
    assert_eq!(json["last_run"]["this_boot"], false, "{json}");
    assert_eq!(s.node.status_json().0, 9);
    s.node.run(&[]).expect(0, "ran 2, 1 not due");
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 0, "{json}");
    assert_eq!(states(&json), ["done"; 3], "{json}");
}

#[test]
fn a_scriptlet_that_failed_in_this_boot_ends_the_wait_with_6() {
    let s = setup();
    let fixed = s.node.path("fixed");
    s.publish(
        1,
        &[
            ("000-a", Once, ok_script()),
            (
                "010-flaky",
                Once,
                format!("#!/bin/sh\n[ -e '{}' ] || exit 3\n", fixed.display()),
            ),
            ("020-c", Once, ok_script()),
        ],
    );
    s.node
        .run(&[])
        .expect(6, "scriptlet 010-flaky failed with exit 3");
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 6, "{json}");
    assert_result(&json, "scriptlet-failed", 6);
    assert_eq!(states(&json), ["done", "failed", "pending"], "{json}");

    // After a reboot the failure is the last boot's: this boot's run retries it, so the wait
    // waits for that run (`status` alone still shows the failure).
    s.node.set_boot_id("boot-2");
    let (code, json) = wait(&s.node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_result(&json, "timed-out", 10);
    assert_eq!(s.node.status_json().0, 6);
    std::fs::write(&fixed, "").unwrap();
    s.node.run(&[]).expect(0, "ran 2, 1 not due");
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 0, "{json}");
}

#[test]
fn a_bad_signature_ends_the_wait_with_5_and_only_in_its_own_boot() {
    let s = setup();
    s.publish(1, &[("000-a", Once, ok_script())]);
    let p = s.pubdir.path().join("manifests/1");
    let mut m = std::fs::read(&p).unwrap();
    let i = m.len() - 3;
    m[i] ^= 0x20;
    std::fs::write(&p, m).unwrap();
    s.node
        .run(&[])
        .expect(5, "refused: signature does not match the manifest");
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 5, "{json}");
    assert_result(&json, "refused", 5);
    assert_eq!(json["serial"], serde_json::Value::Null, "{json}");
    assert!(
        json["last_run"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature does not match the manifest")),
        "{json}"
    );
    // The refusal an earlier boot reported is not this boot's answer.
    s.node.set_boot_id("boot-2");
    let (code, json) = wait(&s.node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_eq!(json["last_run"]["exit"], 5, "{json}");
    assert_eq!(json["last_run"]["this_boot"], false, "{json}");
}

#[test]
fn a_rollback_after_everything_was_done_ends_the_wait_with_5() {
    let s = setup();
    s.publish(5, &[("000-a", Once, ok_script())]);
    s.node.run(&[]).expect(0, "serial 5");
    assert_eq!(wait(&s.node, "30s").0, 0);
    s.publish(4, &[("000-a", Once, ok_script())]);
    s.node.run(&[]).expect(
        5,
        "rollback refused: manifest serial 4 is older than serial 5",
    );
    // Everything is done, but the last run of this boot was refused: that is the news.
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 5, "{json}");
    assert_result(&json, "refused", 5);
    assert_eq!(states(&json), ["done"], "{json}");
    assert_eq!(json["serial"], 5, "{json}");
}

#[test]
fn a_stored_manifest_that_no_longer_verifies_ends_the_wait_with_5() {
    let s = setup();
    s.publish(1, &[("000-a", Once, ok_script())]);
    s.node.run(&[]).expect(0, "ran 1");
    let p = s.node.path("state/manifest");
    let mut m = std::fs::read(&p).unwrap();
    let i = m.len() - 3;
    m[i] ^= 0x20;
    std::fs::write(&p, m).unwrap();
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 5, "{json}");
    assert_result(&json, "refused", 5);
    assert_eq!(
        json["problem"],
        "stored manifest fails verification: signature does not match the manifest: manifest \
         or signature was tampered with or truncated",
        "{json}"
    );
}

#[test]
fn no_server_ends_the_wait_with_the_runs_fetch_failure() {
    let key = Key::new();
    let node = Node::new("http://127.0.0.1:1/");
    node.bake(&key);
    node.run(&[]).expect(4, "cannot connect");
    let (code, json) = wait(&node, "30s");
    assert_eq!(code, 4, "{json}");
    assert_result(&json, "fetch-failed", 4);
}

#[test]
fn nothing_by_the_deadline_is_10_with_the_last_look() {
    // No state directory at all: nothing has run.
    let node = Node::new("");
    let (code, json) = wait(&node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_result(&json, "timed-out", 10);
    assert_eq!(
        json["state_dir"],
        node.state().display().to_string(),
        "{json}"
    );
    assert_eq!(json["pinned_key"], serde_json::Value::Null, "{json}");
    assert_eq!(json["scriptlets"], serde_json::json!([]), "{json}");
    assert!(!node.state().exists(), "status created the state dir");

    // A run whose scriptlet is still running: its row is pending when the deadline comes.
    let s = setup();
    let (started, go) = (s.node.path("started"), s.node.path("go"));
    s.publish(
        1,
        &[
            ("000-a", Once, ok_script()),
            ("010-slow", Once, wait_for_go(&started, &go)),
        ],
    );
    let mut run = s.node.command("run", &[]).spawn().unwrap();
    wait_for("the slow scriptlet to start", DEADLINE, || started.exists());
    let (code, json) = wait(&s.node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_eq!(states(&json), ["done", "pending"], "{json}");
    assert_eq!(json["last_run"], serde_json::Value::Null, "{json}");
    std::fs::write(&go, "").unwrap();
    assert!(run.wait().unwrap().success());
}

#[test]
fn a_wait_started_before_the_run_ends_when_the_run_has_finished() {
    let s = setup();
    let (started, go) = (s.node.path("started"), s.node.path("go"));
    s.publish(
        1,
        &[
            ("000-a", Once, ok_script()),
            ("010-slow", Once, wait_for_go(&started, &go)),
            ("020-c", Boot, ok_script()),
        ],
    );
    // Started before the state directory even exists.
    let mut waiter = Waiter::start(&s.node, "60s");
    let mut run = s.node.command("run", &[]).spawn().unwrap();
    wait_for("the slow scriptlet to start", DEADLINE, || started.exists());
    assert!(waiter.running(), "status --wait ended before the run did");
    std::fs::write(&go, "").unwrap();
    let (code, json) = waiter.end();
    assert!(run.wait().unwrap().success());
    assert_eq!(code, 0, "{json}");
    assert_result(&json, "done", 0);
    assert_eq!(states(&json), ["done"; 3], "{json}");
    // It ended after the run's report, not between the last marker and the report.
    assert_eq!(json["last_run"]["exit"], 0, "{json}");
    assert_eq!(json["last_run"]["this_boot"], true, "{json}");

    // While a run holds the lock after a refusal of this boot, the refusal is not the answer:
    // the wait waits for that run.
    let s = setup();
    let (started, go) = (s.node.path("started"), s.node.path("go"));
    s.publish(1, &[("000-a", Once, ok_script())]);
    std::fs::write(s.pubdir.path().join("manifests/1"), "tampered").unwrap();
    s.node.run(&[]).expect(5, "refused");
    s.publish(2, &[("010-slow", Once, wait_for_go(&started, &go))]);
    let mut run = s.node.command("run", &[]).spawn().unwrap();
    wait_for("the slow scriptlet to start", DEADLINE, || started.exists());
    let mut waiter = Waiter::start(&s.node, "60s");
    // The refusal is still the last report; the run holds the lock: nothing to say yet.
    let (code, json) = wait(&s.node, "1s");
    assert_eq!(code, 10, "{json}");
    assert_eq!(json["last_run"]["exit"], 5, "{json}");
    assert!(waiter.running(), "status --wait ended before the run did");
    std::fs::write(&go, "").unwrap();
    let (code, json) = waiter.end();
    assert!(run.wait().unwrap().success());
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["last_run"]["exit"], 0, "{json}");
}

#[test]
fn hostile_state_files_never_make_it_hang_or_fail() {
    let s = setup();
    s.publish(1, &[("000-a", Once, ok_script())]);
    s.node.run(&[]).expect(0, "ran 1");
    let report = s.node.path("state/last-run");

    // Huge: only the first 4 KiB are a report; a refusal after them is not read.
    let mut huge = b"finished=1\nmessage=".to_vec();
    huge.resize(16 << 20, b'x');
    huge.extend_from_slice(b"\nboot_id=boot-1\nexit=5\n");
    std::fs::write(&report, &huge).unwrap();
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 0, "{json}");
    assert_eq!(json["last_run"]["exit"], 1, "{json}");
    assert_eq!(json["last_run"]["this_boot"], false, "{json}");
    assert_eq!(
        json["last_run"]["message"].as_str().unwrap().len(),
        4096 - "finished=1\nmessage=".len()
    );

    // Garbage bytes (not UTF-8, control characters, no `=`): shown escaped, never an error.
    std::fs::write(
        &report,
        b"\xff\xfe\x00exit=\x1b[2J\nboot_id=boot-1\nexit=banana\n",
    )
    .unwrap();
    let (code, json) = wait(&s.node, "30s");
    assert_eq!(code, 0, "{json}");
    assert_eq!(s.node.status_json().0, 0);

    // A report of this boot with an exit code no run writes is no outcome of its own.
    std::fs::write(&report, "finished=1\nboot_id=boot-1\nexit=7\nmessage=x\n").unwrap();
    assert_eq!(wait(&s.node, "30s").0, 0);

    // A directory where the report should be: a state error, at once (exit 8).
    std::fs::remove_file(&report).unwrap();
    std::fs::create_dir(&report).unwrap();
    let o = s
        .node
        .command("status", &["--wait", "--timeout", "30s", "--json"])
        .output()
        .unwrap();
    Run(o).expect(8, "state/last-run: Is a directory");
    std::fs::remove_dir(&report).unwrap();

    // A FIFO blocks whoever opens it: the deadline still holds, with what was seen before.
    let fifo = std::process::Command::new("mkfifo")
        .arg(&report)
        .status()
        .unwrap();
    assert!(fifo.success());
    let (code, json) = wait(&s.node, "2s");
    assert_eq!(code, 10, "{json}");
    assert_result(&json, "timed-out", 10);
    assert_eq!(
        json["state_dir"],
        s.node.state().display().to_string(),
        "{json}"
    );
}
