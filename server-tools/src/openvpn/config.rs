//! OpenVPN configuration idhal renders: the server's (`ServerSetup`, from `idhal openvpn
//! server-config`) and the one an enrolled node receives (`client_config`).

use crate::config::{OpenVpnSection, Remote};
use crate::names::{IfName, Ipv4Net, NameError};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// OpenVPN's longest option line (OPTION_LINE_SIZE 256, with its newline).
const MAX_LINE: usize = 255;

/// Why a server config was not rendered: OpenVPN would misread it or refuse to start.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{0} is not UTF-8")]
    NotUtf8(PathBuf),
    #[error("{0:?}: OpenVPN configs cannot hold paths with spaces, quotes or backslashes")]
    Unquotable(String),
    #[error("[openvpn] push_routes: {route}")]
    PushRoute {
        route: String,
        #[source]
        source: NameError,
    },
    #[error("[openvpn] management {0}: keep the management interface on loopback")]
    ManagementNotLoopback(SocketAddr),
    #[error("this line of the OpenVPN config would be {} characters, more than OpenVPN's {MAX_LINE}: use a shorter path\n  {line}", line.len())]
    LineTooLong { line: String },
}

/// A path OpenVPN can take on its command lines: it splits script commands on whitespace and
/// has no quoting that survives, so such paths are refused rather than mangled.
fn plain(path: &Path) -> Result<String, RenderError> {
    let s = path
        .to_str()
        .ok_or_else(|| RenderError::NotUtf8(path.to_owned()))?;
    if s.chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
    {
        return Err(RenderError::Unquotable(s.to_owned()));
    }
    Ok(s.to_owned())
}

/// The files of the project's CA the server config names (`ca::pki::ProjectDir` lays them out).
#[derive(Debug, Clone)]
pub struct ServerFiles {
    pub ca_cert: PathBuf,
    pub crl: PathBuf,
    /// This server's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct ServerSetup<'a> {
    pub project: &'a str,
    /// The management password file; `None` only with `management_auth = "none"`.
    pub management_password: Option<PathBuf>,
    pub name: &'a str,
    pub pool: Ipv4Net,
    pub files: ServerFiles,
    pub openvpn: &'a OpenVpnSection,
    pub idhal: &'a Path,
    pub config: Option<PathBuf>,
    pub state_dir: &'a Path,
    /// `[routing] dev` when idhal writes node routes (`[routing] table`): the tun device is
    /// named so that OpenVPN, the hooks and reconcile agree on it. `None`: `dev tun`.
    pub route_dev: Option<&'a IfName>,
}

impl ServerSetup<'_> {
    pub fn render(&self) -> Result<String, RenderError> {
        let o = self.openvpn;
        // The hook command names only the binary: the config and state paths travel as
        // `setenv` lines, each on its own line, so none of them makes a line too long.
        let hook = format!("{} hook", plain(self.idhal)?);
        let mut s = String::new();
        let w = &mut s;
        // One line of the config; writing into a String cannot fail.
        macro_rules! put {
            ($($arg:tt)*) => {{
                let _ = writeln!(w, $($arg)*);
            }};
        }
        put!("# OpenVPN 2.6 server {} of idhal project {}, rendered by `idhal openvpn server-config`.", self.name, self.project);
        put!("# No dynamic pool and no client-config-dir: the client-connect hook gives each enrolled node");
        put!("# its fixed address from the state database (ifconfig-push) and refuses unknown or revoked ones.");
        put!("proto tcp-server");
        put!("local {}", o.listen.ip());
        put!("port {}", o.listen.port());
        match self.route_dev {
            // Reconcile writes missing routes on [routing] dev: the device must be that one,
            // not whichever tunN the kernel hands out.
            Some(dev) => put!("dev {dev}\ndev-type tun"),
            None => put!("dev tun"),
        }
        put!("topology subnet");
        put!("server {} {} nopool", self.pool.addr, self.pool.netmask());
        put!("ca {}", plain(&self.files.ca_cert)?);
        put!("cert {}", plain(&self.files.cert)?);
        put!("key {}", plain(&self.files.key)?);
        put!("crl-verify {}", plain(&self.files.crl)?);
        put!("dh none");
        put!("tls-version-min 1.2");
        put!("remote-cert-tls client");
        put!("keepalive {} {}", o.keepalive.0, o.keepalive.1);
        for r in &o.push_routes {
            let net = Ipv4Net::parse(r).map_err(|source| RenderError::PushRoute {
                route: r.clone(),
                source,
            })?;
            put!("push \"route {} {}\"", net.addr, net.netmask());
        }
        for d in &o.push_dns {
            put!("push \"dhcp-option DNS {d}\"");
        }
        if o.client_to_client {
            put!("client-to-client");
        }
        if let Some(m) = o.management.first() {
            if !m.ip().is_loopback() {
                return Err(RenderError::ManagementNotLoopback(*m));
            }
            match &self.management_password {
                Some(pw) => put!("management {} {} {}", m.ip(), m.port(), plain(pw)?),
                None => {
                    put!("# No management password: [openvpn] management_auth = \"none\".");
                    put!("management {} {}", m.ip(), m.port())
                }
            }
        }
        put!("script-security 2");
        if let Some(c) = &self.config {
            put!("setenv IDHAL_CONFIG {}", plain(c)?);
        }
        put!("setenv IDHAL_STATE_DIR {}", plain(self.state_dir)?);
        // OpenVPN's per-client client-connect files: where `idhal hook worker` may write.
        put!("tmp-dir {}", plain(&o.tmp_dir(self.state_dir))?);
        put!("client-connect \"{hook} client-connect\"");
        put!("client-disconnect \"{hook} client-disconnect\"");
        put!("status {} 10", plain(&o.status_file)?);
        put!("status-version 2");
        put!("persist-key");
        put!("verb 3");
        check_line_lengths(&s)?;
        Ok(s)
    }
}

