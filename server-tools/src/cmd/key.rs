//! `idhal key rotate | chain`: replacing the manifest signing key without reimaging nodes, by a
//! published chain of rotation statements (`signing::rotate`), and showing that chain.

use crate::cmd::{Exit, Global};
use crate::signing::rotate;
use crate::signing::sign::load_key;
use anyhow::Context;
use idhal_manifest::rotation::MAX_CHAIN;
use idhal_manifest::PublicKey;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(
    about = "Replace the manifest signing key without reimaging nodes (rotation statements)",
    long_about = "Nodes pin the signing key on first boot and accept no other, except through a \
        chain of rotation statements published in PUBDIR/keys/: statement N says \"key K(N-1) is \
        replaced by K(N)\" and is signed by both keys. A node that sees a manifest signed by a \
        key it has not pinned walks that chain from its pinned key, checks every step, and pins \
        the new key only once the manifest verified with it; from then on it refuses manifests \
        signed by the old key. See docs/manifest.md, \"Rotating the signing key\"."
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Publish the statement "FROM is replaced by TO" into PUBDIR/keys/N, signed by both keys.
    #[command(
        long_about = "Publish the statement \"key FROM is replaced by key TO\" as PUBDIR/keys/N \
            (N: one more than the last statement), with PUBDIR/keys/N.minisig signed by FROM and \
            PUBDIR/keys/N.new.minisig signed by TO. FROM must be the key the chain ends at (for \
            the first rotation: the key that signs PUBDIR's current manifest). Statements are \
            never removed: a node that was off for months walks them all.\n\n\
            Make the new key first with `idhal keygen --dir NEWDIR`. After this command, sign \
            with the new key (`idhal sign --key NEWDIR/idhal.key --out PUBDIR ...`): nodes follow \
            the chain at their next run. Bake the new idhal.pub into new images.\n\n\
            Passphrases: --from-passphrase-file and --to-passphrase-file, else \
            $IDHAL_KEY_PASSPHRASE for both, else terminal prompts.",
        after_help = "Examples:\n  \
            idhal keygen --dir keys-2027\n  \
            idhal key rotate --from keys/idhal.key --to keys-2027/idhal.key --out /srv/idhal\n  \
            idhal sign --key keys-2027/idhal.key --out /srv/idhal scriptlets/\n  \
            idhal key chain /srv/idhal\n\n\
            Check a statement with stock minisign:\n  \
            minisign -Vm /srv/idhal/keys/1 -p keys/idhal.pub\n  \
            minisign -Vm /srv/idhal/keys/1 -x /srv/idhal/keys/1.new.minisig -p keys-2027/idhal.pub"
    )]
    Rotate {
        /// The secret key being replaced.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// The secret key replacing it (from `idhal keygen`).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
        /// Passphrase of --from's key (first line of FILE).
        #[arg(long, value_name = "FILE")]
        from_passphrase_file: Option<PathBuf>,
        /// Passphrase of --to's key (first line of FILE).
        #[arg(long, value_name = "FILE")]
        to_passphrase_file: Option<PathBuf>,
        /// Publication directory (the one `idhal sign --out` writes).
        #[arg(long, value_name = "PUBDIR")]
        out: PathBuf,
    },
    /// Check PUBDIR's rotation chain as a node would and print it, oldest key first.
    #[command(
        long_about = "Check PUBDIR's rotation chain statement by statement, as a node does, and \
            print its keys, oldest first. Without --pub the chain is checked from the key its \
            first statement names: consistent, but anyone who can write PUBDIR could plant a \
            consistent chain. With --pub KEY.pub it is checked from a key you trust (the one \
            baked into your images), and refused if that key is not in it.",
        after_help = "Examples:\n  idhal key chain /srv/idhal\n  idhal key chain --pub keys/idhal.pub /srv/idhal"
    )]
    Chain {
        /// Check the chain from this public key (the one nodes were built with).
        #[arg(long = "pub", value_name = "FILE")]
        anchor: Option<PathBuf>,
        /// Publication directory.
        #[arg(value_name = "PUBDIR")]
        pubdir: PathBuf,
    },
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    match args.command {
        Command::Rotate {
            from,
            to,
            from_passphrase_file,
            to_passphrase_file,
            out,
        } => {
            let from = load_key(Some(&from), from_passphrase_file.as_deref())?;
            let to = load_key(Some(&to), to_passphrase_file.as_deref())?;
            let done = rotate::rotate(&out, &from, &to)?;
            let r = &done.rotation;
            println!(
                "rotation {}: key {} is replaced by key {}",
                r.sequence,
                r.from.id(),
                r.to.id()
            );
            for p in &done.written {
                println!("wrote {}", p.display());
            }
            if r.sequence > MAX_CHAIN {
                eprintln!(
                    "idhal: warning: {} statements: a node walks at most {MAX_CHAIN} at a time, so \
                     images whose baked key is older than statement {} can no longer follow; \
                     re-image them or bake a newer key",
                    r.sequence,
                    r.sequence - MAX_CHAIN
                );
            }
            println!(
                "Next: sign with the new key (idhal sign --key NEW.key --out {} ...); nodes pin \
                 key {} at their next run and refuse key {} from then on.",
                out.display(),
                r.to.id(),
                r.from.id()
            );
            Ok(Exit::Ok)
        }
        Command::Chain { anchor, pubdir } => {
            let mut keys = rotate::chain(&pubdir)?;
            if keys.is_empty() {
                println!("{}: no key rotation published", pubdir.display());
            }
            match anchor {
                None if !keys.is_empty() => eprintln!(
                    "idhal: note: checked from the key statement 1 names; give --pub KEY.pub to \
                     check it from a key you trust"
                ),
                None => {}
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    let key = PublicKey::parse(&text).with_context(|| {
                        format!("{} is not a minisign public key", path.display())
                    })?;
                    let Some(at) = keys.iter().position(|h| h.key == key) else {
                        eprintln!(
                            "idhal: refused: key {} is not in the key rotation chain of {}",
                            key.id(),
                            pubdir.display()
                        );
                        return Ok(Exit::Refused);
                    };
                    keys.drain(..at);
                }
            }
            for h in &keys {
                println!(
                    "{:>3}  key {}  {}",
                    h.sequence,
                    h.key.id(),
                    h.key.fingerprint()
                );
            }
            Ok(Exit::Ok)
        }
    }
}
