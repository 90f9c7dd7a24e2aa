//! Signing-key rotation end to end: chains made by the real `idhal key rotate`, published by
//! `idhal sign`, served by `idhal serve` on 127.0.0.1 and followed by the real agent; checked by
//! stock minisign too. The refusals, each with its signed fixture, are in tests/refusals.rs.

mod common;

use common::server::*;
use common::*;
use std::path::{Path, PathBuf};

/// `idhal keygen` into `keys-NAME/`: (secret key, public key).
fn keygen(p: &Project, name: &str) -> (PathBuf, PathBuf) {
    let dir = p.path(&format!("keys-{name}"));
    ok(p.idhal(&["keygen", "--no-passphrase", "--dir", dir.to_str().unwrap()]));
    (dir.join("idhal.key"), dir.join("idhal.pub"))
}

fn rotate(p: &Project, from: &Path, to: &Path) -> String {
    let out = p.path("pub");
    ok(p.idhal(&[
        "key",
        "rotate",
        "--from",
        from.to_str().unwrap(),
        "--to",
        to.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]))
}

/// Signs one scriptlet with `key` into `out` (default PUBDIR when `None`), with `extra` args.
fn sign_with(p: &Project, key: &Path, out: Option<&Path>, extra: &[&str], body: &str) {
    let dir = tempfile::tempdir_in(p.dir.path()).unwrap();
    std::fs::write(dir.path().join("000-step.sh"), body).unwrap();
    let default = p.path("pub");
    let out = out.unwrap_or(&default);
    let mut args = vec![
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.push(dir.path().to_str().unwrap());
    ok(p.idhal(&args));
}

fn key_id(pub_file: &Path) -> String {
    idhal_manifest::PublicKey::parse(&std::fs::read_to_string(pub_file).unwrap())
        .unwrap()
        .id()
        .to_string()
}

#[test]
fn an_image_pinned_to_k0_follows_k0_k1_k2_k3_in_one_run_and_the_old_key_cannot_roll_it_back() {
    let p = Project::new();
    let k0 = (p.path("keys/idhal.key"), p.path("keys/idhal.pub"));
    p.sign(
        &[],
        "#!/bin/sh\necho serial $IDHAL_SERIAL >> \"$IDHAL_STATE_DIR/ran\"\n",
    );
    let server = p.serve();
    // A node that pinned K0 and ran serial 1; another whose image has K0 and never booted.
    let old_node = p.node(&server);
    let new_node = Node::new(&server.url);
    std::fs::copy(&k0.1, new_node.baked_key()).unwrap();
    // And one whose image has no key, only K0's fingerprint on the kernel command line: after
    // the rotations the server offers K3, and K0 is found in the chain by its fingerprint.
    let pin_node = Node::new(&server.url);
    let k0_key =
        idhal_manifest::PublicKey::parse(&std::fs::read_to_string(&k0.1).unwrap()).unwrap();
    pin_node.set_cmdline(&format!("ro idhal.pin={} quiet\n", k0_key.fingerprint()));

    let mut keys = vec![k0];
    for n in 1..=3 {
        let next = keygen(&p, &n.to_string());
        let said = rotate(&p, &keys[n - 1].0, &next.0);
        assert!(
            said.contains(&format!(
                "rotation {n}: key {} is replaced by key {}",
                key_id(&keys[n - 1].1),
                key_id(&next.1)
            )),
            "{said}"
        );
        sign_with(&p, &next.0, None, &[], "#!/bin/sh\ntrue\n");
        keys.push(next);
    }
    let k3 = key_id(&keys[3].1);
    let first = pin_node.run(&[]);
    first.expect(0, "ok: serial 4");
    assert!(
        first.stderr().contains(&format!(
            "pinning key {} (matches idhal.pin; the server has rotated to key {k3} since",
            k0_key.id()
        )),
        "{}",
        first.stderr()
    );
    // Another fingerprint is still refused, chain or not.
    let stranger = Node::new(&server.url);
    stranger.set_cmdline(&format!("ro idhal.pin=sha256:{} quiet\n", "ab".repeat(32)));
    stranger
        .run(&[])
        .expect(5, &format!("the server offered key {k3} with fingerprint"));
    assert!(stranger.read("state/server.pub").is_none());
    for node in [&old_node, &new_node, &pin_node] {
        node.run(&[]).expect(0, "ok: serial 4");
        let pinned = node.read("state/server.pub").unwrap();
        assert!(
            pinned.starts_with(&format!("untrusted comment: minisign public key {k3}\n")),
            "{pinned}"
        );
        assert!(
            pinned.ends_with(&format!("\nidhal-rotation 3 {}\n", key_id(&keys[0].1))),
            "{pinned}"
        );
        assert_eq!(
            idhal_manifest::PublicKey::parse(&pinned).unwrap(),
            idhal_manifest::PublicKey::parse(&std::fs::read_to_string(&keys[3].1).unwrap())
                .unwrap()
        );
        // Pinned: the next run follows nothing.
        let again = node.run(&[]);
        again.expect(0, "ok: serial 4");
        assert!(!again.stderr().contains("pinned key"), "{}", again.stderr());
    }
    // `status --json` shows the pinned key.
    let (_, json) = old_node.status_json();
    assert_eq!(json["pinned_key"]["id"], k3, "{json}");
    assert_eq!(json["pinned_key"]["rotation"], 3, "{json}");
    assert_eq!(json["pinned_key"]["origin"], key_id(&keys[0].1), "{json}");

    // `idhal key chain` checks it as a node would, oldest first.
    let chain = ok(p.idhal(&["key", "chain", p.path("pub").to_str().unwrap()]));
    let ids: Vec<String> = chain
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap().to_owned())
        .collect();
    let want: Vec<String> = keys.iter().map(|k| key_id(&k.1)).collect();
    assert_eq!(ids, want, "{chain}");

    // Someone holding the old K0 publishes a higher serial signed by it: refused, nothing runs.
    let forged = p.path("forged");
    sign_with(
        &p,
        &keys[0].0,
        Some(&forged),
        &["--serial", "99"],
        "#!/bin/sh\ntouch \"$IDHAL_STATE_DIR/forged-ran\"\n",
    );
    for f in ["manifests/99", "manifests/99.minisig", "manifest.minisig"] {
        std::fs::copy(forged.join(f), p.path("pub").join(f)).unwrap();
    }
    for node in [&old_node, &new_node, &pin_node] {
        node.run(&[]).expect(
            5,
            &format!(
                "refused: manifest is signed by key {}, but this node pinned key {k3}",
                key_id(&keys[0].1)
            ),
        );
        assert!(node.read("state/forged-ran").is_none());
        assert_eq!(node.read("state/serial").as_deref(), Some("4\n"));
    }
}

