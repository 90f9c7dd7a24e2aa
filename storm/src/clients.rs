//! The storm itself: every node starts connecting (at once, or over --connect-over), the first
//! --openvpn-clients as real OpenVPN client processes, the rest through the hook path ([`sim`]);
//! the watchers record when each is Alive in OAR with its DNS records; once all are up (or the
//! deadline passed) and --hold seconds later, everyone disconnects and the watchers record
//! Absent.

use crate::args::Args;
use crate::enroll::Enrolled;
use crate::setup::Rig;
use crate::{probe, sim, watch};
use idhal_test_support::openvpn;
use std::io::{BufRead as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    OpenVpn,
    Hook,
}

/// How a hook-path session looks to reconcile (as OpenVPN's status would list it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimState {
    Idle,
    /// The connect hook runs (or its verdict is deferred): listed without an address.
    Connecting,
    Connected,
    Gone,
}

/// One node's story, in seconds since the storm started.
#[derive(Debug, Clone)]
pub struct Timeline {
    pub kind: Kind,
    pub start: Option<f64>,
    /// Real client: "Initialization Sequence Completed"; hook path: the hook accepted it.
    pub tunnel: Option<f64>,
    pub alive: Option<f64>,
    pub dns: Option<f64>,
    /// Alive in OAR and A + PTR in DNS, first seen together.
    pub up: Option<f64>,
    /// Connected as far as the client knows (tunnel up, not restarted, not told to leave).
    pub connected: bool,
    /// Real client: restarts (push timeout, TLS error, refusal); hook path: refused tries.
    pub restarts: u32,
    /// Alive → not Alive while connected (seen by the OAR watcher).
    pub flaps: u32,
    /// `idhal reconcile` took it down while it was connected.
    pub taken_down: u32,
    pub down_start: Option<f64>,
    pub absent: Option<f64>,
    pub sim: SimState,
    /// Hook path: the session's client port and start (what the status would list).
    pub sim_port: u16,
    pub sim_since: u64,
    /// The address the client was given (PUSH_REPLY or the hook's config file).
    pub given: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Connecting = 0,
    Holding = 1,
    Disconnecting = 2,
    Done = 3,
}

pub struct Shared {
    pub t0: Instant,
    pub nodes: Mutex<Vec<Timeline>>,
    phase: AtomicU8,
    pub stop: AtomicBool,
}

impl Shared {
    pub fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }
    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Relaxed) {
            0 => Phase::Connecting,
            1 => Phase::Holding,
            2 => Phase::Disconnecting,
            _ => Phase::Done,
        }
    }
    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
}

/// Everything measured during the storm.
pub struct Report {
    pub nodes: Vec<Timeline>,
    /// (t, nodes up) at every poll.
    pub up_curve: Vec<(f64, usize)>,
    /// Seconds from the storm's start until the last node was up (None: not all came up).
    pub all_up: Option<f64>,
    pub all_absent: Option<f64>,
    pub disconnect_start: f64,
    pub probe: probe::Probe,
    pub reconcile: Vec<watch::ReconcileRun>,
    pub rss: watch::Rss,
    /// Hosts with more than one OAR resource, most seen at one poll.
    pub duplicate_resources: usize,
    /// Hosts whose resource was gone at the end.
    pub removed: usize,
    pub client_address_mismatch: usize,
    pub sim_failures: Vec<String>,
    /// When the canary received the server's keepalive pings (seconds on the storm's clock);
    /// None when it never came up.
    pub canary_pings: Option<Vec<f64>>,
}

/// A real OpenVPN client process, its output read line by line (timestamped on arrival).
struct Client<'scope> {
    child: Child,
    reader: std::thread::ScopedJoinHandle<'scope, ()>,
}

