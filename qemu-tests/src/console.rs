//! A guest's console log (ttyS0, a file QEMU appends to), read as state: "has this line been
//! printed in this boot", "has the k-th agent run finished", never as a stream that an earlier
//! wait could have moved past (a wait that consumed `IDHAL-EVENT ready` made the next one miss
//! it: issue 12). The only cursor is the live view's, and no wait reads it.
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const RUN_START: &str = "IDHAL-EVENT run-start";
pub const RUN_EXIT: &str = "IDHAL-EVENT run-exit=";
pub const STATUS: &str = "IDHAL-STATUS ";
pub const READY: &str = "IDHAL-EVENT ready";

pub struct Console {
    path: PathBuf,
    /// Bytes already handed to the live view ([`Console::next_new_line`]).
    shown: usize,
}

/// One agent run as the console reports it, once its status line is there.
#[derive(Debug, Clone)]
pub struct Run {
    pub exit: i32,
    /// `idhal-bootstrap status --json`, parsed.
    pub status: serde_json::Value,
    /// Lines between `run-start` and `run-exit` (agent log, scriptlet markers).
    pub lines: Vec<String>,
}

impl Console {
    pub fn new(path: &Path) -> Console {
        Console {
            path: path.to_path_buf(),
            shown: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap_or_default()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Every whole line printed so far (the guest may be mid-line: that one is left out), as a
    /// terminal shows it: systemd's status spinner shares the console with the markers, and a
    /// marker printed as it erases itself starts with `ESC [K` or follows a carriage return.
    pub fn lines(&self) -> Vec<String> {
        let bytes = self.bytes();
        let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        String::from_utf8_lossy(&bytes[..end])
            .lines()
            .map(shown)
            .collect()
    }

    /// The first line printed in this boot for which `pred` holds, whoever read it before.
    pub fn find(&self, pred: impl Fn(&str) -> bool) -> Option<String> {
        self.lines().into_iter().find(|l| pred(l))
    }

    /// What the guest reported, for a failure message: the lines of idhal's markers, the agent,
    /// OpenVPN and systemd's failures, control sequences removed, the last `max` of them. The
    /// whole console is printed too, but a CI log keeps only its head and tail.
    pub fn digest(&self, max: usize) -> String {
        let keep = |l: &str| {
            [
                "IDHAL-", "idhal", "openvpn", "FAILED", "OpenVPN", "TLS", "AUTH", "error", "Error",
            ]
            .iter()
            .any(|k| l.contains(k))
        };
        let lines: Vec<String> = self.lines().into_iter().filter(|l| keep(l)).collect();
        lines[lines.len().saturating_sub(max)..].join("\n")
    }

    /// How many agent runs have started (`run-start` lines).
    pub fn runs_started(&self) -> usize {
        self.lines()
            .iter()
            .filter(|l| l.starts_with(RUN_START))
            .count()
    }

    /// The `k`-th agent run of this boot (1: the boot run), once its exit code and status line
    /// are printed; `Err` when its status line is not JSON.
    pub fn run(&self, k: usize) -> Option<Result<Run, String>> {
        let lines = self.lines();
        let start = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with(RUN_START))
            .nth(k.checked_sub(1)?)?
            .0;
        let exit_at = start
            + 1
            + lines[start + 1..]
                .iter()
                .position(|l| l.starts_with(RUN_EXIT))?;
        let status_at = exit_at
            + 1
            + lines[exit_at + 1..]
                .iter()
                .position(|l| l.starts_with(STATUS))?;
        let exit = lines[exit_at][RUN_EXIT.len()..]
            .split_whitespace()
            .next()
            .and_then(|c| c.parse().ok());
        let Some(exit) = exit else {
            return Some(Err(format!(
                "run {k}: no exit code in {:?}",
                lines[exit_at]
            )));
        };
        let json = &lines[status_at][STATUS.len()..];
        Some(
            serde_json::from_str(json)
                .map_err(|e| format!("run {k}: status is not JSON ({e}): {json}"))
                .map(|status| Run {
                    exit,
                    status,
                    lines: lines[start + 1..exit_at].to_vec(),
                }),
        )
    }

    /// For a live view only: the next whole line not shown yet, if the guest wrote one. Never
    /// waits, and no wait depends on what it has shown.
    pub fn next_new_line(&mut self) -> Option<String> {
        let bytes = self.bytes();
        let rest = &bytes[self.shown.min(bytes.len())..];
        let nl = rest.iter().position(|&b| b == b'\n')?;
        let line = shown(&String::from_utf8_lossy(&rest[..nl]));
        self.shown += nl + 1;
        Some(line)
    }
}

/// What a terminal shows of one raw console line: the text written after its last carriage
/// return (a return to the line's start) that shows anything, without control sequences.
fn shown(raw: &str) -> String {
    raw.split('\r')
        .map(strip_controls)
        .rfind(|s| !s.is_empty())
        .unwrap_or_default()
}

/// A console line without terminal control sequences (systemd's colours and its status
/// spinner's cursor moves): `ESC [ … letter`, `ESC letter`, and other control characters.
fn strip_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte in @..~.
                for f in chars.by_ref() {
                    if ('@'..='~').contains(&f) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// When each line of a log file first appeared, on the host's clock: a thread reads what was
/// appended every [`LineTimes::PERIOD`] and stamps each new whole line with the time it saw it.
/// The boot breakdown puts guest events (which carry the guest's uptime) and host events
/// (OpenVPN's log, the hook's line) on one clock with it; a line's stamp is late by at most one
/// period plus the read.
pub struct LineTimes {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl LineTimes {
    pub const PERIOD: Duration = Duration::from_millis(10);

    /// Starts following `path` (which may not exist yet). `view` turns a raw line into what is
    /// kept (a console's terminal view, or the line as it is).
    pub fn follow(path: &Path, view: fn(&str) -> String) -> LineTimes {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (out, halt, path) = (lines.clone(), stop.clone(), path.to_path_buf());
        std::thread::spawn(move || {
            // Bytes of whole lines taken so far, and a line's start not yet ended by '\n'.
            let (mut offset, mut partial) = (0u64, Vec::new());
            while !halt.load(Ordering::Relaxed) {
                let mut chunk = Vec::new();
                if let Ok(mut f) = std::fs::File::open(&path) {
                    // Truncated (a file written anew): start again from its beginning.
                    if f.metadata().map(|m| m.len() < offset).unwrap_or(false) {
                        (offset, partial) = (0, Vec::new());
                    }
                    if f.seek(SeekFrom::Start(offset)).is_ok() {
                        let _ = f.read_to_end(&mut chunk);
                    }
                }
                if !chunk.is_empty() {
                    let now = Instant::now();
                    offset += chunk.len() as u64;
                    partial.extend_from_slice(&chunk);
                    if let Some(end) = partial.iter().rposition(|&b| b == b'\n') {
                        let whole: Vec<u8> = partial.drain(..=end).collect();
                        let lines: Vec<(Instant, String)> = String::from_utf8_lossy(&whole)
                            .lines()
                            .map(|l| (now, view(l)))
                            .collect();
                        out.lock().unwrap().extend(lines);
                    }
                }
                std::thread::sleep(Self::PERIOD);
            }
        });
        LineTimes { lines, stop }
    }

    /// The first line seen at or after `since` for which `pred` holds, and when it was seen.
    pub fn first(&self, since: Instant, pred: impl Fn(&str) -> bool) -> Option<(Instant, String)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find(|(t, l)| *t >= since && pred(l))
            .cloned()
    }

    /// Every line seen so far with its time.
    pub fn all(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for LineTimes {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A console line as a terminal shows it (for [`LineTimes::follow`]).
pub fn terminal_view(raw: &str) -> String {
    shown(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whole lines only, each stamped once, a line written in two pieces kept whole; a file
    /// written anew (shorter) is read again from its start.
    #[test]
    fn line_times_stamps_whole_lines_and_follows_a_new_file() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let t = LineTimes::follow(&path, str::to_owned);
        let wait = |n: usize| {
            let until = Instant::now() + Duration::from_secs(10);
            while t.all().len() < n && Instant::now() < until {
                std::thread::sleep(LineTimes::PERIOD);
            }
            t.all().into_iter().map(|(_, l)| l).collect::<Vec<_>>()
        };
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"one\ntw").unwrap();
        assert_eq!(wait(1), ["one"]);
        std::thread::sleep(LineTimes::PERIOD * 3);
        assert_eq!(t.all().len(), 1, "half a line is not a line");
        f.write_all(b"o\nthree\n").unwrap();
        assert_eq!(wait(3), ["one", "two", "three"]);
        drop(f);
        std::fs::write(&path, b"new\n").unwrap();
        assert_eq!(wait(4), ["one", "two", "three", "new"]);
        let since = t.first(Instant::now(), |_| true);
        assert!(since.is_none(), "nothing seen after now");
        assert_eq!(
            t.first(Instant::now() - Duration::from_secs(60), |l| l == "two")
                .unwrap()
                .1,
            "two"
        );
    }
    use std::io::Write as _;

    fn console(text: &str) -> (tempfile::TempDir, Console) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        std::fs::write(&p, text).unwrap();
        let c = Console::new(&p);
        (d, c)
    }

    fn append(c: &Console, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(c.path())
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    const BOOT: &str = "IDHAL-EVENT init uptime=1.0\r\n\
        IDHAL-EVENT run-start uptime=2.0\n\
        idhal-bootstrap: accepted manifest serial 1\n\
        IDHAL-EVENT run-exit=0 uptime=3.0\n\
        IDHAL-STATUS {\"serial\":1}\n\
        IDHAL-EVENT ready uptime=3.1\n";

    /// The demo's failure: its live view had shown every line, `ready` included, before the
    /// next request waited for `ready`.
    #[test]
    fn events_already_shown_by_the_live_view_are_still_seen() {
        let (_d, mut c) = console(BOOT);
        while c.next_new_line().is_some() {}
        assert!(c.find(|l| l.starts_with(READY)).is_some());
        let run = c.run(1).unwrap().unwrap();
        assert_eq!(run.exit, 0);
        assert_eq!(run.status["serial"], 1);
        assert_eq!(run.lines, ["idhal-bootstrap: accepted manifest serial 1"]);
        // Asking again gives the same answer: reading is not consuming.
        assert!(c.find(|l| l.starts_with(READY)).is_some());
        assert_eq!(c.run(1).unwrap().unwrap().exit, 0);
    }

    #[test]
    fn a_run_is_complete_only_with_its_status_line() {
        let (_d, c) = console(BOOT);
        assert_eq!(c.runs_started(), 1);
        assert!(c.run(2).is_none());
        append(
            &c,
            "IDHAL-EVENT run-start uptime=9\nIDHAL-TEST x\nIDHAL-EVENT run-exit=5 uptime=9",
        );
        assert_eq!(c.runs_started(), 2);
        assert!(c.run(2).is_none(), "exit line not whole yet");
        append(&c, "\nIDHAL-STAT");
        assert!(c.run(2).is_none(), "status line not whole yet");
        append(&c, "US {\"serial\":1}\n");
        let r = c.run(2).unwrap().unwrap();
        assert_eq!(
            (r.exit, r.lines.clone()),
            (5, vec!["IDHAL-TEST x".to_string()])
        );
        // The first run is still the first run.
        assert_eq!(c.run(1).unwrap().unwrap().exit, 0);
        assert!(c.run(0).is_none());
        assert!(c.run(3).is_none());
    }

    /// systemd's spinner and colours around the markers (as in a CI log of a stuck boot).
    #[test]
    fn a_digest_keeps_the_reported_lines_without_control_sequences() {
        let (_d, c) = console(
            "\x1b[0;32m  OK  \x1b[0m] Started \x1b[0;1;39mgetty@tty1.service\x1b[0m\n\
             IDHAL-TEST enrolled node=client1 addr=10.134.7.2 uptime=10.55\n\
             \x1bM\r\x1b[K[ \x1b[0;31m*\x1b[0m] Job dev-ttyS0.device/start running (1min 1s / 1min 30s)\r\n\
             [\x1b[0;1;31mFAILED\x1b[0m] Failed to start \x1b[0;1;39midhal-openvpn.service\x1b[0m\n\
             2026-12-03 TLS Error: TLS handshake failed\n\
             IDHAL-TEST tunnel-failed uptime=55.1\n",
        );
        assert_eq!(
            c.digest(10),
            "IDHAL-TEST enrolled node=client1 addr=10.134.7.2 uptime=10.55\n\
             [FAILED] Failed to start idhal-openvpn.service\n\
             2026-12-03 TLS Error: TLS handshake failed\n\
             IDHAL-TEST tunnel-failed uptime=55.1"
        );
        assert_eq!(c.digest(1), "IDHAL-TEST tunnel-failed uptime=55.1");
        assert_eq!(c.digest(0), "");
    }

    /// A CI run: the marker followed systemd's spinner erasing itself (`ESC [K`), so the raw
    /// line did not start with it and the wait missed it for 60 s.
    #[test]
    fn markers_after_the_spinner_erased_itself_are_found() {
        let (_d, c) = console(
            "[  OK  ] Started x\r\n\
             \x1bM\r\x1b[K[ \x1b[0;31m*\x1b[0m] Job dev-ttyS0.device/start running (1min 1s / 1min 30s)\r\n\
             \x1b[KIDHAL-TEST tunnel-up addr=10.134.7.2 uptime=19.24\r\n\
             [ *** ] Job y running\rIDHAL-TEST enrolled node=client1\r\n\
             IDHAL-TEST done\r\x1b[K\n",
        );
        let starts = |p: &str| c.find(|l| l.starts_with(p));
        assert_eq!(
            starts("IDHAL-TEST tunnel-up ").as_deref(),
            Some("IDHAL-TEST tunnel-up addr=10.134.7.2 uptime=19.24")
        );
        assert_eq!(
            starts("IDHAL-TEST enrolled").as_deref(),
            Some("IDHAL-TEST enrolled node=client1")
        );
        assert_eq!(
            starts("IDHAL-TEST done").as_deref(),
            Some("IDHAL-TEST done")
        );
        assert_eq!(
            c.lines()[1],
            "[ *] Job dev-ttyS0.device/start running (1min 1s / 1min 30s)"
        );
    }

    #[test]
    fn a_broken_status_line_is_an_error_not_a_hang() {
        let (_d, c) = console(
            "IDHAL-EVENT run-start\nIDHAL-EVENT run-exit=x\nIDHAL-STATUS {}\n\
             IDHAL-EVENT run-start\nIDHAL-EVENT run-exit=1\nIDHAL-STATUS {nope\n",
        );
        assert!(c.run(1).unwrap().unwrap_err().contains("no exit code"));
        assert!(c.run(2).unwrap().unwrap_err().contains("not JSON"));
    }

    #[test]
    fn missing_or_binary_console_reads_as_nothing_yet() {
        let (_d, c) = console("");
        std::fs::remove_file(c.path()).unwrap();
        assert!(c.lines().is_empty());
        assert!(c.run(1).is_none());
        std::fs::write(c.path(), b"\xff\xfe garbage\n\0\0\n").unwrap();
        assert_eq!(c.lines().len(), 2);
        assert!(c.find(|l| l.starts_with(READY)).is_none());
    }
}
