//! Golden vectors: the files in manifest/tests/data, made once from the TEST-ONLY keys below and
//! committed. Parsing each gives the fields written here by hand, encoding and signing those
//! fields again gives exactly the committed bytes (Ed25519 is deterministic), the docs' examples
//! are these files, and each refusal dir gives its exact error. A change to the format, the
//! signer, the verifier or the docs fails one of these tests instead of drifting silently.
//!
//! Regenerate deliberately (never as a fix for a failing test without reading the diff):
//! `cargo test -p idhal-manifest --test golden -- --ignored regenerate`, then `git diff`.

use ct_codecs::{Base64, Decoder, Encoder};
use ed25519_compact::{KeyPair, Seed};
use idhal_manifest::enroll::{self, EnrollKey, Request, Response, Token};
use idhal_manifest::rotation::{
    self, ChainHead, Rotation, StatementFiles, WalkError, MAX_CHAIN, MAX_STATEMENT,
};
use idhal_manifest::sig::TrustedMeta;
use idhal_manifest::{
    der, verify, Expiry, Frequency, KeyId, Manifest, Param, Policy, PublicKey, Scriptlet,
    SigAlgorithm, SignatureFile,
};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");

// ---- The fields of the vectors (what the docs show) ----

const SERIAL: u64 = 42;
/// 2100-01-01T00:00:00Z: far enough that the real agent accepts the vector too.
const EXPIRES: u64 = 4_102_444_800;
/// 2023-11-14T22:13:20Z: the `expired` case.
const EXPIRED: u64 = 1_700_000_000;
/// The verifier's clock in these tests: 2027-01-15T08:00:00Z.
const NOW: u64 = 1_800_000_000;
const ENROLL_URL: &str = "http://10.0.2.100:8080/enroll";
const HELLO: &str = "#!/bin/sh\n\
# A body is exactly LEN raw bytes: the `end` line below is part of it, not the manifest's end.\n\
cat >> \"$IDHAL_STATE_DIR/golden.log\" <<EOF\n\
$IDHAL_SCRIPTLET serial $IDHAL_SERIAL\n\
end\n\
EOF\n";
const EVERY_BOOT: &str =
    "#!/bin/sh\necho \"$IDHAL_SCRIPTLET $IDHAL_PARAM_ENROLL_URL\" >> \"$IDHAL_STATE_DIR/golden.log\"\n";
const REQUEST_TIME: u64 = 1_767_225_600;
const NODE: &str = "client317";
const PROJECT: &str = "default";
const ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 134, 7, 38);
/// What `idhal-bootstrap enroll` puts in its CSR (the CA ignores it).
const CSR_CN: &str = "idhal-node";
/// The stock minisign default trusted comment, which is not idhal metadata.
const STOCK_COMMENT: &str = "timestamp:1767225600\tfile:manifest\thashed";
/// The `oversized` case: the agent's download limit, and a manifest above it.
const OVERSIZE_LIMIT: usize = 4096;

// ---- The TEST-ONLY keys: derived from fixed labels, so nothing here is secret ----

fn seed(label: &str) -> [u8; 32] {
    hmac_sha256::Hash::hash(format!("idhal TEST-ONLY golden vector: {label}").as_bytes())
}

/// A minisign key pair made from fixed labels (the signer's `idhal keygen` makes random ones).
struct MiniKey {
    id: KeyId,
    kp: KeyPair,
}

impl MiniKey {
    fn new(label: &str) -> MiniKey {
        let id: [u8; 8] = seed(&format!("{label} key id"))[..8].try_into().unwrap();
        MiniKey {
            id: KeyId(id),
            kp: KeyPair::from_seed(Seed::new(seed(label))),
        }
    }
    fn public(&self) -> PublicKey {
        PublicKey::new(self.id, *self.kp.pk)
    }
    /// minisign's unencrypted secret key file (`minisign -G -W`, `idhal keygen --no-passphrase`).
    fn secret_file(&self, comment: &str) -> String {
        use blake2::Digest;
        let mut raw = Vec::with_capacity(158);
        raw.extend_from_slice(b"Ed");
        raw.extend_from_slice(&[0, 0]); // no KDF: unencrypted
        raw.extend_from_slice(b"B2");
        raw.extend_from_slice(&[0; 32 + 8 + 8]); // salt, opslimit, memlimit: unused
        raw.extend_from_slice(&self.id.0);
        raw.extend_from_slice(self.kp.sk.as_ref());
        let mut chk = blake2::Blake2b256::new();
        chk.update(b"Ed");
        chk.update(self.id.0);
        chk.update(self.kp.sk.as_ref());
        raw.extend_from_slice(&chk.finalize());
        format!(
            "untrusted comment: {comment}\n{}\n",
            Base64::encode_to_string(&raw).unwrap()
        )
    }
    /// A minisign signature file, signed the RFC 8032 way (deterministic). `idhal sign` uses the
    /// minisign crate, which adds random noise (hedged signatures): same format, same checks,
    /// other signature bytes (`the_real_signer_writes_the_same_file`).
    fn sign(&self, alg: &[u8; 2], data: &[u8], trusted: &str, untrusted: &str) -> String {
        let signed: Vec<u8> = if alg == b"Ed" {
            data.to_vec()
        } else {
            use blake2::Digest;
            blake2::Blake2b512::digest(data).to_vec()
        };
        let sig = self.kp.sk.sign(&signed, None);
        let mut line = alg.to_vec();
        line.extend_from_slice(&self.id.0);
        line.extend_from_slice(sig.as_ref());
        let mut global = sig.to_vec();
        global.extend_from_slice(trusted.as_bytes());
        format!(
            "untrusted comment: {untrusted}\n{}\ntrusted comment: {trusted}\n{}\n",
            Base64::encode_to_string(&line).unwrap(),
            Base64::encode_to_string(self.kp.sk.sign(&global, None).as_ref()).unwrap()
        )
    }
    /// What `idhal sign` writes for `data` with `meta`.
    fn idhal_sign(&self, data: &[u8], meta: TrustedMeta) -> String {
        self.sign(
            b"ED",
            data,
            &meta.to_comment(),
            &untrusted(meta.serial, self.id),
        )
    }
}

