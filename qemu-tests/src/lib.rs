//! idhal's VM test harness. Everything runs for real: the `idhal` server binary on 127.0.0.1
//! with ephemeral ports, and vnodes built by idhal-image booted under QEMU TCG with user
//! networking (`restrict=on`) whose only way out is a guestfwd to a host port we chose.
//!
//! Every test gets its own [`Env`] (temp dir, keys, publication dir, the project's CA made by
//! `idhal ca init`, `idhal serve` answering manifests and enrollment, optionally the OpenVPN
//! server `idhal openvpn server-config` renders, disk copy); guests report progress with console
//! markers and the harness waits for them with explicit deadlines, as state ("was it printed in
//! this boot", [`console::Console`]), never as the next line of a stream. A [`Vm`] is killed when
//! dropped, and its console log printed if the test is failing.
pub mod bins;
pub mod breakdown;
pub mod ca;
pub mod cluster;
pub mod console;
pub mod enroll;
pub mod host;
pub mod rootfs;
pub mod server;
pub mod vm;
pub mod vpn;

pub use ca::Ca;
pub use cluster::Cluster;
pub use server::{Project, Serve};
pub use vm::{Forward, LanNic, RunResult, Vm, VmSpec};
pub use vpn::OpenVpnServer;

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
    /// Tunnel up to Alive in OAR (the hook itself is bounded by `[limits] hook_budget_ms`).
    pub const ALIVE: Duration = Duration::from_secs(30);
    /// Power-off or revocation to Absent in OAR (client-disconnect hook).
    pub const ABSENT: Duration = Duration::from_secs(20);
    /// A revoked node is watched until the server has refused three more of its reconnections
    /// (its client retries every 2 s: `connect-retry 1 2`); it must stay out all along.
    pub const REVOKED_WATCH: Duration = Duration::from_secs(60);
}

/// The port the guest sees the manifest server on (10.0.2.100:PORT inside every guest).
pub const GUEST_SERVE_PORT: u16 = 8080;
/// The port the guest sees the OpenVPN server on: `[openvpn] remotes`' default, 10.0.2.100:1194.
pub const GUEST_VPN_PORT: u16 = 1194;
pub const GUEST_HOST_IP: &str = "10.0.2.100";

/// Polls a condition (every 100 ms) until it returns `Some`, within a deadline; panics naming
/// what it waited for. The suites' one definition, in idhal-test-support.
pub use idhal_test_support::wait_until;

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

