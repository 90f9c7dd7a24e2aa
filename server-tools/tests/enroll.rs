//! Enrollment against the real `idhal serve` on 127.0.0.1, with certificates checked by the
//! real `openssl`: what a node gets, what a crafted CSR gets, every refusal with its status,
//! concurrency (ids, addresses, token uses), retries, revocation and CRL upkeep.

mod enroll_support;

use enroll_support::*;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const CONFIG: &str = "[openvpn]\nremotes = [\"vpn1.example.org:1194\", \"10.0.2.100:443\"]\n";

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_owned()
}

#[test]
fn a_node_gets_an_id_an_address_and_a_leaf_certificate_openssl_accepts() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&[]);
    let key = NodeKey::random();
    let r = enroll(&server.addr, &p.enroll_key, &token, &key).expect("enrolled");
    assert_eq!(
        (r.node.as_str(), r.project.as_str()),
        ("client1", "default")
    );
    assert_eq!(r.address.to_string(), "10.134.0.2");
    assert!(r
        .openvpn
        .contains("remote vpn1.example.org 1194\nremote 10.0.2.100 443\n"));
    assert!(r
        .openvpn
        .contains("ca ca.crt\ncert node.crt\nkey node.key\n"));

    let dir = p.dir.path();
    let ca = write(dir, "ca.pem", &r.ca);
    let cert = write(dir, "node.crt", &r.certificate);
    let crl = p.ca_dir().join("crl.pem");
    std::fs::write(
        dir.join("chain.pem"),
        format!("{}{}", r.ca, std::fs::read_to_string(&crl).unwrap()),
    )
    .unwrap();
    let (good, out) = openssl_try(dir, &["verify", "-CAfile", &ca, &cert]);
    assert!(good, "{out}");
    let (good, out) = openssl_try(
        dir,
        &["verify", "-crl_check", "-CAfile", "chain.pem", &cert],
    );
    assert!(good, "{out}");
    assert_eq!(
        std::fs::read_to_string(p.ca_dir().join("ca.crt")).unwrap(),
        r.ca
    );

    let (_, text) = openssl_try(dir, &["x509", "-in", &cert, "-noout", "-text"]);
    assert!(text.contains("Subject: CN = client1"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("Server Authentication"), "{text}");
    // The certificate carries the node's own key.
    let key_file = write(dir, "node.key", &key.pem());
    let (_, from_cert) = openssl_try(dir, &["x509", "-in", &cert, "-noout", "-pubkey"]);
    let (_, from_key) = openssl_try(dir, &["pkey", "-in", &key_file, "-pubout"]);
    assert_eq!(from_cert.trim(), from_key.trim());

    // Its fixed address lives in the database only (the connect hook pushes it): no
    // client-config-dir file is written.
    assert!(!p.ca_dir().join("ccd").exists());
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes[0]["id"], "client1");
    assert_eq!(nodes[0]["type"], "vnode");
    assert_eq!(nodes[0]["address"], "10.134.0.2");
    assert_eq!(nodes[0]["revoked_at"], serde_json::Value::Null);
    assert!(server
        .log()
        .contains("enrolled client1 (10.134.0.2, project default)"));
}

