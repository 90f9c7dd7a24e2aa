//! A reproducible cpio "newc" writer (the format the kernel unpacks as initramfs): entries in
//! byte order of their path, every timestamp the same, owner root, inode numbers by position.
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
}

/// A file tree by path (no leading `/`). A BTreeMap gives the sorted order for free, and parents
/// sort before their children because a path is a prefix of its children's.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    pub nodes: BTreeMap<String, Node>,
}

impl Tree {
    /// Adds `path` and any missing parent directories (mode 0755).
    pub fn insert(&mut self, path: &str, node: Node) {
        let path = path.trim_start_matches('/');
        let mut parent = String::new();
        for part in path
            .split('/')
            .collect::<Vec<_>>()
            .split_last()
            .map_or(&[][..], |(_, p)| p)
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            self.nodes
                .entry(parent.clone())
                .or_insert(Node::Dir { mode: 0o755 });
        }
        self.nodes.insert(path.to_string(), node);
    }

    pub fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.insert(path, Node::File { mode, data });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(
            path,
            Node::Symlink {
                target: target.into(),
            },
        );
    }

    /// The uncompressed archive. `mtime` is the same for every entry (SOURCE_DATE_EPOCH).
    pub fn to_newc(&self, mtime: u32) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, (path, node)) in self.nodes.iter().enumerate() {
            let (mode, nlink, data): (u32, u32, &[u8]) = match node {
                Node::Dir { mode } => (0o040000 | mode, 2, &[]),
                Node::File { mode, data } => (0o100000 | mode, 1, data),
                Node::Symlink { target } => (0o120000 | 0o777, 1, target.as_bytes()),
            };
            entry(&mut out, path, i as u32 + 1, mode, nlink, mtime, data);
        }
        entry(&mut out, "TRAILER!!!", 0, 0, 1, 0, &[]);
        // The kernel wants each archive of a concatenation 4-byte aligned; 512 is cpio's habit.
        while !out.len().is_multiple_of(512) {
            out.push(0);
        }
        out
    }
}

fn entry(out: &mut Vec<u8>, name: &str, ino: u32, mode: u32, nlink: u32, mtime: u32, data: &[u8]) {
    let namesize = name.len() as u32 + 1;
    // magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    // rdevminor, namesize, check
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        mtime,
        data.len() as u32,
        0,
        0,
        0,
        0,
        namesize,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_tree_same_bytes_and_parents_first() {
        let build = |order: &[&str]| {
            let mut t = Tree::default();
            for p in order {
                t.file(p, 0o644, p.as_bytes().to_vec());
            }
            t.symlink("bin/sh", "busybox");
            t.to_newc(0)
        };
        let a = build(&["etc/idhal/x", "bin/busybox", "a-b"]);
        let b = build(&["bin/busybox", "a-b", "etc/idhal/x"]);
        assert_eq!(a, b);
        assert_eq!(a.len() % 512, 0);
        let text = String::from_utf8_lossy(&a);
        let pos = |s: &str| text.find(s).unwrap();
        assert!(pos("etc\0") < pos("etc/idhal\0"));
        assert!(pos("etc/idhal\0") < pos("etc/idhal/x\0"));
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn the_system_cpio_reads_it() {
        // GNU cpio as an independent reader of our format, when installed.
        if std::process::Command::new("cpio")
            .arg("--version")
            .output()
            .is_err()
        {
            idhal_test_support::skip_or_fail("GNU cpio (the interop check's reader) not installed");
            return;
        }
        let mut t = Tree::default();
        t.file("etc/hello", 0o600, b"hi\n".to_vec());
        t.symlink("link", "etc/hello");
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        std::fs::write(&archive, t.to_newc(0)).unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("cpio -it < {}", archive.display()))
            .output()
            .unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "etc\netc/hello\nlink\n"
        );
    }
}
