//! `POST /peers` against the real `idhal serve` on 127.0.0.1, with nodes enrolled through its
//! `POST /enroll`: registrations answered with a list the agent's own verifier accepts, every
//! refusal with its status and one line, revocation, and 50 registrations at once.

mod enroll_support;

use enroll_support::*;
use idhal_manifest::peers::{self, Peer, Response, WgKey};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Barrier};

/// Short timings, to see that the list carries `[peers]`.
const CONFIG: &str = "[peers]\nrefresh_secs = 30\nkeepalive_secs = 2\nfallback_secs = 6\n";

/// An enrolled node, and the WireGuard key it registers.
struct Node {
    id: String,
    address: std::net::Ipv4Addr,
    key: NodeKey,
    wg: WgKey,
}

fn random_wg() -> WgKey {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).unwrap();
    WgKey(k)
}

fn enrolled(server: &Server, p: &Project, token: &idhal_manifest::enroll::Token) -> Node {
    let key = NodeKey::random();
    let r = enroll(&server.addr, &p.enroll_key, token, &key).expect("enrolled");
    Node {
        id: r.node,
        address: r.address,
        key,
        wg: random_wg(),
    }
}

fn endpoints(list: &[&str]) -> Vec<SocketAddr> {
    list.iter().map(|e| e.parse().unwrap()).collect()
}

fn request(node: &str, wg: WgKey, eps: &[&str], time: u64, signer: &NodeKey) -> Vec<u8> {
    peers_request(node, wg, eps, time, signer)
}

/// (status, the server's one line) of a refused exchange, or the verified list: one POST.
fn post(p: &Project, server: &Server, req: &[u8]) -> Result<Response, (u16, String)> {
    peers_exchange(&server.addr, &p.enroll_key, req)
}

fn register(
    p: &Project,
    server: &Server,
    n: &Node,
    eps: &[&str],
) -> Result<Response, (u16, String)> {
    post(p, server, &request(&n.id, n.wg, eps, now(), &n.key))
}

/// Sends `bytes` as they are (a write cut short by the server's early answer is fine) and
/// returns what came back.
fn raw_exchange(addr: &str, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

fn as_peer(n: &Node, eps: &[&str]) -> Peer {
    Peer {
        node: n.id.clone(),
        address: n.address,
        wg_key: n.wg,
        endpoints: endpoints(eps),
    }
}

#[test]
fn two_nodes_get_each_other_in_a_signed_list_and_a_re_registration_replaces() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "3"]);
    let (a, b, c) = (
        enrolled(&server, &p, &token),
        enrolled(&server, &p, &token),
        enrolled(&server, &p, &token),
    );
    let a_eps = ["192.168.77.11:51820", "[2001:db8::11]:51820"];
    let first = register(&p, &server, &a, &a_eps).unwrap();
    // One registration is one POST (the test's own client sends it once).
    assert_eq!(
        server.log().matches("registered the WireGuard key").count(),
        1
    );
    assert_eq!(
        (
            first.project.as_str(),
            first.node.as_str(),
            first.pool.to_string()
        ),
        ("default", a.id.as_str(), "10.134.0.0/16".to_owned())
    );
    assert_eq!((first.refresh, first.keepalive, first.fallback), (30, 2, 6));
    assert_eq!(first.peers, [], "nobody else registered yet");

    let b_eps = ["192.168.77.12:51820"];
    let got_b = register(&p, &server, &b, &b_eps).unwrap();
    assert_eq!(got_b.peers, [as_peer(&a, &a_eps)]);
    let got_a = register(&p, &server, &a, &a_eps).unwrap();
    assert_eq!(got_a.peers, [as_peer(&b, &b_eps)]);

    // The same key, new endpoints (none: it only dials out): replaced, not added.
    register(&p, &server, &a, &[]).unwrap();
    assert_eq!(
        register(&p, &server, &b, &b_eps).unwrap().peers,
        [as_peer(&a, &[])]
    );
    // A node that never registered is in nobody's list, and sees both.
    assert_eq!(
        register(&p, &server, &c, &["172.16.0.3:4000"])
            .unwrap()
            .peers,
        [as_peer(&a, &[]), as_peer(&b, &b_eps)]
    );

    // `idhal nodes` says who registered and when.
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes[0]["wg_key"], a.wg.to_string());
    assert!(nodes[0]["wg_registered_at"].as_u64().unwrap() >= now() - 600);
    let text = ok(p.idhal(&["nodes"]));
    assert!(
        text.lines().next().unwrap().ends_with("WIREGUARD"),
        "{text}"
    );
    assert!(!text.lines().nth(1).unwrap().ends_with(" no"), "{text}");
    assert!(server.log().contains(&format!(
        "registered the WireGuard key {} of {} (0 endpoint(s), project default, 1 peer(s) listed) for 127.0.0.1:",
        a.wg, a.id
    )));
}

