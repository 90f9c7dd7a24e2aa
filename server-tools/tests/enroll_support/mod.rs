//! Test support for enrollment: a project created by the real `idhal ca init`, the real
//! `idhal serve` on 127.0.0.1:0, and a node-side client built from the shared wire format
//! (idhal-manifest's `enroll` and `der`), speaking HTTP/1.0 like the agent.
#![allow(dead_code, unused_imports)]

use idhal_manifest::der;
use idhal_manifest::enroll::{request_digest, EnrollKey, Request, Response, Token};
use idhal_manifest::enroll::{KeyPair, Seed};
use idhal_test_support::process::{announced, Reaped};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub use idhal_test_support::process::openssl_try;
pub use idhal_test_support::{now, ok, wait_for};

pub const IDHAL: &str = env!("CARGO_BIN_EXE_idhal");

pub fn idhal(state: &Path, config: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(IDHAL);
    cmd.arg("--state-dir").arg(state);
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args).output().expect("run idhal")
}

/// A state dir with one project (`idhal ca init`), plus a publication dir to serve.
pub struct Project {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub config: PathBuf,
    pub enroll_key: EnrollKey,
}

impl Project {
    pub fn new(config_toml: &str) -> Project {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let config = dir.path().join("server.toml");
        std::fs::write(&config, config_toml).unwrap();
        std::fs::create_dir_all(dir.path().join("pub")).unwrap();
        ok(idhal(&state, Some(&config), &["ca", "init"]));
        let key = ok(idhal(&state, Some(&config), &["ca", "enroll-key"]));
        Project {
            enroll_key: key.trim().parse().unwrap(),
            dir,
            state,
            config,
        }
    }

    pub fn idhal(&self, args: &[&str]) -> Output {
        idhal(&self.state, Some(&self.config), args)
    }

    /// `idhal token create` (type vnode unless `args` name one).
    pub fn token(&self, args: &[&str]) -> Token {
        let mut all = vec!["token", "create"];
        if !args.contains(&"--type") {
            all.extend(["--type", "vnode"]);
        }
        all.extend_from_slice(args);
        ok(self.idhal(&all)).trim().parse().unwrap()
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.state.join("projects/default")
    }

    pub fn serve(&self) -> Server {
        Server::start(&self.state, &self.config, &self.dir.path().join("pub"))
    }
}

/// `idhal serve`, killed on drop.
pub struct Server {
    pub child: Reaped,
    pub addr: String,
    pub log: PathBuf,
}

impl Server {
    pub fn start(state: &Path, config: &Path, root: &Path) -> Server {
        let log = state.with_file_name(format!(
            "serve-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let (child, addr) = announced(
            Command::new(IDHAL)
                .arg("--state-dir")
                .arg(state)
                .arg("--config")
                .arg(config)
                .args(["serve", "--listen", "127.0.0.1:0", "--root"])
                .arg(root)
                .process_group(0)
                .stderr(std::fs::File::create(&log).unwrap()),
            "listening on http://",
            Duration::from_secs(30),
        );
        Server { child, addr, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// One HTTP/1.0 exchange: (status, body).
pub fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-idhal-enroll\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, raw[split + 4..].to_vec())
}

/// A node's key, as the agent makes it.
pub struct NodeKey {
    pub seed: [u8; 32],
    pub kp: KeyPair,
}

impl NodeKey {
    pub fn random() -> NodeKey {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).unwrap();
        NodeKey {
            seed,
            kp: KeyPair::from_seed(Seed::new(seed)),
        }
    }

    pub fn csr(&self) -> Vec<u8> {
        der::ed25519_csr(&self.kp, "idhal-node")
    }

    pub fn pem(&self) -> String {
        der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&self.seed))
    }
}

pub fn request(token: &Token, csr: Vec<u8>, time: u64) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).unwrap();
    Request {
        token: token.id,
        time,
        nonce,
        csr,
    }
    .sign(token)
}

/// Enrolls `key` with `token`: Ok(verified response) or Err((status, server's message)).
pub fn enroll(
    addr: &str,
    enroll_key: &EnrollKey,
    token: &Token,
    key: &NodeKey,
) -> Result<Response, (u16, String)> {
    let req = request(token, key.csr(), now());
    let (status, body) = http(addr, "POST", "/enroll", &req);
    if status != 200 {
        return Err((status, String::from_utf8_lossy(&body).trim().to_owned()));
    }
    Ok(Response::verify(&body, enroll_key, &request_digest(&req)).expect("a verified response"))
}

/// An OpenVPN client (`--dev null`) with the files and config a node got from enrollment.
pub fn client(dir: &Path, r: &Response, key: &NodeKey) -> idhal_test_support::Logged {
    idhal_test_support::openvpn::enrolled_client(
        dir,
        [
            ("ca.crt", &r.ca),
            ("node.crt", &r.certificate),
            ("openvpn.conf", &r.openvpn),
            ("node.key", &key.pem()),
        ],
    )
}

/// A `POST /peers` request for enrolled `node`, as the agent makes it, signed with `signer`
/// (the node's own key unless a test forges one), made at `time`.
pub fn peers_request(
    node: &str,
    wg: idhal_manifest::peers::WgKey,
    endpoints: &[&str],
    time: u64,
    signer: &NodeKey,
) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).unwrap();
    idhal_manifest::peers::Request {
        node: node.into(),
        time,
        nonce,
        wg_key: wg,
        endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
    }
    .sign(&signer.kp)
    .unwrap()
}

/// Registers through `POST /peers` (one request): the verified list, or (status, the server's
/// line), which must be exactly one line.
pub fn peers_exchange(
    addr: &str,
    enroll_key: &EnrollKey,
    req: &[u8],
) -> Result<idhal_manifest::peers::Response, (u16, String)> {
    let (status, body) = http(addr, "POST", "/peers", req);
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches('\n').count(), 1, "not one line: {text:?}");
        return Err((status, text.trim_end().to_owned()));
    }
    let digest = idhal_manifest::peers::Request::parse(req).unwrap().digest;
    Ok(
        idhal_manifest::peers::Response::verify(&body, enroll_key, &digest)
            .expect("a list the agent accepts"),
    )
}

/// A `POST /renew` request for enrolled `node`, as the agent makes it, signed with `signer`
/// (the node's own key unless a test forges one), made at `time`.
pub fn renew_request(node: &str, time: u64, signer: &NodeKey) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).unwrap();
    idhal_manifest::renew::Request {
        node: node.parse().unwrap(),
        time,
        nonce,
    }
    .sign(&signer.kp)
}

/// Renews through `POST /renew` (one request): the verified answer, or (status, the server's
/// line), which must be exactly one line.
pub fn renew_exchange(
    addr: &str,
    enroll_key: &EnrollKey,
    req: &[u8],
) -> Result<Response, (u16, String)> {
    let (status, body) = http(addr, "POST", "/renew", req);
    if status != 200 {
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches('\n').count(), 1, "not one line: {text:?}");
        return Err((status, text.trim_end().to_owned()));
    }
    let digest = idhal_manifest::renew::request_digest(req);
    Ok(Response::verify(&body, enroll_key, &digest).expect("an answer the agent accepts"))
}
