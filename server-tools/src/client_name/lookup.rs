//! The DNS side of a client name: one PTR query, then A/AAAA queries of the names it gave,
//! plain UDP queries with hickory (no recursion of our own: the resolver recurses), each
//! address within its own deadline. CNAMEs are followed only inside an answer (RFC 2317
//! classless reverse zones), a bounded number of times.

use super::{host_name, Check, ClientName, Keep};
use hickory_client::client::{Client, ClientHandle as _};
use hickory_client::ClientErrorKind;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::DnsResponse;
use hickory_proto::ProtoErrorKind;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PTR records of one address looked at; more is refused (the address is stored): one
/// machine has one name, a few at most, and every name costs a forward query.
pub const MAX_PTRS: usize = 8;

/// CNAMEs followed inside one answer; more is a loop or an attack.
pub const MAX_CNAMES: usize = 8;

/// What one address's lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A checked host name, and what its forward records said (`Forward::Holds`: confirmed).
    Named {
        name: String,
        forward: Forward,
    },
    /// No PTR: why (NXDOMAIN, no record).
    NoName(String),
    /// A refused answer: why.
    Invalid(String),
    Timeout,
    /// An error answer, or no way to ask: why.
    Failed(String),
}

/// What a PTR name's forward records (A or AAAA) said about the client's address. The worst of
/// a PTR's names counts for caching: a name that may still confirm is asked again sooner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forward {
    /// They hold it: confirmed.
    Holds,
    /// Answered, and they do not: no record, other addresses, NXDOMAIN, a CNAME loop. Why.
    Denied(String),
    /// An error answer or no way to ask: they may hold it. Why.
    Failed(String),
    /// No answer in time: they may hold it. Why.
    Late(String),
}

impl Forward {
    /// How much the answer could change if asked again (orders the names' results).
    fn doubt(&self) -> u8 {
        match self {
            Forward::Holds | Forward::Denied(_) => 0,
            Forward::Failed(_) => 1,
            Forward::Late(_) => 2,
        }
    }

    fn why(&self) -> Option<&str> {
        match self {
            Forward::Holds => None,
            Forward::Denied(w) | Forward::Failed(w) | Forward::Late(w) => Some(w),
        }
    }
}

impl Outcome {
    /// What the scheduler stores, the note for the log, and how long the cache keeps it.
    /// `cut`: the time the lookup had when it was less than `timeout_ms` (the connect's own
    /// deadline was nearer): a late answer then says nothing about the resolver and is not
    /// cached.
    pub fn into_name(
        self,
        ip: IpAddr,
        server: SocketAddr,
        cut: Option<Duration>,
    ) -> (ClientName, Option<String>, Keep) {
        let late = |note: String| match cut {
            Some(had) => (
                Some(format!(
                    "{note}; not cached: cut to {} ms (a quarter of a waiting connect's time left)",
                    had.as_millis()
                )),
                Keep::Not,
            ),
            None => (Some(note), Keep::Failure),
        };
        match self {
            Outcome::Named { name, forward } => {
                let check = if forward == Forward::Holds {
                    Check::Confirmed
                } else {
                    Check::Unconfirmed
                };
                let named = ClientName::named(&name, check);
                let note = forward.why().map(str::to_owned);
                match forward {
                    Forward::Holds | Forward::Denied(_) => (named, note, Keep::Name),
                    Forward::Failed(_) => (named, note, Keep::Failure),
                    Forward::Late(why) => {
                        let (note, keep) = late(why);
                        (named, note, keep)
                    }
                }
            }
            Outcome::NoName(why) => (
                ClientName::address(ip, Check::None),
                Some(why),
                Keep::Failure,
            ),
            Outcome::Invalid(why) => (
                ClientName::address(ip, Check::Invalid),
                Some(why),
                Keep::Failure,
            ),
            Outcome::Timeout => {
                let (note, keep) = late(format!("no answer from {server} in time"));
                (ClientName::address(ip, Check::Timeout), note, keep)
            }
            Outcome::Failed(why) => (
                ClientName::address(ip, Check::Failed),
                Some(format!("{server}: {why}")),
                Keep::Failure,
            ),
        }
    }
}

