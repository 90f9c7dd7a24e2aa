//! The node's persistent state disk: ext4 made with `mkfs.ext4 -d` from a seed directory, so
//! nothing is mounted on the host; read back with `debugfs`, also without mounting.
use crate::{run_cmd, Error};
use std::path::Path;
use std::process::Command;

/// Creates `out` (raw ext4, label `state`, `size_mib` MiB) holding the files of `seed`.
pub fn make_state_disk(seed: &Path, out: &Path, size_mib: u32) -> Result<(), Error> {
    let _ = std::fs::remove_file(out);
    run_cmd(
        Command::new(mkfs())
            .args(["-q", "-F", "-L", "state", "-E", "root_owner=0:0", "-d"])
            .arg(seed)
            .arg(out)
            .arg(format!("{size_mib}M")),
    )?;
    Ok(())
}

/// Reads one file from an ext4 image without mounting it (`debugfs -R 'cat PATH'`). `None` when
/// the file does not exist. Only reliable after the guest unmounted it (a clean power-off).
pub fn read_file(image: &Path, path: &str) -> Result<Option<Vec<u8>>, Error> {
    let out = Command::new(debugfs())
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .map_err(|e| Error::io(image, e))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if stderr.contains("File not found") {
        return Ok(None);
    }
    if !out.status.success() {
        return Err(Error::Command {
            cmd: format!("debugfs -R 'cat {path}' {}", image.display()),
            status: out.status.to_string(),
            stderr: stderr.into_owned(),
        });
    }
    Ok(Some(out.stdout))
}

// /sbin is not on a non-root user's PATH on Debian.
fn mkfs() -> &'static str {
    if Path::new("/usr/sbin/mkfs.ext4").exists() {
        "/usr/sbin/mkfs.ext4"
    } else {
        "mkfs.ext4"
    }
}
fn debugfs() -> &'static str {
    if Path::new("/usr/sbin/debugfs").exists() {
        "/usr/sbin/debugfs"
    } else {
        "debugfs"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_round_trip_without_mounting() {
        let d = tempfile::tempdir().unwrap();
        let seed = d.path().join("seed");
        std::fs::create_dir_all(seed.join("sub")).unwrap();
        std::fs::write(seed.join("sub/hello"), b"hi\n").unwrap();
        let img = d.path().join("state.img");
        make_state_disk(&seed, &img, 16).unwrap();
        assert_eq!(read_file(&img, "/sub/hello").unwrap().unwrap(), b"hi\n");
        assert_eq!(read_file(&img, "/nope").unwrap(), None);
    }
}
