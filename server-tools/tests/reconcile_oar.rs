//! `idhal reconcile` against a real OAR 2.5 (PostgreSQL + Almighty, its own, on 127.0.0.1)
//! where the 1,000-node storm caught it wrong: a deferred connect answered after the status was
//! written, the listing of hundreds of nodes, and a disconnect that ran after the status was
//! written. Each test has its own `[names] domain`: a run acts only on its domain's nodes.

mod hook_support;

use hook_support::*;
use idhal_test_support::oar::logged_calls;
use idhal_test_support::ok;
use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

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

/// Connects then disconnects `cn`'s session started at `since`: OAR holds its node Absent
/// with that same start, as after a disconnect hook that ran after the status was written.
fn connected_then_gone(cfg: &Path, state: &Path, cn: &str, ip: &str, since: u64) {
    ok(hook(cfg, state, "client-connect", &node_env(cn, ip, since)));
    ok(hook(
        cfg,
        state,
        "client-disconnect",
        &node_env(cn, ip, since),
    ));
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
    // --dry-run says what the run will do, grace included, and changes nothing.
    let o = reconcile_cmd(&cfg, &state, &status)
        .arg("--dry-run")
        .output()
        .unwrap();
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("would leave up vnode-21-1.grace.test"),
        "{text}"
    );
    assert!(
        text.contains("would take down vnode-21-2.grace.test"),
        "{text}"
    );
    assert!(!text.contains("would take down vnode-21-1"), "{text}");
    assert_eq!(state_of(oar, "vnode-21-2.grace.test"), "Alive");
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

