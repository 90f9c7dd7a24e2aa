//! Deferred client-connect: `idhal hook client-connect` hands a checked session to the
//! long-running `idhal hook worker` over a unix socket and returns; the worker registers the
//! nodes that arrive together in one batch (`connect_batch`: one scheduler call, each node's
//! own budget, on_failure rules and verdict) and writes OpenVPN's verdicts.
//!
//! `idhal hook client-disconnect` hands off too: OpenVPN runs that script synchronously and
//! serves nobody meanwhile, but waits for no verdict, so the hook returns once the worker
//! holds the disconnect, and the worker takes the node down (under its lock, guarded by its
//! session as the synchronous hook is).

use super::{
    admit, check_down, connect_batch, decide, disconnect_hosts, Connect, Failure, Verdict,
};
use crate::config::ServerConfig;
use crate::openvpn::tmpfile::{sweep, Kind, TmpFile, TmpFileError};
use crate::process::Deadline;
use std::collections::{HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The OpenVPN variables a hand-off carries: what `admit` and `connect_session` read.
pub const VARS: [&str; 8] = [
    "common_name",
    "X509_0_CN",
    "ifconfig_pool_remote_ip",
    "trusted_ip",
    "trusted_ip6",
    "trusted_port",
    "time_unix",
    "dev",
];

/// Longest value of one variable in a hand-off (a node id is at most 64 characters).
const MAX_VALUE: usize = 256;

/// One hand-off, one JSON line on the socket: `{"event":"client-connect",…}`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case", deny_unknown_fields)]
enum Request {
    /// A checked connect: the worker registers it and writes the verdict to `deferred_file`.
    ClientConnect {
        env: HashMap<String, String>,
        config_file: PathBuf,
        deferred_file: PathBuf,
    },
    /// A disconnect: nobody waits for its outcome, the worker logs it.
    ClientDisconnect { env: HashMap<String, String> },
}

/// The variables of `VARS` that `env` has.
fn carried(env: &HashMap<String, String>) -> HashMap<String, String> {
    VARS.iter()
        .filter_map(|v| env.get(*v).map(|x| (v.to_string(), x.clone())))
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum HandOffError {
    #[error("worker socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("worker socket {path}: the request could not be sent")]
    Send {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The whole request went out and no answer came: the worker may have queued it.
    #[error("worker socket {path}: no answer to the whole request")]
    Unanswered {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("worker at {path} said: {said}")]
    Declined { path: PathBuf, said: String },
}

/// Hands one checked connect to the worker. `Ok` once the worker has queued it: from then on the
/// worker writes the verdict. `Unanswered` when it may have: the caller must not do the work too.
pub fn hand_off(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
    config_file: &Path,
    deferred_file: &Path,
) -> Result<(), HandOffError> {
    let request = Request::ClientConnect {
        env: carried(env),
        config_file: config_file.to_owned(),
        deferred_file: deferred_file.to_owned(),
    };
    send(cfg, state_dir, &request)
}

/// Hands one disconnect to the worker: `Ok` once queued, `Unanswered` when it may have been
/// (the caller must not take the node down too: a late second take-down is harmless to the
/// node's session guard, but it is the work twice while OpenVPN waits).
pub fn hand_off_disconnect(
    cfg: &ServerConfig,
    state_dir: &Path,
    env: &HashMap<String, String>,
) -> Result<(), HandOffError> {
    send(
        cfg,
        state_dir,
        &Request::ClientDisconnect { env: carried(env) },
    )
}

fn send(cfg: &ServerConfig, state_dir: &Path, request: &Request) -> Result<(), HandOffError> {
    let path = cfg.hook.socket(state_dir);
    let io = |source| HandOffError::Send {
        path: path.clone(),
        source,
    };
    let mut s = UnixStream::connect(&path).map_err(|source| HandOffError::Connect {
        path: path.clone(),
        source,
    })?;
    let wait = Some(Duration::from_millis(cfg.hook.handoff_timeout_ms));
    s.set_read_timeout(wait).map_err(io)?;
    s.set_write_timeout(wait).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("serialisable");
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = Vec::new();
    s.take(512)
        .read_to_end(&mut answer)
        .map_err(|source| HandOffError::Unanswered {
            path: path.clone(),
            source,
        })?;
    let said = String::from_utf8_lossy(&answer).trim().to_owned();
    if said == "queued" {
        Ok(())
    } else {
        Err(HandOffError::Declined { path, said })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("another worker answers on {0}: refusing to start a second one")]
    Running(PathBuf),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A queued hand-off.
struct Job {
    env: HashMap<String, String>,
    task: Task,
    received: Instant,
}

enum Task {
    /// The verdict goes to `result`; the connect's budget counts from the hand-off.
    Connect { result: TmpFile, deadline: Deadline },
    /// Its budget (`hook_budget_ms`, as the synchronous hook's) counts from when a worker
    /// thread starts it: no client waits for it.
    Disconnect,
}

/// Disconnects held for `[hook] down_grace_secs` before they join the queue: a node that
/// comes back meanwhile (to this server or another) has a newer session by then, and its
/// take-down's session guard leaves it up. One grace for all, so they come due in arrival
/// order. Not kept across a restart: `idhal reconcile` takes down whoever stays gone.
struct Grace {
    grace: Duration,
    held: Mutex<VecDeque<Job>>,
    changed: Condvar,
}

impl Grace {
    /// Holds `job`, or gives it back when `limit` are held already.
    fn hold(&self, job: Job, limit: usize) -> Result<(), Job> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() >= limit {
            return Err(job);
        }
        held.push_back(job);
        self.changed.notify_one();
        Ok(())
    }

    /// The next disconnect whose grace is over, waiting for it, counted in `pending` before
    /// it leaves the lock (a stop then waits for it); `None` once `stopping`.
    fn next_due(&self, stopping: &AtomicBool, pending: &AtomicUsize) -> Option<Job> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if stopping.load(Ordering::SeqCst) {
                return None;
            }
            let wait = match held.front() {
                Some(job) => {
                    let due = job.received + self.grace;
                    let now = Instant::now();
                    if due <= now {
                        pending.fetch_add(1, Ordering::SeqCst);
                        return held.pop_front();
                    }
                    due - now
                }
                // Woken by `hold`; the timeout only rechecks `stopping`.
                None => Duration::from_secs(1),
            };
            held = self
                .changed
                .wait_timeout(held, wait.min(Duration::from_secs(1)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// The nodes still held (a stop leaves them to reconcile).
    fn held_nodes(&self) -> Vec<String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .map(|j| j.env.get("common_name").cloned().unwrap_or_default())
            .collect()
    }
}

/// Why a request was not queued: the one line the hook gets back.
#[derive(Debug, thiserror::Error)]
enum Decline {
    #[error("busy: {0}")]
    Busy(String),
    #[error("refused: {0}")]
    Refused(String),
}

fn dir_0700(path: &Path, what: &'static str) -> Result<(), WorkerError> {
    let io = |source| WorkerError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// `idhal hook worker`: listens until killed. Prints one line once it accepts hand-offs.
pub fn serve(cfg: ServerConfig, state_dir: PathBuf) -> Result<(), WorkerError> {
    let socket = cfg.hook.socket(&state_dir);
    let tmp_dir = cfg.openvpn.tmp_dir(&state_dir);
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| WorkerError::Io { what, path, source }
    };
    dir_0700(&tmp_dir, "OpenVPN's tmp-dir")?;
    let sock_dir = socket.parent().unwrap_or(Path::new("/")).to_owned();
    dir_0700(&sock_dir, "the worker socket's directory")?;
    match std::fs::symlink_metadata(&socket) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(&socket).is_ok() {
                return Err(WorkerError::Running(socket));
            }
            std::fs::remove_file(&socket).map_err(io("removing the stale socket", &socket))?;
        }
        Ok(_) => {
            return Err(WorkerError::Io {
                what: "not a socket, left alone:",
                path: socket,
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(&socket).map_err(io("binding", &socket))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", &socket))?;

    let cfg = Arc::new(cfg);
    let (tx, rx) = mpsc::sync_channel::<Job>(cfg.hook.max_queued as usize);
    let rx = Arc::new(Mutex::new(rx));
    // Hand-offs queued and not yet answered: a stop waits for them.
    let pending = Arc::new(AtomicUsize::new(0));
    let stopping = Arc::new(AtomicBool::new(false));
    let grace = (cfg.hook.down_grace_secs > 0).then(|| {
        Arc::new(Grace {
            grace: Duration::from_secs(cfg.hook.down_grace_secs),
            held: Mutex::new(VecDeque::new()),
            changed: Condvar::new(),
        })
    });
    if let Some(grace) = &grace {
        let (grace, tx, pending, stopping) =
            (grace.clone(), tx.clone(), pending.clone(), stopping.clone());
        std::thread::spawn(move || {
            while let Some(job) = grace.next_due(&stopping, &pending) {
                if tx.send(job).is_err() {
                    pending.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            }
        });
    }
    for _ in 0..cfg.hook.workers {
        let (cfg, rx, state_dir, pending) =
            (cfg.clone(), rx.clone(), state_dir.clone(), pending.clone());
        std::thread::spawn(move || loop {
            let Some(jobs) = gather(&rx, cfg.hook.max_batch as usize, cfg.hook.batch_window())
            else {
                return;
            };
            let n = jobs.len();
            work(&cfg, &state_dir, jobs);
            pending.fetch_sub(n, Ordering::SeqCst);
        });
    }
    {
        let (cfg, socket, pending, stopping, grace) = (
            cfg.clone(),
            socket.clone(),
            pending.clone(),
            stopping.clone(),
            grace.clone(),
        );
        std::thread::spawn(move || {
            stop_on_signal(&cfg, &socket, &pending, &stopping, grace.as_deref())
        });
    }
    {
        let (tmp_dir, stale) = (
            tmp_dir.clone(),
            Duration::from_secs(cfg.hook.stale_tmp_secs),
        );
        std::thread::spawn(move || loop {
            match sweep(&tmp_dir, stale, SystemTime::now()) {
                Ok(0) => {}
                Ok(n) => eprintln!(
                    "idhal hook worker: janitor: removed {n} stale client-connect file(s) from {}",
                    tmp_dir.display()
                ),
                Err(e) => eprintln!("idhal hook worker: janitor: {}: {e}", tmp_dir.display()),
            }
            std::thread::sleep((stale / 4).clamp(Duration::from_secs(1), Duration::from_secs(60)));
        });
    }
    eprintln!(
        "idhal hook worker: listening on {} ({} workers, tmp-dir {})",
        socket.display(),
        cfg.hook.workers,
        tmp_dir.display()
    );
    let reading = Arc::new(AtomicUsize::new(0));
    for stream in listener.incoming() {
        let mut stream = match stream {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors, typically: back off instead of spinning; the
                // hooks meanwhile work synchronously.
                eprintln!("idhal hook worker: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if reading.fetch_add(1, Ordering::SeqCst) >= cfg.hook.max_connections as usize {
            reading.fetch_sub(1, Ordering::SeqCst);
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = writeln!(
                stream,
                "{}",
                Decline::Busy("too many requests being read".into())
            );
            continue;
        }
        let reading_total = reading.clone();
        let (cfg, tx, tmp_dir, reading, pending, stopping, grace) = (
            cfg.clone(),
            tx.clone(),
            tmp_dir.clone(),
            reading.clone(),
            pending.clone(),
            stopping.clone(),
            grace.clone(),
        );
        let spawned = std::thread::Builder::new().spawn(move || {
            let answer = match receive(&cfg, &tmp_dir, &mut stream) {
                Ok(None) => None,
                Ok(Some(_)) if stopping.load(Ordering::SeqCst) => {
                    Some(Decline::Busy("shutting down".into()).to_string())
                }
                Ok(Some(job)) if grace.is_some() && matches!(job.task, Task::Disconnect) => {
                    let grace = grace.as_deref().expect("checked");
                    let node = job.env.get("common_name").cloned().unwrap_or_default();
                    Some(match grace.hold(job, cfg.hook.max_queued as usize) {
                        Ok(()) => {
                            eprintln!(
                                "idhal hook worker: client-disconnect: {node}: left up for [hook] down_grace_secs ({} s), then taken down unless it is back",
                                grace.grace.as_secs()
                            );
                            "queued".to_owned()
                        }
                        Err(_) => {
                            let d = Decline::Busy(format!(
                                "{} disconnects held for their grace already",
                                cfg.hook.max_queued
                            ));
                            eprintln!("idhal hook worker: {node}: {d}");
                            d.to_string()
                        }
                    })
                }
                Ok(Some(job)) => {
                    let node = job.env.get("common_name").cloned().unwrap_or_default();
                    pending.fetch_add(1, Ordering::SeqCst);
                    let sent = tx.try_send(job);
                    if sent.is_err() {
                        pending.fetch_sub(1, Ordering::SeqCst);
                    }
                    Some(match sent {
                        Ok(()) => "queued".to_owned(),
                        Err(mpsc::TrySendError::Full(_)) => {
                            let d = Decline::Busy(format!(
                                "{} hand-offs queued already",
                                cfg.hook.max_queued
                            ));
                            eprintln!("idhal hook worker: {node}: {d}");
                            d.to_string()
                        }
                        Err(mpsc::TrySendError::Disconnected(_)) => {
                            Decline::Busy("shutting down".into()).to_string()
                        }
                    })
                }
                Err(d) => {
                    eprintln!("idhal hook worker: request {d}");
                    Some(d.to_string())
                }
            };
            if let Some(a) = answer {
                let _ = stream
                    .set_write_timeout(Some(Duration::from_millis(cfg.hook.request_timeout_ms)));
                let _ = writeln!(stream, "{a}");
            }
            reading.fetch_sub(1, Ordering::SeqCst);
        });
        if let Err(e) = spawned {
            // The stream went with the closure: the hook sees no answer and works itself.
            reading_total.fetch_sub(1, Ordering::SeqCst);
            eprintln!("idhal hook worker: cannot start a reader thread: {e}");
        }
    }
    Ok(())
}

/// On SIGTERM or SIGINT: the socket goes first (new hooks then work synchronously), hand-offs
/// still arriving are answered busy, and the queued ones are finished (within
/// `hook_budget_ms`, their own limit) before the process exits: a restart leaves no client
/// deferred with nobody to answer.
fn stop_on_signal(
    cfg: &ServerConfig,
    socket: &Path,
    pending: &AtomicUsize,
    stopping: &AtomicBool,
    grace: Option<&Grace>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let waited = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            rt.block_on(async {
                let mut term = signal(SignalKind::terminate())?;
                let mut int = signal(SignalKind::interrupt())?;
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                Ok(())
            })
        });
    if let Err(e) = waited {
        // Without a handler the default action (exit at once) stays: no worse than before.
        eprintln!("idhal hook worker: cannot watch for SIGTERM: {e}");
        return;
    }
    stopping.store(true, Ordering::SeqCst);
    let _ = std::fs::remove_file(socket);
    if let Some(held) = grace.map(Grace::held_nodes).filter(|h| !h.is_empty()) {
        // Taking them down now would end the grace of nodes on their way to another server.
        eprintln!(
            "idhal hook worker: stopping: {} disconnect(s) within their down grace left to `idhal reconcile`: {}",
            held.len(),
            held.join(" ")
        );
    }
    let left = pending.load(Ordering::SeqCst);
    eprintln!("idhal hook worker: stopping: socket removed, finishing {left} queued hand-off(s)");
    let until = Instant::now() + cfg.limits.hook_budget() + Duration::from_secs(1);
    while pending.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left = pending.load(Ordering::SeqCst);
    eprintln!("idhal hook worker: stopped ({left} hand-off(s) left unanswered)");
    std::process::exit(if left == 0 { 0 } else { 1 });
}

/// Reads and checks one request, within `request_timeout_ms` and `max_request_bytes`.
/// `Ok(None)`: the peer closed without sending anything.
/// Only this worker's user (OpenVPN runs its hooks as that user) or root may hand off: the
/// socket's 0600 mode in a 0700 directory says so too, and this still holds if an admin loosens
/// them. Anyone else could have a node registered Alive.
fn peer_allowed(stream: &UnixStream) -> Result<(), Decline> {
    let me = rustix::process::geteuid();
    match rustix::net::sockopt::socket_peercred(stream) {
        Ok(peer) if peer.uid == me || peer.uid.is_root() => Ok(()),
        Ok(peer) => Err(Decline::Refused(format!(
            "peer uid {} is neither this worker's ({}) nor root",
            peer.uid.as_raw(),
            me.as_raw()
        ))),
        Err(e) => Err(Decline::Refused(format!("peer credentials: {e}"))),
    }
}

fn receive(
    cfg: &ServerConfig,
    tmp_dir: &Path,
    stream: &mut UnixStream,
) -> Result<Option<Job>, Decline> {
    peer_allowed(stream)?;
    let received = Instant::now();
    let limit = cfg.hook.max_request_bytes as usize;
    let until = received + Duration::from_millis(cfg.hook.request_timeout_ms);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Decline::Refused(format!(
                "not complete within {} ms",
                cfg.hook.request_timeout_ms
            )));
        }
        let _ = stream.set_read_timeout(Some(left));
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > limit {
                    return Err(Decline::Refused(format!("over {limit} bytes")));
                }
                if buf.contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Decline::Refused(format!(
                    "not complete within {} ms",
                    cfg.hook.request_timeout_ms
                )))
            }
            Err(e) => return Err(Decline::Refused(format!("read: {e}"))),
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let line = match buf.iter().position(|&b| b == b'\n') {
        Some(end) if end + 1 == buf.len() => &buf[..end],
        Some(_) => return Err(Decline::Refused("more than one line".into())),
        None => return Err(Decline::Refused("no end of line".into())),
    };
    let request: Request = serde_json::from_slice(line)
        .map_err(|e| Decline::Refused(format!("not a hand-off request: {e}")))?;
    let env = match &request {
        Request::ClientConnect { env, .. } | Request::ClientDisconnect { env } => env,
    };
    if let Some(k) = env.keys().find(|k| !VARS.contains(&k.as_str())) {
        return Err(Decline::Refused(format!(
            "variable {:?} is not one a hand-off carries",
            k.chars().take(40).collect::<String>()
        )));
    }
    if let Some(k) = env
        .iter()
        .find(|(_, v)| v.len() > MAX_VALUE)
        .map(|(k, _)| k)
    {
        return Err(Decline::Refused(format!("{k} is over {MAX_VALUE} bytes")));
    }
    let check = |p: &Path, kind| {
        TmpFile::check(p, kind, tmp_dir).map_err(|e: TmpFileError| Decline::Refused(e.to_string()))
    };
    Ok(Some(match request {
        Request::ClientConnect {
            env,
            config_file,
            deferred_file,
        } => {
            check(&config_file, Kind::Config)?;
            let result = check(&deferred_file, Kind::Result)?;
            Job {
                env,
                task: Task::Connect {
                    result,
                    deadline: Deadline::after(cfg.hook.deferred_budget()),
                },
                received,
            }
        }
        Request::ClientDisconnect { env } => Job {
            env,
            task: Task::Disconnect,
            received,
        },
    }))
}

/// Waits for one job, then gathers what else arrives within `window`, up to `max` jobs. The
/// queue stays with this thread meanwhile: the other threads gather their batches after it.
/// `None` once the queue is closed.
fn gather(rx: &Mutex<mpsc::Receiver<Job>>, max: usize, window: Duration) -> Option<Vec<Job>> {
    let rx = rx.lock().ok()?;
    let mut jobs = vec![rx.recv().ok()?];
    let until = Instant::now() + window;
    while jobs.len() < max {
        match rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
            Ok(job) => jobs.push(job),
            Err(_) => break,
        }
    }
    Some(jobs)
}

/// A batch of queued hand-offs: the connects first (clients wait for them), then the
/// disconnects, together.
fn work(cfg: &ServerConfig, state_dir: &Path, jobs: Vec<Job>) {
    let (connects, disconnects): (Vec<Job>, Vec<Job>) = jobs
        .into_iter()
        .partition(|j| matches!(j.task, Task::Connect { .. }));
    if !connects.is_empty() {
        work_connects(cfg, state_dir, &connects);
    }
    if !disconnects.is_empty() {
        work_disconnects(cfg, state_dir, &disconnects);
    }
}

/// Disconnects: each checked as the synchronous hook does (`session_down`), then all taken
/// down together (`disconnect_hosts`: one scheduler call), within one `hook_budget_ms` from
/// now (no client waits for them: the time in the queue does not count).
fn work_disconnects(cfg: &ServerConfig, state_dir: &Path, jobs: &[Job]) {
    let started = Instant::now();
    let deadline = Deadline::after(cfg.limits.hook_budget());
    let mut results: Vec<Option<Result<String, Failure>>> = jobs.iter().map(|_| None).collect();
    let mut checked = Vec::new();
    let mut downs = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        match check_down(cfg, state_dir, &job.env) {
            Ok((node, down)) => {
                checked.push((i, node));
                downs.push(down);
            }
            Err(f) => results[i] = Some(Err(f)),
        }
    }
    let done = disconnect_hosts(cfg, state_dir, &downs, deadline);
    for ((i, node), r) in checked.into_iter().zip(done) {
        results[i] = Some(r.map(|d| format!("{node}: {}", d.line)));
    }
    let mut marked = 0;
    for r in results {
        let r = r.expect("every disconnect has a result");
        marked += usize::from(r.is_ok());
        for line in decide("client-disconnect", cfg, r).lines {
            eprintln!("idhal hook worker: {line}");
        }
    }
    let waited = jobs.iter().map(|j| j.received).min().map(|t| started - t);
    eprintln!(
        "idhal hook worker: disconnects: batch of {}: {marked} done in {:.2} s (the first waited {:.2} s in the queue)",
        jobs.len(),
        started.elapsed().as_secs_f64(),
        waited.unwrap_or_default().as_secs_f64()
    );
}

