//! One QEMU guest: started from a [`VmSpec`], console (ttyS0) to a file the harness reads as
//! state ([`Console`]: waits ask "was this printed in this boot", never "what comes next"),
//! requests (`run`, `poweroff`, `sh`) on the second serial port (a unix socket), the QEMU
//! monitor on a third (`set_link`), and optionally a second NIC on a LAN segment shared with
//! another guest ([`LanNic`]). Killed with SIGKILL by pid when dropped; its console log is
//! printed when the test is failing.
use crate::console::{Console, LineTimes, READY};
use std::io::{Read, Write};
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
    /// A second NIC (the guest's eth1) on a LAN segment with one other guest; the guest gives it
    /// an address with `idhal.lan=ADDR/PREFIX` in `cmdline`.
    pub lan: Option<LanNic>,
}

/// QEMU's netdev id of the LAN NIC, for [`Vm::set_link`].
pub const LAN: &str = "lan";

/// One guest's end of a LAN segment between two guests: QEMU's `-netdev socket` over one TCP
/// connection on 127.0.0.1 (Ethernet frames, length-prefixed). One side listens, the other
/// connects, and QEMU refuses to start a connecting side that finds nobody listening; so the
/// connect side can only be made from the started listening [`Vm`]. The listening QEMU binds
/// port 0 itself and the harness reads the port the kernel gave it from QEMU's own socket
/// (`/proc`): no port picked in advance that another process could take meanwhile.
/// ```text
/// let mut a = Vm::start("a", dir, VmSpec { lan: Some(LanNic::listen()), .. });
/// let b = Vm::start("b", dir, VmSpec { lan: Some(LanNic::connect_to(&mut a)?), .. });
/// ```
#[derive(Debug, Clone)]
pub struct LanNic {
    /// `listen=127.0.0.1:0` or `connect=127.0.0.1:PORT`.
    backend: String,
    mac: &'static str,
}

impl LanNic {
    /// The listening end; start its guest first.
    pub fn listen() -> LanNic {
        LanNic {
            backend: "listen=127.0.0.1:0".into(),
            mac: "52:54:00:77:00:01",
        }
    }

