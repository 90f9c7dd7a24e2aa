//! OpenVPN 2.6 in tests: always on 127.0.0.1, and never touching the host's network (the tun
//! device gets no address or route, no kernel DCO: the hooks and the management interface are
//! what is under test). Processes are [`Logged`]: stopped and waited for when dropped.
use crate::process::Logged;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const OPENVPN: &str = "/usr/sbin/openvpn";

/// What OpenVPN tests need installed (with [`crate::require`]; root too, for the tun device).
pub const PROGRAMS: [&str; 3] = [OPENVPN, "/usr/bin/openssl", "/dev/net/tun"];

/// True when OpenVPN, openssl and a tun device are here and we are root; otherwise the one
/// rule ([`crate::skip_or_fail`]) and false.
pub fn available() -> bool {
    crate::require(&PROGRAMS)
}

/// Options given after everything else, so they win over a config file: leave the host's
/// network alone, no kernel data channel offload.
pub const NO_HOST_NETWORK: [&str; 3] = ["--ifconfig-noexec", "--route-noexec", "--disable-dco"];

/// How long an OpenVPN server or client gets to say "Initialization Sequence Completed".
pub const UP_LIMIT: Duration = Duration::from_secs(30);

/// The line OpenVPN logs once it is up (a server listening, a client's tunnel established).
pub const UP: &str = "Initialization Sequence Completed";

/// `openvpn` to be run in `dir`; add its arguments, then [`spawn`] it.
pub fn command(dir: &Path) -> Command {
    let mut c = Command::new(OPENVPN);
    c.current_dir(dir);
    c
}

/// Starts `cmd` (from [`command`]) with [`NO_HOST_NETWORK`] last, its output to `log`.
pub fn spawn(cmd: &mut Command, log: &Path) -> Logged {
    Logged::spawn(cmd.args(NO_HOST_NETWORK), log)
}

/// A client on `--dev null` from what enrollment gave a node: its files (`ca.crt`,
/// `node.crt`, `openvpn.conf`, `node.key`, as name and text) written into `dir`, its log there.
pub fn enrolled_client(dir: &Path, files: [(&str, &str); 4]) -> Logged {
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    spawn(
        command(dir).args(["--config", "openvpn.conf", "--dev", "null", "--verb", "3"]),
        &dir.join("client.log"),
    )
}

/// [`spawn`] of `--config CONF` (a rendered server config) and waits until it is [`UP`].
pub fn server_from_config(dir: &Path, conf: &Path, log: &Path) -> Logged {
    let mut s = spawn(command(dir).arg("--config").arg(conf), log);
    s.wait_log(UP, UP_LIMIT);
    s
}

/// A client in `dir` (ca.crt, client.crt, client.key as [`test_pki`] makes them) to
/// 127.0.0.1:`port`, on a tun device named `dev` (short: IFNAMSIZ) that it neither configures
/// nor routes.
pub fn tun_client(dir: &Path, port: u16, dev: &str, log: &Path) -> Logged {
    spawn(
        command(dir).args([
            "--client",
            "--proto",
            "tcp-client",
            "--remote",
            "127.0.0.1",
            &port.to_string(),
            "--dev",
            dev,
            "--dev-type",
            "tun",
            "--ca",
            "ca.crt",
            "--cert",
            "client.crt",
            "--key",
            "client.key",
            "--verb",
            "3",
        ]),
        log,
    )
}

/// In `dir`: a throwaway CA (`ca.crt`, `ca.key`), a server certificate (`server.crt`,
/// `server.key`) and one client certificate (`client.crt`, `client.key`) with CN `cn`.
pub fn test_pki(dir: &Path, cn: &str) {
    use crate::x509;
    x509::ca(dir, "idhal-test-ca", "ca.key", "ca.crt");
    let ca = ("ca.key", "ca.crt");
    let usage = "keyUsage=digitalSignature\nextendedKeyUsage=";
    x509::leaf(
        dir,
        "server",
        ("server.key", "server.crt"),
        ca,
        &format!("{usage}serverAuth\n"),
    );
    x509::leaf(
        dir,
        cn,
        ("client.key", "client.crt"),
        ca,
        &format!("{usage}clientAuth\n"),
    );
}
