//! `idhal sign`: signs a directory of `*.sh` scriptlets into a manifest and publishes it into
//! PUBDIR (`signing::sign`), then reports what it wrote.

use crate::cmd::{Exit, Global};
use crate::signing::sign::{sign_and_publish, Limits, Request};
use anyhow::bail;
use idhal_manifest::time::{parse_duration, rfc3339};
use std::path::PathBuf;

/// Sign a directory of scriptlets and publish the manifest into PUBDIR.
#[derive(Debug, clap::Args)]
#[command(
    long_about = "Sign every *.sh file in SCRIPTLETDIR into one manifest and publish it into \
        PUBDIR, ready to be served by `idhal serve` or any static web server.\n\n\
        Scriptlets run in file-name order; the id is the file name without .sh (e.g. \
        000-setup-tunnel.sh -> 000-setup-tunnel). A header line `# idhal: frequency=once|boot|always` \
        in the first 10 lines sets when it runs (default once: once per node, ever). Hidden files \
        are ignored; other files are skipped with a warning; a symlinked *.sh is refused (it could \
        publish any file the signer can read).\n\n\
        The serial is one more than the one PUBDIR currently holds (after checking that signature \
        with this key; a PUBDIR signed by another key is refused). --serial N must be higher than \
        the current one: nodes refuse any serial lower than one they accepted (rollback protection).\n\n\
        The key is --key FILE, else the key file's text in $IDHAL_SIGNING_KEY (for CI secrets). An \
        encrypted key's passphrase comes from --passphrase-file, else $IDHAL_KEY_PASSPHRASE, else a \
        terminal prompt. Keys from `minisign -G` work too.\n\n\
        PUBDIR layout: idhal.pub, manifest + manifest.minisig (latest; check with \
        `minisign -Vm PUBDIR/manifest -p idhal.pub`), manifests/<serial> + manifests/<serial>.minisig \
        (immutable; the newest 10 are kept). Each file is replaced atomically, the versioned pair \
        first and manifest.minisig last, so agents (which fetch manifest.minisig, then the \
        manifests/<serial> it names) never see a mismatched pair. A lock file serializes \
        concurrent signers.",
    after_help = "Examples:\n  \
        idhal sign --key keys/idhal.key --out /srv/idhal scriptlets/\n  \
        idhal sign --key keys/idhal.key --out /srv/idhal --expires 7d \\\n      \
        --param enroll-url=http://10.0.2.100:8080/enroll scriptlets/\n  \
        export IDHAL_SIGNING_KEY=\"$(cat idhal.key)\" IDHAL_KEY_PASSPHRASE=...   # CI secrets\n  \
        idhal sign --out /srv/idhal scriptlets/\n\n\
        Scriptlet header example (000-setup-tunnel.sh):\n  \
        #!/bin/sh\n  \
        # idhal: frequency=boot\n  \
        ..."
)]
pub struct Args {
    /// Secret key file (minisign format). Default: the key text in $IDHAL_SIGNING_KEY.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Read the key's passphrase from the first line of FILE (else $IDHAL_KEY_PASSPHRASE, else a prompt).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Publication directory (created if missing).
    #[arg(long, value_name = "PUBDIR")]
    pub out: PathBuf,
    /// Serial to sign; must be higher than PUBDIR's current one. Default: current + 1.
    #[arg(long, value_name = "N")]
    pub serial: Option<u64>,
    /// How long the manifest stays valid (s, m, h, d, w). Nodes refuse it afterwards: re-sign
    /// regularly (e.g. from a weekly CI job).
    #[arg(long, value_name = "DURATION", default_value = "30d")]
    pub expires: String,
    /// A signed parameter scriptlets receive as $IDHAL_PARAM_<NAME> (repeatable).
    #[arg(long = "param", value_name = "NAME=VALUE")]
    pub params: Vec<String>,
    /// Largest manifest to sign, in bytes (suffixes KiB, MiB accepted). Keep it at or below the
    /// agents' cap (default 4 MiB) or they will refuse to download it.
    #[arg(long, value_name = "BYTES", default_value = "4MiB", value_parser = parse_size)]
    pub max_size: usize,
    /// Directory of *.sh scriptlets.
    #[arg(value_name = "SCRIPTLETDIR")]
    pub scriptlets: PathBuf,
}

fn parse_size(s: &str) -> Result<usize, String> {
    let bad = || format!("invalid size {s:?}: use bytes, or a number with KiB or MiB (e.g. 4MiB)");
    let (num, mult) = if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    let n: usize = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&n| n > 0).ok_or_else(bad)
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    let limits = Limits {
        max_manifest: args.max_size,
        ..Limits::default()
    };
    let lifetime = parse_duration(&args.expires).map_err(|e| anyhow::anyhow!("--expires: {e}"))?;
    if lifetime == 0 {
        bail!("--expires 0 would publish an already expired manifest");
    }
    let done = sign_and_publish(&Request {
        scriptlets: &args.scriptlets,
        out: &args.out,
        key: args.key.as_deref(),
        passphrase_file: args.passphrase_file.as_deref(),
        serial: args.serial,
        lifetime,
        params: &args.params,
        limits,
    })?;
    println!(
        "signed serial {} with key {}, expires {} ({} from now)",
        done.serial,
        done.key_id,
        rfc3339(done.expires),
        args.expires
    );
    for (name, value) in &done.params {
        println!("param {name}={value}");
    }
    println!("{} scriptlets:", done.sources.len());
    for s in &done.sources {
        println!(
            "  {:<40} {:<6} {} bytes",
            s.id.as_str(),
            s.frequency.as_str(),
            s.body.len()
        );
    }
    println!("manifest: {} bytes; wrote:", done.manifest_len);
    for p in &done.written {
        println!("  {}", p.display());
    }
    for p in &done.pruned {
        println!("  pruned {}", p.display());
    }
    Ok(Exit::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert_eq!(parse_size("0"), Err(bad_size("0")));
        assert_eq!(parse_size("4MB"), Err(bad_size("4MB")));
    }

    fn bad_size(s: &str) -> String {
        format!("invalid size {s:?}: use bytes, or a number with KiB or MiB (e.g. 4MiB)")
    }
}
