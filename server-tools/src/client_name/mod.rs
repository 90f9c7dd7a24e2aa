//! The client's host name (OAR `idhalclientname`): the reverse DNS name of the address a node
//! connects from, so an admin sees which machine a vnode runs on. Bounded (one deadline for the
//! PTR and its forward confirmation), checked (host-name characters only), cached per address
//! in a small file of the state dir (the hook is a new process per connect); whatever fails,
//! the address itself is stored. `[client_name]` in docs/server-config.md.

#[cfg(test)]
mod against_dns;
mod cache;
mod lookup;

use crate::config::{ClientNameLookup, NameResolver, ServerConfig, CLIENT_NAME_SHARE};
use crate::names::PropValue;
use crate::process::Deadline;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

/// How `idhalclientname` was found: OAR `idhalclientnamecheck`. Only `Confirmed` and
/// `Unconfirmed` hold a name; every other check stores the client's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Check {
    /// The PTR's name has an A/AAAA record holding the client's address.
    Confirmed,
    /// A PTR name whose forward records do not hold the address (or could not be read):
    /// anyone who controls the reverse zone of an address can claim any name there.
    Unconfirmed,
    /// `[client_name] lookup = "off"`: nothing was asked.
    Off,
    /// No PTR (NXDOMAIN, or no PTR record).
    None,
    /// An answer that was refused: a name that is not a host name, too many records, a CNAME
    /// loop, a truncated answer.
    Invalid,
    /// No answer within the time.
    Timeout,
    /// The resolver answered an error (SERVFAIL, REFUSED, …) or could not be asked.
    Failed,
}

impl Check {
    pub const ALL: [Check; 7] = [
        Check::Confirmed,
        Check::Unconfirmed,
        Check::Off,
        Check::None,
        Check::Invalid,
        Check::Timeout,
        Check::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Check::Confirmed => "confirmed",
            Check::Unconfirmed => "unconfirmed",
            Check::Off => "off",
            Check::None => "none",
            Check::Invalid => "invalid",
            Check::Timeout => "timeout",
            Check::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether the value is a name (else it is the client's address).
    pub fn is_name(self) -> bool {
        matches!(self, Check::Confirmed | Check::Unconfirmed)
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the scheduler is told: the name or the address, and how it was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientName {
    pub value: PropValue,
    pub check: Check,
}

impl ClientName {
    /// The client's address in place of a name.
    pub fn address(ip: IpAddr, check: Check) -> Self {
        Self {
            value: PropValue::parse(&ip.to_string()).expect("an address is a valid property"),
            check,
        }
    }

    /// A checked host name (`host_name`'s output).
    fn named(name: &str, check: Check) -> Self {
        Self {
            value: PropValue::parse(name).expect("a checked host name is a valid property"),
            check,
        }
    }
}

/// One address's answer, with what the log line says about it.
#[derive(Debug, Clone)]
pub struct Found {
    pub name: ClientName,
    /// Why, for the log only (never stored in OAR): already escaped and shortened.
    pub note: Option<String>,
    pub cached: bool,
}

impl Found {
    /// `client desk1.lab.example (confirmed)`, `client 192.0.2.7 (timeout: …; cached)`.
    pub fn describe(&self) -> String {
        let mut why = vec![self.name.check.as_str().to_owned()];
        why.extend(self.note.clone());
        if self.cached {
            why.push("cached".into());
        }
        format!("client {} ({})", self.name.value, why.join(": "))
    }
}

/// Every client name of a connect or a batch, in the order asked, and figures for the log.
#[derive(Debug)]
pub struct Names {
    pub found: Vec<Found>,
    /// Addresses looked up now (the others came from the cache, or nothing was asked).
    pub asked: usize,
    pub took: Duration,
}

/// Longest name kept: DNS names are at most 255 octets on the wire, 253 characters written.
pub const MAX_NAME: usize = 253;

/// `desk1.lab.example` from a PTR's labels (raw bytes, as they came off the wire): labels of
/// a-z 0-9 - (upper case folded), 1-63 each, not starting or ending with -, at most 253
/// characters in all, and a last label that is not all digits (a "name" like 10.0.0.5 would
/// pass for another address, RFC 1123 2.1). A label holding a dot, a space, a quote, a NUL or
/// anything else is refused, never escaped: the value reaches OAR's SQL.
pub fn host_name<'a>(labels: impl IntoIterator<Item = &'a [u8]>) -> Result<String, String> {
    let mut out = String::new();
    let mut last: &[u8] = &[];
    for label in labels {
        if label.is_empty() {
            return Err("an empty label".into());
        }
        if label.len() > 63 {
            return Err(format!("a label of {} bytes (at most 63)", label.len()));
        }
        let ok = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-';
        if !label.iter().all(ok) {
            return Err(format!(
                "label {} holds a character other than a-z 0-9 -",
                shown(label)
            ));
        }
        if label.starts_with(b"-") || label.ends_with(b"-") {
            return Err(format!("label {} starts or ends with -", shown(label)));
        }
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
        if out.len() > MAX_NAME {
            return Err(format!("over {MAX_NAME} characters"));
        }
        last = label;
    }
    if out.is_empty() {
        return Err("the root name (no label)".into());
    }
    if last.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "its last label {} is all digits (it would pass for an address)",
            shown(last)
        ));
    }
    Ok(out)
}

