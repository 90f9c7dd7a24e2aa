//! `idhal-bootstrap status`: what this node pinned, accepted, ran and enrolled as, read from the
//! state directory only (no network). Human text by default, `--json` for tools.

use crate::config::Proc;
use crate::enroll::enrolled;
use crate::error::{AgentError, Exit};
use crate::pin::load_pinned;
use crate::run::is_due;
use crate::state::StateDir;
use idhal_manifest::time::rfc3339;
use idhal_manifest::{Expiry, Manifest, Policy};
use std::fmt::Write as _;
use std::path::Path;

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
}

// Not inlined into main: at opt-level z that grew the agent by 2 KiB (scripts/agent-size.sh).
#[inline(never)]
pub fn status(state_dir: &Path, json: bool, proc: &Proc) -> Result<Exit, AgentError> {
    let state = StateDir::new(state_dir);
    let key = load_pinned(&state)?;
    let serial = state.last_serial()?;
    let last_run = state.read(&state.path("last-run"))?;
    let enrollment = enrolled(&state)?;
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
                rows = rows_of(&state, &m, &proc.boot_id())?;
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
        )
    });

    let mut out = String::new();
    if json {
        out.push('{');
        let _ = write!(
            out,
            "\"state_dir\":{},",
            json_str(&state_dir.display().to_string())
        );
        match &key {
            Some(k) => {
                let _ = write!(
                    out,
                    "\"pinned_key\":{{\"id\":\"{}\",\"fingerprint\":\"{}\"}},",
                    k.id(),
                    k.fingerprint()
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
            Some((t, code, msg)) => {
                let _ = write!(
                    out,
                    "\"last_run\":{{\"finished\":{t},\"exit\":{},\"message\":{}}},",
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
        out.push_str("]}\n");
    } else {
        let _ = writeln!(out, "state dir:  {}", state_dir.display());
        let _ = match &key {
            Some(k) => writeln!(out, "pinned key: {} ({})", k.id(), k.fingerprint()),
            None => writeln!(out, "pinned key: none yet"),
        };
        let _ = match (serial, expires) {
            (Some(s), Some(e)) => writeln!(out, "serial:     {s} (expires {})", rfc3339(e)),
            (Some(s), None) => writeln!(out, "serial:     {s}"),
            _ => writeln!(out, "serial:     no manifest accepted yet"),
        };
        if let Some((t, code, msg)) = &last {
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
    print!("{out}");
    Ok(exit)
}

fn rows_of(state: &StateDir, m: &Manifest, boot_id: &str) -> Result<Vec<Row>, AgentError> {
    let mut rows = Vec::with_capacity(m.scriptlets.len());
    for s in &m.scriptlets {
        let id = s.id.as_str();
        let done = state.record(id, "done")?;
        let failed = state.record(id, "failed")?;
        let due = is_due(state, s, boot_id)?;
        // A failure newer than the last success is what the admin needs to see.
        let failed_last = match (&done, &failed) {
            (Some(d), Some(f)) => f.finished >= d.finished,
            (None, Some(_)) => true,
            _ => false,
        };
        let (st, rec) = if failed_last {
            ("failed", failed.as_ref())
        } else if due && s.frequency != idhal_manifest::Frequency::Always {
            ("pending", done.as_ref())
        } else if done.is_some() {
            ("done", done.as_ref())
        } else {
            ("pending", None)
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
        });
    }
    Ok(rows)
}
