//! `idhal-bootstrap status [--wait]`: what this node pinned, accepted, ran and enrolled as, read
//! from the state directory only (no network); `--wait` looks again until this boot's work is
//! done or failed, bounded by a deadline. Human text by default, `--json` for tools.

use crate::config::Proc;
use crate::enroll::enrolled;
use crate::error::{AgentError, Exit};
use crate::pin;
use crate::state::StateDir;
use crate::watchdog;
use idhal_manifest::time::rfc3339;
use idhal_manifest::{Expiry, Frequency, Manifest, Policy};
use std::fmt::Write as _;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `last-run` is a few lines the agent writes; more than this is not its report.
const MAX_REPORT: u64 = 4096;

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn opt_num(n: Option<u64>) -> String {
    n.map_or("null".into(), |n| n.to_string())
}

struct Row {
    id: String,
    frequency: &'static str,
    state: &'static str,
    finished: Option<u64>,
    outcome: String,
    duration_ms: Option<u64>,
    log: String,
    /// Its record (shown) was written in this boot.
    this_boot: bool,
}

// Not inlined into main: at opt-level z that grew the agent by 2 KiB (scripts/agent-size.sh).
#[inline(never)]
pub fn status(state_dir: &Path, json: bool, proc: &Proc) -> Result<Exit, AgentError> {
    let (out, exit, _) = look(state_dir, json, proc)?;
    print!("{out}{}", if json { "}\n" } else { "" });
    Ok(exit)
}

/// `--wait`'s output so far: the last look, and whether the result was printed. The watchdog
/// thread and the looking thread both finish through it, so exactly one of them prints.
struct Waiting {
    printed: bool,
    last: String,
    json: bool,
    started: Option<Instant>,
}

static WAITING: Mutex<Waiting> = Mutex::new(Waiting {
    printed: false,
    last: String::new(),
    json: false,
    started: None,
});

fn waiting() -> std::sync::MutexGuard<'static, Waiting> {
    WAITING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Prints `out` (else the last look) with the wait's result, once; false if already printed.
fn finish(out: Option<String>, exit: Exit) -> bool {
    let mut w = waiting();
    if w.printed {
        return false;
    }
    w.printed = true;
    let out = out.unwrap_or_else(|| std::mem::take(&mut w.last));
    let result = match exit {
        Exit::Ok => "done",
        Exit::ScriptletFailed => "scriptlet-failed",
        Exit::Refused => "refused",
        Exit::Fetch => "fetch-failed",
        Exit::Config => "config-error",
        Exit::TimedOut => "timed-out",
        _ => "state-error",
    };
    let ms = w.started.map_or(0, |s| s.elapsed().as_millis() as u64);
    let code = exit as u8;
    // Ends with a line break: stdout is flushed at once (and at `process::exit` anyway).
    print!(
        "{out}{}",
        if w.json {
            format!(",\"wait\":{{\"result\":\"{result}\",\"exit\":{code},\"waited_ms\":{ms}}}}}\n")
        } else {
            format!("wait:       {result} (exit {code}) after {ms} ms\n")
        }
    );
    true
}

/// The watchdog's job at the deadline, whatever the looking thread is doing: the one way
/// `--wait` times out.
fn timed_out() {
    if finish(None, Exit::TimedOut) {
        std::process::exit(Exit::TimedOut as i32);
    }
}

/// `status --wait`: looks at the state directory until this boot's work has an outcome, then
/// prints the last look and the outcome. Never past `timeout` (monotonic clock): a watchdog
/// thread prints the last look and exits 10, even while a read blocks (a FIFO, a hung disk).
/// A run in progress holding `lock` is waited for, and an outcome counts once two looks
/// 100 ms apart agree with no run holding `lock`: a run drops it just before it writes
/// `last-run`, and a manifest read while a run replaces it may not verify for a moment.
#[inline(never)]
pub fn wait(
    state_dir: &Path,
    json: bool,
    proc: &Proc,
    timeout: Duration,
    poll_cap: Duration,
) -> Result<Exit, AgentError> {
    *waiting() = Waiting {
        printed: false,
        last: head(state_dir, json),
        json,
        started: Some(Instant::now()),
    };
    watchdog::after(timeout, timed_out).map_err(|e| AgentError::state("watchdog thread", e))?;
    let state = StateDir::new(state_dir);
    // Milliseconds: Duration's checked arithmetic costs the agent more than it saves here.
    let (mut pause, mut seen) = (50, None);
    loop {
        let (out, _, outcome) = look(state_dir, json, proc).inspect_err(|_| {
            // Nothing to print: the error is the answer (logged by main).
            waiting().printed = true;
        })?;
        match outcome {
            Some(exit) if !run_in_progress(&state) => {
                if seen.as_ref() == Some(&out) {
                    finish(Some(out), exit);
                    return Ok(exit);
                }
                seen = Some(out.clone());
                pause = 100;
            }
            _ => seen = None,
        }
        waiting().last = out;
        std::thread::sleep(Duration::from_millis(pause));
        pause = (pause * 2).min(poll_cap.as_millis() as u64);
    }
}