/// Connects: the same checks as the synchronous hook for each, one registration for all that
/// pass (`connect_batch`), then each client's verdict byte.
fn work_connects(cfg: &ServerConfig, state_dir: &Path, jobs: &[Job]) {
    let mut results: Vec<Option<Result<String, Failure>>> = jobs.iter().map(|_| None).collect();
    let mut admitted = Vec::new();
    let mut connects = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        let Task::Connect { deadline, .. } = job.task else {
            continue;
        };
        match admit(cfg, state_dir, &job.env) {
            Ok(a) => {
                admitted.push(i);
                connects.push(Connect {
                    session: a.session,
                    host: a.host,
                    deadline,
                });
            }
            Err(f) => results[i] = Some(Err(f)),
        }
    }
    let batch = connect_batch(cfg, state_dir, &connects);
    for (i, r) in admitted.into_iter().zip(batch.results) {
        results[i] = Some(r);
    }
    let mut accepted = 0;
    for (job, r) in jobs.iter().zip(results) {
        if let Task::Connect { result, .. } = &job.task {
            let r = r.expect("every connect has a result");
            accepted += usize::from(answer(cfg, job, result, r));
        }
    }
    let names = batch
        .client_names
        .map(|(asked, took)| {
            format!(
                "; client names: {asked} looked up in {:.2} s",
                took.as_secs_f64()
            )
        })
        .unwrap_or_default();
    eprintln!(
        "idhal hook worker: batch of {}: {} registered together in {:.2} s, {} alone, {} refused before registering; {accepted} accepted{names}",
        jobs.len(),
        batch.together,
        batch.scheduler.as_secs_f64(),
        batch.alone,
        jobs.len() - batch.together - batch.alone,
    );
}

/// Writes one client's verdict byte and logs why. A client that left meanwhile has no file
/// any more: logged, nothing written. Whether it was accepted.
fn answer(cfg: &ServerConfig, job: &Job, file: &TmpFile, result: Result<String, Failure>) -> bool {
    let queued = job.received.elapsed();
    let Verdict { accept, lines } = decide("client-connect", cfg, result);
    let byte = if accept { b'1' } else { b'0' };
    let wrote = match file.write_result(Some(byte)) {
        Ok(()) => format!("wrote {}", byte as char),
        Err(e) => format!("verdict not written: {e}"),
    };
    for line in &lines {
        eprintln!("idhal hook worker: {line}");
    }
    eprintln!(
        "idhal hook worker: {} {} ({wrote}; {:.2} s after the hand-off)",
        file.path().display(),
        if accept { "accepted" } else { "refused" },
        queued.as_secs_f64()
    );
    accept
}