/// OpenVPN reads option lines of at most 255 characters (OPTION_LINE_SIZE 256) and refuses to
/// start on a longer one: say which, here, rather than let the server fail at its next start.
fn check_line_lengths(config: &str) -> Result<(), RenderError> {
    if let Some(line) = config
        .lines()
        .find(|l| !l.starts_with('#') && l.len() > MAX_LINE)
    {
        return Err(RenderError::LineTooLong {
            line: line.to_owned(),
        });
    }
    Ok(())
}

/// The client configuration an enrolled node receives. It names its files relative to its own
/// directory (`openvpn --cd DIR --config openvpn.conf`).
pub fn client_config(project: &str, node: &str, o: &OpenVpnSection) -> String {
    let mut s = format!(
        "# idhal node {node} (project {project}): OpenVPN client configuration from enrollment.\n\
         # Run: openvpn --cd DIR --config openvpn.conf (DIR holds ca.crt, node.crt, node.key)\n\
         client\ndev tun\nproto tcp-client\n"
    );
    for r in &o.remotes {
        // Validated when the config was loaded.
        if let Ok(r) = Remote::parse(r) {
            s.push_str(&format!("remote {} {}\n", r.host, r.port));
        }
    }
    // After a lost connection or a refusal the node tries the same remote once, then the next
    // ones in order. connect-retry's MAX caps every pause (auth-retry nointeract starts them
    // at 10 s). server-poll-timeout bounds the wait for a remote's first answer (120 s by
    // default) so a node leaves a dead host for the next remote; with one remote there is no
    // next one, and giving up on a server busy with a boot storm would only add a reconnect.
    let (first, max) = o.connect_retry;
    let _ = writeln!(s, "connect-retry {first} {max}");
    if o.remotes.len() > 1 {
        let _ = writeln!(s, "server-poll-timeout {}", o.server_poll_timeout_secs);
    }
    // auth-retry: the server refuses a node (AUTH_FAILED) when a backend failed for now (OAR,
    // DNS, a storm's queue); OpenVPN's default then exits for good,
    // this makes it try again.
    s.push_str(
        "auth-retry nointeract\nresolv-retry infinite\nnobind\nremote-cert-tls server\n\
         tls-version-min 1.2\nca ca.crt\ncert node.crt\nkey node.key\npersist-key\nverb 3\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_lists_every_remote() {
        let o = OpenVpnSection {
            remotes: vec!["vpn1.example.org:1194".into(), "10.0.2.100:443".into()],
            ..OpenVpnSection::default()
        };
        let c = client_config("p", "client7", &o);
        assert!(c.contains("remote vpn1.example.org 1194\nremote 10.0.2.100 443\n"));
        // The failover settings: a dead remote is left after 4 s, no pause is over 2 s.
        assert!(
            c.contains("\nconnect-retry 1 2\nserver-poll-timeout 4\n"),
            "{c}"
        );
        // One remote: nowhere to go, OpenVPN's own poll timeout stays.
        let one = OpenVpnSection {
            remotes: vec!["vpn1.example.org:1194".into()],
            ..OpenVpnSection::default()
        };
        let c = client_config("p", "client7", &one);
        assert!(
            c.contains("\nconnect-retry 1 2\n") && !c.contains("server-poll-timeout"),
            "{c}"
        );
        assert!(c.contains("remote-cert-tls server"));
        assert!(
            c.contains("auth-retry nointeract\n"),
            "a refused node must try again"
        );
    }

    /// The files as `ca::pki::ProjectDir` lays them out for project "p", server "vpn1".
    fn files(state_dir: &str) -> ServerFiles {
        let dir = Path::new(state_dir).join("projects/p");
        ServerFiles {
            ca_cert: dir.join("ca.crt"),
            crl: dir.join("crl.pem"),
            cert: dir.join("servers/vpn1.crt"),
            key: dir.join("servers/vpn1.key"),
        }
    }

    /// Server vpn1 of project "p" in state dir /s, with `o` and the management password `pw`.
    fn vpn1<'a>(o: &'a OpenVpnSection, pw: Option<&str>) -> ServerSetup<'a> {
        ServerSetup {
            project: "p",
            management_password: pw.map(PathBuf::from),
            name: "vpn1",
            pool: Ipv4Net::parse("10.134.0.0/16").unwrap(),
            files: files("/s"),
            openvpn: o,
            idhal: Path::new("/usr/bin/idhal"),
            config: None,
            state_dir: Path::new("/s"),
            route_dev: None,
        }
    }

    #[test]
    fn with_node_routes_the_tun_device_is_the_one_reconcile_writes_on() {
        let o = OpenVpnSection::default();
        let dev = IfName::parse("tun7").unwrap();
        let with = ServerSetup {
            route_dev: Some(&dev),
            ..vpn1(&o, None)
        }
        .render()
        .unwrap();
        assert!(with.contains("\ndev tun7\ndev-type tun\n"), "{with}");
        let without = vpn1(&o, None).render().unwrap();
        assert!(without.contains("\ndev tun\n"), "{without}");
    }

    #[test]
    fn client_to_client_only_when_asked() {
        let o = OpenVpnSection::default();
        assert!(!vpn1(&o, None)
            .render()
            .unwrap()
            .contains("client-to-client"));
        let on = OpenVpnSection {
            client_to_client: true,
            ..OpenVpnSection::default()
        };
        assert!(vpn1(&on, None)
            .render()
            .unwrap()
            .contains("\nclient-to-client\n"));
    }

    #[test]
    fn the_management_interface_gets_a_password_unless_told_otherwise() {
        let o = OpenVpnSection {
            management: vec!["127.0.0.1:7505".parse().unwrap()],
            ..OpenVpnSection::default()
        };
        let with = vpn1(&o, Some("/s/projects/p/management.pw"))
            .render()
            .unwrap();
        assert!(
            with.contains("\nmanagement 127.0.0.1 7505 /s/projects/p/management.pw\n"),
            "{with}"
        );
        let without = vpn1(&o, None).render().unwrap();
        assert!(without.contains("management_auth = \"none\""), "{without}");
        assert!(
            without.contains("\nmanagement 127.0.0.1 7505\n"),
            "{without}"
        );
    }

    #[test]
    fn deep_paths_stay_within_openvpns_line_length_or_are_refused() {
        let deep = format!("/{}", "d".repeat(200));
        let o = OpenVpnSection::default();
        let render = |state: &Path| {
            ServerSetup {
                project: "p",
                management_password: None,
                name: "vpn1",
                pool: Ipv4Net::parse("10.134.0.0/16").unwrap(),
                files: files(&deep),
                openvpn: &o,
                idhal: Path::new("/usr/local/bin/idhal"),
                config: Some(PathBuf::from(format!("{deep}/server.toml"))),
                state_dir: state,
                route_dev: None,
            }
            .render()
        };
        // 200-character dirs: before, the hook line held both paths (over 400 characters) and
        // OpenVPN refused to start.
        let c = render(Path::new(&deep)).unwrap();
        assert!(c.lines().all(|l| l.len() <= 255), "{c}");
        assert!(c.contains("\nclient-connect \"/usr/local/bin/idhal hook client-connect\"\n"));
        assert!(
            c.contains(&format!("\nsetenv IDHAL_STATE_DIR {deep}\n")),
            "{c}"
        );
        assert!(
            c.contains(&format!("\nsetenv IDHAL_CONFIG {deep}/server.toml\n")),
            "{c}"
        );
        let deeper = format!("/{}", "d".repeat(300));
        let e = render(Path::new(&deeper)).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "this line of the OpenVPN config would be 324 characters, more than OpenVPN's \
                 255: use a shorter path\n  setenv IDHAL_STATE_DIR {deeper}"
            )
        );
    }

    #[test]
    fn bad_settings_are_refused_by_name() {
        let render = |o: &OpenVpnSection| {
            ServerSetup {
                project: "p",
                management_password: None,
                name: "vpn1",
                pool: Ipv4Net::parse("10.134.0.0/16").unwrap(),
                files: files("/s"),
                openvpn: o,
                idhal: Path::new("/usr/bin/idhal"),
                config: None,
                state_dir: Path::new("/s"),
                route_dev: None,
            }
            .render()
        };
        let o = OpenVpnSection {
            management: vec!["10.0.0.1:7505".parse().unwrap()],
            ..OpenVpnSection::default()
        };
        match render(&o) {
            Err(RenderError::ManagementNotLoopback(a)) => {
                assert_eq!(a.to_string(), "10.0.0.1:7505")
            }
            other => panic!("{other:?}"),
        }
        let o = OpenVpnSection {
            push_routes: vec!["10.1.0.0/16".into(), "10.2.0.1/16".into()],
            ..OpenVpnSection::default()
        };
        match render(&o) {
            Err(RenderError::PushRoute { route, .. }) => assert_eq!(route, "10.2.0.1/16"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn paths_openvpn_would_split_are_refused() {
        let refused = |p: &str| plain(Path::new(p)).unwrap_err().to_string();
        let why = ": OpenVPN configs cannot hold paths with spaces, quotes or backslashes";
        assert_eq!(refused("/a b/idhal"), format!("\"/a b/idhal\"{why}"));
        assert_eq!(refused("/a\"b"), format!("\"/a\\\"b\"{why}"));
        assert!(plain(Path::new("/usr/local/bin/idhal")).is_ok());
    }
}
