//! Helpers every idhal test suite shares. A dev-dependency only (and a dependency of the VM
//! harness, itself test-only): nothing here is ever shipped.
//!
//! It owns one rule: what a test does when it cannot run here (a Debian package missing, not
//! root, no QEMU). Under the README's test command (`scripts/test.sh`, which exports
//! `IDHAL_TEST_STRICT=1`) and in CI that is a FAILURE; in a developer's plain `cargo test` it is a
//! loud `SKIPPED` line. Every such site calls [`skip_or_fail`]; none decides for itself.
use std::ffi::OsStr;
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

/// True when this process runs as root (uid 0), read from /proc (no libc).
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Polls `cond` every `every` until it returns `Some`, and returns that; panics naming `what`
/// when `limit` has passed first. The deadline bounds the wait, not the poll period.
pub fn wait_until_every<T>(
    what: &str,
    limit: Duration,
    every: Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(every);
    }
}

/// [`wait_until_every`] polling every 100 ms.
pub fn wait_until<T>(what: &str, limit: Duration, cond: impl FnMut() -> Option<T>) -> T {
    wait_until_every(what, limit, Duration::from_millis(100), cond)
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
}
