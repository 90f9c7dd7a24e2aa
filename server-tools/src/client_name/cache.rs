//! The client-name cache: one small file in the state dir, `client-names`, a line
//! `ADDRESS EXPIRES CHECK VALUE` per address, rewritten atomically after each lookup. A file
//! and not the state database: it is this server's own, disposable, and needs no schema; the
//! sync hook is a new process per connect, so it cannot live in memory.
//!
//! Two processes that write at once each rename their own complete file: the last one wins and
//! the other's new entries are looked up again next time (it is a cache). A line that does not
//! parse, or whose value does not pass the same checks as a fresh answer, is dropped; a file
//! over its size bound is read as empty; an entry that expires further away than its kind's TTL
//! (a clock set back, a TTL lowered, a hand-edited line) is dropped, so a TTL of 0 serves
//! nothing.

use super::{host_name_str, Check, ClientName, Keep};
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
    /// An entry was added since the file was read.
    changed: bool,
}

/// The longest an entry with `check` may be kept: `cache_secs` for a name, `failure_cache_secs`
/// for an address. A name whose forward query went unanswered is kept for `failure_cache_secs`
/// when that is shorter; read back, it is only bounded by `cache_secs`.
fn ttl(section: &ClientNameSection, check: Check) -> u64 {
    if check.is_name() {
        section.cache_secs
    } else {
        section.failure_cache_secs
    }
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
        let mut entries = BTreeMap::new();
        for line in String::from_utf8_lossy(&buf).lines() {
            if let Some((ip, expires, name)) = parse_line(line) {
                if expires > now && expires <= now.saturating_add(ttl(section, name.check)) {
                    entries.insert(ip, (expires, name));
                }
            }
        }
        Self {
            entries,
            changed: false,
        }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&ClientName> {
        self.entries.get(&ip).map(|(_, n)| n)
    }

    /// Remembers a fresh answer for as long as `keep` says, never longer than its check's TTL.
    /// Whether it was kept (nothing is with `Keep::Not` or a TTL of 0).
    pub fn put(
        &mut self,
        ip: IpAddr,
        name: ClientName,
        keep: Keep,
        now: u64,
        section: &ClientNameSection,
    ) -> bool {
        let secs = match keep {
            Keep::Name => section.cache_secs,
            Keep::Failure => section.failure_cache_secs,
            Keep::Not => 0,
        }
        .min(ttl(section, name.check));
        if secs == 0 || name.check == Check::Off {
            self.entries.remove(&ip);
            return false;
        }
        self.entries.insert(ip, (now.saturating_add(secs), name));
        self.changed = true;
        true
    }

    /// `save` when an entry was added since the file was read.
    pub fn save_if_changed(
        &self,
        state_dir: &Path,
        section: &ClientNameSection,
        now: u64,
    ) -> Result<(), String> {
        if self.changed {
            self.save(state_dir, section, now)
        } else {
            Ok(())
        }
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

    /// Remembers that `ip` has no PTR.
    fn no_name(c: &mut Cache, ip: IpAddr, now: u64, s: &ClientNameSection) {
        c.put(
            ip,
            ClientName::address(ip, Check::None),
            Keep::Failure,
            now,
            s,
        );
    }

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
            Keep::Name,
            1000,
            &s,
        );
        c.put(
            b,
            ClientName::address(b, Check::Timeout),
            Keep::Failure,
            1000,
            &s,
        );
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
        no_name(&mut first, ip(1), 0, &s);
        first.save(d.path(), &s, 0).unwrap();
        no_name(&mut second, ip(2), 1, &s);
        second.save(d.path(), &s, 1).unwrap();
        let both = Cache::load(d.path(), &s, 2);
        assert!(both.get(ip(1)).is_some() && both.get(ip(2)).is_some());
        // Over the bound: those expiring first go.
        let mut more = Cache::load(d.path(), &s, 2);
        no_name(&mut more, ip(3), 2, &s);
        no_name(&mut more, ip(4), 3, &s);
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
            192.0.2.1 4000 confirmed good.example\n\
            192.0.2.2 4000 confirmed bad'name.example\n\
            192.0.2.3 1200 timeout 192.0.2.99\n\
            192.0.2.4 1200 off 192.0.2.4\n\
            192.0.2.5 1200 sure x.example\n\
            192.0.2.6 notanumber none 192.0.2.6\n\
            192.0.2.7 1200 none 192.0.2.7 extra\n\
            192.0.2.8 99999999999 unconfirmed far.example\n\
            192.0.2.9 1200 none 192.0.2.9\n";
        std::fs::write(path(d.path()), text).unwrap();
        let c = Cache::load(d.path(), &s, 1000);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        // 8: an expiry beyond the TTLs is dropped, not cut.
        assert_eq!(
            c.entries.keys().copied().collect::<Vec<_>>(),
            [ip(1), ip(9)]
        );
        // A file over its bound is read as empty.
        std::fs::write(path(d.path()), "x".repeat(10 * 320 + 1)).unwrap();
        assert!(Cache::load(d.path(), &s, 1000).entries.is_empty());
    }

    #[test]
    fn an_expiry_beyond_its_ttl_drops_the_entry_and_a_ttl_of_0_serves_nothing() {
        let d = tempfile::tempdir().unwrap();
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        // cache_secs 3600 for a name, failure_cache_secs 300 for the rest, at now = 1000.
        std::fs::write(
            path(d.path()),
            "192.0.2.1 4600 confirmed good.example\n\
             192.0.2.2 4601 confirmed far.example\n\
             192.0.2.3 1300 none 192.0.2.3\n\
             192.0.2.4 1301 timeout 192.0.2.4\n\
             192.0.2.5 4000 failed 192.0.2.5\n\
             192.0.2.6 1000 none 192.0.2.6\n\
             192.0.2.7 99999999999 confirmed far.example\n",
        )
        .unwrap();
        let s = section(10);
        let c = Cache::load(d.path(), &s, 1000);
        assert_eq!(
            c.entries.keys().copied().collect::<Vec<_>>(),
            [ip(1), ip(3)]
        );
        // One kept keeps its own expiry, and ends there.
        assert_eq!(c.entries[&ip(1)].0, 4600);
        assert!(Cache::load(d.path(), &s, 4600).get(ip(1)).is_none());
        // One far in the future is never served (it used to be, cut to now + TTL at every
        // read: an entry that never expired).
        for now in [1000, 10_000_000, 1_000_000_000] {
            assert!(Cache::load(d.path(), &s, now).get(ip(7)).is_none(), "{now}");
        }
        // "0: never cached": nothing of that kind is served, whatever the file says.
        let no_names = ClientNameSection {
            cache_secs: 0,
            ..section(10)
        };
        let c = Cache::load(d.path(), &no_names, 1000);
        assert_eq!(c.entries.keys().copied().collect::<Vec<_>>(), [ip(3)]);
        let no_failures = ClientNameSection {
            failure_cache_secs: 0,
            ..section(10)
        };
        let c = Cache::load(d.path(), &no_failures, 1000);
        assert_eq!(c.entries.keys().copied().collect::<Vec<_>>(), [ip(1)]);
    }

    #[test]
    fn each_answer_is_kept_as_long_as_its_kind_says() {
        let s = section(10);
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        let mut c = Cache::default();
        let desk = || ClientName::named("desk.example", Check::Unconfirmed);
        assert!(c.put(ip(1), desk(), Keep::Name, 1000, &s));
        // Unconfirmed only because its forward query went unanswered: the failure TTL.
        assert!(c.put(ip(2), desk(), Keep::Failure, 1000, &s));
        // Cut short by the connect's own deadline: not kept.
        assert!(!c.put(
            ip(3),
            ClientName::address(ip(3), Check::Timeout),
            Keep::Not,
            1000,
            &s
        ));
        assert!(!c.put(ip(4), desk(), Keep::Not, 1000, &s));
        let expiry = |c: &Cache, i| c.entries.get(&ip(i)).map(|e| e.0);
        assert_eq!(
            [1, 2, 3, 4].map(|i| expiry(&c, i)),
            [Some(4600), Some(1300), None, None]
        );
        // A failure TTL longer than the name TTL does not keep a name longer.
        let short_names = ClientNameSection {
            cache_secs: 100,
            ..section(10)
        };
        assert!(c.put(ip(5), desk(), Keep::Failure, 1000, &short_names));
        assert_eq!(expiry(&c, 5), Some(1100));
        // Nothing new, nothing written.
        let d = tempfile::tempdir().unwrap();
        let mut idle = Cache::default();
        idle.put(
            ip(3),
            ClientName::address(ip(3), Check::Timeout),
            Keep::Not,
            1000,
            &s,
        );
        idle.save_if_changed(d.path(), &s, 1000).unwrap();
        assert!(!path(d.path()).exists());
    }
}
