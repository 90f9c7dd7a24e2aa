//! idhal-image: builds the bootable test vnode (Debian cloud kernel + a small busybox initramfs
//! with the agent, OpenVPN, WireGuard's `wg` and the modules they need) from pinned Debian
//! packages, reproducibly and cached, plus the ext4 state disk, without mounting anything on the
//! host.
pub mod bake;
pub mod cpio;
pub mod disk;
pub mod elf;
pub mod kernel;
pub mod lock;

use cpio::{Node, Tree};
use lock::Lock;
use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel modules in load order (insmod does not resolve dependencies): virtio transport, then
/// the network and block drivers, tun for OpenVPN, fw_cfg for the enrollment token, then
/// WireGuard for direct paths between nodes (docs/direct-paths.md) after the crypto and UDP
/// tunnel modules it needs (read from each module's `depends=`; libblake2s is built in).
pub const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring",
    "kernel/drivers/virtio/virtio",
    "kernel/drivers/virtio/virtio_pci_modern_dev",
    "kernel/drivers/virtio/virtio_pci_legacy_dev",
    "kernel/drivers/virtio/virtio_pci",
    "kernel/net/core/failover",
    "kernel/drivers/net/net_failover",
    "kernel/drivers/net/virtio_net",
    "kernel/drivers/block/virtio_blk",
    "kernel/drivers/net/tun",
    "kernel/drivers/firmware/qemu_fw_cfg",
    "kernel/lib/crypto/libchacha",
    "kernel/arch/x86/crypto/chacha-x86_64",
    "kernel/arch/x86/crypto/poly1305-x86_64",
    "kernel/lib/crypto/libchacha20poly1305",
    "kernel/lib/crypto/libcurve25519-generic",
    "kernel/arch/x86/crypto/curve25519-x86_64",
    "kernel/net/ipv4/udp_tunnel",
    "kernel/net/ipv6/ip6_udp_tunnel",
    "kernel/drivers/net/wireguard/wireguard",
];

/// Dynamic executables copied into the initramfs with the libraries they need (from the pins):
/// OpenVPN, and `wg` for the direct paths (busybox's `ip` creates the WireGuard link).
const ELF_PROGRAMS: &[(&str, &str)] = &[
    ("openvpn", "usr/sbin/openvpn"),
    ("wireguard-tools", "usr/bin/wg"),
];

pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// The agent's configuration in the image: the server comes from the kernel command line
/// (`idhal.server=`), so one image boots against any server.
pub const AGENT_CONFIG: &str = "\
# idhal test vnode: the server URL comes from the kernel command line (idhal.server=).
key = /etc/idhal/server.pub
state_dir = /var/lib/idhal
retries = 3
connect_timeout = 5s
timeout = 30s
";

/// Bumped when the layout of the output changes, so old cache entries are not reused.
/// v2: the initramfs is an uncompressed cpio (`initramfs.cpio`).
const FORMAT: &str = "idhal-image-v2";