/// A CSR from stock openssl asking to be a CA, for extra names and for the server's role.
fn crafted_csr(dir: &Path) -> Vec<u8> {
    let (good, out) = openssl_try(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ed25519",
            "-nodes",
            "-keyout",
            "evil.key",
            "-outform",
            "DER",
            "-out",
            "evil.csr",
            "-subj",
            "/CN=vpn-server/O=root",
            "-addext",
            "basicConstraints=critical,CA:true",
            "-addext",
            "subjectAltName=DNS:vpn.example.org,IP:10.134.0.1",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    assert!(good, "{out}");
    std::fs::read(dir.join("evil.csr")).unwrap()
}

#[test]
fn a_crafted_csr_gets_none_of_what_it_asks_for() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&[]);
    let dir = p.dir.path();
    let req = request(&token, crafted_csr(dir), now());
    let (status, body) = http(&server.addr, "POST", "/enroll", &req);
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let r = idhal_manifest::enroll::Response::verify(
        &body,
        &p.enroll_key,
        &idhal_manifest::enroll::request_digest(&req),
    )
    .unwrap();
    let cert = write(dir, "evil.crt", &r.certificate);
    let (_, text) = openssl_try(dir, &["x509", "-in", &cert, "-noout", "-text"]);
    assert!(text.contains("Subject: CN = client1\n"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("Subject Alternative Name"), "{text}");
    assert!(!text.contains("vpn.example.org"), "{text}");
    assert!(!text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    // As a CA it signs nothing: openssl refuses a chain through it.
    let ca = write(dir, "ca.pem", &r.ca);
    let (good, out) = openssl_try(
        dir,
        &[
            "req",
            "-x509",
            "-key",
            "evil.key",
            "-subj",
            "/CN=victim",
            "-out",
            "victim.crt",
            "-CA",
            &cert,
            "-CAkey",
            "evil.key",
        ],
    );
    if good {
        std::fs::write(dir.join("untrusted.pem"), &r.certificate).unwrap();
        let (accepted, _) = openssl_try(
            dir,
            &[
                "verify",
                "-CAfile",
                &ca,
                "-untrusted",
                "untrusted.pem",
                "victim.crt",
            ],
        );
        assert!(
            !accepted,
            "a chain through the node's certificate was accepted"
        );
    } else {
        eprintln!("openssl could not even sign with it: {out}");
    }
}

#[test]
fn every_refusal_has_its_own_status_and_message() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let key = NodeKey::random();
    let refused = |token: &idhal_manifest::enroll::Token| {
        enroll(&server.addr, &p.enroll_key, token, &NodeKey::random()).unwrap_err()
    };

    // Unknown token (a well-formed one the server never made).
    let unknown: idhal_manifest::enroll::Token = format!("0123456789abcdef.{}", "A".repeat(43))
        .parse()
        .unwrap();
    assert_eq!(refused(&unknown), (403, "unknown token".into()));

    // The right id with another secret: the MAC (signature) is wrong.
    let real = p.token(&["--uses", "5"]);
    let text = real.to_string();
    let (id, secret) = text.split_once('.').unwrap();
    let flipped = if secret.starts_with('A') { "B" } else { "A" };
    let wrong: idhal_manifest::enroll::Token =
        format!("{id}.{flipped}{}", &secret[1..]).parse().unwrap();
    assert_eq!(
        refused(&wrong),
        (401, "bad token signature (wrong token secret?)".into())
    );

    // Expired.
    let short = p.token(&["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(refused(&short), (410, "token expired".into()));

    // Used up.
    let once = p.token(&[]);
    enroll(&server.addr, &p.enroll_key, &once, &key).unwrap();
    assert_eq!(refused(&once), (409, "token used up".into()));

    // A clock far off.
    let req = request(&real, NodeKey::random().csr(), now() - 3600);
    let (status, body) = http(&server.addr, "POST", "/enroll", &req);
    assert_eq!(status, 422);
    assert!(String::from_utf8_lossy(&body).contains("-3600 s away"));
    // A signed time at the end of u64 (as i64, negative): far off, not an overflow (a 500).
    for time in [u64::MAX, 1 << 63] {
        let req = request(&real, NodeKey::random().csr(), time);
        let (status, body) = http(&server.addr, "POST", "/enroll", &req);
        assert_eq!(status, 422, "{time}: {}", String::from_utf8_lossy(&body));
        assert!(String::from_utf8_lossy(&body).contains(" s away from the server's clock"));
    }

    // Malformed, and a CSR whose self-signature is broken (no proof of possession).
    let (status, _) = http(&server.addr, "POST", "/enroll", b"hello\n");
    assert_eq!(status, 400);
    let mut csr = NodeKey::random().csr();
    let n = csr.len();
    csr[n - 1] ^= 1;
    let (status, body) = http(&server.addr, "POST", "/enroll", &request(&real, csr, now()));
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).starts_with("bad CSR"));

    // Only POST.
    let (status, _) = http(&server.addr, "GET", "/enroll", b"");
    assert_eq!(status, 405);

    // None of that spent a use of `real`, and the server logged each refusal with the token id.
    let tokens: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["token", "list", "--json"]))).unwrap();
    let row = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == id)
        .unwrap();
    assert_eq!(row["used"], 0);
    assert!(server
        .log()
        .contains(&format!("(token {id}): bad token signature")));
}

#[test]
fn a_retry_with_the_same_key_gets_the_same_node_without_spending_a_use() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let key = NodeKey::random();
    let first = enroll(&server.addr, &p.enroll_key, &token, &key).unwrap();
    let again = enroll(&server.addr, &p.enroll_key, &token, &key).unwrap();
    assert_eq!(
        (first.node.as_str(), first.address),
        (again.node.as_str(), again.address)
    );
    assert_eq!(first.certificate, again.certificate);
    let tokens: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["token", "list", "--json"]))).unwrap();
    assert_eq!(tokens[0]["used"], 1);
    // The same key with another token is refused: a key is one node.
    let other = p.token(&[]);
    let (status, msg) = enroll(&server.addr, &p.enroll_key, &other, &key).unwrap_err();
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("already enrolled"));
}

