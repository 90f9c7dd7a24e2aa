//! A client for OpenVPN's management interface (always on loopback): one command per
//! connection, every connect, read and write bounded by a timeout, the password dialogue done
//! first. `idhal reconcile` asks it for `status 2`; `idhal revoke` tells it to `kill` a revoked
//! node's session. Also where the management password file lives and how it is made.

use crate::config::{ManagementAuth, ServerConfig};
use crate::publish::{write_new, PublishError};
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Answers larger than this are refused (a status of ~100,000 clients fits).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    // `err`, not `source`: the cause is shown in the one line, not repeated by `{:#}`.
    #[error("OpenVPN management interface {addr}: {err}")]
    Io {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("reading the management password file {path}: {err}")]
    PasswordFile { path: PathBuf, err: std::io::Error },
    #[error("OpenVPN management interface {addr} refused the password in {path} (wrong password: it must be the first line of the file OpenVPN's `management` option names)")]
    WrongPassword { addr: SocketAddr, path: PathBuf },
    #[error("OpenVPN management interface {addr} asks for a password and none is configured: set [openvpn] management_password_file (or [reconcile] management_password_file) to the file OpenVPN's `management` option names")]
    PasswordRequired { addr: SocketAddr },
    #[error("OpenVPN management interface {addr}: {line}")]
    Refused { addr: SocketAddr, line: String },
    #[error("OpenVPN management interface {addr}: answer larger than {MAX_ANSWER} bytes")]
    TooLarge { addr: SocketAddr },
    #[error("OpenVPN management interface {addr}: connection closed before the answer ended")]
    Closed { addr: SocketAddr },
    #[error("OpenVPN management interface {addr}: unexpected greeting {line:?}")]
    Greeting { addr: SocketAddr, line: String },
}

pub struct Management<'a> {
    pub addr: SocketAddr,
    pub password_file: Option<&'a Path>,
    pub timeout: Duration,
}

/// How a command's answer ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// One `SUCCESS: …` or `ERROR: …` line (`kill`, `signal`, …).
    OneLine,
    /// Lines up to `END` (`status`); an `ERROR:` line instead is an error.
    UntilEnd,
}

const PROMPT: &str = "ENTER PASSWORD:";

impl Management<'_> {
    /// Sends `command` and returns its answer: the `SUCCESS:`/`ERROR:` line, or the lines
    /// before `END`. Real-time notifications (`>INFO:` …) are skipped.
    pub fn command(&self, command: &str, answer: Answer) -> Result<String, ManagementError> {
        let addr = self.addr;
        let io = |err| ManagementError::Io { addr, err };
        let stream = TcpStream::connect_timeout(&addr, self.timeout).map_err(io)?;
        stream.set_read_timeout(Some(self.timeout)).map_err(io)?;
        stream.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let mut reader = BufReader::new(&stream);
        // OpenVPN greets with a password prompt (no newline after it) when it has a password,
        // else with its `>INFO:` banner. Read up to either before sending anything, so a
        // password is never taken for a command, nor a command for a password.
        if let Said::Prompt = next(&mut reader, addr)? {
            let Some(path) = self.password_file else {
                return Err(ManagementError::PasswordRequired { addr });
            };
            let pw =
                std::fs::read_to_string(path).map_err(|err| ManagementError::PasswordFile {
                    path: path.to_owned(),
                    err,
                })?;
            let pw = pw.lines().next().unwrap_or("");
            (&stream)
                .write_all(format!("{pw}\n").as_bytes())
                .map_err(io)?;
            // A wrong password gets the prompt again (OpenVPN 2.6 prints no error line).
            match next(&mut reader, addr)? {
                Said::Line(l) if l.starts_with("SUCCESS: password is correct") => {}
                _ => {
                    return Err(ManagementError::WrongPassword {
                        addr,
                        path: path.to_owned(),
                    })
                }
            }
        }
        (&stream)
            .write_all(format!("{command}\n").as_bytes())
            .map_err(io)?;
        let mut text = String::new();
        for line in reader.lines() {
            let line = line.map_err(io)?;
            if text.len() >= MAX_ANSWER {
                return Err(ManagementError::TooLarge { addr });
            }
            let line = line.trim_end_matches('\r');
            if line.starts_with('>') {
                continue;
            }
            match answer {
                Answer::OneLine if line.starts_with("SUCCESS:") || line.starts_with("ERROR:") => {
                    let _ = (&stream).write_all(b"quit\n");
                    return Ok(line.to_owned());
                }
                Answer::UntilEnd if line.starts_with("ERROR:") => {
                    return Err(ManagementError::Refused {
                        addr,
                        line: line.to_owned(),
                    })
                }
                Answer::UntilEnd if line == "END" => {
                    let _ = (&stream).write_all(b"quit\n");
                    return Ok(text);
                }
                Answer::UntilEnd if !line.starts_with("SUCCESS:") => {
                    text.push_str(line);
                    text.push('\n');
                }
                _ => {}
            }
        }
        Err(ManagementError::Closed { addr })
    }
}

