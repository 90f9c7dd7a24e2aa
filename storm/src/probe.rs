//! How long the OpenVPN server leaves its clients unserved. OpenVPN 2.6 is one event loop: the
//! same loop forwards every connected client's packets, answers keepalives, runs
//! client-connect scripts (synchronously, today) and serves the management interface. So a
//! management command's round trip, sent every 100 ms on a connection held open, is how long an
//! already-connected client's packets would wait at that moment. The longest one during the
//! storm is "the longest stall".

use crate::clients::Shared;
use crate::setup::Rig;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const EVERY: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct Probe {
    /// (seconds since the storm's clock started, round trip in ms).
    pub samples: Vec<(f64, f64)>,
    pub errors: Vec<String>,
}

pub fn run(rig: &Rig, shared: &Shared) -> Probe {
    let mut p = Probe::default();
    while !shared.stop.load(Ordering::Relaxed) {
        if let Err(e) = session(rig, shared, &mut p) {
            if p.errors.len() < 20 {
                p.errors.push(e);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    p
}

/// One management connection: log in, then `pid` every [`EVERY`] until told to stop.
fn session(rig: &Rig, shared: &Shared, p: &mut Probe) -> Result<(), String> {
    let io = |e: std::io::Error| format!("management 127.0.0.1:{}: {e}", rig.management);
    let mut s = TcpStream::connect(("127.0.0.1", rig.management)).map_err(io)?;
    // Generous: a stall of minutes is a figure to report, not an error.
    s.set_read_timeout(Some(Duration::from_secs(300)))
        .map_err(io)?;
    let password = std::fs::read_to_string(&rig.management_pw)
        .map_err(|e| format!("{}: {e}", rig.management_pw.display()))?;
    // "ENTER PASSWORD:" comes without a newline.
    let mut seen = Vec::new();
    let mut byte = [0u8; 1];
    while !String::from_utf8_lossy(&seen).contains("PASSWORD:") {
        if s.read(&mut byte).map_err(io)? == 0 {
            return Err("the management interface closed before asking the password".into());
        }
        seen.push(byte[0]);
    }
    writeln!(s, "{}", password.lines().next().unwrap_or("")).map_err(io)?;
    let mut r = BufReader::new(s.try_clone().map_err(io)?);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).map_err(io)? == 0 {
            return Err("closed after the password".into());
        }
        if line.starts_with("SUCCESS: password") {
            break;
        }
        if line.starts_with("ERROR") {
            return Err(format!("password refused: {}", line.trim()));
        }
    }
    while !shared.stop.load(Ordering::Relaxed) {
        let at = shared.now();
        let t = Instant::now();
        s.write_all(b"pid\n").map_err(io)?;
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(io)? == 0 {
                return Err("closed".into());
            }
            if line.starts_with("SUCCESS: pid=") {
                break;
            }
        }
        p.samples.push((at, t.elapsed().as_secs_f64() * 1e3));
        std::thread::sleep(EVERY.saturating_sub(t.elapsed()));
    }
    Ok(())
}
