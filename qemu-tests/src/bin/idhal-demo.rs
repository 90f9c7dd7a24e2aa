//! `idhal-demo`: the README's main command (scripts/demo.sh runs it). Starts every server on
//! 127.0.0.1 (idhal serve with the project CA, OpenVPN, OAR on PostgreSQL, Knot), boots one
//! vnode under QEMU and shows, step by step, its way to Alive; then cleans up.
use anyhow::{bail, ensure, Result};
use clap::Parser;
use idhal_qemu_tests::cluster::Cluster;
use idhal_qemu_tests::enroll::{self, Joined};
use idhal_qemu_tests::{Env, EnvOptions, Limits, GUEST_HOST_IP, GUEST_SERVE_PORT, GUEST_VPN_PORT};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "idhal-demo",
    about = "Boot one idhal vnode under QEMU to Alive in a real OAR, showing every step",
    long_about = "Starts, on 127.0.0.1 with ephemeral ports: OAR 2.5 on PostgreSQL and Knot DNS \
(the test suite's own components), a project CA made with `idhal ca init`, `idhal serve` \
(signed manifests + enrollment), and the OpenVPN 2.6 server `idhal openvpn server-config` \
renders, whose hooks are `idhal hook`. Then boots one test vnode under QEMU TCG (user \
networking, restrict=on: the guest reaches only those two ports) with a one-time token over \
fw_cfg, and follows it: key pinned, manifest verified, enrolled, tunnel up, Alive in OAR with its \
properties, A/PTR records in Knot, a tampered manifest refused, power-off to Absent. Everything it \
started is stopped and removed at the end. Needs root (OpenVPN's tun device, PostgreSQL and OAR \
run as their users).",
    after_help = "Run by scripts/demo.sh after the build, in a session of its own that demo.sh stops \
(with everything in it) when the demo ends, however it ends. Binaries: IDHAL_BIN and \
IDHAL_AGENT_BIN, or built from the workspace. IDHAL_DEMO_FAIL_AT=N panics as step N starts, \
N:abort aborts there (the cleanup test's). See docs/qemu-tests.md."
)]
struct Cli {
    /// The node type its token gives it (OAR `cluster` and `idhaltype`).
    #[arg(long = "type", default_value = "vnode")]
    node_type: String,
}

/// Headings in bold on a terminal, plain in a log.
struct Out {
    tty: bool,
    started: Instant,
}

impl Out {
    fn step(&self, n: u32, text: &str) {
        if self.tty {
            println!("\n\x1b[1m==> {n}. {text}\x1b[0m");
        } else {
            println!("\n==> {n}. {text}");
        }
        fail_here(n);
    }
    fn ok(&self, text: &str) {
        let t = self.started.elapsed().as_secs_f64();
        if self.tty {
            println!("[{t:6.2}s] \x1b[32m✓\x1b[0m {text}");
        } else {
            println!("[{t:6.2}s] ✓ {text}");
        }
    }
    fn line(&self, text: &str) {
        println!("[{:6.2}s]   {text}", self.started.elapsed().as_secs_f64());
    }
}

/// `IDHAL_DEMO_FAIL_AT=N` panics as step N starts, `N:abort` aborts the process there (no
/// destructor runs): how the cleanup test (qemu-tests/tests/vm_demo_cleanup.rs) checks that a
/// failing demo leaves nothing behind, whatever way it fails.
const FAIL_AT: &str = "IDHAL_DEMO_FAIL_AT";

