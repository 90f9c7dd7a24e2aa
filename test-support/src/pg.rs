//! A private PostgreSQL cluster on 127.0.0.1 with a random port, started and stopped by pid: for
//! OAR's database ([`crate::oar::Oar`]) and for any test that needs a real PostgreSQL alone. It
//! trusts local connections (a throwaway cluster), runs without fsync, and is stopped when
//! dropped and, whatever happens, when the test process exits (a [`Reaper`]).
use crate::process::{signal, Reaper};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// How long PostgreSQL gets to accept connections after it starts.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// (uid, gid) of a system user, from /etc/passwd.
pub fn user_ids(name: &str) -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 3 && f[0] == name)
                .then(|| (f[2].parse().expect("a uid"), f[3].parse().expect("a gid")))
        })
        .unwrap_or_else(|| panic!("user {name} missing"))
}

/// A PostgreSQL program (`postgres`, `initdb`, `pg_isready`) of the newest installed major.
pub fn pg_bin(tool: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.last()
        .map(|d| d.join("bin").join(tool))
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin").join(tool))
}

/// The `postgres` program's path, for [`crate::require`].
pub fn pg_available() -> String {
    pg_bin("postgres").display().to_string()
}

/// One PostgreSQL cluster: data in `<dir>/pg/data`, socket dir and log in `<dir>/pg`.
pub struct Postgres {
    /// `<dir>/pg`: the data dir, the Unix socket, `postgres.log`.
    pub dir: PathBuf,
    pub port: u16,
    reaper: Arc<Reaper>,
    child: Mutex<Option<Child>>,
    /// Whether the whole folder is this fixture's own (made by [`Postgres::start`]).
    owns: Option<PathBuf>,
}

impl Postgres {
    /// True when PostgreSQL is installed and we are root (it runs as its own user); otherwise
    /// the one rule ([`crate::skip_or_fail`]) and false.
    pub fn available() -> bool {
        crate::require(&[&pg_available(), &pg_bin("initdb").display().to_string()])
    }

    /// A cluster in a temp dir of its own, removed when dropped (or when the process exits).
    pub fn start() -> Postgres {
        let dir = crate::keep_dir("idhal-pg-");
        let reaper = Arc::new(Reaper::new(&dir));
        let mut pg = Postgres::start_in(&dir, reaper);
        pg.owns = Some(dir);
        pg
    }

    /// A cluster in `<dir>/pg`, its process registered with `reaper`.
    pub fn start_in(dir: &Path, reaper: Arc<Reaper>) -> Postgres {
        // PostgreSQL refuses to run as root: its data dir belongs to the postgres user, and so
        // must every folder above it be searchable.
        let (uid, gid) = user_ids("postgres");
        let pg = dir.join("pg");
        std::fs::create_dir(&pg).unwrap();
        std::os::unix::fs::chown(&pg, Some(uid), Some(gid)).unwrap();
        crate::ok(
            Command::new(pg_bin("initdb"))
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
                .expect("running initdb"),
        );
        let p = Postgres {
            dir: pg,
            port: crate::free_port(),
            reaper,
            child: Mutex::new(None),
            owns: None,
        };
        p.start_server();
        p
    }

    /// Starts the postmaster (again, after [`Postgres::stop`]) and waits until it accepts
    /// connections.
    pub fn start_server(&self) {
        let (uid, gid) = user_ids("postgres");
        let log = self.log();
        let f = std::fs::File::create(&log).unwrap();
        std::os::unix::fs::chown(&log, Some(uid), Some(gid)).unwrap();
        let child = Command::new(pg_bin("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                // Tests count connections (a hook opens the state once).
                "-c",
                "log_connections=on",
            ])
            .uid(uid)
            .gid(gid)
            .process_group(0)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        self.reaper.watch(child.id());
        *self.child.lock().unwrap() = Some(child);
        crate::wait_logged("PostgreSQL", START_LIMIT, &[&log], || self.ready());
    }

    /// Whether it accepts connections now (`pg_isready`).
    pub fn ready(&self) -> bool {
        Command::new(pg_bin("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Fast shutdown (SIGINT to the postmaster), waited for.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            signal("INT", &c.id().to_string());
            let _ = c.wait();
        }
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(|c| c.id())
    }

    /// `postgres.log`.
    pub fn log(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// A libpq connection string for database `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with `psql` on database `db`; its unaligned, tuples-only output. Panics with
    /// psql's error when it fails.
    #[track_caller]
    pub fn psql(&self, db: &str, sql: &str) -> String {
        crate::ok(
            Command::new(pg_bin("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
                .arg(self.url(db))
                .args(["-c", sql])
                .output()
                .expect("running psql"),
        )
    }
}

/// One cluster for the whole test binary, started on first use and never dropped: its reaper
/// stops it and removes its files when the test process exits. `None` (after the one rule,
/// [`crate::skip_or_fail`]) when PostgreSQL cannot run here.
pub fn shared() -> Option<&'static Postgres> {
    static PG: OnceLock<Postgres> = OnceLock::new();
    if !Postgres::available() {
        return None;
    }
    Some(PG.get_or_init(Postgres::start))
}

impl Postgres {
    /// A new, empty database of its own for one test; its URL (superuser `postgres`, no
    /// password: the cluster trusts local connections).
    pub fn fresh_db(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// Makes role `user` log in with `password` only (scram-sha-256 over TCP, ahead of the
    /// cluster's trust rule), owning database `db`: for tests of password handling.
    pub fn password_role(&self, user: &str, password: &str, db: &str) {
        self.psql(
            "postgres",
            &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"),
        );
        self.psql("postgres", &format!("ALTER DATABASE {db} OWNER TO {user}"));
        let hba = self.dir.join("data/pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!("host all {user} 127.0.0.1/32 scram-sha-256\n{old}"),
        )
        .unwrap();
        self.psql("postgres", "SELECT pg_reload_conf()");
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
        if let Some(d) = &self.owns {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