/// Looks every `(address, until)` up at `server`, at most `parallel` at once, one outcome per
/// job in order. Waiting for a turn counts against a job's own deadline.
pub fn many(server: SocketAddr, jobs: &[(IpAddr, Instant)], parallel: usize) -> Vec<Outcome> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            let why = format!("cannot start the DNS client: {e}");
            return jobs.iter().map(|_| Outcome::Failed(why.clone())).collect();
        }
    };
    runtime.block_on(async {
        let turns = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut set = tokio::task::JoinSet::new();
        for (k, &(ip, until)) in jobs.iter().enumerate() {
            let turns = turns.clone();
            set.spawn(async move {
                let wait = tokio::time::timeout_at(until.into(), turns.acquire_owned()).await;
                let outcome = match wait {
                    Ok(Ok(_turn)) => one(server, ip, until).await,
                    Ok(Err(_)) => Outcome::Failed("the lookup was cancelled".into()),
                    Err(_) => Outcome::Timeout,
                };
                (k, outcome)
            });
        }
        let mut out: Vec<Option<Outcome>> = jobs.iter().map(|_| None).collect();
        while let Some(done) = set.join_next().await {
            if let Ok((k, o)) = done {
                out[k] = Some(o);
            }
        }
        out.into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::Failed("the lookup task failed".into())))
            .collect()
    })
}

/// An IPv4 client seen on a dual-stack socket (`::ffff:192.0.2.7`) has an IPv4 PTR and A.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One address: its PTR names, checked, then each confirmed forward, all before `until`.
pub async fn one(server: SocketAddr, ip: IpAddr, until: Instant) -> Outcome {
    let ip = unmapped(ip);
    let mut arpa = Name::from(ip);
    arpa.set_fqdn(true);
    let answer = match ask(server, arpa.clone(), RecordType::PTR, until).await {
        Ok(r) => r,
        Err(Asked::Timeout) => return Outcome::Timeout,
        Err(Asked::Failed(why)) => return Outcome::Failed(why),
    };
    match answer.response_code() {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Outcome::NoName("NXDOMAIN".into()),
        rcode => return Outcome::Failed(format!("answered {rcode}")),
    }
    if answer.truncated() {
        // The rest would come over TCP; a machine's PTRs fit in one UDP message.
        return Outcome::Invalid(
            "the answer was truncated (more records than one UDP message holds)".into(),
        );
    }
    let ptrs = match chase(answer.answers(), &arpa, RecordType::PTR) {
        Ok(found) => found,
        Err(why) => return Outcome::Invalid(why),
    };
    let targets: Vec<&Name> = ptrs
        .iter()
        .filter_map(|d| match d {
            RData::PTR(p) => Some(&p.0),
            _ => None,
        })
        .collect();
    if targets.is_empty() {
        return Outcome::NoName("no PTR record".into());
    }
    if targets.len() > MAX_PTRS {
        return Outcome::Invalid(format!(
            "{} PTR records (at most {MAX_PTRS} are looked at)",
            targets.len()
        ));
    }
    let mut names = Vec::with_capacity(targets.len());
    for t in targets {
        match host_name(t.iter()) {
            Ok(n) => names.push(n),
            Err(why) => return Outcome::Invalid(format!("PTR not a host name: {why}")),
        }
    }
    // Sorted: a resolver may rotate the records, and the stored name must not flap with it.
    names.sort();
    names.dedup();
    let mut set = tokio::task::JoinSet::new();
    for (k, n) in names.iter().enumerate() {
        let n = n.clone();
        set.spawn(async move { (k, confirm(server, &n, ip, until).await) });
    }
    let mut checked: Vec<Forward> = names
        .iter()
        .map(|_| Forward::Failed("its forward lookup did not finish".to_owned()))
        .collect();
    while let Some(done) = set.join_next().await {
        if let Ok((k, r)) = done {
            checked[k] = r;
        }
    }
    match checked.iter().position(|f| *f == Forward::Holds) {
        Some(k) => Outcome::Named {
            name: names[k].clone(),
            forward: Forward::Holds,
        },
        // The first name, with the reason its own query gave, and the doubt of the most
        // doubtful name (a late one may confirm next time).
        None => {
            let doubt = checked.iter().map(Forward::doubt).max().unwrap_or(0);
            let why = checked[0].why().unwrap_or_default().to_owned();
            let forward = match doubt {
                0 => Forward::Denied(why),
                1 => Forward::Failed(why),
                _ => Forward::Late(why),
            };
            Outcome::Named {
                name: names[0].clone(),
                forward,
            }
        }
    }
}

