//! Client names against a real Knot on 127.0.0.1 serving good, unconfirmed and hostile PTRs,
//! and against sockets on 127.0.0.1 that never answer or answer nonsense. Nothing is sent
//! anywhere else: every lookup names its resolver.

use super::cache::path as cache_path;
use super::lookup::{self, Outcome};
use super::*;
use crate::config::{ClientNameLookup, ClientNameSection, NameResolver};
use idhal_test_support::knot::{empty_zone, Knot};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::OnceLock;

/// A 253-character name in lab.test: the longest a DNS name can be written.
fn longest() -> String {
    let name = format!(
        "{}.{}.{}.{}.lab.test",
        "x".repeat(63),
        "y".repeat(63),
        "z".repeat(63),
        "w".repeat(52)
    );
    assert_eq!(name.len(), 253);
    name
}

/// `2001:db8::10`'s ip6.arpa owner, relative to 8.b.d.0.1.0.0.2.ip6.arpa.
fn v6_owner() -> String {
    let full = hickory_proto::rr::Name::from("2001:db8::10".parse::<IpAddr>().unwrap()).to_string();
    full.strip_suffix(".8.b.d.0.1.0.0.2.ip6.arpa.")
        .or_else(|| full.strip_suffix(".8.b.d.0.1.0.0.2.ip6.arpa"))
        .unwrap()
        .to_owned()
}

fn knot() -> Option<&'static Knot> {
    static KNOT: OnceLock<Option<Knot>> = OnceLock::new();
    KNOT.get_or_init(|| {
        if !Knot::available() {
            return None;
        }
        let mut fwd = empty_zone("lab.test");
        fwd.push_str(&format!(
            "desk1 A 192.0.2.10\ndesk2 A 192.0.2.99\ndesk3 A 192.0.2.13\ndesk28 A 192.0.2.28\n\
             zz A 192.0.2.32\naa A 192.0.2.132\ndesk33 CNAME real33\nreal33 A 192.0.2.33\n\
             loopy CNAME loopy2\nloopy2 CNAME loopy\ndesk6 AAAA 2001:db8::10\n{}. A 192.0.2.25\n",
            longest()
        ));
        let mut rev = empty_zone("2.0.192.in-addr.arpa");
        rev.push_str(&format!(
            "10 PTR desk1.lab.test.\n11 PTR desk2.lab.test.\n12 PTR ghost.lab.test.\n\
             13 PTR DESK3.Lab.Test.\n\
             20 PTR bad\\032name.lab.test.\n21 PTR a\\039b.lab.test.\n22 PTR evil\\.x.lab.test.\n\
             23 PTR under_score.lab.test.\n24 PTR 10.0.0.5.\n25 PTR {}.\n\
             27 CNAME l1\nl1 CNAME 27\n28 CNAME 28.sub\n28.sub PTR desk28.lab.test.\n\
             30 TXT \"no PTR here\"\n31 PTR .\n32 PTR zz.lab.test.\n32 PTR aa.lab.test.\n\
             33 PTR desk33.lab.test.\n34 PTR loopy.lab.test.\n35 PTR a\\000b.lab.test.\n",
            longest()
        ));
        for i in 1..=9 {
            rev.push_str(&format!("26 PTR n{i}.lab.test.\n"));
        }
        for i in 1..=60 {
            rev.push_str(&format!("36 PTR p{i}-{}.lab.test.\n", "q".repeat(40)));
        }
        let mut rev6 = empty_zone("8.b.d.0.1.0.0.2.ip6.arpa");
        rev6.push_str(&format!("{} PTR desk6.lab.test.\n", v6_owner()));
        Some(Knot::start(&[
            ("lab.test", fwd),
            ("2.0.192.in-addr.arpa", rev),
            ("8.b.d.0.1.0.0.2.ip6.arpa", rev6),
        ]))
    })
    .as_ref()
}

fn config(server: SocketAddr, timeout_ms: u64) -> ServerConfig {
    ServerConfig {
        client_name: ClientNameSection {
            lookup: ClientNameLookup::Ptr,
            resolver: NameResolver::At(server),
            timeout_ms,
            ..ClientNameSection::default()
        },
        ..ServerConfig::default()
    }
}

