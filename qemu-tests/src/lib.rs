//! idhal's VM test harness. Everything runs for real: the `idhal` server binary on 127.0.0.1
//! with ephemeral ports, and vnodes built by idhal-image booted under QEMU TCG with user
//! networking (`restrict=on`) whose only way out is a guestfwd to a host port we chose.
//!
//! Every test gets its own [`Env`] (temp dir, keys, publication dir, server, disk copy); guests
//! report progress with console markers and the harness waits for them with explicit deadlines.
//! A [`Vm`] is killed when dropped, and its console log printed if the test is failing.
pub mod bins;
pub mod host;
pub mod rootfs;
pub mod server;
pub mod vm;
pub mod vpn;

pub use server::{Project, Serve};
pub use vm::{Forward, RunResult, Vm, VmSpec};

use idhal_image_build as ib;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

/// Deadlines, in one place. Generous: TCG on a busy 2-core machine can be 3x slower than idle.
pub struct Limits;
impl Limits {
    /// QEMU start to the agent's first `run-exit` (idle machine: ~4.5 s).
    pub const BOOT: Duration = Duration::from_secs(90);
    /// One agent run requested on the control port.
    pub const RUN: Duration = Duration::from_secs(60);
    /// `poweroff` request to QEMU's exit.
    pub const POWEROFF: Duration = Duration::from_secs(30);
    /// A host server (idhal serve, OpenVPN) from spawn to listening.
    pub const SERVER_START: Duration = Duration::from_secs(20);
}

/// The port the guest sees the manifest server on (10.0.2.100:PORT inside every guest).
pub const GUEST_SERVE_PORT: u16 = 8080;
pub const GUEST_HOST_IP: &str = "10.0.2.100";

/// One VM at a time per test process: TCG is CPU-bound, and two guests on 2 cores make every
/// deadline and every printed timing meaningless. Held for the life of an [`Env`].
fn vm_slot() -> MutexGuard<'static, ()> {
    static SLOT: Mutex<()> = Mutex::new(());
    // A failed test poisons the lock; the next test still deserves its turn.
    SLOT.lock().unwrap_or_else(|p| p.into_inner())
}

/// What every VM test needs, built once per process: binaries and the cached base image.
pub struct Shared {
    pub idhal: PathBuf,
    pub agent: PathBuf,
    pub base: ib::BaseImage,
}

/// Builds (once) the binaries and the base image. `None` means "skip": the host cannot run VMs
/// and we are not in CI (with `CI=true` that is a panic instead: CI must never skip silently).
pub fn shared() -> Option<&'static Shared> {
    static SHARED: OnceLock<Result<Shared, String>> = OnceLock::new();
    let r = SHARED.get_or_init(|| {
        host::ensure_tools()?;
        let (idhal, agent) = bins::build()?;
        let lock = ib::lock::Lock::parse(ib::lock::DEFAULT_LOCK).map_err(|e| e.to_string())?;
        let cache = bins::target_dir().join("idhal-image-cache");
        let t = std::time::Instant::now();
        let base = ib::build_base(&ib::BaseSpec {
            lock: &lock,
            agent: &agent,
            cache: &cache,
            mtime: 0,
        })
        .map_err(|e| format!("building the vnode image: {e}"))?;
        eprintln!(
            "base image {} ({}) in {:.2}s: {}",
            base.key,
            if base.built { "built" } else { "cached" },
            t.elapsed().as_secs_f64(),
            base.initramfs.display()
        );
        Ok(Shared { idhal, agent, base })
    });
    match r {
        Ok(s) => Some(s),
        Err(e) if host::ci() => panic!("VM tests cannot run (CI=true forbids skipping): {e}"),
        Err(e) => {
            eprintln!("SKIPPING VM test: {e}");
            None
        }
    }
}

/// Skips the calling test (returns) when VMs cannot run here; see [`shared`].
#[macro_export]
macro_rules! env_or_skip {
    ($name:expr) => {
        match $crate::Env::new($name) {
            Some(e) => e,
            None => return,
        }
    };
}