/// What OpenVPN said next: a password prompt, or one line.
enum Said {
    Prompt,
    Line(String),
}

/// Reads up to the password prompt (which ends without a newline) or the end of a line.
fn next(reader: &mut impl std::io::BufRead, addr: SocketAddr) -> Result<Said, ManagementError> {
    let mut got = Vec::new();
    loop {
        let mut b = [0u8; 1];
        let n = reader
            .read(&mut b)
            .map_err(|err| ManagementError::Io { addr, err })?;
        if n == 0 {
            return Err(ManagementError::Closed { addr });
        }
        got.push(b[0]);
        if got.ends_with(PROMPT.as_bytes()) {
            return Ok(Said::Prompt);
        }
        if b[0] == b'\n' {
            return Ok(Said::Line(String::from_utf8_lossy(&got).into_owned()));
        }
        if got.len() > 4096 {
            return Err(ManagementError::Greeting {
                addr,
                line: String::from_utf8_lossy(&got[..80]).into_owned(),
            });
        }
    }
}

/// Asks each management interface in `servers` to drop the client `common_name` (`kill`):
/// every server's one-line answer (`SUCCESS: ...` when it was connected there), or its error.
pub fn kill_everywhere(
    servers: &[SocketAddr],
    password_file: Option<&Path>,
    timeout: Duration,
    common_name: &impl std::fmt::Display,
) -> Vec<(SocketAddr, Result<String, ManagementError>)> {
    servers
        .iter()
        .map(|&addr| {
            let m = Management {
                addr,
                password_file,
                timeout,
            };
            (
                addr,
                m.command(&format!("kill {common_name}"), Answer::OneLine),
            )
        })
        .collect()
}

/// The password file for this server's own management interface, as `idhal reconcile` and
/// `idhal openvpn drain` use it: `[reconcile] management_password_file`, else the one of
/// `[ca] project`'s servers.
pub fn own_password_file(cfg: &ServerConfig, state_dir: &Path) -> Option<PathBuf> {
    match &cfg.reconcile.management_password_file {
        Some(p) => Some(p.clone()),
        None => password_file(cfg, state_dir, &cfg.ca.project),
    }
}

/// The management password file of `project`'s OpenVPN servers, or `None` when
/// `[openvpn] management_auth = "none"`: `[openvpn] management_password_file`, else
/// `STATE/projects/PROJECT/management.pw`.
pub fn password_file(cfg: &ServerConfig, state_dir: &Path, project: &str) -> Option<PathBuf> {
    let o = cfg.openvpn_for(project);
    match o.management_auth {
        ManagementAuth::None => None,
        ManagementAuth::Password => Some(o.management_password_file.unwrap_or_else(|| {
            state_dir
                .join("projects")
                .join(project)
                .join("management.pw")
        })),
    }
}

