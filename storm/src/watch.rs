//! The watchers: OAR's state (read from its database, every --poll-ms) and each node's A and
//! PTR in Knot; `idhal reconcile` every --reconcile-every seconds on OpenVPN's status plus the
//! hook-path sessions; the RSS of every process of the rig, every second.

use crate::args::Args;
use crate::clients::{Phase, Shared, SimState};
use crate::enroll::Node;
use crate::setup::Rig;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use std::collections::{BTreeMap, HashMap};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub struct Watched {
    /// (t, nodes up) at every poll.
    pub curve: Vec<(f64, usize)>,
    /// Hosts with more than one OAR resource, most seen at one poll.
    pub duplicate_hosts: usize,
}

/// OAR's resources: host → states (one per resource), straight from its database (a psql
/// call is ~20 ms; `oarnodes -J` for 1,000 nodes would be a Perl start-up and seconds). A
/// resource without idhal's node id (a creation cut short before its properties) is not the
/// node registered: it reads as `NoIdhalcn`, whatever its state. `to_jsonb` because the column
/// only exists once idhal made it.
fn oar_states(rig: &Rig) -> HashMap<String, Vec<String>> {
    let text = rig.oar.pg.psql(
        "oar",
        "SELECT network_address, CASE WHEN to_jsonb(r)->>'idhalcn' IS NULL THEN 'NoIdhalcn' \
         ELSE state END FROM resources r ORDER BY resource_id",
    );
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for l in text.lines() {
        if let Some((h, s)) = l.split_once('|') {
            m.entry(h.to_owned()).or_default().push(s.to_owned());
        }
    }
    m
}

pub fn observe(a: &Args, rig: &Rig, nodes: &[Node], shared: &Shared) -> Watched {
    let dns = Dns::new(rig.knot.port);
    let mut curve = Vec::new();
    let mut duplicate_hosts = 0;
    let mut was_alive = vec![false; nodes.len()];
    let every = Duration::from_millis(a.poll_ms);
    while !shared.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let states = oar_states(rig);
        let now = shared.now();
        duplicate_hosts = duplicate_hosts.max(states.values().filter(|v| v.len() > 1).count());
        // DNS only for nodes Alive and not yet seen in DNS: outside the lock.
        let check: Vec<usize> = {
            let g = shared.nodes.lock().unwrap();
            (0..nodes.len())
                .filter(|&i| g[i].dns.is_none() && g[i].start.is_some())
                .filter(|&i| is_alive(states.get(&nodes[i].host)))
                .collect()
        };
        let in_dns: Vec<usize> = check.into_iter().filter(|&i| dns.has(&nodes[i])).collect();
        let mut g = shared.nodes.lock().unwrap();
        for &i in &in_dns {
            g[i].dns.get_or_insert(now);
        }
        let phase = shared.phase();
        for (i, node) in nodes.iter().enumerate() {
            let st = states.get(&node.host);
            let alive = is_alive(st);
            let t = &mut g[i];
            if alive && t.start.is_some() && phase != Phase::Disconnecting {
                t.alive.get_or_insert(now);
                if t.dns.is_some() {
                    t.up.get_or_insert(now);
                }
            }
            if was_alive[i] && !alive && t.connected {
                t.flaps += 1;
            }
            if phase == Phase::Disconnecting
                && t.absent.is_none()
                && st.is_some_and(|s| s.iter().all(|s| s == "Absent"))
            {
                t.absent = Some(now);
            }
            was_alive[i] = alive;
        }
        curve.push((now, g.iter().filter(|t| t.up.is_some()).count()));
        drop(g);
        std::thread::sleep(every.saturating_sub(t.elapsed()));
    }
    Watched {
        curve,
        duplicate_hosts,
    }
}

fn is_alive(states: Option<&Vec<String>>) -> bool {
    states.is_some_and(|s| s.iter().any(|s| s == "Alive"))
}

/// How many of the nodes that were registered (`registered[i]`) have no OAR resource at the
/// end (idhal never removes one).
pub fn removed(rig: &Rig, nodes: &[Node], registered: &[bool]) -> usize {
    let states = oar_states(rig);
    nodes
        .iter()
        .zip(registered)
        .filter(|(n, &r)| r && !states.contains_key(&n.host))
        .count()
}

/// Plain DNS queries to Knot over UDP on 127.0.0.1.
struct Dns {
    sock: UdpSocket,
    id: std::cell::Cell<u16>,
}

impl Dns {
    fn new(port: u16) -> Dns {
        let sock = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket on 127.0.0.1");
        sock.connect(("127.0.0.1", port)).expect("Knot's address");
        sock.set_read_timeout(Some(Duration::from_secs(1)))
            .expect("a read timeout");
        Dns {
            sock,
            id: std::cell::Cell::new(1),
        }
    }