/// (value, check, note) of one address, asked once (no cache: a fresh state dir).
fn ask(server: SocketAddr, ip: &str) -> (String, Check, Option<String>) {
    let d = tempfile::tempdir().unwrap();
    let ip: IpAddr = ip.parse().unwrap();
    let n = client_names(
        &config(server, 2_000),
        d.path(),
        &[(ip, Deadline::after(Duration::from_secs(30)))],
    );
    let f = n.found.into_iter().next().unwrap();
    assert!(!f.cached);
    (f.name.value.to_string(), f.name.check, f.note)
}

#[test]
fn ptr_answers_from_knot_are_checked_forward_and_hostile_ones_fall_back_to_the_address() {
    let Some(knot) = knot() else { return };
    let server: SocketAddr = format!("127.0.0.1:{}", knot.port).parse().unwrap();
    let named = |ip: &str, name: &str, check: Check, note: Option<&str>| {
        assert_eq!(
            ask(server, ip),
            (name.to_string(), check, note.map(str::to_owned)),
            "{ip}"
        );
    };
    named("192.0.2.10", "desk1.lab.test", Check::Confirmed, None);
    named(
        "192.0.2.11",
        "desk2.lab.test",
        Check::Unconfirmed,
        Some("its 1 A record(s) do not hold 192.0.2.11"),
    );
    let (value, check, note) = ask(server, "192.0.2.12");
    assert_eq!(
        (value.as_str(), check),
        ("ghost.lab.test", Check::Unconfirmed)
    );
    assert!(
        note.as_deref()
            .unwrap()
            .starts_with("its A query: answered "),
        "{note:?}"
    );
    // Upper case is folded.
    named("192.0.2.13", "desk3.lab.test", Check::Confirmed, None);
    // The longest name there is, stored whole.
    named("192.0.2.25", &longest(), Check::Confirmed, None);
    // RFC 2317: the PTR behind a CNAME; a forward CNAME is followed too.
    named("192.0.2.28", "desk28.lab.test", Check::Confirmed, None);
    named("192.0.2.33", "desk33.lab.test", Check::Confirmed, None);
    // Two names: the confirmed one, though another sorts first.
    named("192.0.2.32", "zz.lab.test", Check::Confirmed, None);
    // A forward CNAME loop: the name stays, unconfirmed.
    let (value, check, note) = ask(server, "192.0.2.34");
    assert_eq!(
        (value.as_str(), check),
        ("loopy.lab.test", Check::Unconfirmed)
    );
    assert!(
        note.as_deref() == Some("its A query: more than 8 CNAMEs in a row (a loop?)")
            || note
                .as_deref()
                .is_some_and(|n| n.starts_with("its A query: answered ")),
        "{note:?}"
    );
    // IPv6, and an IPv4 client seen on a dual-stack socket.
    named("2001:db8::10", "desk6.lab.test", Check::Confirmed, None);
    named(
        "::ffff:192.0.2.10",
        "desk1.lab.test",
        Check::Confirmed,
        None,
    );

    let refused = |ip: &str, why: &str| {
        assert_eq!(
            ask(server, ip),
            (ip.to_string(), Check::Invalid, Some(why.to_owned())),
            "{ip}"
        );
    };
    let rule = "holds a character other than a-z 0-9 -";
    refused(
        "192.0.2.20",
        &format!("PTR not a host name: label \"bad name\" {rule}"),
    );
    refused(
        "192.0.2.21",
        &format!("PTR not a host name: label \"a'b\" {rule}"),
    );
    refused(
        "192.0.2.22",
        &format!("PTR not a host name: label \"evil.x\" {rule}"),
    );
    refused(
        "192.0.2.23",
        &format!("PTR not a host name: label \"under_score\" {rule}"),
    );
    refused(
        "192.0.2.35",
        &format!("PTR not a host name: label \"a\\0b\" {rule}"),
    );
    refused(
        "192.0.2.24",
        "PTR not a host name: its last label \"5\" is all digits (it would pass for an address)",
    );
    refused(
        "192.0.2.31",
        "PTR not a host name: the root name (no label)",
    );
    refused("192.0.2.26", "9 PTR records (at most 8 are looked at)");
    refused(
        "192.0.2.36",
        "the answer was truncated (more records than one UDP message holds)",
    );
    let (value, check, note) = ask(server, "192.0.2.27");
    assert_eq!(
        (value.as_str(), check),
        ("192.0.2.27", Check::Invalid),
        "{note:?}"
    );
    assert_eq!(
        note.as_deref(),
        Some("more than 8 CNAMEs in a row (a loop?)")
    );

    let none = |ip: &str, why: &str| {
        assert_eq!(
            ask(server, ip),
            (ip.to_string(), Check::None, Some(why.to_owned())),
            "{ip}"
        );
    };
    none("192.0.2.29", "NXDOMAIN");
    none("192.0.2.30", "no PTR record");
    // A zone Knot does not serve: it refuses to answer.
    let (value, check, note) = ask(server, "198.51.100.7");
    assert_eq!((value.as_str(), check), ("198.51.100.7", Check::Failed));
    let note = note.unwrap();
    assert!(note.starts_with(&format!("{server}: answered ")), "{note}");
}