/// Creates the password file (0600, a random password) unless it exists: an existing one is
/// never overwritten (running servers use it). Returns whether it was created.
pub fn ensure_password_file(path: &Path) -> Result<bool, PublishError> {
    if path.exists() {
        return Ok(false);
    }
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).map_err(|e| PublishError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let pw: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    match write_new(path, format!("{pw}\n").as_bytes(), 0o600) {
        Ok(()) => Ok(true),
        // Made by someone else meanwhile: theirs stands.
        Err(PublishError::Exists { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_password_file_is_made_once_0600_and_never_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("management.pw");
        assert!(ensure_password_file(&p).unwrap());
        let first = std::fs::read_to_string(&p).unwrap();
        assert_eq!(first.trim().len(), 48, "{first:?}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(!ensure_password_file(&p).unwrap());
        assert_eq!(std::fs::read_to_string(&p).unwrap(), first);
    }

    /// A hostile or broken peer on 127.0.0.1 (a real OpenVPN cannot be made to misbehave):
    /// it sends `greeting` and then whatever `then` writes, and keeps the socket open.
    fn peer(greeting: &'static [u8], then: fn(&mut TcpStream)) -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let _ = s.write_all(greeting);
                then(&mut s);
                std::thread::sleep(Duration::from_secs(5));
            }
        });
        addr
    }

    fn ask(addr: SocketAddr, pw: Option<&Path>, answer: Answer) -> ManagementError {
        Management {
            addr,
            password_file: pw,
            timeout: Duration::from_millis(500),
        }
        .command("status 2", answer)
        .unwrap_err()
    }

    #[test]
    fn hostile_or_broken_peers_get_clear_errors_within_the_timeout() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        // Silent after accepting: the read timeout ends it.
        let e = ask(peer(b"", |_| {}), Some(&pw), Answer::UntilEnd);
        assert!(matches!(e, ManagementError::Io { .. }), "{e}");
        // Endless bytes without a newline: refused after 4 KiB, not buffered forever.
        let e = ask(
            peer(b"", |s| {
                let _ = s.write_all(&[b'x'; 8192]);
            }),
            Some(&pw),
            Answer::UntilEnd,
        );
        assert!(matches!(e, ManagementError::Greeting { .. }), "{e}");
        // A password prompt and no password configured.
        let e = ask(peer(b"ENTER PASSWORD:", |_| {}), None, Answer::OneLine);
        assert!(matches!(e, ManagementError::PasswordRequired { .. }), "{e}");
        // The prompt again after the password: wrong password (OpenVPN 2.6 says nothing else).
        let e = ask(
            peer(b"ENTER PASSWORD:", |s| {
                let mut b = [0u8; 64];
                let _ = std::io::Read::read(s, &mut b);
                let _ = s.write_all(b"ENTER PASSWORD:");
            }),
            Some(&pw),
            Answer::OneLine,
        );
        assert!(matches!(e, ManagementError::WrongPassword { .. }), "{e}");
        assert!(e.to_string().contains("wrong password"), "{e}");
        // An answer without END past the size limit.
        let e = ask(
            peer(b">INFO:banner\r\n", |s| {
                let line = [b"CLIENT_LIST,".as_slice(), &[b'a'; 1000], b"\n"].concat();
                for _ in 0..(MAX_ANSWER / 1000 + 10) {
                    if s.write_all(&line).is_err() {
                        return;
                    }
                }
            }),
            Some(&pw),
            Answer::UntilEnd,
        );
        assert!(matches!(e, ManagementError::TooLarge { .. }), "{e}");
        // Closed at once.
        let e = ask(
            peer(b"", |s| drop(s.shutdown(std::net::Shutdown::Both))),
            None,
            Answer::OneLine,
        );
        assert!(matches!(e, ManagementError::Closed { .. }), "{e}");
    }

    #[test]
    fn the_password_follows_the_config() {
        let state = Path::new("/s");
        let parse = |t: &str| ServerConfig::parse(t, Path::new("t.toml")).unwrap();
        assert_eq!(
            password_file(&parse(""), state, "p"),
            Some(PathBuf::from("/s/projects/p/management.pw"))
        );
        assert_eq!(
            password_file(
                &parse("[openvpn]\nmanagement_password_file = \"/etc/pw\""),
                state,
                "p"
            ),
            Some(PathBuf::from("/etc/pw"))
        );
        assert_eq!(
            password_file(&parse("[openvpn]\nmanagement_auth = \"none\""), state, "p"),
            None
        );
    }
}
