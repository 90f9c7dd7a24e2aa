//! Baking the agent into an existing Debian-style disk image (raw or qcow2) without mounting it
//! on the host: the image is booted under QEMU with our kernel and the helper initramfs in
//! `idhal.mode=bake`, whose init copies `/bake/*` onto the image's root file system.
use crate::cpio::Tree;
use crate::{node_initrd, BaseImage, Error};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The units users install (bootstrap/dist), baked as they are shipped.
const SERVICE: &str = include_str!("../../bootstrap/dist/idhal-bootstrap.service");
const TIMER: &str = include_str!("../../bootstrap/dist/idhal-bootstrap.timer");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Raw,
    Qcow2,
}

impl ImageFormat {
    /// From the file name: `.qcow2` is qcow2, anything else raw.
    pub fn guess(path: &Path) -> ImageFormat {
        match path.extension().and_then(|e| e.to_str()) {
            Some("qcow2") => ImageFormat::Qcow2,
            _ => ImageFormat::Raw,
        }
    }
    fn qemu_name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        }
    }
}

/// What lands in the image: the agent, its config, the key, the systemd units, enabled (the
/// symlinks `systemctl enable` would make).
pub fn bake_overlay(agent: &[u8], server_pub: &[u8], config: &str) -> Tree {
    let mut t = Tree::default();
    t.file("bake/usr/local/sbin/idhal-bootstrap", 0o755, agent.to_vec());
    t.file("bake/etc/idhal/server.pub", 0o644, server_pub.to_vec());
    t.file(
        "bake/etc/idhal/bootstrap.conf",
        0o644,
        config.as_bytes().to_vec(),
    );
    let sys = "bake/etc/systemd/system";
    t.file(
        &format!("{sys}/idhal-bootstrap.service"),
        0o644,
        SERVICE.as_bytes().to_vec(),
    );
    t.file(
        &format!("{sys}/idhal-bootstrap.timer"),
        0o644,
        TIMER.as_bytes().to_vec(),
    );
    t.symlink(
        &format!("{sys}/multi-user.target.wants/idhal-bootstrap.service"),
        "/etc/systemd/system/idhal-bootstrap.service",
    );
    t.symlink(
        &format!("{sys}/timers.target.wants/idhal-bootstrap.timer"),
        "/etc/systemd/system/idhal-bootstrap.timer",
    );
    t
}

/// A config for a baked image talking to `server`.
pub fn baked_config(server: &str) -> String {
    format!(
        "# Written by idhal-image bake. The kernel command line (idhal.server=) overrides it.\n\
         server = {server}\nkey = /etc/idhal/server.pub\nstate_dir = /var/lib/idhal\n"
    )
}

/// Boots `image` with the helper initramfs and `overlay`; Ok once its init reported `bake=ok`
/// and QEMU exited. `work` holds the initrd and the console log (kept for inspection).
pub fn bake(
    base: &BaseImage,
    image: &Path,
    format: ImageFormat,
    overlay: &Tree,
    work: &Path,
    timeout: Duration,
) -> Result<(), Error> {
    std::fs::create_dir_all(work).map_err(|e| Error::io(work, e))?;
    let initrd = work.join("bake-initrd.img");
    node_initrd(base, overlay, 0, &initrd)?;
    let console = work.join("bake-console.log");
    let mut child = Command::new("/usr/bin/qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-smp",
            "1",
            "-m",
            "256",
            "-nodefaults",
            "-no-user-config",
        ])
        .args(["-display", "none", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(base.boot_kernel())
        .arg("-initrd")
        .arg(&initrd)
        .args([
            "-append",
            "console=ttyS0 quiet loglevel=3 panic=1 idhal.mode=bake",
        ])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format={}",
            image.display(),
            format.qemu_name()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| Error::io(Path::new("/usr/bin/qemu-system-x86_64"), e))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| Error::io(image, e))? {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        // Waiting for a child process; the deadline bounds it.
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    if status.is_some() && log.contains("IDHAL-EVENT bake=ok") {
        return Ok(());
    }
    Err(Error::Bake {
        image: image.to_path_buf(),
        why: match status {
            None => format!("no result within {timeout:?}"),
            Some(_) if log.contains("image=not-found") => {
                "no ext4 root file system (with /etc) on vda, vda1, vda2 or vda3".into()
            }
            Some(st) => format!("QEMU exited ({st}) without bake=ok"),
        },
        console: log,
    })
}