#[test]
fn answers_are_cached_per_address_across_processes() {
    let Some(knot) = knot() else { return };
    let server: SocketAddr = format!("127.0.0.1:{}", knot.port).parse().unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = config(server, 2_000);
    let deadline = Deadline::after(Duration::from_secs(30));
    let a: IpAddr = "192.0.2.10".parse().unwrap();
    let b: IpAddr = "192.0.2.29".parse().unwrap();
    // Five connects from one desktop and one from elsewhere: two lookups.
    let wanted = [
        (a, deadline),
        (a, deadline),
        (b, deadline),
        (a, deadline),
        (a, deadline),
        (a, deadline),
    ];
    let first = client_names(&cfg, d.path(), &wanted);
    assert_eq!(first.asked, 2);
    assert!(first.found.iter().all(|f| !f.cached));
    assert_eq!(
        first.found[0].describe(),
        "client desk1.lab.test (confirmed)"
    );
    assert_eq!(
        first.found[2].describe(),
        "client 192.0.2.29 (none: NXDOMAIN)"
    );
    // What a new hook process sees: the file.
    let again = client_names(&cfg, d.path(), &wanted);
    assert_eq!(again.asked, 0);
    assert_eq!(
        again.found[0].describe(),
        "client desk1.lab.test (confirmed: cached)"
    );
    assert_eq!(
        again.found[2].describe(),
        "client 192.0.2.29 (none: cached)"
    );
    let text = std::fs::read_to_string(cache_path(d.path())).unwrap();
    assert!(
        text.contains(" confirmed desk1.lab.test\n") && text.contains(" none 192.0.2.29\n"),
        "{text}"
    );
    eprintln!(
        "client names: 2 addresses looked up in {:.1} ms, 6 cached in {:.1} ms",
        first.took.as_secs_f64() * 1e3,
        again.took.as_secs_f64() * 1e3
    );
}

/// A UDP socket on 127.0.0.1 that answers each query with `answer(query)` (or not at all).
fn responder(answer: impl Fn(&[u8]) -> Option<Vec<u8>> + Send + 'static) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n]) {
                let _ = sock.send_to(&reply, from);
            }
        }
    });
    addr
}

/// A reply to `query` holding `answers` (built with hickory, as a server would).
fn reply(query: &[u8], answers: Vec<hickory_proto::rr::Record>) -> Vec<u8> {
    use hickory_proto::op::{Message, MessageType};
    let q = Message::from_vec(query).unwrap();
    let mut m = Message::new();
    m.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_desired(true)
        .set_recursion_available(true)
        .add_queries(q.queries().to_vec())
        .add_answers(answers);
    m.to_vec().unwrap()
}

fn qtype(query: &[u8]) -> hickory_proto::rr::RecordType {
    hickory_proto::op::Message::from_vec(query)
        .unwrap()
        .queries()[0]
        .query_type()
}

/// The expiry the cache file gives `ip`, if any.
fn cached_until(state: &Path, ip: &str) -> Option<u64> {
    let text = std::fs::read_to_string(cache_path(state)).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{ip} ")))
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
}

/// Hickory's own query timeout when none is given: a bound below it proves ours was used.
const HICKORY_DEFAULT: Duration = Duration::from_secs(5);