/// `idhal sign`'s untrusted comment.
fn untrusted(serial: u64, id: KeyId) -> String {
    format!("idhal manifest serial {serial}, signed by key {id}")
}

fn signing_key() -> MiniKey {
    MiniKey::new("manifest signing key")
}
fn other_key() -> MiniKey {
    MiniKey::new("another server's signing key")
}
fn token() -> Token {
    let mut r = [0u8; 40];
    r[..8].copy_from_slice(&seed("token id")[..8]);
    r[8..].copy_from_slice(&seed("token secret"));
    Token::from_random(r)
}
fn node_key() -> KeyPair {
    KeyPair::from_seed(Seed::new(seed("node key")))
}
fn enroll_key() -> KeyPair {
    KeyPair::from_seed(Seed::new(seed("enrollment key")))
}
fn ca_seed() -> [u8; 32] {
    seed("project CA key")
}

// ---- The generator: every file it makes must equal the committed one ----

fn manifest(serial: u64, expires: u64, extra: &[(&str, &str)]) -> Vec<u8> {
    let key = EnrollKey(*enroll_key().pk).to_string();
    let mut scriptlets = vec![
        Scriptlet {
            id: "000-hello".parse().unwrap(),
            frequency: Frequency::Once,
            body: HELLO.as_bytes(),
        },
        Scriptlet {
            id: "010-every-boot".parse().unwrap(),
            frequency: Frequency::Boot,
            body: EVERY_BOOT.as_bytes(),
        },
    ];
    for (id, body) in extra {
        scriptlets.push(Scriptlet {
            id: id.parse().unwrap(),
            frequency: Frequency::Once,
            body: body.as_bytes(),
        });
    }
    Manifest {
        serial,
        expires,
        params: vec![
            Param {
                name: "enroll-key".parse().unwrap(),
                value: &key,
            },
            Param {
                name: "enroll-url".parse().unwrap(),
                value: ENROLL_URL,
            },
        ],
        scriptlets,
    }
    .encode()
}

fn meta(serial: u64, expires: u64) -> TrustedMeta {
    TrustedMeta { serial, expires }
}

fn request() -> Vec<u8> {
    Request {
        token: token().id,
        time: REQUEST_TIME,
        nonce: seed("nonce")[..16].try_into().unwrap(),
        csr: der::ed25519_csr(&node_key(), CSR_CN),
    }
    .sign(&token())
}

fn openvpn_config() -> String {
    // As server-tools' openvpn::client_config renders it for one remote.
    format!(
        "# idhal node {NODE} (project {PROJECT}): OpenVPN client configuration from enrollment.\n\
         # Run: openvpn --cd DIR --config openvpn.conf (DIR holds ca.crt, node.crt, node.key)\n\
         client\ndev tun\nproto tcp-client\nremote 10.0.2.100 1194\n\
         connect-retry 1 10\nresolv-retry infinite\nnobind\nremote-cert-tls server\n\
         tls-version-min 1.2\nca ca.crt\ncert node.crt\nkey node.key\npersist-key\nverb 3\n"
    )
}

/// The response needs the certificates `openssl` made once (enroll/ca.crt, enroll/node.crt):
/// X.509 dates are not reproducible, so they are inputs, not generated.
fn response(certificate: String, ca: String) -> Response {
    Response {
        request: enroll::request_digest(&request()),
        project: PROJECT.into(),
        node: NODE.into(),
        address: ADDRESS,
        certificate,
        ca,
        openvpn: openvpn_config(),
    }
}

fn read(rel: &str) -> Vec<u8> {
    let p = Path::new(DATA).join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}
fn read_text(rel: &str) -> String {
    String::from_utf8(read(rel)).unwrap()
}