/// One test's world: temp dir, project (keys, scriptlets, publication dir), a running
/// `idhal serve`, and the node's state disk (its own copy).
pub struct Env {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub shared: &'static Shared,
    pub project: Project,
    pub serve: Serve,
    pub disk: PathBuf,
    boots: u32,
    initrds: std::cell::Cell<u32>,
    _slot: MutexGuard<'static, ()>,
}

impl Env {
    pub fn new(name: &str) -> Option<Env> {
        let shared = shared()?;
        let slot = vm_slot();
        let dir = tempfile::Builder::new()
            .prefix(&format!("idhal-vm-{name}-"))
            .tempdir()
            .expect("temp dir");
        let project = Project::new(&shared.idhal, dir.path());
        let serve = Serve::start(
            &shared.idhal,
            &project.pubdir,
            &dir.path().join("serve.log"),
        );
        let disk = dir.path().join("state.img");
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        ib::disk::make_state_disk(&seed, &disk, 64).expect("state disk");
        Some(Env {
            name: name.into(),
            dir,
            shared,
            project,
            serve,
            disk,
            boots: 0,
            initrds: std::cell::Cell::new(0),
            _slot: slot,
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The spec of a node booting this env's image and disk against this env's server. Tests
    /// add forwards, fw_cfg files or kernel arguments before [`Env::boot_spec`].
    pub fn spec(&self) -> VmSpec {
        self.spec_with(ib::Overlay::default())
    }

    /// Like [`Env::spec`], with more files in the node's initrd (certificates, configs).
    pub fn spec_with(&self, extra: ib::Overlay) -> VmSpec {
        let mut overlay = ib::key_overlay(&std::fs::read(self.project.pubkey()).unwrap());
        overlay.nodes.extend(extra.nodes);
        self.initrds.set(self.initrds.get() + 1);
        let initrd = self
            .path()
            .join(format!("initrd-{}.img", self.initrds.get()));
        ib::node_initrd(&self.shared.base, &overlay, 0, &initrd).expect("node initrd");
        VmSpec {
            kernel: self.shared.base.kernel.clone(),
            initrd,
            disk: self.disk.clone(),
            disk_format: "raw".into(),
            forwards: vec![Forward {
                guest_port: GUEST_SERVE_PORT,
                host_port: self.serve.port,
            }],
            fw_cfg: vec![],
            cmdline: vec![format!(
                "idhal.server=http://{GUEST_HOST_IP}:{GUEST_SERVE_PORT}/"
            )],
            memory_mib: 256,
        }
    }

    /// Boots the node (same disk every time: a reboot is a new QEMU on the same disk).
    pub fn boot(&mut self) -> Vm {
        let spec = self.spec();
        self.boot_spec(spec)
    }

    pub fn boot_spec(&mut self, spec: VmSpec) -> Vm {
        self.boots += 1;
        let name = format!("{}-boot{}", self.name, self.boots);
        Vm::start(&name, self.dir.path(), spec)
    }

    /// Another empty state disk in this env's dir (for a second node).
    pub fn new_disk(&self, name: &str) -> PathBuf {
        let disk = self.path().join(name);
        let seed = self.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        ib::disk::make_state_disk(&seed, &disk, 64).expect("state disk");
        disk
    }

    /// Reads a file of the state disk (path relative to the agent's state dir) from the host,
    /// without mounting; only after the guest powered off cleanly.
    pub fn state_file(&self, rel: &str) -> Option<String> {
        ib::disk::read_file(&self.disk, &format!("/{}", rel.trim_start_matches('/')))
            .expect("debugfs")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(log) = std::fs::read_to_string(self.path().join("serve.log")) {
                eprintln!("----- idhal serve log ({}) -----\n{log}", self.name);
            }
            // Keep the evidence when asked to.
            if std::env::var_os("IDHAL_KEEP_VM_DIR").is_some() {
                self.dir.disable_cleanup(true);
                eprintln!("IDHAL_KEEP_VM_DIR: kept {}", self.dir.path().display());
            }
        }
    }
}
