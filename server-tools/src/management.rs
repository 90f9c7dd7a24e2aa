//! A client for OpenVPN's management interface (always on loopback): one command per
//! connection, every connect, read and write bounded by a timeout. `idhal reconcile` asks it
//! for `status 2`; `idhal revoke` tells it to `kill` a revoked node's session.

use anyhow::Context as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

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

impl Management<'_> {
    /// Sends `command` and returns its answer: the `SUCCESS:`/`ERROR:` line, or the lines
    /// before `END`. Real-time notifications (`>INFO:` …) and the password prompt are skipped.
    pub fn command(&self, command: &str, answer: Answer) -> anyhow::Result<String> {
        let what = || format!("OpenVPN management interface {}", self.addr);
        let stream = TcpStream::connect_timeout(&self.addr, self.timeout).with_context(what)?;
        stream
            .set_read_timeout(Some(self.timeout))
            .with_context(what)?;
        stream
            .set_write_timeout(Some(self.timeout))
            .with_context(what)?;
        let mut request = String::new();
        if let Some(path) = self.password_file {
            let pw = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            request.push_str(pw.lines().next().unwrap_or(""));
            request.push('\n');
        }
        request.push_str(command);
        request.push('\n');
        (&stream).write_all(request.as_bytes()).with_context(what)?;
        let mut text = String::new();
        for line in BufReader::new(&stream).lines() {
            let line = line.with_context(what)?;
            anyhow::ensure!(
                text.len() < 16 << 20,
                "{}: answer larger than 16 MiB",
                what()
            );
            let line = line.trim_end_matches('\r');
            if line.starts_with('>') || line.contains("ENTER PASSWORD:") {
                continue;
            }
            // The password dialogue ends with its own SUCCESS line.
            if line.starts_with("SUCCESS: password") {
                continue;
            }
            match answer {
                Answer::OneLine if line.starts_with("SUCCESS:") || line.starts_with("ERROR:") => {
                    let _ = (&stream).write_all(b"quit\n");
                    return Ok(line.to_owned());
                }
                Answer::UntilEnd if line.contains("ERROR:") => {
                    anyhow::bail!("{}: {line}", what())
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
        anyhow::bail!("{}: connection closed before the answer ended", what())
    }
}
