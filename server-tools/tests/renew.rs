//! `POST /renew` against the real `idhal serve` on 127.0.0.1, with nodes enrolled through its
//! `POST /enroll`: a renewal is a new serial for the same id, key and address (checked with
//! openssl), `[ca] renew_min_interval` hands the same certificate out again (twenty renewals
//! at once sign once), every refusal has its status and one line, a revocation puts every
//! certificate of the node on the CRL, and the same on PostgreSQL across two servers.

mod enroll_support;

use enroll_support::*;
use idhal_manifest::der;
use idhal_manifest::enroll::{Response, Token};
use idhal_manifest::renew;
use idhal_test_support::pg::shared;
use std::path::Path;
use std::sync::{Arc, Barrier};

/// Every renewal signs (the default, 1 h, is tested on its own below).
const EVERY_TIME: &str = "[ca]\nrenew_min_interval = \"0\"\n";

struct Node {
    first: Response,
    key: NodeKey,
}

fn enrolled(server: &Server, p: &Project, token: &Token) -> Node {
    let key = NodeKey::random();
    let first = enroll(&server.addr, &p.enroll_key, token, &key).expect("enrolled");
    Node { first, key }
}

fn renew_now(p: &Project, server: &Server, n: &Node) -> Result<Response, (u16, String)> {
    let req = renew_request(&n.first.node, now(), &n.key);
    renew_exchange(&server.addr, &p.enroll_key, &req)
}

/// `openssl x509` facts of a PEM certificate: (serial, subject, public key PEM).
fn x509(dir: &Path, pem: &str) -> (u64, String, String) {
    let f = dir.join("facts.crt");
    std::fs::write(&f, pem).unwrap();
    let f = f.to_str().unwrap();
    let out =
        idhal_test_support::openssl(dir, &["x509", "-in", f, "-noout", "-serial", "-subject"]);
    let serial = out
        .lines()
        .find_map(|l| l.strip_prefix("serial="))
        .map(|s| u64::from_str_radix(s, 16).unwrap())
        .unwrap();
    let subject = out
        .lines()
        .find_map(|l| l.strip_prefix("subject="))
        .unwrap()
        .trim()
        .to_owned();
    let key = idhal_test_support::openssl(dir, &["x509", "-in", f, "-noout", "-pubkey"]);
    (serial, subject, key)
}

/// The serials `crl.pem` in `dir` lists (openssl).
fn crl_serials(dir: &Path) -> Vec<u64> {
    let crl = dir.join("crl.pem");
    let out = idhal_test_support::openssl(
        dir,
        &["crl", "-noout", "-text", "-in", crl.to_str().unwrap()],
    );
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Serial Number: "))
        .map(|s| u64::from_str_radix(s, 16).unwrap())
        .collect()
}

/// `openssl verify` of `pem` against the project CA, with its CRL when `crl` is set.
fn verify(p: &Project, pem: &str, crl: bool) -> (bool, String) {
    let dir = p.dir.path();
    std::fs::write(dir.join("check.crt"), pem).unwrap();
    let ca = p.ca_dir().join("ca.crt");
    let crl_file = p.ca_dir().join("crl.pem");
    let mut args = vec!["verify", "-CAfile", ca.to_str().unwrap()];
    if crl {
        args.extend(["-crl_check", "-CRLfile", crl_file.to_str().unwrap()]);
    }
    args.push("check.crt");
    openssl_try(dir, &args)
}

fn validity(pem: &str) -> (u64, u64) {
    der::cert_validity(&der::pem_decode("CERTIFICATE", pem).unwrap()).unwrap()
}