#[test]
fn fifty_concurrent_enrollments_get_fifty_distinct_ids_and_addresses() {
    let p = Project::new(CONFIG);
    let server = Arc::new(p.serve());
    let token = Arc::new(p.token(&["--uses", "50"]));
    let key = p.enroll_key;
    let threads: Vec<_> = (0..50)
        .map(|_| {
            let (server, token) = (server.clone(), token.clone());
            std::thread::spawn(move || enroll(&server.addr, &key, &token, &NodeKey::random()))
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().unwrap().unwrap())
        .collect();
    let ids: HashSet<_> = results.iter().map(|r| r.node.clone()).collect();
    let addrs: HashSet<_> = results.iter().map(|r| r.address).collect();
    assert_eq!((ids.len(), addrs.len()), (50, 50));
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 50);
    // One more is refused: the token's 50 uses are spent.
    let refused = enroll(&server.addr, &key, &token, &NodeKey::random()).unwrap_err();
    assert_eq!(refused, (409, "token used up".into()));
}

#[test]
fn twenty_concurrent_redemptions_of_a_one_use_token_let_exactly_one_in() {
    let p = Project::new(CONFIG);
    let server = Arc::new(p.serve());
    let token = Arc::new(p.token(&[]));
    let key = p.enroll_key;
    let barrier = Arc::new(std::sync::Barrier::new(20));
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let (server, token, barrier) = (server.clone(), token.clone(), barrier.clone());
            std::thread::spawn(move || {
                let k = NodeKey::random();
                barrier.wait();
                enroll(&server.addr, &key, &token, &k)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let won = results.iter().filter(|r| r.is_ok()).count();
    let lost: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(won, 1, "{lost:?}");
    assert!(
        lost.iter().all(|(s, m)| *s == 409 && m == "token used up"),
        "{lost:?}"
    );
    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
}

#[test]
fn revocation_updates_the_crl_at_once_and_openssl_refuses_the_certificate() {
    let p = Project::new(CONFIG);
    let server = p.serve();
    let token = p.token(&["--uses", "2"]);
    let a = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap();
    let b = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap();
    let dir = p.dir.path();
    let (ca_pem, crl) = (p.ca_dir().join("ca.crt"), p.ca_dir().join("crl.pem"));
    let chain = |name: &str| {
        let text =
            std::fs::read_to_string(&ca_pem).unwrap() + &std::fs::read_to_string(&crl).unwrap();
        write(dir, name, &text)
    };
    let (cert_a, cert_b) = (
        write(dir, "a.crt", &a.certificate),
        write(dir, "b.crt", &b.certificate),
    );
    let before = chain("before.pem");
    assert!(openssl_try(dir, &["verify", "-crl_check", "-CAfile", &before, &cert_a]).0);

    // No OpenVPN listens on the configured management port: revoked, exit 4 with a warning.
    let out = p.idhal(&["revoke", &a.node]);
    assert_eq!(
        out.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("{}: revoked", a.node)), "{said}");
    assert!(said.contains("CRL"), "{said}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("may stay connected"));

    let after = chain("after.pem");
    let (accepted, text) = openssl_try(dir, &["verify", "-crl_check", "-CAfile", &after, &cert_a]);
    assert!(!accepted && text.contains("certificate revoked"), "{text}");
    assert!(openssl_try(dir, &["verify", "-crl_check", "-CAfile", &after, &cert_b]).0);
    let (_, crl_text) = openssl_try(
        dir,
        &["crl", "-in", crl.to_str().unwrap(), "-noout", "-text"],
    );
    assert!(
        crl_text.contains("X509v3 CRL Number: \n                2"),
        "{crl_text}"
    );

    let nodes: serde_json::Value =
        serde_json::from_str(&ok(p.idhal(&["nodes", "--json"]))).unwrap();
    assert!(nodes[0]["revoked_at"].as_u64().is_some());
    assert_eq!(nodes[1]["revoked_at"], serde_json::Value::Null);
    // Unknown nodes and bad names are refused without changing anything.
    let out = p.idhal(&["revoke", "client99"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no node client99"));
    let out = p.idhal(&["revoke", "../x"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("node id (certificate CN) \"../x\" is not valid"),
        "{err}"
    );
}

fn crl_number(p: &Project) -> u64 {
    let (_, text) = openssl_try(
        p.dir.path(),
        &[
            "crl",
            "-in",
            p.ca_dir().join("crl.pem").to_str().unwrap(),
            "-noout",
            "-crlnumber",
        ],
    );
    let hex = text
        .trim()
        .strip_prefix("crlNumber=0x")
        .unwrap_or_else(|| panic!("{text}"));
    u64::from_str_radix(hex, 16).unwrap()
}

#[test]
fn crls_are_re_signed_before_they_expire() {
    // A 20 s CRL: `crl refresh` leaves it while more than half is left, re-signs with --force,
    // and `idhal serve` re-signs it on its own before its nextUpdate.
    let p = Project::new("[ca]\ncrl_validity = \"20s\"\n");
    assert_eq!(crl_number(&p), 1);
    let said = ok(p.idhal(&["crl", "refresh"]));
    assert!(said.contains("default: CRL not due"), "{said}");
    assert_eq!(crl_number(&p), 1);
    ok(p.idhal(&["crl", "refresh", "--force"]));
    assert_eq!(crl_number(&p), 2);
    let server = p.serve();
    wait_for(
        "idhal serve re-signs the CRL",
        Duration::from_secs(30),
        || crl_number(&p) >= 3,
    );
    let (_, text) = openssl_try(
        p.dir.path(),
        &[
            "crl",
            "-in",
            p.ca_dir().join("crl.pem").to_str().unwrap(),
            "-noout",
            "-nextupdate",
        ],
    );
    assert!(text.starts_with("nextUpdate="), "{text}");
    // The CRL is on disk before the line is printed: wait for the line, do not read it once.
    idhal_test_support::wait_logged(
        "idhal serve logs the re-signing",
        Duration::from_secs(10),
        &[&server.log],
        || server.log().contains("CRL of project default re-signed"),
    );
}

#[test]
fn projects_are_separate_cas_with_separate_pools() {
    let p = Project::new(CONFIG);
    // A second project's pool must lie inside [names] pool (10.134.0.0/16 by default) ...
    let out = p.idhal(&[
        "ca",
        "init",
        "--project",
        "other",
        "--pool",
        "10.135.0.0/16",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10.135.0.0/16") && err.contains("[names] pool"),
        "{err}"
    );
    // ... so two projects need a wider one, with a template that names all of it apart.
    std::fs::write(
        &p.config,
        format!("[names]\npool = \"10.0.0.0/8\"\ntemplate = \"vnode-{{2}}-{{3}}-{{4}}\"\n{CONFIG}"),
    )
    .unwrap();
    let out = p.idhal(&["ca", "init", "--project", "other"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("overlaps project \"default\""));
    ok(p.idhal(&[
        "ca",
        "init",
        "--project",
        "other",
        "--pool",
        "10.135.0.0/16",
    ]));
    let again = p.idhal(&["ca", "init"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    let server = p.serve();
    let other_key: idhal_manifest::enroll::EnrollKey =
        ok(p.idhal(&["ca", "enroll-key", "--project", "other"]))
            .trim()
            .parse()
            .unwrap();
    assert_ne!(other_key, p.enroll_key);
    let token = p.token(&["--project", "other"]);
    let r = enroll(&server.addr, &other_key, &token, &NodeKey::random()).unwrap();
    assert_eq!(
        (r.project.as_str(), r.address.to_string()),
        ("other", "10.135.0.2".into())
    );
    // The default project's CA does not vouch for it.
    let dir = p.dir.path();
    let cert = write(dir, "o.crt", &r.certificate);
    let default_ca = p.ca_dir().join("ca.crt");
    assert!(
        !openssl_try(
            dir,
            &["verify", "-CAfile", default_ca.to_str().unwrap(), &cert]
        )
        .0
    );
    // A node pinned to the default project's enrollment key refuses the other's answer.
    let token = p.token(&["--project", "other"]);
    let req = request(&token, NodeKey::random().csr(), now());
    let (_, body) = http(&server.addr, "POST", "/enroll", &req);
    let verified = idhal_manifest::enroll::Response::verify(
        &body,
        &p.enroll_key,
        &idhal_manifest::enroll::request_digest(&req),
    );
    assert!(
        matches!(
            verified,
            Err(idhal_manifest::enroll::EnrollError::ResponseSignature)
        ),
        "{verified:?}"
    );
}

#[test]
fn the_hook_refuses_a_node_revoked_in_the_database() {
    let p = Project::new("[scheduler]\nbackend = \"none\"\n");
    let server = p.serve();
    let token = p.token(&[]);
    let r = enroll(&server.addr, &p.enroll_key, &token, &NodeKey::random()).unwrap();
    let hook = || {
        std::process::Command::new(IDHAL)
            .env_clear()
            .env("common_name", &r.node)
            .env("ifconfig_pool_remote_ip", r.address.to_string())
            .env("trusted_ip", "127.0.0.1")
            .env("time_unix", now().to_string())
            .arg("--config")
            .arg(&p.config)
            .arg("--state-dir")
            .arg(&p.state)
            .args(["hook", "client-connect"])
            .output()
            .unwrap()
    };
    let before = hook();
    assert_eq!(
        before.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&before.stderr)
    );
    p.idhal(&["revoke", &r.node]);
    let after = hook();
    assert_eq!(after.status.code(), Some(1));
    let said = String::from_utf8_lossy(&after.stderr);
    assert!(
        said.contains(&format!("REFUSED: node {} was revoked at", r.node)),
        "{said}"
    );
}
