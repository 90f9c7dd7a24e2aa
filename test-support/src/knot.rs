//! Knot DNS on 127.0.0.1 with an ephemeral port, serving zones that one TSIG key may update
//! (RFC 2136): the DNS server `idhal hook` updates. Stopped (and its files removed) when the
//! test process exits, however it exits ([`Reaper`]), or now with [`Knot::stop`].
use crate::process::{listening, Reaper};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::Duration;

/// What [`Knot::start`] and the tests that query or update it need installed.
pub const PROGRAMS: [&str; 3] = ["/usr/sbin/knotd", "/usr/bin/kdig", "/usr/bin/knsupdate"];

/// Knot DNS serving a forward and a reverse zone, updatable with one TSIG key.
pub struct Knot {
    pub dir: PathBuf,
    pub port: u16,
    /// Stops knotd and removes `dir` when the process exits.
    _reaper: Reaper,
    child: Mutex<Option<Child>>,
}

pub const TSIG_SECRET: &str = "aWRoYWwtdGVzdC1rZXktaWRoYWwtdGVzdC1rZXk=";

impl Knot {
    /// True when Knot is installed and we are root; otherwise the one rule
    /// ([`crate::skip_or_fail`]) and false.
    pub fn available() -> bool {
        crate::require(&PROGRAMS)
    }

    /// `zones`: (zone name, zone file text).
    pub fn start(zones: &[(&str, String)]) -> Self {
        let dir = crate::keep_dir("idhal-knot-");
        let reaper = Reaper::new(&dir);
        let port = crate::free_port();
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
            _reaper: reaper,
            child: Mutex::new(Some(child)),
        };
        let first = zones[0].0;
        let log = knot.dir.join("knot.log");
        crate::wait_logged("Knot", Duration::from_secs(20), &[&log], || {
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

    /// Stops knotd now (SIGTERM by its pid, waited for) and waits until its port is free.
    pub fn stop(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            crate::process::stop(&mut c, false);
            let port = self.port;
            crate::wait_for("Knot to stop", Duration::from_secs(10), || {
                !listening(port).0
            });
        }
    }

    /// Writes the TSIG key in the BIND format `idhal`'s `[dns] tsig_key_file` reads.
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