#[test]
fn every_refusal_has_its_own_status_and_one_line() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let (a, b) = (enrolled(&server, &p, &token), enrolled(&server, &p, &token));
    let eps = ["192.168.77.11:51820"];
    register(&p, &server, &b, &eps).unwrap();

    // Signed by another node's key (b's, for a).
    assert_eq!(
        post(&p, &server, &request(&a.id, a.wg, &eps, now(), &b.key)).unwrap_err(),
        (
            401,
            format!(
                "the request is not signed by node {}'s enrollment key",
                a.id
            )
        )
    );
    // A node the server never enrolled.
    assert_eq!(
        post(&p, &server, &request("client99", a.wg, &eps, now(), &a.key)).unwrap_err(),
        (403, "unknown node client99: enroll it first".into())
    );
    // A clock an hour off.
    let (status, line) = post(
        &p,
        &server,
        &request(&a.id, a.wg, &eps, now() - 3600, &a.key),
    )
    .unwrap_err();
    assert_eq!(status, 422);
    assert!(
        line.contains("-3600 s away from the server's clock"),
        "{line}"
    );
    // An endpoint inside the VPN pool (also as an IPv4-mapped IPv6 address).
    for inside in ["10.134.0.9:51820", "[::ffff:10.134.0.9]:51820"] {
        let shown = if inside.starts_with('[') {
            inside
        } else {
            "10.134.0.9:51820"
        };
        assert_eq!(
            register(&p, &server, &a, &["192.168.77.11:51820", inside]).unwrap_err(),
            (400, format!("endpoint {shown} is inside the VPN address pool 10.134.0.0/16: register addresses other nodes reach without the tunnel"))
        );
    }
    // The key b holds.
    let stolen = Node { wg: b.wg, ..a };
    assert_eq!(
        register(&p, &server, &stolen, &eps).unwrap_err(),
        (
            409,
            "this WireGuard key is registered by another node: make a new key pair (wg genkey)"
                .into()
        )
    );
    assert!(server.log().contains(&format!("(held by {})", b.id)));
    // A request older than b's last registration (a replay of an old one): refused.
    let t = now();
    register(&p, &server, &b, &eps).unwrap();
    let old_b = request(&b.id, random_wg(), &eps, t - 60, &b.key);
    let (status, line) = post(&p, &server, &old_b).unwrap_err();
    assert_eq!(status, 409);
    assert!(
        line.starts_with(&format!(
            "request time {} is older than the node's last registration (",
            t - 60
        )) && line.ends_with("): a replayed request, or the node's clock went back"),
        "{line}"
    );

    // Malformed: empty, garbage, every truncation of a good request, non-canonical forms.
    let good = request(&stolen.id, random_wg(), &eps, now(), &stolen.key);
    let text = String::from_utf8(good.clone()).unwrap();
    let mut malformed: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"hello\n".to_vec(),
        vec![0xff; 300],
        text.replacen("\ntime ", "\ntime 0", 1).into_bytes(),
        text.replacen("192.168.77.11", "192.168.077.11", 1)
            .into_bytes(),
        text.replacen("\nwg-key ", "\nwg-key  ", 1).into_bytes(),
        text.replace('\n', "\r\n").into_bytes(),
    ];
    malformed.extend((0..good.len()).step_by(7).map(|n| good[..n].to_vec()));
    for body in &malformed {
        let (status, line) = post(&p, &server, body).unwrap_err();
        assert_eq!(status, 400, "{:?}: {line}", String::from_utf8_lossy(body));
        assert!(
            line.starts_with("malformed request: malformed peers "),
            "{line}"
        );
    }
    // Too large: announced over the format's 4 KiB (and over the server's 8 KiB), refused
    // before a byte of it is read; sent chunked (no length announced), cut at 4 KiB.
    for size in [peers::MAX_REQUEST + 1, 8193, 1 << 30] {
        let head = format!("POST /peers HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        let reply = raw_exchange(&server.addr, head.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 413 "), "{size}: {reply}");
        assert!(
            reply.ends_with("\r\n\r\nrequest body too large (at most 4096 bytes)\n"),
            "{reply}"
        );
    }
    let mut chunked =
        b"POST /peers HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "a".repeat(0x400)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(&server.addr, &chunked);
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
    // Exactly 4 KiB is read (and refused as malformed, not as too large).
    let mut at_max = good.clone();
    at_max.resize(peers::MAX_REQUEST, b'a');
    assert_eq!(post(&p, &server, &at_max).unwrap_err().0, 400);
    // Only POST.
    assert_eq!(http(&server.addr, "GET", "/peers", b"").0, 405);

    // None of that registered anything for a.
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes[0]["wg_key"], serde_json::Value::Null);
    // And the good request still goes through.
    post(&p, &server, &good).unwrap();
    assert!(server
        .log()
        .contains("peer registration refused for 127.0.0.1:"));
    assert!(server
        .log()
        .contains("(node client99): unknown node client99: enroll it first"));
}

