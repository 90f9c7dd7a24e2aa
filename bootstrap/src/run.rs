//! `idhal-bootstrap run`, top to bottom: config → pin → fetch → verify → run → record.
//! Nothing is executed and no state changes unless the manifest verified; a scriptlet's marker
//! is written only after it succeeded, so a crash or kill mid-scriptlet leaves it pending.

use crate::config::{Config, Proc};
use crate::error::AgentError;
use crate::fetch::Fetcher;
use crate::random::random_u64;
use crate::state::{
    write_atomic, write_file, Durability, Record, StateDir, MANIFEST, SERIAL, SIGNATURE,
};
use crate::{child, log, pin};
use idhal_manifest::time::{now, rfc3339};
use idhal_manifest::{
    rotation, verify, Expiry, Frequency, Manifest, Policy, Scriptlet, SignatureFile,
};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub serial: u64,
    pub ran: usize,
    pub skipped: usize,
    /// Time from the end of the download to the end of the run (verify, record, scriptlets).
    pub local: Duration,
}

// Not inlined into main: at opt-level z that grew the agent by 2 KiB (scripts/agent-size.sh).
#[inline(never)]
pub fn run(cfg: &Config, proc: &Proc) -> Result<Summary, AgentError> {
    let fetcher = Fetcher {
        base: cfg.server_url()?,
        limits: cfg.limits.clone(),
        tls: cfg.tls()?,
    };
    let state = StateDir::new(&cfg.state_dir);
    state.create()?;
    let _lock = state.lock("lock")?;
    if cfg.splay > 0 {
        std::thread::sleep(Duration::from_secs(random_u64() % (cfg.splay + 1)));
    }

    let pinned = pin::pinned_key(cfg, &state, &fetcher)?;
    let (bytes, sig) = fetcher.manifest()?;
    // The rotation chain to its end first, then the manifest with the chain's last key only:
    // nothing is pinned or run before both verified.
    let end = pin::follow(&fetcher, &pinned.head)?;
    let signer = SignatureFile::parse(&sig)
        .map_err(AgentError::Refused)?
        .key_id;
    let key = rotation::manifest_key(&pinned.head, &end, signer)
        .map_err(|e| AgentError::Pin(e.to_string()))?;
    let fetched = Instant::now();
    let policy = Policy {
        now: now(),
        expiry: Expiry::Enforce,
        last_serial: state.last_serial()?,
    };
    let manifest = verify(key, &bytes, &sig, &policy)?;
    if end != pinned.head {
        pin::pin_rotated(&state, &pinned, end)?;
    }
    accept(&state, &manifest, &bytes, &sig, policy.last_serial)?;

    let boot_id = proc.boot_id();
    let mut summary = Summary {
        serial: manifest.serial,
        ..Summary::default()
    };
    for s in &manifest.scriptlets {
        if is_due(&state, s, &boot_id)? {
            execute(cfg, &state, &manifest, s, &boot_id)?;
            summary.ran += 1;
        } else {
            summary.skipped += 1;
        }
    }
    summary.local = fetched.elapsed();
    Ok(summary)
}

/// Records the verified manifest as accepted: copies first, the serial last.
fn accept(
    state: &StateDir,
    m: &Manifest,
    bytes: &[u8],
    sig: &str,
    last: Option<u64>,
) -> Result<(), AgentError> {
    let sig_path = state.path(SIGNATURE);
    if last == Some(m.serial) && state.read(&sig_path)?.as_deref() == Some(sig) {
        return Ok(());
    }
    write_atomic(&state.path(MANIFEST), bytes, 0o600)?;
    write_atomic(&sig_path, sig.as_bytes(), 0o600)?;
    write_atomic(
        &state.path(SERIAL),
        format!("{}\n", m.serial).as_bytes(),
        0o600,
    )?;
    log(&format!(
        "accepted manifest serial {} (expires {}, {} scriptlets)",
        m.serial,
        rfc3339(m.expires),
        m.scriptlets.len()
    ));
    Ok(())
}

