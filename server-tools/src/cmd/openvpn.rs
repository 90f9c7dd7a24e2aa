//! OpenVPN configurations: `idhal openvpn server-config` renders a project's server config in
//! the classic shape (TCP, tun, fixed addresses from the client-config-dir, CRL, hooks), and
//! `client_config` is what every enrolled node receives.

use crate::ca::db::{Db, Open};
use crate::ca::pki::ProjectDir;
use crate::cmd::Global;
use crate::config::{OpenVpnSection, Remote, ServerConfig};
use crate::names::Ipv4Net;
use crate::openvpn::management::{ensure_password_file, password_file};
use anyhow::Context as _;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
#[command(
    about = "Render OpenVPN configurations for a project",
    long_about = "Renders OpenVPN 2.6 configurations from the project's state and [openvpn] \
        in --config (see docs/enrollment.md)."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a server config: TCP, dev tun, the project's address pool with every node's fixed
    /// address in the client-config-dir (ccd-exclusive: only enrolled nodes get in),
    /// crl-verify, keepalive, pushed routes and DNS, a management interface on loopback with a
    /// password (the file is created 0600 when missing, never overwritten; none only with
    /// [openvpn] management_auth = "none"), and `idhal hook` as client-connect /
    /// client-disconnect.
    #[command(after_help = "Example:\n  \
        idhal ca issue-server vpn1\n  \
        idhal --config /etc/idhal/server.toml openvpn server-config --name vpn1 \\\n      \
        > /etc/openvpn/server/idhal.conf\n  \
        systemctl enable --now openvpn-server@idhal")]
    ServerConfig {
        /// The server certificate to use (made by `idhal ca issue-server NAME`).
        #[arg(long)]
        name: String,
        /// Project (default: [ca] project).
        #[arg(long)]
        project: Option<String>,
    },
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<ExitCode> {
    let cfg = match ServerConfig::load_or_exit(global.config.as_deref()) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let Command::ServerConfig { name, project } = args.command;
    let project = crate::cmd::ca::project_name(project, &cfg)?;
    let db = Db::open(&global.state_dir, Open::Existing)?;
    let row = crate::cmd::ca::require_project(&db, &project)?;
    let pool = Ipv4Net::parse(&row.pool)?;
    crate::cmd::ca::require_inside_names_pool(&cfg, &project, &pool)?;
    let paths = ProjectDir::new(&global.state_dir, &project);
    let cert = paths.servers().join(format!("{name}.crt"));
    anyhow::ensure!(
        cert.is_file(),
        "no server certificate {}: run `idhal ca issue-server {name} --project {project}`",
        cert.display()
    );
    let idhal = match &cfg.openvpn.idhal {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this idhal binary")?,
    };
    let management_password = match password_file(&cfg, &global.state_dir, &project) {
        Some(pw) => {
            if ensure_password_file(&pw)? {
                eprintln!(
                    "idhal openvpn server-config: management password created in {} (0600)",
                    pw.display()
                );
            }
            Some(pw)
        }
        None => None,
    };
    let server = ServerSetup {
        project: &project,
        management_password,
        name: &name,
        pool,
        paths: &paths,
        openvpn: &cfg.openvpn_for(&project),
        idhal: &idhal,
        config: global
            .config
            .as_deref()
            .map(std::path::absolute)
            .transpose()?,
        state_dir: &std::path::absolute(&global.state_dir)?,
    };
    print!("{}", server.render()?);
    Ok(ExitCode::SUCCESS)
}

/// A path OpenVPN can take on its command lines: it splits script commands on whitespace and
/// has no quoting that survives, so such paths are refused rather than mangled.
fn plain(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    anyhow::ensure!(
        !s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\')),
        "{s:?}: OpenVPN configs cannot hold paths with spaces, quotes or backslashes"
    );
    Ok(s.to_owned())
}

