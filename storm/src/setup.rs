//! The rig: OAR on its PostgreSQL, Knot, the project (`idhal ca init`, a server certificate),
//! N `idhal serve` and the OpenVPN server idhal renders, all on 127.0.0.1 with ephemeral ports.
//! Every process is registered with one [`Reaper`], which stops it when this process exits,
//! however it exits (Ctrl-C included), and removes the work directory.

use crate::args::{Args, HookMode};
use idhal_manifest::enroll::EnrollKey;
use idhal_test_support::knot::{empty_zone, Knot, TSIG_SECRET};
use idhal_test_support::oar::Oar;
use idhal_test_support::process::{announced, Reaped, Reaper};
use idhal_test_support::{free_port, ok, openvpn, Logged};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const DOMAIN: &str = "storm.test";
pub const REVERSE: &str = "134.10.in-addr.arpa";
/// This OpenVPN server's name (OAR `idhalserver`): reconcile takes down only its nodes.
pub const SERVER: &str = "storm1";

pub struct Rig {
    pub dir: PathBuf,
    pub reaper: Reaper,
    pub oar: Oar,
    pub knot: Knot,
    pub idhal: PathBuf,
    pub config: PathBuf,
    pub state: PathBuf,
    pub enroll_key: EnrollKey,
    pub serves: Vec<Serve>,
    pub openvpn: Logged,
    /// `idhal hook worker`, in deferred mode: held, stopped with the rig.
    _worker: Option<Logged>,
    pub management: u16,
    pub management_pw: PathBuf,
    /// OpenVPN's own status file (written every second).
    pub status: PathBuf,
    /// What reconcile reads: OpenVPN's status plus the hook-path sessions.
    pub merged_status: PathBuf,
    pub state_desc: String,
}

pub struct Serve {
    pub child: Reaped,
    pub addr: String,
}

