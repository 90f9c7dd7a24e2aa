//! `idhal keygen`: creates the signing key pair (minisign format) and prints the fingerprint
//! admins pin on the kernel command line. Never overwrites a secret key.

use crate::cmd::{Exit, Global};
use crate::signing::keys::{self, KeyFiles, PassphraseSource, ENV_PASSPHRASE};
use anyhow::Context;
use idhal_manifest::paths;
use std::path::PathBuf;

/// Create the manifest signing key pair: DIR/idhal.key (secret, 0600) and DIR/idhal.pub.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Create the manifest signing key pair: DIR/idhal.key (secret, mode 0600) and \
        DIR/idhal.pub (public). Both are minisign files, usable by stock minisign too.\n\n\
        Prints the key id and the fingerprint to put on node kernel command lines as \
        idhal.pin=FINGERPRINT (for images that do not have idhal.pub baked in).\n\n\
        The secret key is encrypted with a passphrase taken from --passphrase-file, else from \
        $IDHAL_KEY_PASSPHRASE, else asked on the terminal. --no-passphrase writes it unencrypted \
        (like minisign -W), for CI systems that protect the key file itself.\n\n\
        An existing DIR/idhal.key is never overwritten, and there is no --force: move it away \
        yourself if you really mean to replace the key (every node pinned to it will refuse \
        manifests signed with the new one).",
    after_help = "Examples:\n  \
        idhal keygen --dir /etc/idhal/keys\n  \
        idhal keygen --dir keys --passphrase-file /run/secrets/idhal-pass\n  \
        IDHAL_KEY_PASSPHRASE=... idhal keygen --dir keys\n  \
        idhal keygen --dir keys --no-passphrase"
)]
pub struct Args {
    /// Directory to write idhal.key and idhal.pub into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Read the passphrase from the first line of FILE.
    #[arg(long, value_name = "FILE", conflicts_with = "no_passphrase")]
    pub passphrase_file: Option<PathBuf>,
    /// Store the secret key unencrypted (like `minisign -W`).
    #[arg(long)]
    pub no_passphrase: bool,
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    let files = KeyFiles::in_dir(&args.dir);
    files.refuse_existing()?;
    let source = PassphraseSource::resolve(args.passphrase_file.as_deref(), args.no_passphrase);
    if args.no_passphrase && std::env::var_os(ENV_PASSPHRASE).is_some() {
        eprintln!("idhal: note: {ENV_PASSPHRASE} is set but --no-passphrase was given: the key is NOT encrypted");
    }
    let pair = keys::generate(&source).context("cannot generate the key pair")?;
    let files = keys::write_pair(&args.dir, &pair)?;

    println!(
        "secret key:  {} ({})",
        files.secret.display(),
        if pair.encrypted {
            "encrypted"
        } else {
            "NOT encrypted"
        }
    );
    println!("public key:  {}", files.public.display());
    println!("key id:      {}", pair.public.id());
    println!("fingerprint: {}", pair.public.fingerprint());
    println!(
        "Bake {} into node images as /etc/idhal/server.pub, or boot nodes with idhal.pin={}",
        paths::PUBLIC_KEY,
        pair.public.fingerprint()
    );
    Ok(Exit::Ok)
}
