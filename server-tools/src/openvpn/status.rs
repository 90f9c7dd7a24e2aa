//! Who OpenVPN says is connected: its status file (status-version 2 or 3) or the same text
//! from its management interface (`status 2`), read with a size cap and parsed unvalidated
//! (callers validate each entry as they would a hook's environment).

use crate::config::{ServerConfig, StatusSource};
use crate::openvpn::management::{own_password_file, Answer, Management, ManagementError};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Why no status could be had: nothing is acted on then.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("CLIENT_LIST before its HEADER line (status-version 2 or 3 needed)")]
    ClientBeforeHeader,
    #[error("no TIME line (status-version 2 or 3 needed)")]
    NoTime,
    /// OpenVPN rewrites its status file in place: a read while it writes sees a cut list, and
    /// acting on it could take connected nodes down.
    #[error("no END line: cut short (read while OpenVPN was rewriting it?); nothing changed")]
    NoEnd,
    #[error("reading OpenVPN status file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("OpenVPN status file {} is larger than [reconcile] max_status_bytes ({limit}); nothing changed", path.display())]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("status file {}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<StatusError>,
    },
    #[error(transparent)]
    Management(#[from] ManagementError),
    #[error("OpenVPN management interface {addr}")]
    FromManagement {
        addr: SocketAddr,
        #[source]
        source: Box<StatusError>,
    },
}

/// One `CLIENT_LIST` entry, still unvalidated.
#[derive(Debug, Clone)]
pub struct StatusEntry {
    pub line: usize,
    pub fields: HashMap<&'static str, String>,
}

/// Parsed status file: its write time and client entries.
#[derive(Debug)]
pub struct Status {
    pub written: u64,
    pub clients: Vec<StatusEntry>,
}

pub fn parse_status(text: &str) -> Result<Status, StatusError> {
    let mut written = None;
    let mut columns: Option<Vec<String>> = None;
    let mut clients = Vec::new();
    for (i, line) in text.lines().enumerate() {
        // Version 2 separates with commas, version 3 with tabs.
        let sep = if line.contains('\t') { '\t' } else { ',' };
        let f: Vec<&str> = line.split(sep).collect();
        match f.first().copied() {
            Some("TIME") => written = f.get(2).and_then(|t| t.parse::<u64>().ok()),
            Some("HEADER") if f.get(1) == Some(&"CLIENT_LIST") => {
                columns = Some(f[2..].iter().map(|s| s.to_string()).collect());
            }
            Some("CLIENT_LIST") => {
                let cols = columns.as_ref().ok_or(StatusError::ClientBeforeHeader)?;
                let get = |name: &str| {
                    cols.iter()
                        .position(|c| c == name)
                        .and_then(|p| f.get(p + 1))
                        .map(|s| s.to_string())
                };
                let mut fields = HashMap::new();
                for (key, col) in [
                    ("common_name", "Common Name"),
                    ("real", "Real Address"),
                    ("ifconfig_pool_remote_ip", "Virtual Address"),
                    ("time_unix", "Connected Since (time_t)"),
                    ("client_id", "Client ID"),
                ] {
                    if let Some(v) = get(col) {
                        fields.insert(key, v);
                    }
                }
                clients.push(StatusEntry {
                    line: i + 1,
                    fields,
                });
            }
            _ => {}
        }
    }
    let written = written.ok_or(StatusError::NoTime)?;
    if text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(str::trim)
        != Some("END")
    {
        return Err(StatusError::NoEnd);
    }
    Ok(Status { written, clients })
}