pub struct ServerSetup<'a> {
    pub project: &'a str,
    /// The management password file; `None` only with `management_auth = "none"`.
    pub management_password: Option<PathBuf>,
    pub name: &'a str,
    pub pool: Ipv4Net,
    pub paths: &'a ProjectDir,
    pub openvpn: &'a OpenVpnSection,
    pub idhal: &'a Path,
    pub config: Option<PathBuf>,
    pub state_dir: &'a Path,
}

impl ServerSetup<'_> {
    pub fn render(&self) -> anyhow::Result<String> {
        let o = self.openvpn;
        let servers = self.paths.servers();
        // The hook command names only the binary: the config and state paths travel as
        // `setenv` lines, each on its own line, so none of them makes a line too long.
        let hook = format!("{} hook", plain(self.idhal)?);
        let mut s = String::new();
        let w = &mut s;
        writeln!(w, "# OpenVPN 2.6 server {} of idhal project {}, rendered by `idhal openvpn server-config`.", self.name, self.project)?;
        writeln!(w, "# Nodes get fixed addresses from the client-config-dir (written at enrollment): no dynamic pool.")?;
        writeln!(w, "proto tcp-server")?;
        writeln!(w, "local {}", o.listen.ip())?;
        writeln!(w, "port {}", o.listen.port())?;
        writeln!(w, "dev tun")?;
        writeln!(w, "topology subnet")?;
        writeln!(
            w,
            "server {} {} nopool",
            self.pool.addr,
            self.pool.netmask()
        )?;
        writeln!(w, "client-config-dir {}", plain(&self.paths.ccd())?)?;
        writeln!(w, "ccd-exclusive")?;
        writeln!(w, "ca {}", plain(&self.paths.ca_cert())?)?;
        writeln!(
            w,
            "cert {}",
            plain(&servers.join(format!("{}.crt", self.name)))?
        )?;
        writeln!(
            w,
            "key {}",
            plain(&servers.join(format!("{}.key", self.name)))?
        )?;
        writeln!(w, "crl-verify {}", plain(&self.paths.crl())?)?;
        writeln!(w, "dh none")?;
        writeln!(w, "tls-version-min 1.2")?;
        writeln!(w, "remote-cert-tls client")?;
        writeln!(w, "keepalive {} {}", o.keepalive.0, o.keepalive.1)?;
        for r in &o.push_routes {
            let net = Ipv4Net::parse(r).with_context(|| format!("[openvpn] push_routes: {r}"))?;
            writeln!(w, "push \"route {} {}\"", net.addr, net.netmask())?;
        }
        for d in &o.push_dns {
            writeln!(w, "push \"dhcp-option DNS {d}\"")?;
        }
        if let Some(m) = o.management.first() {
            anyhow::ensure!(
                m.ip().is_loopback(),
                "[openvpn] management {m}: keep the management interface on loopback"
            );
            match &self.management_password {
                Some(pw) => writeln!(w, "management {} {} {}", m.ip(), m.port(), plain(pw)?)?,
                None => {
                    writeln!(
                        w,
                        "# No management password: [openvpn] management_auth = \"none\"."
                    )?;
                    writeln!(w, "management {} {}", m.ip(), m.port())?
                }
            }
        }
        writeln!(w, "script-security 2")?;
        if let Some(c) = &self.config {
            writeln!(w, "setenv IDHAL_CONFIG {}", plain(c)?)?;
        }
        writeln!(w, "setenv IDHAL_STATE_DIR {}", plain(self.state_dir)?)?;
        writeln!(w, "client-connect \"{hook} client-connect\"")?;
        writeln!(w, "client-disconnect \"{hook} client-disconnect\"")?;
        writeln!(w, "status {} 10", plain(&o.status_file)?)?;
        writeln!(w, "status-version 2")?;
        writeln!(w, "persist-key")?;
        writeln!(w, "verb 3")?;
        check_line_lengths(&s)?;
        Ok(s)
    }
}