    /// A = its address and PTR = its name.
    fn has(&self, node: &Node) -> bool {
        let o = node.address.octets();
        let rev = format!("{}.{}.{}.{}.in-addr.arpa.", o[3], o[2], o[1], o[0]);
        let a = self.ask(&format!("{}.", node.host), RecordType::A);
        let ptr = self.ask(&rev, RecordType::PTR);
        a == [node.address.to_string()] && ptr == [format!("{}.", node.host)]
    }

    fn ask(&self, name: &str, rtype: RecordType) -> Vec<String> {
        let Ok(name) = Name::from_ascii(name) else {
            return Vec::new();
        };
        let id = self.id.get().wrapping_add(1);
        self.id.set(id);
        let mut m = Message::new();
        m.set_id(id);
        m.add_query(Query::query(name, rtype));
        let Ok(bytes) = m.to_vec() else {
            return Vec::new();
        };
        if self.sock.send(&bytes).is_err() {
            return Vec::new();
        }
        let mut buf = [0u8; 4096];
        // Skip late answers to earlier (timed-out) queries.
        for _ in 0..8 {
            let Ok(len) = self.sock.recv(&mut buf) else {
                return Vec::new();
            };
            let Ok(r) = Message::from_vec(&buf[..len]) else {
                continue;
            };
            if r.id() != id {
                continue;
            }
            return r
                .answers()
                .iter()
                .filter_map(|rec| match rec.data() {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::PTR(p) => Some(p.0.to_ascii()),
                    _ => None,
                })
                .collect();
        }
        Vec::new()
    }
}

#[derive(Debug, Clone)]
pub struct ReconcileRun {
    pub start: f64,
    pub secs: f64,
    pub code: Option<i32>,
    /// Its last line: `idhal reconcile (storm1): N connected, …`.
    pub summary: String,
    pub taken_down: usize,
    pub taken_down_connected: usize,
    pub registered_again: usize,
}

/// `idhal reconcile` every --reconcile-every seconds (right after the last one when it took
/// longer), on OpenVPN's own status file plus the hook-path sessions.
pub fn reconcile_loop(a: &Args, rig: &Rig, nodes: &[Node], shared: &Shared) -> Vec<ReconcileRun> {
    let by_host: HashMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.host.as_str(), i))
        .collect();
    let every = Duration::from_secs(a.reconcile_every);
    let mut runs = Vec::new();
    let mut next = Instant::now() + every;
    let log = rig.dir.join("reconcile.log");
    while !shared.stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        let began = Instant::now();
        next = began + every;
        if let Err(e) = merge_status(rig, nodes, shared) {
            eprintln!("reconcile skipped: {e}");
            continue;
        }
        let start = shared.now();
        // OpenVPN rewrites its status every second (`status FILE 1`), and reconcile may wait
        // for a status written after its OAR listing: keep the merged one as fresh meanwhile.
        let running = std::sync::atomic::AtomicBool::new(true);
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                while running.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(1));
                    if running.load(Ordering::Relaxed) {
                        let _ = merge_status(rig, nodes, shared);
                    }
                }
            });
            let out = rig.idhal(&["reconcile"]);
            running.store(false, Ordering::Relaxed);
            out
        });
        let secs = began.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
        {
            use std::io::Write as _;
            let _ = writeln!(f, "---- at {start:.1} s, {secs:.1} s\n{text}{err}");
        }
        let (mut taken_down, mut taken_down_connected, mut registered_again) = (0, 0, 0);
        {
            let mut g = shared.nodes.lock().unwrap();
            for l in text.lines() {
                if let Some(rest) = l.strip_prefix("idhal reconcile: took down ") {
                    taken_down += 1;
                    let host = rest.split_whitespace().next().unwrap_or("");
                    if let Some(&i) = by_host.get(host) {
                        if g[i].connected {
                            g[i].taken_down += 1;
                            taken_down_connected += 1;
                        }
                    }
                } else if l.starts_with("idhal reconcile: registered ") {
                    registered_again += 1;
                }
            }
        }
        let summary = text
            .lines()
            .rev()
            .find(|l| l.starts_with("idhal reconcile ("))
            .or_else(|| err.lines().last())
            .unwrap_or("")
            .to_owned();
        runs.push(ReconcileRun {
            start,
            secs,
            code: out.status.code(),
            summary,
            taken_down,
            taken_down_connected,
            registered_again,
        });
    }
    runs
}

