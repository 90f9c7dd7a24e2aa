//! The two fixed DER structures a node ever writes: its Ed25519 private key as PKCS#8 (for
//! OpenVPN) and a PKCS#10 certificate request for it, and the one thing it reads from a
//! certificate: its validity (when to renew). Each has one shape, so a few lines of DER replace
//! an ASN.1 stack in the agent; `openssl` checks them in the tests.

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

/// The DER element at the start of `*buf`: its tag and content, `*buf` moved past it.
/// Single-byte tags and definite lengths of at most 4 bytes only; `None` for anything else or
/// a length past the end.
fn next<'a>(buf: &mut &'a [u8]) -> Option<(u8, &'a [u8])> {
    let &[tag, first, ref rest @ ..] = *buf else {
        return None;
    };
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None; // indefinite, absurd, or cut short
        }
        let (bytes, rest) = rest.split_at(n);
        (bytes.iter().fold(0, |l, b| l << 8 | usize::from(*b)), rest)
    };
    if tag & 0x1f == 0x1f || rest.len() < len {
        return None;
    }
    let (content, after) = rest.split_at(len);
    *buf = after;
    Some((tag, content))
}

/// A UTCTime (`YYMMDDHHMMSSZ`, 1950-2049 as RFC 5280 reads it) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`) in unix seconds; `None` for any other spelling or a time before 1970.
fn x509_time(tag: u8, text: &[u8]) -> Option<u64> {
    let (off, digits) = match (tag, text.split_last()) {
        (0x17, Some((b'Z', d))) if d.len() == 12 => (2, d),
        (0x18, Some((b'Z', d))) if d.len() == 14 => (0, d),
        _ => return None,
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // The two digits at `i` in YYYYMMDDHHMMSS (a UTCTime has no century: it starts at 2).
    let n =
        |i: usize| u64::from(digits[i - off] - b'0') * 10 + u64::from(digits[i + 1 - off] - b'0');
    let year = match (off, n(2)) {
        (0, yy) => n(0) * 100 + yy,
        (_, yy) if yy < 50 => 2000 + yy,
        (_, yy) => 1900 + yy,
    };
    let (month, day, hour, min, sec) = (n(4), n(6), n(8), n(10), n(12));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = match month {
        2 => 28 + u64::from(leap),
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if year < 1970
        || !(1..=12).contains(&month)
        || !(1..=month_days).contains(&day)
        || hour > 23
        || min > 59
        || sec > 59
    {
        return None;
    }
    // Howard Hinnant's days_from_civil, years starting in March.
    let (y, m) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let days = y * 365 + y / 4 - y / 100 + y / 400 + (153 * m + 2) / 5 + day - 1 - 719_468;
    Some(days * 86_400 + hour * 3600 + min * 60 + sec)
}

/// A DER X.509 certificate's notBefore and notAfter in unix seconds (RFC 5280: Certificate →
/// tbsCertificate → version, serial, signature, issuer skipped → Validity). `None` for anything
/// not shaped so, or a validity that ends before it starts. Nothing else is read or checked:
/// the agent takes the certificate from a signed answer, this only says when to renew it.
pub fn cert_validity(der: &[u8]) -> Option<(u64, u64)> {
    cert_validity_and_key(der).map(|(from, until, _)| (from, until))
}

/// `cert_validity`, and the content of the certificate's subjectPublicKeyInfo (after the
/// subject), to compare with [`ed25519_spki`]'s: whose key the certificate certifies.
pub fn cert_validity_and_key(mut der: &[u8]) -> Option<(u64, u64, &[u8])> {
    let (0x30, mut cert) = next(&mut der)? else {
        return None;
    };
    let (0x30, mut tbs) = next(&mut cert)? else {
        return None;
    };
    let mut field = next(&mut tbs)?;
    if field.0 == 0xa0 {
        field = next(&mut tbs)?; // the version
    }
    for tag in [0x02, 0x30, 0x30] {
        // serial, signature algorithm, issuer
        if field.0 != tag {
            return None;
        }
        field = next(&mut tbs)?;
    }
    let (0x30, mut validity) = field else {
        return None;
    };
    let (t1, c1) = next(&mut validity)?;
    let (t2, c2) = next(&mut validity)?;
    let (from, until) = (x509_time(t1, c1)?, x509_time(t2, c2)?);
    let (0x30, _subject) = next(&mut tbs)? else {
        return None;
    };
    let (0x30, spki) = next(&mut tbs)? else {
        return None;
    };
    (validity.is_empty() && from <= until).then_some((from, until, spki))
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

    /// A certificate of the shape RFC 5280 gives (the signature is not looked at), with the
    /// two validity times given as (tag, text).
    fn cert_with(from: (u8, &str), until: (u8, &str)) -> Vec<u8> {
        cert_of(&[0xa0, 0x03, 0x02, 0x01, 0x02], from, until)
    }

    /// The same, with `version` (the v3 field, or nothing for v1).
    fn cert_of(version: &[u8], from: (u8, &str), until: (u8, &str)) -> Vec<u8> {
        let alg = seq(&[OID_ED25519]);
        let name = seq(&[&tlv(0x31, &seq(&[OID_CN, &tlv(0x0c, b"ca")]))]);
        let validity = seq(&[
            &tlv(from.0, from.1.as_bytes()),
            &tlv(until.0, until.1.as_bytes()),
        ]);
        let tbs = seq(&[
            version,
            &[0x02, 0x02, 0x01, 0x00],
            &alg,
            &name,
            &validity,
            &name,
            &ed25519_spki(&[1; 32]),
        ]);
        seq(&[&tbs, &alg, &bit_string(&[0; 64])])
    }

    #[test]
    fn validity_of_both_time_forms() {
        let utc = |s| (0x17, s);
        let gen = |s| (0x18, s);
        for (from, until, want) in [
            (
                utc("700101000000Z"),
                utc("491231235959Z"),
                (0, 2_524_607_999),
            ),
            // 2-digit years 50-99 are 1950-1999: before 1970 is no unix time.
            (
                utc("991231235959Z"),
                gen("20500101000000Z"),
                (946_684_799, 2_524_608_000),
            ),
            (
                gen("20260101000000Z"),
                gen("21000301000000Z"),
                (1_767_225_600, 4_107_542_400),
            ),
            // 29 February of leap years: 2024, and 2400 (a century divisible by 400).
            (
                utc("240229000000Z"),
                gen("24000229000000Z"),
                (1_709_164_800, 13_574_563_200),
            ),
            (
                utc("000229120000Z"),
                utc("000229120000Z"),
                (951_825_600, 951_825_600),
            ),
        ] {
            assert_eq!(
                cert_validity(&cert_with(from, until)),
                Some(want),
                "{from:?} {until:?}"
            );
        }
        // Without the optional version field (a v1 certificate) too.
        let v1 = cert_of(&[], utc("700101000000Z"), utc("700101000001Z"));
        assert_eq!(cert_validity(&v1), Some((0, 1)));
    }

    #[test]
    fn hostile_validities_are_none() {
        let good = cert_with((0x17, "260101000000Z"), (0x17, "270101000000Z"));
        assert!(cert_validity(&good).is_some());
        // Every truncation.
        for n in 0..good.len() {
            assert_eq!(cert_validity(&good[..n]), None, "prefix {n}");
        }
        // Times spelled any other way, or before 1970, or ending before they start.
        for (from, until) in [
            ((0x17, "260101000000"), (0x17, "270101000000Z")),
            ((0x17, "2601010000Z"), (0x17, "270101000000Z")),
            ((0x17, "260101000000+0100"), (0x17, "270101000000Z")),
            ((0x18, "260101000000Z"), (0x17, "270101000000Z")),
            ((0x17, "20260101000000Z"), (0x17, "270101000000Z")),
            ((0x17, "261301000000Z"), (0x17, "270101000000Z")),
            ((0x17, "260100000000Z"), (0x17, "270101000000Z")),
            ((0x17, "260101240000Z"), (0x17, "270101000000Z")),
            ((0x17, "260101006000Z"), (0x17, "270101000000Z")),
            ((0x17, "260101000060Z"), (0x17, "270101000000Z")),
            ((0x17, "26010100000aZ"), (0x17, "270101000000Z")),
            ((0x17, "26-1-1000000Z"), (0x17, "270101000000Z")),
            ((0x18, "19691231235959Z"), (0x17, "270101000000Z")),
            ((0x17, "690101000000Z"), (0x17, "270101000000Z")),
            ((0x17, "270101000000Z"), (0x17, "260101000000Z")),
            ((0x0c, "260101000000Z"), (0x17, "270101000000Z")),
            // Days a month does not have: 31 April, 30 February, 29 February out of a leap
            // year (2026; 2100, a century not divisible by 400).
            ((0x17, "260431000000Z"), (0x17, "270101000000Z")),
            ((0x17, "260230000000Z"), (0x17, "270101000000Z")),
            ((0x17, "260229000000Z"), (0x17, "270101000000Z")),
            ((0x17, "260101000000Z"), (0x18, "21000229000000Z")),
            ((0x17, "261131000000Z"), (0x17, "270101000000Z")),
        ] {
            assert_eq!(
                cert_validity(&cert_with(from, until)),
                None,
                "{from:?} {until:?}"
            );
        }
        // Wrong tags where a SEQUENCE or the serial belongs, a third time in the validity.
        let mut t = good.clone();
        t[0] = 0x31;
        assert_eq!(cert_validity(&t), None);
        let serial = good
            .windows(4)
            .position(|w| w == [0x02, 0x02, 0x01, 0x00])
            .unwrap();
        let mut t = good.clone();
        t[serial] = 0x04;
        assert_eq!(cert_validity(&t), None);
        let three = {
            let v = seq(&[
                &tlv(0x17, b"260101000000Z"),
                &tlv(0x17, b"270101000000Z"),
                &tlv(0x17, b"280101000000Z"),
            ]);
            let tbs = seq(&[&[0x02, 0x01, 0x01], &seq(&[OID_ED25519]), &seq(&[]), &v]);
            seq(&[&tbs])
        };
        assert_eq!(cert_validity(&three), None);
        // Lengths: indefinite, more than 4 bytes, far past the end, a high tag number.
        for bad in [
            &[0x30, 0x80, 0x00, 0x00][..],
            &[0x30, 0x85, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff, 0x30],
            &[0x30, 0x82, 0x01],
            &[0x3f, 0x01, 0x00],
            &[],
            &[0x30],
        ] {
            assert_eq!(cert_validity(bad), None, "{bad:?}");
        }
        let mut huge = good.clone();
        huge[1..3].copy_from_slice(&[0x84, 0x7f]);
        assert_eq!(cert_validity(&huge), None);
    }
}
