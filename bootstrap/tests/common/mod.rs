//! Test support for the agent: a real HTTP server on 127.0.0.1 (with fault injection for the
//! failure modes a real server cannot be made to show), publication directories signed by the
//! real minisign crate, and a runner for the built agent binary.
#![allow(dead_code, unused_imports)]

use idhal_manifest::sig::TrustedMeta;
use idhal_manifest::{paths, Frequency, Manifest, Param, Scriptlet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const NOW_PLUS_DAY: u64 = 86_400;
/// How long a test waits for something that takes milliseconds when all is well: generous,
/// because these machines are shared and noisy; a failure is a hang, not a slow machine.
pub const DEADLINE: Duration = Duration::from_secs(30);

pub use idhal_test_support::process::{alive, Reaped};
pub use idhal_test_support::{free_port, now, ok, openssl, wait_for};

pub mod server;

/// How the test server misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// Accept, read the request, never answer.
    Hang,
    /// Answer with a correct head, then one byte every 300 ms.
    Trickle,
    /// Answer 200 with no Content-Length and an endless body.
    Endless,
    /// Answer 503 to the next N requests.
    Unavailable(u32),
}

pub struct TestServer {
    pub url: String,
    pub root: PathBuf,
    fault: Arc<Mutex<Fault>>,
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl TestServer {
    pub fn start(root: &Path) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let fault = Arc::new(Mutex::new(Fault::None));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (f, r, root2) = (fault.clone(), requests.clone(), root.to_path_buf());
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (f, r, root) = (f.clone(), r.clone(), root2.clone());
                thread::spawn(move || serve(conn, &root, &f, &r));
            }
        });
        TestServer {
            url,
            root: root.to_path_buf(),
            fault,
            requests,
        }
    }

    pub fn set_fault(&self, f: Fault) {
        *self.fault.lock().unwrap() = f;
    }
}

fn serve(mut conn: TcpStream, root: &Path, fault: &Mutex<Fault>, log: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    log.lock().unwrap().push(path.clone());
    let mode = {
        let mut f = fault.lock().unwrap();
        let mode = *f;
        if let Fault::Unavailable(n) = *f {
            *f = if n > 1 {
                Fault::Unavailable(n - 1)
            } else {
                Fault::None
            };
        }
        mode
    };
    match mode {
        Fault::Hang => thread::sleep(Duration::from_secs(60)),
        Fault::Unavailable(_) => {
            let _ =
                conn.write_all(b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        }
        Fault::Endless => {
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            let chunk = [b'x'; 65536];
            while conn.write_all(&chunk).is_ok() {}
        }
        Fault::Trickle => {
            let _ = conn.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n");
            for _ in 0..1000 {
                if conn.write_all(b"x").is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        }
        Fault::None => {
            let file = root.join(path.trim_start_matches('/'));
            match std::fs::read(&file) {
                Ok(body) if !path.contains("..") => {
                    let _ = conn.write_all(
                        format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len())
                            .as_bytes(),
                    );
                    let _ = conn.write_all(&body);
                }
                _ => {
                    let _ = conn.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                }
            }
        }
    }
}

/// A signing key made by the real minisign crate.
pub struct Key {
    pub pk: minisign::PublicKey,
    pub sk: minisign::SecretKey,
}

impl Key {
    pub fn new() -> Key {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        Key {
            pk: kp.pk,
            sk: kp.sk,
        }
    }

    pub fn public(&self) -> idhal_manifest::PublicKey {
        idhal_manifest::PublicKey::from_base64(&self.pk.to_base64()).unwrap()
    }

    pub fn pub_text(&self) -> String {
        self.public().to_file_text()
    }

    pub fn sign(&self, data: &[u8], comment: &str) -> String {
        minisign::sign(Some(&self.pk), &self.sk, data, Some(comment), None)
            .unwrap()
            .into_string()
    }
}

/// A scriptlet for `publish`: id, frequency, body.
pub type Spec<'a> = (&'a str, Frequency, String);

pub fn encode(serial: u64, expires: u64, params: &[(&str, &str)], specs: &[Spec]) -> Vec<u8> {
    Manifest {
        serial,
        expires,
        params: params
            .iter()
            .map(|(n, v)| Param {
                name: n.parse().unwrap(),
                value: v,
            })
            .collect(),
        scriptlets: specs
            .iter()
            .map(|(id, f, body)| Scriptlet {
                id: id.parse().unwrap(),
                frequency: *f,
                body: body.as_bytes(),
            })
            .collect(),
    }
    .encode()
}

