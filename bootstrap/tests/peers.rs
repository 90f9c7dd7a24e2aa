//! `idhal-bootstrap peers` end to end against the real server (`idhal serve`'s `POST /peers`,
//! common/server.rs): two enrolled nodes see each other with the endpoint each picks, a man in
//! the middle who flips a byte or re-signs the list with his own key is refused and changes
//! nothing, a revoked or unknown node's refusal changes nothing either (a status is no
//! signature: the path switch expires the list instead) and the others drop a revoked one; and
//! every precondition is refused before any network.
//!
//! No `wg` here: a WireGuard public key is 32 opaque bytes to the agent and the server (neither
//! holds X25519), so the tests write `wg pubkey`'s spelling of fixed bytes.

mod common;
use common::server::*;
use common::*;
use idhal_manifest::enroll::{EnrollKey, KeyPair, Seed};
use idhal_manifest::peers::{Request, Response, WgKey};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

/// A route table as x86_64's /proc/net/route prints it: a default route through 10.0.2.2, the
/// user-net subnet 10.0.2.0/24 and the shared segment 192.168.77.0/24.
const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

fn peers(node: &Node, server: &str) -> Run {
    Run(node
        .command("peers", &["--server", server])
        .output()
        .unwrap())
}

/// What the scriptlet writes before it calls `peers`: the directory (0700), the public key,
/// the endpoints; and the route table the agent reads.
fn scriptlet_files(node: &Node, key: u8, endpoints: &str) -> WgKey {
    let dir = node.state().join("peers");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let wg = WgKey([key; 32]);
    std::fs::write(dir.join("wg.pub"), format!("{wg}\n")).unwrap();
    std::fs::write(dir.join("endpoints"), endpoints).unwrap();
    std::fs::create_dir_all(node.path("proc/net")).unwrap();
    std::fs::write(node.path("proc/net/route"), ROUTE).unwrap();
    wg
}

/// `peers/list` and `peers/wg.conf` (`None` when absent).
fn outputs(node: &Node) -> (Option<String>, Option<String>) {
    (
        node.read("state/peers/list"),
        node.read("state/peers/wg.conf"),
    )
}

/// The timing lines of a list, and its peer lines.
fn split_list(list: &str) -> (String, Vec<String>) {
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines.len() >= 3, "{list:?}");
    for (line, k) in lines.iter().zip(["refresh ", "keepalive ", "fallback "]) {
        assert!(line.starts_with(k), "{list:?}");
    }
    let peer_lines = lines[3..].iter().map(|l| l.to_string()).collect();
    (format!("{}\n", lines[..3].join("\n")), peer_lines)
}

/// The project's two first nodes, enrolled (client1, client2), with their scriptlet files.
struct Two {
    project: Project,
    server: Server,
    a: Node,
    b: Node,
    wg_a: WgKey,
    wg_b: WgKey,
}

fn two_nodes() -> Two {
    // No OpenVPN management interface: `idhal revoke` then has no session to drop, and
    // touches no port another test may hold.
    let project = Project::with_openvpn("management = []\n");
    project.sign_with_enroll_key();
    let server = project.serve();
    let a = project.node(&server);
    enroll_new(&project, &a, &server.url);
    let b = project.node(&server);
    enroll_new(&project, &b, &server.url);
    // Both behind QEMU user-net (10.0.2.15 each) and on a shared segment; client1 lists a
    // public address first (a documentation address: only ever written, never dialled here).
    let wg_a = scriptlet_files(
        &a,
        0xa1,
        "203.0.113.7:51820\n10.0.2.15:51820\n192.168.77.11:51820\n",
    );
    let wg_b = scriptlet_files(&b, 0xb2, "\n10.0.2.15:51820\n\n192.168.77.12:51820\n");
    Two {
        project,
        server,
        a,
        b,
        wg_a,
        wg_b,
    }
}