#[test]
fn a_renewal_is_a_new_serial_for_the_same_node_key_and_address_and_revocation_cuts_every_one() {
    let p = Project::new(EVERY_TIME);
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let n = enrolled(&server, &p, &token);
    let other = enrolled(&server, &p, &token);
    let t0 = now();
    let r = renew_now(&p, &server, &n).unwrap();
    // The same identity: node id, project, address, CA and client config.
    assert_eq!(
        (&r.node, &r.project, r.address, &r.ca, &r.openvpn),
        (
            &n.first.node,
            &n.first.project,
            n.first.address,
            &n.first.ca,
            &n.first.openvpn
        )
    );
    assert_ne!(r.certificate, n.first.certificate);
    // A new serial (the next of the project: the other node took 2), the same CN and key.
    let dir = p.dir.path();
    let (old_serial, old_subject, old_key) = x509(dir, &n.first.certificate);
    let (serial, subject, key) = x509(dir, &r.certificate);
    assert_eq!((old_serial, serial), (1, 3));
    assert_eq!(subject, old_subject);
    assert_eq!(subject, format!("CN = {}", n.first.node));
    assert_eq!(key, old_key);
    std::fs::write(dir.join("node.key"), n.key.pem()).unwrap();
    let from_key = idhal_test_support::openssl(dir, &["pkey", "-in", "node.key", "-pubout"]);
    assert_eq!(key, from_key);
    // Valid for [ca] node_cert_validity (30 days by default) from now, 5 minutes back-dated.
    let (from, until) = validity(&r.certificate);
    assert!(from + 300 >= t0 && from <= now(), "{from} {t0}");
    assert_eq!(until - from, 30 * 86_400 + 300);
    // Both the old and the new one are good until the old one expires.
    for pem in [&n.first.certificate, &r.certificate] {
        let (good, out) = verify(&p, pem, true);
        assert!(good, "{out}");
    }
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes[0]["cert_serial"], 3);
    assert!(
        server.log().contains(&format!(
            "idhal serve: renewed the certificate of {} (project default): serial 3, valid until {}, for 127.0.0.1:",
            r.node,
            idhal_manifest::time::rfc3339(until)
        )),
        "{}",
        server.log()
    );
    // Again: the next serial.
    let again = renew_now(&p, &server, &n).unwrap();
    assert_eq!(x509(dir, &again.certificate).0, 4);

    // `idhal revoke` (exit 4: no OpenVPN to drop a session from) puts all three on the CRL,
    // and openssl refuses each; the other node's certificate stays good.
    let out = p.idhal(&["revoke", &n.first.node]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("every certificate it was given"),
        "{out:?}"
    );
    assert_eq!(crl_serials(&p.ca_dir()), [1, 3, 4]);
    for pem in [&n.first.certificate, &r.certificate, &again.certificate] {
        let (good, out) = verify(&p, pem, true);
        assert!(!good && out.contains("certificate revoked"), "{out}");
    }
    assert!(verify(&p, &other.first.certificate, true).0);
    assert_eq!(
        renew_now(&p, &server, &n).unwrap_err(),
        (410, format!("node {} was revoked", n.first.node))
    );
    assert!(server
        .log()
        .contains("idhal serve: renewal refused for 127.0.0.1:"));
}

