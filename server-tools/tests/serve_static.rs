//! `idhal serve` as a real server on 127.0.0.1 with an ephemeral port, spoken to over plain
//! TcpStreams: what it serves, what it refuses, and that publishing while serving never gives an
//! agent following the protocol (signature first, then the versioned manifest) a mismatched pair.

mod cli_support;

use cli_support::*;
use idhal_manifest::verify::unverified_serial;
use idhal_manifest::{paths, verify, Expiry, Policy};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn serves_files_with_length_and_no_cache() {
    let f = Fixture::published();
    let pubdir = &f.pubdir;
    let server = Server::start(pubdir);
    let manifest = std::fs::read(pubdir.join(paths::MANIFEST)).unwrap();

    let r = get(server.addr, "/manifest");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, manifest);
    assert_eq!(
        r.header("Content-Length"),
        Some(&*manifest.len().to_string())
    );
    assert_eq!(r.header("Cache-Control"), Some("no-cache"));
    assert_eq!(r.header("Transfer-Encoding"), None);

    let r = get(server.addr, "/manifests/1.minisig?x=1");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body,
        std::fs::read(pubdir.join(paths::versioned_signature(1))).unwrap()
    );

    let r = http(server.addr, "HEAD", "/manifest");
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("Content-Length"),
        Some(&*manifest.len().to_string())
    );
    assert!(r.body.is_empty());

    let r = http(server.addr, "POST", "/manifest");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("Allow"), Some("GET, HEAD"));
    assert!(r.header("Content-Length").is_some());

    for missing in ["/nothing", "/", "/manifests", "/manifests/"] {
        let r = get(server.addr, missing);
        assert_eq!(r.status, 404, "{missing}");
        assert_eq!(r.body, b"not found\n");
        assert_eq!(r.header("Content-Length"), Some("10"));
    }

    let log = server.stop();
    assert!(log.contains("\"GET /manifest\" 200"), "{log}");
    assert!(log.contains("\"POST /manifest\" 405"), "{log}");
}

#[test]
fn refuses_everything_outside_the_root() {
    let f = Fixture::published();
    let (dir, pubdir) = (&f.dir, &f.pubdir);
    std::fs::write(dir.path().join("secret"), b"top secret").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), pubdir.join("escape")).unwrap();
    std::os::unix::fs::symlink(dir.path(), pubdir.join("escape-dir")).unwrap();
    std::os::unix::fs::symlink(pubdir.join(paths::MANIFEST), pubdir.join("inside")).unwrap();
    let server = Server::start(pubdir);
    for target in [
        "/../secret",
        "/manifests/../../secret",
        "/%2e%2e/secret",
        "/%2E%2E%2Fsecret",
        "/manifests/%2e%2e/%2e%2e/secret",
        "/..%2fsecret",
        "/escape",
        "/escape-dir/secret",
        "/.idhal-sign.lock",
        "/etc/passwd",
        "//etc/passwd",
        "/%00",
        "/%zz",
        "http://127.0.0.1/../secret",
        "secret",
    ] {
        let r = get(server.addr, target);
        assert!(
            r.status == 404 || r.status == 400,
            "{target}: {} {:?}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        assert!(!r.body.windows(3).any(|w| w == b"top"), "{target}");
    }
    // A symlink that stays inside the root is served.
    assert_eq!(get(server.addr, "/inside").status, 200);
}

#[test]
fn publishing_while_serving_never_pairs_a_signature_with_the_wrong_manifest() {
    let f = Fixture::published();
    let key = public_key(&f.pk);
    let server = Server::start(&f.pubdir);
    let addr = server.addr;

    let done = Arc::new(AtomicBool::new(false));
    let publisher = {
        let done = Arc::clone(&done);
        let (sk, pubdir, scripts) = (f.sk.clone(), f.pubdir.clone(), f.scripts.clone());
        std::thread::spawn(move || {
            for n in 1..=15 {
                // Growing bodies make a torn or mismatched read certain to fail verification.
                write(
                    &scripts,
                    "000-a.sh",
                    &format!("echo {n}\n{}", "#".repeat(n * 997)),
                );
                sign(&sk, &pubdir, &scripts, &[]).ok();
            }
            done.store(true, Ordering::SeqCst);
        })
    };

    // An agent's protocol: manifest.minisig, then manifests/<serial it names>.
    let (mut fetched, mut gone, mut last) = (0, 0, 0u64);
    loop {
        // One more round after the publisher finished, so the last one fetched is the final one.
        let finished = done.load(Ordering::SeqCst);
        let sig = get(addr, "/manifest.minisig");
        assert_eq!(sig.status, 200);
        let sig = String::from_utf8(sig.body).unwrap();
        let serial = unverified_serial(&sig).unwrap();
        let body = get(addr, &format!("/{}", paths::versioned_manifest(serial)));
        if body.status == 404 {
            // Pruned by ten newer publications in between: an agent just retries.
            gone += 1;
            continue;
        }
        assert_eq!(body.status, 200);
        let policy = Policy {
            now: idhal_manifest::time::now(),
            expiry: Expiry::Enforce,
            last_serial: Some(last),
        };
        let m = verify(&key, &body.body, &sig, &policy)
            .unwrap_or_else(|e| panic!("serial {serial}: {e}"));
        last = m.serial;
        fetched += 1;
        if finished {
            break;
        }
    }
    publisher.join().unwrap();
    assert_eq!(last, 16, "the final publication is served");
    eprintln!("{fetched} verified fetches during 15 publications, {gone} pruned");
}
