//! The real server for the agent's exchanges: `idhal ca init`, `idhal token create`,
//! `idhal sign --param enroll-key=...` and `idhal serve` on 127.0.0.1:0, enrolled nodes, and a
//! man in the middle. Used by tests/enroll.rs and tests/peers.rs.
//!
//! The `idhal` binary is $IDHAL_BIN, else built (once per run) into this test's own target dir
//! by idhal-test-support's `bin`: never a stale one, and a clean target dir works.

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};

pub const SERVER_CONFIG: &str = "[openvpn]\nremotes = [\"vpn1.example.org:1194\"]\n";
pub const ENROLLED: [&str; 6] = [
    "address",
    "ca.crt",
    "node-id",
    "node.crt",
    "node.key",
    "openvpn.conf",
];

pub fn idhal_bin() -> PathBuf {
    match std::env::var_os("IDHAL_BIN") {
        Some(p) => p.into(),
        None => idhal_test_support::bin("idhal-server-tools", "idhal"),
    }
}

/// `idhal serve`, killed on drop.
pub struct Server {
    _child: Reaped,
    pub url: String,
}

/// A server state dir with the default project (`idhal ca init`), a manifest signing key and a
/// publication dir.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub enroll_key: String,
}

impl Project {
    pub fn new() -> Project {
        Project::with_openvpn("")
    }

    /// With `extra` lines in server.toml's `[openvpn]` section.
    pub fn with_openvpn(extra: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("server.toml"),
            format!("{SERVER_CONFIG}{extra}"),
        )
        .unwrap();
        let p = Project {
            dir,
            enroll_key: String::new(),
        };
        ok(p.idhal(&["ca", "init"]));
        let enroll_key = ok(p.idhal(&["ca", "enroll-key"])).trim().to_owned();
        let keys = p.path("keys");
        ok(p.idhal(&["keygen", "--no-passphrase", "--dir", keys.to_str().unwrap()]));
        Project { enroll_key, ..p }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(idhal_bin());
        c.arg("--state-dir")
            .arg(self.path("state"))
            .arg("--config")
            .arg(self.path("server.toml"))
            .args(args);
        c
    }

    pub fn idhal(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// `idhal token create --type vnode ...`: the token, printed alone on stdout.
    pub fn token(&self, extra: &[&str]) -> String {
        let mut args = vec!["token", "create", "--type", "vnode"];
        args.extend_from_slice(extra);
        ok(self.idhal(&args)).trim().to_owned()
    }

    /// Signs one trivial scriptlet (or `body`) into `pub/` with `params`.
    pub fn sign(&self, params: &[String], body: &str) {
        let dir = tempfile::tempdir_in(self.dir.path()).unwrap();
        std::fs::write(dir.path().join("000-first.sh"), body).unwrap();
        let key = self.path("keys/idhal.key");
        let out = self.path("pub");
        let mut args = vec!["sign", "--key", key.to_str().unwrap()];
        for p in params {
            args.extend(["--param", p]);
        }
        args.extend(["--out", out.to_str().unwrap(), dir.path().to_str().unwrap()]);
        ok(self.idhal(&args));
    }

    pub fn sign_with_enroll_key(&self) {
        self.sign(
            &[format!("enroll-key={}", self.enroll_key)],
            "#!/bin/sh\ntrue\n",
        );
    }

    pub fn serve(&self) -> Server {
        std::fs::create_dir_all(self.path("pub")).unwrap();
        let (child, url) = idhal_test_support::process::announced(
            self.command(&["serve", "--listen", "127.0.0.1:0", "--root"])
                .arg(self.path("pub"))
                .stderr(std::fs::File::create(self.path("serve.log")).unwrap()),
            "listening on ",
            DEADLINE,
        );
        Server { _child: child, url }
    }

    /// A node with the project's manifest key baked in, which has run once (so it holds an
    /// accepted manifest, as a node calling `enroll` from a scriptlet does).
    pub fn node(&self, server: &Server) -> Node {
        let node = Node::new(&server.url);
        std::fs::copy(self.path("keys/idhal.pub"), node.baked_key()).unwrap();
        node.run(&[]).expect(0, "ok: serial");
        node
    }
}

pub fn enroll(node: &Node, server: &str, extra: &[&str]) -> Run {
    let mut c = node.command("enroll", &["--server", server]);
    c.args(extra);
    Run(c.output().unwrap())
}

/// Enrolls `node` with a fresh one-use token.
pub fn enroll_new(project: &Project, node: &Node, server: &str) {
    let token = project.token(&["--uses", "1"]);
    enroll(node, server, &["--token-file", &token_file(node, &token)]).expect(0, "enrolled as");
}

pub fn token_file(node: &Node, token: &str) -> String {
    let p = node.path("token");
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p.to_str().unwrap().to_owned()
}

/// A man in the middle: forwards each exchange to `upstream` and flips one byte in the middle
/// of the response body. Returns its base URL.
pub fn tampering_proxy(upstream: &str) -> String {
    rewriting_proxy(
        upstream,
        std::sync::Arc::new(|_, mut body: Vec<u8>| {
            let middle = body.len() / 2;
            body[middle] ^= 0x01;
            body
        }),
    )
}

/// What a man in the middle does to an answer's body, given the request it answers.
pub type Rewrite = Arc<dyn Fn(&[u8], Vec<u8>) -> Vec<u8> + Send + Sync>;

/// Forwards each exchange to `upstream`, and hands the answer's body to `rewrite` before
/// passing it on. Returns its base URL.
pub fn rewriting_proxy(upstream: &str, rewrite: Rewrite) -> String {
    let upstream = upstream
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let (upstream, rewrite) = (upstream.clone(), rewrite.clone());
            std::thread::spawn(move || relay(client, &upstream, &rewrite));
        }
    });
    url
}

fn relay(mut client: TcpStream, upstream: &str, rewrite: &Rewrite) {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "client closed mid-request");
        req.extend_from_slice(&buf[..n]);
        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&req[..head_end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while req.len() < head_end + len {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0, "client closed mid-body");
        req.extend_from_slice(&buf[..n]);
    }
    let mut server = TcpStream::connect(upstream).unwrap();
    server.write_all(&req).unwrap();
    let mut resp = Vec::new();
    server.read_to_end(&mut resp).unwrap();
    let body_at = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = rewrite(&req[head_end..], resp.split_off(body_at));
    let head = String::from_utf8(resp).unwrap();
    let head: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("content-length:") && !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect();
    client
        .write_all(format!("{head}content-length: {}\r\n\r\n", body.len()).as_bytes())
        .unwrap();
    client.write_all(&body).unwrap();
}