#[test]
fn within_the_minimum_interval_the_same_certificate_comes_back_and_twenty_at_once_sign_once() {
    // The default: renew_min_interval = 1h.
    let p = Project::new("");
    let server = Arc::new(p.serve());
    let token = p.token(&[]);
    let n = Arc::new(enrolled(&server, &p, &token));
    // Just enrolled: a renewal gets the very certificate it has (a node that lost an answer
    // asks again and gets the same), nothing is signed.
    let r = renew_now(&p, &server, &n).unwrap();
    assert_eq!(r.certificate, n.first.certificate);
    assert!(
        server.log().contains(&format!(
            "idhal serve: re-sent the certificate of {} (project default): serial 1, valid until ",
            n.first.node
        )),
        "{}",
        server.log()
    );
    // Two hours later (its row made older): due. Twenty renewals at once sign one certificate;
    // all twenty get it.
    let db = rusqlite::Connection::open(p.state.join("idhal.sqlite")).unwrap();
    db.execute("UPDATE certs SET issued = issued - 7200", [])
        .unwrap();
    let p = Arc::new(p);
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (p, server, n, start) = (p.clone(), server.clone(), n.clone(), start.clone());
            std::thread::spawn(move || {
                let req = renew_request(&n.first.node, now(), &n.key);
                start.wait();
                renew_exchange(&server.addr, &p.enroll_key, &req)
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let got: Vec<Response> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("renewed"))
        .collect();
    println!(
        "20 renewals of one node at once (SQLite, debug build): {} ms",
        started.elapsed().as_millis()
    );
    let certs: std::collections::HashSet<_> = got.iter().map(|r| r.certificate.clone()).collect();
    assert_eq!(certs.len(), 1, "{} certificates", certs.len());
    assert!(!certs.contains(&n.first.certificate));
    let count: i64 = db
        .query_row("SELECT count(*) FROM certs", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 2);
    let log = server.log();
    assert_eq!(
        log.matches("idhal serve: renewed the certificate of")
            .count(),
        1
    );
    assert_eq!(
        log.matches("idhal serve: re-sent the certificate of")
            .count(),
        20
    );
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

#[test]
fn every_refusal_has_its_own_status_and_one_line_and_changes_nothing() {
    let p = Project::new(EVERY_TIME);
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let (a, b) = (enrolled(&server, &p, &token), enrolled(&server, &p, &token));
    let post = |req: &[u8]| renew_exchange(&server.addr, &p.enroll_key, req);
    let id = a.first.node.as_str();

    // Signed by another node's key (b's, for a).
    assert_eq!(
        post(&renew_request(id, now(), &b.key)).unwrap_err(),
        (
            401,
            format!("the request is not signed by node {id}'s enrollment key")
        )
    );
    // A node the server never enrolled: unknown before anything else.
    assert_eq!(
        post(&renew_request("client99", now() - 3600, &a.key)).unwrap_err(),
        (403, "unknown node client99: enroll it first".into())
    );
    // A clock an hour off, either way.
    for off in [-3600i64, 3600] {
        let (status, line) =
            post(&renew_request(id, (now() as i64 + off) as u64, &a.key)).unwrap_err();
        assert_eq!(status, 422, "{line}");
        assert!(
            line.contains(&format!("{off} s away from the server's clock"))
                && line.ends_with("fix the node's clock"),
            "{line}"
        );
    }
    // Malformed: empty, garbage, every truncation of a good request, non-canonical forms.
    let good = renew_request(id, now(), &a.key);
    let text = String::from_utf8(good.clone()).unwrap();
    let mut malformed: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"hello\n".to_vec(),
        vec![0xff; 300],
        text.replacen("\ntime ", "\ntime 0", 1).into_bytes(),
        text.replacen("\nnode ", "\nnode  ", 1).into_bytes(),
        text.replace('\n', "\r\n").into_bytes(),
        text.replacen("idhal-renew-request 1", "idhal-peers-request 1", 1)
            .into_bytes(),
    ];
    malformed.extend((0..good.len()).step_by(5).map(|n| good[..n].to_vec()));
    for body in &malformed {
        let (status, line) = post(body).unwrap_err();
        assert_eq!(status, 400, "{:?}: {line}", String::from_utf8_lossy(body));
        assert!(
            line.starts_with("malformed request: malformed renewal request: "),
            "{line}"
        );
    }
    // Too large: announced over the format's 1 KiB (and over the server's 8 KiB), refused
    // before a byte of it is read; sent chunked (no length announced), cut at 1 KiB.
    for size in [renew::MAX_REQUEST + 1, 8193, 1 << 30] {
        let head = format!("POST /renew HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        let reply = raw_exchange(&server.addr, head.as_bytes());
        assert!(reply.starts_with("HTTP/1.1 413 "), "{size}: {reply}");
        assert!(
            reply.ends_with("\r\n\r\nrequest body too large (at most 1024 bytes)\n"),
            "{reply}"
        );
    }
    let mut chunked =
        b"POST /renew HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..2 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", "a".repeat(0x400)).as_bytes());
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(&server.addr, &chunked);
    assert!(reply.starts_with("HTTP/1.1 413 "), "{reply}");
    // Exactly 1 KiB is read (and refused as malformed, not as too large).
    let mut at_max = good.clone();
    at_max.resize(renew::MAX_REQUEST, b'a');
    assert_eq!(post(&at_max).unwrap_err().0, 400);
    // Only POST.
    assert_eq!(http(&server.addr, "GET", "/renew", b"").0, 405);

    // None of that signed anything: still the enrollment's serials, 1 and 2.
    let serials = || -> Vec<u64> {
        let nodes: serde_json::Value =
            serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
        (0..2)
            .map(|i| nodes[i]["cert_serial"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(serials(), [1, 2]);
    // And the good request still goes through.
    post(&good).unwrap();
    assert_eq!(serials(), [3, 2]);

    // A certificate that expired (a node switched off for longer than its validity): refused,
    // also when the clock is off (expired comes first); it must enroll again.
    let db = rusqlite::Connection::open(p.state.join("idhal.sqlite")).unwrap();
    let past = now() as i64 - 10;
    db.execute("UPDATE certs SET not_after = ?1", [past])
        .unwrap();
    for time in [now(), now() - 3600] {
        assert_eq!(
            post(&renew_request(id, time, &a.key)).unwrap_err(),
            (
                410,
                format!(
                    "certificate of node {id} expired at {}: enroll it again with a new token",
                    idhal_manifest::time::rfc3339(past as u64)
                )
            )
        );
    }
    // Only the node itself learns that: another key still gets 401.
    assert_eq!(post(&renew_request(id, now(), &b.key)).unwrap_err().0, 401);
    assert!(server
        .log()
        .contains("(node client99): unknown node client99: enroll it first"));
}

#[test]
fn a_body_that_never_comes_is_dropped_after_the_body_timeout() {
    let p = Project::new("[limits.http]\nbody_timeout_ms = 300\n");
    let server = p.serve();
    // 100 bytes announced, 10 sent: 408, nothing renewed, the server still answers.
    let reply = raw_exchange(
        &server.addr,
        b"POST /renew HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nidhal-rene",
    );
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    let token = p.token(&[]);
    let n = enrolled(&server, &p, &token);
    assert_eq!(
        renew_now(&p, &server, &n).unwrap().certificate,
        n.first.certificate
    );
}

#[test]
fn a_bad_minimum_interval_is_refused_when_the_config_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("server.toml");
    for (toml, want) in [
        (
            "[ca]\nnode_cert_validity = \"1h\"\n",
            "[ca] renew_min_interval = \"1h\" is not under half of node_cert_validity (\"1h\"): nodes could not get a new certificate before theirs expires",
        ),
        (
            "[ca]\nrenew_min_interval = \"soon\"\n",
            "[ca] renew_min_interval: invalid duration \"soon\"",
        ),
    ] {
        std::fs::write(&config, toml).unwrap();
        let out = idhal(&dir.path().join("state"), Some(&config), &["ca", "init"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn on_postgresql_two_servers_renew_a_node_once_and_a_revocation_lists_both_certificates() {
    let Some(pg) = shared() else {
        return;
    };
    let url = pg.fresh_db();
    let p = Project::new(&format!("[state]\ndatabase = \"{url}\"\n"));
    let servers = Arc::new([p.serve(), p.serve()]);
    let token = p.token(&[]);
    let n = Arc::new(enrolled(&servers[0], &p, &token));
    let db = url.rsplit('/').next().unwrap().to_owned();
    // Within the interval, through either server: the same certificate.
    for s in servers.iter() {
        assert_eq!(
            renew_now(&p, s, &n).unwrap().certificate,
            n.first.certificate
        );
    }
    pg.psql(&db, "UPDATE certs SET issued = issued - 7200");
    let key = p.enroll_key;
    let start = Arc::new(Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let (servers, n, start) = (servers.clone(), n.clone(), start.clone());
            std::thread::spawn(move || {
                let req = renew_request(&n.first.node, now(), &n.key);
                start.wait();
                renew_exchange(&servers[i % 2].addr, &key, &req)
            })
        })
        .collect();
    let certs: std::collections::HashSet<String> = threads
        .into_iter()
        .map(|t| t.join().unwrap().expect("renewed").certificate)
        .collect();
    assert_eq!(certs.len(), 1);
    assert_eq!(
        pg.psql(&db, "SELECT count(*), max(serial) FROM certs")
            .trim(),
        "2|2"
    );
    assert_eq!(pg.psql(&db, "SELECT cert_serial FROM nodes").trim(), "2");
    let renewed: usize = servers
        .iter()
        .map(|s| {
            s.log()
                .matches("idhal serve: renewed the certificate of")
                .count()
        })
        .sum();
    assert_eq!(renewed, 1);
    let out = p.idhal(&["revoke", &n.first.node]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(crl_serials(&p.ca_dir()), [1, 2]);
    assert_eq!(
        pg.psql(
            &db,
            "SELECT count(*) FROM certs WHERE revoked_at IS NOT NULL"
        )
        .trim(),
        "2"
    );
    for s in servers.iter() {
        assert_eq!(renew_now(&p, s, &n).unwrap_err().0, 410);
    }
}
