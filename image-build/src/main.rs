//! `idhal-image`: command-line front end of the image builder (parsing and dispatch only).
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use idhal_image_build::{self as ib, lock::Lock};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser, Debug)]
#[command(
    name = "idhal-image",
    version,
    about = "Build idhal test vnodes (kernel + initramfs + state disk) from pinned Debian packages",
    long_about = "Build a bootable idhal test vnode from pinned Debian 12 packages: the cloud kernel, a \
small busybox initramfs holding the static agent, its config, OpenVPN with its libraries and the kernel \
modules they need, and an ext4 state disk made without mounting anything.\n\n\
Packages come from image-build/debian.lock (name, version, sha256), fetched with `apt-get download` \
and refused if their hash differs. The result is reproducible (sorted archive, fixed timestamps) and \
cached under --cache-dir by a hash of every input, so a second build takes milliseconds.\n\n\
vmlinux is vmlinuz unpacked (an ELF with a PVH entry): QEMU boots it directly, about 0.2 s sooner \
under TCG; either works with -kernel.",
    after_help = "Examples:\n  \
idhal-image build --agent target/x86_64-unknown-linux-musl/release/idhal-bootstrap \\\n      \
--key keys/idhal.pub --out vnode/\n  \
qemu-system-x86_64 -accel tcg -cpu qemu64,+rdrand -m 256 -nodefaults -display none -serial stdio \\\n      \
-kernel vnode/vmlinux -initrd vnode/initrd.img \\\n      \
-append 'console=ttyS0 quiet idhal.server=http://10.0.2.100:8080/' \\\n      \
-drive file=vnode/state.img,if=none,id=d0,format=raw -device virtio-blk-pci,drive=d0 \\\n      \
-netdev 'user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:8080-cmd:socat -lf /tmp/fwd.log - TCP:127.0.0.1:8080' \\\n      \
-device virtio-net-pci,netdev=n0,romfile=\n  \
idhal-image lock > image-build/debian.lock    # refresh the pins (then commit)\n\n\
See docs/image-build.md."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a vnode: OUT/vmlinuz, OUT/vmlinux (the same kernel unpacked, when it can be),
    /// OUT/initrd.img (base + the baked key), OUT/state.img.
    Build {
        /// The static agent (x86_64 musl build of idhal-bootstrap).
        #[arg(long)]
        agent: PathBuf,
        /// The server's public key to bake in (/etc/idhal/server.pub); without it the node
        /// needs idhal.pin= on its kernel command line.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        common: Common,
        /// Size of the state disk.
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        disk_size: u32,
    },
    /// Bake the agent, its config, the key and the enabled systemd units into an existing
    /// Debian-style disk image (raw or qcow2), without mounting it on the host: the image is
    /// booted under QEMU with a helper initramfs that copies the files onto its root file system
    /// (ext4 on the whole disk or on partition 1-3).
    Bake {
        /// The disk image, changed in place.
        #[arg(long)]
        image: PathBuf,
        /// raw or qcow2 (default: from the file name, `.qcow2` or raw).
        #[arg(long)]
        format: Option<String>,
        /// The static agent (x86_64 musl build of idhal-bootstrap).
        #[arg(long)]
        agent: PathBuf,
        /// The server's public key, pinned by the node on first boot.
        #[arg(long)]
        key: PathBuf,
        /// Base URL of the manifest server, written into /etc/idhal/bootstrap.conf.
        #[arg(long, required_unless_present = "config")]
        server: Option<String>,
        /// A complete bootstrap.conf to install instead.
        #[arg(long, conflicts_with = "server")]
        config: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Make an empty ext4 state disk (no mounting: mkfs.ext4 -d).
    StateDisk {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 64, value_name = "MIB")]
        size: u32,
        /// Files to put on it (default: none).
        #[arg(long)]
        seed: Option<PathBuf>,
    },
    /// Print a fresh lock for the same package names (the versions apt offers now), hashed.
    Lock {
        /// Replace the kernel package (e.g. linux-image-6.1.0-57-cloud-amd64).
        #[arg(long)]
        kernel: Option<String>,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args, Debug)]
struct Common {
    /// Lock file (default: the one compiled in from image-build/debian.lock).
    #[arg(long)]
    lock: Option<PathBuf>,
    /// Downloaded packages and built images.
    #[arg(long, env = "IDHAL_IMAGE_CACHE", default_value_os_t = ib::default_cache())]
    cache_dir: PathBuf,
    /// Timestamp of every initramfs entry.
    #[arg(long, env = "SOURCE_DATE_EPOCH", default_value_t = 0)]
    source_date_epoch: u32,
}