pub fn storm(a: &Args, rig: &Rig, enrolled: &Enrolled) -> Report {
    let n = enrolled.nodes.len();
    let real = a.real_clients().min(n);
    let shared = Shared {
        t0: Instant::now(),
        nodes: Mutex::new(
            (0..n)
                .map(|i| Timeline {
                    kind: if i < real { Kind::OpenVpn } else { Kind::Hook },
                    start: None,
                    tunnel: None,
                    alive: None,
                    dns: None,
                    up: None,
                    connected: false,
                    restarts: 0,
                    flaps: 0,
                    taken_down: 0,
                    down_start: None,
                    absent: None,
                    sim: SimState::Idle,
                    sim_port: 0,
                    sim_since: 0,
                    given: None,
                })
                .collect(),
        ),
        phase: AtomicU8::new(Phase::Connecting as u8),
        stop: AtomicBool::new(false),
    };
    let nodes = &enrolled.nodes;
    let deadline = Duration::from_secs(a.deadline_secs());
    let offset = |i: usize| {
        if a.connect_over == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(a.connect_over as f64 * i as f64 / n as f64)
        }
    };
    let sim_failures = Mutex::new(Vec::new());
    let (shared_r, failures_r) = (&shared, &sim_failures);
    let (
        all_up,
        canary_pings,
        all_absent,
        disconnect_start,
        probe,
        watched,
        reconcile,
        rss,
        removed,
    ) = std::thread::scope(|s| {
        let mut all_up = None;
        let mut all_absent = None;
        let mut clients: Vec<Client> = Vec::new();
        let probe_h = s.spawn(|| probe::run(rig, &shared));
        let watch_h = s.spawn(|| watch::observe(a, rig, nodes, &shared));
        let recon_h = s.spawn(|| watch::reconcile_loop(a, rig, nodes, &shared));
        let rss_h = s.spawn(|| watch::rss(rig, &shared));
        // The canary connects first, alone; then a short quiet baseline for the probe.
        let canary = enrolled
            .canary
            .as_ref()
            .and_then(|c| Canary::start(s, rig, c, &shared));
        std::thread::sleep(Duration::from_secs(2));
        let storm_t = Instant::now();
        let storm_at = shared.now();
        eprintln!(
            "storm: {n} nodes ({real} OpenVPN clients, {} through the hook path)",
            n - real
        );

        // The hook path: --hook-concurrency loops, each like one OpenVPN server's.
        let sim_h = s.spawn(move || {
            sim::connect_all(
                a,
                rig,
                nodes,
                shared_r,
                real,
                |i| storm_t + offset(i),
                failures_r,
            )
        });
        // The real clients, each started at its time.
        for (i, node) in nodes.iter().enumerate().take(real) {
            let at = storm_t + offset(i);
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            shared.nodes.lock().unwrap()[i].start = Some(shared.now());
            clients.push(spawn_client(s, rig, node, i, &shared));
        }
        let _ = sim_h.join();

        let up = |t: &Timeline| t.up.is_some();
        loop {
            let (done, last) = {
                let g = shared.nodes.lock().unwrap();
                (
                    g.iter().all(up),
                    g.iter().filter_map(|t| t.up).fold(0.0, f64::max),
                )
            };
            if done {
                all_up = Some(last - storm_at);
                break;
            }
            if storm_t.elapsed() > deadline {
                eprintln!("deadline: not every node came up within {deadline:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!(
            "all up after {}; holding {} s",
            all_up.map_or("(not all)".into(), |t| format!("{t:.1} s")),
            a.hold
        );
        shared.set_phase(Phase::Holding);
        std::thread::sleep(Duration::from_secs(a.hold));

        shared.set_phase(Phase::Disconnecting);
        let disconnect_start = shared.now();
        {
            let mut g = shared.nodes.lock().unwrap();
            for t in g.iter_mut() {
                t.down_start = Some(disconnect_start);
                t.connected = false;
            }
        }
        eprintln!("disconnecting every node");
        let canary_pings = canary.map(Canary::stop);
        for c in &clients {
            idhal_test_support::process::signal("TERM", &c.child.id().to_string());
        }
        let sim_h = s.spawn(|| sim::disconnect_all(a, rig, nodes, &shared, real, &sim_failures));
        for mut c in clients.drain(..) {
            idhal_test_support::process::stop(&mut c.child, false);
            let _ = c.reader.join();
        }
        let _ = sim_h.join();
        let t_down = Instant::now();
        loop {
            let (done, last) = {
                let g = shared.nodes.lock().unwrap();
                (
                    // A node never registered has no resource to go Absent (it is lost).
                    g.iter().all(|t| t.alive.is_none() || t.absent.is_some()),
                    g.iter().filter_map(|t| t.absent).fold(0.0, f64::max),
                )
            };
            if done {
                all_absent = Some(last - disconnect_start);
                break;
            }
            if t_down.elapsed() > deadline {
                eprintln!("deadline: not every node went Absent within {deadline:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        shared.set_phase(Phase::Done);
        shared.stop.store(true, Ordering::Relaxed);
        (
            all_up,
            canary_pings,
            all_absent,
            disconnect_start,
            probe_h.join().expect("the probe thread"),
            watch_h.join().expect("the watcher thread"),
            recon_h.join().expect("the reconcile thread"),
            rss_h.join().expect("the RSS thread"),
            watch::removed(
                rig,
                nodes,
                &shared
                    .nodes
                    .lock()
                    .unwrap()
                    .iter()
                    .map(|t| t.alive.is_some())
                    .collect::<Vec<_>>(),
            ),
        )
    });
    let nodes_t = shared.nodes.into_inner().unwrap();
    let client_address_mismatch = nodes_t
        .iter()
        .zip(nodes)
        .filter(|(t, n)| {
            t.given
                .as_deref()
                .is_some_and(|g| g != n.address.to_string())
        })
        .count();
    Report {
        all_up,
        all_absent,
        disconnect_start,
        nodes: nodes_t,
        up_curve: watched.curve,
        probe,
        reconcile,
        rss,
        duplicate_resources: watched.duplicate_hosts,
        removed,
        client_address_mismatch,
        sim_failures: sim_failures.into_inner().unwrap(),
        canary_pings,
    }
}

/// `openvpn --cd NODE_DIR --config openvpn.conf --dev null` (what enrollment wrote), with
/// nothing on the host's network; each output line is timestamped as it arrives and written
/// to NODE_DIR/client.log.
fn spawn_client<'scope, 'env>(
    s: &'scope std::thread::Scope<'scope, 'env>,
    rig: &Rig,
    node: &crate::enroll::Node,
    i: usize,
    shared: &'env Shared,
) -> Client<'scope> {
    let mut child = openvpn::command(&node.dir)
        .args(["--config", "openvpn.conf", "--dev", "null", "--verb", "3"])
        .args(openvpn::NO_HOST_NETWORK)
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("starting openvpn for {}: {e}", node.id));
    rig.reaper.watch(child.id());
    let out = child.stdout.take().expect("a piped stdout");
    let log = node.dir.join("client.log");
    let reader = s.spawn(move || {
        let mut f = std::fs::File::create(&log).ok();
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = f.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let now = shared.now();
            let mut g = shared.nodes.lock().unwrap();
            let t = &mut g[i];
            if line.contains(openvpn::UP) {
                t.tunnel.get_or_insert(now);
                t.connected = t.down_start.is_none();
            } else if line.contains("SIGUSR1[soft") || line.contains("SIGHUP") {
                t.restarts += 1;
                t.connected = false;
            } else if let Some(rest) = line.split("PUSH: Received control message: ").nth(1) {
                if let Some(addr) = rest.split(",ifconfig ").nth(1) {
                    t.given = addr.split(' ').next().map(str::to_owned);
                }
            }
        }
    });
    Client { child, reader }
}

/// The canary: a real client connected before the storm, at `--verb 7`, where OpenVPN logs
/// each keepalive ping it receives ("RECEIVED PING PACKET"). The server sends one whenever it
/// has sent the client nothing for the keepalive interval (`keepalive 10 60`: 10 s), from the
/// same loop that runs the hooks: a gap longer than 10 s is a stall this client saw.
struct Canary<'scope> {
    child: Child,
    reader: std::thread::ScopedJoinHandle<'scope, Vec<f64>>,
}

