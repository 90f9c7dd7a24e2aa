//! The scheduler's SSH public key as a scriptlet: the key line validated (no options, nothing
//! a shell could interpret), the idempotent POSIX sh that installs it for root, and writing it
//! into the scriptlet directory `idhal sign` reads.

use crate::publish::{write_atomic, PublishError};
use std::path::{Path, PathBuf};

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("this is a private key: give the .pub file")]
    Private,
    #[error("expected exactly one key line, found {0}")]
    LineCount(usize),
    #[error(
        "key type {0:?} is not one of ssh-ed25519, ssh-rsa, ecdsa-sha2-nistp256/384/521, sk-*"
    )]
    Type(String),
    #[error("the key data is not base64")]
    Data,
    #[error("the comment may only hold A-Z a-z 0-9 . _ - @ + = : / and spaces")]
    Comment,
}

/// Why `write_scriptlet` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum ScriptletError {
    #[error("--name {0:?} must look like NNN-name.sh (digits, dash, A-Z a-z 0-9 - _ .)")]
    BadName(String),
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {path}")]
    Refused {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("creating {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: PublishError,
    },
}

/// A scriptlet `write_scriptlet` wrote.
#[derive(Debug)]
pub struct Written {
    pub path: PathBuf,
    /// The key's type (`ssh-ed25519`), for the admin's confirmation.
    pub key_type: String,
}

/// `NNN-name.sh`: the number orders it among the other scriptlets, the rest becomes its id.
fn valid_file_name(name: &str) -> bool {
    name.ends_with(".sh")
        && name.len() > 7
        && name.as_bytes()[..3].iter().all(u8::is_ascii_digit)
        && name.as_bytes()[3] == b'-'
        && name[4..name.len() - 3]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !name.contains("..")
}

/// Reads the public key in `key_file`, and writes the scriptlet installing it as `out/name`
/// (atomically; `out` is created when missing).
pub fn write_scriptlet(key_file: &Path, out: &Path, name: &str) -> Result<Written, ScriptletError> {
    if !valid_file_name(name) {
        return Err(ScriptletError::BadName(name.to_owned()));
    }
    let text = std::fs::read_to_string(key_file).map_err(|source| ScriptletError::Read {
        path: key_file.to_owned(),
        source,
    })?;
    let line = parse_public_key(&text).map_err(|source| ScriptletError::Refused {
        path: key_file.to_owned(),
        source,
    })?;
    std::fs::create_dir_all(out).map_err(|source| ScriptletError::CreateDir {
        path: out.to_owned(),
        source,
    })?;
    let path = out.join(name);
    write_atomic(&path, render(&line).as_bytes(), 0o644).map_err(|source| {
        ScriptletError::Write {
            path: path.clone(),
            source,
        }
    })?;
    Ok(Written {
        path,
        key_type: line.split(' ').next().unwrap_or_default().to_owned(),
    })
}

/// A validated `TYPE BASE64 [comment]` line: no options, nothing a shell could interpret.
pub fn parse_public_key(text: &str) -> Result<String, KeyError> {
    if text.contains("PRIVATE KEY") {
        return Err(KeyError::Private);
    }
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    if lines.len() != 1 {
        return Err(KeyError::LineCount(lines.len()));
    }
    let mut parts = lines[0].splitn(3, ' ');
    let kind = parts.next().unwrap_or_default();
    let allowed = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    if !allowed.contains(&kind) {
        return Err(KeyError::Type(kind.chars().take(40).collect()));
    }
    let data = parts.next().unwrap_or_default();
    if data.len() < 16
        || !data
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
    {
        return Err(KeyError::Data);
    }
    let comment = parts.next().unwrap_or("").trim();
    if !comment
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || " ._-@+=:/".contains(c))
    {
        return Err(KeyError::Comment);
    }
    Ok(if comment.is_empty() {
        format!("{kind} {data}")
    } else {
        format!("{kind} {data} {comment}")
    })
}

