//! HTTPS (the `https` feature): the agent trusts exactly the CA bundle it is given. The server
//! is real `openssl s_server -WWW` on 127.0.0.1 with certificates made by the openssl CLI.
#![cfg(feature = "https")]

mod common;
use common::*;
use idhal_manifest::Frequency::Once;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A CA (`NAME.pem`, `NAME.key`) and, when `server`, a certificate for IP 127.0.0.1 signed by it.
fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn https_with_pinned_ca_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "srv.key",
            "-out",
            "srv.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
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
    let _server = Killed(
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