/// Every generated file by its path under tests/data.
fn generate() -> BTreeMap<String, Vec<u8>> {
    let key = signing_key();
    let mut out = BTreeMap::new();
    let mut put = |path: &str, bytes: Vec<u8>| {
        assert!(out.insert(path.to_owned(), bytes).is_none(), "{path} twice");
    };
    put(
        "TEST-ONLY-signing.key",
        key.secret_file(
            "TEST-ONLY idhal golden-vector signing key: public in the repository, never trust it",
        )
        .into_bytes(),
    );
    put("idhal.pub", key.public().to_file_text().into_bytes());
    let golden = manifest(SERIAL, EXPIRES, &[]);
    let golden_sig = key.idhal_sign(&golden, meta(SERIAL, EXPIRES));
    put("manifest", golden.clone());
    put("manifest.minisig", golden_sig.clone().into_bytes());

    put(
        "enroll/TEST-ONLY-token",
        format!("{}\n", token()).into_bytes(),
    );
    put(
        "enroll/TEST-ONLY-node.key",
        enroll::node_key_pem(&seed("node key")).into_bytes(),
    );
    put(
        "enroll/TEST-ONLY-enroll.key",
        der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&seed("enrollment key"))).into_bytes(),
    );
    put(
        "enroll/TEST-ONLY-ca.key",
        der::pem("PRIVATE KEY", &der::ed25519_pkcs8(&ca_seed())).into_bytes(),
    );
    put(
        "enroll/node.csr",
        der::pem(
            "CERTIFICATE REQUEST",
            &der::ed25519_csr(&node_key(), CSR_CN),
        )
        .into_bytes(),
    );
    put("enroll/request", request());
    if Path::new(DATA).join("enroll/node.crt").exists() {
        put(
            "enroll/response",
            response(read_text("enroll/node.crt"), read_text("enroll/ca.crt")).sign(&enroll_key()),
        );
    }

    // Refusal cases: the golden publication changed the way each attack or accident changes it.
    let mut case = |name: &str, m: &[u8], sig: &str| {
        put(&format!("refuse/{name}/manifest"), m.to_vec());
        put(
            &format!("refuse/{name}/manifest.minisig"),
            sig.as_bytes().to_vec(),
        );
    };
    let mut tampered = golden.clone();
    let at = find(&tampered, b"serial $IDHAL_SERIAL");
    tampered[at] = b'S';
    case("tampered-manifest", &tampered, &golden_sig);
    case(
        "tampered-signature",
        &golden,
        &edit_line(&golden_sig, 1, |raw| raw[40] ^= 0x01),
    );
    case(
        "tampered-metadata",
        &golden,
        &golden_sig.replace("expires=4102444800", "expires=4102444801"),
    );
    case(
        "wrong-key",
        &golden,
        &other_key().idhal_sign(&golden, meta(SERIAL, EXPIRES)),
    );
    let comment = meta(SERIAL, EXPIRES).to_comment();
    case(
        "legacy-signature",
        &golden,
        &key.sign(
            b"Ed",
            &golden,
            &comment,
            "signature from minisign -l (legacy)",
        ),
    );
    case(
        "unsupported-algorithm",
        &golden,
        &edit_line(&golden_sig, 1, |raw| raw[1] = b'C'),
    );
    let cut: String = golden_sig
        .lines()
        .take(3)
        .map(|l| format!("{l}\n"))
        .collect();
    case("malformed-signature", &golden, &cut);
    case(
        "foreign-comment",
        &golden,
        &key.sign(
            b"ED",
            &golden,
            STOCK_COMMENT,
            "signature from minisign secret key",
        ),
    );
    let older = manifest(SERIAL - 1, EXPIRES, &[]);
    case(
        "rollback",
        &older,
        &key.idhal_sign(&older, meta(SERIAL - 1, EXPIRES)),
    );
    let expired = manifest(SERIAL, EXPIRED, &[]);
    case(
        "expired",
        &expired,
        &key.idhal_sign(&expired, meta(SERIAL, EXPIRED)),
    );
    let mut v2 = golden.clone();
    v2[15] = b'2'; // "idhal-manifest 1" -> "idhal-manifest 2"
    case(
        "malformed-manifest",
        &v2,
        &key.idhal_sign(&v2, meta(SERIAL, EXPIRES)),
    );
    case(
        "metadata-mismatch",
        &golden,
        &key.idhal_sign(&golden, meta(SERIAL + 1, EXPIRES)),
    );
    let pad = format!("#!/bin/sh\n{}\n", "#".repeat(OVERSIZE_LIMIT));
    let big = manifest(SERIAL, EXPIRES, &[("020-big", &pad)]);
    case(
        "oversized",
        &big,
        &key.idhal_sign(&big, meta(SERIAL, EXPIRES)),
    );
    put(
        "refuse/rollback/node-serial",
        format!("{SERIAL}\n").into_bytes(),
    );
    put(
        "refuse/oversized/bootstrap.conf",
        format!("max_manifest_size = {OVERSIZE_LIMIT}\n").into_bytes(),
    );
    rotation_files(&mut put);
    out
}

// ---- Key rotation: publications with a chain in keys/, and the key a node pinned ----

/// K0 is the golden signing key; K1, K2, … replace it one after the other.
fn rot_key(n: u64) -> MiniKey {
    match n {
        0 => signing_key(),
        n => MiniKey::new(&format!("rotation key {n}")),
    }
}

/// Statement `r` and its two signatures, by `old` and `new`, as `idhal key rotate` writes them.
fn rotation_sigs(r: &Rotation, old: &MiniKey, new: &MiniKey) -> (Vec<u8>, String, String) {
    let body = r.encode().into_bytes();
    let sign = |k: &MiniKey, role: &str| {
        k.sign(
            b"ED",
            &body,
            &r.comment(),
            &format!(
                "idhal key rotation {}: key {} replaced by key {}, signed by the {role} key",
                r.sequence,
                r.from.id(),
                r.to.id()
            ),
        )
    };
    let (o, n) = (sign(old, "old"), sign(new, "new"));
    (body, o, n)
}

fn rotation(sequence: u64, from: u64, to: u64) -> Rotation {
    Rotation {
        sequence,
        from: rot_key(from).public(),
        to: rot_key(to).public(),
    }
}

/// What a node pinned: `server.pub` as the agent writes it (with the rotation that made the key).
fn pinned_file(key: u64, sequence: u64) -> Vec<u8> {
    let mut text = rot_key(key).public().to_file_text();
    if sequence > 0 {
        // The node started from K0, the image's key.
        text += &format!("idhal-rotation {sequence} {}\n", rot_key(0).id);
    }
    text.into_bytes()
}