/// Writes what reconcile reads: OpenVPN's status file with the hook-path sessions added as
/// OpenVPN would list them (connecting: no address yet; connected: with it). Atomically.
fn merge_status(rig: &Rig, nodes: &[Node], shared: &Shared) -> Result<(), String> {
    let real = std::fs::read_to_string(&rig.status)
        .map_err(|e| format!("{}: {e}", rig.status.display()))?;
    let sims: Vec<SimSession> = {
        let g = shared.nodes.lock().unwrap();
        g.iter()
            .enumerate()
            .filter(|(_, t)| matches!(t.sim, SimState::Connecting | SimState::Connected))
            .map(|(i, t)| SimSession {
                cn: nodes[i].id.clone(),
                client_id: 100_000 + i,
                port: t.sim_port,
                since: t.sim_since,
                address: (t.sim == SimState::Connected)
                    .then(|| t.given.clone())
                    .flatten(),
            })
            .collect()
    };
    let out = merged(&real, &sims).map_err(|e| format!("{}: {e}", rig.status.display()))?;
    let tmp = rig.merged_status.with_extension("tmp");
    std::fs::write(&tmp, out).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, &rig.merged_status)
        .map_err(|e| format!("{}: {e}", rig.merged_status.display()))
}

/// A hook-path session as OpenVPN's status would list it.
#[derive(Debug, Clone)]
pub struct SimSession {
    pub cn: String,
    pub client_id: usize,
    pub port: u16,
    pub since: u64,
    /// None while connecting (OpenVPN lists no address until client-connect is done).
    pub address: Option<String>,
}

/// OpenVPN's status text (version 2) with `sims` added after its CLIENT_LIST header, in the
/// header's own columns.
pub fn merged(real: &str, sims: &[SimSession]) -> Result<String, String> {
    let mut out = String::with_capacity(real.len() + sims.len() * 160);
    let mut header_seen = false;
    for line in real.lines() {
        out.push_str(line);
        out.push('\n');
        let Some(cols) = line.strip_prefix("HEADER,CLIENT_LIST,") else {
            continue;
        };
        if header_seen {
            return Err("two HEADER,CLIENT_LIST lines".into());
        }
        header_seen = true;
        for sim in sims {
            let fields: Vec<String> = cols
                .split(',')
                .map(|c| match c {
                    "Common Name" => sim.cn.clone(),
                    "Real Address" => format!("127.0.0.1:{}", sim.port),
                    "Virtual Address" => sim.address.clone().unwrap_or_default(),
                    "Connected Since (time_t)" => sim.since.to_string(),
                    "Username" => "UNDEF".into(),
                    "Bytes Received" | "Bytes Sent" | "Peer ID" => "0".into(),
                    "Client ID" => sim.client_id.to_string(),
                    _ => String::new(),
                })
                .collect();
            out.push_str("CLIENT_LIST,");
            out.push_str(&fields.join(","));
            out.push('\n');
        }
    }
    if !header_seen {
        return Err("no HEADER,CLIENT_LIST line (status-version 2 needed)".into());
    }
    Ok(out)
}

/// Peak memory of the rig's processes, by role: the largest single process and the largest
/// sum at one sample (kB), sampled every second from /proc.
#[derive(Debug, Default)]
pub struct Rss {
    pub classes: BTreeMap<String, (u64, u64)>,
    /// VmHWM (the kernel's own peak) of the long-lived server processes, read at the end.
    pub hwm: Vec<(String, u64)>,
}

pub fn rss(rig: &Rig, shared: &Shared) -> Rss {
    let mut r = Rss::default();
    let openvpn = rig.openvpn.pid();
    let pg = rig.oar.pg.pid();
    while !shared.stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let mut sums: BTreeMap<String, u64> = BTreeMap::new();
        for (pid, class) in classify(rig, openvpn, pg) {
            if let Some(kb) = status_kb(pid, "VmRSS:") {
                *sums.entry(class.clone()).or_default() += kb;
                let e = r.classes.entry(class).or_default();
                e.0 = e.0.max(kb);
            }
        }
        for (class, sum) in sums {
            let e = r.classes.entry(class).or_default();
            e.1 = e.1.max(sum);
        }
        std::thread::sleep(Duration::from_secs(1).saturating_sub(t.elapsed()));
    }
    for (i, s) in rig.serves.iter().enumerate() {
        if let Some(kb) = status_kb(s.child.id(), "VmHWM:") {
            r.hwm.push((format!("idhal serve #{i}"), kb));
        }
    }
    if let Some(kb) = status_kb(openvpn, "VmHWM:") {
        r.hwm.push(("openvpn server".into(), kb));
    }
    r
}

