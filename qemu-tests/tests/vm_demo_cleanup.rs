//! Issue 12 part 7: the demo cleans up even when it fails, whatever way it fails. Runs the
//! README's `bash scripts/demo.sh` with `IDHAL_DEMO_FAIL_AT` (a panic with the servers up; an
//! abort, where no destructor runs, with the VM, OpenVPN, idhal serve, OAR and Knot all up) and
//! its temp dirs under a directory of this test, then looks for anything of that run still
//! there: a process whose command line, environment or working directory names the directory
//! (qemu-system, socat, openvpn, idhal serve/hook, postgres, Almighty, knotd, the reapers), or
//! a file. demo.sh must leave nothing, and must not return before.
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Every process (but this one) whose command line, environment or working directory mentions
/// `dir`, as "PID: command line".
fn processes_using(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
            continue;
        }
        let p = e.path();
        let read = |f: &str| {
            std::fs::read(p.join(f))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default()
        };
        let stat = read("stat");
        // Zombies hold nothing; their parent reaps them.
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            continue;
        }
        let cmdline = read("cmdline");
        let cwd = std::fs::read_link(p.join("cwd"))
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        if cmdline.contains(&needle)
            || read("environ").contains(&needle)
            || cwd.starts_with(&needle)
        {
            found.push(format!("{pid}: {cmdline} (cwd {cwd})"));
        }
    }
    found
}

/// Runs the demo failing at `fail_at`; returns its exit code and output. Its output goes to a
/// file, not a pipe: a process it left behind would hold a pipe open, and we wait for demo.sh
/// itself (bounded), not for every holder of its stdout.
fn failing_demo(
    shared: &idhal_qemu_tests::Shared,
    dir: &Path,
    fail_at: &str,
) -> (Option<i32>, String) {
    let ws = idhal_qemu_tests::bins::workspace_dir();
    let log = tempfile::NamedTempFile::new().unwrap();
    // One open file for both streams: one offset, nothing overwritten.
    let out = log.reopen().unwrap();
    let mut child = Command::new("bash")
        .arg(ws.join("scripts/demo.sh"))
        .current_dir(&ws)
        .env("TMPDIR", dir)
        .env("IDHAL_DEMO_FAIL_AT", fail_at)
        // Built by the cargo running this test (a nested `cargo build` would wait for its lock);
        // the driver with the test profile, which unwinds like the one demo.sh builds.
        .env("IDHAL_BIN", &shared.idhal)
        .env("IDHAL_AGENT_BIN", &shared.agent)
        .env("IDHAL_DEMO_BIN", env!("CARGO_BIN_EXE_idhal-demo"))
        .stdin(Stdio::null())
        .stderr(out.try_clone().unwrap())
        .stdout(out)
        .spawn()
        .expect("bash scripts/demo.sh");
    let status =
        idhal_qemu_tests::wait_until("demo.sh to return", Duration::from_secs(600), || {
            child.try_wait().unwrap()
        });
    let text = String::from_utf8_lossy(&std::fs::read(log.path()).unwrap()).into_owned();
    (status.code(), text)
}

#[test]
fn vm_demo_that_fails_midway_leaves_no_process_and_no_file_behind() {
    let Some(shared) = idhal_qemu_tests::shared() else {
        return;
    };
    if !idhal_qemu_tests::cluster::Cluster::available() {
        return;
    }
    for (fail_at, said, reached) in [
        // A panic once OAR, Knot, idhal serve and OpenVPN run (destructors run).
        ("3", "failing at step 3 on purpose", "==> 3."),
        // An abort once the node is Alive: QEMU and everything else run, no destructor runs.
        ("5:abort", "aborting at step 5", "==> 5."),
    ] {
        // Short: the rendered OpenVPN config names the state paths twice on its client-connect
        // line, and OpenVPN refuses an option line over 256 characters.
        let dir = tempfile::Builder::new()
            .prefix("c")
            .tempdir_in("/tmp")
            .unwrap();
        let t = std::time::Instant::now();
        let (code, text) = failing_demo(shared, dir.path(), fail_at);
        eprintln!(
            "FIGURE demo failing at {fail_at}: {:.1} s, exit {code:?}",
            t.elapsed().as_secs_f64()
        );
        assert!(
            text.contains(said) && text.contains(reached),
            "{fail_at}: {text}"
        );
        assert_ne!(code, Some(0), "{fail_at}: {text}");
        // Checked at once: demo.sh returns only when everything is gone.
        let left = processes_using(dir.path());
        assert!(
            left.is_empty(),
            "{fail_at}: left running: {left:#?}\n{text}"
        );
        let files: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            files.is_empty(),
            "{fail_at}: left behind: {files:?}\n{text}"
        );
    }
}
