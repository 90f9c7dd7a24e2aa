//! `idhal verify`: checks a PUBDIR exactly as an agent would (same library, same fixed order) and
//! that its files agree with each other, then shows what the manifest holds.

use crate::cmd::{Exit, Global};
use anyhow::Context;
use idhal_manifest::time::{now, rfc3339};
use idhal_manifest::{paths, verify, Expiry, Manifest, Policy, PublicKey, VerifyError};
use std::path::{Path, PathBuf};

/// Verify the manifest published in PUBDIR, as an agent would.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Verify the latest manifest in PUBDIR with the public key, in the same order and \
        with the same code as the node agent: key id, signature, trusted comment (serial and \
        expiry), expiry, then the manifest itself. Also checks that PUBDIR is consistent: \
        `manifest` equals `manifests/<serial>`, the signatures match, and PUBDIR/idhal.pub (if \
        present) is the same key. Prints the serial, expiry, params and scriptlets.",
    after_help = "Exit codes:\n  \
        0  verified\n  \
        1  error (a file could not be read, bad arguments)\n  \
        2  usage error\n  \
        3  refused: the manifest or its signature fails verification (tampered, wrong key, \
        expired, legacy signature, ...)\n  \
        4  PUBDIR is inconsistent (manifest differs from manifests/<serial>, a publish was \
        interrupted, or idhal.pub is another key)\n\n\
        Examples:\n  \
        idhal verify --pub keys/idhal.pub /srv/idhal\n  \
        idhal verify --pub /etc/idhal/server.pub --ignore-expiry /srv/idhal   # forensic look at an expired one\n\n\
        Stock minisign checks the same signature: minisign -Vm /srv/idhal/manifest -p keys/idhal.pub"
)]
pub struct Args {
    /// The public key (minisign format) nodes are pinned to.
    #[arg(long = "pub", value_name = "FILE")]
    pub public: PathBuf,
    /// Show an expired manifest instead of refusing it (never what an agent does).
    #[arg(long)]
    pub ignore_expiry: bool,
    /// Publication directory.
    #[arg(value_name = "PUBDIR")]
    pub pubdir: PathBuf,
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn refused(what: impl std::fmt::Display) -> Exit {
    eprintln!("idhal: refused: {what}");
    Exit::Refused
}

fn inconsistent(what: impl std::fmt::Display) -> Exit {
    eprintln!("idhal: inconsistent: {what}");
    Exit::Inconsistent
}

/// If `body` is byte for byte a version in PUBDIR/manifests whose own signature verifies,
/// its serial. The serial is read from unverified bytes only to pick the file to check.
fn signed_version_of(key: &PublicKey, body: &[u8], dir: &Path, policy: &Policy) -> Option<u64> {
    let serial = Manifest::parse(body).ok()?.serial;
    let copy = std::fs::read(dir.join(paths::versioned_manifest(serial))).ok()?;
    let sig = std::fs::read_to_string(dir.join(paths::versioned_signature(serial))).ok()?;
    (copy == body && verify(key, &copy, &sig, policy).is_ok()).then_some(serial)
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    let key_text = std::fs::read_to_string(&args.public)
        .with_context(|| format!("cannot read public key {}", args.public.display()))?;
    let key = PublicKey::parse(&key_text)
        .with_context(|| format!("{} is not a minisign public key", args.public.display()))?;

    let dir = &args.pubdir;
    let sig_path = dir.join(paths::SIGNATURE);
    let manifest_path = dir.join(paths::MANIFEST);
    let sig_bytes = read(&sig_path)?;
    let body = read(&manifest_path)?;
    let Ok(sig_text) = std::str::from_utf8(&sig_bytes) else {
        return Ok(refused(format!("{}: not UTF-8 text", sig_path.display())));
    };
    let policy = Policy {
        now: now(),
        expiry: if args.ignore_expiry {
            Expiry::Ignore
        } else {
            Expiry::Enforce
        },
        last_serial: None,
    };
    let m = match verify(&key, &body, sig_text, &policy) {
        Ok(m) => m,
        Err(e @ VerifyError::BadSignature) => {
            // A publish interrupted between its last two renames leaves `manifest` one version
            // ahead of `manifest.minisig`. Agents are unaffected (they read manifests/<serial>);
            // say so instead of "tampered" when `manifest` is a newer, validly signed version.
            if let Some(newer) = signed_version_of(&key, &body, dir, &policy) {
                return Ok(inconsistent(format!(
                    "{} is already serial {newer} but {} still signs an older one: an interrupted \
                     publish? Re-run `idhal sign`",
                    manifest_path.display(),
                    sig_path.display()
                )));
            }
            return Ok(refused(format!("{}: {e}", manifest_path.display())));
        }
        Err(e) => return Ok(refused(format!("{}: {e}", manifest_path.display()))),
    };

    let versioned = dir.join(paths::versioned_manifest(m.serial));
    let versioned_sig = dir.join(paths::versioned_signature(m.serial));
    // Agents fetch manifests/<serial>, humans and minisign read `manifest`: they must agree.
    for (copy, original, expected) in [
        (&versioned, &manifest_path, &body),
        (&versioned_sig, &sig_path, &sig_bytes),
    ] {
        match std::fs::read(copy) {
            Ok(b) if b == *expected => {}
            Ok(_) => {
                return Ok(inconsistent(format!(
                    "{} differs from {}",
                    original.display(),
                    copy.display()
                )))
            }
            Err(e) => return Ok(inconsistent(format!("cannot read {}: {e}", copy.display()))),
        }
    }
    let served_key = dir.join(paths::PUBLIC_KEY);
    if served_key.exists() {
        let text = std::fs::read_to_string(&served_key)
            .with_context(|| format!("cannot read {}", served_key.display()))?;
        match PublicKey::parse(&text) {
            Ok(k) if k == key => {}
            Ok(k) => {
                return Ok(inconsistent(format!(
                "{} is key {} ({}), not the key {} given with --pub: first-boot nodes pinned by \
                     fingerprint would refuse it",
                served_key.display(),
                k.id(),
                k.fingerprint(),
                key.id()
            )))
            }
            Err(e) => {
                return Ok(inconsistent(format!("{}: {e}", served_key.display())));
            }
        }
    }

    let expired = if policy.now >= m.expires {
        " (EXPIRED; shown because of --ignore-expiry)"
    } else {
        ""
    };
    println!(
        "verified {} with key {} ({})",
        dir.display(),
        key.id(),
        key.fingerprint()
    );
    println!("serial {}", m.serial);
    println!("expires {}{expired}", rfc3339(m.expires));
    for p in &m.params {
        println!("param {}={}", p.name, p.value);
    }
    println!("{} scriptlets:", m.scriptlets.len());
    for s in &m.scriptlets {
        println!(
            "  {:<40} {:<6} {} bytes",
            s.id.as_str(),
            s.frequency.as_str(),
            s.body.len()
        );
    }
    Ok(Exit::Ok)
}
