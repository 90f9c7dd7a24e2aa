//! Issue 14, part 5: cloud-init 22.4 (Debian 12's) and idhal-bootstrap side by side, running the
//! same one-line step at first boot of the same debootstrapped systemd image. Everything else is
//! the same in both boots: kernel, helper initramfs, kernel command line (with the NoCloud seed
//! `ds=nocloud-net;s=http://10.0.2.100:8081/` in both), QEMU flags, both guestfwd ports, a fresh
//! qcow2 overlay of the baked image per boot, boots interleaved (cloud-init, idhal, idhal,
//! cloud-init, …).
//!
//! Fairness: the image has no udev, so `serial-getty@ttyS0.service` waits 90 s for a device unit
//! that never appears and holds multi-user.target, which only cloud-init's final stage is ordered
//! after. It is masked in both images (a cloud image has udev; adding udev to both would measure
//! udev's coldplug too). cloud-init's network configuration is disabled in its image: the helper
//! initramfs has configured eth0 in both boots, and idhal does not configure the network either.
//!
//! The test asserts what must hold (the step ran in each boot, cloud-init found its NoCloud seed
//! over the network, not DataSourceNone; the agent's scriptlet is done; CPU accounting is on) and
//! prints figures; it never asserts a time. `IDHAL_BENCH_BOOTS=5` boots each side 5 times and
//! prints medians; scripts/bench-boot.sh checks the ratio.
use idhal_image_build::{bake, cpio::Node};
use idhal_qemu_tests::{bins, host, rootfs, Env, Forward, Limits, Serve, VmSpec, GUEST_HOST_IP};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The step both agents run: one line on the console (with the guest's uptime).
const STEP: &str =
    "echo \"IDHAL-BENCH step-done uptime=$(cut -d' ' -f1 /proc/uptime)\" > /dev/console";
const STEP_LINE: &str = "IDHAL-BENCH step-done";

/// The step's own line (`IDHAL-BENCH step-done uptime=12.34`), not a line that merely quotes it
/// (a log echoing the command).
fn is_step(line: &str) -> bool {
    line.split_once(STEP_LINE)
        .and_then(|(_, rest)| rest.strip_prefix(" uptime="))
        .is_some_and(|u| u.starts_with(|c: char| c.is_ascii_digit()))
}
/// Lines of the report unit; the last one is `… end`.
const REPORT: &str = "IDHAL-BENCH report ";
/// The guest port of the NoCloud seed server (the manifest server is on GUEST_SERVE_PORT).
const SEED_PORT: u16 = 8081;
/// QEMU start to the step: cloud-init takes ~35 s on an idle machine under TCG; 3x for a busy one.
const STEP_DEADLINE: Duration = Duration::from_secs(150);
/// The step to the report's end (both waits in the guest are bounded by 300 s).
const REPORT_DEADLINE: Duration = Duration::from_secs(330);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Agent {
    CloudInit,
    Idhal,
}

impl Agent {
    fn name(self) -> &'static str {
        match self {
            Agent::CloudInit => "cloud-init",
            Agent::Idhal => "idhal",
        }
    }
    /// The units whose CPU time is the agent's.
    fn units(self) -> &'static [&'static str] {
        match self {
            Agent::CloudInit => &[
                "cloud-init-local.service",
                "cloud-init.service",
                "cloud-config.service",
                "cloud-final.service",
            ],
            Agent::Idhal => &["idhal-bootstrap.service"],
        }
    }
}

/// The report, baked into both images as /usr/local/sbin/idhal-bench-report AGENT and started
/// by a Type=simple unit (it does not hold the boot): waits for the agent's verdict, then for the
/// end of the boot, and prints, every line prefixed: the verdict, the system state, each agent
/// unit's CPUUsageNSec, `systemd-analyze` and its blame, the agent's own stage times where it has
/// them, and what one start of the agent's interpreter costs once the boot is over.
const REPORT_SCRIPT: &str = r#"#!/bin/sh
p="IDHAL-BENCH report"
out() { sed "s/^/$p $1 /" > /dev/console; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
case "$1" in
cloud-init)
    timeout 300 cloud-init status --wait --long 2>&1 | out verdict
    units="cloud-init-local.service cloud-init.service cloud-config.service cloud-final.service" ;;
idhal)
    v=$(/usr/local/sbin/idhal-bootstrap status --wait --timeout 300s --json 2>&1)
    echo "$p verdict $(echo "$v" | tr -d '\n')" > /dev/console
    units=idhal-bootstrap.service ;;
esac
timeout 300 systemctl is-system-running --wait 2>&1 | out system
for u in $units; do
    echo "$u $(systemctl show -p CPUUsageNSec --value "$u")"
