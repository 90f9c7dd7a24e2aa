//! Helpers every idhal test suite shares. A dev-dependency only (and a dependency of the VM
//! harness, itself test-only): nothing here is ever shipped. Like cloud-hypervisor's test_infra,
//! it is where a test suite looks first before writing a helper of its own:
//!
//! - the rule for a test that cannot run ([`skip_or_fail`], [`or_skip`], [`require`],
//!   [`is_root`]; each fixture has its own `available()`);
//! - bounded waits, one loop ([`wait_logged_every`]) in the shapes [`wait_until`], [`wait_for`]
//!   and [`wait_logged`] (which prints the logs that say why on a timeout);
//! - ports and time ([`free_port`], [`now`]);
//! - processes ([`process`]: run a command and fail with its stderr, `openssl`, a child that is
//!   killed and waited for on drop, a server that announces its address, signals, "who listens
//!   on this port", a reaper that outlives a test process);
//! - the built binaries ([`bins::bin`]: one way to find, and build when needed, any workspace
//!   binary);
//! - throwaway certificates from the real openssl ([`x509`]);
//! - real components on 127.0.0.1 with ephemeral ports, stopped by pid ([`pg::Postgres`],
//!   [`oar::Oar`] on it, [`knot::Knot`], [`openvpn`]);
//! - network namespaces a test makes and removes ([`netns::Topology`]: bridges in a switch
//!   namespace, veth pairs, processes inside), and BIRD 2 inside them ([`bird::Bird`]).
//!
//! It owns one rule: what a test does when it cannot run here (a Debian package missing, not
//! root, no QEMU). Under the README's test command (`scripts/test.sh`, which exports
//! `IDHAL_TEST_STRICT=1`) and in CI that is a FAILURE; in a developer's plain `cargo test` it is a
//! loud `SKIPPED` line. Every such site calls [`skip_or_fail`]; none decides for itself.
pub mod bins;
pub mod bird;
pub mod knot;
pub mod netns;
pub mod oar;
pub mod openvpn;
pub mod pg;
pub mod process;
pub mod x509;

pub use bins::bin;
pub use process::{ok, openssl, Logged};

use std::ffi::OsStr;
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

/// The variable `scripts/test.sh` exports: a test that cannot run fails.
pub const STRICT_VAR: &str = "IDHAL_TEST_STRICT";

/// What a test that cannot run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Panic: the test fails, naming what is missing (`scripts/test.sh`, CI).
    Fail,
    /// Print a loud SKIPPED line and pass (a developer's plain `cargo test`).
    Skip,
}

/// The rule, from the two variables' values: `Fail` when `IDHAL_TEST_STRICT` or `CI` is set to
/// anything but empty, `0`, `false` or `no` (case and surrounding blanks ignored), so an
/// unexpected value such as `CI=yes` or `CI=True` is strict too; otherwise `Skip`.
pub fn missing_rule(strict: Option<&OsStr>, ci: Option<&OsStr>) -> Missing {
    let on = |v: Option<&OsStr>| {
        v.is_some_and(|v| {
            let v = v.to_string_lossy().trim().to_ascii_lowercase();
            !matches!(v.as_str(), "" | "0" | "false" | "no")
        })
    };
    if on(strict) || on(ci) {
        Missing::Fail
    } else {
        Missing::Skip
    }
}

/// The rule for this process's environment.
pub fn missing() -> Missing {
    missing_rule(
        std::env::var_os(STRICT_VAR).as_deref(),
        std::env::var_os("CI").as_deref(),
    )
}

/// Called by a test that cannot run here, with why (`"/usr/sbin/knotd missing"`). Panics when the
/// rule says [`Missing::Fail`]; otherwise prints a SKIPPED line and returns, and the caller
/// returns at once.
pub fn skip_or_fail(why: &str) {
    match missing() {
        Missing::Fail => panic!(
            "this test cannot run here: {why} (a failure, not a skip, under scripts/test.sh \
             and CI)"
        ),
        Missing::Skip => eprintln!(
            "\n!!!!!!!! SKIPPED: {why} (with {STRICT_VAR}=1, as scripts/test.sh runs, this fails) !!!!!!!!\n"
        ),
    }
}

/// `Some(v)` when `r` is Ok; otherwise [`skip_or_fail`] with `what: error` and `None`.
pub fn or_skip<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            skip_or_fail(&format!("{what}: {e}"));
            None
        }
    }
}