impl<'scope> Canary<'scope> {
    fn start<'env>(
        s: &'scope std::thread::Scope<'scope, 'env>,
        rig: &Rig,
        node: &crate::enroll::Node,
        shared: &'env Shared,
    ) -> Option<Canary<'scope>> {
        let mut child = openvpn::command(&node.dir)
            .args(["--config", "openvpn.conf", "--dev", "null", "--verb", "7"])
            .args(openvpn::NO_HOST_NETWORK)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the canary's openvpn: {e}"));
        rig.reaper.watch(child.id());
        let out = child.stdout.take().expect("a piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = node.dir.join("canary.log");
        let reader = s.spawn(move || {
            let mut pings = Vec::new();
            let mut f = std::fs::File::create(&log).ok();
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let now = shared.now();
                if line.contains("RECEIVED PING PACKET") {
                    pings.push(now);
                    if let Some(f) = f.as_mut() {
                        let _ = writeln!(f, "{now:.3} {line}");
                    }
                } else if line.contains(openvpn::UP) {
                    // The PUSH_REPLY just came: the server's last packet, the first "ping".
                    pings.push(now);
                    let _ = tx.send(());
                }
            }
            pings
        });
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            eprintln!("the canary did not come up within 60 s: no keepalive-gap figure");
            let mut c = Canary { child, reader };
            idhal_test_support::process::stop(&mut c.child, false);
            let _ = c.reader.join();
            return None;
        }
        eprintln!("canary {} connected", node.id);
        Some(Canary { child, reader })
    }

    fn stop(mut self) -> Vec<f64> {
        idhal_test_support::process::stop(&mut self.child, false);
        self.reader.join().unwrap_or_default()
    }
}