/// The base initramfs in a cache entry: an uncompressed newc archive. Under TCG the kernel's
/// gunzip of the 16 MiB archive cost ~0.3 s of every boot (init at 2.08 s of wall time with
/// gzip, 1.76 s without: median of 5 interleaved boots each); the 9 MiB it adds on disk cost
/// nothing measurable to load (QEMU hands the initrd over by fw_cfg DMA).
const INITRAMFS: &str = "initramfs.cpio";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("lock file: {0}")]
    Lock(String),
    #[error(
        "{package}: sha256 {got} is not the pinned {expected} (a changed mirror, or a wrong pin)"
    )]
    Hash {
        package: String,
        expected: String,
        got: String,
    },
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    #[error("{0}: not an x86_64 ELF file this builder can read")]
    Elf(String),
    #[error("baking {image}: {why}\n--- helper console ---\n{console}")]
    Bake {
        image: PathBuf,
        why: String,
        console: String,
    },
    #[error("{what} not found in the pinned packages: {detail}")]
    Missing { what: String, detail: String },
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Runs a command, returns its stdout; a failure carries the command line and its stderr.
pub fn run_cmd(cmd: &mut Command) -> Result<String, Error> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| Error::Command {
        cmd: line.clone(),
        status: "not started".into(),
        stderr: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(Error::Command {
            cmd: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn sha256_hex(data: &[u8]) -> String {
    hmac_sha256::Hash::hash(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What to build the base image from.
pub struct BaseSpec<'a> {
    pub lock: &'a Lock,
    /// The static agent binary (x86_64 musl).
    pub agent: &'a Path,
    /// Holds downloaded .deb files and built images (`debs/`, `base-<hash>/`).
    pub cache: &'a Path,
    /// Same timestamp on every initramfs entry (SOURCE_DATE_EPOCH).
    pub mtime: u32,
}

/// The cached output: a kernel and an (uncompressed) initramfs without any key or node-specific
/// file.
#[derive(Debug, Clone)]
pub struct BaseImage {
    /// The kernel as Debian ships it (bzImage).
    pub kernel: PathBuf,
    /// The same kernel unpacked into an ELF QEMU boots through PVH (faster under TCG), when the
    /// bzImage allows it ([`kernel::pvh_elf`]).
    pub kernel_pvh: Option<PathBuf>,
    pub initramfs: PathBuf,
    pub kernel_version: String,
    /// Hash of every input: the cache key.
    pub key: String,
    /// False when it came from the cache.
    pub built: bool,
}

/// Builds (or finds in the cache) the base image. The cache key covers the lock, the agent, the
/// init script, the module list and the format, so a change to any of them rebuilds.
pub fn build_base(spec: &BaseSpec) -> Result<BaseImage, Error> {
    let agent = fs::read(spec.agent).map_err(|e| Error::io(spec.agent, e))?;
    let mut h = hmac_sha256::Hash::new();
    for part in [
        FORMAT.as_bytes(),
        &agent,
        INIT_SCRIPT.as_bytes(),
        AGENT_CONFIG.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    for p in &spec.lock.pins {
        h.update(format!("{} {} {}\n", p.name, p.version, p.sha256));
    }
    h.update(MODULES.join("\n"));
    h.update(spec.mtime.to_le_bytes());
    let key: String = h
        .finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    let kpin = spec.lock.kernel();
    let kernel_version = kpin
        .name
        .strip_prefix("linux-image-")
        .unwrap_or(&kpin.name)
        .to_string();
    let out = spec.cache.join(format!("base-{key}"));
    let image = |built| BaseImage {
        kernel: out.join("vmlinuz"),
        kernel_pvh: Some(out.join(kernel::PVH_KERNEL)).filter(|p| p.is_file()),
        initramfs: out.join(INITRAMFS),
        kernel_version: kernel_version.clone(),
        key: key.clone(),
        built,
    };
    if out.join(INITRAMFS).is_file() {
        return Ok(image(false));
    }

    let debs = spec.lock.fetch(spec.cache)?;
    let work = spec
        .cache
        .join(format!(".build-{key}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    let result = assemble(spec, &debs, &work, &agent, &kernel_version);
    let r = result.and_then(|_| {
        // Atomic publish: a concurrent builder that got there first wins; ours is identical.
        match fs::rename(work.join("out"), &out) {
            Ok(()) => Ok(()),
            Err(_) if out.join(INITRAMFS).is_file() => Ok(()),
            Err(e) => Err(Error::io(&out, e)),
        }
    });
    let _ = fs::remove_dir_all(&work);
    r.map(|_| image(true))
}

fn assemble(
    spec: &BaseSpec,
    debs: &[PathBuf],
    work: &Path,
    agent: &[u8],
    kver: &str,
) -> Result<(), Error> {
    let x = work.join("x");
    let out = work.join("out");
    fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    // Each package in its own directory so we know which pin a file came from.
    let mut roots = Vec::new();
    for (pin, deb) in spec.lock.pins.iter().zip(debs) {
        let root = x.join(&pin.name);
        fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
        let mut cmd = Command::new("dpkg-deb");
        cmd.arg("-x").arg(deb).arg(&root);
        run_cmd(&mut cmd)?;
        roots.push((pin.name.clone(), root));
    }
    let root_of = |name: &str| {
        roots
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r.clone())
    };

    let mut t = Tree::default();
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "var/lib/idhal",
        "etc/idhal",
    ] {
        t.insert(d, Node::Dir { mode: 0o755 });
    }
    t.insert("tmp", Node::Dir { mode: 0o1777 });
    t.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec());

    let bb = root_of("busybox-static")
        .expect("busybox pin")
        .join("bin/busybox");
    t.file("bin/busybox", 0o755, read(&bb)?);
    // Everything else gets linked by `busybox --install -s` at boot.
    t.symlink("bin/sh", "busybox");

    t.file("usr/local/sbin/idhal-bootstrap", 0o755, agent.to_vec());
    t.file(
        "etc/idhal/bootstrap.conf",
        0o644,
        AGENT_CONFIG.as_bytes().to_vec(),
    );

    // Modules from the kernel package, flat, plus the order the init loads them in.
    let kroot = root_of(&spec.lock.kernel().name).expect("kernel pin");
    let kimage = kroot.join(format!("boot/vmlinuz-{kver}"));
    fs::copy(&kimage, out.join("vmlinuz")).map_err(|e| Error::io(&kimage, e))?;
    // Best effort: without it the bzImage is booted, as before (a kernel that is not LZ4 or has
    // no PVH entry).
    if let Some(why) = kernel::unpack_into(&out)? {
        eprintln!("idhal-image: {kimage:?} stays a bzImage only: {why}");
    }
    let mut order = String::new();
    for m in MODULES {
        let src = kroot.join(format!("lib/modules/{kver}/{m}.ko"));
        let name = m.rsplit('/').next().unwrap_or(m);
        t.file(&format!("lib/modules/{name}.ko"), 0o644, read(&src)?);
        order.push_str(name);
        order.push('\n');
    }
    t.file("etc/idhal-image/modules", 0o644, order.into_bytes());

    // Dynamic programs and the closure of their DT_NEEDED libraries, searched in every pinned
    // package: a library missing from the pins is an error, never silently taken from the host.
    let lib_dirs: Vec<PathBuf> = roots
        .iter()
        .flat_map(|(_, r)| {
            [
                r.join("lib/x86_64-linux-gnu"),
                r.join("usr/lib/x86_64-linux-gnu"),
            ]
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut todo: Vec<(String, PathBuf)> = Vec::new();
    for (pkg, path) in ELF_PROGRAMS {
        let src = root_of(pkg).expect("program pin").join(path);
        t.file(path, 0o755, read(&src)?);
        todo.push((path.to_string(), src));
    }
    while let Some((what, src)) = todo.pop() {
        let deps = elf::deps(&read(&src)?, &what)?;
        if let Some(interp) = deps.interp {
            if seen.insert(interp.clone()) {
                let name = interp.rsplit('/').next().unwrap_or(&interp).to_string();
                let found = find_lib(&lib_dirs, &name, &what)?;
                t.file(interp.trim_start_matches('/'), 0o755, read(&found)?);
            }
        }
        for soname in deps.needed {
            if seen.insert(soname.clone()) {
                let found = find_lib(&lib_dirs, &soname, &what)?;
                // Symlinks resolved: the initramfs holds one regular file per soname.
                t.file(
                    &format!("lib/x86_64-linux-gnu/{soname}"),
                    0o755,
                    read(&found)?,
                );
                todo.push((soname, found));
            }
        }
    }

    let archive = t.to_newc(spec.mtime);
    let path = out.join(INITRAMFS);
    let mut f = fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
    f.write_all(&archive).map_err(|e| Error::io(&path, e))?;
    f.sync_all().map_err(|e| Error::io(&path, e))?;
    Ok(())
}

fn read(p: &Path) -> Result<Vec<u8>, Error> {
    fs::read(p).map_err(|e| Error::io(p, e))
}

fn find_lib(dirs: &[PathBuf], soname: &str, needed_by: &str) -> Result<PathBuf, Error> {
    dirs.iter()
        .map(|d| d.join(soname))
        .find(|p| p.exists())
        .and_then(|p| fs::canonicalize(p).ok())
        .ok_or_else(|| Error::Missing {
            what: soname.to_string(),
            detail: format!("needed by {needed_by}; add its package to the lock"),
        })
}

impl BaseImage {
    /// The kernel to hand to QEMU's `-kernel`: the PVH ELF when there is one.
    pub fn boot_kernel(&self) -> &Path {
        self.kernel_pvh.as_deref().unwrap_or(&self.kernel)
    }
}

/// Files added per node on top of the base (config overrides, the pinned key, test fixtures).
pub type Overlay = Tree;

/// Writes a node's initrd: the cached base followed by an uncompressed overlay archive. The
/// kernel unpacks concatenated archives in order, so the overlay adds or replaces files without
/// rebuilding (or recompressing) the base.
pub fn node_initrd(
    base: &BaseImage,
    overlay: &Overlay,
    mtime: u32,
    out: &Path,
) -> Result<(), Error> {
    let mut data = read(&base.initramfs)?;
    // The next archive must start 4-byte aligned (the kernel skips zeros between archives); a
    // newc archive's length is a multiple of 4 already, this keeps any base safe.
    while !data.len().is_multiple_of(4) {
        data.push(0);
    }
    data.extend_from_slice(&overlay.to_newc(mtime));
    fs::write(out, data).map_err(|e| Error::io(out, e))
}

/// The overlay that bakes a server key: the agent pins it on first boot.
pub fn key_overlay(server_pub: &[u8]) -> Overlay {
    let mut t = Tree::default();
    t.file("etc/idhal/server.pub", 0o644, server_pub.to_vec());
    t
}

/// `$XDG_CACHE_HOME/idhal-image`, else `~/.cache/idhal-image`, else a directory under /tmp.
pub fn default_cache() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(x).join("idhal-image");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/idhal-image"),
        None => std::env::temp_dir().join("idhal-image-cache"),
    }
}

#[cfg(test)]
mod tests {
    /// FIPS 180-2 vectors, including a multi-block one: the pins in debian.lock are these hex
    /// strings, so a different digest or encoding would refuse every package.
    #[test]
    fn sha256_hex_matches_the_standard() {
        assert_eq!(
            super::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            super::sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            super::sha256_hex(&vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
    }
}