/// OpenVPN reads option lines of at most 255 characters (OPTION_LINE_SIZE 256) and refuses to
/// start on a longer one: say which, here, rather than let the server fail at its next start.
fn check_line_lengths(config: &str) -> anyhow::Result<()> {
    const MAX: usize = 255;
    if let Some(line) = config
        .lines()
        .find(|l| !l.starts_with('#') && l.len() > MAX)
    {
        anyhow::bail!(
            "this line of the OpenVPN config would be {} characters, more than OpenVPN's {MAX}: \
             use a shorter path\n  {line}",
            line.len()
        );
    }
    Ok(())
}

/// The client configuration an enrolled node receives. It names its files relative to its own
/// directory (`openvpn --cd DIR --config openvpn.conf`).
pub fn client_config(project: &str, node: &str, remotes: &[String]) -> String {
    let mut s = format!(
        "# idhal node {node} (project {project}): OpenVPN client configuration from enrollment.\n\
         # Run: openvpn --cd DIR --config openvpn.conf (DIR holds ca.crt, node.crt, node.key)\n\
         client\ndev tun\nproto tcp-client\n"
    );
    for r in remotes {
        // Validated when the config was loaded.
        if let Ok(r) = Remote::parse(r) {
            s.push_str(&format!("remote {} {}\n", r.host, r.port));
        }
    }
    s.push_str(
        "connect-retry 1 10\nresolv-retry infinite\nnobind\nremote-cert-tls server\n\
         tls-version-min 1.2\nca ca.crt\ncert node.crt\nkey node.key\npersist-key\nverb 3\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_config_lists_every_remote() {
        let c = client_config(
            "p",
            "client7",
            &["vpn1.example.org:1194".into(), "10.0.2.100:443".into()],
        );
        assert!(c.contains("remote vpn1.example.org 1194\nremote 10.0.2.100 443\n"));
        assert!(c.contains("remote-cert-tls server"));
    }

    #[test]
    fn the_management_interface_gets_a_password_unless_told_otherwise() {
        let paths = ProjectDir::new(Path::new("/s"), "p");
        let o = OpenVpnSection {
            management: vec!["127.0.0.1:7505".parse().unwrap()],
            ..OpenVpnSection::default()
        };
        let setup = |pw: Option<&str>| ServerSetup {
            project: "p",
            management_password: pw.map(PathBuf::from),
            name: "vpn1",
            pool: Ipv4Net::parse("10.134.0.0/16").unwrap(),
            paths: &paths,
            openvpn: &o,
            idhal: Path::new("/usr/bin/idhal"),
            config: None,
            state_dir: Path::new("/s"),
        };
        let with = setup(Some("/s/projects/p/management.pw")).render().unwrap();
        assert!(
            with.contains("\nmanagement 127.0.0.1 7505 /s/projects/p/management.pw\n"),
            "{with}"
        );
        let without = setup(None).render().unwrap();
        assert!(without.contains("management_auth = \"none\""), "{without}");
        assert!(
            without.contains("\nmanagement 127.0.0.1 7505\n"),
            "{without}"
        );
    }

    #[test]
    fn deep_paths_stay_within_openvpns_line_length_or_are_refused() {
        let deep = format!("/{}", "d".repeat(200));
        let paths = ProjectDir::new(Path::new(&deep), "p");
        let o = OpenVpnSection::default();
        let render = |state: &Path| {
            ServerSetup {
                project: "p",
                management_password: None,
                name: "vpn1",
                pool: Ipv4Net::parse("10.134.0.0/16").unwrap(),
                paths: &paths,
                openvpn: &o,
                idhal: Path::new("/usr/local/bin/idhal"),
                config: Some(PathBuf::from(format!("{deep}/server.toml"))),
                state_dir: state,
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
        assert!(e.contains("more than OpenVPN's 255"), "{e}");
    }

    #[test]
    fn paths_openvpn_would_split_are_refused() {
        assert!(plain(Path::new("/a b/idhal")).is_err());
        assert!(plain(Path::new("/a\"b")).is_err());
        assert!(plain(Path::new("/usr/local/bin/idhal")).is_ok());
    }
}
