//! `idhal key rotate | chain` and `idhal sign` after a rotation: the statements written, checked
//! with the idhal-manifest library as a node checks them, and every refusal of the CLI, including
//! a hostile or damaged `keys/` dir. The agent side is in bootstrap/tests/rotation.rs.

mod cli_support;

use cli_support::*;
use idhal_manifest::rotation::{self, ChainHead, StatementFiles};
use idhal_manifest::{paths, verify, PublicKey};
use std::path::{Path, PathBuf};

struct Keys {
    dir: tempfile::TempDir,
    pubdir: PathBuf,
    scripts: PathBuf,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let scripts = dir.path().join("s");
        write(&scripts, "000-a.sh", "#!/bin/sh\ntrue\n");
        Keys {
            pubdir: dir.path().join("pub"),
            scripts,
            dir,
        }
    }
    /// Key `n`'s (secret, public) files, made on first use.
    fn key(&self, n: u32) -> (PathBuf, PathBuf) {
        let d = self.dir.path().join(format!("k{n}"));
        if !d.exists() {
            keygen(&d);
        }
        (d.join("idhal.key"), d.join("idhal.pub"))
    }
    fn id(&self, n: u32) -> String {
        public_key(&self.key(n).1).id().to_string()
    }
    fn sign(&self, n: u32) -> Run {
        sign(&self.key(n).0, &self.pubdir, &self.scripts, &[])
    }
    fn rotate(&self, from: u32, to: u32) -> Run {
        idhal_run(&[
            "key",
            "rotate",
            "--from",
            s(&self.key(from).0),
            "--to",
            s(&self.key(to).0),
            "--out",
            s(&self.pubdir),
        ])
    }
    fn keys_file(&self, rel: &str) -> PathBuf {
        self.pubdir.join(paths::KEYS_DIR).join(rel)
    }
}

fn statement(pubdir: &Path, n: u64) -> Option<StatementFiles> {
    let read = |rel: String| std::fs::read_to_string(pubdir.join(rel)).unwrap_or_default();
    Some(StatementFiles {
        statement: std::fs::read(pubdir.join(paths::rotation_statement(n))).ok()?,
        old_signature: read(paths::rotation_old_signature(n)),
        new_signature: read(paths::rotation_new_signature(n)),
    })
}

#[test]
fn rotate_publishes_statements_a_node_follows_and_sign_accepts_the_chain() {
    let k = Keys::new();
    k.sign(0).ok();
    // Before any rotation, another key may not publish over K0's manifest.
    k.sign(1).fails(
        1,
        "no rotation published in keys/ leads from one to the other",
    );
    for n in 1..=3 {
        let out = k.rotate(n - 1, n).ok();
        assert!(
            out.stdout.contains(&format!(
                "rotation {n}: key {} is replaced by key {}",
                k.id(n - 1),
                k.id(n)
            )),
            "{}",
            out.stdout
        );
        let serial = k.sign(n).ok();
        assert!(serial.stdout.contains(&format!("signed serial {} ", n + 1)));
        // idhal.pub follows the signing key.
        assert_eq!(
            public_key(&k.pubdir.join(paths::PUBLIC_KEY))
                .id()
                .to_string(),
            k.id(n)
        );
    }
    // A node at K0 walks to K3 with the library's rule, and the manifest verifies with K3.
    let head = ChainHead {
        key: public_key(&k.key(0).1),
        sequence: 0,
    };
    let k3 = public_key(&k.key(3).1);
    let got = rotation::walk(&head, &mut |n| Ok::<_, ()>(statement(&k.pubdir, n))).unwrap();
    assert_eq!(
        got,
        ChainHead {
            key: k3.clone(),
            sequence: 3
        }
    );
    let (body, sig) = latest(&k.pubdir);
    assert_eq!(verify(&k3, &body, &sig, &policy()).unwrap().serial, 4);

    // `idhal verify` with the old key follows the chain as a node would; with the last, plainly.
    let v = idhal_run(&["verify", "--pub", s(&k.key(0).1), s(&k.pubdir)]).ok();
    assert!(
        v.stdout.contains(&format!(
            "followed the key rotations from key {} to key {} (rotation 3)",
            k.id(0),
            k.id(3)
        )),
        "{}",
        v.stdout
    );
    assert!(v.stdout.contains("serial 4"), "{}", v.stdout);
    let v = idhal_run(&["verify", "--pub", s(&k.key(3).1), s(&k.pubdir)]).ok();
    assert!(!v.stdout.contains("followed"), "{}", v.stdout);
    // A key outside the chain: refused as by a node.
    let stranger = idhal_run(&["verify", "--pub", s(&k.key(4).1), s(&k.pubdir)]);
    assert_eq!(stranger.code, Some(3), "{}", stranger.stderr);
    assert!(
        stranger.stderr.contains(&format!(
            "is signed by key {}, but this node pinned key {}",
            k.id(3),
            k.id(4)
        )),
        "{}",
        stranger.stderr
    );

    // A damaged statement: a node pinned to K0 would refuse, and so does `idhal verify`.
    let two = std::fs::read(k.keys_file("2")).unwrap();
    std::fs::write(k.keys_file("2"), b"idhal-key-rotation 1\n").unwrap();
    idhal_run(&["verify", "--pub", s(&k.key(0).1), s(&k.pubdir)]).fails(
        3,
        &format!(
            "refused: a node pinned to key {}: key rotation statement 2 does not match",
            k.id(0)
        ),
    );
    std::fs::write(k.keys_file("2"), two).unwrap();

    let chain = idhal_run(&["key", "chain", s(&k.pubdir)]).ok().stdout;
    let lines: Vec<&str> = chain.lines().collect();
    assert_eq!(lines.len(), 4, "{chain}");
    for (n, line) in lines.iter().enumerate() {
        assert!(line.contains(&format!("key {}", k.id(n as u32))), "{chain}");
        assert!(line.trim_start().starts_with(&n.to_string()), "{chain}");
    }
    // Anchored at a trusted key: from there on; a key outside the chain is refused.
    let from1 = idhal_run(&["key", "chain", "--pub", s(&k.key(1).1), s(&k.pubdir)])
        .ok()
        .stdout;
    assert_eq!(from1.lines().count(), 3, "{from1}");
    assert!(from1.lines().next().unwrap().contains(&k.id(1)), "{from1}");
    idhal_run(&["key", "chain", "--pub", s(&k.key(4).1), s(&k.pubdir)]).fails(
        3,
        &format!(
            "refused: key {} is not in the key rotation chain of",
            k.id(4)
        ),
    );
    let empty = Keys::new();
    assert!(idhal_run(&["key", "chain", s(&empty.pubdir)])
        .ok()
        .stdout
        .contains("no key rotation published"));
}

