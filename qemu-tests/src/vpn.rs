//! The project's OpenVPN 2.6 server on 127.0.0.1, running exactly the configuration
//! `idhal openvpn server-config` renders (fixed addresses from the client-config-dir,
//! crl-verify, management, `idhal hook` as client-connect/-disconnect). Its tun device gets no
//! address or route (--ifconfig-noexec/--route-noexec): the host's network is untouched and
//! nothing can leave the tunnel on the host side.
use crate::ca::Ca;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct OpenVpnServer {
    child: Child,
    pub port: u16,
    pub management: u16,
    /// OpenVPN's log; the hooks' stderr lands here too (`idhal hook client-connect: …`).
    pub log: PathBuf,
    /// Every log line with the host time it was first seen (polled every 50 ms): when a hook
    /// finished, for the figures.
    seen: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl OpenVpnServer {
    /// Renders the server config into the CA's dir and starts OpenVPN on it; returns once it
    /// says "Initialization Sequence Completed" (within `Limits::SERVER_START`).
    pub fn start(ca: &Ca) -> OpenVpnServer {
        let dir = ca.config.parent().unwrap().to_path_buf();
        let conf = dir.join("openvpn-server.conf");
        std::fs::write(&conf, ca.server_config()).unwrap();
        let log = dir.join("openvpn-server.log");
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new("/usr/sbin/openvpn")
            .arg("--config")
            .arg(&conf)
            // After --config, so they win: leave the host's network alone; no kernel DCO (the
            // hooks and the management interface are what is under test).
            .args(["--ifconfig-noexec", "--route-noexec", "--disable-dco"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("starting openvpn");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (seen, stop, log) = (seen.clone(), stop.clone(), log.clone());
            std::thread::spawn(move || {
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let bytes = std::fs::read(&log).unwrap_or_default();
                    if let Some(end) = bytes.iter().rposition(|&b| b == b'\n') {
                        if end + 1 > done {
                            let now = Instant::now();
                            let text = String::from_utf8_lossy(&bytes[done..end + 1]);
                            seen.lock()
                                .unwrap()
                                .extend(text.lines().map(|l| (now, l.to_string())));
                            done = end + 1;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            });
        }
        let mut s = OpenVpnServer {
            child,
            port: ca.ports.port,
            management: ca.ports.management,
            log,
            seen,
            stop,
        };
        let deadline = Instant::now() + crate::Limits::SERVER_START;
        while !s.log_text().contains("Initialization Sequence Completed") {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("openvpn server exited ({st}):\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "openvpn server not up within {:?}:\n{}",
                crate::Limits::SERVER_START,
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line seen after `since` for which `pred` holds, and when it was seen.
    pub fn seen(&self, since: Instant, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .find(|(t, l)| *t >= since && pred(l))
            .cloned()
    }

    /// How many times `needle` occurs in the server's log.
    pub fn count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }
}

impl Drop for OpenVpnServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- OpenVPN server log -----\n{}", self.log_text());
        }
    }
}
