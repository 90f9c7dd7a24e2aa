//! The two fixed DER structures a node ever writes: its Ed25519 private key as PKCS#8 (for
//! OpenVPN) and a PKCS#10 certificate request for it. Both have one shape, so a few lines of DER
//! replace an ASN.1 stack in the agent; `openssl` checks the output in the tests.

use ct_codecs::{Base64, Encoder};
use ed25519_compact::KeyPair;

/// id-Ed25519 (RFC 8410): 1.3.101.112.
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// id-at-commonName: 2.5.4.3.
const OID_CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 4);
    out.push(tag);
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        // Nothing written here comes near 64 KiB; the caller bounds the CN.
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    tlv(0x30, &parts.concat())
}

fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = vec![0u8]; // no unused bits
    content.extend_from_slice(bytes);
    tlv(0x03, &content)
}

/// SubjectPublicKeyInfo of an Ed25519 key.
pub fn ed25519_spki(public: &[u8; 32]) -> Vec<u8> {
    seq(&[&seq(&[OID_ED25519]), &bit_string(public)])
}

/// A PKCS#10 request for `kp`'s public key with subject `CN=cn`, self-signed (proof of
/// possession). `cn` is at most 64 bytes of printable ASCII; the CA ignores it anyway.
pub fn ed25519_csr(kp: &KeyPair, cn: &str) -> Vec<u8> {
    assert!(cn.len() <= 64 && cn.bytes().all(|b| (0x20..0x7f).contains(&b)));
    let name = seq(&[&tlv(0x31, &seq(&[OID_CN, &tlv(0x0c, cn.as_bytes())]))]);
    let info = seq(&[
        &[0x02, 0x01, 0x00], // version 0
        &name,
        &ed25519_spki(&kp.pk),
        &[0xa0, 0x00], // no attributes
    ]);
    let sig = kp.sk.sign(&info, None);
    seq(&[&info, &seq(&[OID_ED25519]), &bit_string(sig.as_ref())])
}

/// The private key as an unencrypted PKCS#8 `PrivateKeyInfo` (RFC 8410), what OpenVPN's `key`
/// option reads as `-----BEGIN PRIVATE KEY-----`.
pub fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    seq(&[
        &[0x02, 0x01, 0x00],
        &seq(&[OID_ED25519]),
        &tlv(0x04, &tlv(0x04, seed)),
    ])
}

/// The seed back out of `ed25519_pkcs8`'s output; `None` for anything of another shape.
pub fn ed25519_seed_from_pkcs8(der: &[u8]) -> Option<[u8; 32]> {
    let prefix = &ed25519_pkcs8(&[0; 32])[..16];
    if der.len() != 48 || &der[..16] != prefix {
        return None;
    }
    der[16..].try_into().ok()
}

/// The DER inside the first PEM block labelled `label`.
pub fn pem_decode(label: &str, text: &str) -> Option<Vec<u8>> {
    use ct_codecs::Decoder;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let body = text.split_once(&begin)?.1.split_once(&end)?.0;
    let b64: String = body.split_ascii_whitespace().collect();
    Base64::decode_to_vec(b64, None).ok()
}

/// PEM armour with 64-column lines.
pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = Base64::encode_to_string(der).expect("base64 of a small buffer");
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_compact::Seed;

    #[test]
    fn fixed_shapes() {
        let kp = KeyPair::from_seed(Seed::new([7; 32]));
        let der = ed25519_pkcs8(&[7; 32]);
        assert_eq!(der.len(), 48);
        assert_eq!(
            &der[..16],
            &[
                0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
                0x04, 0x20
            ]
        );
        let csr = ed25519_csr(&kp, "idhal-node");
        // SEQUENCE, long form length (the request is 148 bytes of content).
        assert_eq!(&csr[..3], &[0x30, 0x81, 148]);
        assert_eq!(csr.len(), 151);
        // The signature is over the request info and verifies with the key inside it.
        let info_len = csr[4] as usize + 2;
        let info = &csr[3..3 + info_len];
        let sig = &csr[csr.len() - 64..];
        kp.pk
            .verify(info, &ed25519_compact::Signature::from_slice(sig).unwrap())
            .unwrap();
        assert_eq!(ed25519_seed_from_pkcs8(&der), Some([7; 32]));
        assert_eq!(ed25519_seed_from_pkcs8(&der[1..]), None);
        let p = pem("PRIVATE KEY", &der);
        assert_eq!(pem_decode("PRIVATE KEY", &p), Some(der.clone()));
        assert_eq!(pem_decode("CERTIFICATE", &p), None);
        assert!(p.starts_with("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI"));
    }
}