/// Whether a run holds `lock` now. Probed with a shared lock taken and dropped at once, only
/// when a look found an outcome: a run starting in that instant exits 7 and the next one does
/// its work, as with any other lock holder.
fn run_in_progress(state: &StateDir) -> bool {
    File::open(state.path("lock"))
        .is_ok_and(|f| matches!(f.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
}

/// One look: the text to print (JSON without its closing brace), `status`'s exit code, and the
/// outcome `--wait` ends with (`None`: not yet).
fn look(
    state_dir: &Path,
    json: bool,
    proc: &Proc,
) -> Result<(String, Exit, Option<Exit>), AgentError> {
    let state = StateDir::new(state_dir);
    let pinned = pin::load(&state)?;
    let key = pinned.as_ref().map(|p| p.head.key.clone());
    let serial = state.last_serial()?;
    let last_run = read_report(&state)?;
    let enrollment = enrolled(&state)?;
    let boot_id = proc.boot_id();
    let (mut rows, mut problem, mut expires) = (Vec::new(), None, None);
    // Shown whatever its age: an expired manifest still says what ran.
    let policy = Policy {
        now: 0,
        expiry: Expiry::Ignore,
        last_serial: None,
    };
    let mut bytes = Vec::new();
    // A stored manifest that fails verification is a problem to show, not "pending".
    let mut stored = false;
    if let Some(key) = &key {
        match state.accepted_manifest(key, &policy, &mut bytes) {
            Ok(None) => {}
            Ok(Some(m)) => {
                stored = true;
                expires = Some(m.expires);
                rows = rows_of(&state, &m, &boot_id)?;
            }
            Err(AgentError::Refused(e)) => {
                stored = true;
                problem = Some(format!("stored manifest fails verification: {e}"));
            }
            Err(e) => return Err(e),
        }
    }

    let exit = if problem.is_some() {
        // The stored copy no longer verifies (edited on disk, or a different key pinned):
        // what ran cannot be shown, and a tool waiting on this node must not read "ok".
        Exit::Refused
    } else if rows.iter().any(|r| r.state == "failed") {
        Exit::ScriptletFailed
    } else if !stored || rows.iter().any(|r| r.state == "pending") {
        Exit::Pending
    } else {
        Exit::Ok
    };
    let last = last_run.as_deref().map(|t| {
        let get = |k: &str| {
            t.lines()
                .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or("")
                .to_owned()
        };
        (
            get("finished").parse::<u64>().unwrap_or(0),
            get("exit"),
            get("message"),
            get("boot_id") == boot_id,
        )
    });
    // This boot's work: the last run of this boot failed before any scriptlet (its report is
    // the only trace: a refusal changes nothing else), or a scriptlet failed in this boot, or
    // an accepted manifest with everything done. A report or a failure an earlier boot left
    // waits for this boot's run.
    let outcome = match last.as_ref().filter(|l| l.3).map(|l| l.1.as_str()) {
        Some("3") => Some(Exit::Config),
        Some("4") => Some(Exit::Fetch),
        Some("5") => Some(Exit::Refused),
        Some("8") => Some(Exit::State),
        _ if problem.is_some() => Some(Exit::Refused),
        _ if rows.iter().any(|r| r.state == "failed" && r.this_boot) => Some(Exit::ScriptletFailed),
        _ if exit == Exit::Ok => Some(Exit::Ok),
        _ => None,
    };

    let mut out = head(state_dir, json);
    if json {
        out.push(',');
        match &pinned {
            Some(p) => {
                let _ = write!(
                    out,
                    "\"pinned_key\":{{\"id\":\"{}\",\"fingerprint\":\"{}\",\"rotation\":{},\"origin\":\"{}\"}},",
                    p.head.key.id(),
                    p.head.key.fingerprint(),
                    p.head.sequence,
                    p.origin
                );
            }
            None => out.push_str("\"pinned_key\":null,"),
        }
        let _ = write!(
            out,
            "\"serial\":{},\"expires\":{},",
            opt_num(serial),
            opt_num(expires)
        );
        match &last {
            Some((t, code, msg, this_boot)) => {
                let _ = write!(
                    out,
                    "\"last_run\":{{\"finished\":{t},\"exit\":{},\"message\":{},\"this_boot\":{this_boot}}},",
                    code.parse::<u8>().unwrap_or(1),
                    json_str(msg)
                );
            }
            None => out.push_str("\"last_run\":null,"),
        }
        match &enrollment {
            Some((node, address)) => {
                let _ = write!(
                    out,
                    "\"enrollment\":{{\"node\":{},\"address\":{}}},",
                    json_str(node),
                    json_str(address)
                );
            }
            None => out.push_str("\"enrollment\":null,"),
        }
        let _ = write!(
            out,
            "\"problem\":{},",
            problem.as_deref().map_or("null".into(), json_str)
        );
        out.push_str("\"scriptlets\":[");
        for (i, r) in rows.iter().enumerate() {
            let _ = write!(
                out,
                "{}{{\"id\":{},\"frequency\":\"{}\",\"state\":\"{}\",\"finished\":{},\"outcome\":{},\"duration_ms\":{},\"log\":{}}}",
                if i > 0 { "," } else { "" },
                json_str(&r.id),
                r.frequency,
                r.state,
                opt_num(r.finished),
                json_str(&r.outcome),
                opt_num(r.duration_ms),
                json_str(&r.log)
            );
        }
        out.push(']');
    } else {
        let _ = match &pinned {
            Some(p) => writeln!(
                out,
                "pinned key: {} ({}), rotation {} from key {}",
                p.head.key.id(),
                p.head.key.fingerprint(),
                p.head.sequence,
                p.origin
            ),
            None => writeln!(out, "pinned key: none yet"),
        };
        let _ = match (serial, expires) {
            (Some(s), Some(e)) => writeln!(out, "serial:     {s} (expires {})", rfc3339(e)),
            (Some(s), None) => writeln!(out, "serial:     {s}"),
            _ => writeln!(out, "serial:     no manifest accepted yet"),
        };
        if let Some((t, code, msg, _)) = &last {
            let _ = writeln!(out, "last run:   {} exit {code}: {msg}", rfc3339(*t));
        }
        let _ = match &enrollment {
            Some((node, address)) => writeln!(out, "enrolled:   {node}, address {address}"),
            None => writeln!(out, "enrolled:   not enrolled"),
        };
        if let Some(p) = &problem {
            let _ = writeln!(out, "problem:    {p}");
        }
        for r in &rows {
            let when = r.finished.map(rfc3339).unwrap_or_else(|| "-".into());
            let took = r
                .duration_ms
                .map(|d| format!("{d}ms"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                out,
                "  {:<24} {:<6} {:<7} {when:<20} {:<9} {took:>8}  {}",
                r.id, r.frequency, r.state, r.outcome, r.log
            );
        }
    }
    Ok((out, exit, outcome))
}

/// How every look starts (JSON: still open), and all a look that never came shows.
fn head(state_dir: &Path, json: bool) -> String {
    if json {
        format!(
            "{{\"state_dir\":{}",
            json_str(&state_dir.display().to_string())
        )
    } else {
        format!("state dir:  {}\n", state_dir.display())
    }
}

/// `last-run`, at most `MAX_REPORT` bytes of it, whatever its bytes: a report, never a reason
/// for `status` to fail.
fn read_report(state: &StateDir) -> Result<Option<String>, AgentError> {
    let path = state.path("last-run");
    let mut bytes = Vec::new();
    match File::open(&path).and_then(|f| f.take(MAX_REPORT).read_to_end(&mut bytes)) {
        Ok(_) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AgentError::state(&path, e)),
    }
}

fn rows_of(state: &StateDir, m: &Manifest, boot_id: &str) -> Result<Vec<Row>, AgentError> {
    let mut rows = Vec::with_capacity(m.scriptlets.len());
    for s in &m.scriptlets {
        let id = s.id.as_str();
        let done = state.record(id, "done")?;
        let failed = state.record(id, "failed")?;
        // `boot` and `always` are this boot's work: pending until this boot's run ran them.
        let due = match s.frequency {
            Frequency::Once => done.is_none(),
            Frequency::Boot | Frequency::Always => {
                done.as_ref().is_none_or(|r| r.boot_id != boot_id)
            }
        };
        // A failure newer than the last success is what the admin needs to see.
        let failed_last = match (&done, &failed) {
            (Some(d), Some(f)) => f.finished >= d.finished,
            (None, Some(_)) => true,
            _ => false,
        };
        let (st, rec) = if failed_last {
            ("failed", failed.as_ref())
        } else if due {
            ("pending", done.as_ref())
        } else {
            ("done", done.as_ref())
        };
        let log = state.scriptlet_dir(id).join("log");
        rows.push(Row {
            id: id.to_owned(),
            frequency: s.frequency.as_str(),
            state: st,
            finished: rec.map(|r| r.finished),
            outcome: rec.map(|r| r.outcome.clone()).unwrap_or_else(|| "-".into()),
            duration_ms: rec.map(|r| r.duration_ms),
            log: if log.exists() {
                log.display().to_string()
            } else {
                "-".into()
            },
            this_boot: rec.is_some_and(|r| r.boot_id == boot_id),
        });
    }
    Ok(rows)
}
