//! `idhal-bootstrap peers` end to end against the real server (common/server.rs): every
//! precondition is refused before any network, and a server that stays unavailable is a fetch
//! failure that writes nothing.
//!
//! No `wg` here: a WireGuard public key is 32 opaque bytes to the agent (it holds no X25519),
//! so the tests write `wg pubkey`'s spelling of fixed bytes.

mod common;
use common::server::*;
use common::*;
use idhal_manifest::peers::WgKey;

fn peers(node: &Node, server: &str) -> Run {
    Run(node
        .command("peers", &["--server", server])
        .output()
        .unwrap())
}

/// `peers/list` and `peers/wg.conf` (`None` when absent).
fn outputs(node: &Node) -> (Option<String>, Option<String>) {
    (
        node.read("state/peers/list"),
        node.read("state/peers/wg.conf"),
    )
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
}
