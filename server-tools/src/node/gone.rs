//! When `idhal reconcile` first saw each of this server's nodes gone from OpenVPN's status, so
//! that it takes a node down only once it has been gone `[hook] down_grace_secs` (a failover
//! or a drain moves a node within seconds, and the sync hook leaves the take-down to reconcile).
//! One small file in the state dir, `reconcile-gone`, rewritten atomically by each run: a line
//! `HOST SINCE FIRST_SEEN` per node gone and not taken down yet. Keyed by the session too: a
//! node that came back and left again starts a new grace.
//!
//! The file is idhal's own, but a state dir is an admin's to edit: a line that does not parse
//! is dropped (its node starts a new grace: the late side), a first sighting in the future
//! counts from now (else the node would never age), and a file over `MAX_BYTES` is read as
//! empty. An earlier first sighting written by hand does shorten a grace: that is the admin's
//! call, as setting the node Absent would be.

use crate::publish::{write_atomic, PublishError};
use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

/// About 60 bytes a node: room for 100,000 nodes gone at once.
const MAX_BYTES: u64 = 8 << 20;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("reconcile-gone")
}

/// (host, session start) → when a run first saw it gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gone {
    seen: BTreeMap<(String, u64), u64>,
}

impl Gone {
    /// The record, or an empty one (with the reason, to log) when it is missing, too large or
    /// unreadable.
    pub fn load(state_dir: &Path) -> (Self, Option<String>) {
        let p = path(state_dir);
        let text = match std::fs::File::open(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Self::default(), None),
            Err(e) => return (Self::default(), Some(format!("{}: {e}", p.display()))),
            Ok(f) => {
                let mut buf = Vec::new();
                if let Err(e) = f.take(MAX_BYTES + 1).read_to_end(&mut buf) {
                    return (Self::default(), Some(format!("{}: {e}", p.display())));
                }
                if buf.len() as u64 > MAX_BYTES {
                    return (
                        Self::default(),
                        Some(format!(
                            "{} is over {MAX_BYTES} bytes: read as empty",
                            p.display()
                        )),
                    );
                }
                String::from_utf8_lossy(&buf).into_owned()
            }
        };
        let mut seen = BTreeMap::new();
        let mut bad = 0usize;
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = match f.as_slice() {
                [host, since, first] if host.len() <= 255 => since
                    .parse::<u64>()
                    .ok()
                    .zip(first.parse::<u64>().ok())
                    .map(|(s, t)| ((host.to_string(), s), t)),
                _ => None,
            };
            match parsed {
                Some((k, t)) => {
                    seen.insert(k, t);
                }
                None => bad += 1,
            }
        }
        let why = (bad > 0).then(|| {
            format!(
                "{}: {bad} line(s) that are not `HOST SINCE FIRST_SEEN` dropped",
                p.display()
            )
        });
        (Self { seen }, why)
    }

    /// How long `host`'s session `since` has been gone at `now`, recording `now` as its first
    /// sighting when it is new.
    /// A first sighting in the future (a clock stepped back, a hand edit) counts from now:
    /// kept as it was, the node would never age and stay Alive for good.
    pub fn gone_for(&mut self, host: &str, since: u64, now: u64) -> u64 {
        let first = self.seen.entry((host.to_owned(), since)).or_insert(now);
        *first = (*first).min(now);
        now - *first
    }

    /// Keeps only the entries `keep` says are still gone and not taken down.
    pub fn retain(&mut self, mut keep: impl FnMut(&str, u64) -> bool) {
        self.seen.retain(|(h, s), _| keep(h, *s));
    }

    pub fn save(&self, state_dir: &Path) -> Result<(), PublishError> {
        let mut text = String::from("# idhal reconcile: HOST SINCE FIRST_SEEN of nodes gone from OpenVPN's status, within [hook] down_grace_secs\n");
        for ((host, since), first) in &self.seen {
            text.push_str(&format!("{host} {since} {first}\n"));
        }
        write_atomic(&path(state_dir), text.as_bytes(), 0o644)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gone_node_ages_from_its_first_sighting_and_survives_a_save() {
        let d = tempfile::tempdir().unwrap();
        let (mut g, why) = Gone::load(d.path());
        assert_eq!((g.seen.len(), why), (0, None));
        assert_eq!(g.gone_for("a.x", 100, 1000), 0);
        assert_eq!(g.gone_for("a.x", 100, 1007), 7);
        // Another session of the same host starts its own grace.
        assert_eq!(g.gone_for("a.x", 200, 1007), 0);
        g.save(d.path()).unwrap();
        let (mut g, why) = Gone::load(d.path());
        assert_eq!(why, None, "its own header is no bad line");
        assert_eq!(g.gone_for("a.x", 100, 1010), 10);
        g.retain(|h, s| h == "a.x" && s == 200);
        assert_eq!(g.gone_for("a.x", 100, 1010), 0, "dropped: a new grace");
    }

    #[test]
    fn a_hostile_record_never_brings_a_take_down_forward() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            path(d.path()),
            "# comment\na.x 100 1000\nb.x notanumber 5\nc.x 1 2 3\n\u{0}\u{ff}garbage\n\n",
        )
        .unwrap();
        let (mut g, why) = Gone::load(d.path());
        assert!(why.unwrap().contains("3 line(s)"));
        assert_eq!(g.gone_for("a.x", 100, 1005), 5);
        assert_eq!(g.gone_for("b.x", 5, 1005), 0);
        // A first sighting in the future (the clock stepped back) counts from now, and ages.
        std::fs::write(path(d.path()), "f.x 7 999999\n").unwrap();
        let (mut g, _) = Gone::load(d.path());
        assert_eq!(g.gone_for("f.x", 7, 2000), 0);
        assert_eq!(g.gone_for("f.x", 7, 2030), 30);
        // Too large: read as empty, every node starts its grace again.
        std::fs::write(path(d.path()), vec![b'a'; MAX_BYTES as usize + 1]).unwrap();
        let (g, why) = Gone::load(d.path());
        assert!(g.seen.is_empty() && why.unwrap().contains("over"));
        // Not a file (a directory at its place): empty, with the reason.
        std::fs::remove_file(path(d.path())).unwrap();
        std::fs::create_dir(path(d.path())).unwrap();
        let (g, why) = Gone::load(d.path());
        assert!(g.seen.is_empty() && why.is_some());
    }
}