#[test]
fn a_silent_or_garbling_resolver_costs_one_bounded_wait() {
    use hickory_proto::rr::rdata::PTR;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    // Never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let t = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(silent_addr, 300),
        d.path(),
        &[(
            "192.0.2.7".parse().unwrap(),
            Deadline::after(Duration::from_secs(30)),
        )],
    );
    let waited = t.elapsed();
    eprintln!(
        "silent resolver, timeout_ms = 300: gave up after {:.0} ms",
        waited.as_secs_f64() * 1e3
    );
    let f = &n.found[0];
    assert_eq!(
        (f.name.value.to_string(), f.name.check, f.note.clone()),
        (
            "192.0.2.7".to_string(),
            Check::Timeout,
            Some(format!("no answer from {silent_addr} in time"))
        )
    );
    // Not a timing assertion: hickory alone would have waited 5 s; under it, timeout_ms held.
    assert!(
        waited < HICKORY_DEFAULT - Duration::from_secs(1),
        "{waited:?}"
    );
    // The resolver's own silence: remembered for failure_cache_secs (300 s).
    let until = cached_until(d.path(), "192.0.2.7").expect("cached");
    let now = idhal_manifest::time::now();
    assert!(until > now && until <= now + 300, "{until} vs {now}");

    // The connect's own deadline cuts the lookup to a quarter of what it has left (2 s: 500 ms,
    // under timeout_ms): a timeout then is not the resolver's fault, and is not cached.
    let t = Instant::now();
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(silent_addr, 1_000),
        d.path(),
        &[(
            "192.0.2.8".parse().unwrap(),
            Deadline::after(Duration::from_secs(2)),
        )],
    );
    eprintln!(
        "silent resolver, timeout_ms = 1000, deadline 2 s: gave up after {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!((n.asked, n.found[0].name.check), (1, Check::Timeout));
    let note = n.found[0].note.as_deref().unwrap();
    assert!(
        note.starts_with(&format!(
            "no answer from {silent_addr} in time; not cached: cut to "
        )) && note.ends_with(" ms (a quarter of a waiting connect's time left)"),
        "{note}"
    );
    assert!(!cache_path(d.path()).exists());

    // Less than 100 ms to spare (a quarter of 200 ms): nothing is asked at all.
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(silent_addr, 1_000),
        d.path(),
        &[(
            "192.0.2.8".parse().unwrap(),
            Deadline::after(Duration::from_millis(200)),
        )],
    );
    assert_eq!((n.asked, n.found[0].name.check), (0, Check::Timeout));
    let note = n.found[0].note.as_deref().unwrap();
    assert!(
        note.starts_with("not asked: ")
            && note.ends_with(
                " ms to spare, under 100 ms (a lookup may take a quarter of a waiting connect's time left)"
            ),
        "{note}"
    );
    assert!(!cache_path(d.path()).exists());

    // Fifty addresses, two at a time, all within one timeout: waiting for a turn counts (in
    // 25 turns of 300 ms they would take 7.5 s).
    let jobs: Vec<(IpAddr, Instant)> = (1..=50)
        .map(|i| {
            (
                IpAddr::from([192, 0, 2, i]),
                Instant::now() + Duration::from_millis(300),
            )
        })
        .collect();
    let t = Instant::now();
    let out = lookup::many(silent_addr, &jobs, 2);
    let took = t.elapsed();
    eprintln!(
        "50 lookups to a silent resolver, 2 at a time, 300 ms each: {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    assert!(out.iter().all(|o| *o == Outcome::Timeout), "{out:?}");
    assert!(took < HICKORY_DEFAULT - Duration::from_secs(1), "{took:?}");

    // The PTR comes back, its A query never does: the name, unconfirmed, remembered only for
    // failure_cache_secs (the next lookup may confirm it).
    let ptr_only = responder(|q| {
        (qtype(q) == RecordType::PTR).then(|| {
            let owner = Name::from("192.0.2.7".parse::<IpAddr>().unwrap());
            reply(
                q,
                vec![Record::from_rdata(
                    owner,
                    60,
                    RData::PTR(PTR(Name::from_ascii("desk7.lab.test.").unwrap())),
                )],
            )
        })
    });
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(ptr_only, 300),
        d.path(),
        &[(
            "192.0.2.7".parse().unwrap(),
            Deadline::after(Duration::from_secs(30)),
        )],
    );
    assert_eq!(
        n.found[0].describe(),
        "client desk7.lab.test (unconfirmed: no answer to its A query in time)"
    );
    let until = cached_until(d.path(), "192.0.2.7").expect("cached");
    let now = idhal_manifest::time::now();
    assert!(until > now && until <= now + 300, "{until} vs {now}");
    // Cut by the connect's deadline instead: not cached at all.
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(ptr_only, 1_000),
        d.path(),
        &[(
            "192.0.2.7".parse().unwrap(),
            Deadline::after(Duration::from_secs(2)),
        )],
    );
    assert_eq!(n.found[0].name.check, Check::Unconfirmed);
    assert!(!cache_path(d.path()).exists(), "{:?}", n.found[0].note);

    // An answer whose PTR name is longer than DNS allows (321 bytes): hickory drops the
    // message as malformed, so the lookup times out and the address is stored.
    let overlong = responder(|q| {
        let mut r = q.to_vec();
        r[2] = 0x81; // QR, RD
        r[3] = 0x80; // RA, NOERROR
        r[6..8].copy_from_slice(&1u16.to_be_bytes()); // ANCOUNT
        r[8..12].fill(0); // no authority, no additional (drops the query's OPT)
        let question_end = 12 + q[12..].iter().position(|&b| b == 0).unwrap() + 1 + 4;
        r.truncate(question_end);
        r.extend_from_slice(&[0xc0, 12, 0, 12, 0, 1, 0, 0, 0, 60]);
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend(std::iter::repeat_n(b'a', 63));
        }
        name.push(0);
        r.extend_from_slice(&(name.len() as u16).to_be_bytes());
        r.extend_from_slice(&name);
        Some(r)
    });
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(overlong, 300),
        d.path(),
        &[(
            "192.0.2.9".parse().unwrap(),
            Deadline::after(Duration::from_secs(30)),
        )],
    );
    assert_eq!(
        n.found[0].describe(),
        format!("client 192.0.2.9 (timeout: no answer from {overlong} in time)")
    );
    // An answer with another id (a blind spoofing attempt) is ignored the same way.
    let wrong_id = responder(|q| {
        let mut r = reply(q, Vec::new());
        r[0] ^= 0xff;
        Some(r)
    });
    let d = tempfile::tempdir().unwrap();
    let n = client_names(
        &config(wrong_id, 300),
        d.path(),
        &[(
            "192.0.2.9".parse().unwrap(),
            Deadline::after(Duration::from_secs(30)),
        )],
    );
    assert_eq!(n.found[0].name.check, Check::Timeout);
    drop(silent);
}