#[test]
fn a_revoked_node_is_refused_and_gone_from_every_list() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "3"]);
    let nodes: Vec<Node> = (0..3).map(|_| enrolled(&server, &p, &token)).collect();
    let eps = ["192.168.77.20:51820"];
    for n in &nodes {
        register(&p, &server, n, &eps).unwrap();
    }
    assert_eq!(
        register(&p, &server, &nodes[0], &eps).unwrap().peers.len(),
        2
    );
    // `idhal revoke` as it is (exit 4: no OpenVPN to kick the node from); nothing else to do.
    let out = p.idhal(&["revoke", &nodes[1].id]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        register(&p, &server, &nodes[1], &eps).unwrap_err(),
        (410, format!("node {} was revoked", nodes[1].id))
    );
    // Only the node itself learns that it is revoked: another key still gets 401.
    let forged = request(&nodes[1].id, nodes[1].wg, &eps, now(), &nodes[0].key);
    assert_eq!(post(&p, &server, &forged).unwrap_err().0, 401);
    // Revoked comes before the clock and the endpoints: it is what the node must hear.
    let late = request(
        &nodes[1].id,
        nodes[1].wg,
        &["10.134.0.9:1"],
        now() - 3600,
        &nodes[1].key,
    );
    assert_eq!(post(&p, &server, &late).unwrap_err().0, 410);
    for (me, other) in [(0, 2), (2, 0)] {
        assert_eq!(
            register(&p, &server, &nodes[me], &eps).unwrap().peers,
            [as_peer(&nodes[other], &eps)]
        );
    }
    // Its key stays its own: nobody registers it after it.
    let thief = Node {
        wg: nodes[1].wg,
        id: nodes[0].id.clone(),
        address: nodes[0].address,
        key: NodeKey {
            seed: nodes[0].key.seed,
            kp: nodes[0].key.kp.clone(),
        },
    };
    assert_eq!(register(&p, &server, &thief, &eps).unwrap_err().0, 409);
}

#[test]
fn a_node_that_stops_registering_leaves_the_lists_by_itself() {
    // Registrations live 3 refresh intervals: 3 s here.
    let p = Project::new("[peers]\nrefresh_secs = 1\nkeepalive_secs = 1\nfallback_secs = 2\n");
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let (a, b) = (enrolled(&server, &p, &token), enrolled(&server, &p, &token));
    register(&p, &server, &a, &[]).unwrap();
    assert_eq!(
        register(&p, &server, &b, &[]).unwrap().peers,
        [as_peer(&a, &[])]
    );
    // a goes quiet (a vnode deleted without `idhal revoke`); b keeps refreshing.
    let quiet = std::time::Instant::now();
    wait_for(
        "a to leave b's list",
        std::time::Duration::from_secs(60),
        || register(&p, &server, &b, &[]).unwrap().peers.is_empty(),
    );
    println!(
        "a left b's list {:.1} s after its last registration (3 x refresh_secs = 3 s)",
        quiet.elapsed().as_secs_f64()
    );
    // Back as soon as it registers again.
    assert_eq!(
        register(&p, &server, &a, &[]).unwrap().peers,
        [as_peer(&b, &[])]
    );
    assert_eq!(
        register(&p, &server, &b, &[]).unwrap().peers,
        [as_peer(&a, &[])]
    );
}

#[test]
fn a_node_whose_certificate_expired_is_refused_like_a_revoked_one() {
    let p = Project::new("[ca]\nnode_cert_validity = \"10s\"\nrenew_min_interval = \"0\"\n");
    let server = p.serve();
    let token = p.token(&[]);
    let a = enrolled(&server, &p, &token);
    register(&p, &server, &a, &[]).unwrap();
    let mut refused = None;
    wait_for(
        "a's certificate to expire",
        std::time::Duration::from_secs(60),
        || {
            refused = register(&p, &server, &a, &[]).err();
            refused.is_some()
        },
    );
    let (status, line) = refused.unwrap();
    assert_eq!(status, 410, "{line}");
    let expected = format!("certificate of node {} expired at ", a.id);
    assert!(line.starts_with(&expected) && line.ends_with('Z'), "{line}");
}

