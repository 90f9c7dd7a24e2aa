//! `idhal openvpn drain` with two real OpenVPN 2.6 servers on 127.0.0.1 (configs rendered by
//! `idhal openvpn server-config`, tun devices they neither configure nor route), each with its
//! own idhal config and `idhal hook worker`, one state dir and one real OAR; real clients of
//! enrolled nodes whose configs list both servers.
//!
//! Draining vpn1 moves its nodes to vpn2 without any of them going Absent (`[hook]
//! down_grace_secs`); once vpn1 is stopped a node that starts lands on vpn2; a drain that
//! cannot finish says who stayed.

mod enroll_support;
mod hook_support;

use enroll_support::{client, enroll, ok, wait_for, NodeKey, Project, IDHAL};
use hook_support::Oar;
use idhal_manifest::enroll::Response;
use idhal_test_support::{free_port, openvpn, Logged};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const UP: &str = "Initialization Sequence Completed";

fn host(r: &Response) -> String {
    let o = r.address.octets();
    format!("vnode-{}-{}.drain.test", o[2], o[3])
}

struct Vpn {
    name: &'static str,
    config: PathBuf,
    port: u16,
}

impl Vpn {
    fn idhal(&self, p: &Project, args: &[&str]) -> Output {
        Command::new(IDHAL)
            .arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&p.state)
            .args(args)
            .output()
            .unwrap()
    }

    fn worker(&self, p: &Project) -> Logged {
        let mut cmd = Command::new(IDHAL);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("--state-dir")
            .arg(&p.state)
            .args(["hook", "worker"]);
        let mut w = Logged::spawn(
            &mut cmd,
            p.dir.path().join(format!("worker-{}.log", self.name)),
        );
        w.wait_log("idhal hook worker: listening on", Duration::from_secs(30));
        w
    }

    /// Both servers use vpn1's certificate: the test is about the hooks, not the PKI.
    fn server(&self, p: &Project) -> Logged {
        let rendered = ok(self.idhal(p, &["openvpn", "server-config", "--name", "vpn1"]));
        let conf = p.dir.path().join(format!("{}.conf", self.name));
        std::fs::write(&conf, rendered).unwrap();
        openvpn::server_from_config(
            p.dir.path(),
            &conf,
            &p.dir.path().join(format!("openvpn-{}.log", self.name)),
        )
    }
}

