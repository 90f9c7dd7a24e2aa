//! One token per node (`idhal token create`), then every node enrolls with its own token
//! through the `idhal serve` processes, round-robin, `--enroll-concurrency` at a time.
//!
//! The client is in-process, built from the wire format the agent itself uses
//! (`idhal_manifest::enroll` and `der`: the same request, signature and verification of the
//! answer), like server-tools/tests/enroll.rs. Not the agent binary: `idhal-bootstrap enroll`
//! only runs after `idhal-bootstrap run` accepted a signed manifest, so 1,000 agents would also
//! mean 1,000 manifest fetches and scriptlet runs on the same 2 cores, and the figure would mix
//! the agent's start-up with the server's work; the agent's own cost is measured by
//! scripts/bench.sh.

use crate::args::Args;
use crate::setup::{Rig, DOMAIN};
use idhal_manifest::der;
use idhal_manifest::enroll::{request_digest, KeyPair, Request, Response, Seed, Token};
use idhal_test_support::ok;
use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A node once enrolled: what it got, and when.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub address: Ipv4Addr,
    /// `vnode-A-B.storm.test` (the default template on the default pool).
    pub host: String,
    /// Its directory: ca.crt, node.crt, node.key, openvpn.conf as enrollment wrote them.
    pub dir: PathBuf,
    /// Seconds from the start of the enrollment phase.
    pub enroll_start: f64,
    pub enroll_secs: f64,
    pub serve: usize,
}

pub struct Enrolled {
    pub nodes: Vec<Node>,
    /// One more node, connected before the storm and kept out of its figures: the client
    /// whose keepalive pings show the stall an already-connected client sees.
    pub canary: Option<Node>,
    pub tokens_secs: f64,
    pub wall_secs: f64,
    /// Enrollments that failed for good (after retries): node index, why.
    pub failed: Vec<(usize, String)>,
    pub retries: usize,
    pub duplicate_ids: usize,
    pub duplicate_addresses: usize,
    pub per_serve: Vec<usize>,
}

/// How often one node's enrollment is tried (a 503 or a dropped connection is retried).
const TRIES: usize = 5;

pub fn run(a: &Args, rig: &Rig) -> Enrolled {
    // The canary is the last one.
    let n = a.nodes as usize + 1;
    let t = Instant::now();
    let tokens = create_tokens(rig, n);
    let tokens_secs = t.elapsed().as_secs_f64();
    eprintln!("{n} tokens in {tokens_secs:.1} s");

    let nodes_dir = rig.dir.join("nodes");
    std::fs::create_dir_all(&nodes_dir).unwrap();
    let next = AtomicUsize::new(0);
    let retries = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<Result<Node, String>>>> = Mutex::new(vec![None; n]);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..a.enroll_concurrency {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let serve = i % rig.serves.len();
                let start = t0.elapsed().as_secs_f64();
                let mut result = Err(String::new());
                for attempt in 0..TRIES {
                    if attempt > 0 {
                        retries.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_millis(200 * attempt as u64));
                    }
                    result = enroll_one(rig, &rig.serves[serve].addr, &tokens[i]);
                    if result.is_ok() {
                        break;
                    }
                }
                let end = t0.elapsed().as_secs_f64();
                let r = result.map(|(r, key_pem)| {
                    let dir = nodes_dir.join(&r.node);
                    write_node_files(&dir, &r, &key_pem);
                    Node {
                        host: format!(
                            "vnode-{}-{}.{DOMAIN}",
                            r.address.octets()[2],
                            r.address.octets()[3]
                        ),
                        id: r.node,
                        address: r.address,
                        dir,
                        enroll_start: start,
                        enroll_secs: end - start,
                        serve,
                    }
                });
                done.lock().unwrap()[i] = Some(r);
            });
        }
    });
    let wall_secs = t0.elapsed().as_secs_f64();
    let mut nodes = Vec::with_capacity(n);
    let mut failed = Vec::new();
    let mut per_serve = vec![0; rig.serves.len()];
    for (i, r) in done.into_inner().unwrap().into_iter().enumerate() {
        match r.expect("every node was tried") {
            Ok(node) => {
                per_serve[node.serve] += 1;
                nodes.push(node);
            }
            Err(why) => failed.push((i, why)),
        }
    }
    let dups = |key: &dyn Fn(&Node) -> String| {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for node in &nodes {
            *seen.entry(key(node)).or_default() += 1;
        }
        seen.values().filter(|&&c| c > 1).map(|c| c - 1).sum()
    };
    let duplicate_ids = dups(&|n| n.id.clone());
    let duplicate_addresses = dups(&|n| n.address.to_string());
    eprintln!(
        "{} enrolled in {wall_secs:.1} s, {} failed",
        nodes.len(),
        failed.len()
    );
    for (i, why) in failed.iter().take(5) {
        eprintln!("  node {i}: {why}");
    }
    let canary = (nodes.len() == n).then(|| nodes.pop()).flatten();
    Enrolled {
        nodes,
        canary,
        tokens_secs,
        wall_secs,
        failed,
        retries: retries.into_inner(),
        duplicate_ids,
        duplicate_addresses,
        per_serve,
    }
}

/// `idhal token create` N times, four at a time (one 1-use token each, valid 6 h).
fn create_tokens(rig: &Rig, n: usize) -> Vec<Token> {
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<Option<Token>>> = Mutex::new(vec![None; n]);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let text = ok(rig.idhal(&["token", "create", "--type", "vnode", "--ttl", "6h"]));
                let t: Token = text
                    .trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("`idhal token create` printed {text:?}: {e}"));
                out.lock().unwrap()[i] = Some(t);
            });
        }
    });
    out.into_inner()
        .unwrap()
        .into_iter()
        .map(|t| t.expect("a token"))
        .collect()
}

/// One enrollment, as the agent does it: a fresh Ed25519 key, a CSR, a request signed with the
/// token, the answer verified against the enrollment key and this request. The key's PEM too.
fn enroll_one(rig: &Rig, addr: &str, token: &Token) -> Result<(Response, String), String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("random: {e}"))?;
    let kp = KeyPair::from_seed(Seed::new(seed));
    let mut nonce = [0u8; 16];
    getrandom::fill(&mut nonce).map_err(|e| format!("random: {e}"))?;
    let req = Request {
        token: token.id,
        time: idhal_test_support::now(),
        nonce,
        csr: der::ed25519_csr(&kp, "idhal-node"),
    }
    .sign(token);
    let (status, body) = post(addr, &req)?;
    if status != 200 {
        return Err(format!(
            "{addr}: {status} {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    let r = Response::verify(&body, &rig.enroll_key, &request_digest(&req))
        .map_err(|e| format!("{addr}: the answer does not verify: {e}"))?;
    Ok((r, der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&seed))))
}

/// One HTTP/1.0 POST /enroll (a connection per request, like the agent): status and body.
fn post(addr: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let io = |e: std::io::Error| format!("{addr}: {e}");
    let mut s = TcpStream::connect(addr).map_err(io)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    write!(
        s,
        "POST /enroll HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/x-idhal-enroll\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .map_err(io)?;
    s.write_all(body).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}: no response head in {} bytes", raw.len()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{addr}: bad status line {head:?}"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

fn write_node_files(dir: &std::path::Path, r: &Response, key_pem: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).unwrap();
    for (name, text) in [
        ("ca.crt", r.ca.as_str()),
        ("node.crt", &r.certificate),
        ("openvpn.conf", &r.openvpn),
        ("node.key", key_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::set_permissions(dir.join("node.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
}
