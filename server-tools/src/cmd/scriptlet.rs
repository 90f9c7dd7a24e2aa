//! `idhal scriptlet ssh-key`: turns the scheduler's SSH public key into a scriptlet for the signed
//! manifest, so the key reaches root's authorized_keys only through the signed channel.

use crate::cmd::{Exit, Global};
use crate::signing::ssh_key::write_scriptlet;
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
            let written = write_scriptlet(&key, &out, &name)?;
            eprintln!(
                "idhal scriptlet: wrote {} ({}); sign the directory with `idhal sign` to publish it",
                written.path.display(),
                written.key_type
            );
            Ok(Exit::Ok)
        }
    }
}