/// What `name`'s A (IPv4) or AAAA (IPv6) records say about `ip`.
async fn confirm(server: SocketAddr, name: &str, ip: IpAddr, until: Instant) -> Forward {
    let (rtype, what) = match ip {
        IpAddr::V4(_) => (RecordType::A, "A"),
        IpAddr::V6(_) => (RecordType::AAAA, "AAAA"),
    };
    let mut owner = match Name::from_ascii(name) {
        Ok(n) => n,
        Err(e) => return Forward::Failed(clean(&format!("{name}: {e}"))),
    };
    owner.set_fqdn(true);
    let answer = match ask(server, owner.clone(), rtype, until).await {
        Ok(a) => a,
        Err(Asked::Timeout) => {
            return Forward::Late(format!("no answer to its {what} query in time"))
        }
        Err(Asked::Failed(why)) => return Forward::Failed(format!("its {what} query: {why}")),
    };
    match answer.response_code() {
        ResponseCode::NoError => {}
        // The name does not exist: an answer, as final as an A record of another address.
        ResponseCode::NXDomain => {
            return Forward::Denied(format!(
                "its {what} query: answered {}",
                ResponseCode::NXDomain
            ))
        }
        rcode => return Forward::Failed(format!("its {what} query: answered {rcode}")),
    }
    let found = match chase(answer.answers(), &owner, rtype) {
        Ok(f) => f,
        Err(e) => return Forward::Denied(format!("its {what} query: {e}")),
    };
    let holds = found.iter().any(|d| match (d, ip) {
        (RData::A(a), IpAddr::V4(v4)) => a.0 == v4,
        (RData::AAAA(a), IpAddr::V6(v6)) => a.0 == v6,
        _ => false,
    });
    match (holds, found.len()) {
        (true, _) => Forward::Holds,
        (false, 0) => Forward::Denied(format!("it has no {what} record")),
        (false, n) => Forward::Denied(format!("its {n} {what} record(s) do not hold {ip}")),
    }
}

/// The `want` records of `start` in an answer, following CNAMEs from it (at most
/// `MAX_CNAMES`; an answer that goes on is refused).
fn chase<'a>(
    answers: &'a [Record],
    start: &Name,
    want: RecordType,
) -> Result<Vec<&'a RData>, String> {
    let mut at = start.clone();
    for _ in 0..=MAX_CNAMES {
        let here: Vec<&Record> = answers
            .iter()
            .filter(|r| r.dns_class() == DNSClass::IN && r.name() == &at)
            .collect();
        let found: Vec<&RData> = here
            .iter()
            .filter(|r| r.record_type() == want)
            .map(|r| r.data())
            .collect();
        if !found.is_empty() {
            return Ok(found);
        }
        match here.iter().find_map(|r| match r.data() {
            RData::CNAME(c) => Some(c.0.clone()),
            _ => None,
        }) {
            Some(next) => at = next,
            None => return Ok(Vec::new()),
        }
    }
    Err(format!("more than {MAX_CNAMES} CNAMEs in a row (a loop?)"))
}

enum Asked {
    Timeout,
    Failed(String),
}

/// One query to `server` over UDP (from a random port; hickory checks the answer's source,
/// id and question), answered before `until` or `Timeout`.
async fn ask(
    server: SocketAddr,
    name: Name,
    rtype: RecordType,
    until: Instant,
) -> Result<DnsResponse, Asked> {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(Asked::Timeout);
    }
    let stream = UdpClientStream::builder(server, TokioRuntimeProvider::default())
        .with_timeout(Some(left))
        .build();
    let exchange = async {
        let (mut client, background) = Client::connect(stream).await?;
        let background = tokio::spawn(background);
        let answer = client.query(name, DNSClass::IN, rtype).await;
        background.abort();
        answer
    };
    match tokio::time::timeout(left, exchange).await {
        Err(_) => Err(Asked::Timeout),
        Ok(Err(e)) if is_timeout(e.kind()) => Err(Asked::Timeout),
        Ok(Err(e)) => Err(Asked::Failed(clean(&e.to_string()))),
        Ok(Ok(answer)) => Ok(answer),
    }
}

fn is_timeout(kind: &ClientErrorKind) -> bool {
    match kind {
        ClientErrorKind::Timeout => true,
        ClientErrorKind::Proto(p) => matches!(p.kind(), ProtoErrorKind::Timeout),
        _ => false,
    }
}

/// Longest error text kept for a log line, in characters.
const MAX_TEXT: usize = 160;