/// The scriptlet. POSIX sh (busybox too); the key sits in single quotes, which the validated
/// charset cannot close.
pub fn render(key_line: &str) -> String {
    format!(
        "#!/bin/sh\n\
# idhal: frequency=boot\n\
# Generated by `idhal scriptlet ssh-key`: installs the scheduler's SSH public key for root.\n\
# Idempotent: the line is added only when it is not already there; other keys are untouched.\n\
set -eu\n\
key='{key_line}'\n\
umask 077\n\
mkdir -p /root/.ssh\n\
chmod 700 /root/.ssh\n\
touch /root/.ssh/authorized_keys\n\
if ! grep -qxF -- \"$key\" /root/.ssh/authorized_keys; then\n\
    printf '%s\\n' \"$key\" >> /root/.ssh/authorized_keys\n\
fi\n\
chmod 600 /root/.ssh/authorized_keys\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEq8pLw0Aq2o3vWb3Rp7oar oar@server";

    #[test]
    fn accepts_a_public_key() {
        assert_eq!(parse_public_key(&format!("{KEY}\n")).unwrap(), KEY);
        assert!(render(KEY).contains("# idhal: frequency=boot\n"));
    }

    #[test]
    fn refuses_bad_keys() {
        assert_eq!(
            parse_public_key("-----BEGIN OPENSSH PRIVATE KEY-----\nx\n"),
            Err(KeyError::Private)
        );
        assert_eq!(
            parse_public_key(&format!("{KEY}\n{KEY}\n")),
            Err(KeyError::LineCount(2))
        );
        assert!(matches!(
            parse_public_key(&format!("command=\"x\" {KEY}")),
            Err(KeyError::Type(_))
        ));
        assert_eq!(
            parse_public_key("ssh-ed25519 AAAA'$(reboot)'AAAAAAAAAAA c"),
            Err(KeyError::Data)
        );
        assert_eq!(
            parse_public_key(&format!("{KEY}'; reboot; '")),
            Err(KeyError::Comment)
        );
    }

    #[test]
    fn writes_the_scriptlet_or_nothing() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("id.pub");
        std::fs::write(&key, format!("{KEY}\n")).unwrap();
        let out = d.path().join("scriptlets");
        let w = write_scriptlet(&key, &out, "050-ssh.sh").unwrap();
        assert_eq!(
            (w.path.clone(), w.key_type.as_str()),
            (out.join("050-ssh.sh"), "ssh-ed25519")
        );
        assert_eq!(std::fs::read_to_string(&w.path).unwrap(), render(KEY));
        // Only the scriptlet: no temp file left beside it.
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
        for bad in [
            "50-x.sh",
            "050-.sh",
            "050_x.sh",
            "050-x",
            "050-a..b.sh",
            "050-a/b.sh",
            "050-x y.sh",
        ] {
            match write_scriptlet(&key, &out, bad) {
                Err(ScriptletError::BadName(n)) => assert_eq!(n, bad),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        std::fs::write(&key, "-----BEGIN OPENSSH PRIVATE KEY-----\n").unwrap();
        match write_scriptlet(&key, &out, "060-ssh.sh") {
            Err(ScriptletError::Refused { path, source }) => {
                assert_eq!((path, source), (key.clone(), KeyError::Private))
            }
            other => panic!("{other:?}"),
        }
        match write_scriptlet(&d.path().join("none"), &out, "060-ssh.sh") {
            Err(ScriptletError::Read { path, .. }) => assert_eq!(path, d.path().join("none")),
            other => panic!("{other:?}"),
        }
        assert!(!out.join("060-ssh.sh").exists());
    }

    #[test]
    fn scriptlet_is_idempotent_in_sh() {
        let d = tempfile::tempdir().unwrap();
        // The rendered script with /root redirected to a temp dir, run twice by a real sh.
        let script = render(KEY).replace("/root", &d.path().display().to_string());
        for _ in 0..2 {
            let st = std::process::Command::new("sh")
                .arg("-c")
                .arg(&script)
                .status()
                .unwrap();
            assert!(st.success());
        }
        let keys = std::fs::read_to_string(d.path().join(".ssh/authorized_keys")).unwrap();
        assert_eq!(keys, format!("{KEY}\n"));
    }
}
