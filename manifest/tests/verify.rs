//! Every refusal of the verifier, each with its exact error, on manifests signed by the real
//! `minisign` crate (the signer the server tools use). The same refusals as committed, signed
//! fixtures that the agent tests and the fuzzers share: golden.rs and tests/data/refuse/.

use idhal_manifest::sig::TrustedMeta;
use idhal_manifest::{
    verify, Expiry, Frequency, KeyId, Manifest, Policy, PublicKey, Scriptlet, VerifyError,
};

struct Signer {
    pk: minisign::PublicKey,
    sk: minisign::SecretKey,
}

impl Signer {
    fn new() -> Self {
        let kp = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        Signer {
            pk: kp.pk,
            sk: kp.sk,
        }
    }
    fn public(&self) -> PublicKey {
        PublicKey::from_base64(&self.pk.to_base64()).unwrap()
    }
    fn sign(&self, data: &[u8], comment: &str) -> String {
        minisign::sign(Some(&self.pk), &self.sk, data, Some(comment), None)
            .unwrap()
            .into_string()
    }
}

fn manifest(serial: u64, expires: u64) -> Vec<u8> {
    Manifest {
        serial,
        expires,
        params: vec![],
        scriptlets: vec![Scriptlet {
            id: "000-hello".parse().unwrap(),
            frequency: Frequency::Once,
            body: b"echo hello\n",
        }],
    }
    .encode()
}

fn signed(s: &Signer, serial: u64, expires: u64) -> (Vec<u8>, String) {
    let m = manifest(serial, expires);
    let sig = s.sign(&m, &TrustedMeta { serial, expires }.to_comment());
    (m, sig)
}

const NOW: u64 = 1_800_000_000;
fn policy(last: Option<u64>) -> Policy {
    Policy {
        now: NOW,
        expiry: Expiry::Enforce,
        last_serial: last,
    }
}

#[test]
fn accepts_good_manifest() {
    let s = Signer::new();
    let (m, sig) = signed(&s, 5, NOW + 10);
    let got = verify(&s.public(), &m, &sig, &policy(Some(5))).unwrap();
    assert_eq!(got.serial, 5);
    assert_eq!(got.scriptlets[0].body, b"echo hello\n");
}

#[test]
fn refuses_tampered_manifest_byte() {
    let s = Signer::new();
    let (mut m, sig) = signed(&s, 5, NOW + 10);
    let last = m.len() - 6;
    m[last] ^= 1;
    assert_eq!(
        verify(&s.public(), &m, &sig, &policy(None)).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn refuses_tampered_trusted_comment() {
    let s = Signer::new();
    let (m, sig) = signed(&s, 5, NOW + 10);
    let forged = sig.replace("serial=5", "serial=9");
    assert_eq!(
        verify(&s.public(), &m, &forged, &policy(None)).unwrap_err(),
        VerifyError::BadTrustedComment
    );
}

#[test]
fn refuses_wrong_key() {
    let (s, other) = (Signer::new(), Signer::new());
    let (m, sig) = signed(&other, 5, NOW + 10);
    let err = verify(&s.public(), &m, &sig, &policy(None)).unwrap_err();
    assert_eq!(
        err,
        VerifyError::WrongKey {
            pinned: s.public().id(),
            got: other.public().id()
        }
    );
    // Same key id, different key: the signature itself fails.
    let impostor = PublicKey::new(s.public().id(), *other.public().ed25519());
    let (m, sig) = signed(&s, 5, NOW + 10);
    assert_eq!(
        verify(&impostor, &m, &sig, &policy(None)).unwrap_err(),
        VerifyError::BadSignature
    );
}

#[test]
fn refuses_rollback_and_expiry() {
    let s = Signer::new();
    let (m, sig) = signed(&s, 4, NOW + 10);
    assert_eq!(
        verify(&s.public(), &m, &sig, &policy(Some(5))).unwrap_err(),
        VerifyError::Rollback { got: 4, last: 5 }
    );
    let (m, sig) = signed(&s, 6, NOW);
    let err = verify(&s.public(), &m, &sig, &policy(Some(5))).unwrap_err();
    assert_eq!(
        err,
        VerifyError::Expired {
            serial: 6,
            expired_at: NOW,
            now: NOW
        }
    );
    assert_eq!(
        err.to_string(),
        "manifest serial 6 expired at 2027-01-15T08:00:00Z (now 2027-01-15T08:00:00Z); \
         re-sign it with `idhal sign`"
    );
    let lax = Policy {
        expiry: Expiry::Ignore,
        ..policy(None)
    };
    assert_eq!(verify(&s.public(), &m, &sig, &lax).unwrap().serial, 6);
}

#[test]
fn refuses_metadata_mismatch_and_foreign_comment() {
    let s = Signer::new();
    let m = manifest(5, NOW + 10);
    let sig = s.sign(
        &m,
        &TrustedMeta {
            serial: 6,
            expires: NOW + 10,
        }
        .to_comment(),
    );
    assert_eq!(
        verify(&s.public(), &m, &sig, &policy(None)).unwrap_err(),
        VerifyError::MetadataMismatch {
            meta_serial: 6,
            meta_expires: NOW + 10,
            body_serial: 5,
            body_expires: NOW + 10,
        }
    );
    let sig = s.sign(&m, "timestamp:1700000000");
    assert_eq!(
        verify(&s.public(), &m, &sig, &policy(None)).unwrap_err(),
        VerifyError::MalformedTrustedComment("timestamp:1700000000".into())
    );
}

#[test]
fn refuses_legacy_signatures() {
    use ct_codecs::{Base64, Encoder};
    let kp = ed25519_compact::KeyPair::generate();
    let id = KeyId(*b"legacy!!");
    let pk = PublicKey::new(id, *kp.pk);
    let m = manifest(1, NOW + 10);
    let sig = kp.sk.sign(&m, None);
    let comment = TrustedMeta {
        serial: 1,
        expires: NOW + 10,
    }
    .to_comment();
    let mut global_msg = sig.to_vec();
    global_msg.extend_from_slice(comment.as_bytes());
    let global = kp.sk.sign(&global_msg, None);
    let mut line = b"Ed".to_vec();
    line.extend_from_slice(&id.0);
    line.extend_from_slice(sig.as_ref());
    let text = format!(
        "untrusted comment: legacy\n{}\ntrusted comment: {comment}\n{}\n",
        Base64::encode_to_string(&line).unwrap(),
        Base64::encode_to_string(global.as_ref()).unwrap()
    );
    assert_eq!(
        verify(&pk, &m, &text, &policy(None)).unwrap_err(),
        VerifyError::LegacySignature
    );
}

#[test]
fn refuses_malformed_signature_files() {
    let s = Signer::new();
    let (m, sig) = signed(&s, 1, NOW + 10);
    for (bad, want) in [
        ("", "empty file"),
        ("hello\n", "first line is not an untrusted comment"),
        (
            "untrusted comment: x\n%%%\n",
            "signature line is not base64",
        ),
    ] {
        assert_eq!(
            verify(&s.public(), &m, bad, &policy(None)).unwrap_err(),
            VerifyError::MalformedSignature(want)
        );
    }
    let truncated: String = sig.lines().take(3).collect::<Vec<_>>().join("\n");
    assert_eq!(
        verify(&s.public(), &m, &truncated, &policy(None)).unwrap_err(),
        VerifyError::MalformedSignature("no global signature line")
    );
}
