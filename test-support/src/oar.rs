//! OAR 2.5 (Debian's oar-server: its database on a private [`Postgres`], and Almighty) on
//! 127.0.0.1 with ephemeral ports, stopped by pid: the batch scheduler `idhal hook` and
//! `idhal reconcile` drive. One instance per test binary is the habit (a `static`): its
//! [`Reaper`] stops it and removes its files when the process exits, however it exits.
use crate::pg::Postgres;
use crate::process::{listening, signal, Reaper};
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where Debian's oar-server puts OAR's programs.
pub const OARDIR: &str = "/usr/lib/oar";

/// What [`Oar::start`] and idhal's `[oar]` section need installed (with [`crate::require`];
/// root too).
pub fn programs() -> Vec<String> {
    let mut p = vec!["/usr/sbin/oar-database".to_string()];
    for tool in ["Almighty", "oarnodes", "oarnodesetting", "oarproperty"] {
        p.push(format!("{OARDIR}/{tool}"));
    }
    p.push(crate::pg::pg_available());
    p
}

/// PostgreSQL + OAR's database + Almighty, private to one test binary.
pub struct Oar {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub pg: Postgres,
    pub pg_port: u16,
    pub server_port: u16,
    reaper: Arc<Reaper>,
    almighty: Mutex<Option<Child>>,
}

impl Oar {
    /// True when OAR and PostgreSQL are installed and we are root; otherwise the one rule
    /// ([`crate::skip_or_fail`]) and false.
    pub fn available() -> bool {
        crate::require(&programs())
    }

