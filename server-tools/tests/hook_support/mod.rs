//! Real components for the hook tests, started on 127.0.0.1 with ephemeral ports and stopped by
//! pid: PostgreSQL + OAR 2.5 (Almighty) from Debian's packages, and Knot DNS. Each test binary
//! starts its own instances; a guard process kills them and removes their files when the test
//! binary exits, however it exits.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::TcpListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const IDHAL: &str = env!("CARGO_BIN_EXE_idhal");
pub const OARDIR: &str = "/usr/lib/oar";

/// True when every component is present and we are root. Otherwise the one rule of
/// `idhal_test_support::skip_or_fail`: a failure under scripts/test.sh and CI, a loud SKIPPED
/// line in a plain `cargo test`.
pub fn require(paths: &[&str]) -> bool {
    let mut missing: Vec<String> = paths
        .iter()
        .filter(|p| !Path::new(p).exists())
        .map(|p| p.to_string())
        .collect();
    if !idhal_test_support::is_root() {
        missing.push("root (PostgreSQL and OAR are started as their own users)".into());
    }
    if missing.is_empty() {
        return true;
    }
    idhal_test_support::skip_or_fail(&format!(
        "hook tests need {} — install scripts/apt-packages.txt (scripts/setup-debian.sh) and run as root",
        missing.join(", ")
    ));
    false
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("an ephemeral port on 127.0.0.1")
        .port()
}

/// Kills registered process groups and removes a directory when this test process exits: its
/// stdin is a pipe that only closes then.
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
            stdin: Mutex::new(child.stdin.take().unwrap()),
            _child: child,
        }
    }

    pub fn watch(&self, pgid: u32) {
        let _ = writeln!(self.stdin.lock().unwrap(), "{pgid}");
    }
}

/// Sends SIG to `target` (a pid, or `-PGID` for a whole process group) with the shell's
/// builtin kill: procps' /usr/bin/kill is not on every minimal system.
pub fn signal(sig: &str, target: &str) {
    let _ = Command::new("/bin/sh")
        .args(["-c", "kill -\"$0\" \"$1\"", sig, target])
        .status();
}

fn user_ids(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| (f[2].parse().unwrap(), f[3].parse().unwrap()))
        })
        .unwrap_or_else(|| panic!("user {name} missing"))
}

fn pg_bin(tool: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.last()
        .map(|d| d.join("bin").join(tool))
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin").join(tool))
}

pub fn pg_available() -> String {
    pg_bin("postgres").display().to_string()
}

/// Is something listening on 127.0.0.1:port (and nothing on 0.0.0.0:port)? From /proc/net/tcp.
pub fn listening(port: u16) -> (bool, bool) {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let (mut loopback, mut any) = (false, false);
    for l in tcp.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || f[3] != "0A" {
            continue;
        }
        let (addr, p) = f[1].split_once(':').unwrap();
        if u16::from_str_radix(p, 16).ok() != Some(port) {
            continue;
        }
        match addr {
            "0100007F" => loopback = true,
            _ => any = true,
        }
    }
    (loopback, any)
}