/// Writes a publication directory the way `idhal sign` lays it out.
pub fn publish_raw(dir: &Path, key: &Key, serial: u64, manifest: &[u8], sig: &str) {
    std::fs::create_dir_all(dir.join(paths::VERSIONS_DIR)).unwrap();
    std::fs::write(dir.join(paths::versioned_manifest(serial)), manifest).unwrap();
    std::fs::write(dir.join(paths::versioned_signature(serial)), sig).unwrap();
    std::fs::write(dir.join(paths::MANIFEST), manifest).unwrap();
    std::fs::write(dir.join(paths::SIGNATURE), sig).unwrap();
    std::fs::write(dir.join(paths::PUBLIC_KEY), key.pub_text()).unwrap();
}

pub fn publish(dir: &Path, key: &Key, serial: u64, expires: u64, specs: &[Spec]) -> Vec<u8> {
    let m = encode(serial, expires, &[], specs);
    let sig = key.sign(&m, &TrustedMeta { serial, expires }.to_comment());
    publish_raw(dir, key, serial, &m, &sig);
    m
}

/// A node: its state dir, its /etc (baked key, config) and a fake /proc.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub server: String,
}

impl Node {
    pub fn new(server: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("proc/sys/kernel/random")).unwrap();
        std::fs::write(dir.path().join("proc/cmdline"), "ro quiet\n").unwrap();
        let node = Node {
            dir,
            server: server.to_owned(),
        };
        node.set_boot_id("boot-1");
        std::fs::write(node.config(), "retries = 0\ntimeout = 5s\n").unwrap();
        node
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    pub fn state(&self) -> PathBuf {
        self.path("state")
    }
    pub fn config(&self) -> PathBuf {
        self.path("bootstrap.conf")
    }
    pub fn baked_key(&self) -> PathBuf {
        self.path("server.pub")
    }
    pub fn bake(&self, key: &Key) {
        std::fs::write(self.baked_key(), key.pub_text()).unwrap();
    }
    pub fn set_boot_id(&self, id: &str) {
        std::fs::write(
            self.path("proc/sys/kernel/random/boot_id"),
            format!("{id}\n"),
        )
        .unwrap();
    }
    pub fn set_cmdline(&self, line: &str) {
        std::fs::write(self.path("proc/cmdline"), line).unwrap();
    }

    pub fn command(&self, sub: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_idhal-bootstrap"));
        c.arg(sub)
            .arg("--config")
            .arg(self.config())
            .arg("--proc")
            .arg(self.path("proc"))
            .arg("--state-dir")
            .arg(self.state());
        if sub == "run" {
            c.arg("--key").arg(self.baked_key());
            if !self.server.is_empty() {
                c.arg("--server").arg(&self.server);
            }
        }
        c.args(extra);
        c
    }

    pub fn run(&self, extra: &[&str]) -> Run {
        Run(self.command("run", extra).output().unwrap())
    }

    /// `run`, killed (and the test failed) if it has not ended within `limit`; also returns
    /// how long it took.
    #[track_caller]
    pub fn run_within(&self, extra: &[&str], limit: Duration) -> (Run, Duration) {
        let (out, err) = (self.path("run.stdout"), self.path("run.stderr"));
        let started = Instant::now();
        let mut child = self
            .command("run", extra)
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let mut status = None;
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for("the agent to end", limit, || {
                status = child.try_wait().unwrap();
                status.is_some()
            })
        }));
        if let Err(panic) = ended {
            let _ = child.kill();
            let _ = child.wait();
            std::panic::resume_unwind(panic);
        }
        let took = started.elapsed();
        let output = Output {
            status: status.unwrap(),
            stdout: std::fs::read(out).unwrap(),
            stderr: std::fs::read(err).unwrap(),
        };
        (Run(output), took)
    }

    /// `status --json`: its exit code and its stdout parsed (panics when that is not one JSON
    /// object, with the text).
    pub fn status_json(&self) -> (i32, serde_json::Value) {
        let o = self.command("status", &["--json"]).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout);
        let json: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {text}"));
        assert!(json.is_object(), "status --json is not an object: {text}");
        (o.status.code().unwrap(), json)
    }

    pub fn read(&self, p: &str) -> Option<String> {
        std::fs::read_to_string(self.path(p)).ok()
    }
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts the exit code and that stderr has `needle`.
    #[track_caller]
    pub fn expect(&self, code: i32, needle: &str) -> &Self {
        let err = self.stderr();
        assert_eq!(self.code(), code, "exit code; stderr:\n{err}");
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
        self
    }
}

/// The `scriptlets` rows of a parsed `status --json`.
pub fn scriptlets(json: &serde_json::Value) -> impl Iterator<Item = &serde_json::Value> {
    json["scriptlets"]
        .as_array()
        .unwrap_or_else(|| panic!("no scriptlets array: {json}"))
        .iter()
}
