//! Running processes from tests: a command that must succeed ([`ok`], [`openssl`]), a child that
//! is stopped and waited for when dropped ([`Logged`], [`Reaped`]), signals, who listens on a
//! port, and a [`Reaper`] that stops long-lived components even when the test process dies.
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The stdout of a command that must have succeeded; otherwise panics with its exit code,
/// stdout and stderr (the program's own words on what went wrong).
#[track_caller]
pub fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "command failed ({:?}):\n{}{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("stdout in UTF-8")
}

fn openssl_output(dir: &Path, args: &[&str]) -> Output {
    Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("running openssl")
}

/// The real `openssl` run in `dir`: whether it succeeded, and its stdout followed by its
/// stderr. For checks that expect a refusal (`openssl verify` of a revoked certificate).
pub fn openssl_try(dir: &Path, args: &[&str]) -> (bool, String) {
    let o = openssl_output(dir, args);
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// The real `openssl` run in `dir`, which must succeed; its stdout.
#[track_caller]
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let o = openssl_output(dir, args);
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Sends SIG (`TERM`, `INT`, `KILL`...) to `target`: a pid, or `-PGID` for a whole process
/// group. The shell's builtin kill: procps' /usr/bin/kill is not on every minimal system.
pub fn signal(sig: &str, target: &str) {
    let _ = Command::new("/bin/sh")
        .args(["-c", "kill -\"$0\" \"$1\" 2>/dev/null", sig, target])
        .status();
}

/// Whether process `pid` is alive (a zombie is not: it runs nothing any more).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

/// Who listens on TCP `port`: (on 127.0.0.1, on any other address), from /proc/net/tcp. A test
/// component must show (true, false).
pub fn listening(port: u16) -> (bool, bool) {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let (mut loopback, mut other) = (false, false);
    for l in tcp.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Field 3 is the socket state; 0A is LISTEN.
        if f.len() < 4 || f[3] != "0A" {
            continue;
        }
        let Some((addr, p)) = f[1].split_once(':') else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() != Some(port) {
            continue;
        }
        match addr {
            "0100007F" => loopback = true,
            _ => other = true,
        }
    }
    (loopback, other)
}

/// How long a stopped child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// SIGTERM to `child` (to its process group when `group`), then SIGKILL after [`STOP_GRACE`];
/// waits for it either way. Never panics: it runs in `drop`.
pub fn stop(child: &mut Child, group: bool) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let target = |pid: u32| {
        if group {
            format!("-{pid}")
        } else {
            pid.to_string()
        }
    };
    signal("TERM", &target(child.id()));
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    signal("KILL", &target(child.id()));
    let _ = child.wait();
}

/// A child that is killed (SIGKILL) and waited for when dropped: no zombie, no stray server
/// after a failing test.
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts a server that announces where it listens on its first stdout line (`idhal serve`
/// prints `listening on http://ADDR`), reads that line within `limit`, and returns the child
/// (killed on drop) and what follows `prefix`. Set the child's stderr before calling (a file, or
/// piped to read afterwards). Panics, after killing it, when it says something else, exits, or
/// stays silent: with the line and, when piped, its stderr.
#[track_caller]
pub fn announced(cmd: &mut Command, prefix: &str, limit: Duration) -> (Reaped, String) {
    use std::io::{BufRead as _, Read as _};
    let mut child = Reaped(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program())),
    );
    let stdout = child.stdout.take().expect("a piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(limit)
        .unwrap_or_else(|_| format!("(nothing within {limit:?})"));
    match line.trim().strip_prefix(prefix) {
        Some(rest) => (child, rest.to_owned()),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!(
                "{:?} did not announce {prefix:?}: {line:?}\n{err}",
                cmd.get_program()
            );
        }
    }
}

/// A daemon-like child in its own process group, stdout and stderr to a log file. Dropped, it
/// gets SIGTERM (then SIGKILL after [`STOP_GRACE`]), is waited for, and its log's tail is
/// printed when the test is failing.
pub struct Logged {
    pub child: Child,
    pub log: PathBuf,
}