/// True when every path in `paths` exists and this process is root; otherwise the one rule
/// ([`skip_or_fail`], naming what is missing and how to get it) and false. For tests of real
/// components (OpenVPN, OAR on PostgreSQL, Knot), which run them as their own users.
pub fn require<S: AsRef<str>>(paths: &[S]) -> bool {
    let mut missing: Vec<String> = paths
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| !Path::new(p).exists())
        .map(String::from)
        .collect();
    if !is_root() {
        missing.push("root (PostgreSQL, OAR and OpenVPN run as their own users)".into());
    }
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(&format!(
        "this test needs {} — install scripts/apt-packages.txt (scripts/setup-debian.sh) and \
         run as root",
        missing.join(", ")
    ));
    false
}

/// A fresh temp dir named `<prefix>…`, readable by the components' own users (0755), that is
/// NOT removed on drop: its owner (a fixture's [`process::Reaper`]) removes it.
pub fn keep_dir(prefix: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("a temp dir")
        .keep();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod the temp dir");
    dir
}

/// True when this process runs as root (uid 0), read from /proc (no libc).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The one wait of every suite: polls `cond` every `every` until it returns `Some`, and returns
/// that. When `limit` has passed first it prints the last [`LOG_TAIL`] lines of each of `logs`
/// (the component's own words on why it is not ready; none is fine) and panics naming `what`.
/// The deadline bounds the wait, not the poll period.
#[track_caller]
pub fn wait_logged_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    logs: &[&Path],
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            for log in logs {
                eprintln!(
                    "---- {} (last {LOG_TAIL} lines)\n{}",
                    log.display(),
                    tail(log)
                );
            }
            panic!("{what}: not within {limit:?}");
        }
        std::thread::sleep(every);
    }
}

/// [`wait_logged_every`] with no logs.
#[track_caller]
pub fn wait_until_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    cond: impl FnMut() -> Option<T>,
) -> T {
    wait_logged_every(what, limit, every, &[], cond)
}

/// [`wait_until_every`] polling every 100 ms.
#[track_caller]
pub fn wait_until<T>(what: &str, limit: Duration, cond: impl FnMut() -> Option<T>) -> T {
    wait_until_every(what, limit, Duration::from_millis(100), cond)
}

/// [`wait_until`] for a condition that is only true or false.
#[track_caller]
pub fn wait_for(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    wait_until(what, limit, || cond().then_some(()))
}

/// [`wait_for`] (every 50 ms) that prints the tails of `logs` when `limit` passes first.
#[track_caller]
pub fn wait_logged(what: &str, limit: Duration, logs: &[&Path], mut cond: impl FnMut() -> bool) {
    let every = Duration::from_millis(50);
    wait_logged_every(what, limit, every, logs, || cond().then_some(()))
}

/// How many lines of a log [`wait_logged`] and [`Logged`]'s drop print.
pub const LOG_TAIL: usize = 60;

/// The last [`LOG_TAIL`] lines of the file at `path` (empty when it cannot be read).
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}