fn rotation_files(put: &mut dyn FnMut(&str, Vec<u8>)) {
    // One publication: statements (sequence, from, to) signed by (old, new), the manifest's key
    // and serial, the node's pinned key and rotation.
    struct Case<'a> {
        dir: &'a str,
        steps: Vec<(Rotation, u64, u64)>,
        signer: u64,
        serial: u64,
        expires: u64,
        pinned: (u64, u64),
    }
    let chain = |n: u64| {
        (1..=n)
            .map(|i| (rotation(i, i - 1, i), i - 1, i))
            .collect::<Vec<_>>()
    };
    let case = |dir, steps, signer, pinned| Case {
        dir,
        steps,
        signer,
        serial: SERIAL,
        expires: EXPIRES,
        pinned,
    };
    let cases = [
        case("follow", chain(3), 3, (0, 0)),
        case("at-k2", chain(3), 3, (2, 2)),
        case("baked-k2", chain(3), 3, (2, 0)),
        case(
            "refuse/skipped-step",
            vec![(rotation(1, 0, 1), 0, 1), (rotation(2, 2, 3), 2, 3)],
            3,
            (0, 0),
        ),
        case("refuse/one-signature", chain(1), 1, (0, 0)),
        case(
            "refuse/new-signed-by-old",
            vec![(rotation(1, 0, 1), 0, 0)],
            1,
            (0, 0),
        ),
        case(
            "refuse/sequence-back",
            vec![(rotation(1, 0, 1), 0, 1), (rotation(1, 1, 2), 1, 2)],
            2,
            (0, 0),
        ),
        case(
            "refuse/too-long",
            chain(MAX_CHAIN + 1),
            MAX_CHAIN + 1,
            (0, 0),
        ),
        Case {
            serial: SERIAL + 1,
            ..case("refuse/old-key-after-rotation", chain(3), 0, (3, 3))
        },
        case("refuse/tampered-statement", chain(1), 1, (0, 0)),
        case("refuse/comment", chain(1), 1, (0, 0)),
        case(
            "refuse/key-reused",
            vec![
                (rotation(1, 0, 1), 0, 1),
                (rotation(2, 1, 0), 1, 0),
                (rotation(3, 0, 2), 0, 2),
            ],
            2,
            (0, 0),
        ),
        case(
            "refuse/same-key",
            vec![(rotation(1, 0, 0), 0, 0)],
            1,
            (0, 0),
        ),
        case("refuse/too-large", chain(1), 1, (0, 0)),
        case("refuse/malformed", chain(1), 1, (0, 0)),
        case("refuse/ends-before-signer", chain(1), 2, (0, 0)),
        case("refuse/intermediate-key", chain(2), 1, (0, 0)),
        Case {
            expires: EXPIRED,
            ..case("refuse/expired-after-chain", chain(1), 1, (0, 0))
        },
    ];
    for c in cases {
        let d = format!("rotate/{}", c.dir);
        let m = manifest(c.serial, c.expires, &[]);
        let sig = rot_key(c.signer).idhal_sign(&m, meta(c.serial, c.expires));
        put(&format!("{d}/manifest"), m);
        put(&format!("{d}/manifest.minisig"), sig.into_bytes());
        put(
            &format!("{d}/pinned.pub"),
            pinned_file(c.pinned.0, c.pinned.1),
        );
        // Statement i goes to keys/i, whatever sequence it says (`sequence-back`).
        for (k, (r, old, new)) in (1..).zip(&c.steps) {
            let (mut body, mut o, mut n) = rotation_sigs(r, &rot_key(*old), &rot_key(*new));
            let first = k == 1;
            match c.dir {
                // A node at K2 never looks at statement 1: it may be anything.
                "at-k2" | "baked-k2" | "refuse/tampered-statement" if first => {
                    let at = find(&body, b"\nto ") + 5;
                    body[at] ^= 0x01;
                }
                "refuse/one-signature" => n = String::new(),
                "refuse/comment" => {
                    let wrong = Rotation {
                        sequence: 7,
                        ..r.clone()
                    }
                    .comment();
                    o = rot_key(*old).sign(b"ED", &body, &wrong, "old");
                    n = rot_key(*new).sign(b"ED", &body, &wrong, "new");
                }
                // One byte over the cap: read whole by the agent (a larger body is not read at all
                // and ends the chain like a 404), and refused.
                "refuse/too-large" => {
                    body.resize(MAX_STATEMENT + 1, b'\n');
                }
                "refuse/malformed" => {
                    body.extend_from_slice(b"note: extra\n");
                    (o, n) = (
                        rot_key(*old).sign(b"ED", &body, &r.comment(), "old"),
                        rot_key(*new).sign(b"ED", &body, &r.comment(), "new"),
                    );
                }
                _ => {}
            }
            put(&format!("{d}/keys/{k}"), body);
            put(&format!("{d}/keys/{k}.minisig"), o.into_bytes());
            if !n.is_empty() {
                put(&format!("{d}/keys/{k}.new.minisig"), n.into_bytes());
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in the vector")
}

/// `sig` with base64 line `n` decoded, changed by `f` and encoded again.
fn edit_line(sig: &str, n: usize, f: impl Fn(&mut Vec<u8>)) -> String {
    sig.lines()
        .enumerate()
        .map(|(i, l)| {
            if i != n {
                return format!("{l}\n");
            }
            let mut raw = Base64::decode_to_vec(l, None).unwrap();
            f(&mut raw);
            format!("{}\n", Base64::encode_to_string(&raw).unwrap())
        })
        .collect()
}

/// Files under tests/data that are written by hand or made once by `openssl`, not generated.
fn is_input(rel: &str) -> bool {
    rel == "README.md"
        || rel == "enroll/node.crt"
        || rel == "enroll/ca.crt"
        || ((rel.starts_with("refuse/") || rel.starts_with("rotate/")) && rel.ends_with("/expect"))
}

fn committed_files() -> BTreeMap<String, Vec<u8>> {
    fn walk(dir: &Path, base: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, base, out);
            } else {
                let rel = p.strip_prefix(base).unwrap().to_str().unwrap().to_owned();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(Path::new(DATA), Path::new(DATA), &mut out);
    out
}

#[test]
fn committed_vectors_are_what_the_generator_makes() {
    let generated = generate();
    let committed = committed_files();
    assert!(
        generated.contains_key("enroll/response"),
        "enroll/node.crt is missing"
    );
    for (path, bytes) in &generated {
        let Some(have) = committed.get(path) else {
            panic!("{path} is generated but not committed (regenerate: see the top of golden.rs)");
        };
        assert!(
            have == bytes,
            "{path} differs from what the generator makes now:\ncommitted:\n{}\ngenerated:\n{}",
            String::from_utf8_lossy(have),
            String::from_utf8_lossy(bytes)
        );
    }
    for path in committed.keys() {
        assert!(
            generated.contains_key(path) || is_input(path),
            "{path} is neither generated nor a known input: stale?"
        );
    }
    eprintln!("{} generated files match", generated.len());
}

// ---- Parsing the committed files gives the documented fields ----

#[test]
fn the_golden_manifest_parses_to_its_fields_and_verifies() {
    let bytes = read("manifest");
    let m = Manifest::parse(&bytes).unwrap();
    assert_eq!((m.serial, m.expires), (42, 4_102_444_800));
    assert_eq!(m.param("enroll-url"), Some("http://10.0.2.100:8080/enroll"));
    let enroll_key: EnrollKey = m.param("enroll-key").unwrap().parse().unwrap();
    assert_eq!(enroll_key.0, *enroll_key_from_file().pk);
    let ids: Vec<_> = m
        .scriptlets
        .iter()
        .map(|s| (s.id.as_str(), s.frequency))
        .collect();
    assert_eq!(
        ids,
        [
            ("000-hello", Frequency::Once),
            ("010-every-boot", Frequency::Boot)
        ]
    );
    assert!(m.scriptlets[0].body.ends_with(b"\nend\nEOF\n"));
    assert_eq!(m.encode(), bytes, "the encoding is not canonical");

    let pk = PublicKey::parse(&read_text("idhal.pub")).unwrap();
    let sig_text = read_text("manifest.minisig");
    let sig = SignatureFile::parse(&sig_text).unwrap();
    assert_eq!(sig.algorithm, SigAlgorithm::Prehashed);
    assert_eq!(sig.key_id, pk.id());
    assert_eq!(
        sig.trusted_comment,
        "idhal-manifest 1 serial=42 expires=4102444800"
    );
    let policy = Policy {
        now: NOW,
        expiry: Expiry::Enforce,
        last_serial: Some(42),
    };
    assert_eq!(verify(&pk, &bytes, &sig_text, &policy).unwrap(), m);
    eprintln!("golden key {} fingerprint {}", pk.id(), pk.fingerprint());
}

/// The committed secret key file, read the way the real signer (the minisign crate) reads it.
fn minisign_secret() -> minisign::SecretKey {
    let text = read_text("TEST-ONLY-signing.key");
    minisign::SecretKeyBox::from_string(&text)
        .unwrap()
        .into_unencrypted_secret_key()
        .expect("the committed key is an unencrypted minisign key with a valid checksum")
}

#[test]
fn the_real_signer_writes_the_same_file() {
    // `idhal sign` signs with the minisign crate, whose signatures carry random noise: every
    // line but the two signatures must be the committed ones, and both must verify.
    let sk = minisign_secret();
    let pk_text = read_text("idhal.pub");
    let pk = PublicKey::parse(&pk_text).unwrap();
    let mpk = minisign::PublicKey::from_base64(&pk.to_base64()).unwrap();
    assert_eq!(
        minisign::PublicKey::from_secret_key(&sk)
            .unwrap()
            .to_base64(),
        pk.to_base64(),
        "TEST-ONLY-signing.key is not the key of idhal.pub"
    );
    let bytes = read("manifest");
    let comment = meta(SERIAL, EXPIRES).to_comment();
    let real = minisign::sign(
        Some(&mpk),
        &sk,
        std::io::Cursor::new(&bytes),
        Some(&comment),
        Some(&untrusted(SERIAL, pk.id())),
    )
    .unwrap()
    .into_string();
    let committed = read_text("manifest.minisig");
    let (real_lines, golden_lines): (Vec<_>, Vec<_>) =
        (real.lines().collect(), committed.lines().collect());
    assert_eq!(real_lines.len(), 4);
    assert_eq!(real_lines.len(), golden_lines.len());
    for i in [0, 2] {
        assert_eq!(real_lines[i], golden_lines[i], "line {}", i + 1);
    }
    // Algorithm and key id (the first 10 bytes of the signature line) agree too.
    let head = |l: &str| Base64::decode_to_vec(l, None).unwrap()[..10].to_vec();
    assert_eq!(head(real_lines[1]), head(golden_lines[1]));
    let policy = Policy {
        now: NOW,
        expiry: Expiry::Enforce,
        last_serial: None,
    };
    verify(&pk, &bytes, &real, &policy).unwrap();
    verify(&pk, &bytes, &committed, &policy).unwrap();
}

fn enroll_key_from_file() -> KeyPair {
    let der = der::pem_decode("PRIVATE KEY", &read_text("enroll/TEST-ONLY-enroll.key")).unwrap();
    KeyPair::from_seed(Seed::new(der::ed25519_seed_from_pkcs8(&der).unwrap()))
}

#[test]
fn the_golden_enrollment_parses_to_its_fields_and_verifies() {
    let token: Token = read_text("enroll/TEST-ONLY-token").trim().parse().unwrap();
    let req_bytes = read("enroll/request");
    let signed = Request::parse(&req_bytes).unwrap();
    let r = &signed.request;
    assert_eq!(r.token, token.id);
    assert_eq!(r.time, 1_767_225_600);
    let node_der = der::pem_decode("PRIVATE KEY", &read_text("enroll/TEST-ONLY-node.key")).unwrap();
    let node = KeyPair::from_seed(Seed::new(der::ed25519_seed_from_pkcs8(&node_der).unwrap()));
    assert_eq!(r.csr, der::ed25519_csr(&node, "idhal-node"));
    assert_eq!(
        Some(r.csr.clone()),
        der::pem_decode("CERTIFICATE REQUEST", &read_text("enroll/node.csr"))
    );
    signed.verify(&token.verifier()).unwrap();
    assert_eq!(r.sign(&token), req_bytes, "re-signing changed the request");

    let key = enroll_key_from_file();
    let resp_bytes = read("enroll/response");
    let resp = Response::verify(&resp_bytes, &EnrollKey(*key.pk), &signed.digest).unwrap();
    assert_eq!(
        (resp.project.as_str(), resp.node.as_str(), resp.address),
        ("default", "client317", Ipv4Addr::new(10, 134, 7, 38))
    );
    assert_eq!(resp.certificate, read_text("enroll/node.crt"));
    assert_eq!(resp.ca, read_text("enroll/ca.crt"));
    assert!(resp.openvpn.contains("\nremote 10.0.2.100 1194\n"));
    assert_eq!(
        resp.sign(&key),
        resp_bytes,
        "re-signing changed the response"
    );
}

#[test]
fn the_golden_certificates_belong_to_the_golden_keys() {
    // The response's certificate is for the CSR's key and signed by the CA in the response, as
    // `idhal serve` would make them (checked by the real openssl).
    let dir = Path::new(DATA).join("enroll");
    let run = |args: &[&str]| {
        let o = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("openssl is installed (scripts/setup-debian.sh)");
        assert!(o.status.success(), "openssl {args:?}: {o:?}");
        String::from_utf8(o.stdout).unwrap()
    };
    assert_eq!(
        run(&["verify", "-CAfile", "ca.crt", "node.crt"]),
        "node.crt: OK\n"
    );
    let cert_key = run(&["x509", "-in", "node.crt", "-noout", "-pubkey"]);
    let csr_key = run(&["req", "-in", "node.csr", "-noout", "-pubkey"]);
    assert_eq!(cert_key, csr_key);
    let ca_key = run(&["pkey", "-in", "TEST-ONLY-ca.key", "-pubout"]);
    assert_eq!(run(&["x509", "-in", "ca.crt", "-noout", "-pubkey"]), ca_key);
    let subject = run(&["x509", "-in", "node.crt", "-noout", "-subject"]);
    assert_eq!(subject.trim(), "subject=CN = client317");
}

// ---- The docs show these files ----

/// The fenced block right after each `<!-- golden: PATH -->` line of `doc`, by PATH.
fn doc_examples(doc: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut lines = doc.lines();
    while let Some(line) = lines.next() {
        let Some(path) = line
            .strip_prefix("<!-- golden: ")
            .and_then(|r| r.strip_suffix(" -->"))
        else {
            continue;
        };
        let fence = lines.next().unwrap_or_default();
        assert!(
            fence.starts_with("```"),
            "{path}: no fenced block after the marker"
        );
        let mut text = String::new();
        for l in lines.by_ref() {
            if l == "```" {
                break;
            }
            text.push_str(l);
            text.push('\n');
        }
        assert!(out.insert(path.to_owned(), text).is_none(), "{path} twice");
    }
    out
}

/// The fenced block that follows the line `after` in `doc`.
fn block_after(doc: &str, after: &str) -> Vec<String> {
    let rest = doc
        .split_once(after)
        .unwrap_or_else(|| panic!("the doc no longer has {after:?}"))
        .1;
    let body = rest.split_once("```\n").unwrap().1;
    body.split_once("```")
        .unwrap()
        .0
        .lines()
        .map(str::to_owned)
        .collect()
}

const MANIFEST_DOC: &str = include_str!("../../docs/manifest.md");
const ENROLLMENT_DOC: &str = include_str!("../../docs/enrollment.md");

/// The literal blocks `doc` marks as golden are exactly `want`, each equal to its file.
#[track_caller]
fn doc_shows_exactly(name: &str, doc: &str, want: &[&str]) {
    let ex = doc_examples(doc);
    assert_eq!(
        ex.keys().collect::<Vec<_>>(),
        want.iter().collect::<Vec<_>>()
    );
    for path in want {
        let file = read_text(path.strip_prefix("manifest/tests/data/").unwrap());
        assert_eq!(ex[*path], file, "{name}'s example differs from {path}");
    }
}

#[test]
fn docs_manifest_shows_the_golden_vectors() {
    doc_shows_exactly(
        "docs/manifest.md",
        MANIFEST_DOC,
        &[
            "manifest/tests/data/idhal.pub",
            "manifest/tests/data/manifest",
            "manifest/tests/data/manifest.minisig",
        ],
    );
    let pk = PublicKey::parse(&read_text("idhal.pub")).unwrap();
    assert!(
        MANIFEST_DOC.contains(&format!("`{}`", pk.fingerprint())),
        "docs/manifest.md does not show the golden key's fingerprint {}",
        pk.fingerprint()
    );
    let bytes = read("manifest");
    let len = Manifest::parse(&bytes).unwrap().scriptlets[0].body.len();
    assert!(
        MANIFEST_DOC.contains(&format!("its length, {len}, says where it ends")),
        "docs/manifest.md names another length than {len}"
    );
    // The stock minisign example shows the golden trusted comment.
    let comment = meta(SERIAL, EXPIRES).to_comment();
    assert!(
        MANIFEST_DOC.contains(&format!("# Trusted comment: {comment}\n")),
        "docs/manifest.md's minisign -V example does not show {comment:?}"
    );
    // The schematic grammar example uses the keywords, in the order, of the vector.
    let schematic = block_after(MANIFEST_DOC, "length, so a body may contain anything");
    let words: Vec<_> = schematic
        .iter()
        .filter(|l| !l.starts_with('<'))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    assert_eq!(
        words,
        [
            "idhal-manifest",
            "serial",
            "expires",
            "param",
            "scriptlet",
            "scriptlet",
            "end"
        ]
    );
}

#[test]
fn docs_enrollment_shows_the_golden_vectors() {
    doc_shows_exactly(
        "docs/enrollment.md",
        ENROLLMENT_DOC,
        &[
            "manifest/tests/data/enroll/TEST-ONLY-token",
            "manifest/tests/data/enroll/request",
        ],
    );
    // The schematic request and response name the vector's fields, in its order.
    let keywords = |lines: &[String]| -> Vec<String> {
        lines
            .iter()
            .filter(|l| !l.starts_with('<'))
            .map(|l| l.split(' ').next().unwrap().to_owned())
            .collect()
    };
    let request = read_text("enroll/request");
    let req_lines: Vec<String> = request.lines().map(str::to_owned).collect();
    assert_eq!(
        keywords(&block_after(ENROLLMENT_DOC, "spelling is refused):")),
        keywords(&req_lines)
    );
    let response = read_text("enroll/response");
    let mut resp_words = Vec::new();
    let mut rest = response.as_str();
    while let Some((line, tail)) = rest.split_once('\n') {
        let word = line.split(' ').next().unwrap();
        resp_words.push(word.to_owned());
        rest = tail;
        if ["certificate", "ca", "openvpn"].contains(&word) {
            let len: usize = line.split(' ').nth(1).unwrap().parse().unwrap();
            rest = &rest[len + 1..];
        }
    }
    assert_eq!(
        keywords(&block_after(ENROLLMENT_DOC, "`200` with a body signed by")),
        resp_words
    );
}

// ---- Refusal dirs: each gives its exact error ----

/// A refusal dir's `expect` file: `key: value` lines, `#` comments.
struct Expect(BTreeMap<String, String>);

impl Expect {
    fn read(dir: &Path) -> Expect {
        let text = std::fs::read_to_string(dir.join("expect"))
            .unwrap_or_else(|e| panic!("{}/expect: {e}", dir.display()));
        let mut map = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (k, v) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("{}/expect: bad line {line:?}", dir.display()));
            assert!(
                map.insert(k.to_owned(), v.to_owned()).is_none(),
                "{k} twice"
            );
        }
        Expect(map)
    }
    fn get(&self, k: &str) -> &str {
        self.0
            .get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("no {k}:"))
    }
}