impl Rig {
    pub fn start(a: &Args) -> Rig {
        let dir = idhal_test_support::keep_dir("idhal-storm-");
        // Kills every registered process group at exit; removes the work dir unless --keep.
        let reaper = Reaper::new(&if a.keep {
            dir.join("kept")
        } else {
            dir.clone()
        });
        eprintln!("work dir {}", dir.display());
        let idhal = a.idhal.clone().unwrap_or_else(|| {
            eprintln!("building idhal (cargo build --locked -p idhal-server-tools, this profile)");
            idhal_test_support::bin("idhal-server-tools", "idhal")
        });
        let oar = Oar::start();
        let knot = Knot::start(&[(DOMAIN, empty_zone(DOMAIN)), (REVERSE, empty_zone(REVERSE))]);
        let tsig = dir.join("tsig.key");
        knot.write_key(&tsig, TSIG_SECRET);

        let (openvpn_port, management) = (free_port(), free_port());
        let status = dir.join("openvpn-status.log");
        let merged_status = dir.join("reconcile-status.log");
        let state = dir.join("state");
        let (state_line, state_desc) = match a.state_url.as_deref() {
            None => (String::new(), format!("SQLite in {}", state.display())),
            Some("pg") => {
                oar.pg.psql("postgres", "CREATE DATABASE idhal_storm");
                let url = oar.pg.url("idhal_storm");
                (
                    format!("[state]\ndatabase = \"{url}\"\n"),
                    format!("PostgreSQL {url} (the OAR cluster's)"),
                )
            }
            Some(url) => (
                format!("[state]\ndatabase = \"{url}\"\n"),
                format!("PostgreSQL {url}"),
            ),
        };
        let mode = match a.hook_mode {
            HookMode::Sync => "mode = \"sync\"\n",
            HookMode::Deferred => "mode = \"deferred\"\n",
        };
        let mut extra = a
            .config_extra
            .as_ref()
            .map(|f| std::fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display())))
            .unwrap_or_default();
        // TOML allows one [hook] table: when the extra file has its own, the mode goes in it.
        let hook = match extra.find("[hook]\n") {
            Some(at) => {
                extra.insert_str(at + "[hook]\n".len(), mode);
                String::new()
            }
            None => format!("[hook]\n{mode}"),
        };
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "{state_line}{hook}\
                 [names]\ndomain = \"{DOMAIN}\"\n\
                 [dns]\nupdate = \"rfc2136\"\nserver = \"127.0.0.1:{knot}\"\ntsig_key_file = \"{tsig}\"\n\
                 [reconcile]\nstatus_file = \"{merged}\"\n\
                 [openvpn]\nremotes = [\"127.0.0.1:{openvpn_port}\"]\nlisten = \"127.0.0.1:{openvpn_port}\"\n\
                 management = [\"127.0.0.1:{management}\"]\nstatus_file = \"{status}\"\nname = \"{SERVER}\"\n\
                 idhal = \"{idhal}\"\n\
                 {oar}{extra}",
                knot = knot.port,
                tsig = tsig.display(),
                merged = merged_status.display(),
                status = status.display(),
                idhal = idhal.display(),
                oar = oar.config_section(),
            ),
        )
        .unwrap();

        let run = |args: &[&str]| idhal_cmd(&idhal, &state, &config, args);
        ok(run(&["ca", "init"]));
        let enroll_key: EnrollKey = ok(run(&["ca", "enroll-key"]))
            .trim()
            .parse()
            .expect("an enrollment key from `idhal ca enroll-key`");
        ok(run(&["ca", "issue-server", SERVER]));
        let rendered = ok(run(&["openvpn", "server-config", "--name", SERVER]));
        let server_conf = dir.join("openvpn-server.conf");
        std::fs::write(&server_conf, &rendered).unwrap();
        let management_pw = state.join("projects/default/management.pw");

        let pubdir = dir.join("pub");
        std::fs::create_dir_all(&pubdir).unwrap();
        let serves = (0..a.serve)
            .map(|i| {
                let log = dir.join(format!("serve-{i}.log"));
                let (child, addr) = announced(
                    Command::new(&idhal)
                        .arg("--state-dir")
                        .arg(&state)
                        .arg("--config")
                        .arg(&config)
                        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
                        .arg(&pubdir)
                        .process_group(0)
                        .stderr(std::fs::File::create(&log).unwrap()),
                    "listening on http://",
                    Duration::from_secs(30),
                );
                reaper.watch(child.id());
                Serve { child, addr }
            })
            .collect::<Vec<_>>();

        // Deferred: the worker answers the hooks' hand-offs (without it they work synchronously).
        let worker = matches!(a.hook_mode, HookMode::Deferred).then(|| {
            let mut w = Logged::spawn(
                Command::new(&idhal)
                    .arg("--state-dir")
                    .arg(&state)
                    .arg("--config")
                    .arg(&config)
                    .args(["hook", "worker"])
                    .process_group(0),
                dir.join("hook-worker.log"),
            );
            reaper.watch(w.pid());
            w.wait_log("idhal hook worker: listening on", Duration::from_secs(30));
            w
        });

        // The rendered config, with three overrides after it (later options win): a tun device
        // name of our own (other suites run OpenVPN at the same time), the status every second
        // (reconcile reads a fresh one), and nothing on the host's network (NO_HOST_NETWORK).
        let dev = format!("idhst{}", std::process::id() % 100_000);
        let log = dir.join("openvpn-server.log");
        let mut server = openvpn::spawn(
            openvpn::command(&dir)
                .arg("--config")
                .arg(&server_conf)
                .args(["--dev", &dev, "--dev-type", "tun", "--status"])
                .arg(&status)
                .arg("1"),
            &log,
        );
        reaper.watch(server.pid());
        server.wait_log(openvpn::UP, openvpn::UP_LIMIT);
        eprintln!(
            "rig up: OAR (PostgreSQL 127.0.0.1:{}), Knot 127.0.0.1:{}, {} idhal serve ({}), OpenVPN 127.0.0.1:{openvpn_port} (management {management}); state: {state_desc}",
            oar.pg_port,
            knot.port,
            serves.len(),
            serves.iter().map(|s| s.addr.as_str()).collect::<Vec<_>>().join(", "),
        );
        Rig {
            dir,
            reaper,
            oar,
            knot,
            idhal,
            config,
            state,
            enroll_key,
            serves,
            openvpn: server,
            _worker: worker,
            management,
            management_pw,
            status,
            merged_status,
            state_desc,
        }
    }

    /// `idhal --state-dir S --config C ARGS…`, its output.
    pub fn idhal(&self, args: &[&str]) -> Output {
        idhal_cmd(&self.idhal, &self.state, &self.config, args)
    }
}

fn idhal_cmd(idhal: &Path, state: &Path, config: &Path, args: &[&str]) -> Output {
    Command::new(idhal)
        .arg("--state-dir")
        .arg(state)
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", idhal.display()))
}