/// A TCP port nobody listens on right now on 127.0.0.1 (bind :0, read it, close). For servers
/// that cannot be told to pick one themselves (OpenVPN, PostgreSQL, Knot); a server that can
/// should listen on :0 and say its port instead.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port on 127.0.0.1")
        .port()
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(strict: Option<&str>, ci: Option<&str>) -> Missing {
        missing_rule(strict.map(OsStr::new), ci.map(OsStr::new))
    }

    #[test]
    fn nothing_set_skips() {
        assert_eq!(rule(None, None), Missing::Skip);
    }

    #[test]
    fn the_test_script_variable_fails() {
        assert_eq!(rule(Some("1"), None), Missing::Fail);
        // Whatever CI says, the README's command is strict.
        assert_eq!(rule(Some("1"), Some("false")), Missing::Fail);
    }

    #[test]
    fn every_truthy_ci_value_fails() {
        // The three rules this replaces each missed one of these ("true" only; "true"|"1";
        // any value, even "false").
        for v in ["true", "1", "TRUE", "True", "yes", " true\n", "github"] {
            assert_eq!(rule(None, Some(v)), Missing::Fail, "CI={v:?}");
        }
    }

    #[test]
    fn false_empty_or_zero_skips() {
        for v in ["", "0", "false", "FALSE", "no", " 0 "] {
            assert_eq!(rule(None, Some(v)), Missing::Skip, "CI={v:?}");
            assert_eq!(rule(Some(v), None), Missing::Skip, "{STRICT_VAR}={v:?}");
        }
    }

    #[test]
    fn non_utf8_values_are_strict() {
        use std::os::unix::ffi::OsStrExt as _;
        let odd = OsStr::from_bytes(b"\xff\xfe");
        assert_eq!(missing_rule(None, Some(odd)), Missing::Fail);
    }

    /// Not a check of its own: the child process of the test below, which runs this test
    /// binary again with chosen variables. Run directly, it does nothing.
    #[test]
    fn child_that_cannot_run() {
        if std::env::var_os("IDHAL_TEST_SUPPORT_CHILD").is_some() {
            skip_or_fail("the child's missing thing");
        }
    }

    /// The rule as a test binary meets it: its exit status and what it prints, per environment.
    #[test]
    fn a_test_that_cannot_run_fails_under_the_test_script_and_ci_and_skips_otherwise() {
        let run = |vars: &[(&str, &str)]| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "tests::child_that_cannot_run", "--nocapture"])
                .env_remove("CI")
                .env_remove(STRICT_VAR)
                .env("IDHAL_TEST_SUPPORT_CHILD", "1")
                .envs(vars.iter().copied())
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.success(), text)
        };
        for strict in [&[(STRICT_VAR, "1")][..], &[("CI", "true")], &[("CI", "1")]] {
            let (ok, text) = run(strict);
            assert!(!ok, "{strict:?} must fail: {text}");
            assert!(
                text.contains("cannot run here: the child's missing thing"),
                "{text}"
            );
        }
        for plain in [&[][..], &[("CI", "false")], &[(STRICT_VAR, "0")]] {
            let (ok, text) = run(plain);
            assert!(ok, "{plain:?} must skip: {text}");
            assert!(
                text.contains("SKIPPED: the child's missing thing"),
                "{text}"
            );
        }
    }

    #[test]
    fn or_skip_passes_values_through() {
        assert_eq!(or_skip(Ok::<_, String>(3), "x"), Some(3));
    }

    #[test]
    fn wait_until_returns_the_value_once_the_condition_holds() {
        let mut n = 0;
        let v = wait_until_every(
            "n reaches 3",
            Duration::from_secs(60),
            Duration::ZERO,
            || {
                n += 1;
                (n >= 3).then_some(n)
            },
        );
        assert_eq!(v, 3);
    }

    #[test]
    #[should_panic(expected = "never: not within")]
    fn wait_until_panics_at_the_deadline_naming_what() {
        wait_until_every("never", Duration::ZERO, Duration::ZERO, || None::<()>);
    }

    /// Not a check of its own: the child of the test below. Run directly, it does nothing.
    #[test]
    fn child_that_times_out_with_a_log() {
        if let Some(log) = std::env::var_os("IDHAL_TEST_SUPPORT_LOG") {
            wait_logged("the server up", Duration::ZERO, &[Path::new(&log)], || {
                false
            });
        }
    }

    #[test]
    fn wait_logged_prints_the_logs_tail_and_names_what_at_the_deadline() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("server.log");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, text + "bind: address in use\n").unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::child_that_times_out_with_a_log",
                "--nocapture",
            ])
            .env("IDHAL_TEST_SUPPORT_LOG", &log)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(101), "{text}");
        assert!(text.contains("the server up: not within 0ns"), "{text}");
        assert!(text.contains("bind: address in use"), "{text}");
        // The tail only: the first lines stay out of the way.
        assert!(text.contains("\nline 100\n"), "{text}");
        assert!(!text.contains("\nline 41\n"), "{text}");
    }

    #[test]
    fn wait_logged_returns_once_the_condition_holds() {
        let mut n = 0;
        wait_logged("n reaches 2", Duration::from_secs(60), &[], || {
            n += 1;
            n >= 2
        });
        assert_eq!(n, 2);
    }

    #[test]
    fn free_port_is_free_on_loopback() {
        let p = free_port();
        assert_ne!(p, 0);
        // Nobody holds it: it can be bound again at once.
        TcpListener::bind(("127.0.0.1", p)).unwrap();
    }

    #[test]
    fn now_is_after_the_projects_start() {
        // 2024-01-01: a clock or unit mistake (ms, ns) would be far off either way.
        let n = now();
        assert!((1_704_067_200..4_102_444_800).contains(&n), "{n}");
    }
}