#[test]
fn a_bad_stored_row_is_left_out_with_one_log_line_and_the_list_still_goes_out() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "4"]);
    let n: Vec<Node> = (0..4).map(|_| enrolled(&server, &p, &token)).collect();
    let eps = ["192.168.77.30:51820"];
    for x in &n {
        register(&p, &server, x, &eps).unwrap();
    }
    // Rows neither enrollment nor registration writes (a hand edit, a bad restore): an id that
    // is no node id, an endpoint the wire format refuses.
    let db = rusqlite::Connection::open(p.state.join("idhal.sqlite")).unwrap();
    db.execute("UPDATE nodes SET id = 'x/y' WHERE id = ?1", [&n[1].id])
        .unwrap();
    db.execute(
        "UPDATE nodes SET wg_endpoints = '127.0.0.1:1' WHERE id = ?1",
        [&n[2].id],
    )
    .unwrap();
    drop(db);
    assert_eq!(
        register(&p, &server, &n[0], &eps).unwrap().peers,
        [as_peer(&n[3], &eps)]
    );
    let log = server.log();
    let head = format!(
        "idhal serve: left out of {}'s peer list (fix or revoke the node): stored peer ",
        n[0].id
    );
    assert!(
        log.contains(&format!("{head}\"x/y\": node id \"x/y\" is invalid")),
        "{log}"
    );
    assert!(
        log.contains(&format!(
            "{head}\"{}\": endpoint 127.0.0.1:1: not a unicast address another host can reach\n",
            n[2].id
        )),
        "{log}"
    );
}

#[test]
fn fifty_parallel_registrations_all_land_and_the_lists_agree() {
    let p = Project::new(CONFIG);
    let server = Arc::new(p.serve());
    let token = p.token(&["--uses", "50"]);
    let nodes: Vec<Arc<Node>> = (0..50)
        .map(|_| Arc::new(enrolled(&server, &p, &token)))
        .collect();
    let eps = |i: usize| vec![format!("192.168.{}.{}:51820", 100 + i / 200, 1 + i % 200)];
    let p = Arc::new(p);
    let start = Arc::new(Barrier::new(nodes.len()));
    let threads: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let (p, server, n, start) = (p.clone(), server.clone(), n.clone(), start.clone());
            let e = eps(i);
            std::thread::spawn(move || {
                let e: Vec<&str> = e.iter().map(String::as_str).collect();
                let req = request(&n.id, n.wg, &e, now(), &n.key);
                start.wait();
                post(&p, &server, &req)
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let first: Vec<Response> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("registered"))
        .collect();
    let parallel = started.elapsed();
    // Each list is read after its own registration committed: of any two nodes, the later one
    // sees the earlier, so every pair shows up in at least one of the two lists.
    let seen: Vec<HashSet<String>> = first
        .iter()
        .map(|r| r.peers.iter().map(|p| p.node.clone()).collect())
        .collect();
    for i in 0..nodes.len() {
        for j in i + 1..nodes.len() {
            assert!(
                seen[i].contains(&nodes[j].id) || seen[j].contains(&nodes[i].id),
                "{} and {} saw neither the other",
                nodes[i].id,
                nodes[j].id
            );
        }
    }
    println!(
        "peers listed in the first answers: min {} max {} of 49",
        seen.iter().map(HashSet::len).min().unwrap(),
        seen.iter().map(HashSet::len).max().unwrap()
    );
    // Once all landed, everyone gets the other 49, each as registered.
    let expected: HashMap<String, Peer> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let e = eps(i);
            let e: Vec<&str> = e.iter().map(String::as_str).collect();
            (n.id.clone(), as_peer(n, &e))
        })
        .collect();
    let started = std::time::Instant::now();
    for (i, n) in nodes.iter().enumerate() {
        let e = eps(i);
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        let list = register(&p, &server, n, &e).unwrap().peers;
        assert_eq!(list.len(), 49, "{}", n.id);
        for peer in &list {
            assert_eq!(peer, &expected[&peer.node]);
        }
    }
    let one_by_one = started.elapsed();
    let e = eps(0);
    let req = request(
        &nodes[0].id,
        nodes[0].wg,
        &[e[0].as_str()],
        now(),
        &nodes[0].key,
    );
    let (_, body) = http(&server.addr, "POST", "/peers", &req);
    println!(
        "50 registrations at once (SQLite, debug build): {} ms in all; one after the other: {:.1} ms each; a 49-peer list is {} bytes",
        parallel.as_millis(),
        one_by_one.as_secs_f64() * 1000.0 / 50.0,
        body.len()
    );
}

#[test]
fn a_body_that_never_comes_is_dropped_after_the_body_timeout() {
    let p = Project::new("[limits.http]\nbody_timeout_ms = 300\n");
    let server = p.serve();
    // 100 bytes announced, 10 sent: 408, nothing registered, the server still answers.
    let reply = raw_exchange(
        &server.addr,
        b"POST /peers HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nidhal-peer",
    );
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    let token = p.token(&[]);
    let n = enrolled(&server, &p, &token);
    assert_eq!(register(&p, &server, &n, &[]).unwrap().peers, []);
}
