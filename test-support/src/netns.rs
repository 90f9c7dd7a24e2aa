//! Network namespaces for tests that need more than loopback (several VPN servers, a head node,
//! clients on a "public" segment): a [`Topology`] of namespaces with a per-run prefix, bridges
//! inside a switch namespace (nothing is added to the root namespace), veth pairs, sysctls, and
//! processes started inside a namespace, stopped by pid.
//!
//! Everything is removed when the [`Topology`] is dropped, and also when the test process dies
//! without dropping it (a panic with `panic = abort`, SIGKILL): a reaper process, like
//! [`crate::process::Reaper`], waits on a pipe that only closes then. A run that was killed
//! before its reaper could work (the machine rebooted, the reaper was killed too) leaves
//! namespaces whose owner pid is dead: [`Topology::new`] sweeps those first.
//!
//! Names: `idhal-` + the owner's pid in base 36 on 5 characters + one character per topology of
//! that process + a short name of at most 3 characters (`idhal-0abcd0vA`), within IFNAMSIZ-like
//! 15 characters, so the owner is read back from the name.
use crate::process::{alive, Logged};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// The ip(8) binary.
pub const IP: &str = "/usr/sbin/ip";

/// What every name this module makes starts with.
pub const PREFIX: &str = "idhal-";

/// Characters of the owner's pid (base 36; /proc/sys/kernel/pid_max is at most 2^22).
const PID_CHARS: usize = 5;

/// The longest short name: 15 - `idhal-` - pid - one topology character.
pub const SHORT_MAX: usize = 15 - PREFIX.len() - PID_CHARS - 1;

/// The name of the switch namespace that holds the bridges.
const SWITCH: &str = "sw";

/// True when ip(8) is here and we are root; otherwise the one rule ([`crate::skip_or_fail`]).
pub fn available() -> bool {
    crate::require(&[IP])
}