pub fn read_status_file(path: &Path, limit: u64) -> Result<Status, StatusError> {
    use std::io::Read as _;
    let what = |source| StatusError::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    // Bounded read: the size is checked on what is read, not on what metadata says.
    std::fs::File::open(path)
        .map_err(what)?
        .take(limit + 1)
        .read_to_string(&mut text)
        .map_err(what)?;
    if text.len() as u64 > limit {
        return Err(StatusError::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    parse_status(&text).map_err(|e| StatusError::InFile {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Asks OpenVPN's management interface for `status 2` (the same text as a version-2 status
/// file, but current). Every read and write has the command timeout.
pub fn read_management(
    addr: SocketAddr,
    cfg: &ServerConfig,
    state_dir: &Path,
) -> Result<Status, StatusError> {
    let password = own_password_file(cfg, state_dir);
    let m = Management {
        addr,
        password_file: password.as_deref(),
        timeout: cfg.limits.command_timeout(),
    };
    let mut text = m.command("status 2", Answer::UntilEnd)?;
    // `UntilEnd` answers once OpenVPN's END line arrived, and leaves it out.
    text.push_str("END\n");
    parse_status(&text).map_err(|e| StatusError::FromManagement {
        addr,
        source: Box::new(e),
    })
}

/// Where a status is read: a status file, or a management interface asked `status 2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Management(SocketAddr),
}

impl Source {
    /// `--status-file`, else `--management`, else `[reconcile] source` and its setting.
    pub fn pick(
        status_file: Option<PathBuf>,
        management: Option<SocketAddr>,
        cfg: &ServerConfig,
    ) -> Source {
        match (status_file, management, cfg.reconcile.source) {
            (Some(path), _, _) => Source::File(path),
            (None, Some(addr), _) => Source::Management(addr),
            (None, None, StatusSource::Management) => Source::Management(cfg.reconcile.management),
            (None, None, StatusSource::StatusFile) => {
                Source::File(cfg.reconcile.status_file.clone())
            }
        }
    }

    /// Reads the status (a file with `[reconcile] max_status_bytes` as its cap).
    pub fn read(&self, cfg: &ServerConfig, state_dir: &Path) -> Result<Status, StatusError> {
        match self {
            Source::File(path) => read_status_file(path, cfg.reconcile.max_status_bytes),
            Source::Management(addr) => read_management(*addr, cfg, state_dir),
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Management(addr) => write!(f, "management {addr}"),
        }
    }
}

/// `192.0.2.7:1194`, `[2001:db8::1]:1194` or a bare address → the address and the port.
pub fn real_ip(s: &str) -> Option<(String, Option<String>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (a, p) = rest.split_once(']')?;
        return Some((a.to_owned(), p.strip_prefix(':').map(str::to_owned)));
    }
    if s.parse::<std::net::IpAddr>().is_ok() {
        return Some((s.to_owned(), None));
    }
    s.rsplit_once(':')
        .map(|(a, p)| (a.to_owned(), Some(p.to_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_source_is_the_option_else_the_config() {
        let cfg = |t: &str| ServerConfig::parse(t, Path::new("t")).unwrap();
        let file = cfg("");
        let mgmt = cfg("[reconcile]\nsource = \"management\"\nmanagement = \"127.0.0.1:7600\"\n");
        let addr: SocketAddr = "127.0.0.1:7505".parse().unwrap();
        let p = PathBuf::from("/run/s");
        assert_eq!(
            Source::pick(Some(p.clone()), None, &mgmt),
            Source::File(p.clone())
        );
        assert_eq!(
            Source::pick(None, Some(addr), &file),
            Source::Management(addr)
        );
        assert_eq!(
            Source::pick(None, None, &mgmt),
            Source::Management("127.0.0.1:7600".parse().unwrap())
        );
        assert_eq!(
            Source::pick(None, None, &file),
            Source::File(file.reconcile.status_file.clone())
        );
        assert_eq!(Source::File(p).to_string(), "/run/s");
        assert_eq!(
            Source::Management(addr).to_string(),
            "management 127.0.0.1:7505"
        );
    }

    #[test]
    fn parses_status_v2_and_v3() {
        let v2 = "TITLE,OpenVPN 2.6\nTIME,2026-11-22 23:00:00,1795000000\n\
            HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n\
            CLIENT_LIST,client317,192.0.2.7:1194,10.134.7.38,,1,2,2026-11-22 22:59:00,1794999940,UNDEF,0,0,AES-256-GCM\nEND\n";
        let s = parse_status(v2).unwrap();
        assert_eq!(s.written, 1_795_000_000);
        assert_eq!(s.clients[0].fields["common_name"], "client317");
        assert_eq!(s.clients[0].fields["time_unix"], "1794999940");
        let v3 = v2.replace(',', "\t");
        assert_eq!(parse_status(&v3).unwrap().clients.len(), 1);
        assert!(matches!(
            parse_status("CLIENT_LIST,a\n"),
            Err(StatusError::ClientBeforeHeader)
        ));
        assert!(matches!(parse_status(""), Err(StatusError::NoTime)));
        // Cut anywhere before its END (OpenVPN rewrites the file in place): refused whole.
        let body = v2.trim_end_matches("END\n");
        for cut in [body, &body[..body.len() - 20], "TIME,x,1\n"] {
            assert!(
                matches!(parse_status(cut), Err(StatusError::NoEnd)),
                "{cut:?}"
            );
        }
        // Management's `status 2` answer ends the same way, with CRLF.
        assert_eq!(
            parse_status(&v2.replace('\n', "\r\n"))
                .unwrap()
                .clients
                .len(),
            1
        );
        assert_eq!(
            real_ip("192.0.2.7:1194").unwrap(),
            ("192.0.2.7".into(), Some("1194".into()))
        );
        assert_eq!(
            real_ip("[2001:db8::1]:5").unwrap(),
            ("2001:db8::1".into(), Some("5".into()))
        );
        assert_eq!(
            real_ip("2001:db8::1").unwrap(),
            ("2001:db8::1".into(), None)
        );
    }

    #[test]
    fn unusable_files_are_refused_with_their_reason() {
        let d = tempfile::tempdir().unwrap();
        let file = |name: &str, bytes: &[u8]| {
            let p = d.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let ok = file("ok", b"TIME,x,1795000000\nEND\n");
        assert_eq!(read_status_file(&ok, 100).unwrap().written, 1_795_000_000);
        // One byte over the cap is refused unread (unparsed); at the cap it is read.
        let big = file("big", &[b'x'; 101]);
        assert!(matches!(
            read_status_file(&big, 100),
            Err(StatusError::TooLarge { path, limit: 100 }) if path == big
        ));
        let exact = file("exact", &[b'x'; 100]);
        let e = read_status_file(&exact, 100).unwrap_err();
        assert!(
            matches!(&e, StatusError::InFile { path, source } if *path == exact && matches!(**source, StatusError::NoTime)),
            "{e:?}"
        );
        assert_eq!(
            format!("{:#}", anyhow::Error::new(e)),
            format!(
                "status file {}: no TIME line (status-version 2 or 3 needed)",
                exact.display()
            )
        );
        let binary = file("binary", b"TIME,\xff\xfe,1\n");
        assert!(matches!(
            read_status_file(&binary, 100),
            Err(StatusError::Read { source, .. }) if source.kind() == std::io::ErrorKind::InvalidData
        ));
        let missing = d.path().join("missing");
        assert!(matches!(
            read_status_file(&missing, 100),
            Err(StatusError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound
        ));
    }
}