pub fn is_due(state: &StateDir, s: &Scriptlet, boot_id: &str) -> Result<bool, AgentError> {
    Ok(match s.frequency {
        Frequency::Always => true,
        Frequency::Once => !state.is_done(s.id.as_str())?,
        Frequency::Boot => state
            .record(s.id.as_str(), "done")?
            .is_none_or(|r| r.boot_id != boot_id),
    })
}

fn execute(
    cfg: &Config,
    state: &StateDir,
    m: &Manifest,
    s: &Scriptlet,
    boot_id: &str,
) -> Result<(), AgentError> {
    let id = s.id.as_str();
    let dir = state.scriptlet_dir(id);
    fs::create_dir_all(&dir).map_err(|e| AgentError::state(&dir, e))?;
    // Taken before its script or log is touched, and given to the scriptlet as its standard
    // input: held as long as the shell or anything that kept its stdin lives, even if this
    // agent is killed. Daemons and `cmd &` get /dev/null instead: they let go.
    let lock = state.lock(&format!("scriptlets/{id}/lock"))?;
    let script = dir.join("script");
    write_atomic(&script, s.body, 0o700)?;
    let log_path = dir.join("log");
    let log_file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&log_path)
        .map_err(|e| AgentError::state(&log_path, e))?;
    let stderr = log_file
        .try_clone()
        .map_err(|e| AgentError::state(&log_path, e))?;

    log(&format!("running {id} ({})", s.frequency));
    let mut cmd = Command::new("/bin/sh");
    cmd.arg(&script)
        .current_dir("/")
        .stdin(lock)
        .stdout(log_file)
        .stderr(stderr)
        .env("IDHAL_SCRIPTLET", id)
        .env("IDHAL_SERIAL", m.serial.to_string())
        .env("IDHAL_STATE_DIR", &cfg.state_dir)
        .env("IDHAL_SERVER", cfg.server.as_deref().unwrap_or_default());
    child::die_with_agent(&mut cmd);
    if std::env::var_os("PATH").is_none() {
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
    }
    for p in &m.params {
        cmd.env(p.name.env_var(), p.value);
    }
    let started = Instant::now();
    let status = cmd.status().map_err(|e| AgentError::state("/bin/sh", e))?;
    let record = Record {
        finished: now(),
        duration_ms: started.elapsed().as_millis() as u64,
        outcome: match (status.code(), status.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => "unknown".into(),
        },
        boot_id: boot_id.to_owned(),
        serial: m.serial,
    };
    if status.success() {
        write_atomic(&dir.join("done"), record.encode().as_bytes(), 0o600)?;
        remove_if_exists(&dir.join("failed"))?;
        log(&format!("{id} done in {} ms", record.duration_ms));
        Ok(())
    } else {
        write_atomic(&dir.join("failed"), record.encode().as_bytes(), 0o600)?;
        Err(AgentError::Scriptlet {
            id: id.to_owned(),
            outcome: record.outcome,
            log: log_path,
        })
    }
}

fn remove_if_exists(path: &Path) -> Result<(), AgentError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(AgentError::state(path, e)),
        _ => Ok(()),
    }
}

/// Writes the outcome of this run for `status` (a report, not state: a refused manifest
/// changes nothing else). The boot id tells `status --wait` a report of this boot from one an
/// earlier boot left.
pub fn report(state_dir: &Path, proc: &Proc, exit: u8, message: &str) {
    let state = StateDir::new(state_dir);
    if File::open(state_dir).is_err() {
        return;
    }
    let text = format!(
        "finished={}\nboot_id={}\nexit={exit}\nmessage={}\n",
        now(),
        proc.boot_id(),
        message.replace('\n', " ")
    );
    let _ = write_file(
        &state.path("last-run"),
        text.as_bytes(),
        0o600,
        Durability::Relaxed,
    );
}