    /// The connecting end, once `listener` (started with [`LanNic::listen`]) listens: waits for
    /// its QEMU's listening socket, bounded. Once per listener: a segment has two ends.
    pub fn connect_to(listener: &mut Vm) -> Result<LanNic, String> {
        match listener.lan {
            LanEnd::Listening => {}
            LanEnd::None | LanEnd::Connecting => {
                return Err(format!(
                    "{}: its spec has no LanNic::listen(); nothing to connect to",
                    listener.name
                ))
            }
            LanEnd::Taken => {
                return Err(format!(
                    "{}: its LAN segment has its other end already",
                    listener.name
                ))
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(port) = listening_port(listener.child.id())? {
                listener.lan = LanEnd::Taken;
                return Ok(LanNic {
                    backend: format!("connect=127.0.0.1:{port}"),
                    mac: "52:54:00:77:00:02",
                });
            }
            if let Ok(Some(st)) = listener.child.try_wait() {
                return Err(format!(
                    "{}: QEMU exited ({st}) before it listened",
                    listener.name
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: QEMU has no listening socket on 127.0.0.1 after 20 s",
                    listener.name
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// Which end of a LAN segment a [`Vm`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LanEnd {
    None,
    Listening,
    /// Listening, and [`LanNic::connect_to`] handed out the other end.
    Taken,
    Connecting,
}

/// The port of the TCP socket process `pid` listens on at 127.0.0.1, if any: the inodes of its
/// sockets (`/proc/PID/fd`) matched against `/proc/net/tcp`'s LISTEN entries (state 0A).
fn listening_port(pid: u32) -> Result<Option<u16>, String> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| format!("{e}"))?;
    let inodes: Vec<String> = fds
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let tcp = std::fs::read_to_string("/proc/net/tcp").map_err(|e| e.to_string())?;
    let mut ports = tcp.lines().skip(1).filter_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (addr, port) = f.get(1)?.split_once(':')?;
        (addr == "0100007F"
            && f.get(3) == Some(&"0A")
            && inodes.iter().any(|i| f.get(9) == Some(&i.as_str())))
        .then(|| u16::from_str_radix(port, 16).ok())
        .flatten()
    });
    match (ports.next(), ports.next()) {
        (Some(p), None) => Ok(Some(p)),
        (None, _) => Ok(None),
        (Some(_), Some(_)) => Err(format!("QEMU {pid} listens on several TCP ports")),
    }
}

/// A one-line command for [`Vm::sh`]: no line breaks (the request is one line), bounded.
const SH_MAX_COMMAND: usize = 4096;

/// The guest's `status --wait` deadline in [`Vm::wait_boot_run`]: the boot run has ended by
/// then (init serves requests after it), so the answer takes one or two looks.
const WAIT_STATUS: Duration = Duration::from_secs(30);

/// The outcome of one agent run, as the guest reported it.
#[derive(Debug)]
pub struct RunResult {
    pub exit: i32,
    /// `idhal-bootstrap status --json`, parsed (for the boot run: `status --wait --json`).
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
    monitor_path: PathBuf,
    lan: LanEnd,
    /// `sh` requests sent in this boot: the guest numbers them the same way, from 1.
    sh_sent: u32,
    log: Console,
    /// Each console line with the host time it appeared (for the boot breakdown).
    stamped: LineTimes,
    pub started: Instant,
}

fn qemu_path() -> &'static str {
    "/usr/bin/qemu-system-x86_64"
}

impl Vm {
    pub fn start(name: &str, dir: &Path, spec: VmSpec) -> Vm {
        let console = dir.join(format!("{name}.console.log"));
        let ctl_path = dir.join(format!("{name}.ctl"));
        let monitor_path = dir.join(format!("{name}.mon"));
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
        cmd.arg("-monitor").arg(format!(
            "unix:{},server=on,wait=off",
            monitor_path.display()
        ));
        if let Some(lan) = &spec.lan {
            // Still only 127.0.0.1: the segment is one TCP connection between two QEMUs.
            cmd.arg("-netdev")
                .arg(format!("socket,id={LAN},{}", lan.backend))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev={LAN},mac={},romfile=",
                    lan.mac
                ));
        }
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
            log: Console::new(&console),
            stamped: LineTimes::follow(&console, crate::console::terminal_view),
            console,
            ctl_path,
            ctl: None,
            monitor_path,
            lan: match &spec.lan {
                None => LanEnd::None,
                Some(l) if l.backend.starts_with("listen=") => LanEnd::Listening,
                Some(_) => LanEnd::Connecting,
            },
            sh_sent: 0,
            started: Instant::now(),
        }
    }

    pub fn console_text(&self) -> String {
        self.log.text()
    }

    /// Each console line of this boot with the host time it appeared.
    pub fn stamped(&self) -> &LineTimes {
        &self.stamped
    }

    /// The console as state: `find`, `run(k)`, `runs_started`.
    pub fn log(&self) -> &Console {
        &self.log
    }

    /// For a live view only (the demo, `idhal-vnode`): the next whole console line not shown
    /// yet. Never waits; no wait depends on it.
    pub fn next_new_line(&mut self) -> Option<String> {
        self.log.next_new_line()
    }

    /// Panics (the caller's `what` in the message) when QEMU has exited.
    pub fn check_running(&mut self, what: &str) {
        if let Ok(Some(st)) = self.child.try_wait() {
            panic!("{}: QEMU exited ({st}) while waiting for {what}", self.name);
        }
    }

    /// Polls `cond` on the console until it gives `Some`. Panics (the console is printed by
    /// `Drop`) at the deadline or when QEMU exits first.
    pub fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut cond: impl FnMut(&Console) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = cond(&self.log) {
                return v;
            }
            self.check_running(what);
            if Instant::now() > deadline {
                panic!(
                    "{}: no {what} on the console within {timeout:?}; what it reported last:\n{}",
                    self.name,
                    self.log.digest(60)
                );
            }
            // Polling a file the guest appends to; the deadline, not this period, bounds the wait.
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The first console line of this boot for which `pred` holds, printed already or within
    /// `timeout`.
    pub fn wait_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        self.wait(what, timeout, |c| c.find(&pred))
    }

    /// The first console line of this boot starting with `prefix` (printed already or within
    /// `timeout`).
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> String {
        self.wait_line(prefix, timeout, |l| l.starts_with(prefix))
    }

    /// Waits for the end of the `k`-th agent run of this boot (1: the boot run) and collects
    /// what it reported.
    pub fn wait_run(&mut self, k: usize, timeout: Duration) -> RunResult {
        let r = self.wait(&format!("the end of agent run {k}"), timeout, |c| c.run(k));
        let since_start = self.started.elapsed();
        let r = r.unwrap_or_else(|e| panic!("{}: {e}", self.name));
        RunResult {
            exit: r.exit,
            status: r.status,
            lines: r.lines,
            since_start,
        }
    }

    /// The first run after boot; prints the boot-to-agent-done figure (not asserted). Its
    /// `status` is the agent's own verdict on this boot's work (`status --wait`, [`Vm::wait_status`]),
    /// which must end with the boot run's exit code: a verdict that disagrees with the run
    /// fails the test.
    pub fn wait_boot_run(&mut self) -> RunResult {
        let r = self.wait_run(1, crate::Limits::BOOT);
        let uptime = self
            .log
            .find(|l| l.starts_with(crate::console::RUN_EXIT))
            .and_then(|l| l.rsplit("uptime=").next().map(String::from))
            .unwrap_or_default();
        eprintln!(
            "FIGURE {}: QEMU start to agent done {:.2} s wall (guest uptime {uptime} s), exit {}",
            self.name,
            r.since_start.as_secs_f64(),
            r.exit
        );
        let asked = Instant::now();
        let (code, status) = self
            .wait_status(WAIT_STATUS)
            .unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "FIGURE {}: status --wait over ttyS1 answered in {:.2} s wall ({} ms in the guest), \
             exit {code}",
            self.name,
            asked.elapsed().as_secs_f64(),
            status["wait"]["waited_ms"]
        );
        assert_eq!(
            code, r.exit,
            "{}: status --wait exited {code}, the boot run {}: {status}",
            self.name, r.exit
        );
        RunResult { status, ..r }
    }

    /// `idhal-bootstrap status --wait --timeout T --json` in the guest (over ttyS1: once its
    /// init serves requests): its exit code and its JSON, whose `wait` must agree with the code.
    /// `T` is at most 50 s, under the 60 s init gives any `sh` request.
    pub fn wait_status(&mut self, timeout: Duration) -> Result<(i32, serde_json::Value), String> {
        let secs = timeout.as_secs().clamp(1, 50);
        let (code, out) = self.sh(
            &format!("idhal-bootstrap status --wait --timeout {secs}s --json"),
            Duration::from_secs(secs + 30),
        )?;
        let json: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
            format!(
                "{}: status --wait (exit {code}) is not JSON ({e}): {out}",
                self.name
            )
        })?;
        if json["wait"]["exit"] != code {
            return Err(format!(
                "{}: status --wait exited {code} but says {}",
                self.name, json["wait"]
            ));
        }
        Ok((code, json))
    }

    /// Sends one request line to the guest's init (`run`, `poweroff`), once it has said it
    /// serves them (`IDHAL-EVENT ready`, printed once per boot, whoever saw it first).
    pub fn request(&mut self, line: &str) {
        self.wait_for(READY, crate::Limits::RUN);
        if self.ctl.is_none() {
            self.ctl = Some(
                UnixStream::connect(&self.ctl_path).expect("connecting to the VM's control port"),
            );
        }
        let s = self.ctl.as_mut().unwrap();
        s.write_all(format!("{line}\n").as_bytes())
            .expect("writing a request");
    }

    /// Asks for another agent run and returns its result. The init serves one request at a
    /// time after its boot run and runs nothing by itself (no `idhal.period`): the run asked for
    /// is the next one to start.
    pub fn run_again(&mut self) -> RunResult {
        // Counted before asking: once asked, the run may start before we look.
        self.wait_for(READY, crate::Limits::RUN);
        let k = self.log.runs_started() + 1;
        self.request("run");
        self.wait_run(k, crate::Limits::RUN)
    }

    /// Runs `cmd` in the guest (`sh -c`, stdin /dev/null, a 60 s deadline of its own, output
    /// bounded to 64 KiB: see image-build's init.sh) and returns its exit code and output
    /// (stdout and stderr, one string, tabs turned into spaces). `Err` when `cmd` is not one line
    /// of at most 4 KiB, or no exit code came within `timeout` (or QEMU exited first).
    pub fn sh(&mut self, cmd: &str, timeout: Duration) -> Result<(i32, String), String> {
        if cmd.contains(['\n', '\r']) || cmd.len() > SH_MAX_COMMAND {
            return Err(format!(
                "{}: sh: the command must be one line of at most {SH_MAX_COMMAND} bytes",
                self.name
            ));
        }
        self.sh_sent += 1;
        let seq = self.sh_sent;
        self.request(&format!("sh {cmd}"));
        let (exit, out) = (
            format!("IDHAL-SH {seq} exit="),
            format!("IDHAL-SH {seq} | "),
        );
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.log.lines();
            if let Some(code) = lines.iter().find_map(|l| l.strip_prefix(&exit)) {
                let code = code
                    .trim()
                    .parse()
                    .map_err(|_| format!("{}: sh: bad exit line {code:?}", self.name))?;
                let mut text: Vec<&str> =
                    lines.iter().filter_map(|l| l.strip_prefix(&out)).collect();
                let note = "[sh: output truncated at 64 KiB]".to_string();
                if lines
                    .iter()
                    .any(|l| *l == format!("IDHAL-SH {seq} truncated"))
                {
                    text.push(&note);
                }
                return Ok((code, text.join("\n")));
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "{}: QEMU exited ({st}) during `sh {cmd}`",
                    self.name
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{}: `sh {cmd}` gave no exit code within {timeout:?}",
                    self.name
                ));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `set_link ID on|off` on the QEMU monitor: the NIC (or netdev) `id` loses or regains its
    /// link, both ways (the guest sees no carrier, frames are dropped). Waits for the monitor's
    /// answer; `Err` on an error answer (an unknown id) or none within 10 s.
    pub fn set_link(&mut self, id: &str, up: bool) -> Result<(), String> {
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!("{}: set_link: bad id {id:?}", self.name));
        }
        let what = format!("set_link {id} {}", if up { "on" } else { "off" });
        let fail = |e: String| format!("{}: monitor, {what}: {e}", self.name);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = UnixStream::connect(&self.monitor_path).map_err(|e| fail(e.to_string()))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| fail(e.to_string()))?;
        monitor_reply(&mut s, deadline).map_err(fail)?;
        s.write_all(format!("{what}\n").as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let reply = monitor_reply(&mut s, deadline).map_err(fail)?;
        // The monitor echoes the command (with cursor moves) up to the first CRLF; what follows
        // before the next prompt is its answer, empty on success.
        let answer = reply.split_once("\r\n").map_or("", |(_, a)| a).trim();
        if answer.is_empty() {
            Ok(())
        } else {
            Err(fail(answer.to_string()))
        }
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

/// What the monitor sent up to its next `(qemu) ` prompt (which is left out).
fn monitor_reply(s: &mut UnixStream, deadline: Instant) -> Result<String, String> {
    const PROMPT: &[u8] = b"(qemu) ";
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(PROMPT) {
        if Instant::now() > deadline || got.len() > 1 << 20 {
            return Err(format!(
                "no prompt; got {:?}",
                String::from_utf8_lossy(&got)
            ));
        }
        match s.read(&mut buf) {
            Ok(0) => return Err("the monitor closed the connection".into()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    got.truncate(got.len() - PROMPT.len());
    Ok(String::from_utf8_lossy(&got).into_owned())
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