#[test]
fn stock_minisign_checks_both_signatures_of_a_statement() {
    let minisign = std::path::Path::new("/usr/bin/minisign");
    if !minisign.exists() {
        idhal_test_support::skip_or_fail("stock minisign: /usr/bin/minisign not installed");
        return;
    }
    let p = Project::new();
    p.sign(&[], "#!/bin/sh\ntrue\n");
    let k0 = (p.path("keys/idhal.key"), p.path("keys/idhal.pub"));
    let k1 = keygen(&p, "1");
    rotate(&p, &k0.0, &k1.0);
    let comment = format!(
        "Trusted comment: idhal-key-rotation 1 sequence=1 from={} to={}\n",
        key_id(&k0.1),
        key_id(&k1.1)
    );
    let statement = p.path("pub/keys/1");
    for (sig, key, good) in [
        ("keys/1.minisig", &k0.1, true),
        ("keys/1.new.minisig", &k1.1, true),
        // Each signature is by its own key only.
        ("keys/1.minisig", &k1.1, false),
        ("keys/1.new.minisig", &k0.1, false),
    ] {
        let out = std::process::Command::new(minisign)
            .arg("-Vm")
            .arg(&statement)
            .arg("-x")
            .arg(p.path("pub").join(sig))
            .arg("-p")
            .arg(key)
            .output()
            .unwrap();
        assert_eq!(out.status.success(), good, "{sig} with {key:?}: {out:?}");
        if good {
            assert!(
                String::from_utf8_lossy(&out.stdout).ends_with(&comment),
                "{out:?}"
            );
        }
    }
}
