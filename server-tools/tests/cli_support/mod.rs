//! Shared helpers for the CLI tests: run the built `idhal` binary with a clean environment, make
//! keys and scriptlet dirs, read PUBDIR back with the idhal-manifest library, and talk to a real
//! `idhal serve` over a plain TcpStream.
#![allow(dead_code)]

use idhal_manifest::{paths, verify, Expiry, Manifest, Policy, PublicKey};
use idhal_test_support::process::{announced, Reaped};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_idhal");

/// The binary with no passphrase or key in its environment and stdin not a terminal.
pub fn idhal() -> Command {
    let mut c = Command::new(BIN);
    c.env_remove("IDHAL_KEY_PASSPHRASE")
        .env_remove("IDHAL_SIGNING_KEY")
        .stdin(Stdio::null());
    c
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts failure with `code` and that stderr contains `needle`.
    pub fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }
}

pub fn run(cmd: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run idhal");
    Run {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

pub fn idhal_run(args: &[&str]) -> Run {
    run(idhal().args(args))
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// An unencrypted key pair in `dir`: (secret key path, public key path).
pub fn keygen(dir: &Path) -> (PathBuf, PathBuf) {
    idhal_run(&["keygen", "--dir", s(dir), "--no-passphrase"]).ok();
    (dir.join("idhal.key"), dir.join("idhal.pub"))
}

pub fn public_key(path: &Path) -> PublicKey {
    PublicKey::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn write(dir: &Path, name: &str, body: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), body).unwrap();
}

/// `idhal sign --key KEY --out PUBDIR SCRIPTLETS EXTRA...`
pub fn sign(key: &Path, pubdir: &Path, scriptlets: &Path, extra: &[&str]) -> Run {
    let mut args = vec!["sign", "--key", s(key), "--out", s(pubdir)];
    args.extend_from_slice(extra);
    args.push(s(scriptlets));
    idhal_run(&args)
}

/// A temp dir with an unencrypted key pair, a scriptlet dir holding `000-a.sh` and a PUBDIR path.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub sk: PathBuf,
    pub pk: PathBuf,
    pub scripts: PathBuf,
    pub pubdir: PathBuf,
}

impl Fixture {
    pub fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (sk, pk) = keygen(&dir.path().join("keys"));
        let scripts = dir.path().join("s");
        write(&scripts, "000-a.sh", "echo a\n");
        let pubdir = dir.path().join("pub");
        Fixture {
            dir,
            sk,
            pk,
            scripts,
            pubdir,
        }
    }

    /// The fixture with serial 1 already signed into PUBDIR.
    pub fn published() -> Fixture {
        let f = Fixture::new();
        f.sign(&[]).ok();
        f
    }

    /// `idhal sign --key SK --out PUBDIR EXTRA... SCRIPTS`
    pub fn sign(&self, extra: &[&str]) -> Run {
        sign(&self.sk, &self.pubdir, &self.scripts, extra)
    }

    /// The `idhal sign --key SK --out PUBDIR SCRIPTS` command, not yet run.
    pub fn sign_command(&self) -> Command {
        let mut c = idhal();
        c.args([
            "sign",
            "--key",
            s(&self.sk),
            "--out",
            s(&self.pubdir),
            s(&self.scripts),
        ]);
        c
    }

    /// `idhal sign` with `IDHAL_KEY_PASSPHRASE` set to `passphrase`.
    pub fn sign_with_env_passphrase(&self, passphrase: &str) -> Run {
        run(self.sign_command().env("IDHAL_KEY_PASSPHRASE", passphrase))
    }
}

/// PUBDIR's latest manifest and signature.
pub fn latest(pubdir: &Path) -> (Vec<u8>, String) {
    (
        std::fs::read(pubdir.join(paths::MANIFEST)).unwrap(),
        std::fs::read_to_string(pubdir.join(paths::SIGNATURE)).unwrap(),
    )
}

pub fn policy() -> Policy {
    Policy {
        now: idhal_manifest::time::now(),
        expiry: Expiry::Enforce,
        last_serial: None,
    }
}

/// Verifies PUBDIR's latest with the library, as an agent would; returns (serial, expires).
pub fn verified_serial(pubdir: &Path, key: &PublicKey) -> (u64, u64) {
    let (body, sig) = latest(pubdir);
    let m: Manifest = verify(key, &body, &sig, &policy()).expect("latest verifies");
    (m.serial, m.expires)
}

/// Signs `body` with a minisign secret key file's text (unencrypted) and `trusted` comment,
/// through the minisign crate: for fixtures `idhal sign` would refuse to make (expired, ...).
pub fn sign_fixture(secret_key_file: &Path, body: &[u8], trusted: &str) -> String {
    let text = std::fs::read_to_string(secret_key_file).unwrap();
    let sk = minisign::SecretKeyBox::from_string(&text)
        .unwrap()
        .into_unencrypted_secret_key()
        .unwrap();
    minisign::sign(None, &sk, body, Some(trusted), Some("fixture"))
        .unwrap()
        .into_string()
}

/// Writes a complete PUBDIR by hand (both the latest and the versioned pair).
pub fn publish_by_hand(pubdir: &Path, serial: u64, body: &[u8], sig: &str) {
    std::fs::create_dir_all(pubdir.join(paths::VERSIONS_DIR)).unwrap();
    std::fs::write(pubdir.join(paths::MANIFEST), body).unwrap();
    std::fs::write(pubdir.join(paths::SIGNATURE), sig).unwrap();
    std::fs::write(pubdir.join(paths::versioned_manifest(serial)), body).unwrap();
    std::fs::write(pubdir.join(paths::versioned_signature(serial)), sig).unwrap();
}

/// A running `idhal serve`, killed on drop. Its stderr (the access log) is drained by a thread so
/// a long run cannot fill the pipe and stall the server.
pub struct Server {
    child: Reaped,
    log: Option<std::thread::JoinHandle<String>>,
    pub addr: SocketAddr,
}

impl Server {
    pub fn start(root: &Path) -> Server {
        let (mut child, addr) = announced(
            Command::new(BIN)
                .args(["serve", "--root", s(root), "--listen", "127.0.0.1:0"])
                .stderr(Stdio::piped()),
            "listening on http://",
            Duration::from_secs(30),
        );
        let mut stderr = child.stderr.take().unwrap();
        let log = std::thread::spawn(move || {
            let mut log = String::new();
            stderr.read_to_string(&mut log).ok();
            log
        });
        Server {
            addr: addr.parse().unwrap(),
            child,
            log: Some(log),
        }
    }

    /// Stops the server and returns its stderr (the access log).
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one raw HTTP/1.0 request (`METHOD TARGET`) and reads the whole reply.
pub fn http(addr: SocketAddr, method: &str, target: &str) -> HttpReply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(stream, "{method} {target} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let body = raw[split + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    HttpReply {
        status,
        headers,
        body,
    }
}

pub fn get(addr: SocketAddr, target: &str) -> HttpReply {
    http(addr, "GET", target)
}
