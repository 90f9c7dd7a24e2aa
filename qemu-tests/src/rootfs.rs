//! A minimal Debian 12 root file system with systemd as init (debootstrap), as a raw ext4 disk
//! image made with `mkfs.ext4 -d`: the stand-in for a user's Debian image in the real-init smoke
//! test. Cached (it takes ~40 s); not pinned like the vnode (it is a smoke test of baking).
use std::path::{Path, PathBuf};
use std::process::Command;

const MIRROR: &str = "http://deb.debian.org/debian";
const NAME: &str = "debootstrap-bookworm-minbase-systemd-v1.img";

/// Returns the cached image, building it first if needed.
pub fn debian_systemd_image(cache: &Path) -> Result<PathBuf, String> {
    let out = cache.join(NAME);
    if out.is_file() {
        return Ok(out);
    }
    if !crate::host::is_root() {
        return Err("debootstrap needs root (file ownership, chroot)".into());
    }
    let work = cache.join(format!(".debootstrap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let root = work.join("root");
    let t = std::time::Instant::now();
    let run = |cmd: &mut Command| -> Result<(), String> {
        let o = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
        if o.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{cmd:?} failed: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ))
        }
    };
    let r = run(Command::new("/usr/sbin/debootstrap")
        .args(["--variant=minbase", "--include=systemd-sysv", "bookworm"])
        .arg(&root)
        .arg(MIRROR))
    .and_then(|_| {
        run(Command::new("/usr/sbin/mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(work.join("root.img"))
            .arg("1G"))
    })
    .and_then(|_| std::fs::rename(work.join("root.img"), &out).map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&work);
    r?;
    eprintln!(
        "FIGURE debootstrap + mkfs.ext4 -d of the systemd image: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(out)
}