/// The node's OAR state and server (empty before its first registration).
fn oar_state(oar: &Oar, r: &Response) -> (String, String) {
    let row = oar.host(&host(r));
    let s = |k: &str| {
        row.first()
            .and_then(|r| r[k].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    (s("state"), s("idhalserver"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn a_drained_server_hands_its_nodes_to_the_next_remote_without_any_going_absent() {
    if !(openvpn::available() && Oar::available()) {
        return;
    }
    let oar = Oar::start();
    let tmp = tempfile::tempdir().unwrap();
    let (section, calls) = oar.logged_config_section(tmp.path());
    let (p1, p2) = (free_port(), free_port());
    let config = |name: &str, port: u16, mgmt: u16| {
        format!(
            "[names]\ndomain = \"drain.test\"\n\
             [hook]\ndown_grace_secs = 10\nbatch_window_ms = 100\nsocket = \"{sock}\"\n\
             [limits]\nhook_budget_ms = 60000\ncommand_timeout_ms = 30000\nstate_confirm_ms = 30000\nlock_wait_ms = 60000\n\
             [openvpn]\nremotes = [\"127.0.0.1:{p1}\", \"127.0.0.1:{p2}\"]\nlisten = \"127.0.0.1:{port}\"\n\
             management = [\"127.0.0.1:{mgmt}\"]\nkeepalive = [1, 5]\nstatus_file = \"{status}\"\nname = \"{name}\"\n{section}",
            sock = tmp.path().join(format!("{name}.sock")).display(),
            status = tmp.path().join(format!("status-{name}.log")).display(),
        )
    };
    let p = Project::new(&config("vpn1", p1, free_port()));
    let vpn1 = Vpn {
        name: "vpn1",
        config: p.config.clone(),
        port: p1,
    };
    let vpn2 = Vpn {
        name: "vpn2",
        config: p.dir.path().join("vpn2.toml"),
        port: p2,
    };
    std::fs::write(&vpn2.config, config("vpn2", p2, free_port())).unwrap();
    ok(p.idhal(&["ca", "issue-server", "vpn1"]));

    let web = p.serve();
    let token = p.token(&["--uses", "4"]);
    let keys: Vec<NodeKey> = (0..4).map(|_| NodeKey::random()).collect();
    let nodes: Vec<Response> = keys
        .iter()
        .map(|k| enroll(&web.addr, &p.enroll_key, &token, k).unwrap())
        .collect();
    let (w1, _w2) = (vpn1.worker(&p), vpn2.worker(&p));
    let s1 = vpn1.server(&p);
    let s2 = vpn2.server(&p);

    // Three nodes start; vpn1 is every node's first remote.
    let clients: Vec<Logged> = (0..3)
        .map(|i| client(&p.dir.path().join(format!("n{i}")), &nodes[i], &keys[i]))
        .collect();
    for (c, r) in clients.iter().zip(&nodes) {
        wait_for("the node is up", Duration::from_secs(60), || {
            c.log().contains(UP)
        });
        wait_for("the node is Alive on vpn1", Duration::from_secs(60), || {
            oar_state(&oar, r) == ("Alive".into(), "vpn1".into())
        });
    }

    // Drain vpn1.
    let t = Instant::now();
    let o = vpn1.idhal(&p, &["openvpn", "drain", "--rate", "10", "--timeout", "60"]);
    let drained = t.elapsed();
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("3 node(s) told to move on"),
        "{}",
        text(&o)
    );
    let moved = Instant::now();
    for (c, r) in clients.iter().zip(&nodes) {
        wait_for("the node is Alive on vpn2", Duration::from_secs(60), || {
            oar_state(&oar, r) == ("Alive".into(), "vpn2".into())
        });
        assert!(
            c.log().contains(&format!("127.0.0.1:{}", vpn2.port)),
            "{}",
            c.log()
        );
    }
    eprintln!(
        "drain of 3 nodes: {:.2} s for `idhal openvpn drain`, all Alive on vpn2 {:.2} s later",
        drained.as_secs_f64(),
        moved.elapsed().as_secs_f64()
    );

    // Past the grace, vpn1's held disconnects have run: every node was left up (its newer
    // session is vpn2's), and no take-down ever named one.
    wait_for(
        "vpn1's held disconnects ran",
        Duration::from_secs(60),
        || {
            w1.log().matches("disconnects: batch of").count() >= 1 && {
                let done: usize = w1
                    .log()
                    .lines()
                    .filter_map(|l| l.split("disconnects: batch of ").nth(1))
                    .filter_map(|n| n.split(':').next()?.trim().parse::<usize>().ok())
                    .sum();
                done >= 3
            }
        },
    );
    for r in &nodes[..3] {
        assert_eq!(oar_state(&oar, r), ("Alive".into(), "vpn2".into()));
    }
    let log = std::fs::read_to_string(&calls).unwrap();
    assert!(
        !log.lines().any(|l| l.contains("Absent")),
        "a node went Absent during the drain:\n{log}"
    );

    // A drain that runs out of time says who stayed and exits 1 (here at once: no time).
    let o = vpn2.idhal(&p, &["openvpn", "drain", "--timeout", "0"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("still connected after 0 s: "),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains(nodes[0].node.as_str()), "{}", text(&o));

    // Drained, then stopped: a node that starts now finds vpn1 closed and lands on vpn2.
    drop(s1);
    let late = client(&p.dir.path().join("n3"), &nodes[3], &keys[3]);
    wait_for(
        "the late node is Alive on vpn2",
        Duration::from_secs(90),
        || oar_state(&oar, &nodes[3]) == ("Alive".into(), "vpn2".into()),
    );
    drop((clients, late, s2, web));
}