fn refusal_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir(Path::new(DATA).join("refuse"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_refusal_dir_gives_its_exact_error() {
    let pk = PublicKey::parse(&read_text("idhal.pub")).unwrap();
    let dirs = refusal_dirs();
    let names: Vec<_> = dirs
        .iter()
        .map(|d| d.file_name().unwrap().to_str().unwrap())
        .collect();
    for required in [
        "tampered-manifest",
        "wrong-key",
        "rollback",
        "expired",
        "legacy-signature",
    ] {
        assert!(names.contains(&required), "refuse/{required} is missing");
    }
    for dir in &dirs {
        let expect = Expect::read(dir);
        let m = std::fs::read(dir.join("manifest")).unwrap();
        let sig = std::fs::read_to_string(dir.join("manifest.minisig")).unwrap();
        let last_serial = std::fs::read_to_string(dir.join("node-serial"))
            .ok()
            .map(|s| s.trim().parse().unwrap());
        let policy = Policy {
            now: NOW,
            expiry: Expiry::Enforce,
            last_serial,
        };
        let name = dir.file_name().unwrap().to_str().unwrap();
        let got = verify(&pk, &m, &sig, &policy);
        match expect.get("error") {
            // Refused before verification (the agent's download limit): the verifier accepts.
            "-" => {
                assert!(got.is_ok(), "{name}: {got:?}");
                continue;
            }
            variant => {
                let err = got.expect_err(name);
                let debug = format!("{err:?}");
                let got_variant = debug
                    .split(|c: char| !c.is_ascii_alphanumeric())
                    .next()
                    .unwrap();
                assert_eq!(got_variant, variant, "{name}: {err:?}");
                let want = expect
                    .get("message")
                    .replace("{now}", &idhal_manifest::time::rfc3339(NOW));
                assert_eq!(err.to_string(), want, "{name}");
            }
        }
    }
    eprintln!("{} refusal dirs: {names:?}", dirs.len());
}

/// The head a rotation dir's node starts from: its `pinned.pub`, as the agent reads it.
fn pinned_head(dir: &Path) -> ChainHead {
    let text = std::fs::read_to_string(dir.join("pinned.pub")).unwrap();
    let sequence = text
        .lines()
        .find_map(|l| l.strip_prefix("idhal-rotation "))
        .map_or(0, |n| n.split(' ').next().unwrap().parse().unwrap());
    ChainHead {
        key: PublicKey::parse(&text).unwrap(),
        sequence,
    }
}

/// Statement `n` of a publication dir, read the way the agent fetches it.
fn statement_files(dir: &Path, n: u64) -> Option<StatementFiles> {
    let read = |rel: String| std::fs::read_to_string(dir.join(rel)).unwrap_or_default();
    Some(StatementFiles {
        statement: std::fs::read(dir.join(idhal_manifest::paths::rotation_statement(n))).ok()?,
        old_signature: read(idhal_manifest::paths::rotation_old_signature(n)),
        new_signature: read(idhal_manifest::paths::rotation_new_signature(n)),
    })
}

#[test]
fn every_rotation_dir_gives_its_exact_result() {
    let base = Path::new(DATA).join("rotate");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(base.join("refuse"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs.extend(["follow", "at-k2", "baked-k2"].map(|d| base.join(d)));
    let policy = Policy {
        now: NOW,
        expiry: Expiry::Enforce,
        last_serial: None,
    };
    for dir in &dirs {
        let name = dir.strip_prefix(&base).unwrap().display().to_string();
        let expect = Expect::read(dir);
        let head = pinned_head(dir);
        let sig = std::fs::read_to_string(dir.join("manifest.minisig")).unwrap();
        let signer = SignatureFile::parse(&sig).unwrap().key_id;
        let mut fetched = Vec::new();
        let end = rotation::walk(&head, &mut |n| {
            fetched.push(n);
            Ok::<_, ()>(statement_files(dir, n))
        });
        let m = std::fs::read(dir.join("manifest")).unwrap();
        // What the agent does next: verify the manifest with the chain's last key.
        let got = match end {
            Ok(end) => rotation::manifest_key(&head, &end, signer)
                .map_err(|e| (format!("{e:?}"), e.to_string()))
                .and_then(|key| {
                    verify(key, &m, &sig, &policy).map_err(|e| (format!("{e:?}"), e.to_string()))
                })
                .map(|_| end),
            Err(WalkError::Fetch(())) => unreachable!(),
            Err(WalkError::Refused(e)) => Err((format!("{e:?}"), e.to_string())),
        };
        match got {
            Ok(new) => {
                assert_eq!(
                    format!("{} rotation {}", new.key.id(), new.sequence),
                    expect.get("pinned"),
                    "{name}"
                );
                assert_eq!(format!("{fetched:?}"), expect.get("fetched"), "{name}");
            }
            Err((debug, message)) => {
                let variant = debug.split(|c: char| !c.is_ascii_alphanumeric()).next();
                assert_eq!(variant, Some(expect.get("error")), "{name}: {debug}");
                let want = expect
                    .get("message")
                    .replace("{now}", &idhal_manifest::time::rfc3339(NOW));
                assert_eq!(message, want, "{name}");
            }
        }
    }
    assert!(dirs.len() >= 16, "{dirs:?}");
}

// ---- Regeneration, on purpose only ----

#[test]
#[ignore = "writes manifest/tests/data: run on purpose, then read the git diff"]
fn regenerate() {
    let data = Path::new(DATA);
    let enroll = data.join("enroll");
    std::fs::create_dir_all(&enroll).unwrap();
    let files = generate();
    for (path, bytes) in &files {
        let p = data.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, bytes).unwrap();
    }
    if !enroll.join("node.crt").exists() {
        // Made once: X.509 validity dates are not reproducible. 20 years, like `idhal ca init`.
        let run = |args: &[&str]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&enroll)
                .output()
                .unwrap();
            assert!(o.status.success(), "openssl {args:?}: {o:?}");
        };
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "TEST-ONLY-ca.key",
            "-subj",
            "/CN=idhal project default CA (TEST-ONLY golden vector)",
            "-days",
            "7300",
            "-set_serial",
            "1",
            "-out",
            "ca.crt",
        ]);
        std::fs::write(
            enroll.join("node.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "node.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "TEST-ONLY-ca.key",
            "-set_serial",
            "2",
            "-days",
            "7300",
            "-subj",
            "/CN=client317",
            "-extfile",
            "node.ext",
            "-out",
            "node.crt",
        ]);
        std::fs::remove_file(enroll.join("node.ext")).unwrap();
        // The response needs the certificates.
        let files = generate();
        std::fs::write(enroll.join("response"), &files["enroll/response"]).unwrap();
    }
    eprintln!("wrote {} files under {}", files.len(), data.display());
}