impl Logged {
    /// Spawns `cmd` with stdin from /dev/null and its output to `log` (created anew).
    pub fn spawn(cmd: &mut Command, log: impl Into<PathBuf>) -> Logged {
        let log = log.into();
        let f = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("a second handle on the log"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", cmd.get_program()));
        Logged { child, log }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the log holds `needle`; panics with the log's tail when `limit` passes or
    /// when the child exits first (then waiting longer cannot help).
    #[track_caller]
    pub fn wait_log(&mut self, needle: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        while !self.log().contains(needle) {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "{} exited ({st}) before saying {needle:?}:\n{}",
                    self.log.display(),
                    crate::tail(&self.log)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not say {needle:?} within {limit:?}:\n{}",
                self.log.display(),
                crate::tail(&self.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM to the child alone (not its group), waited for: what `drop` does, now.
    pub fn stop(&mut self) {
        stop(&mut self.child, false);
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        stop(&mut self.child, false);
        if std::thread::panicking() {
            eprintln!("---- {}\n{}", self.log.display(), crate::tail(&self.log));
        }
    }
}

/// Kills registered process groups and removes a directory when this test process exits,
/// however it exits (a panic, `exit`, SIGKILL): its stdin is a pipe that only closes then. For
/// components shared by every test of a binary (in a `static`, never dropped).
pub struct Reaper {
    stdin: Mutex<ChildStdin>,
    /// Never waited for: it must outlive this process to do its job.
    _child: Child,
}

impl Reaper {
    pub fn new(dir: &Path) -> Self {
        let script = r#"dir=$1; pgs=""
while read -r g; do pgs="$pgs $g"; done
for g in $pgs; do kill -TERM "-$g" 2>/dev/null; done
sleep 2
for g in $pgs; do kill -KILL "-$g" 2>/dev/null; done
rm -rf -- "$dir""#;
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .arg("reaper")
            .arg(dir)
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("start the reaper");
        Self {
            stdin: Mutex::new(child.stdin.take().expect("the reaper's stdin")),
            _child: child,
        }
    }

    /// Registers process group `pgid` (a child started with `process_group(0)`: its pid).
    pub fn watch(&self, pgid: u32) {
        let _ = writeln!(
            self.stdin.lock().unwrap_or_else(|p| p.into_inner()),
            "{pgid}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c SCRIPT` as a [`Logged`] child in `dir`, once it has printed `ready`.
    fn sh(dir: &Path, script: &str) -> Logged {
        let mut p = Logged::spawn(
            Command::new("/bin/sh").args(["-c", script]),
            dir.join("sh.log"),
        );
        p.wait_log("ready", Duration::from_secs(30));
        p
    }

    #[test]
    fn ok_returns_stdout_of_a_success() {
        let o = Command::new("/bin/sh")
            .args(["-c", "echo hello"])
            .output()
            .unwrap();
        assert_eq!(ok(o), "hello\n");
    }

    #[test]
    #[should_panic(expected = "command failed (Some(3)):\nout\nwhy it failed")]
    fn ok_panics_with_the_code_and_both_outputs() {
        let o = Command::new("/bin/sh")
            .args(["-c", "echo out; echo why it failed >&2; exit 3"])
            .output()
            .unwrap();
        ok(o);
    }

    #[test]
    fn logged_child_is_stopped_and_waited_for_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = sh(d.path(), "echo ready; exec sleep 600");
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        // Waited for: not even a zombie is left.
        assert!(!alive(pid));
    }

    #[test]
    fn a_child_that_ignores_sigterm_is_killed_after_the_grace() {
        let d = tempfile::tempdir().unwrap();
        let p = sh(
            d.path(),
            "trap '' TERM; echo ready; while :; do sleep 1; done",
        );
        let (pid, t) = (p.pid(), Instant::now());
        drop(p);
        assert!(!alive(pid));
        eprintln!("stopped in {:.1} s", t.elapsed().as_secs_f64());
    }

    #[test]
    #[should_panic(expected = "exited (exit status: 7) before saying \"never\"")]
    fn wait_log_fails_at_once_when_the_child_exits() {
        let d = tempfile::tempdir().unwrap();
        let mut p = Logged::spawn(
            Command::new("/bin/sh").args(["-c", "echo bye; exit 7"]),
            d.path().join("gone.log"),
        );
        p.wait_log("never", Duration::from_secs(600));
    }

    #[test]
    fn announced_returns_what_follows_the_prefix() {
        let (child, addr) = announced(
            Command::new("/bin/sh").args([
                "-c",
                "echo 'listening on http://127.0.0.1:9'; exec sleep 600",
            ]),
            "listening on http://",
            Duration::from_secs(30),
        );
        assert_eq!(addr, "127.0.0.1:9");
        let pid = child.id();
        drop(child);
        assert!(!alive(pid));
    }

    #[test]
    #[should_panic(expected = "did not announce \"listening on \": \"\"\nbind: Address in use")]
    fn announced_fails_with_stderr_when_the_server_exits_first() {
        announced(
            Command::new("/bin/sh")
                .args(["-c", "echo 'bind: Address in use' >&2; exit 1"])
                .stderr(Stdio::piped()),
            "listening on ",
            Duration::from_secs(30),
        );
    }

    #[test]
    #[should_panic(expected = "did not announce \"listening on \": \"(nothing within 200ms)\"")]
    fn announced_fails_at_the_deadline_when_the_server_is_silent() {
        announced(
            Command::new("/bin/sleep").arg("600"),
            "listening on ",
            Duration::from_millis(200),
        );
    }

    #[test]
    fn reaped_child_is_killed_on_drop() {
        let c = Reaped(Command::new("/bin/sleep").arg("600").spawn().unwrap());
        let pid = c.id();
        assert!(alive(pid));
        drop(c);
        assert!(!alive(pid));
    }

    #[test]
    fn listening_tells_loopback_from_other_addresses() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        assert_eq!(listening(port), (true, false));
        drop(l);
        // Bounded: a child forked by a concurrent test holds the socket until it execs.
        crate::wait_for("the port closed", Duration::from_secs(30), || {
            listening(port) == (false, false)
        });
    }
}
