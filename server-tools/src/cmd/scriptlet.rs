//! `idhal scriptlet ssh-key`: turns the scheduler's SSH public key into a scriptlet for the signed
//! manifest, so the key reaches root's authorized_keys only through the signed channel.

use crate::cmd::{Exit, Global};
use crate::signing::ssh_key::{parse_public_key, render};
use anyhow::Context as _;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
#[command(about = "Generate scriptlets for the signed manifest")]
pub struct Args {
    #[command(subcommand)]
    pub command: ScriptletCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum ScriptletCommand {
    /// Install the scheduler's SSH public key for root on every node.
    #[command(
        long_about = "Write NNN-NAME.sh, a scriptlet that adds the scheduler's SSH public \
        key (OAR: /var/lib/oar/.ssh/id_rsa.pub or the key oarsh uses) to /root/.ssh/authorized_keys \
        on every node, once, at every boot (frequency=boot), leaving other keys alone.\n\n\
        Nodes trust it because it arrives in the signed manifest: nothing is pushed over SSH \
        when the tunnel comes up, and nobody without the signing key can add a key.\n\n\
        Example:\n  idhal scriptlet ssh-key --key /var/lib/oar/.ssh/id_rsa.pub --out scriptlets/\n  \
        idhal sign --key keys/idhal.key --out /srv/idhal scriptlets/\n\n\
        The key file must hold exactly one public key line (`TYPE BASE64 [comment]`); a private \
        key, options (`from=...,command=...`) or odd characters are refused."
    )]
    SshKey {
        /// The public key file (one line).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Directory of scriptlets to write into (the one `idhal sign` reads).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// File name: NNN-NAME.sh; the number orders it among the other scriptlets.
        #[arg(long, default_value = "050-scheduler-ssh-key.sh")]
        name: String,
    },
}

pub fn run(args: Args, _global: &Global) -> anyhow::Result<Exit> {
    match args.command {
        ScriptletCommand::SshKey { key, out, name } => {
            let valid_name = name.ends_with(".sh")
                && name.len() > 7
                && name.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                && name.as_bytes()[3] == b'-'
                && name[4..name.len() - 3]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            anyhow::ensure!(
                valid_name && !name.contains(".."),
                "--name {name:?} must look like NNN-name.sh (digits, dash, A-Z a-z 0-9 - _ .)"
            );
            let text = std::fs::read_to_string(&key)
                .with_context(|| format!("reading {}", key.display()))?;
            let line =
                parse_public_key(&text).with_context(|| format!("refusing {}", key.display()))?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let path = out.join(&name);
            let tmp = out.join(format!(".{name}.tmp{}", std::process::id()));
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
            f.write_all(render(&line).as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
            eprintln!(
                "idhal scriptlet: wrote {} ({}); sign the directory with `idhal sign` to publish it",
                path.display(),
                line.split(' ').next().unwrap_or_default()
            );
            Ok(Exit::Ok)
        }
    }
}