/// `host_name` of a dotted name (the cache file's values).
fn host_name_str(s: &str) -> Result<String, String> {
    host_name(s.split('.').map(str::as_bytes))
}

/// A label as the log shows it: quoted, escaped (no control character or newline reaches a log
/// line), at most 40 characters.
fn shown(label: &[u8]) -> String {
    let text = String::from_utf8_lossy(label);
    let mut short: String = text.chars().take(40).collect();
    if text.chars().count() > 40 {
        short.push('…');
    }
    format!("{short:?}")
}

/// How long an answer is reused from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// `cache_secs`: a name, confirmed, or plainly not (its forward records answered).
    Name,
    /// `failure_cache_secs`: no name, a refused answer, an error, a resolver too slow for
    /// `timeout_ms`, or a name whose forward query went unanswered (it may confirm next time).
    Failure,
    /// Not at all: cut short by the connect's own deadline, not by the resolver.
    Not,
}

/// Less than this to spare and nothing is asked: a resolver's uncached answer takes tens of
/// milliseconds, often more, and a late answer is not even cached.
pub const MIN_LOOKUP: Duration = Duration::from_millis(100);

/// The client names of `wanted` (an address and the deadline of the connect it is for), in
/// order. Cached addresses are not asked again. The others are looked up all at once (each
/// address once, at most `[client_name] parallel` in flight) within `timeout_ms`, cut to a
/// quarter (`CLIENT_NAME_SHARE`) of the time the most pressed connect has left: every connect
/// waits for the lookups before its scheduler call, which needs the rest. With less than
/// `MIN_LOOKUP` to spare nothing is asked: the address, checked `timeout`, not cached. The cache
/// file is updated once. Never fails: a failure is the address, checked `timeout`, `failed`, ….
pub fn client_names(cfg: &ServerConfig, state_dir: &Path, wanted: &[(IpAddr, Deadline)]) -> Names {
    let started = Instant::now();
    let section = &cfg.client_name;
    if section.lookup == ClientNameLookup::Off || wanted.is_empty() {
        return Names {
            found: wanted
                .iter()
                .map(|(ip, _)| Found {
                    name: ClientName::address(*ip, Check::Off),
                    note: None,
                    cached: false,
                })
                .collect(),
            asked: 0,
            took: started.elapsed(),
        };
    }
    let now = idhal_manifest::time::now();
    let mut cache = cache::Cache::load(state_dir, section, now);
    // Each address once (many vnodes of one desktop, or behind one NAT, share one).
    let misses: BTreeSet<IpAddr> = wanted
        .iter()
        .map(|(ip, _)| *ip)
        .filter(|ip| cache.get(*ip).is_none())
        .collect();
    let spare = wanted
        .iter()
        .map(|(_, d)| d.remaining())
        .min()
        .unwrap_or_default()
        / CLIENT_NAME_SHARE;
    let allowed = section.timeout().min(spare);
    let cut = (allowed < section.timeout()).then_some(allowed);
    let mut fresh: BTreeMap<IpAddr, Found> = BTreeMap::new();
    let mut asked = 0;
    if !misses.is_empty() {
        let looked = if allowed < MIN_LOOKUP {
            let why = format!(
                "not asked: {} ms to spare, under {} ms (a lookup may take a quarter of a waiting connect's time left)",
                allowed.as_millis(),
                MIN_LOOKUP.as_millis()
            );
            misses
                .iter()
                .map(|ip| {
                    let name = ClientName::address(*ip, Check::Timeout);
                    (*ip, name, Some(why.clone()), Keep::Not)
                })
                .collect()
        } else {
            match resolver(section.resolver) {
                Ok(server) => {
                    let until = Instant::now() + allowed;
                    let jobs: Vec<(IpAddr, Instant)> =
                        misses.iter().map(|ip| (*ip, until)).collect();
                    asked = jobs.len();
                    let outcomes = lookup::many(server, &jobs, section.parallel as usize);
                    jobs.iter()
                        .zip(outcomes)
                        .map(|(&(ip, _), o)| {
                            let (name, note, keep) = o.into_name(ip, server, cut);
                            (ip, name, note, keep)
                        })
                        .collect()
                }
                // Nobody to ask (a resolv.conf without a nameserver): read again next time.
                Err(why) => misses
                    .iter()
                    .map(|ip| {
                        let name = ClientName::address(*ip, Check::Failed);
                        (*ip, name, Some(why.clone()), Keep::Not)
                    })
                    .collect::<Vec<_>>(),
            }
        };
        let mut kept = Vec::new();
        for (ip, name, note, keep) in looked {
            if cache.put(ip, name.clone(), keep, now, section) {
                kept.push(ip);
            }
            fresh.insert(
                ip,
                Found {
                    name,
                    note,
                    cached: false,
                },
            );
        }
        if let Err(e) = cache.save_if_changed(state_dir, section, now) {
            // Only a cost: the next connect asks again.
            for (_, f) in fresh.iter_mut().filter(|(ip, _)| kept.contains(ip)) {
                let note = f.note.take();
                f.note = Some(match note {
                    Some(n) => format!("{n}; not cached: {e}"),
                    None => format!("not cached: {e}"),
                });
            }
        }
    }
    let found = wanted
        .iter()
        .map(|(ip, _)| match fresh.get(ip) {
            Some(f) => f.clone(),
            None => Found {
                name: cache.get(*ip).expect("cached or looked up").clone(),
                note: None,
                cached: true,
            },
        })
        .collect();
    Names {
        found,
        asked,
        took: started.elapsed(),
    }
}

