//! `idhal verify`: has `signing::verify` check a PUBDIR as an agent would and that its files
//! agree, maps what it found to an exit code, and shows what the manifest holds.

use crate::cmd::{Exit, Global};
use crate::signing::rotate::{self, Followed};
use crate::signing::verify::{verify_pubdir, Verdict};
use anyhow::Context;
use idhal_manifest::time::{now, rfc3339};
use idhal_manifest::{Expiry, PublicKey};
use std::path::PathBuf;

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
    /// The public key (minisign format) nodes are pinned to. After key rotations (PUBDIR/keys/)
    /// an older key works too: its chain is followed to the signing key, as a node does.
    #[arg(long = "pub", value_name = "FILE")]
    pub public: PathBuf,
    /// Show an expired manifest instead of refusing it (never what an agent does).
    #[arg(long)]
    pub ignore_expiry: bool,
    /// Publication directory.
    #[arg(value_name = "PUBDIR")]
    pub pubdir: PathBuf,
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    let key_text = std::fs::read_to_string(&args.public)
        .with_context(|| format!("cannot read public key {}", args.public.display()))?;
    let key = PublicKey::parse(&key_text)
        .with_context(|| format!("{} is not a minisign public key", args.public.display()))?;

    let dir = &args.pubdir;
    let now = now();
    let expiry = if args.ignore_expiry {
        Expiry::Ignore
    } else {
        Expiry::Enforce
    };
    // A PUBDIR signed by a later key after rotations: follow its chain from KEY, as a node would.
    let key = match rotate::follow(dir, &key)? {
        Followed::Same => key,
        Followed::To(head) => {
            println!(
                "followed the key rotations from key {} to key {} (rotation {})",
                key.id(),
                head.key.id(),
                head.sequence
            );
            head.key
        }
        Followed::Refused(e) => {
            eprintln!("idhal: refused: a node pinned to key {}: {e}", key.id());
            return Ok(Exit::Refused);
        }
    };
    let mut body = Vec::new();
    let m = match verify_pubdir(&key, dir, now, expiry, &mut body) {
        Ok(m) => m,
        Err(e) => {
            return match e.verdict() {
                Verdict::Unreadable => Err(e.into()),
                Verdict::Refused => {
                    eprintln!("idhal: refused: {e}");
                    Ok(Exit::Refused)
                }
                Verdict::Inconsistent => {
                    eprintln!("idhal: inconsistent: {e}");
                    Ok(Exit::Inconsistent)
                }
            }
        }
    };

    let expired = if now >= m.expires {
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
