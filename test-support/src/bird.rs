//! BIRD 2 (Debian's `bird2`) inside a [`Topology`] namespace: `bird -f -c FILE -s SOCK -P PID`
//! in the foreground, stopped by pid (a [`Logged`] child, and the topology's reaper if the test
//! process dies), and `birdc -s SOCK show …` to read what it knows. The control socket is a
//! path: `birdc` reaches it from any namespace.
use crate::netns::Topology;
use crate::process::Logged;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const BIRD: &str = "/usr/sbin/bird";
pub const BIRDC: &str = "/usr/sbin/birdc";

/// True when BIRD 2, birdc and ip(8) are here and we are root; otherwise the one rule.
pub fn available() -> bool {
    crate::require(&[BIRD, BIRDC, crate::netns::IP])
}

/// How long BIRD gets to open its control socket.
pub const START_LIMIT: Duration = Duration::from_secs(30);

/// One BIRD daemon: its config, control socket and log in `dir` under `name`.
pub struct Bird {
    pub name: String,
    pub conf: PathBuf,
    pub sock: PathBuf,
    pub process: Logged,
}

impl Bird {
    /// Writes `config` to `DIR/NAME.conf`, checks it (`bird -p`), starts BIRD in namespace
    /// `ns` of `topo` and waits until `birdc` gets an answer.
    pub fn start(topo: &Topology, ns: &str, dir: &Path, name: &str, config: &str) -> Bird {
        let conf = dir.join(format!("{name}.conf"));
        std::fs::write(&conf, config).unwrap();
        let parsed = Command::new(BIRD).arg("-p").arg("-c").arg(&conf).output();
        let parsed = parsed.expect("running bird -p");
        assert!(
            parsed.status.success(),
            "BIRD refuses {}: {}{}\n{config}",
            conf.display(),
            String::from_utf8_lossy(&parsed.stdout),
            String::from_utf8_lossy(&parsed.stderr)
        );
        let sock = dir.join(format!("{name}.ctl"));
        let pidfile = dir.join(format!("{name}.pid"));
        let mut cmd = topo.command(ns, BIRD);
        cmd.arg("-f")
            .arg("-c")
            .arg(&conf)
            .arg("-s")
            .arg(&sock)
            .arg("-P")
            .arg(&pidfile);
        let process = topo.spawn(&mut cmd, &dir.join(format!("{name}.log")));
        let b = Bird {
            name: name.into(),
            conf,
            sock,
            process,
        };
        let log = b.process.log.clone();
        crate::wait_logged(&format!("BIRD {name}"), START_LIMIT, &[&log], || {
            b.try_birdc(&["show", "status"])
                .is_some_and(|s| s.contains("Daemon is up and running"))
        });
        b
    }

    /// `birdc -s SOCK ARGS…`: its output when it ran, None when it could not.
    pub fn try_birdc(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(BIRDC)
            .arg("-s")
            .arg(&self.sock)
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `birdc -s SOCK show ARGS…` (`&["protocols"]`, `&["route", "for", "10.8.0.5"]`).
    #[track_caller]
    pub fn show(&self, args: &[&str]) -> String {
        let mut all = vec!["show"];
        all.extend_from_slice(args);
        self.try_birdc(&all)
            .unwrap_or_else(|| panic!("birdc {all:?} on {}: no answer", self.name))
    }

    /// Whether protocol `proto` is up (`Established` for BGP, `up` otherwise).
    pub fn up(&self, proto: &str) -> bool {
        // birdc fails for a protocol BIRD does not have (yet): not up.
        let shown = self
            .try_birdc(&["show", "protocols", proto])
            .unwrap_or_default();
        shown.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&proto) && f.get(3) == Some(&"up")
        })
    }

    /// Waits until [`Bird::up`] for `proto`.
    #[track_caller]
    pub fn wait_up(&self, proto: &str, limit: Duration) {
        let log = self.process.log.clone();
        crate::wait_logged(
            &format!("BIRD {}: protocol {proto} up", self.name),
            limit,
            &[&log],
            || self.up(proto),
        );
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM, waited for (what drop does, now).
    pub fn stop(&mut self) {
        self.process.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two BIRDs on one bridge peer with BGP; a static route of one reaches the other's table
    /// and the other's kernel; stopping the first by pid withdraws it.
    #[test]
    fn two_birds_peer_in_namespaces_and_stop_by_pid() {
        if !available() {
            return;
        }
        let t = Topology::new();
        t.bridge("br");
        for (ns, a) in [("a", "10.77.0.1/24"), ("b", "10.77.0.2/24")] {
            t.add(ns);
            t.plug(ns, "lan0", "br", a);
        }
        let d = tempfile::tempdir().unwrap();
        let conf = |me: &str, peer: &str, extra: &str| {
            format!(
                "router id {me};\nprotocol device {{ }}\n\
                 protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
                 {extra}\n\
                 protocol bgp peer {{ local {me} as 65000; neighbor {peer} as 65000; direct;\n\
                 hold time 3; keepalive time 1; connect retry time 1;\n\
                 ipv4 {{ import all; export where source = RTS_STATIC; next hop self; }}; }}\n"
            )
        };
        let mut a = Bird::start(
            &t,
            "a",
            d.path(),
            "a",
            &conf(
                "10.77.0.1",
                "10.77.0.2",
                "protocol static { ipv4; route 10.99.5.0/24 blackhole; }",
            ),
        );
        let b = Bird::start(&t, "b", d.path(), "b", &conf("10.77.0.2", "10.77.0.1", ""));
        b.wait_up("peer", Duration::from_secs(60));
        crate::wait_for("b's kernel has a's route", Duration::from_secs(30), || {
            t.run("b", &["ip", "route", "show", "10.99.5.0/24"])
                .contains("via 10.77.0.1")
        });
        assert!(b
            .show(&["route", "for", "10.99.5.1"])
            .contains("10.99.5.0/24"));
        let pid = a.pid();
        a.stop();
        assert!(!crate::process::alive(pid));
        crate::wait_for("b withdrew a's route", Duration::from_secs(30), || {
            t.run("b", &["ip", "route", "show", "10.99.5.0/24"])
                .is_empty()
        });
    }

    #[test]
    #[should_panic(expected = "BIRD refuses")]
    fn a_config_bird_refuses_fails_before_starting() {
        if !available() {
            panic!("BIRD refuses (not here)");
        }
        let t = Topology::new();
        t.add("a");
        let d = tempfile::tempdir().unwrap();
        Bird::start(&t, "a", d.path(), "bad", "router id nonsense;\n");
    }
}
