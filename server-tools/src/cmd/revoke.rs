//! `idhal revoke NODE`: marks the node and every certificate it was given revoked, re-signs the project's CRL
//! at once, and drops its live session from every configured OpenVPN management interface
//! (not at the next renegotiation).

use crate::ca::db::Open;
use crate::ca::revoke::{self, Marked};
use crate::ca::state;
use crate::cmd::{load_config, Exit, Global};
use crate::names::node_id;
use crate::openvpn::management::{kill_everywhere, password_file};
use idhal_manifest::time::{now, rfc3339};

#[derive(Debug, clap::Args)]
#[command(
    about = "Revoke a node: CRL re-signed now, session dropped now",
    long_about = "Revokes NODE's certificates: the node and every certificate it was given \
        (a renewal leaves the earlier ones valid until they expire) are marked revoked, the \
        project's CRL is re-signed at once (OpenVPN's crl-verify re-reads it on the next handshake; other servers \
        publish it from the state database; the connect hook refuses the node from the \
        database's mark even before that), and its \
        session is killed through each OpenVPN management interface in [openvpn] management \
        (with the password in [openvpn] management_password_file, default \
        STATE/projects/PROJECT/management.pw), so a connected node is dropped within seconds \
        and cannot come back. The node stays in \
        `idhal nodes` (revoked) and its id and address are never reused.\n\n\
        Exit codes: 0 revoked (and dropped, or not connected); 1 error (nothing changed, or \
        see the message); 2 usage or config error; 4 revoked, but a management interface did \
        not answer: the node may stay connected until its next renegotiation.",
    after_help = "Example: idhal revoke client317"
)]
pub struct Args {
    /// The node id (`idhal nodes` lists them).
    pub node: String,
}

pub fn run(args: Args, global: &Global) -> anyhow::Result<Exit> {
    let cfg = match load_config(global) {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let id = node_id(&args.node)?;
    let mut db = state::open(&cfg, &global.state_dir, Open::Existing)?;
    let now = now();
    let (node, marked) = revoke::mark_node(db.as_mut(), &id, now)?;
    match marked {
        Marked::Already(at) => println!(
            "{id}: already revoked at {}; re-checking CRL and sessions",
            rfc3339(at)
        ),
        Marked::Now => println!(
            "{id}: revoked (project {}, every certificate it was given; the current one is serial {})",
            node.project, node.cert_serial
        ),
    }
    let cut = revoke::cut_off(db.as_mut(), &global.state_dir, &cfg, &node, now)?;
    println!(
        "{id}: CRL {} re-signed (valid until {})",
        cut.crl.display(),
        rfc3339(cut.crl_until)
    );

    let openvpn = cfg.openvpn_for(&node.project);
    let password = password_file(&cfg, &global.state_dir, &node.project);
    let mut unreachable = 0;
    let timeout = cfg.limits.command_timeout();
    for (addr, answer) in kill_everywhere(&openvpn.management, password.as_deref(), timeout, &id) {
        match answer {
            Ok(line) if line.starts_with("SUCCESS:") => {
                println!("{id}: dropped by the OpenVPN server at {addr} ({line})")
            }
            Ok(line) => println!("{id}: not connected to the OpenVPN server at {addr} ({line})"),
            Err(e) => {
                unreachable += 1;
                eprintln!("idhal revoke: warning: {}: {id} may stay connected there until its next renegotiation", anyhow::Error::new(e));
            }
        }
    }
    Ok(if unreachable > 0 {
        Exit::NotDropped
    } else {
        Exit::Ok
    })
}
