//! `idhal-bootstrap enroll` end to end against the real server: `idhal ca init`, `idhal token
//! create`, `idhal sign --param enroll-key=...` and `idhal serve` on 127.0.0.1:0. What a node
//! gets (checked with openssl), each refusal with the server's own reason, and a man in the
//! middle who flips one byte of the answer (the server and the proxy: common/server.rs).

mod common;
use common::server::*;
use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The files in STATE/enroll, sorted (empty if it does not exist).
fn enroll_files(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(node.state().join("enroll"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn enrolls_from_the_first_scriptlet_then_never_again() {
    let project = Project::new();
    let server = project.serve();
    let node = Node::new(&server.url);
    std::fs::copy(project.path("keys/idhal.pub"), node.baked_key()).unwrap();
    // As an image would have it: the server in bootstrap.conf, the token from elsewhere.
    std::fs::write(
        node.config(),
        format!("server = {}\nretries = 0\ntimeout = 5s\n", server.url),
    )
    .unwrap();
    let token = project.token(&["--uses", "1", "--ttl", "1h"]);
    let tok = token_file(&node, &token);
    // `run` holds its lock while this scriptlet runs: enroll must not need it.
    let scriptlet = format!(
        "#!/bin/sh\nexec '{}' enroll --config '{}' --proc '{}' --state-dir \"$IDHAL_STATE_DIR\" \
         --token-file '{tok}'\n",
        env!("CARGO_BIN_EXE_idhal-bootstrap"),
        node.config().display(),
        node.path("proc").display()
    );
    project.sign(&[format!("enroll-key={}", project.enroll_key)], &scriptlet);
    node.run(&[]).expect(0, "000-first done");
    let log = node.read("state/scriptlets/000-first/log").unwrap();
    assert!(
        log.contains("enrolled as client1, address 10.134.0.2 (project default)"),
        "{log}"
    );
    assert!(
        !log.contains(&token[17..]),
        "the token's secret was logged:\n{log}"
    );
    // A token file can be private (0600): no warning, unlike a token on the kernel command line.
    assert!(!log.contains("WARNING"), "{log}");

    let dir = node.state().join("enroll");
    assert_eq!(enroll_files(&node), ENROLLED);
    assert_eq!(node.read("state/enroll/node-id").unwrap(), "client1\n");
    assert_eq!(node.read("state/enroll/address").unwrap(), "10.134.0.2\n");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("node.key")), 0o600);
    assert_eq!(mode(&dir.join("openvpn.conf")), 0o600);
    let conf = node.read("state/enroll/openvpn.conf").unwrap();
    for line in [
        "ca ca.crt",
        "cert node.crt",
        "key node.key",
        "remote vpn1.example.org 1194",
    ] {
        assert!(
            conf.lines().any(|l| l == line),
            "openvpn.conf lacks {line:?}:\n{conf}"
        );
    }

    // The certificate: made by the CA it came with, for this node's own key, named client1.
    assert_eq!(
        openssl(&dir, &["verify", "-CAfile", "ca.crt", "node.crt"]),
        "node.crt: OK\n"
    );
    assert_eq!(
        openssl(&dir, &["x509", "-in", "node.crt", "-noout", "-pubkey"]),
        openssl(&dir, &["pkey", "-in", "node.key", "-pubout"])
    );
    let subject = openssl(&dir, &["x509", "-in", "node.crt", "-noout", "-subject"]);
    assert!(
        subject.contains("CN=client1") || subject.contains("CN = client1"),
        "{subject}"
    );
    // And the CA is the project's, not just any.
    assert_eq!(
        std::fs::read(dir.join("ca.crt")).unwrap(),
        std::fs::read(project.path("state/projects/default/ca.crt")).unwrap()
    );

    let text = node.command("status", &[]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("enrolled:   client1, address 10.134.0.2"),
        "{text}"
    );
    let (_, json) = node.status_json();
    assert_eq!(
        json["enrollment"],
        serde_json::json!({"node": "client1", "address": "10.134.0.2"}),
        "{json}"
    );

    // Enrolled once: no network any more (the server is gone), nothing rewritten.
    let cert = node.read("state/enroll/node.crt");
    drop(server);
    let again = enroll(&node, "http://127.0.0.1:9/", &["--token-file", &tok]);
    again.expect(0, "already enrolled as client1 (10.134.0.2)");
    assert!(!again.stderr().contains("enrolling"), "{}", again.stderr());
    assert_eq!(node.read("state/enroll/node.crt"), cert);
}

#[test]
fn refusals_name_the_servers_reason_and_write_nothing() {
    let project = Project::new();
    project.sign_with_enroll_key();
    let server = project.serve();

    let refused = |node: &Node, run: Run, reason: &str| {
        run.expect(
            5,
            &format!("refused: enroll {}/enroll: {reason}", server.url),
        );
        assert_eq!(enroll_files(node), ["node.key"], "only the node's own key");
        let text = node.command("status", &[]).output().unwrap();
        assert!(String::from_utf8_lossy(&text.stdout).contains("enrolled:   not enrolled"));
    };

    // A well-formed token the server never made.
    let node = project.node(&server);
    let unknown = format!("0123456789abcdef.{}", "A".repeat(43));
    let run = enroll(
        &node,
        &server.url,
        &["--token-file", &token_file(&node, &unknown)],
    );
    refused(&node, run, "server answered HTTP 403: unknown token");

    // The right id with another secret: the request's signature does not match its verifier.
    let node = project.node(&server);
    let token = project.token(&[]);
    let (id, secret) = token.split_once('.').unwrap();
    let first = if secret.starts_with('A') { 'B' } else { 'A' };
    let forged = format!("{id}.{first}{}", &secret[1..]);
    let run = enroll(
        &node,
        &server.url,
        &["--token-file", &token_file(&node, &forged)],
    );
    refused(&node, run, "server answered HTTP 401: bad token signature");

    // One use: the first node gets it; the next (token via QEMU fw_cfg) is refused.
    let token = project.token(&["--uses", "1"]);
    let node = project.node(&server);
    enroll(
        &node,
        &server.url,
        &["--token-file", &token_file(&node, &token)],
    )
    .expect(0, "enrolled as client1");
    let node = project.node(&server);
    let fw = node.path("fw_cfg");
    let raw = fw.join("by_name/opt/idhal/token/raw");
    std::fs::create_dir_all(raw.parent().unwrap()).unwrap();
    std::fs::write(&raw, &token).unwrap();
    let run = enroll(&node, &server.url, &["--fw-cfg", fw.to_str().unwrap()]);
    assert!(run.stderr().contains("(fw_cfg "), "{}", run.stderr());
    assert!(!run.stderr().contains("WARNING"), "{}", run.stderr());
    refused(&node, run, "server answered HTTP 409: token used up");

    // Expired: the server counts whole seconds (expires = its now + 1, refused once expires <=
    // now). Its now was at most `made`, so the token is expired once the clock passes `made`.
    let token = project.token(&["--ttl", "1s"]);
    let made = now();
    wait_for("the token's second to pass", DEADLINE, || now() > made);
    let node = project.node(&server);
    let run = enroll(
        &node,
        &server.url,
        &["--token-file", &token_file(&node, &token)],
    );
    refused(&node, run, "server answered HTTP 410: token expired");
}

#[test]
fn configuration_errors_come_before_any_network() {
    let project = Project::new();
    project.sign(&[], "#!/bin/sh\ntrue\n");
    let server = project.serve();
    let token = project.token(&[]);

    // Before `run` accepted a manifest, there is no enrollment key to trust.
    let fresh = Node::new(&server.url);
    let tok = token_file(&fresh, &token);
    enroll(&fresh, &server.url, &["--token-file", &tok]).expect(
        3,
        "`enroll` runs after `idhal-bootstrap run` accepted a signed manifest",
    );

    // A manifest signed without the enrollment key.
    let node = project.node(&server);
    let tok = token_file(&node, &token);
    enroll(&node, &server.url, &["--token-file", &tok]).expect(
        3,
        "the signed manifest (serial 1) has no param enroll-key: sign it with \
         `idhal sign --param enroll-key=$(idhal ca enroll-key) ...`",
    );
    assert_eq!(enroll_files(&node), Vec::<String>::new());

    // With it, but no token anywhere.
    project.sign_with_enroll_key();
    node.run(&[]).expect(0, "accepted manifest serial 2");
    let empty = node.path("no-fw-cfg");
    let run = enroll(&node, &server.url, &["--fw-cfg", empty.to_str().unwrap()]);
    run.expect(
        3,
        "no enrollment token: give --token-file FILE, idhal.token=",
    );
    assert_eq!(enroll_files(&node), Vec::<String>::new());

    // One enrollment at a time (but `run`'s lock is not in the way: see the scriptlet test).
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(node.state().join("enroll.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    enroll(&node, &server.url, &["--token-file", &tok]).expect(7, "enroll.lock");
    drop(lock);
    enroll(&node, &server.url, &["--token-file", &tok]).expect(0, "enrolled as client1");
}

#[test]
fn a_tampered_answer_is_refused_and_a_retry_gets_the_same_node() {
    let project = Project::new();
    project.sign_with_enroll_key();
    let server = project.serve();
    let proxy = tampering_proxy(&server.url);
    let node = project.node(&server);
    let token = project.token(&["--uses", "1"]);
    // Given on the kernel command line this time.
    node.set_cmdline(&format!("ro quiet idhal.token={token}\n"));

    enroll(&node, &proxy, &[]).expect(
        5,
        "refused: enrollment response: the response is not signed by the enrollment key the \
         signed manifest names",
    );
    assert_eq!(enroll_files(&node), ["node.key"]);
    let key = node.read("state/enroll/node.key");

    // The server did enroll the node and spent the token's only use; asking again with the
    // same key (kept from the first attempt) gets the same node back.
    let run = enroll(&node, &server.url, &[]);
    run.expect(
        0,
        "enrolled as client1, address 10.134.0.2 (project default)",
    );
    assert!(
        run.stderr().contains("(kernel command line idhal.token=)"),
        "{}",
        run.stderr()
    );
    // Every local user can read /proc/cmdline, and the agent cannot tell a 1-use token from a
    // 50-use one: it warns for each.
    let id = &token[..16];
    let warning = format!(
        "with token {id} (kernel command line idhal.token=); WARNING: every local user can \
         read the kernel command line: put only 1-use tokens there (uses are unknown here), \
         else use fw_cfg or --token-file\n"
    );
    assert!(run.stderr().contains(&warning), "{}", run.stderr());
    assert!(
        !run.stderr().contains(&token[17..]),
        "the token's secret was logged"
    );
    assert_eq!(enroll_files(&node), ENROLLED);
    assert_eq!(node.read("state/enroll/node.key"), key);
}