/// A batch waits for its lookups before its one scheduler call: a connect near its deadline
/// must not wait for another client's lookup. The batch's lookups get a quarter of the time
/// its most pressed connect has left; under 100 ms, nobody is asked and each connect has its
/// cached name or its address.
#[test]
fn a_connect_near_its_deadline_does_not_wait_for_the_batchs_lookups() {
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let at = silent.local_addr().unwrap();
    let d = tempfile::tempdir().unwrap();
    let now = idhal_manifest::time::now();
    std::fs::write(
        cache_path(d.path()),
        format!("192.0.2.9 {} confirmed desk9.lab.test\n", now + 60),
    )
    .unwrap();
    let a: IpAddr = "192.0.2.8".parse().unwrap();
    let b: IpAddr = "192.0.2.9".parse().unwrap();
    let t = Instant::now();
    let n = client_names(
        &config(at, 1_000),
        d.path(),
        &[
            (a, Deadline::after(Duration::from_secs(30))),
            (b, Deadline::after(Duration::from_millis(300))),
            (a, Deadline::after(Duration::from_secs(30))),
        ],
    );
    eprintln!(
        "batch with a connect 300 ms from its deadline: names in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_eq!(n.asked, 0);
    assert_eq!(n.found[0].name, ClientName::address(a, Check::Timeout));
    assert_eq!(
        n.found[1].describe(),
        "client desk9.lab.test (confirmed: cached)"
    );
    assert_eq!(n.found[2].name, n.found[0].name);
    let mut buf = [0u8; 512];
    silent.set_nonblocking(true).unwrap();
    assert_eq!(
        silent.recv_from(&mut buf).map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::WouldBlock),
        "a query was sent"
    );
}
