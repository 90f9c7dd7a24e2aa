//! The real agent against the fixture dirs of manifest/tests/data, each served over HTTP on
//! 127.0.0.1: the golden publication is accepted and runs its scriptlets; every `refuse/<case>`
//! gives the exit code and the one refusal line its `expect` file names, runs nothing and
//! changes no state, both on a node's first run and on a node that accepted the golden serial.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifest/tests/data");

fn data(rel: &str) -> PathBuf {
    Path::new(DATA).join(rel)
}

/// A static server for one fixture dir, laid out the way `idhal sign --out` publishes: a dir
/// holds one `manifest` and `manifest.minisig`, served as the latest and as every versioned
/// copy (`manifests/<serial>`), whatever serial the signature claims.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(dir: &Path) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (dir, log) = (dir.to_path_buf(), requests.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (dir, log) = (dir.clone(), log.clone());
                std::thread::spawn(move || answer(conn, &dir, &log));
            }
        });
        Server { url, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn file_for(dir: &Path, path: &str) -> Option<PathBuf> {
    let versioned = |p: &str| {
        p.strip_prefix("/manifests/")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match path {
        "/manifest" => Some(dir.join("manifest")),
        "/manifest.minisig" => Some(dir.join("manifest.minisig")),
        "/idhal.pub" => Some(data("idhal.pub")),
        p if versioned(p) => Some(dir.join("manifest")),
        // Key rotation statements (`keys/N`, `keys/N.minisig`, `keys/N.new.minisig`).
        p if p.strip_prefix("/keys/").is_some_and(|f| {
            let n = f.trim_end_matches(".minisig").trim_end_matches(".new");
            !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())
        }) =>
        {
            Some(dir.join(&p[1..]))
        }
        p if p.strip_suffix(".minisig").is_some_and(versioned) => {
            Some(dir.join("manifest.minisig"))
        }
        _ => None,
    }
}

fn answer(mut conn: TcpStream, dir: &Path, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 << 10 {
        match conn.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
    log.lock().unwrap().push(path.clone());
    match file_for(dir, &path).and_then(|f| std::fs::read(f).ok()) {
        Some(body) => {
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .as_bytes(),
            );
            let _ = conn.write_all(&body);
        }
        None => {
            let _ = conn.write_all(
                b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    }
}

/// A node that pinned the golden key on an earlier boot: its state dir, config and fake /proc.
struct Node {
    dir: tempfile::TempDir,
    /// The key baked into its image.
    key: PathBuf,
}

impl Node {
    fn new(extra_conf: &str) -> Node {
        Node::pinned(extra_conf, &data("idhal.pub"))
    }
    /// A node that pinned `pinned` (the file as the state dir keeps it) from its image's key:
    /// that key itself, or for a key a rotation made, the golden K0 it started from.
    fn pinned(extra_conf: &str, pinned: &Path) -> Node {
        let text = std::fs::read_to_string(pinned).unwrap();
        let image = if text.contains("\nidhal-rotation ") {
            data("idhal.pub")
        } else {
            pinned.to_owned()
        };
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("proc/sys/kernel/random")).unwrap();
        // The layout an earlier run left (`scriptlets/` is made before anything is fetched).
        std::fs::create_dir_all(p.join("state/scriptlets")).unwrap();
        std::fs::write(p.join("proc/cmdline"), "ro quiet\n").unwrap();
        std::fs::copy(pinned, p.join("state/server.pub")).unwrap();
        std::fs::write(
            p.join("bootstrap.conf"),
            format!("retries = 0\ntimeout = 10s\n{extra_conf}"),
        )
        .unwrap();
        let node = Node { dir, key: image };
        node.set_boot_id("boot-1");
        node
    }
    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
    fn set_boot_id(&self, id: &str) {
        std::fs::write(
            self.path("proc/sys/kernel/random/boot_id"),
            format!("{id}\n"),
        )
        .unwrap();
    }
    /// `idhal-bootstrap run` against `server`: exit code and stderr.
    fn run(&self, server: &Server) -> (i32, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_idhal-bootstrap"))
            .arg("run")
            .arg("--config")
            .arg(self.path("bootstrap.conf"))
            .arg("--proc")
            .arg(self.path("proc"))
            .arg("--state-dir")
            .arg(self.path("state"))
            .arg("--key")
            .arg(&self.key)
            .args(["--server", &server.url])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
    /// Every file of the state dir but `last-run` (the report of the last run, written on
    /// purpose) and `lock` (an empty lock file every run opens).
    fn state(&self) -> BTreeMap<String, String> {
        fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_owned();
                if p.is_dir() {
                    out.insert(format!("{rel}/"), String::new());
                    walk(&p, base, out);
                } else if rel != "last-run" && rel != "lock" {
                    out.insert(
                        rel,
                        String::from_utf8_lossy(&std::fs::read(&p).unwrap()).into(),
                    );
                }
            }
        }
        let mut out = BTreeMap::new();
        let base = self.path("state");
        walk(&base, &base, &mut out);
        out
    }
    fn read(&self, rel: &str) -> Option<String> {
        std::fs::read_to_string(self.path(rel)).ok()
    }
}

/// A refusal dir's `expect` file (format: manifest/tests/data/README.md).
fn expect(dir: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(dir.join("expect")).unwrap();
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once(": ").unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Whether `line` is `pattern` with `{now}` standing for an RFC 3339 UTC time.
fn matches(pattern: &str, line: &str) -> bool {
    match pattern.split_once("{now}") {
        None => pattern == line,
        Some((before, after)) => {
            line.len() == before.len() + 20 + after.len() && {
                let now = &line[before.len()..before.len() + 20];
                line.starts_with(before)
                    && line.ends_with(after)
                    && now.ends_with('Z')
                    && now.as_bytes()[10] == b'T'
            }
        }
    }
}

const GOLDEN_LOG: &str = "000-hello serial 42\nend\n010-every-boot http://10.0.2.100:8080/enroll\n";

#[test]
fn the_golden_publication_is_accepted_and_runs() {
    let server = Server::start(Path::new(DATA));
    let node = Node::new("");
    let (code, err) = node.run(&server);
    assert_eq!(code, 0, "{err}");
    let last = err.lines().last().unwrap();
    assert!(
        last.starts_with("idhal-bootstrap: ok: serial 42, ran 2, 0 not due ("),
        "{err}"
    );
    // The signature, the manifest it names, and the one look for a key rotation (a 404).
    assert_eq!(
        server.requests(),
        ["/manifest.minisig", "/manifests/42", "/keys/1"]
    );
    assert_eq!(node.read("state/golden.log").as_deref(), Some(GOLDEN_LOG));
    assert_eq!(node.read("state/serial").as_deref(), Some("42\n"));
    assert_eq!(
        std::fs::read(node.path("state/manifest")).unwrap(),
        std::fs::read(data("manifest")).unwrap()
    );
    assert_eq!(
        node.read("state/manifest.minisig"),
        std::fs::read_to_string(data("manifest.minisig")).ok()
    );
    // A new boot runs the `boot` scriptlet again, the `once` one never.
    node.set_boot_id("boot-2");
    let (code, err) = node.run(&server);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        node.read("state/golden.log").unwrap(),
        format!("{GOLDEN_LOG}010-every-boot http://10.0.2.100:8080/enroll\n")
    );
}

#[test]
fn status_refuses_a_stored_manifest_that_no_longer_verifies() {
    let server = Server::start(Path::new(DATA));
    let node = Node::new("");
    assert_eq!(node.run(&server).0, 0);
    let status = |node: &Node| {
        let out = Command::new(env!("CARGO_BIN_EXE_idhal-bootstrap"))
            .arg("status")
            .arg("--state-dir")
            .arg(node.path("state"))
            .arg("--proc")
            .arg(node.path("proc"))
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = status(&node);
    assert_eq!(code, 0, "{text}");
    // One byte of the stored copy changed on disk: status says so and does not exit 0.
    let stored = node.path("state/manifest");
    let mut bytes = std::fs::read(&stored).unwrap();
    let last = bytes.len() - 2;
    bytes[last] ^= 1;
    std::fs::write(&stored, bytes).unwrap();
    let (code, text) = status(&node);
    assert_eq!(code, 5, "{text}");
    assert!(
        text.contains("stored manifest fails verification: "),
        "{text}"
    );
}

/// Runs `case` on `node` and checks the exact outcome and that nothing changed.
#[track_caller]
fn assert_refused(case: &str, dir: &Path, node: &Node, server: &Server) {
    let want = expect(dir);
    let before = node.state();
    server.requests.lock().unwrap().clear();
    let (code, err) = node.run(server);
    let line = want["agent"].replace("{server}", &server.url);
    assert_eq!(
        code.to_string(),
        want["exit"],
        "{case}: exit code; stderr:\n{err}"
    );
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && matches(&line, lines[0]),
        "{case}: stderr is not the one line\n  {line}\nbut:\n{err}"
    );
    assert_eq!(node.state(), before, "{case}: the state dir changed");
    // The report `status` shows is the refusal itself.
    let report = node.read("state/last-run").unwrap();
    let message = line.strip_prefix("idhal-bootstrap: ").unwrap();
    assert!(
        report.contains(&format!("\nexit={code}\nmessage=")),
        "{case}: {report}"
    );
    let reported = report.split("message=").nth(1).unwrap().trim_end();
    assert!(
        matches(message, reported),
        "{case}: last-run says {reported:?}"
    );
    // The agent asked for the signature first, always.
    assert_eq!(
        server.requests().first().map(String::as_str),
        Some("/manifest.minisig"),
        "{case}"
    );
}

#[test]
fn every_refusal_dir_is_refused_by_the_real_agent() {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(data("refuse"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 5, "{dirs:?}");
    let golden = Server::start(Path::new(DATA));
    for dir in &dirs {
        let case = dir.file_name().unwrap().to_str().unwrap();
        let conf = std::fs::read_to_string(dir.join("bootstrap.conf")).unwrap_or_default();
        let server = Server::start(dir);

        // A node's first run (it pinned the key on an earlier boot; `node-serial` if given).
        let fresh = Node::new(&conf);
        if let Ok(serial) = std::fs::read_to_string(dir.join("node-serial")) {
            std::fs::write(fresh.path("state/serial"), serial).unwrap();
        }
        assert_refused(case, dir, &fresh, &server);
        assert!(
            fresh.read("state/golden.log").is_none(),
            "{case}: a scriptlet ran"
        );

        // A node that accepted the golden serial 42 and rebooted: had the agent accepted the
        // case's manifest, its `boot` scriptlet would have run again.
        let used = Node::new(&conf);
        let (code, err) = used.run(&golden);
        assert_eq!(code, 0, "{case}: the golden run: {err}");
        used.set_boot_id("boot-2");
        assert_refused(case, dir, &used, &server);
        assert_eq!(
            used.read("state/golden.log").as_deref(),
            Some(GOLDEN_LOG),
            "{case}: a scriptlet ran"
        );
        eprintln!("{case}: refused, exit {}", expect(dir)["exit"]);
    }
}

/// The requests a walk over statements `ns` makes, in order.
fn statement_requests(ns: &[u64]) -> Vec<String> {
    ns.iter()
        .flat_map(|n| {
            [
                format!("/keys/{n}"),
                format!("/keys/{n}.minisig"),
                format!("/keys/{n}.new.minisig"),
            ]
        })
        .collect()
}

#[test]
fn the_real_agent_follows_a_key_rotation_chain_and_refuses_every_broken_one() {
    let base = data("rotate");
    let k3 = "A168025966A00312";
    for (case, walked, origin) in [
        ("follow", &[1, 2, 3][..], "6CA092AEEC2C66DD"),
        ("at-k2", &[3][..], "6CA092AEEC2C66DD"),
        ("baked-k2", &[1, 2, 3][..], "3B8F410569CF8F8D"),
    ] {
        let dir = base.join(case);
        let server = Server::start(&dir);
        let node = Node::pinned("", &dir.join("pinned.pub"));
        let (code, err) = node.run(&server);
        assert_eq!(code, 0, "{case}: {err}");
        let mut want = vec!["/manifest.minisig".to_owned(), "/manifests/42".to_owned()];
        want.extend(statement_requests(walked));
        // The walk goes on to the end of the chain: statement 4 is not published.
        want.push("/keys/4".to_owned());
        assert_eq!(server.requests(), want, "{case}");
        // Pinned atomically once the manifest verified: the new key, the rotation that made it
        // and the key this node started from.
        let pinned = node.read("state/server.pub").unwrap();
        assert_eq!(
            pinned,
            format!(
                "untrusted comment: minisign public key {k3}\n{}\nidhal-rotation 3 {origin}\n",
                pinned.lines().nth(1).unwrap()
            ),
            "{case}"
        );
        assert!(
            err.contains(&format!("pinned key {k3} (rotation 3) in place of key ")),
            "{err}"
        );
        assert_eq!(
            node.read("state/golden.log").as_deref(),
            Some(GOLDEN_LOG),
            "{case}"
        );
        // The next run looks for statement 4 only: the manifest is signed by the pinned key.
        server.requests.lock().unwrap().clear();
        node.set_boot_id("boot-2");
        assert_eq!(node.run(&server).0, 0, "{case}");
        assert_eq!(
            server.requests(),
            ["/manifest.minisig", "/manifests/42", "/keys/4"],
            "{case}"
        );

        // Now the old key K0 cannot roll this node back, even with a higher serial.
        let old = base.join("refuse/old-key-after-rotation");
        assert_refused(case, &old, &node, &Server::start(&old));
    }

    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base.join("refuse"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 13, "{dirs:?}");
    for dir in &dirs {
        let case = dir.file_name().unwrap().to_str().unwrap();
        let node = Node::pinned("", &dir.join("pinned.pub"));
        assert_refused(case, dir, &node, &Server::start(dir));
        assert!(
            node.read("state/golden.log").is_none(),
            "{case}: a scriptlet ran"
        );
        eprintln!(
            "rotate/refuse/{case}: refused, exit {}",
            expect(dir)["exit"]
        );
    }
}

#[test]
fn stock_minisign_verifies_the_golden_vector_and_signs_the_same_bytes() {
    let minisign = Path::new("/usr/bin/minisign");
    if !minisign.exists() {
        idhal_test_support::skip_or_fail("stock minisign: /usr/bin/minisign not installed");
        return;
    }
    // docs/manifest.md's first example, on the golden files.
    let out = Command::new(minisign)
        .arg("-Vm")
        .arg(data("manifest"))
        .arg("-p")
        .arg(data("idhal.pub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        shown,
        "Signature and comment signature verified\n\
         Trusted comment: idhal-manifest 1 serial=42 expires=4102444800\n"
    );
    // Stock minisign signs deterministically (libsodium): with the TEST-ONLY key it writes
    // exactly the committed signature file.
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("manifest");
    std::fs::copy(data("manifest"), &m).unwrap();
    let out = Command::new(minisign)
        .arg("-S")
        .arg("-s")
        .arg(data("TEST-ONLY-signing.key"))
        .arg("-m")
        .arg(&m)
        .args(["-t", "idhal-manifest 1 serial=42 expires=4102444800"])
        .args([
            "-c",
            "idhal manifest serial 42, signed by key 6CA092AEEC2C66DD",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("manifest.minisig")).unwrap(),
        std::fs::read_to_string(data("manifest.minisig")).unwrap()
    );
}