fn base36(mut n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut s = vec![b'0'; PID_CHARS];
    for c in s.iter_mut().rev() {
        *c = digits[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8(s).expect("ASCII")
}

/// The prefix of topology number `n` (0, 1, …) of process `pid`: `idhal-PPPPPn`.
pub fn prefix_for(pid: u32, n: u32) -> String {
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    format!(
        "{PREFIX}{}{}",
        base36(pid),
        digits[(n % 36) as usize] as char
    )
}

/// The pid that owns namespace `name`, when it is one of ours.
pub fn owner(name: &str) -> Option<u32> {
    // Only the exact shape this module makes: another tool's `idhal-…` names are not ours.
    let rest = name.strip_prefix(PREFIX)?;
    if name.len() > 15
        || !(PID_CHARS + 2..=PID_CHARS + 1 + SHORT_MAX).contains(&rest.len())
        || !rest
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b.is_ascii_uppercase())
        || !rest[..PID_CHARS + 1]
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    u32::from_str_radix(&rest[..PID_CHARS], 36).ok()
}

/// Every namespace's name (`ip netns list`).
pub fn list() -> Vec<String> {
    let out = Command::new(IP)
        .args(["netns", "list"])
        .output()
        .expect("running ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Kills every process inside namespace `name` and deletes it. Never panics (runs in `drop`).
fn remove(name: &str) {
    let out = Command::new(IP).args(["netns", "pids", name]).output();
    if let Ok(out) = out {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            crate::process::signal("KILL", pid);
        }
    }
    let _ = Command::new(IP)
        .args(["netns", "del", name])
        .stderr(Stdio::null())
        .status();
}

/// Removes the namespaces of this module whose owner pid is dead (another run that was killed
/// before it could clean up); returns their names.
pub fn sweep() -> Vec<String> {
    let me = std::process::id();
    let stale: Vec<String> = list()
        .into_iter()
        .filter(|n| owner(n).is_some_and(|pid| pid != me && !alive(pid)))
        .collect();
    for n in &stale {
        remove(n);
    }
    stale
}

/// Kills registered process groups and deletes registered namespaces (their processes killed
/// first) when the test process exits however it exits: its stdin only closes then.
struct NsReaper {
    stdin: Mutex<ChildStdin>,
    _child: Child,
}

impl NsReaper {
    fn new() -> NsReaper {
        let script = r#"pgs=""; nss=""
while read -r kind v; do case $kind in pg) pgs="$pgs $v";; ns) nss="$nss $v";; esac; done
for g in $pgs; do kill -KILL "-$g" 2>/dev/null; done
for n in $nss; do for p in $("$0" netns pids "$n" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  "$0" netns del "$n" 2>/dev/null; done"#;
        let mut child = Command::new("/bin/sh")
            .args(["-c", script, IP])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start the namespace reaper");
        NsReaper {
            stdin: Mutex::new(child.stdin.take().expect("the reaper's stdin")),
            _child: child,
        }
    }

    fn tell(&self, kind: &str, v: &str) {
        let mut w = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(w, "{kind} {v}");
    }
}

/// A set of namespaces named with this run's prefix; the switch namespace (bridges) is made
/// first. Dropped, it kills what runs inside them and deletes them.
pub struct Topology {
    prefix: String,
    made: Mutex<Vec<String>>,
    reaper: NsReaper,
}

impl Topology {
    /// Sweeps stale namespaces of dead runs, then makes this run's switch namespace.
    pub fn new() -> Topology {
        static N: AtomicU32 = AtomicU32::new(0);
        let swept = sweep();
        if !swept.is_empty() {
            eprintln!("netns: removed namespaces of dead runs: {swept:?}");
        }
        let t = Topology {
            prefix: prefix_for(std::process::id(), N.fetch_add(1, Ordering::Relaxed)),
            made: Mutex::new(Vec::new()),
            reaper: NsReaper::new(),
        };
        t.add(SWITCH);
        t
    }

    /// This run's prefix (`idhal-PPPPPn`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The full name of short name `short`.
    pub fn name(&self, short: &str) -> String {
        assert!(
            (1..=SHORT_MAX).contains(&short.len())
                && short.bytes().all(|b| b.is_ascii_alphanumeric()),
            "namespace short name {short:?}: 1 to {SHORT_MAX} letters or digits"
        );
        format!("{}{short}", self.prefix)
    }

    /// Makes namespace `short` with its loopback up; its full name.
    pub fn add(&self, short: &str) -> String {
        let name = self.name(short);
        // Registered before it exists: a death between the two still removes it.
        self.reaper.tell("ns", &name);
        self.made.lock().unwrap().push(name.clone());
        crate::ok(
            Command::new(IP)
                .args(["netns", "add", &name])
                .output()
                .expect("running ip"),
        );
        self.run(short, &[IP, "link", "set", "dev", "lo", "up"]);
        name
    }

    /// `ip netns exec NAME PROGRAM`: add arguments, then run or spawn it.
    pub fn command(&self, short: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(IP);
        c.args(["netns", "exec", &self.name(short)]).arg(program);
        c
    }

    /// Runs `argv` inside namespace `short`: its output, whatever the exit status.
    pub fn exec(&self, short: &str, argv: &[&str]) -> Output {
        self.command(short, argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .expect("running ip netns exec")
    }

    /// Runs `argv` inside namespace `short`, which must succeed; its stdout.
    #[track_caller]
    pub fn run(&self, short: &str, argv: &[&str]) -> String {
        crate::ok(self.exec(short, argv))
    }

    /// Sets sysctl `key` (`net.ipv4.ip_forward`) to `value` inside namespace `short`.
    pub fn sysctl(&self, short: &str, key: &str, value: &str) {
        self.run(
            short,
            &["/usr/sbin/sysctl", "-qw", &format!("{key}={value}")],
        );
    }

    /// Makes bridge `bridge` (up) in the switch namespace.
    pub fn bridge(&self, bridge: &str) {
        self.run(
            SWITCH,
            &[IP, "link", "add", "name", bridge, "type", "bridge"],
        );
        self.run(SWITCH, &[IP, "link", "set", "dev", bridge, "up"]);
    }

    /// A veth pair: `ifname` inside namespace `short` with address `cidr` (up), its peer
    /// (`SHORT-IFNAME` cut to 15) on `bridge` in the switch namespace. Created in both
    /// namespaces at once: it never appears in the root namespace.
    pub fn plug(&self, short: &str, ifname: &str, bridge: &str, cidr: &str) {
        let peer: String = format!("{short}-{ifname}").chars().take(15).collect();
        crate::ok(
            Command::new(IP)
                .args(["link", "add", "name", &peer, "netns", &self.name(SWITCH)])
                .args(["type", "veth", "peer", "name", ifname, "netns"])
                .arg(self.name(short))
                .output()
                .expect("running ip"),
        );
        self.run(
            SWITCH,
            &[IP, "link", "set", "dev", &peer, "master", bridge, "up"],
        );
        self.run(short, &[IP, "addr", "add", cidr, "dev", ifname]);
        self.run(short, &[IP, "link", "set", "dev", ifname, "up"]);
    }

    /// Spawns `cmd` (from [`Topology::command`]) as a [`Logged`] child in its own process group,
    /// which the reaper kills if this process dies first. Stop it by dropping it or by its pid.
    pub fn spawn(&self, cmd: &mut Command, log: &Path) -> Logged {
        let l = Logged::spawn(cmd, log);
        self.reaper.tell("pg", &l.pid().to_string());
        l
    }

    /// The pids of the processes inside namespace `short`.
    pub fn pids(&self, short: &str) -> Vec<u32> {
        let out = Command::new(IP)
            .args(["netns", "pids", &self.name(short)])
            .output()
            .expect("running ip netns pids");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    /// The namespaces made so far (full names).
    pub fn namespaces(&self) -> Vec<String> {
        self.made.lock().unwrap().clone()
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // The switch last: the other namespaces' veth peers go with their namespaces.
        let made = std::mem::take(&mut *self.made.lock().unwrap_or_else(|p| p.into_inner()));
        for n in made.iter().rev() {
            remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_carry_the_owner_and_fit_in_15_characters() {
        for pid in [1, 4_194_304, 123_456] {
            let p = prefix_for(pid, 35);
            assert_eq!(p.len() + SHORT_MAX, 15, "{p}");
            assert_eq!(owner(&format!("{p}vA")), Some(pid));
        }
        assert_eq!(owner("r10-vpnA"), None);
        assert_eq!(owner("idhal-"), None);
        assert_eq!(owner("idhal-zz"), None);
        // Other tools' names that start the same are never ours (never swept).
        assert_eq!(owner("idhal-t-5326-two-s0"), None);
        assert_eq!(owner("idhal-00abc0"), None);
        assert_eq!(owner("idhal-00abc0toolong"), None);
    }

    fn ours(prefix: &str) -> Vec<String> {
        list()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// Not a check of its own: the child of the tests below. Run directly, it does nothing.
    #[test]
    fn child_with_a_topology() {
        let Ok(how) = std::env::var("IDHAL_NETNS_CHILD") else {
            return;
        };
        let t = Topology::new();
        t.add("a");
        t.add("b");
        t.bridge("br");
        t.plug("a", "eth0", "br", "192.168.77.1/24");
        t.plug("b", "eth0", "br", "192.168.77.2/24");
        let d = tempfile::tempdir().unwrap();
        let sleeper = t.spawn(
            t.command("a", "/bin/sleep").arg("600"),
            &d.path().join("s.log"),
        );
        // The link works: b reaches a.
        t.run("b", &["ping", "-c1", "-W5", "192.168.77.1"]);
        println!("ready {} {}", t.prefix(), sleeper.pid());
        match how.as_str() {
            "panic" => panic!("the child panics with its namespaces up"),
            _ => std::thread::sleep(Duration::from_secs(600)),
        }
    }

    fn child(how: &str) -> (Child, String, u32) {
        use std::io::BufRead as _;
        let mut c = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "netns::tests::child_with_a_topology",
                "--nocapture",
            ])
            .env("IDHAL_NETNS_CHILD", how)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(c.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("ready ") {
            line.clear();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "the child exited first"
            );
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        (c, f[1].to_owned(), f[2].parse().unwrap())
    }

    #[test]
    fn a_panicking_test_leaves_no_namespace_and_no_process() {
        if !available() {
            return;
        }
        let (mut c, prefix, sleeper) = child("panic");
        assert!(!c.wait().unwrap().success());
        // Drop ran during the unwinding: gone by the time the process has exited.
        assert_eq!(ours(&prefix), Vec::<String>::new());
        assert!(!alive(sleeper));
    }

    #[test]
    fn a_killed_test_process_leaves_no_namespace_and_no_process() {
        if !available() {
            return;
        }
        let (mut c, prefix, sleeper) = child("sleep");
        assert_eq!(ours(&prefix).len(), 3, "{:?}", ours(&prefix));
        c.kill().unwrap();
        c.wait().unwrap();
        // No Drop ran: the reaper does it.
        crate::wait_for("the reaper's cleanup", Duration::from_secs(30), || {
            ours(&prefix).is_empty() && !alive(sleeper)
        });
    }

    #[test]
    fn a_new_topology_sweeps_namespaces_of_dead_runs_only() {
        if !available() {
            return;
        }
        let mut dead = Command::new("/bin/true").spawn().unwrap();
        let pid = dead.id();
        dead.wait().unwrap();
        let stale = format!("{}x", prefix_for(pid, 0));
        // A live owner's (this process, another number) stays.
        let live = format!("{}x", prefix_for(std::process::id(), 35));
        for n in [&stale, &live] {
            crate::ok(Command::new(IP).args(["netns", "add", n]).output().unwrap());
        }
        let t = Topology::new();
        let names = list();
        let gone = !names.contains(&stale);
        let kept = names.contains(&live);
        remove(&live);
        remove(&stale);
        assert!(gone, "{stale} not swept: {names:?}");
        assert!(kept, "{live} swept: {names:?}");
        assert!(names.contains(&t.name("sw")), "{names:?}");
    }
}