/// `[hook] down_grace_secs`: a node gone from the status (on its way to another server, or
/// left by a sync disconnect hook within its grace) is taken down only once it has been gone
/// that long, counted from the first run that saw it gone; one that is back meanwhile is not.
#[test]
fn a_node_gone_from_the_status_goes_down_only_after_the_down_grace() {
    let Some(oar) = oar() else { return };
    let extra = "[hook]\nmode = \"sync\"\ndown_grace_secs = 3\n";
    let (d, cfg, state) = setup(&config(&oar.config_section(), "gonegrace.test", extra));
    let since = now() - GRACE - 100;
    let (gone, back) = (
        ("client2301", "10.134.23.1", since),
        ("client2302", "10.134.23.2", since),
    );
    for (cn, ip, since) in [gone, back] {
        ok(hook(
            &cfg,
            &state,
            "client-connect",
            &node_env(cn, ip, since),
        ));
        // The sync hook leaves the take-down to reconcile within the grace.
        let o = hook(&cfg, &state, "client-disconnect", &node_env(cn, ip, since));
        assert!(
            out(&o).contains("left up for [hook] down_grace_secs"),
            "{}",
            out(&o)
        );
    }
    let status = d.path().join("status.log");
    write_status(&status, now(), &[]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    for h in ["vnode-23-1", "vnode-23-2"] {
        assert!(
            text.contains(&format!(
                "{h}.gonegrace.test: gone from the status for 0 s, left up within [hook] down_grace_secs (3 s)"
            )),
            "{text}"
        );
        assert_eq!(state_of(oar, &format!("{h}.gonegrace.test")), "Alive");
    }
    assert!(text.contains("2 gone within their down grace"), "{text}");
    // 2302 comes back (a newer session, listed); 2301 stays gone and goes after the grace.
    let newer = since + 50;
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env(back.0, back.1, newer),
    ));
    let t = Instant::now();
    let text = loop {
        write_status(&status, now(), &[(back.0, back.1, newer)]);
        let o = reconcile(&cfg, &state, &status);
        let text = out(&o);
        assert!(o.status.success(), "{text}");
        if text.contains("1 taken down") || t.elapsed().as_secs() > 60 {
            break text;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    assert!(
        text.contains("took down vnode-23-1.gonegrace.test"),
        "{text}"
    );
    assert!(
        t.elapsed().as_secs() >= 2,
        "taken down before its grace: {text}"
    );
    assert_eq!(state_of(oar, "vnode-23-1.gonegrace.test"), "Absent");
    assert_eq!(state_of(oar, "vnode-23-2.gonegrace.test"), "Alive");
    // The record keeps nothing of nodes taken down or back.
    let record = std::fs::read_to_string(state.join("reconcile-gone")).unwrap();
    assert!(!record.contains("vnode-23"), "{record}");
}

/// `--gone-server NAME`: another server died for good; any server takes down the nodes it had
/// registered that no server registered again, and only those.
#[test]
fn the_nodes_of_a_gone_server_are_taken_down_by_another_one() {
    let Some(oar) = oar() else { return };
    let domain = "goneserver.test";
    let named = |name: &str| format!("[openvpn]\nname = \"{name}\"\n");
    let (d, here, state) = setup(&config(&oar.config_section(), domain, &named("vpnx")));
    let gone = d.path().join("gone.toml");
    std::fs::write(
        &gone,
        config(&oar.config_section(), domain, &named("vpngone")),
    )
    .unwrap();
    let since = now() - GRACE - 100;
    // 2401 stayed with the gone server; 2402 moved here since (a newer session); 2403 is a
    // session of the gone server that started just now (within the take-down grace).
    ok(hook(
        &gone,
        &state,
        "client-connect",
        &node_env("client2401", "10.134.24.1", since),
    ));
    ok(hook(
        &gone,
        &state,
        "client-connect",
        &node_env("client2402", "10.134.24.2", since),
    ));
    ok(hook(
        &here,
        &state,
        "client-connect",
        &node_env("client2402", "10.134.24.2", since + 60),
    ));
    ok(hook(
        &gone,
        &state,
        "client-connect",
        &node_env("client2403", "10.134.24.3", now()),
    ));
    let run = |args: &[&str]| {
        Command::new(IDHAL)
            .arg("--config")
            .arg(&here)
            .arg("--state-dir")
            .arg(&state)
            .arg("reconcile")
            .args(args)
            .output()
            .unwrap()
    };
    let o = run(&["--gone-server", "vpngone", "--dry-run"]);
    assert!(
        out(&o).contains("would take down vnode-24-1"),
        "{}",
        out(&o)
    );
    assert_eq!(state_of(oar, &format!("vnode-24-1.{domain}")), "Alive");
    let o = run(&["--gone-server", "vpngone"]);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains(&format!("took down vnode-24-1.{domain}")),
        "{text}"
    );
    assert!(
        text.contains("(vpngone): 0 connected, 0 registered again, 1 taken down"),
        "{text}"
    );
    assert_eq!(state_of(oar, &format!("vnode-24-1.{domain}")), "Absent");
    assert_eq!(state_of(oar, &format!("vnode-24-2.{domain}")), "Alive");
    assert_eq!(state_of(oar, &format!("vnode-24-3.{domain}")), "Alive");
    // This server is not gone: refused, nothing changed.
    let o = run(&["--gone-server", "vpnx"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(out(&o).contains("is this server"), "{}", out(&o));
    let o = run(&["--gone-server", "../x"]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    // With [bird.servers], a name that is not there (a typo) is refused.
    let listed = d.path().join("listed.toml");
    std::fs::write(
        &listed,
        config(
            &oar.config_section(),
            domain,
            &format!(
                "{}[bird.servers]\nvpnx = \"172.16.0.11\"\nvpngone = \"172.16.0.12\"\n",
                named("vpnx")
            ),
        ),
    )
    .unwrap();
    let o = Command::new(IDHAL)
        .arg("--config")
        .arg(&listed)
        .arg("--state-dir")
        .arg(&state)
        .args(["reconcile", "--gone-server", "vpngonne"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        out(&o).contains("--gone-server vpngonne is not in [bird.servers] (vpngone, vpnx)"),
        "{}",
        out(&o)
    );
}

#[test]
fn the_listing_asks_oar_for_idhals_resources_only() {
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    let (section, log) = oar.logged_config_section(d.path());
    let (d, cfg, state) = setup(&config(&section, "list.test", ""));
    // A site's own resource, in the same domain, that idhal does not manage.
    let added = Command::new(format!("{OARDIR}/oarnodesetting"))
        .envs(oar.env())
        .args(["-a", "-h", "plain-1.list.test"])
        .output()
        .unwrap();
    assert!(added.status.success(), "{}", out(&added));
    let since = now() - 1000;
    ok(hook(
        &cfg,
        &state,
        "client-connect",
        &node_env("client2201", "10.134.22.1", since),
    ));
    std::fs::write(&log, "").unwrap();
    let status = d.path().join("status.log");
    write_status(&status, now(), &[("client2201", "10.134.22.1", since)]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("1 connected, 0 registered again, 0 taken down, 0 failures"),
        "{text}"
    );
    assert!(!text.contains("plain-1"), "{text}");
    let listings: Vec<String> = logged_calls(&log)
        .into_iter()
        .filter(|c| c.starts_with("oarnodes"))
        .collect();
    assert_eq!(
        listings,
        ["oarnodes -J --sql idhalcn IS NOT NULL"],
        "reconcile must list only idhal's resources"
    );
    // What OAR answers to that filter: idhal's node, not the site's.
    let listed: Vec<String> = oar
        .resources(Some("idhalcn IS NOT NULL"))
        .iter()
        .map(|r| r["network_address"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        listed.contains(&"vnode-22-1.list.test".to_string()),
        "{listed:?}"
    );
    assert!(
        !listed.contains(&"plain-1.list.test".to_string()),
        "{listed:?}"
    );
    assert_eq!(state_of(oar, "plain-1.list.test"), "Alive");
}

#[test]
fn the_listing_has_its_own_limit() {
    use std::os::unix::fs::PermissionsExt as _;
    let Some(oar) = oar() else { return };
    let d = tempfile::tempdir().unwrap();
    // OAR slow to list (hundreds of nodes under load): 2 s, then the real answer. Other
    // calls go straight through.
    let wrapper = d.path().join("oarnodes");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh
case \"$*\" in *\"idhalcn IS NOT NULL\"*) sleep 2;; esac\nexec {OARDIR}/oarnodes \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let section = oar.config_section().replace(
        &format!("\"{OARDIR}/oarnodes\""),
        &format!("\"{}\"", wrapper.display()),
    );
    let status = d.path().join("status.log");
    write_status(&status, now(), &[]);

    // Longer than a hook's command_timeout_ms, within listing_timeout_ms: the run goes on.
    let (_r, roomy, state) = setup(
        &config(&section, "slow-list.test", "listing_timeout_ms = 60000")
            .replace("command_timeout_ms = 60000", "command_timeout_ms = 1000"),
    );
    let t = Instant::now();
    let o = reconcile(&roomy, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("0 connected, 0 registered again, 0 taken down, 0 failures"),
        "{text}"
    );
    eprintln!(
        "slow listing (2 s): reconcile done in {:.2} s",
        t.elapsed().as_secs_f64()
    );

    // Beyond listing_timeout_ms: killed, the run fails and names the limit.
    let (_t, tight, state) = setup(&config(
        &section,
        "slow-list.test",
        "listing_timeout_ms = 1000",
    ));
    let t = Instant::now();
    let o = reconcile(&tight, &state, &status);
    let text = out(&o);
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains(
            "OAR: listing idhal's nodes: `oarnodes -J --sql \"idhalcn IS NOT NULL\"` did not finish within [reconcile] listing_timeout_ms (1000 ms) and was killed"
        ),
        "{text}"
    );
    eprintln!(
        "slow listing (2 s), limit 1 s: reconcile failed after {:.2} s",
        t.elapsed().as_secs_f64()
    );
}

#[test]
fn a_session_whose_disconnect_ran_waits_for_a_newer_status() {
    let Some(oar) = oar() else { return };
    let (d, cfg, state) = setup(&config(
        &oar.config_section(),
        "held.test",
        "status_wait_secs = 1",
    ));
    let since = now() - 1000;
    let node = ("client2301", "10.134.23.1", since);
    let host = "vnode-23-1.held.test";
    connected_then_gone(&cfg, &state, node.0, node.1, since);
    assert_eq!(state_of(oar, host), "Absent");

    // The status was written before reconcile listed OAR, and OpenVPN does not rewrite it
    // within status_wait_secs: the node's own disconnect may have come after the write.
    let status = d.path().join("status.log");
    write_status(&status, now() - 1, &[node]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "{host}: OAR holds this very session down (its disconnect may have run after the status was written)"
        )),
        "{text}"
    );
    assert!(text.contains("no status written after"), "{text}");
    assert!(
        text.contains("0 registered again, 0 taken down, 0 failures, 1 left for a newer status"),
        "{text}"
    );
    assert_eq!(state_of(oar, host), "Absent");

    // A status written after the listing still lists it: the session is live (a connect
    // that half failed), and is registered again.
    write_status(&status, now() + 30, &[node]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("1 registered again, 0 taken down, 0 failures"),
        "{text}"
    );
    assert_eq!(state_of(oar, host), "Alive");
}

/// Reads a running reconcile's output (kept in `seen`) up to a line containing `needle`;
/// panics if the run ends first.
fn read_until(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
    seen: &mut String,
) {
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("reconcile ended without waiting:\n{seen}"))
            .unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(needle) {
            return;
        }
    }
}