fn status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Every process of the rig now, with its role.
fn classify(rig: &Rig, openvpn: u32, pg: Option<u32>) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    let idhal = rig.idhal.as_path();
    let conf = format!("OARCONFFILE={}", rig.oar.conf.display());
    let oar = rig.oar.dir.display().to_string();
    let knot = rig.knot.dir.display().to_string();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let Some(argv0) = argv.first() else { continue };
        let all = argv.join(" ");
        let class = if Path::new(argv0) == idhal {
            let sub = argv
                .iter()
                .skip(1)
                .find(|a| !a.starts_with('-') && !a.starts_with('/'))
                .cloned()
                .unwrap_or_default();
            format!("idhal {sub}")
        } else if pid == openvpn {
            "openvpn server".into()
        } else if argv0.ends_with("openvpn")
            && std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d.starts_with(&rig.dir))
        {
            "openvpn clients".into()
        } else if (all.contains("/usr/lib/oar/") || all.contains(&oar)) && ours(pid, &conf) {
            if ["oarnodes", "oarnodesetting", "oarproperty"]
                .iter()
                .any(|t| all.contains(&format!("/usr/lib/oar/{t}")))
            {
                "OAR tools (oarnodes, oarnodesetting)".into()
            } else {
                "OAR Almighty and its modules".into()
            }
        } else if all.contains(&knot) {
            "knotd".into()
        } else if pg.is_some_and(|pg| pid == pg || ppid(pid) == Some(pg)) {
            "PostgreSQL (OAR's)".into()
        } else {
            continue;
        };
        out.push((pid, class));
    }
    out
}

fn ppid(pid: u32) -> Option<u32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    s.rsplit_once(") ")?.1.split(' ').nth(1)?.parse().ok()
}

/// Whether an OAR process works for this rig's OAR (its environment names our oar.conf):
/// other suites may run their own OAR at the same time.
fn ours(pid: u32, conf: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.split(|&b| b == 0).any(|v| v == conf.as_bytes()))
        || std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
            String::from_utf8_lossy(&c).contains(
                conf.trim_start_matches("OARCONFFILE=")
                    .trim_end_matches("oar.conf"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// OpenVPN 2.6.14's status-version 2, one real client.
    const REAL: &str = "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\n\
TIME,2026-12-03 17:00:00,1764781200\n\
HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n\
CLIENT_LIST,client1,127.0.0.1:40000,10.134.0.2,,100,200,2026-12-03 16:59:00,1764781140,UNDEF,0,0,AES-256-GCM\n\
HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\n\
GLOBAL_STATS,Max bcast/mcast queue length,0\n\
END\n";

    fn sim(cn: &str, address: Option<&str>) -> SimSession {
        SimSession {
            cn: cn.into(),
            client_id: 100_007,
            port: 10_049,
            since: 1_764_781_190,
            address: address.map(String::from),
        }
    }

    #[test]
    fn sessions_are_listed_in_the_headers_columns_connecting_without_an_address() {
        let m = merged(
            REAL,
            &[sim("client8", Some("10.134.0.9")), sim("client9", None)],
        )
        .unwrap();
        let lines: Vec<&str> = m.lines().collect();
        // The real lines are all kept, in order; the sessions follow the header.
        assert_eq!(lines.len(), REAL.lines().count() + 2);
        assert_eq!(
            lines[3],
            "CLIENT_LIST,client8,127.0.0.1:10049,10.134.0.9,,0,0,,1764781190,UNDEF,100007,0,"
        );
        assert_eq!(
            lines[4],
            "CLIENT_LIST,client9,127.0.0.1:10049,,,0,0,,1764781190,UNDEF,100007,0,"
        );
        assert!(lines[5].starts_with("CLIENT_LIST,client1,"));
        assert_eq!(lines[1], "TIME,2026-12-03 17:00:00,1764781200");
    }

    #[test]
    fn a_status_without_the_client_header_is_refused() {
        for bad in ["", "TIME,x,1\nEND\n", "CLIENT_LIST,a,b\n"] {
            let e = merged(bad, &[sim("client8", None)]).unwrap_err();
            assert!(e.contains("no HEADER,CLIENT_LIST line"), "{bad:?}: {e}");
        }
        let twice = format!("{REAL}HEADER,CLIENT_LIST,Common Name\n");
        assert_eq!(
            merged(&twice, &[]).unwrap_err(),
            "two HEADER,CLIENT_LIST lines"
        );
    }

    #[test]
    fn no_sessions_leave_the_status_as_it_was() {
        assert_eq!(merged(REAL, &[]).unwrap(), REAL);
    }
}
