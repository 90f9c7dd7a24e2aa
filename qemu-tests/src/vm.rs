//! One QEMU guest: started from a [`VmSpec`], console (ttyS0) to a file the harness reads with a
//! cursor, requests (`run`, `poweroff`) on the second serial port (a unix socket). Killed with
//! SIGKILL by pid when dropped; its console log is printed when the test is failing.
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A guest TCP port (on 10.0.2.100) forwarded to a host port on 127.0.0.1.
#[derive(Debug, Clone)]
pub struct Forward {
    pub guest_port: u16,
    pub host_port: u16,
}

#[derive(Debug, Clone)]
pub struct VmSpec {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    /// `raw` or `qcow2`.
    pub disk_format: String,
    pub forwards: Vec<Forward>,
    /// `-fw_cfg name=NAME,file=FILE` (e.g. `opt/idhal/token` for enrollment).
    pub fw_cfg: Vec<(String, PathBuf)>,
    /// Kernel command line words after the harness's own (`idhal.server=…`, …).
    pub cmdline: Vec<String>,
    pub memory_mib: u32,
}

/// The outcome of one agent run, as the guest reported it.
#[derive(Debug)]
pub struct RunResult {
    pub exit: i32,
    /// `idhal-bootstrap status --json`, parsed.
    pub status: serde_json::Value,
    /// Console lines between `run-start` and `run-exit` (agent log, scriptlet markers).
    pub lines: Vec<String>,
    /// Host wall time since QEMU started.
    pub since_start: Duration,
}