/// The server asked: `[client_name] resolver`.
fn resolver(r: NameResolver) -> Result<SocketAddr, String> {
    match r {
        NameResolver::At(a) => Ok(a),
        NameResolver::System => system_resolver(Path::new(RESOLV_CONF)),
    }
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// The first `nameserver` of a resolv.conf, on port 53 (what the C library asks first).
fn system_resolver(path: &Path) -> Result<SocketAddr, String> {
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 << 10).read_to_string(&mut text))
        .map_err(|e| {
            format!(
                "[client_name] resolver = \"system\": {}: {e}",
                path.display()
            )
        })?;
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        // A scoped IPv6 address (fe80::1%eth0) cannot be given as a plain socket address.
        .find_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .ok_or_else(|| {
            format!(
                "[client_name] resolver = \"system\": no usable nameserver line in {}",
                path.display()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::cache::path as cache_path;
    use super::*;

    fn name(s: &str) -> Result<String, String> {
        host_name_str(s)
    }

    #[test]
    fn host_names_are_letters_digits_and_hyphens() {
        assert_eq!(name("Desk1.LAB.example").unwrap(), "desk1.lab.example");
        assert_eq!(
            name("xn--bcher-kva.example").unwrap(),
            "xn--bcher-kva.example"
        );
        assert_eq!(name("desktop").unwrap(), "desktop");
        assert_eq!(name("1desk.example").unwrap(), "1desk.example");
        let longest = format!(
            "{}.{}.{}.{}",
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61)
        );
        assert_eq!(longest.len(), 253);
        assert_eq!(name(&longest).unwrap(), longest);
        for (bad, why) in [
            ("", "an empty label"),
            ("a..b", "an empty label"),
            (
                "a b.example",
                "label \"a b\" holds a character other than a-z 0-9 -",
            ),
            (
                "a'b.example",
                "label \"a'b\" holds a character other than a-z 0-9 -",
            ),
            (
                "_srv.example",
                "label \"_srv\" holds a character other than a-z 0-9 -",
            ),
            (
                "a;b.example",
                "label \"a;b\" holds a character other than a-z 0-9 -",
            ),
            ("-a.example", "label \"-a\" starts or ends with -"),
            ("a-.example", "label \"a-\" starts or ends with -"),
            (
                "10.0.0.5",
                "its last label \"5\" is all digits (it would pass for an address)",
            ),
            (
                "desk.123",
                "its last label \"123\" is all digits (it would pass for an address)",
            ),
        ] {
            assert_eq!(name(bad), Err(why.to_string()), "{bad:?}");
        }
        assert_eq!(
            name(&format!("{}.example", "a".repeat(64))),
            Err("a label of 64 bytes (at most 63)".into())
        );
        assert_eq!(
            name(&format!("{longest}.e")),
            Err("over 253 characters".into())
        );
        // Raw labels: a dot, a NUL or a newline inside one is refused and shown escaped.
        assert_eq!(
            host_name([b"evil.name".as_slice(), b"example"]),
            Err("label \"evil.name\" holds a character other than a-z 0-9 -".into())
        );
        assert_eq!(
            host_name([b"a\0b".as_slice(), b"example"]),
            Err("label \"a\\0b\" holds a character other than a-z 0-9 -".into())
        );
        assert_eq!(
            host_name([b"a\nb".as_slice()]),
            Err("label \"a\\nb\" holds a character other than a-z 0-9 -".into())
        );
        assert_eq!(
            host_name([b"d\xc3\xa9sk".as_slice(), b"example"]),
            Err("label \"désk\" holds a character other than a-z 0-9 -".into())
        );
        assert_eq!(
            host_name(std::iter::empty()),
            Err("the root name (no label)".into())
        );
    }

    #[test]
    fn checks_round_trip_and_fit_oar() {
        for c in Check::ALL {
            assert_eq!(Check::parse(c.as_str()), Some(c));
            PropValue::parse(c.as_str()).unwrap();
        }
        assert_eq!(Check::parse("Confirmed"), None);
    }

    #[test]
    fn the_system_resolver_is_the_first_usable_nameserver() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("resolv.conf");
        let at = |text: &str| {
            std::fs::write(&p, text).unwrap();
            system_resolver(&p)
        };
        assert_eq!(
            at("# x\nsearch example\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n"),
            Ok("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(at("nameserver ::1\n"), Ok("[::1]:53".parse().unwrap()));
        let e = at("search example\n").unwrap_err();
        assert!(e.ends_with("resolv.conf"), "{e}");
        assert!(
            e.starts_with("[client_name] resolver = \"system\": no usable nameserver line in "),
            "{e}"
        );
        let e = system_resolver(&d.path().join("missing")).unwrap_err();
        assert!(e.contains("No such file"), "{e}");
    }

    #[test]
    fn off_asks_nothing_and_stores_the_address() {
        let cfg = ServerConfig::default();
        let d = tempfile::tempdir().unwrap();
        let ip: IpAddr = "2001:db8::7".parse().unwrap();
        let n = client_names(
            &cfg,
            d.path(),
            &[(ip, Deadline::after(Duration::from_secs(1)))],
        );
        assert_eq!(n.asked, 0);
        assert_eq!(n.found[0].name, ClientName::address(ip, Check::Off));
        assert_eq!(n.found[0].describe(), "client 2001:db8::7 (off)");
        assert!(!cache_path(d.path()).exists());
    }
}
