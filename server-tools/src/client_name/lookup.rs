//! The DNS side of a client name: one PTR query, then A/AAAA queries of the names it gave,
//! plain UDP queries with hickory (no recursion of our own: the resolver recurses), each
//! address within its own deadline. CNAMEs are followed only inside an answer (RFC 2317
//! classless reverse zones), a bounded number of times.

use super::{host_name, Check, ClientName};
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
use std::time::Instant;

/// PTR records of one address looked at; more is refused (the address is stored): one
/// machine has one name, a few at most, and every name costs a forward query.
pub const MAX_PTRS: usize = 8;

/// CNAMEs followed inside one answer; more is a loop or an attack.
pub const MAX_CNAMES: usize = 8;

/// What one address's lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A checked host name; `confirmed` when its A/AAAA hold the address. `note`: why not.
    Named {
        name: String,
        confirmed: bool,
        note: Option<String>,
    },
    /// No PTR: why (NXDOMAIN, no record).
    NoName(String),
    /// A refused answer: why.
    Invalid(String),
    Timeout,
    /// An error answer, or no way to ask: why.
    Failed(String),
}

impl Outcome {
    /// What the scheduler stores, and the note for the log.
    pub fn into_name(self, ip: IpAddr, server: SocketAddr) -> (ClientName, Option<String>) {
        match self {
            Outcome::Named {
                name,
                confirmed,
                note,
            } => {
                let check = if confirmed {
                    Check::Confirmed
                } else {
                    Check::Unconfirmed
                };
                (ClientName::named(&name, check), note)
            }
            Outcome::NoName(why) => (ClientName::address(ip, Check::None), Some(why)),
            Outcome::Invalid(why) => (ClientName::address(ip, Check::Invalid), Some(why)),
            Outcome::Timeout => (
                ClientName::address(ip, Check::Timeout),
                Some(format!("no answer from {server} in time")),
            ),
            Outcome::Failed(why) => (
                ClientName::address(ip, Check::Failed),
                Some(format!("{server}: {why}")),
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
    let mut checked: Vec<Result<(), String>> = names
        .iter()
        .map(|_| Err("its forward lookup did not finish".to_owned()))
        .collect();
    while let Some(done) = set.join_next().await {
        if let Ok((k, r)) = done {
            checked[k] = r;
        }
    }
    match checked.iter().position(Result::is_ok) {
        Some(k) => Outcome::Named {
            name: names[k].clone(),
            confirmed: true,
            note: None,
        },
        None => Outcome::Named {
            name: names[0].clone(),
            confirmed: false,
            note: checked.swap_remove(0).err(),
        },
    }
}

/// Whether `name`'s A (IPv4) or AAAA (IPv6) records hold `ip`; `Err` says why not.
async fn confirm(server: SocketAddr, name: &str, ip: IpAddr, until: Instant) -> Result<(), String> {
    let (rtype, what) = match ip {
        IpAddr::V4(_) => (RecordType::A, "A"),
        IpAddr::V6(_) => (RecordType::AAAA, "AAAA"),
    };
    let mut owner = Name::from_ascii(name).map_err(|e| format!("{name}: {e}"))?;
    owner.set_fqdn(true);
    let answer = match ask(server, owner.clone(), rtype, until).await {
        Ok(a) => a,
        Err(Asked::Timeout) => return Err(format!("no answer to its {what} query in time")),
        Err(Asked::Failed(why)) => return Err(format!("its {what} query: {why}")),
    };
    match answer.response_code() {
        ResponseCode::NoError => {}
        rcode => return Err(format!("its {what} query: answered {rcode}")),
    }
    let found =
        chase(answer.answers(), &owner, rtype).map_err(|e| format!("its {what} query: {e}"))?;
    let holds = found.iter().any(|d| match (d, ip) {
        (RData::A(a), IpAddr::V4(v4)) => a.0 == v4,
        (RData::AAAA(a), IpAddr::V6(v6)) => a.0 == v6,
        _ => false,
    });
    match (holds, found.len()) {
        (true, _) => Ok(()),
        (false, 0) => Err(format!("it has no {what} record")),
        (false, n) => Err(format!("its {n} {what} record(s) do not hold {ip}")),
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

/// An error text for one log line: control characters replaced, at most 160 characters.
fn clean(s: &str) -> String {
    s.chars()
        .take(160)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
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
        assert_eq!(clean("a\nb\u{1b}[31m"), "a?b?[31m");
        assert_eq!(clean(&"x".repeat(500)).len(), 160);
    }
}
