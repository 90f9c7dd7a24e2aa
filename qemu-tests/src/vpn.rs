//! The project's OpenVPN 2.6 server on 127.0.0.1, running exactly the configuration
//! `idhal openvpn server-config` renders (fixed addresses from the client-config-dir,
//! crl-verify, management, `idhal hook` as client-connect/-disconnect). Its tun device gets no
//! address or route (--ifconfig-noexec/--route-noexec): the host's network is untouched and
//! nothing can leave the tunnel on the host side.
use crate::ca::Ca;
use crate::console::LineTimes;
use idhal_test_support::{openvpn, Logged};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub struct OpenVpnServer {
    child: Logged,
    pub port: u16,
    pub management: u16,
    /// OpenVPN's log; the hooks' stderr lands here too (`idhal hook client-connect: …`).
    pub log: PathBuf,
    /// Every log line with the host time it was first seen: when a hook finished, for the
    /// figures.
    seen: LineTimes,
}

impl OpenVpnServer {
    /// Renders the server config into the CA's dir and starts OpenVPN on it; returns once it
    /// says "Initialization Sequence Completed" (within `Limits::SERVER_START`).
    pub fn start(ca: &Ca) -> OpenVpnServer {
        let dir = ca.config.parent().unwrap().to_path_buf();
        let conf = dir.join("openvpn-server.conf");
        std::fs::write(&conf, ca.server_config()).unwrap();
        let log = dir.join("openvpn-server.log");
        let child = openvpn::spawn(openvpn::command(&dir).arg("--config").arg(&conf), &log);
        let seen = LineTimes::follow(&log, str::to_owned);
        let mut s = OpenVpnServer {
            child,
            port: ca.ports.port,
            management: ca.ports.management,
            log,
            seen,
        };
        s.child.wait_log(openvpn::UP, crate::Limits::SERVER_START);
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The first log line seen after `since` for which `pred` holds, and when it was seen.
    pub fn seen(&self, since: Instant, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.seen.first(since, pred)
    }

    /// Each connected client's link byte counters now, `(CN, received, sent)`, from the
    /// management interface's `status 2` (live, unlike the status file, which OpenVPN rewrites
    /// only every few seconds). `password` is the management password file.
    pub fn client_bytes(&self, password: &std::path::Path) -> Vec<(String, u64, u64)> {
        use std::io::{BufRead, BufReader, Read, Write};
        let pw = std::fs::read_to_string(password).unwrap();
        let pw = pw.lines().next().unwrap_or_default();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.management)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The prompt has no newline, and OpenVPN drops what arrives before it asked: answer it
        // first, then wait for the verdict before the command.
        let mut prompt = Vec::new();
        let mut byte = [0u8; 1];
        while !prompt.ends_with(b"ENTER PASSWORD:") {
            s.read_exact(&mut byte)
                .expect("the management prompt within 10 s");
            prompt.push(byte[0]);
        }
        writeln!(s, "{pw}").unwrap();
        let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
        let mut seen = String::new();
        let mut next = || {
            let line = lines
                .next()
                .and_then(Result::ok)
                .unwrap_or_else(|| panic!("management: the answer stopped after:\n{seen}"));
            seen.push_str(&line);
            seen.push('\n');
            line
        };
        while !next().starts_with("SUCCESS: password is correct") {}
        writeln!(s, "status 2").unwrap();
        let mut out = Vec::new();
        loop {
            let line = next();
            if line == "END" {
                break;
            }
            let f: Vec<&str> = line.split(',').collect();
            if f.len() > 6 && f[0] == "CLIENT_LIST" {
                out.push((
                    f[1].to_string(),
                    f[5].parse().unwrap(),
                    f[6].parse().unwrap(),
                ));
            }
        }
        let _ = writeln!(s, "quit");
        out
    }

    /// How many times `needle` occurs in the server's log.
    pub fn count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }
}

impl Drop for OpenVpnServer {
    fn drop(&mut self) {
        // SIGKILL, not SIGTERM: a stopping server would run client-disconnect hooks against the
        // shared OAR. The Logged child then waits for it and prints its log if the test fails.
        let _ = self.child.child.kill();
    }
}