    pub fn start() -> Self {
        let t = Instant::now();
        let dir = crate::keep_dir("idhal-oar-");
        let reaper = Arc::new(Reaper::new(&dir));
        let pg = Postgres::start_in(&dir, reaper.clone());
        let pg_port = pg.port;
        let server_port = crate::free_port();
        let conf = dir.join("oar.conf");
        let oar = Self {
            dir: dir.clone(),
            conf: conf.clone(),
            pg,
            pg_port,
            server_port,
            reaper,
            almighty: Mutex::new(None),
        };

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

    /// Starts PostgreSQL again after [`Oar::stop_postgres`].
    pub fn start_postgres(&self) {
        self.pg.start_server();
    }

    /// Fast shutdown (SIGINT to the postmaster), waited for.
    pub fn stop_postgres(&self) {
        self.pg.stop();
    }

    pub fn start_almighty(&self) {
        self.start_almighty_as(&[], "127.0.0.1", &self.conf);
        let port = self.server_port;
        let log = self.dir.join("almighty.log");
        crate::wait_logged("Almighty", Duration::from_secs(30), &[&log], || {
            listening(port).0
        });
        assert!(!listening(port).1, "Almighty listens beyond loopback");
    }

    /// Almighty run as `WRAP… perl Almighty` (`ip netns exec NS`: in a namespace, whose
    /// processes it then starts too), bound to `addr` only, reading OAR config `conf`.
    fn start_almighty_as(&self, wrap: &[&str], addr: &str, conf: &Path) -> u32 {
        // Almighty binds 0.0.0.0 with no option to change it: run a copy whose listening
        // socket gets LocalAddr ADDR, and check the patch applied.
        let src = std::fs::read_to_string(format!("{OARDIR}/Almighty")).unwrap();
        let needle = "IO::Socket::INET->new(LocalPort=> $serverport,";
        assert_eq!(
            src.matches(needle).count(),
            1,
            "OAR's Almighty changed: cannot bind it to {addr}, refusing to start it on all addresses"
        );
        let patched = src.replace(
            needle,
            &format!("IO::Socket::INET->new(LocalAddr => '{addr}', LocalPort=> $serverport,"),
        );
        let bin = self.dir.join("Almighty");
        std::fs::write(&bin, patched).unwrap();
        let log = std::fs::File::create(self.dir.join("almighty.log")).unwrap();
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("/usr/bin/perl");
                c
            }
            None => Command::new("/usr/bin/perl"),
        };
        let child = cmd
            .arg(&bin)
            .envs(self.env())
            .env("OARCONFFILE", conf)
            .env("OARDO_USER", "oar")
            .current_dir(&self.dir)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid = child.id();
        self.reaper.watch(pid);
        *self.almighty.lock().unwrap() = Some(child);
        pid
    }

    /// OAR reachable from other network namespaces (where the VPN servers' hooks run):
    /// loopback is per namespace, Unix sockets are not. Writes `oar-ns.conf`, whose
    /// `DB_HOSTNAME` is PostgreSQL's socket dir (libpq reads a leading `/` as one) and whose
    /// `SERVER_HOSTNAME` is `addr`, then restarts Almighty as `WRAP… perl Almighty` (`ip netns
    /// exec HEAD`) bound to `addr:server_port` with that config. Without it `oarnodesetting`
    /// in a namespace still exits 0, but its "ChState" to 127.0.0.1 reaches nobody and the
    /// state it wrote waits for Almighty's own timer. Returns the config; give it to the
    /// tools with [`Oar::env_for`] / [`Oar::config_section_for`].
    pub fn serve_namespaces(&self, wrap: &[&str], addr: &str) -> PathBuf {
        let base = std::fs::read_to_string(&self.conf).unwrap();
        let mut text = String::new();
        for line in base.lines() {
            let key = line.split('=').next().unwrap_or("").trim();
            if !line.trim_start().starts_with('#')
                && matches!(key, "DB_HOSTNAME" | "SERVER_HOSTNAME")
            {
                continue;
            }
            text.push_str(line);
            text.push('\n');
        }
        text.push_str(&format!(
            "DB_HOSTNAME=\"{}\"\nSERVER_HOSTNAME=\"{addr}\"\n",
            self.pg.dir.display()
        ));
        let conf = self.dir.join("oar-ns.conf");
        std::fs::write(&conf, text).unwrap();
        self.stop_almighty();
        let pid = self.start_almighty_as(wrap, addr, &conf);
        let port = self.server_port;
        let log = self.dir.join("almighty.log");
        crate::wait_logged(
            "Almighty in its namespace",
            Duration::from_secs(30),
            &[&log],
            || listens_in(pid, port),
        );
        conf
    }

    /// SIGTERM to Almighty's whole process group, waited for.
    pub fn stop_almighty(&self) {
        if let Some(mut c) = self.almighty.lock().unwrap().take() {
            signal("TERM", &format!("-{}", c.id()));
            let _ = c.wait();
            let port = self.server_port;
            let log = self.dir.join("almighty.log");
            crate::wait_logged("Almighty to stop", Duration::from_secs(15), &[&log], || {
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
        self.config_section_for(&self.conf)
    }

    /// [`Oar::env`] with OAR config `conf` ([`Oar::serve_namespaces`]'s).
    pub fn env_for(&self, conf: &Path) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in &mut env {
            if k == "OARCONFFILE" {
                *v = conf.display().to_string();
            }
        }
        env
    }

    /// [`Oar::config_section`] with OAR config `conf` ([`Oar::serve_namespaces`]'s).
    pub fn config_section_for(&self, conf: &Path) -> String {
        let mut s = format!(
            "[oar]\noarnodes = \"{OARDIR}/oarnodes\"\noarnodesetting = \"{OARDIR}/oarnodesetting\"\noarproperty = \"{OARDIR}/oarproperty\"\n[oar.env]\n"
        );
        for (k, v) in self.env_for(conf) {
            s.push_str(&format!("{k} = \"{v}\"\n"));
        }
        s
    }

    /// The `[oar]` section with OAR's three tools behind wrappers in `dir` that append each
    /// call (`TOOL ARGS…`, one line) to the returned log and then exec the real tool: for
    /// tests and benchmarks that count or inspect the OAR processes idhal starts. Arguments
    /// idhal passes hold no newline (validated values), so one line is one call.
    pub fn logged_config_section(&self, dir: &Path) -> (String, PathBuf) {
        use std::os::unix::fs::PermissionsExt as _;
        let log = dir.join("oar-calls.log");
        std::fs::write(&log, "").unwrap();
        let mut section = self.config_section();
        for tool in ["oarnodes", "oarnodesetting", "oarproperty"] {
            let wrapper = dir.join(tool);
            std::fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nprintf '%s\\n' \"{tool} $*\" >> '{}'\nexec {OARDIR}/{tool} \"$@\"\n",
                    log.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            section = section.replace(
                &format!("\"{OARDIR}/{tool}\""),
                &format!("\"{}\"", wrapper.display()),
            );
        }
        (section, log)
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

impl Drop for Oar {
    fn drop(&mut self) {
        // Almighty's whole group; PostgreSQL stops in its own drop. Never panics.
        if let Some(mut c) = self
            .almighty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            crate::process::stop(&mut c, true);
        }
    }
}

/// Whether process `pid` (in whatever network namespace it runs) has a TCP socket listening
/// on `port`: /proc/PID/net/tcp is that process's namespace's table.
fn listens_in(pid: u32, port: u16) -> bool {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3
            && f[3] == "0A"
            && f[1]
                .split_once(':')
                .is_some_and(|(_, p)| u16::from_str_radix(p, 16).ok() == Some(port))
    })
}

/// The calls a [`Oar::logged_config_section`] log holds, one `TOOL ARGS…` string each.
pub fn logged_calls(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}