done | out cpu
systemd-analyze 2>&1 | head -n 3 | out time
systemd-analyze blame 2>&1 | head -n 12 | out blame
# When the agent's last unit started (@) and how long it took (+), and what it waited for.
last=$(echo $units | tr ' ' '\n' | tail -n 1)
systemd-analyze critical-chain "$last" 2>&1 | tail -n +3 | out chain
case "$1" in
cloud-init)
    cloud-init analyze show 2>&1 | grep -E '^(Finished stage|Total Time)' | out stage
    t=$(ms); python3 -c pass; u=$(ms); cloud-init status >/dev/null 2>&1; v=$(ms)
    echo "python3-c-pass=$((u - t))ms cloud-init-status=$((v - u))ms" | out exec ;;
idhal)
    t=$(ms); /usr/local/sbin/idhal-bootstrap status >/dev/null 2>&1; u=$(ms)
    echo "idhal-bootstrap-status=$((u - t))ms" | out exec ;;
esac
echo "$p end" > /dev/console
"#;

/// Ordered after the agent's last unit: nothing of the report runs beside the agent (a
/// `cloud-init status --wait` started early is a Python process polling on the one vCPU, ~2.5 s
/// of CPU to import cloudinit alone). Type=simple: it holds no target either. No default
/// dependencies: multi-user.target would be ordered after the units it wants, and cloud-final is
/// ordered after multi-user.target (a cycle systemd breaks by dropping the report).
fn report_unit(agent: Agent) -> String {
    format!(
        "[Unit]\nDescription=idhal benchmark: report on the boot\nDefaultDependencies=no\n\
         After={}\n[Service]\n\
         Type=simple\nExecStart=/usr/local/sbin/idhal-bench-report {}\n[Install]\n\
         WantedBy=multi-user.target\n",
        agent.units().last().unwrap(),
        agent.name()
    )
}

/// cloud-init's config in its image: no network configuration (the initramfs did it, as for
/// idhal); the locale glibc has built in (Debian's default, en_US.UTF-8, is not generated on a
/// minbase image: `update-locale` refuses it and cloud-config.service fails, status "error").
const CLOUD_CFG: &str =
    "# idhal benchmark: eth0 is configured by the helper initramfs in both boots.\n\
network:\n  config: disabled\nlocale: C.UTF-8\n";

/// NoCloud's seed: the same step in runcmd. `vendor-data` empty (cloud-init asks for it).
fn seed(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("meta-data"),
        "instance-id: idhal-bench-1\nlocal-hostname: bench\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("user-data"),
        format!("#cloud-config\nruncmd:\n  - {}\n", yaml_quoted(STEP)),
    )
    .unwrap();
    std::fs::write(dir.join("vendor-data"), "").unwrap();
}