impl Common {
    fn lock(&self) -> Result<Lock> {
        let text = match &self.lock {
            Some(p) => {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
            }
            None => ib::lock::DEFAULT_LOCK.to_string(),
        };
        Ok(Lock::parse(&text)?)
    }
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Build {
            agent,
            key,
            out,
            common,
            disk_size,
        } => {
            let lock = common.lock()?;
            let t = Instant::now();
            let base = ib::build_base(&ib::BaseSpec {
                lock: &lock,
                agent: &agent,
                cache: &common.cache_dir,
                mtime: common.source_date_epoch,
            })?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            let overlay = match &key {
                Some(k) => ib::key_overlay(
                    &std::fs::read(k).with_context(|| format!("reading {}", k.display()))?,
                ),
                None => ib::Overlay::default(),
            };
            std::fs::copy(&base.kernel, out.join("vmlinuz")).context("copying the kernel")?;
            let pvh = out.join(ib::kernel::PVH_KERNEL);
            match &base.kernel_pvh {
                Some(elf) => {
                    std::fs::copy(elf, &pvh).context("copying the unpacked kernel")?;
                }
                // A stale one from an earlier kernel would be booted instead of this one.
                None => match std::fs::remove_file(&pvh) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).context("removing the old unpacked kernel"),
                },
            }
            ib::node_initrd(
                &base,
                &overlay,
                common.source_date_epoch,
                &out.join("initrd.img"),
            )?;
            let seed = tempfile_dir(&out)?;
            ib::disk::make_state_disk(&seed, &out.join("state.img"), disk_size)?;
            let _ = std::fs::remove_dir(&seed);
            let size = std::fs::metadata(out.join("initrd.img"))?.len();
            println!(
                "kernel {} · initrd {} KiB · base {} ({}) · {:.2}s",
                base.kernel_version,
                size / 1024,
                base.key,
                if base.built { "built" } else { "cached" },
                t.elapsed().as_secs_f64()
            );
            let vmlinux = if base.kernel_pvh.is_some() {
                format!(" {}/vmlinux", out.display())
            } else {
                String::new()
            };
            println!(
                "wrote {0}/vmlinuz{vmlinux} {0}/initrd.img {0}/state.img",
                out.display()
            );
        }
        Cmd::Bake {
            image,
            format,
            agent,
            key,
            server,
            config,
            common,
        } => {
            let format = match format.as_deref() {
                None => ib::bake::ImageFormat::guess(&image),
                Some("raw") => ib::bake::ImageFormat::Raw,
                Some("qcow2") => ib::bake::ImageFormat::Qcow2,
                Some(other) => anyhow::bail!("--format {other}: expected raw or qcow2"),
            };
            let lock = common.lock()?;
            let t = Instant::now();
            let base = ib::build_base(&ib::BaseSpec {
                lock: &lock,
                agent: &agent,
                cache: &common.cache_dir,
                mtime: common.source_date_epoch,
            })?;
            let config = match (config, server) {
                (Some(c), _) => std::fs::read_to_string(&c)
                    .with_context(|| format!("reading {}", c.display()))?,
                (None, Some(s)) => ib::bake::baked_config(&s),
                (None, None) => unreachable!("clap requires --server or --config"),
            };
            let overlay = ib::bake::bake_overlay(
                &std::fs::read(&agent).with_context(|| format!("reading {}", agent.display()))?,
                &std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?,
                &config,
            );
            let work = common
                .cache_dir
                .join(format!(".bake-{}", std::process::id()));
            ib::bake::bake(
                &base,
                &image,
                format,
                &overlay,
                &work,
                std::time::Duration::from_secs(300),
            )?;
            let _ = std::fs::remove_dir_all(&work);
            println!(
                "baked idhal-bootstrap, /etc/idhal/{{bootstrap.conf,server.pub}} and the enabled units into {} in {:.1}s",
                image.display(),
                t.elapsed().as_secs_f64()
            );
        }
        Cmd::StateDisk { out, size, seed } => {
            let dir = match seed {
                Some(s) => s,
                None => tempfile_dir(out.parent().unwrap_or(std::path::Path::new(".")))?,
            };
            ib::disk::make_state_disk(&dir, &out, size)?;
            println!("wrote {}", out.display());
        }
        Cmd::Lock { kernel, common } => {
            let lock = common.lock()?;
            let names: Vec<String> = lock
                .pins
                .iter()
                .map(|p| match (&kernel, p.name.starts_with("linux-image-")) {
                    (Some(k), true) => k.clone(),
                    _ => p.name.clone(),
                })
                .collect();
            let work = common
                .cache_dir
                .join(format!(".relock-{}", std::process::id()));
            let text = ib::lock::relock(&names, &work);
            let _ = std::fs::remove_dir_all(&work);
            print!("{}", text?);
        }
    }
    Ok(())
}

/// An empty seed directory (mode 0700: it becomes the state disk's root, the agent's state dir).
fn tempfile_dir(parent: &std::path::Path) -> Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let d = parent.join(format!(".seed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(&d)?;
    Ok(d)
}
