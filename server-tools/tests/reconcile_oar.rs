//! `idhal reconcile` against a real OAR 2.5 (PostgreSQL + Almighty, its own, on 127.0.0.1)
//! where the 1,000-node storm caught it wrong: a deferred connect answered after the status was
//! written. Each test has its own `[names] domain`: a run acts only on its domain's nodes.

mod hook_support;

use hook_support::*;
use idhal_test_support::ok;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::OnceLock;

fn oar() -> Option<&'static Oar> {
    static OAR: OnceLock<Option<Oar>> = OnceLock::new();
    OAR.get_or_init(|| Oar::available().then(Oar::start))
        .as_ref()
}

/// `[limits] hook_budget_ms` in these tests: the take-down grace is 2 x 60 + 10 = 130 s.
const GRACE: u64 = 130;

fn config(oar_section: &str, domain: &str, extra: &str) -> String {
    format!(
        "[names]\ndomain = \"{domain}\"\npool = \"10.134.0.0/16\"\n\
         [limits]\nhook_budget_ms = 60000\ncommand_timeout_ms = 60000\nstate_confirm_ms = 30000\nlock_wait_ms = 60000\n\
         [reconcile]\nstatus_interval_secs = 10\n{extra}\n{oar_section}"
    )
}

/// A version-2 status file written at `written` listing (CN, virtual address, session start).
fn status_text(written: u64, rows: &[(&str, &str, u64)]) -> String {
    let mut s = format!(
        "TITLE,OpenVPN 2.6.14 x86_64-pc-linux-gnu\nTIME,2026-01-01 00:00:00,{written}\n\
         HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n"
    );
    for (i, (cn, vaddr, since)) in rows.iter().enumerate() {
        s.push_str(&format!(
            "CLIENT_LIST,{cn},127.0.0.1:40000,{vaddr},,100,200,2026-01-01 00:00:00,{since},UNDEF,{i},{i},AES-256-GCM\n"
        ));
    }
    s.push_str("HEADER,ROUTING_TABLE,Virtual Address,Common Name,Real Address,Last Ref,Last Ref (time_t)\nGLOBAL_STATS,Max bcast/mcast queue length,0\nEND\n");
    s
}

/// Writes the status file atomically, as a reader must never see half of it.
fn write_status(path: &Path, written: u64, rows: &[(&str, &str, u64)]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, status_text(written, rows)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn reconcile_cmd(cfg: &Path, state: &Path, status: &Path) -> Command {
    let mut cmd = Command::new(IDHAL);
    cmd.arg("--config")
        .arg(cfg)
        .arg("--state-dir")
        .arg(state)
        .arg("reconcile")
        .arg("--status-file")
        .arg(status);
    cmd
}

fn reconcile(cfg: &Path, state: &Path, status: &Path) -> Output {
    reconcile_cmd(cfg, state, status).output().unwrap()
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn state_of(oar: &Oar, host: &str) -> String {
    let r = oar.host(host);
    assert_eq!(r.len(), 1, "{host}: {r:?}");
    r[0]["state"].as_str().unwrap().to_owned()
}

#[test]
fn a_session_answered_after_the_status_was_written_stays_alive() {
    let Some(oar) = oar() else { return };
    let (d, cfg, state) = setup(&config(&oar.config_section(), "grace.test", ""));
    let written = now();
    // 2101 started 5 s before the status was written, its deferred connect was answered
    // after: not listed, still connected. 2102 started before the grace: it would be listed.
    let recent = ("client2101", "10.134.21.1", written - 5);
    let old = ("client2102", "10.134.21.2", written - GRACE - 1);
    for (cn, ip, since) in [recent, old] {
        ok(hook(
            &cfg,
            &state,
            "client-connect",
            &node_env(cn, ip, since),
        ));
    }
    let status = d.path().join("status.log");
    write_status(&status, written, &[]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("left up vnode-21-1.grace.test"), "{text}");
    assert!(
        text.contains("0 registered again, 1 taken down, 0 failures"),
        "{text}"
    );
    assert_eq!(state_of(oar, "vnode-21-1.grace.test"), "Alive");
    assert_eq!(state_of(oar, "vnode-21-2.grace.test"), "Absent");

    // A node that really left within the grace goes at a later run.
    write_status(&status, written + GRACE + 1, &[]);
    let o = reconcile(&cfg, &state, &status);
    assert!(out(&o).contains("1 taken down, 0 failures"), "{}", out(&o));
    assert_eq!(state_of(oar, "vnode-21-1.grace.test"), "Absent");
}
