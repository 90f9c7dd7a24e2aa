//! Running backend commands with a hard time limit (the child is killed when it is reached), a
//! shared deadline for a whole hook, and the per-node lock files. No shell is ever involved.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} did not finish within {after:?} and was killed")]
    Timeout { program: String, after: Duration },
    #[error("waiting for {program}")]
    Wait {
        program: String,
        source: std::io::Error,
    },
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// stdout or stderr went past the read limit: the rest was thrown away.
    pub overflow: bool,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// The last non-empty line of stderr (else stdout), for one-line error messages.
    pub fn last_line(&self) -> &str {
        [&self.stderr, &self.stdout]
            .iter()
            .flat_map(|s| s.lines().rev())
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("(no output)")
    }
}

/// Runs `cmd` with stdin closed, collecting its output, killing it after `timeout`.
pub fn run(cmd: &mut Command, timeout: Duration) -> Result<Finished, RunError> {
    run_with(cmd, timeout, None, 1 << 20)
}

/// As `run`, feeding `stdin` (from a thread: a child that never reads cannot block the
/// caller past `timeout`) and reading at most `max_output` bytes of each stream.
pub fn run_with(
    cmd: &mut Command,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
    max_output: u64,
) -> Result<Finished, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| RunError::Spawn {
            program: program.clone(),
            source,
        })?;
    if let (Some(bytes), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // A child that exits early or is killed breaks the pipe: the write then fails, ignored.
        thread::spawn(move || {
            use std::io::Write as _;
            let _ = pipe.write_all(&bytes);
        });
    }
    // Pipes are drained on threads so a chatty child cannot block on a full pipe; past the
    // limit the rest is read and dropped, so the child still finishes.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut overflow = false;
            if let Some(mut r) = r {
                let _ = (&mut r).take(max_output).read_to_end(&mut buf);
                overflow = std::io::copy(&mut r, &mut std::io::sink()).is_ok_and(|n| n > 0);
            }
            (String::from_utf8_lossy(&buf).into_owned(), overflow)
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let mut pause = Duration::from_millis(2);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RunError::Wait { program, source });
            }
        }
        if started.elapsed() >= timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunError::Timeout {
                program,
                after: timeout,
            });
        }
        thread::sleep(pause.min(timeout.saturating_sub(started.elapsed())));
        pause = (pause * 2).min(Duration::from_millis(20));
    };
    let (stdout, over_out) = out.join().unwrap_or_default();
    let (stderr, over_err) = err.join().unwrap_or_default();
    Ok(Finished {
        code: status.code(),
        stdout,
        stderr,
        overflow: over_out || over_err,
    })
}

/// The time left for one hook run. Each step asks for `cap(step_limit)` so the sum of all
/// steps can never exceed the hook's budget.
#[derive(Debug, Clone, Copy)]
pub struct Deadline(Instant);

impl Deadline {
    pub fn after(d: Duration) -> Self {
        Self(Instant::now() + d)
    }

    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(Instant::now())
    }

    pub fn cap(&self, step: Duration) -> Duration {
        step.min(self.remaining())
    }

    pub fn passed(&self) -> bool {
        self.remaining().is_zero()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("cannot open lock file {path}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("another hook held {path} for more than {after:?}")]
    Busy { path: PathBuf, after: Duration },
    #[error("locking {path}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// An exclusive flock on `DIR/locks/NAME.lock`, released when dropped (or when the process dies,
/// so a killed hook never leaves a node locked).
#[derive(Debug)]
pub struct NodeLock {
    _file: File,
}

impl NodeLock {
    /// `name` must already be validated (a label or node id): it becomes a file name.
    pub fn acquire(state_dir: &Path, name: &str, wait: Duration) -> Result<Self, LockError> {
        let dir = state_dir.join("locks");
        let path = dir.join(format!("{name}.lock"));
        let open = || {
            std::fs::create_dir_all(&dir)?;
            OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
        };
        let file = open().map_err(|source| LockError::Open {
            path: path.clone(),
            source,
        })?;
        let started = Instant::now();
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(source)) => {
                    return Err(LockError::Lock { path, source })
                }
            }
            if started.elapsed() >= wait {
                return Err(LockError::Busy { path, after: wait });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_kills() {
        // `sleep 600`: only a kill ends it within the generous bound below, however loaded
        // the machine is; the figure is printed, not asserted.
        let t = Instant::now();
        let e = run(Command::new("sleep").arg("600"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
        eprintln!("timeout_kills: returned after {:?}", t.elapsed());
        assert!(t.elapsed() < Duration::from_secs(120), "{:?}", t.elapsed());
    }

    #[test]
    fn output_collected() {
        let f = run(Command::new("echo").arg("hi"), Duration::from_secs(5)).unwrap();
        assert!(f.success());
        assert_eq!(f.last_line(), "hi");
    }

    #[test]
    fn stdin_is_fed_and_output_bounded() {
        let f = run_with(
            &mut Command::new("cat"),
            Duration::from_secs(30),
            Some(b"route add\n".to_vec()),
            1 << 20,
        )
        .unwrap();
        assert_eq!((f.stdout.as_str(), f.overflow), ("route add\n", false));
        // 1 MiB of output against a 100-byte limit: cut, flagged, and the child still finishes.
        let f = run_with(
            Command::new("head").args(["-c", "1048576", "/dev/zero"]),
            Duration::from_secs(60),
            None,
            100,
        )
        .unwrap();
        assert!(f.success() && f.overflow && f.stdout.len() == 100, "{f:?}");
        // A child that never reads 8 MiB of stdin: killed at the timeout, the caller not
        // blocked on the full pipe.
        let e = run_with(
            Command::new("sleep").arg("600"),
            Duration::from_millis(200),
            Some(vec![b'x'; 8 << 20]),
            100,
        )
        .unwrap_err();
        assert!(matches!(e, RunError::Timeout { .. }), "{e}");
    }

    #[test]
    fn lock_is_exclusive() {
        let d = tempfile::tempdir().unwrap();
        let a = NodeLock::acquire(d.path(), "n1", Duration::from_millis(10)).unwrap();
        let e = NodeLock::acquire(d.path(), "n1", Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }));
        NodeLock::acquire(d.path(), "n2", Duration::from_millis(10)).unwrap();
        drop(a);
        NodeLock::acquire(d.path(), "n1", Duration::from_millis(10)).unwrap();
    }
}