fn fail_here(step: u32) {
    let Ok(v) = std::env::var(FAIL_AT) else {
        return;
    };
    let (at, how) = v.split_once(':').unwrap_or((&v, "panic"));
    if at.trim().parse() != Ok(step) {
        return;
    }
    match how {
        "abort" => {
            eprintln!("idhal-demo: {FAIL_AT}={v}: aborting at step {step}");
            std::process::abort()
        }
        _ => panic!("idhal-demo: {FAIL_AT}={v}: failing at step {step} on purpose"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = Out {
        tty: std::io::stdout().is_terminal(),
        started: Instant::now(),
    };

    out.step(
        1,
        "the batch cluster: OAR 2.5 on PostgreSQL, Knot DNS (127.0.0.1)",
    );
    if !Cluster::available() {
        bail!("OAR, PostgreSQL or Knot is missing (scripts/setup-debian.sh installs them), or not root");
    }
    let cluster = Cluster::start();
    out.ok(&format!(
        "OAR: PostgreSQL 127.0.0.1:{}, Almighty 127.0.0.1:{}; Knot 127.0.0.1:{} serving {} and {}",
        cluster.oar.pg_port,
        cluster.oar.server_port,
        cluster.knot.port,
        idhal_qemu_tests::cluster::DOMAIN,
        idhal_qemu_tests::cluster::REVERSE_ZONE
    ));
    let result = demo(&cli, &out, &cluster);

    out.step(9, "clean up");
    // The env (QEMU, OpenVPN, idhal serve, its temp dir) is gone already; the cluster's files
    // go when this process exits.
    cluster.stop();
    out.ok("stopped Almighty, PostgreSQL and Knot; temp dirs removed");
    result
}

fn demo(cli: &Cli, out: &Out, cluster: &Cluster) -> Result<()> {
    out.step(
        2,
        "the project: signing key, CA, idhal serve, OpenVPN (127.0.0.1, ephemeral ports)",
    );
    let Some(mut env) = Env::with(
        "demo",
        EnvOptions {
            // One server, one node: the hook registers the node itself. The default
            // (`deferred`) hands it to `idhal hook worker`, which a deployment runs beside
            // OpenVPN (docs/hooks.md); without one, each connect would say so and do the same.
            server_toml: format!("{}\n[hook]\nmode = \"sync\"\n", cluster.server_toml()),
            pool: None,
            vpn: true,
            ..EnvOptions::default()
        },
    ) else {
        bail!("this host cannot run the vnode (see above)")
    };
    out.ok(&format!(
        "idhal keygen: project key {}",
        env.project.fingerprint
    ));
    out.ok(&format!(
        "idhal ca init: CA and enrollment key {} (pool 10.134.0.0/16)",
        env.ca.enroll_key
    ));
    out.ok(&format!(
        "idhal ca issue-server {} + openvpn server-config: OpenVPN on 127.0.0.1:{} (management :{}), hooks `idhal hook` (mode sync) → OAR + Knot",
        idhal_qemu_tests::ca::VPN_SERVER_NAME,
        env.vpn().port,
        env.vpn().management
    ));
    out.ok(&format!(
        "idhal serve: manifests + POST /enroll on 127.0.0.1:{}",
        env.serve.port
    ));
    out.line(&format!(
        "the guest sees them as http://{GUEST_HOST_IP}:{GUEST_SERVE_PORT}/ and {GUEST_HOST_IP}:{GUEST_VPN_PORT} (user-net guestfwd, restrict=on)"
    ));

    out.step(3, "a signed manifest and a one-time token");
    env.project.scriptlet("000-enroll", enroll::SCRIPTLET);
    let serial = env.project.sign(&[]);
    out.ok(&format!(
        "idhal sign --param enroll-key=… scriptlets/: serial {serial}, 000-enroll.sh (enroll once, then the tunnel at every boot)"
    ));
    let (token_id, token) = env.token(&cli.node_type, &[]);
    out.ok(&format!(
        "idhal token create --type {}: token {token_id}.… (one use, 1 h), given to the VM as fw_cfg {}",
        cli.node_type,
        enroll::FW_CFG_TOKEN
    ));

    out.step(4, "boot the vnode (QEMU TCG) and follow it to Alive");
    let mut spec = env.spec();
    spec.fw_cfg
        .push((enroll::FW_CFG_TOKEN.into(), token.clone()));
    let mut vm = env.boot_spec(spec);
    let vpn = env.vpn();
    let started = vm.started;
    out.ok(&format!(
        "qemu-system-x86_64 -accel tcg started: kernel {}, initrd with the project key baked in, \
         empty state disk; the kernel boots quietly (a few seconds under TCG)",
        env.shared.base.kernel_version
    ));
    let deadline = started + Limits::BOOT;
    let mut run = None;
    let mut alive_at = None;
    let mut hook_lines = 0;
    while run.is_none() || alive_at.is_none() {
        // The live view shows each console line once; whether the boot run has ended is read
        // from the console as state, whatever the view has shown already.
        while let Some(line) = vm.next_new_line() {
            show(out, &line);
        }
        if run.is_none() {
            run = vm.log().run(1).transpose().map_err(anyhow::Error::msg)?;
        }
        // The server's side, as it happens: OpenVPN runs `idhal hook`, which says what it did.
        let hooks: Vec<String> = vpn
            .log_text()
            .lines()
            .filter(|l| l.starts_with("idhal hook "))
            .map(String::from)
            .collect();
        for h in &hooks[hook_lines..] {
            out.ok(&format!("OpenVPN server ran {h}"));
        }
        hook_lines = hooks.len();
        if alive_at.is_none() {
            alive_at = vpn.seen(started, |l| {
                l.starts_with("idhal hook client-connect: ") && l.contains(" Alive")
            });
        }
        vm.check_running("the node");
        ensure!(
            Instant::now() < deadline,
            "the node did not get there within {:?}",
            Limits::BOOT
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    let alive = alive_at.unwrap().0 - started;
    let run = run.unwrap();
    let run = idhal_qemu_tests::RunResult {
        exit: run.exit,
        status: run.status,
        lines: run.lines,
        since_start: started.elapsed(),
    };
    let (joined, _) = Joined::from_run(&run);

    out.step(5, "the node in OAR and in DNS");
    let host = Cluster::host(&joined.address);
    let res = cluster.wait_state(&host, "Alive", Limits::ALIVE);
    out.ok(&format!(
        "oarnodes: resource {} {} is {}",
        res["resource_id"], res["network_address"], res["state"]
    ));
    for p in ["ip", "cluster", "idhaltype", "idhalcn", "idhalclientip"] {
        out.line(&format!("  {p:<14} {}", res[p].as_str().unwrap_or("?")));
    }
    let a = cluster.wait_dns(&host, "A", Duration::from_secs(10));
    out.ok(&format!(
        "kdig @127.0.0.1 -p {} {host} A → {}",
        cluster.knot.port,
        a.join(" ")
    ));
    let ptr_name = Cluster::ptr_name(&joined.address);
    let ptr = cluster.wait_dns(&ptr_name, "PTR", Duration::from_secs(10));
    out.ok(&format!("kdig … {ptr_name} PTR → {}", ptr.join(" ")));
    let nodes = env.ca.ok(&["nodes"]);
    out.ok("idhal nodes:");
    for l in nodes.lines() {
        out.line(&format!("  {l}"));
    }
    println!(
        "\nFIGURE demo: QEMU start to Alive in OAR {:.2} s wall (agent done {:.2} s)",
        alive.as_secs_f64(),
        run.since_start.as_secs_f64()
    );
    // Where those seconds went, step by step (guest uptime and host stamps on one clock).
    match idhal_qemu_tests::breakdown::boot_to_alive(&vm, vpn, &joined.node) {
        Ok(b) => {
            for (what, secs) in &b.rows {
                let secs = idhal_qemu_tests::breakdown::shown(*secs);
                out.line(&format!("  {secs:>5.2} s  {what}"));
            }
        }
        Err(e) => out.line(&format!("  (no breakdown: {e})")),
    }

    out.step(6, "a tampered manifest is refused, and nothing runs");
    env.project.scriptlet(
        "050-new",
        "#!/bin/sh\necho \"IDHAL-TEST new-ran\" > /dev/console\n",
    );
    let serial = env.project.sign(&[]);
    let m = env.project.pubdir.join(format!("manifests/{serial}"));
    let honest = std::fs::read_to_string(&m)?;
    std::fs::write(&m, honest.replace("new-ran", "NEW-RAN"))?;
    out.line(&format!(
        "signed serial {serial} (adds 050-new.sh), then changed one word of the served copy"
    ));
    let r = vm.run_again();
    for l in &r.lines {
        show(out, l);
    }
    ensure!(
        r.exit == 5 && r.count("-RAN") == 0 && r.count("new-ran") == 0,
        "expected a refusal (exit 5) and nothing run, got exit {}: {:?}",
        r.exit,
        r.lines
    );
    out.ok(&format!(
        "refused (exit 5): {}; still at serial {}",
        r.last_message(),
        r.status["serial"]
    ));
    std::fs::write(&m, honest)?;

    out.step(
        7,
        "power off: the node leaves OAR (Absent), keeps its address and DNS name",
    );
    let t = Instant::now();
    vm.poweroff();
    let hook = format!("idhal hook client-disconnect: {}: ", joined.node);
    let at = idhal_qemu_tests::wait_until("the disconnect hook", Limits::ABSENT, || {
        vpn.seen(t, |l| l.starts_with(&hook))
    })
    .0;
    let res = cluster.wait_state(&host, "Absent", Limits::ABSENT);
    out.ok(&format!(
        "{:.2} s after the power-off request: resource {} is {}",
        (at - t).as_secs_f64(),
        res["resource_id"],
        res["state"]
    ));

    out.step(8, "summary");
    out.line(&format!(
        "the vnode pinned {}, verified serial 1, enrolled as {} ({}) with token {token_id}, brought its tunnel up, and was Alive in OAR {:.2} s after QEMU started",
        env.project.fingerprint,
        joined.node,
        joined.address,
        alive.as_secs_f64()
    ));
    drop(env);
    Ok(())
}

/// One console line, with a ✓ for the milestones.
fn show(out: &Out, line: &str) {
    let milestone = [
        ("idhal-bootstrap: pinning", "key pinned"),
        ("idhal-bootstrap: accepted manifest", "manifest verified"),
        ("idhal-bootstrap: enrolled as", "enrolled"),
        ("IDHAL-TEST tunnel-up", "tunnel up"),
    ];
    if let Some(json) = line.strip_prefix("IDHAL-STATUS ") {
        let summary = serde_json::from_str::<serde_json::Value>(json)
            .map(|v| {
                format!(
                    "status: serial {}, enrollment {}, last run: {}",
                    v["serial"],
                    v["enrollment"],
                    v["last_run"]["message"].as_str().unwrap_or("?")
                )
            })
            .unwrap_or_else(|e| format!("status: not JSON ({e})"));
        out.line(&summary);
        return;
    }
    match milestone.iter().find(|(p, _)| line.starts_with(p)) {
        Some((_, what)) => out.ok(&format!("{what}: {line}")),
        None => out.line(line),
    }
}