#[test]
fn rotate_refuses_what_would_break_the_chain() {
    let k = Keys::new();
    k.sign(0).ok();
    k.rotate(0, 0)
        .fails(1, &format!("--from and --to are the same key {}", k.id(0)));
    // The first rotation starts from the key that signs the current manifest.
    k.rotate(1, 2)
        .fails(1, &format!("--from is key {}, but ", k.id(1)));
    k.rotate(0, 1).ok();
    // Later ones from the chain's end only, and never back to a key already used.
    k.rotate(0, 2).fails(
        1,
        &format!(
            "--from is key {}, but the chain in {} ends at key {} (statement 1)",
            k.id(0),
            k.pubdir.join("keys").display(),
            k.id(1)
        ),
    );
    k.rotate(1, 0).fails(
        1,
        &format!("--to key {} was already used earlier in the chain", k.id(0)),
    );
    assert!(!k.keys_file("2").exists());
    k.rotate(1, 2).ok();

    // A gap: statement 1 removed.
    let one = std::fs::read(k.keys_file("1")).unwrap();
    std::fs::remove_file(k.keys_file("1")).unwrap();
    k.rotate(2, 3)
        .fails(1, "statement 1 is missing but 2 is published");
    idhal_run(&["key", "chain", s(&k.pubdir)]).fails(1, "statement 1 is missing");

    // Tampered, empty, huge statements: the chain is broken, nothing is written, and `idhal
    // sign` with the chain's last key refuses too.
    let huge = vec![b'x'; 64 << 20];
    for (what, bytes, why) in [
        (
            "tampered",
            String::from_utf8(one.clone())
                .unwrap()
                .replace("sequence 1", "sequence 3")
                .into_bytes(),
            "does not match its old key's signature",
        ),
        ("empty", Vec::new(), "is malformed: first line is not"),
        ("huge", huge, "key rotation statement 1: over 1024 bytes"),
    ] {
        std::fs::write(k.keys_file("1"), &bytes).unwrap();
        k.rotate(2, 3).fails(
            1,
            "the published chain is broken, nothing was written: key rotation statement 1",
        );
        let r = k.sign(2);
        assert_eq!(r.code, Some(1), "{what}: {}", r.stderr);
        assert!(
            r.stderr.contains("the published chain is broken"),
            "{what}: {}",
            r.stderr
        );
        assert!(
            idhal_run(&["key", "chain", s(&k.pubdir)])
                .fails(1, why)
                .code
                == Some(1),
            "{what}"
        );
        assert!(!k.keys_file("3").exists(), "{what}");
    }
    std::fs::write(k.keys_file("1"), &one).unwrap();
    // Stray files in keys/ are not statements.
    for junk in ["README", "01", "0", "-1", "3.bak"] {
        std::fs::write(k.keys_file(junk), "junk").unwrap();
    }
    k.rotate(2, 3).ok();
    assert!(k.keys_file("3").exists());
}

#[test]
fn after_a_rotation_only_the_chains_last_key_signs() {
    let k = Keys::new();
    k.sign(0).ok();
    k.rotate(0, 1).ok();
    let not_last = |n: u32, last: u32, seq: u32| {
        format!(
            "key rotations end at key {} (rotation {seq}): sign with that key, not {}",
            k.id(last),
            k.id(n)
        )
    };
    // The replaced key (it may have leaked), even over its own manifest; a key never rotated to.
    k.sign(0).fails(1, &not_last(0, 1, 1));
    k.sign(2).fails(1, &not_last(2, 1, 1));
    k.sign(1).ok();
    k.sign(0).fails(1, &not_last(0, 1, 1));
    k.rotate(1, 2).ok();
    // A key of the chain that is not its end.
    k.sign(1).fails(1, &not_last(1, 2, 2));
    k.sign(2).ok();
    let key: PublicKey = public_key(&k.key(2).1);
    let (body, sig) = latest(&k.pubdir);
    assert_eq!(verify(&key, &body, &sig, &policy()).unwrap().serial, 3);
    // A manifest signed by a key outside the chain (planted): not published over.
    let stranger = Keys::new();
    stranger.sign(5).ok();
    for f in [paths::SIGNATURE, paths::MANIFEST] {
        std::fs::copy(stranger.pubdir.join(f), k.pubdir.join(f)).unwrap();
    }
    k.sign(2).fails(
        1,
        &format!(
            "signed by key {}, but you are signing with key {}",
            stranger.id(5),
            k.id(2)
        ),
    );
}
