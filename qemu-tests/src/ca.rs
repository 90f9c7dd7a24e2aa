//! The server's state for enrollment, made and driven only through the real `idhal` binary:
//! `idhal ca init`, `ca issue-server`, `ca enroll-key`, `token create`, `revoke`, `nodes`.
//! One state dir and one config file (TOML) per test, in the test's own temp dir.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The name of the VPN server's certificate (`idhal ca issue-server vpn1`).
pub const VPN_SERVER_NAME: &str = "vpn1";

/// Where the harness's OpenVPN server listens (both ports picked free before the config is
/// written: OpenVPN cannot be told to pick its own and report it).
#[derive(Debug, Clone, Copy)]
pub struct VpnPorts {
    pub port: u16,
    pub management: u16,
}

pub struct Ca {
    idhal: PathBuf,
    /// `--state-dir`: the database, the project's CA; also the hooks' locks.
    pub state: PathBuf,
    /// `--config`.
    pub config: PathBuf,
    pub ports: VpnPorts,
    /// `idhal ca enroll-key`: signed into every manifest as `param enroll-key`.
    pub enroll_key: String,
    /// OpenVPN's status file (`[openvpn] status_file`).
    pub status_file: PathBuf,
}

impl Ca {
    /// Writes the config (`server_toml` + the harness's own `[openvpn]` section: listen and
    /// management on 127.0.0.1 with free ports, `keepalive [1, 5]` so a vanished guest is
    /// noticed in seconds, the default `remotes`, 10.0.2.100:1194, which is how guests reach
    /// that port, and `openvpn_toml`'s keys), then `ca init [--pool POOL]` and
    /// `ca issue-server vpn1`.
    pub fn init(
        idhal: &Path,
        dir: &Path,
        server_toml: &str,
        openvpn_toml: &str,
        pool: Option<&str>,
    ) -> Ca {
        std::fs::create_dir_all(dir).unwrap();
        let ports = VpnPorts {
            port: idhal_test_support::free_port(),
            management: idhal_test_support::free_port(),
        };
        let status_file = dir.join("openvpn-status.log");
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "{server_toml}\n[openvpn]\nlisten = \"127.0.0.1:{}\"\nmanagement = [\"127.0.0.1:{}\"]\n\
                 keepalive = [1, 5]\nstatus_file = \"{}\"\n{openvpn_toml}",
                ports.port,
                ports.management,
                status_file.display()
            ),
        )
        .unwrap();
        let mut ca = Ca {
            idhal: idhal.into(),
            state: dir.join("state"),
            config,
            ports,
            enroll_key: String::new(),
            status_file,
        };
        let mut init = vec!["ca", "init"];
        if let Some(p) = pool {
            init.extend(["--pool", p]);
        }
        ca.ok(&init);
        ca.ok(&["ca", "issue-server", VPN_SERVER_NAME]);
        ca.enroll_key = ca.ok(&["ca", "enroll-key"]).trim().to_string();
        ca
    }

    /// `idhal --state-dir S --config C ARGS…`.
    pub fn idhal(&self, args: &[&str]) -> Output {
        Command::new(&self.idhal)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("running idhal")
    }

    /// Like [`Ca::idhal`]; panics with idhal's output unless it exits 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        idhal_test_support::ok(self.idhal(args))
    }

    /// `idhal token create --type TYPE ARGS…`: the whole token (`ID.SECRET`).
    pub fn token(&self, node_type: &str, args: &[&str]) -> String {
        let mut all = vec!["token", "create", "--type", node_type];
        all.extend_from_slice(args);
        let token = self.ok(&all).trim().to_string();
        assert!(
            token.split_once('.').is_some_and(|(id, _)| id.len() == 16),
            "not a token: {token:?}"
        );
        token
    }

    /// `idhal nodes --json`: one object per node (id, project, type, address, enrolled_at,
    /// cert_serial, revoked_at).
    pub fn nodes(&self) -> Vec<serde_json::Value> {
        let text = self.ok(&["nodes", "--json"]);
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Array(v)) => v,
            _ => panic!("idhal nodes --json: not a JSON array: {text}"),
        }
    }

    /// `idhal token list --json`.
    pub fn tokens(&self) -> Vec<serde_json::Value> {
        let text = self.ok(&["token", "list", "--json"]);
        match serde_json::from_str(&text) {
            Ok(serde_json::Value::Array(v)) => v,
            _ => panic!("idhal token list --json: not a JSON array: {text}"),
        }
    }

    /// `idhal openvpn server-config --name vpn1`, as rendered.
    pub fn server_config(&self) -> String {
        self.ok(&["openvpn", "server-config", "--name", VPN_SERVER_NAME])
    }
}