/// An error text for one log line: every character that is not plainly printable escaped as
/// Rust's `escape_debug` does (`\n`, `\u{1b}`, and the invisible format characters such as
/// the bidi override U+202E that could make a log line read as something else), at most
/// `MAX_TEXT` characters, an escape never cut in half. Quotes stay as they are (they are
/// printable, and error texts quote names).
fn clean(s: &str) -> String {
    let pieces: Vec<String> = s
        .chars()
        .map(|c| match c {
            '"' | '\'' => c.to_string(),
            c => c.escape_debug().to_string(),
        })
        .collect();
    let length = |p: &[String]| p.iter().map(|p| p.chars().count()).sum::<usize>();
    if length(&pieces) <= MAX_TEXT {
        return pieces.concat();
    }
    let mut out = String::new();
    let mut used = 0;
    for p in &pieces {
        let n = p.chars().count();
        if used + n > MAX_TEXT - 1 {
            break;
        }
        out.push_str(p);
        used += n;
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME, PTR};

    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn rec(owner: &str, data: RData) -> Record {
        Record::from_rdata(n(owner), 60, data)
    }

    #[test]
    fn cnames_are_followed_inside_an_answer_a_bounded_number_of_times() {
        let start = n("7.2.0.192.in-addr.arpa.");
        // RFC 2317: the PTR lives under a CNAME.
        let answers = [
            rec(
                "7.2.0.192.in-addr.arpa.",
                RData::CNAME(CNAME(n("7.0-25.2.0.192.in-addr.arpa."))),
            ),
            rec(
                "7.0-25.2.0.192.in-addr.arpa.",
                RData::PTR(PTR(n("desk.example."))),
            ),
        ];
        let found = chase(&answers, &start, RecordType::PTR).unwrap();
        assert_eq!(found, [&RData::PTR(PTR(n("desk.example.")))]);
        // Records of other names are not the answer.
        let stray = [rec(
            "8.2.0.192.in-addr.arpa.",
            RData::PTR(PTR(n("other.example."))),
        )];
        assert!(chase(&stray, &start, RecordType::PTR).unwrap().is_empty());
        // A loop.
        let looping = [
            rec(
                "7.2.0.192.in-addr.arpa.",
                RData::CNAME(CNAME(n("x.2.0.192.in-addr.arpa."))),
            ),
            rec(
                "x.2.0.192.in-addr.arpa.",
                RData::CNAME(CNAME(n("7.2.0.192.in-addr.arpa."))),
            ),
        ];
        assert_eq!(
            chase(&looping, &start, RecordType::PTR),
            Err("more than 8 CNAMEs in a row (a loop?)".into())
        );
        // Exactly MAX_CNAMES hops are followed.
        let mut chain: Vec<Record> = (0..MAX_CNAMES)
            .map(|i| {
                let from = if i == 0 {
                    "7.2.0.192.in-addr.arpa.".to_string()
                } else {
                    format!("c{i}.example.")
                };
                rec(
                    &from,
                    RData::CNAME(CNAME(n(&format!("c{}.example.", i + 1)))),
                )
            })
            .collect();
        chain.push(rec(
            &format!("c{MAX_CNAMES}.example."),
            RData::A(A("192.0.2.7".parse().unwrap())),
        ));
        assert_eq!(chase(&chain, &start, RecordType::A).unwrap().len(), 1);
    }

    #[test]
    fn mapped_addresses_are_looked_up_as_ipv4() {
        assert_eq!(
            unmapped("::ffff:192.0.2.7".parse().unwrap()),
            "192.0.2.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            unmapped("2001:db8::7".parse().unwrap()),
            "2001:db8::7".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn error_texts_fit_one_line() {
        assert_eq!(clean("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        // Bidi overrides and other invisible format characters cannot reorder a log line.
        assert_eq!(
            clean("name \"x\u{202e}gpj.exe\u{2066}\u{200b}\""),
            "name \"x\\u{202e}gpj.exe\\u{2066}\\u{200b}\""
        );
        assert_eq!(clean("tab\there\\"), "tab\\there\\\\");
        assert_eq!(clean(&"x".repeat(500)), format!("{}…", "x".repeat(159)));
        // An escape is never cut in half.
        let long = format!("{}\u{202e}", "x".repeat(155));
        assert_eq!(clean(&long), format!("{}…", "x".repeat(155)));
    }
}
