//! A minimal Debian 12 root file system with systemd as init, OpenVPN and wireguard-tools
//! (debootstrap), as a raw ext4 disk
//! image made with `mkfs.ext4 -d`: the stand-in for a user's Debian image in the real-init smoke
//! test. Cached (it takes ~40 s); not pinned like the vnode (it is a smoke test of baking).
//! Partitioned like Debian's cloud images (root on partition 1), so baking has to find it there.
use std::path::{Path, PathBuf};
use std::process::Command;

const MIRROR: &str = "http://deb.debian.org/debian";
// v4: wireguard-tools, as in the test vnode (issue 11); the module comes from the helper
// initramfs, which loads its list before switch_root.
const NAME: &str = "debootstrap-bookworm-minbase-systemd-openvpn-wireguard-v4.img";

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
        .args([
            "--variant=minbase",
            "--include=systemd-sysv,openvpn,iproute2,wireguard-tools",
            "bookworm",
        ])
        .arg(&root)
        .arg(MIRROR))
    .and_then(|_| {
        run(Command::new("/usr/sbin/mkfs.ext4")
            .args(["-q", "-F", "-L", "root", "-d"])
            .arg(&root)
            .arg(work.join("root.img"))
            .arg("1G"))
    })
    .and_then(|_| partitioned(&work.join("root.img"), &work.join("disk.img")))
    .and_then(|_| std::fs::rename(work.join("disk.img"), &out).map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&work);
    r?;
    eprintln!(
        "FIGURE debootstrap + mkfs.ext4 -d of the systemd image: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(out)
}

/// `disk` = an MBR with one Linux partition at 1 MiB holding the file system image `fs`.
/// Written by hand (sfdisk is not on a minimal Debian) and copied with `dd conv=sparse`.
fn partitioned(fs: &Path, disk: &Path) -> Result<(), String> {
    let len = std::fs::metadata(fs).map_err(|e| e.to_string())?.len();
    let (start, sectors) = (2048u32, (len / 512) as u32);
    let mut mbr = vec![0u8; 512];
    let e = &mut mbr[446..462];
    e[4] = 0x83; // Linux
                 // CHS fields stay 0xFE/0xFF ("use LBA"), as modern tools write for large disks.
    e[1..4].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    e[5..8].copy_from_slice(&[0xFE, 0xFF, 0xFF]);
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    std::fs::write(disk, &mbr).map_err(|e| e.to_string())?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .map_err(|e| e.to_string())?;
    f.set_len(u64::from(start) * 512 + len)
        .map_err(|e| e.to_string())?;
    let o = Command::new("dd")
        .arg(format!("if={}", fs.display()))
        .arg(format!("of={}", disk.display()))
        .args(["bs=1M", "seek=1", "conv=notrunc,sparse", "status=none"])
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(format!("dd: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}