#[test]
fn two_enrolled_nodes_see_each_other() {
    let t = two_nodes();
    // client1 registers first: nobody else has a key yet.
    peers(&t.a, &t.server.url).expect(0, "peers: 0 peers (project default), refresh ");
    let (list, conf) = outputs(&t.a);
    let (timings, none) = split_list(&list.unwrap());
    assert_eq!(none, Vec::<String>::new());
    assert_eq!(conf.unwrap().lines().count(), 1, "a comment and no peer");

    let run = peers(&t.b, &t.server.url);
    run.expect(0, "peers: 1 peers (project default), refresh ");
    let (list_b, conf_b) = outputs(&t.b);
    let list_b = list_b.unwrap();
    assert_eq!(
        list_b,
        format!("{timings}peer {} 10.134.0.2 client1\n", t.wg_a),
        "client2's list"
    );
    let keepalive = timings.lines().nth(1).unwrap()["keepalive ".len()..].to_owned();
    let conf_b = conf_b.unwrap();
    let (head, body) = conf_b.split_once('\n').unwrap();
    // No time in it: the same list gives the same text.
    assert_eq!(head, "# idhal-bootstrap peers for client2", "{conf_b}");
    // The shared segment is a connected subnet, so it goes before the public address; and
    // 10.0.2.15 is client2's own address too.
    assert_eq!(
        body,
        format!(
            "\n[Peer]\nPublicKey = {}\nEndpoint = 192.168.77.11:51820\nPersistentKeepalive = \
             {keepalive}\n",
            t.wg_a
        )
    );

    peers(&t.b, &t.server.url).expect(0, "peers: 1 peers");
    assert_eq!(
        outputs(&t.b),
        (Some(list_b), Some(conf_b)),
        "a second answer"
    );

    peers(&t.a, &t.server.url).expect(0, "peers: 1 peers (project default)");
    assert_eq!(
        t.a.read("state/peers/list").unwrap(),
        format!("{timings}peer {} 10.134.0.3 client2\n", t.wg_b)
    );
    assert!(t
        .a
        .read("state/peers/wg.conf")
        .unwrap()
        .contains("Endpoint = 192.168.77.12:51820\n"));
    let dir = t.a.state().join("peers");
    for f in ["list", "wg.conf"] {
        assert_eq!(
            std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // Eight at once: each either runs or finds the lock held, and the files end up whole.
    let runs: Vec<_> = (0..8)
        .map(|_| {
            t.a.command("peers", &["--server", &t.server.url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let codes: Vec<i32> = runs
        .into_iter()
        .map(|c| c.wait_with_output().unwrap().status.code().unwrap())
        .collect();
    assert!(codes.iter().all(|c| *c == 0 || *c == 7), "{codes:?}");
    assert!(codes.contains(&0), "{codes:?}");
    assert_eq!(
        t.a.read("state/peers/list").unwrap(),
        format!("{timings}peer {} 10.134.0.3 client2\n", t.wg_b)
    );
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert_eq!(names, Vec::<String>::new(), "temp files left behind");
    drop(t.project);
}

/// Each man in the middle sits between client2 and the server after a good exchange: the
/// answer is refused (exit 5, the reason named) and both files stay as they were.
fn refused_through(rewrite: impl Fn(&Two) -> Rewrite, want: &str) {
    let t = two_nodes();
    peers(&t.a, &t.server.url).expect(0, "peers: 0 peers");
    peers(&t.b, &t.server.url).expect(0, "peers: 1 peers");
    let before = outputs(&t.b);
    let via = rewriting_proxy(&t.server.url, rewrite(&t));
    peers(&t.b, &via).expect(5, &format!("refused: peer list from {via}peers: {want}"));
    assert_eq!(outputs(&t.b), before);
    // The server itself still answers: the files were kept, not lost.
    peers(&t.b, &t.server.url).expect(0, "peers: 1 peers");
    assert_eq!(outputs(&t.b).0, before.0);
}

#[test]
fn a_tampered_list_is_refused_and_changes_nothing() {
    refused_through(
        |_| {
            Arc::new(|_, mut body| {
                let middle = body.len() / 2;
                body[middle] ^= 0x01;
                body
            })
        },
        "the peer list is not signed by the enrollment key the signed manifest names",
    );
}

#[test]
fn a_list_signed_by_another_key_is_refused() {
    // The proxy reads the real list (it knows the request it answers and the project's public
    // enrollment key), keeps every word of it, and signs it with a key of its own: well formed,
    // answering this very request, not trusted.
    refused_through(
        |t| {
            let real: EnrollKey = t.project.enroll_key.parse().unwrap();
            Arc::new(move |request, body| {
                let digest = Request::parse(request).unwrap().digest;
                let list = Response::verify(&body, &real, &digest).unwrap();
                assert_eq!(list.peers.len(), 1);
                list.sign(&KeyPair::from_seed(Seed::new([0x66; 32])))
                    .unwrap()
            })
        },
        "the peer list is not signed by the enrollment key the signed manifest names",
    );
}

/// Revoked: the server's 410 is unsigned, so the node changes nothing (its path switch expires
/// the list after 3 × refresh); its peers drop it at their next refresh.
#[test]
fn a_revoked_node_changes_nothing_and_the_others_drop_it() {
    let t = two_nodes();
    peers(&t.a, &t.server.url).expect(0, "peers: 0 peers");
    peers(&t.b, &t.server.url).expect(0, "peers: 1 peers");
    peers(&t.a, &t.server.url).expect(0, "peers: 1 peers");
    let (timings, _) = split_list(&t.a.read("state/peers/list").unwrap());
    let before = outputs(&t.a);
    let mtime = || {
        std::fs::metadata(t.a.state().join("peers/list"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let written = mtime();

    let out = ok(t.project.idhal(&["revoke", "client1"]));
    assert!(out.contains("client1: revoked (project default"), "{out}");
    let run = peers(&t.a, &t.server.url);
    run.expect(
        5,
        &format!(
            "refused: peers {}/peers: server answered HTTP 410: node client1 was revoked; the \
             peer files are unchanged",
            t.server.url.trim_end_matches('/')
        ),
    );
    assert_eq!(outputs(&t.a), before);
    assert_eq!(mtime(), written, "an unverified answer is no verification");

    // client2 drops it at its next refresh.
    peers(&t.b, &t.server.url).expect(0, "peers: 0 peers (project default)");
    assert_eq!(t.b.read("state/peers/list").unwrap(), timings);
}

#[test]
fn preconditions_are_refused_before_any_network() {
    let project = Project::new();
    project.sign_with_enroll_key();
    let server = project.serve();
    // Every attempt below would land here: it must see none.
    let watch_dir = tempfile::tempdir().unwrap();
    let watch = TestServer::start(watch_dir.path());

    let fresh = Node::new(&server.url);
    peers(&fresh, &watch.url).expect(
        3,
        "`peers` runs after `idhal-bootstrap run` accepted a signed manifest",
    );
    let node = project.node(&server);
    peers(&node, &watch.url).expect(
        3,
        "not enrolled: `peers` runs after `idhal-bootstrap enroll` succeeded",
    );
    enroll_new(&project, &node, &server.url);

    // A manifest without the enrollment key: nothing to check a list with.
    project.sign(&[], "#!/bin/sh\ntrue\n");
    node.run(&[]).expect(0, "accepted manifest serial 2");
    peers(&node, &watch.url).expect(3, "the signed manifest (serial 2) has no param enroll-key");
    project.sign_with_enroll_key();
    node.run(&[]).expect(0, "accepted manifest serial 3");

    let dir = node.state().join("peers");
    peers(&node, &watch.url).expect(
        3,
        "peers/wg.pub: missing: the scriptlet makes the WireGuard key pair first",
    );
    std::fs::create_dir(&dir).unwrap();
    peers(&node, &watch.url).expect(3, "peers/wg.pub: missing");
    let bad_keys: [&[u8]; 5] = [
        b"",
        b"AAAA\n",
        b"not base64 at all, but 44 characters long!!\n",
        &[0xff; 44],
        &[b'A'; 100_000],
    ];
    for bad in bad_keys {
        std::fs::write(dir.join("wg.pub"), bad).unwrap();
        let run = peers(&node, &watch.url);
        assert_eq!(run.code(), 3, "{}", run.stderr());
        assert!(run.stderr().contains("peers/wg.pub: "), "{}", run.stderr());
    }
    std::fs::write(dir.join("wg.pub"), format!("{}\n", WgKey([7; 32]))).unwrap();
    peers(&node, &watch.url).expect(3, "peers/endpoints: missing");
    for (bad, want) in [
        (
            "192.168.77.11:51820\n127.0.0.1:51820\n",
            "peers/endpoints: line 2: 127.0.0.1:51820: not a unicast address",
        ),
        (
            "192.168.77.11\n",
            "peers/endpoints: line 1: \"192.168.77.11\" is not ADDR:PORT",
        ),
        (
            "1.2.3.4:5\n1.2.3.4:5\n",
            "peers/endpoints: line 2: 1.2.3.4:5 twice",
        ),
        (
            &"\n".repeat(5000),
            "peers/endpoints: larger than 4096 bytes",
        ),
        (
            &(1..=9)
                .map(|p| format!("192.168.1.1:{p}\n"))
                .collect::<String>(),
            "line 9: more than 8 endpoints",
        ),
    ] {
        std::fs::write(dir.join("endpoints"), bad).unwrap();
        peers(&node, &watch.url).expect(3, want);
    }
    std::fs::write(dir.join("endpoints"), "").unwrap();

    // One `peers` at a time.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("state.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    peers(&node, &watch.url).expect(7, "peers/state.lock is held");
    drop(lock);
    assert_eq!(*watch.requests.lock().unwrap(), Vec::<String>::new());

    // Everything in place: the first request. A server that stays unavailable is a fetch
    // failure after the retries (each a request), and nothing is written.
    watch.set_fault(Fault::Unavailable(100));
    let run = Run(node
        .command("peers", &["--server", &watch.url, "--retries", "2"])
        .output()
        .unwrap());
    run.expect(4, "server answered HTTP 503");
    assert_eq!(
        *watch.requests.lock().unwrap(),
        ["/peers", "/peers", "/peers"]
    );
    assert_eq!(outputs(&node), (None, None));

    // A server that trickles its answer, or sends one without end: each bounded (the request's
    // deadline, the list's cap), a fetch failure, nothing written.
    for (fault, want) in [
        (Fault::Trickle, "timed out"),
        (
            Fault::Endless,
            &format!(
                "response larger than the {}-byte limit",
                idhal_manifest::peers::MAX_RESPONSE
            ),
        ),
    ] {
        watch.set_fault(fault);
        let run = Run(node
            .command("peers", &["--server", &watch.url, "--timeout", "1s"])
            .output()
            .unwrap());
        run.expect(4, want);
        assert_eq!(outputs(&node), (None, None));
    }
}

#[test]
fn a_node_the_server_does_not_know_changes_nothing() {
    let t = two_nodes();
    peers(&t.b, &t.server.url).expect(0, "peers: 0 peers");
    peers(&t.a, &t.server.url).expect(0, "peers: 1 peers");
    // Another server, whose database never saw client1 (a state directory lost, a node
    // pointed at the wrong project, or anyone on the path): its 403 is signed by nobody, so
    // client1 keeps the list it verified last.
    let other = Project::new();
    other.sign_with_enroll_key();
    let elsewhere = other.serve();
    let before = outputs(&t.a);
    let run = peers(&t.a, &elsewhere.url);
    run.expect(
        5,
        &format!(
            "refused: peers {}/peers: server answered HTTP 403: unknown node client1",
            elsewhere.url.trim_end_matches('/')
        ),
    );
    run.expect(5, "; the peer files are unchanged");
    assert_eq!(outputs(&t.a), before);
    assert!(before.1.unwrap().contains("[Peer]"));
}