#[test]
fn reconcile_rereads_the_status_file_until_openvpn_rewrites_it() {
    let Some(oar) = oar() else { return };
    let (d, cfg, state) = setup(&config(
        &oar.config_section(),
        "reread.test",
        "status_wait_secs = 120",
    ));
    let since = now() - 1000;
    let held = ("client2401", "10.134.24.1", since);
    let gone = ("client2402", "10.134.24.2", since);
    connected_then_gone(&cfg, &state, held.0, held.1, since);
    connected_then_gone(&cfg, &state, gone.0, gone.1, since);
    let status = d.path().join("status.log");
    write_status(&status, now() - 1, &[held, gone]);
    let mut child = reconcile_cmd(&cfg, &state, &status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    // The run says it waits; then OpenVPN "rewrites" the file: 2401 is still there, 2402 left.
    read_until(
        &mut lines,
        "the scheduler holds 2 listed sessions down (same node, same start): waiting up to 120 s",
        &mut seen,
    );
    write_status(&status, now() + 1, &[held]);
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let o = child.wait_with_output().unwrap();
    seen.push_str(&String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{seen}");
    assert!(
        seen.contains("1 registered again, 0 taken down, 0 failures"),
        "{seen}"
    );
    assert_eq!(state_of(oar, "vnode-24-1.reread.test"), "Alive");
    assert_eq!(state_of(oar, "vnode-24-2.reread.test"), "Absent");
}

#[test]
fn the_first_reconcile_on_a_new_oar_lists_nothing_and_changes_nothing() {
    // Its own OAR: the shared one has idhal's columns since the first connect. Without the
    // idhalcn column OAR cannot run the listing's clause; it answers `{}`, exit 0.
    if !Oar::available() {
        return;
    }
    let fresh = Oar::start();
    let d = tempfile::tempdir().unwrap();
    let (section, log) = fresh.logged_config_section(d.path());
    let (d, cfg, state) = setup(&config(&section, "new.test", ""));
    let status = d.path().join("status.log");
    write_status(&status, now(), &[]);
    let o = reconcile(&cfg, &state, &status);
    let text = out(&o);
    assert!(o.status.success(), "{text}");
    assert!(
        text.contains("0 connected, 0 registered again, 0 taken down, 0 failures"),
        "{text}"
    );
    // One listing, nothing else: no column created, no resource touched.
    assert_eq!(
        logged_calls(&log),
        ["oarnodes -J --sql idhalcn IS NOT NULL"]
    );
}

#[test]
fn a_status_file_broken_while_reconcile_waits_changes_nothing() {
    let Some(oar) = oar() else { return };
    let (d, cfg, state) = setup(&config(
        &oar.config_section(),
        "broken-wait.test",
        "status_wait_secs = 3\nmax_status_bytes = 100000",
    ));
    let since = now() - 1000;
    let held = ("client2501", "10.134.25.1", since);
    let host = "vnode-25-1.broken-wait.test";
    connected_then_gone(&cfg, &state, held.0, held.1, since);
    let status = d.path().join("status.log");
    write_status(&status, now() - 1, &[held]);
    let mut child = reconcile_cmd(&cfg, &state, &status)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    read_until(&mut lines, "waiting up to 3 s", &mut seen);
    // What a reader may meet while OpenVPN rewrites the file, then a file too large: each
    // read fails, none is acted on, and the run ends on the status it had.
    let tmp = status.with_extension("tmp");
    for bytes in [
        b"".to_vec(),
        b"TIME,x,1\nCLIENT_LIST,client2501".to_vec(),
        [0xff, 0xfe, 0, 1].to_vec(),
        format!(
            "{}{}",
            status_text(now() + 30, &[held]),
            "#".repeat(200_000)
        )
        .into_bytes(),
    ] {
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, &status).unwrap();
    }
    for line in lines {
        seen.push_str(&line.unwrap());
        seen.push('\n');
    }
    let o = child.wait_with_output().unwrap();
    seen.push_str(&String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{seen}");
    assert!(seen.contains("no status written after"), "{seen}");
    assert!(
        seen.contains("0 registered again, 0 taken down, 0 failures, 1 left for a newer status"),
        "{seen}"
    );
    eprintln!("{seen}");
    assert_eq!(state_of(oar, host), "Absent");
}

/// What the listing costs: `cargo test -p idhal-server-tools --test reconcile_oar --
/// --ignored --nocapture bench_listing`. Its own OAR with 150 of idhal's resources and 150
/// others; prints the time of `oarnodes -J` (every resource) and of reconcile's listing.
#[test]
#[ignore]
fn bench_listing() {
    if !Oar::available() {
        return;
    }
    let bench = Oar::start();
    let setting = |args: &[String]| {
        let o = Command::new(format!("{OARDIR}/oarnodesetting"))
            .envs(bench.env())
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", out(&o));
    };
    let o = Command::new(format!("{OARDIR}/oarproperty"))
        .envs(bench.env())
        .args(["-a", "idhalcn", "-c"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", out(&o));
    let t = Instant::now();
    for i in 0..150 {
        setting(&["-a".into(), "-h".into(), format!("site-{i}.bench.test")]);
        setting(&[
            "-a".into(),
            "-h".into(),
            format!("vnode-30-{i}.bench.test"),
            "-p".into(),
            format!("idhalcn=client30{i}"),
        ]);
    }
    eprintln!(
        "300 resources created in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for (what, sql) in [("all", None), ("idhal's", Some("idhalcn IS NOT NULL"))] {
        let mut took = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let n = bench.resources(sql).len();
            took.push(t.elapsed().as_secs_f64());
            assert_eq!(n, if sql.is_some() { 150 } else { 300 });
        }
        took.sort_by(f64::total_cmp);
        eprintln!(
            "oarnodes -J, {what} resources: median {:.2} s, min {:.2} s, max {:.2} s (5 runs)",
            took[2], took[0], took[4]
        );
    }
}