impl RunResult {
    /// How many console lines of this run contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.lines.iter().filter(|l| l.contains(needle)).count()
    }
    pub fn scriptlet_state(&self, id: &str) -> Option<String> {
        self.status["scriptlets"]
            .as_array()?
            .iter()
            .find(|s| s["id"] == id)
            .and_then(|s| s["state"].as_str())
            .map(String::from)
    }
    pub fn last_message(&self) -> String {
        self.status["last_run"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub struct Vm {
    pub name: String,
    child: Child,
    pub console: PathBuf,
    ctl_path: PathBuf,
    ctl: Option<UnixStream>,
    /// The init prints `ready` once, when it starts serving requests.
    ready: bool,
    /// Byte offset in the console log up to which lines were consumed.
    cursor: usize,
    pub started: Instant,
}

fn qemu_path() -> &'static str {
    "/usr/bin/qemu-system-x86_64"
}

impl Vm {
    pub fn start(name: &str, dir: &Path, spec: VmSpec) -> Vm {
        let console = dir.join(format!("{name}.console.log"));
        let ctl_path = dir.join(format!("{name}.ctl"));
        let mut netdev = String::from("user,id=n0,restrict=on");
        for f in &spec.forwards {
            // The `-cmd:` form: one socat per guest connection (the `tcp:` form serves only one
            // connection ever), and -lf so socat's own messages never enter the guest's stream.
            let log = dir.join(format!("{name}.fwd{}.log", f.guest_port));
            netdev.push_str(&format!(
                ",guestfwd=tcp:{}:{}-cmd:socat -lf {} - TCP:127.0.0.1:{}",
                crate::GUEST_HOST_IP,
                f.guest_port,
                log.display(),
                f.host_port
            ));
        }
        let mut append = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "loglevel=3".into(),
            // A crashed init ends QEMU (with -no-reboot) instead of hanging until the deadline.
            "panic=1".into(),
            // The kernel's crypto self-tests cost ~0.5 s of every boot under TCG
            // (crypto_algapi_init, measured with initcall_debug); they test the kernel, not us.
            "cryptomgr.notests".into(),
            // Under TCG every emulated instruction counts: speculative-execution mitigations,
            // the timer and TSC checks, the i8042 (PS/2) probes and KASLR's relocation cost
            // about 1.2 s of each boot here (init at 3.1 s of uptime instead of 4.4 s). Test
            // guests only run our code; a real image keeps its distribution's defaults.
            "mitigations=off".into(),
            "no_timer_check".into(),
            "tsc=reliable".into(),
            "i8042.noaux".into(),
            "i8042.nopnp".into(),
            "i8042.nokbd".into(),
            "nokaslr".into(),
            format!("idhal.name={name}"),
        ];
        append.extend(spec.cmdline.iter().cloned());
        let mut cmd = Command::new(qemu_path());
        // KVM is broken on these machines (hangs, MSR assertions): TCG always. -smp 1 beat 2.
        cmd.args(["-accel", "tcg", "-cpu", "qemu64,+rdrand", "-smp", "1", "-m"])
            .arg(spec.memory_mib.to_string())
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-kernel")
            .arg(&spec.kernel)
            .arg("-initrd")
            .arg(&spec.initrd)
            .arg("-append")
            .arg(append.join(" "))
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", ctl_path.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=none,id=d0,format={}",
                spec.disk.display(),
                spec.disk_format
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"])
            .arg("-netdev")
            .arg(netdev)
            .args(["-device", "virtio-net-pci,netdev=n0,romfile="]);
        for (name, file) in &spec.fw_cfg {
            cmd.arg("-fw_cfg")
                .arg(format!("name={name},file={}", file.display()));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join(format!("{name}.qemu.log"))).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64");
        Vm {
            name: name.into(),
            child,
            console,
            ctl_path,
            ctl: None,
            ready: false,
            cursor: 0,
            started: Instant::now(),
        }
    }

    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The next whole console line after the cursor, if the guest has written one; the cursor
    /// moves past it. Never waits.
    pub fn try_line(&mut self) -> Option<String> {
        let bytes = std::fs::read(&self.console).unwrap_or_default();
        // Only whole lines: the guest may be mid-line.
        let rest = &bytes[self.cursor.min(bytes.len())..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = String::from_utf8_lossy(&rest[..nl])
            .trim_end_matches('\r')
            .to_string();
        self.cursor += nl + 1;
        Some(line)
    }

    /// Panics (the caller's `what` in the message) when QEMU has exited.
    pub fn check_running(&mut self, what: &str) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{}: QEMU exited ({st}) while waiting for {what}", self.name);
        }
    }

    /// The next console line (after the cursor) for which `pred` holds; the cursor moves past
    /// it. Panics (printing the console) at the deadline or when QEMU exits first.
    pub fn next_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> (String, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            while let Some(line) = self.try_line() {
                if pred(&line) {
                    return (line, skipped);
                }
                skipped.push(line);
            }
            self.check_running(what);
            if Instant::now() > deadline {
                panic!("{}: no {what} on the console within {timeout:?}", self.name);
            }
            // Polling a file the guest appends to; the deadline, not this period, bounds the wait.
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for a console line starting with `prefix`.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        self.next_line(prefix, timeout, |l| l.starts_with(prefix)).0
    }

    /// Waits for the end of the next agent run and collects what it reported.
    pub fn wait_run(&mut self, timeout: Duration) -> RunResult {
        self.wait_for("IDHAL-EVENT run-start", timeout);
        let (exit_line, lines) = self.next_line("IDHAL-EVENT run-exit=", timeout, |l| {
            l.starts_with("IDHAL-EVENT run-exit=")
        });
        let since_start = self.started.elapsed();
        let exit = exit_line
            .strip_prefix("IDHAL-EVENT run-exit=")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|c| c.parse().ok())
            .expect("run-exit code");
        let status_line = self.wait_for("IDHAL-STATUS ", timeout);
        let status = serde_json::from_str(status_line.trim_start_matches("IDHAL-STATUS "))
            .unwrap_or_else(|e| panic!("{}: status is not JSON ({e}): {status_line}", self.name));
        RunResult {
            exit,
            status,
            lines,
            since_start,
        }
    }

    /// The first run after boot; prints the boot-to-agent-done figure (not asserted).
    pub fn wait_boot_run(&mut self) -> RunResult {
        let r = self.wait_run(crate::Limits::BOOT);
        let uptime = self
            .console_text()
            .lines()
            .find(|l| l.starts_with("IDHAL-EVENT run-exit="))
            .and_then(|l| l.rsplit("uptime=").next().map(String::from))
            .unwrap_or_default();
        eprintln!(
            "FIGURE {}: QEMU start to agent done {:.2} s wall (guest uptime {uptime} s), exit {}",
            self.name,
            r.since_start.as_secs_f64(),
            r.exit
        );
        r
    }

    /// Sends one request line to the guest's init (`run`, `poweroff`).
    pub fn request(&mut self, line: &str) {
        if !self.ready {
            self.wait_for("IDHAL-EVENT ready", crate::Limits::RUN);
            self.ready = true;
        }
        if self.ctl.is_none() {
            self.ctl = Some(
                UnixStream::connect(&self.ctl_path).expect("connecting to the VM's control port"),
            );
        }
        let s = self.ctl.as_mut().unwrap();
        s.write_all(format!("{line}\n").as_bytes())
            .expect("writing a request");
    }

    /// Asks for another agent run and waits for its result.
    pub fn run_again(&mut self) -> RunResult {
        self.request("run");
        self.wait_run(crate::Limits::RUN)
    }

    /// Clean power-off (sync, unmount, poweroff -f) and waits for QEMU to exit.
    pub fn poweroff(mut self) {
        self.request("poweroff");
        let deadline = Instant::now() + crate::Limits::POWEROFF;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: QEMU still running {:?} after poweroff",
                    self.name,
                    crate::Limits::POWEROFF
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// SIGKILL of QEMU: a power cut, as far as the guest's disk is concerned.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill_now();
        if std::thread::panicking() {
            eprintln!(
                "----- console of {} ({}) -----\n{}",
                self.name,
                self.console.display(),
                self.console_text()
            );
        }
    }
}
