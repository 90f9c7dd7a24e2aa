//! HTTPS (the `https` feature): the agent trusts exactly the CA bundle it is given. The server
//! is real `openssl s_server -WWW` on 127.0.0.1 with certificates made by the openssl CLI.
#![cfg(feature = "https")]

mod common;
use common::*;
use idhal_manifest::Frequency::Once;
use idhal_test_support::x509;
use std::process::{Command, Stdio};

#[test]
fn https_with_pinned_ca_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    x509::ca(dir, "ca", "ca.key", "ca.pem");
    x509::ca(dir, "other-ca", "other-ca.key", "other-ca.pem");
    x509::leaf(
        dir,
        "127.0.0.1",
        ("srv.key", "srv.pem"),
        ("ca.key", "ca.pem"),
        "subjectAltName=IP:127.0.0.1\n",
    );

    let pubdir = dir.join("pub");
    let key = Key::new();
    let node = Node::new("");
    node.bake(&key);
    publish(
        &pubdir,
        &key,
        1,
        now() + NOW_PLUS_DAY,
        &[(
            "a",
            Once,
            format!("echo tls >> '{}'\n", node.path("out").display()),
        )],
    );

    let port = free_port();
    let _server = Reaped(
        Command::new("openssl")
            .args([
                "s_server",
                "-WWW",
                "-quiet",
                "-accept",
                &format!("127.0.0.1:{port}"),
                "-cert",
            ])
            .arg(dir.join("srv.pem"))
            .arg("-key")
            .arg(dir.join("srv.key"))
            .current_dir(&pubdir)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("https://127.0.0.1:{port}/");
    let conf = |bundle: &str| {
        std::fs::write(
            node.config(),
            format!("retries = 6\nca_bundle = {}\n", dir.join(bundle).display()),
        )
        .unwrap();
    };
    // Wait until s_server listens (a refused connection is retried with backoff).
    conf("ca.pem");
    node.run(&["--server", &url]).expect(0, "ran 1");
    assert_eq!(node.read("out").as_deref(), Some("tls\n"));

    // A server whose certificate does not chain to the bundle is refused, not retried.
    conf("other-ca.pem");
    node.run(&["--server", &url])
        .expect(4, "TLS: invalid peer certificate");
    // No bundle at all: https is refused with a clear configuration hint.
    std::fs::write(node.config(), "retries = 0\n").unwrap();
    node.run(&["--server", &url])
        .expect(4, "https:// needs ca_bundle");
}
