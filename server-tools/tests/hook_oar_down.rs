//! OAR failures: the hook must return within its time limits with a clear error (Almighty
//! stopped, database hanging, database stopped), and `idhal reconcile` must repair the missed
//! events once OAR is back. Its own OAR instance: this binary stops and starts it.

mod hook_support;

use hook_support::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn config(oar: &Oar, limits: &str, extra: &str, env_override: Option<&Path>) -> String {
    let mut section = oar.config_section();
    if let Some(conf) = env_override {
        section = section.replace(&oar.conf.display().to_string(), &conf.display().to_string());
    }
    format!("[names]\ndomain = \"idhal.test\"\n[limits]\n{limits}\n{extra}\n{section}")
}

const TIGHT: &str = "hook_budget_ms = 5000\ncommand_timeout_ms = 2000\nstate_confirm_ms = 1500\nlock_wait_ms = 5000";
const ROOMY: &str = "hook_budget_ms = 60000\ncommand_timeout_ms = 30000\nstate_confirm_ms = 40000\nlock_wait_ms = 60000";

fn state_of(oar: &Oar, host: &str) -> Option<String> {
    oar.host(host)
        .first()
        .map(|r| r["state"].as_str().unwrap().to_owned())
}

#[test]
fn oar_down_fails_fast_and_reconcile_repairs() {
    if !Oar::available() {
        return;
    }
    let oar = Oar::start();
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let write = |name: &str, text: String| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let tight = write("tight.toml", config(&oar, TIGHT, "", None));
    let admit = write(
        "admit.toml",
        config(&oar, TIGHT, "[hook]\non_failure = \"admit\"", None),
    );
    let roomy = write("roomy.toml", config(&oar, ROOMY, "", None));
    let t0 = now() - 500;
    let a = |since| node_env("client601", "10.134.6.1", since);

    let o = hook(&tight, &state, "client-connect", &a(t0));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = hook(&tight, &state, "client-disconnect", &a(t0));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        state_of(&oar, "vnode-6-1.idhal.test").as_deref(),
        Some("Absent")
    );

    // 1. Almighty down: oarnodesetting -s exits 0 but nothing happens; the read-back says so.
    oar.stop_almighty();
    let t = Instant::now();
    let o = hook(&tight, &state, "client-connect", &a(t0 + 10));
    let took = t.elapsed();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("did not reach state Alive") && e.contains("Almighty"),
        "{e}"
    );
    // Generous: the bound proves the hook ended (unbounded, it would hang), not its speed;
    // the figure is printed below.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!(
        "Almighty down: hook refused after {:.2} s",
        took.as_secs_f64()
    );
    let o = hook(&admit, &state, "client-connect", &a(t0 + 10));
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stderr(&o).contains("admitting anyway"), "{}", stderr(&o));

    // 2. Database hanging (accepts, never answers): each OAR command is killed at its timeout.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hang_conf = d.path().join("oar-hang.conf");
    let conf = std::fs::read_to_string(&oar.conf).unwrap();
    let conf: String = conf
        .lines()
        .map(|l| {
            if l.starts_with("DB_PORT=") {
                format!("DB_PORT=\"{}\"\n", hang.local_addr().unwrap().port())
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&hang_conf, conf).unwrap();
    let hung = write("hung.toml", config(&oar, TIGHT, "", Some(&hang_conf)));
    let t = Instant::now();
    let o = hook(
        &hung,
        &state,
        "client-connect",
        &node_env("client602", "10.134.6.2", t0),
    );
    let took = t.elapsed();
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("did not finish within 2s and was killed"), "{e}");
    // Generous: the bound proves the hook ended (unbounded, it would hang), not its speed;
    // the figure is printed below.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    eprintln!(
        "database hanging: hook refused after {:.2} s",
        took.as_secs_f64()
    );
    drop(hang);

    // 3. Database stopped: OAR's tools fail at once; the error names the command.
    oar.stop_postgres();
    let o = hook(
        &tight,
        &state,
        "client-connect",
        &node_env("client603", "10.134.6.3", t0),
    );
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(
        e.contains("`oarnodes -J --sql network_address='vnode-6-3.idhal.test'` failed"),
        "{e}"
    );

    // OAR back: reconcile registers what was missed.
    oar.start_postgres();
    oar.start_almighty();
    let text = move |written: u64| {
        format!(
            "TITLE,OpenVPN\nTIME,x,{}\nHEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n\
             CLIENT_LIST,client601,127.0.0.1:1,10.134.6.1,,1,1,x,{},UNDEF,1,0,AES-256-GCM\n\
             CLIENT_LIST,client602,127.0.0.1:2,10.134.6.2,,1,1,x,{t0},UNDEF,2,0,AES-256-GCM\n\
             CLIENT_LIST,client603,127.0.0.1:3,10.134.6.3,,1,1,x,{t0},UNDEF,3,0,AES-256-GCM\nEND\n",
            written,
            t0 + 10
        )
    };
    let status = write("status.log", text(now()));
    // client601's half-failed connect left OAR holding its session down: reconcile registers
    // it again only from a status written after it listed OAR (else the session could have
    // ended since), so it waits for OpenVPN's next write, done here 3 s later.
    let rewrite = {
        let (status, text) = (status.clone(), text);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(3));
            let tmp = status.with_extension("new");
            std::fs::write(&tmp, text(now())).unwrap();
            std::fs::rename(&tmp, &status).unwrap();
        })
    };
    let t = Instant::now();
    let o = std::process::Command::new(IDHAL)
        .arg("--config")
        .arg(&roomy)
        .arg("--state-dir")
        .arg(&state)
        .args(["reconcile", "--status-file"])
        .arg(&status)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    rewrite.join().unwrap();
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(
        out.lines()
            .any(|l| l.contains("registered") && l.contains("client601")),
        "reconcile did not register client601 itself: {out}"
    );
    eprintln!(
        "reconcile after restart: {:.1} s\n{out}",
        t.elapsed().as_secs_f64()
    );
    for h in ["vnode-6-1", "vnode-6-2", "vnode-6-3"] {
        let r = oar.host(&format!("{h}.idhal.test"));
        assert_eq!(r.len(), 1, "{h}: {r:?}");
        assert_eq!(r[0]["state"], "Alive", "{h}");
    }
}
