//! An OpenVPN 2.6 server on 127.0.0.1 for guests to tunnel to, and a throwaway PKI for it.
//! The server's tun device gets no address or route (--ifconfig-noexec/--route-noexec): the
//! host's network is untouched and nothing can leave the tunnel on the host side. Its
//! client-connect/-disconnect command is `idhal … hook` (or any command taking the event name).
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("/usr/bin/openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A CA, a server certificate and one client certificate per CN, in `dir` (P-256, 2 days).
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path, client_cns: &[&str]) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=idhal-test-ca",
            "-days",
            "2",
        ]);
        openssl(dir, &ca);
        std::fs::write(
            dir.join("server.ext"),
            "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n",
        )
        .unwrap();
        std::fs::write(
            dir.join("client.ext"),
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n",
        )
        .unwrap();
        let mut certs = vec![("server".to_string(), "server".to_string(), "server.ext")];
        certs.extend(
            client_cns
                .iter()
                .map(|cn| (cn.to_string(), cn.to_string(), "client.ext")),
        );
        for (name, cn, ext) in &certs {
            let (key, csr, crt, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("/CN={cn}"),
            );
            let mut req = vec!["req"];
            req.extend(ec);
            req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &req);
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &crt,
                    "-days",
                    "2",
                    "-extfile",
                    ext,
                ],
            );
        }
        Pki {
            dir: dir.to_path_buf(),
        }
    }

    pub fn file(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.dir.join(name)).unwrap()
    }
}

/// A port nobody listens on right now (bind :0, read, close). OpenVPN cannot be told to pick one.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct OpenVpnServer {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl OpenVpnServer {
    /// `hook`: a command prefix; OpenVPN runs `HOOK client-connect` and `HOOK client-disconnect`
    /// (e.g. `idhal --config server.toml --state-dir DIR hook`).
    pub fn start(pki: &Pki, hook: Option<&str>) -> OpenVpnServer {
        let port = free_port();
        let log = pki.dir.join("openvpn-server.log");
        // Interface names are at most 15 bytes and must not collide between test processes.
        let dev = format!("idhv{}", std::process::id() % 100_000);
        let mut cmd = Command::new("/usr/sbin/openvpn");
        cmd.current_dir(&pki.dir)
            .args([
                "--mode",
                "server",
                "--tls-server",
                "--proto",
                "tcp-server",
                "--local",
                "127.0.0.1",
            ])
            .args([
                "--port",
                &port.to_string(),
                "--dev",
                &dev,
                "--dev-type",
                "tun",
            ])
            .args([
                "--ifconfig-noexec",
                "--route-noexec",
                "--disable-dco",
                "--topology",
                "subnet",
            ])
            .args(["--ifconfig", "10.134.0.1", "255.255.0.0"])
            .args([
                "--ifconfig-pool",
                "10.134.8.10",
                "10.134.8.50",
                "255.255.0.0",
            ])
            .args(["--push", "topology subnet", "--keepalive", "1", "3"])
            .args([
                "--ca",
                "ca.crt",
                "--cert",
                "server.crt",
                "--key",
                "server.key",
                "--dh",
                "none",
            ])
            .args(["--verb", "3"]);
        if let Some(h) = hook {
            cmd.args(["--script-security", "2"])
                .args(["--client-connect", &format!("{h} client-connect")])
                .args(["--client-disconnect", &format!("{h} client-disconnect")]);
        }
        let f = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("starting openvpn");
        let mut s = OpenVpnServer { child, port, log };
        let deadline = Instant::now() + crate::Limits::SERVER_START;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(st)) = s.child.try_wait() {
                panic!("openvpn server exited ({st}):\n{}", s.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "openvpn server not listening:\n{}",
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        s
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OpenVpnServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- OpenVPN server log -----\n{}", self.log_text());
        }
    }
}