/// A YAML double-quoted scalar (the step has quotes and `$`).
fn yaml_quoted(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The step as idhal's scriptlet.
fn scriptlet() -> String {
    format!("#!/bin/sh\n{STEP}\n")
}

/// The files both images get: the report, its unit enabled, the serial getty masked.
fn common_overlay(agent: Agent) -> idhal_image_build::cpio::Tree {
    let mut t = idhal_image_build::cpio::Tree::default();
    let sys = "bake/etc/systemd/system";
    t.file(
        "bake/usr/local/sbin/idhal-bench-report",
        0o755,
        REPORT_SCRIPT.as_bytes().to_vec(),
    );
    t.file(
        &format!("{sys}/idhal-bench-report.service"),
        0o644,
        report_unit(agent).into_bytes(),
    );
    t.symlink(
        &format!("{sys}/multi-user.target.wants/idhal-bench-report.service"),
        "/etc/systemd/system/idhal-bench-report.service",
    );
    t.symlink(&format!("{sys}/serial-getty@ttyS0.service"), "/dev/null");
    t
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `raw` as qcow2 in `dir`, with `overlay` baked in.
fn baked(env: &Env, raw: &Path, name: &str, overlay: &idhal_image_build::cpio::Tree) -> PathBuf {
    let image = env.path().join(format!("{name}.qcow2"));
    run(Command::new("/usr/bin/qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(raw)
        .arg(&image));
    bake::bake(
        &env.shared.base,
        &image,
        bake::ImageFormat::Qcow2,
        overlay,
        &env.path().join(format!("bake-{name}")),
        Limits::BOOT,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    image
}

/// What one boot reported.
struct Boot {
    step: Duration,
    /// The guest's uptime when the step ran.
    uptime: String,
    /// Sum of the agent units' CPUUsageNSec.
    cpu_ns: u64,
    /// `KEY rest` of every report line.
    report: Vec<(String, String)>,
}

impl Boot {
    fn lines(&self, key: &str) -> Vec<&str> {
        self.report
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn boot(env: &mut Env, agent: Agent, base: &Path, spec: &VmSpec, k: usize) -> Boot {
    let disk = env.path().join(format!("{}-{k}.qcow2", agent.name()));
    // A fresh overlay per boot: every boot is a first boot, with a cold page cache of its own.
    run(Command::new("/usr/bin/qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(base)
        .arg(&disk));
    let mut spec = spec.clone();
    spec.disk = disk.clone();
    let mut vm = env.boot_spec(spec);
    let end = format!("{REPORT}end");
    // The step, or the report's end without it (the agent finished without running the step:
    // say so at once, with its verdict, instead of waiting out the deadline).
    let line = vm.wait(
        &format!("{STEP_LINE} ({} boot {k})", agent.name()),
        STEP_DEADLINE,
        |c| c.find(|l| is_step(l) || l.starts_with(&end)),
    );
    if !is_step(&line) {
        panic!(
            "{} boot {k}: the step never ran; the guest reported:\n{}",
            agent.name(),
            vm.log()
                .lines()
                .into_iter()
                .filter(|l| l.starts_with(REPORT))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let step = vm.started.elapsed();
    let uptime = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("uptime="))
        .unwrap_or("?")
        .to_string();
    vm.wait_for(&end, REPORT_DEADLINE);
    let report: Vec<(String, String)> = vm
        .log()
        .lines()
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix(REPORT)?;
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((k.to_string(), v.to_string()))
        })
        .collect();
    let mut b = Boot {
        step,
        uptime,
        cpu_ns: 0,
        report,
    };
    let verdict = b.lines("verdict").join("\n");
    match agent {
        Agent::CloudInit => assert!(
            verdict.contains("status: done")
                && verdict.contains("DataSourceNoCloudNet")
                && !verdict.contains("DataSourceNone"),
            "cloud-init did not finish with its NoCloud seed:\n{verdict}"
        ),
        Agent::Idhal => {
            let json: serde_json::Value = serde_json::from_str(&verdict)
                .unwrap_or_else(|e| panic!("status --wait is not JSON ({e}): {verdict}"));
            assert_eq!(json["wait"]["result"], "done", "{json}");
            assert_eq!(json["scriptlets"][0]["state"], "done", "{json}");
        }
    }
    let cpu: Vec<String> = b.lines("cpu").into_iter().map(String::from).collect();
    for unit in agent.units() {
        let v = cpu
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{unit} ")))
            .unwrap_or_else(|| panic!("no CPUUsageNSec of {unit}: {cpu:?}"));
        // "[not set]" means CPU accounting is off and the figure would be meaningless.
        let ns: u64 = v
            .parse()
            .unwrap_or_else(|_| panic!("CPUUsageNSec of {unit} is {v:?}: CPU accounting off?"));
        b.cpu_ns += ns;
    }
    vm.kill();
    let _ = std::fs::remove_file(&disk);
    b
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn file_bytes(t: &idhal_image_build::cpio::Tree) -> u64 {
    t.nodes
        .values()
        .map(|n| match n {
            Node::File { data, .. } => data.len() as u64,
            _ => 0,
        })
        .sum()
}

#[test]
fn vm_cloud_init_and_idhal_run_the_same_first_boot_step() {
    let n: usize = match std::env::var("IDHAL_BENCH_BOOTS") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n| (1..=20).contains(n))
            .unwrap_or_else(|| panic!("IDHAL_BENCH_BOOTS={v:?}: a count from 1 to 20")),
        Err(_) => 1,
    };
    let Some(mut env) = Env::new("cloud-init") else {
        return;
    };
    let cache = bins::target_dir().join("idhal-image-cache");
    let Some(plain) = host::or_skip(rootfs::debian_systemd_image(&cache), "debootstrap image")
    else {
        return;
    };
    let Some(ci) = host::or_skip(
        rootfs::debian_cloud_init_image(&cache),
        "debootstrap image with cloud-init",
    ) else {
        return;
    };
    eprintln!("cloud-init {} in {}", ci.version, ci.path.display());

    // The idhal side: the env's `idhal serve` with the one scriptlet, signed.
    env.project.scriptlet("000-bench-step", &scriptlet());
    env.project.sign(&[]);
    // The NoCloud seed: `idhal serve` of a plain directory (no CA), on 127.0.0.1 too.
    let seed_dir = env.path().join("nocloud");
    seed(&seed_dir);
    let seed_serve = Serve::start(
        &env.shared.idhal,
        &seed_dir,
        &env.path().join("seed-serve.log"),
        None,
    );

    let t = std::time::Instant::now();
    let agent_overlay = bake::bake_overlay(
        &std::fs::read(&env.shared.agent).unwrap(),
        &std::fs::read(env.project.pubkey()).unwrap(),
        &bake::baked_config(&format!(
            "http://{GUEST_HOST_IP}:{}/",
            idhal_qemu_tests::GUEST_SERVE_PORT
        )),
    );
    let idhal_bytes = file_bytes(&agent_overlay);
    let mut overlay = common_overlay(Agent::Idhal);
    overlay.nodes.extend(agent_overlay.nodes);
    let idhal_image = baked(&env, &plain, "idhal", &overlay);
    let mut overlay = common_overlay(Agent::CloudInit);
    overlay.file(
        "bake/etc/cloud/cloud.cfg.d/99-idhal-bench.cfg",
        0o644,
        CLOUD_CFG.as_bytes().to_vec(),
    );
    let ci_image = baked(&env, &ci.path, "cloud-init", &overlay);
    eprintln!(
        "FIGURE bench-boot: both images baked in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // One spec for both: the same initrd, command line, forwards and memory.
    let mut spec = env.spec();
    spec.forwards.push(Forward {
        guest_port: SEED_PORT,
        host_port: seed_serve.port,
    });
    spec.disk_format = "qcow2".into();
    spec.memory_mib = 512;
    spec.cmdline.extend([
        "idhal.mode=root".to_string(),
        format!("ds=nocloud-net;s=http://{GUEST_HOST_IP}:{SEED_PORT}/"),
    ]);

    let mut boots: Vec<(Agent, Boot)> = Vec::new();
    for k in 1..=n {
        // ABBA: each side goes first in every other pair, so neither always follows the other
        // (a warm host page cache, a neighbour's load).
        let mut pair = [(Agent::CloudInit, &ci_image), (Agent::Idhal, &idhal_image)];
        if k % 2 == 0 {
            pair.reverse();
        }
        for (agent, image) in pair {
            let b = boot(&mut env, agent, image, &spec, k);
            eprintln!(
                "FIGURE bench-boot {} boot {k}: QEMU start to step {:.2} s (guest uptime {}), \
                 agent CPU {:.2} s",
                agent.name(),
                b.step.as_secs_f64(),
                b.uptime,
                b.cpu_ns as f64 / 1e9
            );
            boots.push((agent, b));
        }
    }
    // cloud-init fetched its user-data from the seed server in every one of its boots.
    let seed_log = seed_serve.log_text();
    assert_eq!(
        seed_log.matches("\"GET /user-data\" 200").count(),
        n,
        "cloud-init's user-data requests:\n{seed_log}"
    );

    let mut medians = Vec::new();
    for agent in [Agent::CloudInit, Agent::Idhal] {
        let mine: Vec<&Boot> = boots
            .iter()
            .filter(|(a, _)| *a == agent)
            .map(|(_, b)| b)
            .collect();
        let steps: Vec<f64> = mine.iter().map(|b| b.step.as_secs_f64()).collect();
        let cpus: Vec<f64> = mine.iter().map(|b| b.cpu_ns as f64 / 1e9).collect();
        let m = median(steps.clone());
        medians.push(m);
        let (lo, hi) = steps
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), s| (lo.min(*s), hi.max(*s)));
        eprintln!(
            "FIGURE bench-boot {}: QEMU start to step median {m:.2} s, min-max {lo:.2}-{hi:.2} s \
             (n={}); agent CPU median {:.2} s",
            agent.name(),
            steps.len(),
            median(cpus)
        );
        let last = mine.last().unwrap();
        for key in ["cpu", "system", "time", "stage", "exec", "chain", "blame"] {
            for l in last.lines(key) {
                eprintln!("  {} {key}: {l}", agent.name());
            }
        }
    }
    eprintln!(
        "FIGURE bench-boot size: cloud-init adds {} packages, Installed-Size {:.1} MiB, du {:.1} MiB \
         (before {:.1} MiB); idhal adds {} bytes ({:.0} KiB: agent, config, key, units)",
        ci.added.len(),
        ci.installed_size() as f64 / 1048576.0,
        (ci.du_after.saturating_sub(ci.du_before)) as f64 / 1048576.0,
        ci.du_before as f64 / 1048576.0,
        idhal_bytes,
        idhal_bytes as f64 / 1024.0
    );
    eprintln!(
        "FIGURE bench-boot ratio {:.2} (cloud-init median / idhal median, n={n})",
        medians[0] / medians[1]
    );
}
