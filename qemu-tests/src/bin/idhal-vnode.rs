//! `idhal-vnode`: boots one test vnode against a publication directory and shows its way through
//! the agent run live (for the demo and for poking at the harness by hand).
use anyhow::{bail, Context, Result};
use clap::Parser;
use idhal_image_build as ib;
use idhal_qemu_tests::{Forward, Limits, Serve, Vm, VmSpec, GUEST_HOST_IP, GUEST_SERVE_PORT};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "idhal-vnode",
    about = "Boot one idhal test vnode under QEMU against a publication directory, showing its progress",
    long_about = "Boot one idhal test vnode (built by idhal-image, cached) under QEMU TCG against PUBDIR \
served by `idhal serve` on 127.0.0.1 with an ephemeral port. The guest reaches it as \
http://10.0.2.100:8080/ through user networking (restrict=on): it can reach nothing else. The \
console is shown live with the host time since QEMU started; the node powers off after its first \
agent run (or after --runs runs).",
    after_help = "Example (the demo):\n  \
idhal keygen --dir keys --no-passphrase && idhal sign --key keys/idhal.key --out pub scriptlets/\n  \
idhal-vnode --pub pub --key keys/idhal.pub --disk node1.img      # boot again with the same disk: a reboot\n\n\
Binaries: built from the workspace, or IDHAL_BIN / IDHAL_AGENT_BIN. See docs/qemu-tests.md."
)]
struct Cli {
    /// The publication directory (`idhal sign --out`).
    #[arg(long = "pub", value_name = "PUBDIR")]
    pubdir: PathBuf,
    /// The public key baked into the node (pinned on first boot).
    #[arg(long)]
    key: PathBuf,
    /// The node's state disk; created (empty ext4) when missing. Default: a temporary one.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Agent runs before power-off (the first at boot, the others requested one after another).
    #[arg(long, default_value_t = 1)]
    runs: u32,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let Some(shared) = idhal_qemu_tests::shared() else {
        bail!("this host cannot run the vnode (see above)")
    };
    let work = tempfile::Builder::new().prefix("idhal-vnode-").tempdir()?;
    let serve = Serve::start(
        &shared.idhal,
        &cli.pubdir,
        &work.path().join("serve.log"),
        None,
    );
    println!(
        "server: idhal serve --root {} on 127.0.0.1:{} (the guest's http://{GUEST_HOST_IP}:{GUEST_SERVE_PORT}/)",
        cli.pubdir.display(),
        serve.port
    );
    let disk = cli
        .disk
        .clone()
        .unwrap_or_else(|| work.path().join("state.img"));
    if !disk.exists() {
        let seed = work.path().join("seed");
        std::fs::create_dir_all(&seed)?;
        ib::disk::make_state_disk(&seed, &disk, 64)?;
        println!("state disk: new, {}", disk.display());
    } else {
        println!(
            "state disk: existing, {} (this boot is a reboot)",
            disk.display()
        );
    }
    let key = std::fs::read(&cli.key).with_context(|| format!("reading {}", cli.key.display()))?;
    let initrd = work.path().join("initrd.img");
    ib::node_initrd(&shared.base, &ib::key_overlay(&key), 0, &initrd)?;
    let spec = VmSpec {
        kernel: shared.base.boot_kernel().to_path_buf(),
        initrd,
        disk,
        disk_format: "raw".into(),
        forwards: vec![Forward {
            guest_port: GUEST_SERVE_PORT,
            host_port: serve.port,
        }],
        fw_cfg: vec![],
        cmdline: vec![format!(
            "idhal.server=http://{GUEST_HOST_IP}:{GUEST_SERVE_PORT}/"
        )],
        memory_mib: 256,
        lan: None,
    };
    println!(
        "boot: qemu-system-x86_64 -accel tcg (kernel {})",
        shared.base.kernel_version
    );
    let mut vm = Vm::start("vnode", work.path(), spec);
    let mut exit = 0;
    for k in 1..=cli.runs as usize {
        if k > 1 {
            vm.request("run");
        }
        // Shown live; the run's end is read from the console as state (the k-th run-exit and
        // its status line), whatever the live view has shown already.
        let deadline = std::time::Instant::now() + Limits::BOOT;
        let run = loop {
            while let Some(line) = vm.next_new_line() {
                if !line.starts_with("IDHAL-STATUS ") {
                    println!("[{:6.2}s] {line}", vm.started.elapsed().as_secs_f64());
                }
            }
            if let Some(r) = vm.log().run(k) {
                break r.map_err(anyhow::Error::msg)?;
            }
            vm.check_running("the agent's report");
            if std::time::Instant::now() > deadline {
                bail!("no end of agent run {k} within {:?}", Limits::BOOT);
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        };
        exit = run.exit;
        let v = &run.status;
        println!(
            "[{:6.2}s] status: serial {} · last run: {}",
            vm.started.elapsed().as_secs_f64(),
            v["serial"],
            v["last_run"]["message"].as_str().unwrap_or("?")
        );
        for s in v["scriptlets"].as_array().into_iter().flatten() {
            println!(
                "           scriptlet {} ({}): {}",
                s["id"].as_str().unwrap_or("?"),
                s["frequency"].as_str().unwrap_or("?"),
                s["state"].as_str().unwrap_or("?")
            );
        }
    }
    println!(
        "QEMU start to agent done: {:.2} s wall",
        vm.started.elapsed().as_secs_f64()
    );
    vm.poweroff();
    println!("powered off");
    // exit() runs no destructors: stop the server and remove the temp dir first.
    drop(serve);
    drop(work);
    std::process::exit(exit);
}
