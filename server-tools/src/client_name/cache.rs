//! The client-name cache: one small file in the state dir, `client-names`, a line
//! `ADDRESS EXPIRES CHECK VALUE` per address, rewritten atomically after each lookup. A file
//! and not the state database: it is this server's own, disposable, and needs no schema; the
//! sync hook is a new process per connect, so it cannot live in memory.
//!
//! Two processes that write at once each rename their own complete file: the last one wins and
//! the other's new entries are looked up again next time (it is a cache). A line that does not
//! parse, or whose value does not pass the same checks as a fresh answer, is dropped; a file
//! over its size bound is read as empty; an expiry further than the configured TTLs is cut.

use super::{host_name_str, Check, ClientName};
use crate::config::ClientNameSection;
use crate::publish::write_atomic;
use std::collections::BTreeMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// A line is at most ~310 bytes (an IPv6 address, two numbers, a check, a 253-byte name).
const LINE_BYTES: u64 = 320;

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("client-names")
}

#[derive(Debug, Default)]
pub struct Cache {
    entries: BTreeMap<IpAddr, (u64, ClientName)>,
}

impl Cache {
    /// The live entries of the file (none when it is missing, too large or unreadable).
    pub fn load(state_dir: &Path, section: &ClientNameSection, now: u64) -> Self {
        let max_bytes = u64::from(section.cache_entries) * LINE_BYTES;
        let mut buf = Vec::new();
        let read = std::fs::File::open(path(state_dir))
            .and_then(|f| f.take(max_bytes + 1).read_to_end(&mut buf));
        if read.is_err() || buf.len() as u64 > max_bytes {
            return Self::default();
        }
        let longest = section.cache_secs.max(section.failure_cache_secs);
        let mut entries = BTreeMap::new();
        for line in String::from_utf8_lossy(&buf).lines() {
            if let Some((ip, expires, name)) = parse_line(line) {
                if expires > now {
                    entries.insert(ip, (expires.min(now + longest), name));
                }
            }
        }
        Self { entries }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&ClientName> {
        self.entries.get(&ip).map(|(_, n)| n)
    }

    /// Remembers a fresh answer: a name for `cache_secs`, anything else for
    /// `failure_cache_secs`. Nothing is kept with a TTL of 0.
    pub fn put(&mut self, ip: IpAddr, name: ClientName, now: u64, section: &ClientNameSection) {
        let ttl = if name.check.is_name() {
            section.cache_secs
        } else {
            section.failure_cache_secs
        };
        if ttl == 0 || name.check == Check::Off {
            self.entries.remove(&ip);
            return;
        }
        self.entries.insert(ip, (now + ttl, name));
    }

    /// Writes the entries, merged over what the file holds now (another process may have
    /// written since this one read it), at most `cache_entries` (those expiring last kept).
    pub fn save(
        &self,
        state_dir: &Path,
        section: &ClientNameSection,
        now: u64,
    ) -> Result<(), String> {
        let mut merged = Self::load(state_dir, section, now).entries;
        for (ip, e) in &self.entries {
            merged.insert(*ip, e.clone());
        }
        let mut live: Vec<(IpAddr, u64, &ClientName)> = merged
            .iter()
            .filter(|(_, (expires, _))| *expires > now)
            .map(|(ip, (expires, name))| (*ip, *expires, name))
            .collect();
        let keep = section.cache_entries as usize;
        if live.len() > keep {
            live.sort_by_key(|&(ip, expires, _)| (std::cmp::Reverse(expires), ip));
            live.truncate(keep);
            live.sort_by_key(|&(ip, ..)| ip);
        }
        let mut text = String::from("# idhal client names: ADDRESS EXPIRES CHECK VALUE\n");
        for (ip, expires, name) in live {
            text.push_str(&format!("{ip} {expires} {} {}\n", name.check, name.value));
        }
        std::fs::create_dir_all(state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
        write_atomic(&path(state_dir), text.as_bytes(), 0o600).map_err(|e| e.to_string())
    }
}

/// One line, checked as a fresh answer is: a name must be a host name, any other check must
/// hold the address itself.
fn parse_line(line: &str) -> Option<(IpAddr, u64, ClientName)> {
    let mut f = line.split(' ');
    let (ip, expires, check, value) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    let ip: IpAddr = ip.parse().ok()?;
    let expires: u64 = expires.parse().ok()?;
    let check = Check::parse(check)?;
    let name = if check.is_name() {
        ClientName::named(&host_name_str(value).ok()?, check)
    } else if check != Check::Off && value == ip.to_string() {
        ClientName::address(ip, check)
    } else {
        return None;
    };
    Some((ip, expires, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(entries: u32) -> ClientNameSection {
        ClientNameSection {
            cache_entries: entries,
            ..ClientNameSection::default()
        }
    }

    #[test]
    fn entries_survive_a_new_process_and_expire() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let s = section(10);
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "2001:db8::7".parse().unwrap();
        let mut c = Cache::load(&state, &s, 1000);
        assert!(c.get(a).is_none());
        c.put(
            a,
            ClientName::named("desk1.lab.example", Check::Confirmed),
            1000,
            &s,
        );
        c.put(b, ClientName::address(b, Check::Timeout), 1000, &s);
        c.save(&state, &s, 1000).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path(&state)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = Cache::load(&state, &s, 1001);
        assert_eq!(
            again.get(a),
            Some(&ClientName::named("desk1.lab.example", Check::Confirmed))
        );
        assert_eq!(again.get(b), Some(&ClientName::address(b, Check::Timeout)));
        // The failure expires after failure_cache_secs (300), the name after cache_secs.
        let later = Cache::load(&state, &s, 1000 + 300);
        assert!(later.get(b).is_none());
        assert!(later.get(a).is_some());
        assert!(Cache::load(&state, &s, 1000 + 3600).get(a).is_none());
    }

    #[test]
    fn a_second_writer_keeps_the_first_ones_entries_and_the_bound_holds() {
        let d = tempfile::tempdir().unwrap();
        let s = section(3);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        let mut first = Cache::load(d.path(), &s, 0);
        let mut second = Cache::load(d.path(), &s, 0);
        first.put(ip(1), ClientName::address(ip(1), Check::None), 0, &s);
        first.save(d.path(), &s, 0).unwrap();
        second.put(ip(2), ClientName::address(ip(2), Check::None), 1, &s);
        second.save(d.path(), &s, 1).unwrap();
        let both = Cache::load(d.path(), &s, 2);
        assert!(both.get(ip(1)).is_some() && both.get(ip(2)).is_some());
        // Over the bound: those expiring first go.
        let mut more = Cache::load(d.path(), &s, 2);
        more.put(ip(3), ClientName::address(ip(3), Check::None), 2, &s);
        more.put(ip(4), ClientName::address(ip(4), Check::None), 3, &s);
        more.save(d.path(), &s, 3).unwrap();
        let kept = Cache::load(d.path(), &s, 3);
        assert_eq!(
            kept.entries.keys().copied().collect::<Vec<_>>(),
            [ip(2), ip(3), ip(4)]
        );
    }

    #[test]
    fn a_tampered_file_is_checked_like_an_answer() {
        let d = tempfile::tempdir().unwrap();
        let s = section(10);
        let text = "# comment\n\
            192.0.2.1 5000 confirmed good.example\n\
            192.0.2.2 5000 confirmed bad'name.example\n\
            192.0.2.3 5000 timeout 192.0.2.99\n\
            192.0.2.4 5000 off 192.0.2.4\n\
            192.0.2.5 5000 sure x.example\n\
            192.0.2.6 notanumber none 192.0.2.6\n\
            192.0.2.7 5000 none 192.0.2.7 extra\n\
            192.0.2.8 99999999999 unconfirmed far.example\n\
            192.0.2.9 5000 none 192.0.2.9\n";
        std::fs::write(path(d.path()), text).unwrap();
        let c = Cache::load(d.path(), &s, 1000);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        assert_eq!(
            c.entries.keys().copied().collect::<Vec<_>>(),
            [ip(1), ip(8), ip(9)]
        );
        // An expiry beyond the TTLs is cut to them.
        assert_eq!(c.entries[&ip(8)].0, 1000 + 3600);
        // A file over its bound is read as empty.
        std::fs::write(path(d.path()), "x".repeat(10 * 320 + 1)).unwrap();
        assert!(Cache::load(d.path(), &s, 1000).entries.is_empty());
    }
}