/// Polls `ok` until it holds; on timeout fails with the component's log, which says why.
fn wait_for(what: &str, limit: Duration, log: &Path, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        if t.elapsed() >= limit {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "{what} not ready after {limit:?}; {}:\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// PostgreSQL + OAR's database + Almighty, private to one test binary.
pub struct Oar {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub pg_port: u16,
    pub server_port: u16,
    reaper: Reaper,
    postgres: Mutex<Option<Child>>,
    almighty: Mutex<Option<Child>>,
}

impl Oar {
    pub fn start() -> Self {
        let t = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix("idhal-oar-")
            .tempdir()
            .unwrap()
            .keep();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let reaper = Reaper::new(&dir);
        let pg_port = free_port();
        let server_port = free_port();
        let conf = dir.join("oar.conf");
        let oar = Self {
            dir: dir.clone(),
            conf: conf.clone(),
            pg_port,
            server_port,
            reaper,
            postgres: Mutex::new(None),
            almighty: Mutex::new(None),
        };
        // PostgreSQL refuses to run as root: its data dir belongs to the postgres user.
        let (uid, gid) = user_ids("postgres");
        let pg = dir.join("pg");
        std::fs::create_dir(&pg).unwrap();
        std::os::unix::fs::chown(&pg, Some(uid), Some(gid)).unwrap();
        let out = Command::new(pg_bin("initdb"))
            .args(["-D"])
            .arg(pg.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .uid(uid)
            .gid(gid)
            .current_dir(&pg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        oar.start_postgres();

        let base =
            std::fs::read_to_string("/etc/oar/oar.conf").expect("/etc/oar/oar.conf (oar-server)");
        let runtime = dir.join("oar-run");
        std::fs::create_dir(&runtime).unwrap();
        let mut set: BTreeMap<&str, String> = BTreeMap::new();
        set.insert("DB_HOSTNAME", "127.0.0.1".into());
        set.insert("DB_PORT", pg_port.to_string());
        set.insert("DB_BASE_PASSWD", "idhal-test-rw".into());
        set.insert("DB_BASE_PASSWD_RO", "idhal-test-ro".into());
        set.insert("SERVER_HOSTNAME", "127.0.0.1".into());
        set.insert("SERVER_PORT", server_port.to_string());
        // No pinger: it would mark our never-reachable test nodes Suspected.
        set.insert("FINAUD_FREQUENCY", "0".into());
        set.insert("LOG_FILE", dir.join("oar.log").display().to_string());
        set.insert("OAR_RUNTIME_DIRECTORY", runtime.display().to_string());
        let mut text = String::new();
        for line in base.lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            if set.contains_key(key) && !line.trim_start().starts_with('#') {
                continue;
            }
            text.push_str(line);
            text.push('\n');
        }
        for (k, v) in &set {
            text.push_str(&format!("{k}=\"{v}\"\n"));
        }
        std::fs::write(&conf, text).unwrap();
        let out = Command::new("/usr/sbin/oar-database")
            .arg("--create")
            .arg(format!("--conf={}", conf.display()))
            .args(["--db-admin-user=postgres", "--db-admin-pass=unused", "-y"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "oar-database --create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        oar.start_almighty();
        eprintln!(
            "OAR up in {:.1} s (PostgreSQL 127.0.0.1:{pg_port}, Almighty 127.0.0.1:{server_port})",
            t.elapsed().as_secs_f64()
        );
        oar
    }

    pub fn start_postgres(&self) {
        let (uid, gid) = user_ids("postgres");
        let pg = self.dir.join("pg");
        let log = std::fs::File::create(pg.join("postgres.log")).unwrap();
        std::os::unix::fs::chown(pg.join("postgres.log"), Some(uid), Some(gid)).unwrap();
        let child = Command::new(pg_bin("postgres"))
            .arg("-D")
            .arg(pg.join("data"))
            .args(["-p", &self.pg_port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&pg)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .uid(uid)
            .gid(gid)
            .process_group(0)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.reaper.watch(child.id());
        *self.postgres.lock().unwrap() = Some(child);
        let port = self.pg_port;
        wait_for(
            "PostgreSQL",
            Duration::from_secs(30),
            &pg.join("postgres.log"),
            || {
                Command::new(pg_bin("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// Fast shutdown (SIGINT to the postmaster), waited for.
    pub fn stop_postgres(&self) {
        if let Some(mut c) = self.postgres.lock().unwrap().take() {
            signal("INT", &c.id().to_string());
            let _ = c.wait();
        }
    }

    pub fn start_almighty(&self) {
        // Almighty binds 0.0.0.0 with no option to change it: run a copy whose listening
        // socket gets LocalAddr 127.0.0.1, and check the patch applied.
        let src = std::fs::read_to_string(format!("{OARDIR}/Almighty")).unwrap();
        let needle = "IO::Socket::INET->new(LocalPort=> $serverport,";
        assert_eq!(
            src.matches(needle).count(),
            1,
            "OAR's Almighty changed: cannot bind it to 127.0.0.1, refusing to start it on all addresses"
        );
        let patched = src.replace(
            needle,
            "IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort=> $serverport,",
        );
        let bin = self.dir.join("Almighty");
        std::fs::write(&bin, patched).unwrap();
        let log = std::fs::File::create(self.dir.join("almighty.log")).unwrap();
        let child = Command::new("/usr/bin/perl")
            .arg(&bin)
            .envs(self.env())
            .env("OARDO_USER", "oar")
            .current_dir(&self.dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.reaper.watch(child.id());
        *self.almighty.lock().unwrap() = Some(child);
        let port = self.server_port;
        let log = self.dir.join("almighty.log");
        wait_for("Almighty", Duration::from_secs(30), &log, || {
            listening(port).0
        });
        assert!(!listening(port).1, "Almighty listens beyond loopback");
    }

    /// SIGTERM to Almighty's whole process group, waited for.
    pub fn stop_almighty(&self) {
        if let Some(mut c) = self.almighty.lock().unwrap().take() {
            signal("TERM", &format!("-{}", c.id()));
            let _ = c.wait();
            let port = self.server_port;
            let log = self.dir.join("almighty.log");
            wait_for("Almighty to stop", Duration::from_secs(15), &log, || {
                !listening(port).0
            });
        }
    }

    /// The environment that points OAR's Perl tools at this instance.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("OARDIR".into(), OARDIR.into()),
            ("OARCONFFILE".into(), self.conf.display().to_string()),
            ("PERL5LIB".into(), OARDIR.into()),
            ("OARDO_USER".into(), "root".into()),
        ]
    }

    /// The `[oar]` section for idhal's config.
    pub fn config_section(&self) -> String {
        let mut s = format!(
            "[oar]\noarnodes = \"{OARDIR}/oarnodes\"\noarnodesetting = \"{OARDIR}/oarnodesetting\"\noarproperty = \"{OARDIR}/oarproperty\"\n[oar.env]\n"
        );
        for (k, v) in self.env() {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
        s
    }

    /// `oarnodes -J [--sql WHERE]` as parsed JSON, one entry per resource.
    pub fn resources(&self, sql: Option<&str>) -> Vec<serde_json::Value> {
        let mut cmd = Command::new(format!("{OARDIR}/oarnodes"));
        cmd.arg("-J").envs(self.env());
        if let Some(sql) = sql {
            cmd.args(["--sql", sql]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "oarnodes: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        v.as_object().unwrap().values().cloned().collect()
    }

    pub fn host(&self, host: &str) -> Vec<serde_json::Value> {
        self.resources(Some(&format!("network_address='{host}'")))
    }
}

/// Knot DNS serving a forward and a reverse zone, updatable with one TSIG key.
pub struct Knot {
    pub dir: PathBuf,
    pub port: u16,
    reaper: Reaper,
    child: Mutex<Option<Child>>,
}

pub const TSIG_SECRET: &str = "aWRoYWwtdGVzdC1rZXktaWRoYWwtdGVzdC1rZXk=";

impl Knot {
    /// `zones`: (zone name, zone file text).
    pub fn start(zones: &[(&str, String)]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("idhal-knot-")
            .tempdir()
            .unwrap()
            .keep();
        let reaper = Reaper::new(&dir);
        let port = free_port();
        for sub in ["db", "zones"] {
            std::fs::create_dir(dir.join(sub)).unwrap();
        }
        let mut conf = format!(
            "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\n  pidfile: {d}/knot.pid\n\
             log:\n  - target: stderr\n    any: info\n\
             database:\n  storage: {d}/db\n\
             key:\n  - id: idhal-update\n    algorithm: hmac-sha256\n    secret: {TSIG_SECRET}\n\
             acl:\n  - id: upd\n    key: idhal-update\n    action: update\n\
             template:\n  - id: default\n    storage: {d}/zones\n    zonefile-sync: -1\n    journal-content: changes\n\
             zone:\n",
            d = dir.display()
        );
        for (name, text) in zones {
            std::fs::write(dir.join("zones").join(format!("{name}.zone")), text).unwrap();
            conf.push_str(&format!("  - domain: {name}\n    acl: upd\n"));
        }
        std::fs::write(dir.join("knot.conf"), conf).unwrap();
        let log = std::fs::File::create(dir.join("knot.log")).unwrap();
        let child = Command::new("/usr/sbin/knotd")
            .arg("-c")
            .arg(dir.join("knot.conf"))
            .process_group(0)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        reaper.watch(child.id());
        let knot = Self {
            dir,
            port,
            reaper,
            child: Mutex::new(Some(child)),
        };
        let first = zones[0].0;
        let log = knot.dir.join("knot.log");
        wait_for("Knot", Duration::from_secs(20), &log, || {
            !knot.dig(first, "SOA").is_empty()
        });
        knot
    }

    /// `kdig +short` answer lines.
    pub fn dig(&self, name: &str, rtype: &str) -> Vec<String> {
        let out = Command::new("/usr/bin/kdig")
            .arg("@127.0.0.1")
            .args([
                "-p",
                &self.port.to_string(),
                "+short",
                "+time=1",
                "+retry=0",
                name,
                rtype,
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .map(|l| l.trim().to_owned())
            .collect()
    }

    pub fn write_key(&self, path: &Path, secret: &str) {
        std::fs::write(
            path,
            format!(
                "key \"idhal-update\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\";\n}};\n"
            ),
        )
        .unwrap();
    }
}

/// A minimal zone file (SOA + NS) for Knot to start from.
pub fn empty_zone(name: &str) -> String {
    format!("$ORIGIN {name}.\n$TTL 60\n@ IN SOA ns.example. hostmaster.example. 1 3600 600 86400 60\n@ IN NS ns.example.\n")
}

/// OpenVPN-like environment for one node.
pub fn node_env(cn: &str, vpn_ip: &str, since: u64) -> Vec<(String, String)> {
    vec![
        ("common_name".into(), cn.into()),
        ("X509_0_CN".into(), cn.into()),
        ("ifconfig_pool_remote_ip".into(), vpn_ip.into()),
        ("trusted_ip".into(), "127.0.0.1".into()),
        ("trusted_port".into(), "40000".into()),
        ("time_unix".into(), since.to_string()),
        ("dev".into(), "tun0".into()),
        ("script_type".into(), "client-connect".into()),
    ]
}

/// Runs `idhal hook EVENT` the way OpenVPN does: a clean environment holding only its variables.
pub fn hook(config: &Path, state_dir: &Path, event: &str, env: &[(String, String)]) -> Output {
    let mut cmd = Command::new(IDHAL);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state_dir)
        .args(["hook", event]);
    cmd.output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A fresh state dir and config file holding `toml`.
pub fn setup(toml: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("server.toml");
    std::fs::write(&cfg, toml).unwrap();
    let state = d.path().join("state");
    (d, cfg, state)
}