/// Builds (once) the binaries and the base image. `None` means "skip": the host cannot run VMs,
/// and `idhal_test_support::skip_or_fail` said so (under scripts/test.sh or CI it panics instead).
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
        Err(e) => {
            idhal_test_support::skip_or_fail(&format!("VM tests: {e}"));
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

/// How an [`Env`]'s server side is set up.
pub struct EnvOptions {
    /// The server config (`--config`) without `[openvpn]`, which the harness writes (see
    /// [`Ca::init`]). Default: no scheduler, no DNS.
    pub server_toml: String,
    /// `idhal ca init --pool`; default `[names] pool` (10.134.0.0/16).
    pub pool: Option<String>,
    /// Start the rendered OpenVPN server, and forward the guests' 10.0.2.100:1194 to it.
    pub vpn: bool,
    /// More keys of the `[openvpn]` section the harness writes (`client_to_client = true\n`).
    pub openvpn_toml: String,
}

impl Default for EnvOptions {
    fn default() -> Self {
        EnvOptions {
            server_toml: "[scheduler]\nbackend = \"none\"\n[dns]\nupdate = \"off\"\n".into(),
            pool: None,
            vpn: false,
            openvpn_toml: String::new(),
        }
    }
}

/// One test's world: temp dir, project (keys, scriptlets, publication dir), the project's CA,
/// a running `idhal serve` (manifests + `POST /enroll`), the OpenVPN server if asked for, and
/// the node's state disk (its own copy).
pub struct Env {
    pub name: String,
    pub dir: tempfile::TempDir,
    pub shared: &'static Shared,
    pub project: Project,
    pub ca: Ca,
    pub serve: Serve,
    pub vpn: Option<OpenVpnServer>,
    pub disk: PathBuf,
    boots: u32,
    initrds: std::cell::Cell<u32>,
    _slot: MutexGuard<'static, ()>,
}

impl Env {
    /// An env with a CA and `idhal serve`, no OpenVPN, no scheduler or DNS backends.
    pub fn new(name: &str) -> Option<Env> {
        Env::with(name, EnvOptions::default())
    }

    pub fn with(name: &str, opts: EnvOptions) -> Option<Env> {
        let shared = shared()?;
        let slot = vm_slot();
        let dir = tempfile::Builder::new()
            .prefix(&format!("idhal-vm-{name}-"))
            .tempdir()
            .expect("temp dir");
        let mut project = Project::new(&shared.idhal, dir.path());
        let ca = Ca::init(
            &shared.idhal,
            &dir.path().join("server"),
            &opts.server_toml,
            &opts.openvpn_toml,
            opts.pool.as_deref(),
        );
        // Nodes learn the enrollment key only from their signed manifest.
        project.params.push(format!("enroll-key={}", ca.enroll_key));
        let serve = Serve::start(
            &shared.idhal,
            &project.pubdir,
            &dir.path().join("serve.log"),
            Some((&ca.state, &ca.config)),
        );
        let vpn = opts.vpn.then(|| OpenVpnServer::start(&ca));
        let disk = dir.path().join("state.img");
        let seed = dir.path().join("seed");
        std::fs::create_dir_all(&seed).unwrap();
        ib::disk::make_state_disk(&seed, &disk, 64).expect("state disk");
        Some(Env {
            name: name.into(),
            dir,
            shared,
            project,
            ca,
            serve,
            vpn,
            disk,
            boots: 0,
            initrds: std::cell::Cell::new(0),
            _slot: slot,
        })
    }

    /// `idhal token create --type TYPE ARGS…` into a file of this env's dir, for
    /// `spec.fw_cfg.push((enroll::FW_CFG_TOKEN.into(), file))`. Returns (token id, file).
    pub fn token(&self, node_type: &str, args: &[&str]) -> (String, PathBuf) {
        let token = self.ca.token(node_type, args);
        let id = token.split('.').next().unwrap().to_string();
        let file = self.path().join(format!("token-{id}"));
        std::fs::write(&file, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        (id, file)
    }

    /// The OpenVPN server; panics when the env was made without `vpn`.
    pub fn vpn(&self) -> &OpenVpnServer {
        self.vpn.as_ref().expect("EnvOptions { vpn: true, .. }")
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
            kernel: self.shared.base.boot_kernel().to_path_buf(),
            initrd,
            disk: self.disk.clone(),
            disk_format: "raw".into(),
            forwards: std::iter::once(Forward {
                guest_port: GUEST_SERVE_PORT,
                host_port: self.serve.port,
            })
            .chain(self.vpn.as_ref().map(|v| Forward {
                guest_port: GUEST_VPN_PORT,
                host_port: v.port,
            }))
            .collect(),
            fw_cfg: vec![],
            cmdline: vec![format!(
                "idhal.server=http://{GUEST_HOST_IP}:{GUEST_SERVE_PORT}/"
            )],
            memory_mib: 256,
            lan: None,
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
        let keep = std::env::var("IDHAL_KEEP_VM_DIR").ok();
        if std::thread::panicking() {
            eprintln!(
                "----- idhal serve log ({}) -----\n{}",
                self.name,
                self.serve.log_text()
            );
        }
        // Keep the evidence when asked to: a failing test's dir, or every dir with `all`.
        if keep.as_deref() == Some("all") || (keep.is_some() && std::thread::panicking()) {
            self.dir.disable_cleanup(true);
            eprintln!("IDHAL_KEEP_VM_DIR: kept {}", self.dir.path().display());
        }
    }
}
