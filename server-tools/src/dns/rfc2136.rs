//! Live DNS: RFC 2136 updates signed with TSIG (hmac-sha256/384/512), sent with hickory-proto
//! to the zone's primary. One update message per zone replaces the node's A (forward) or PTR
//! (reverse) RRset atomically; removal deletes both RRsets.

use super::NodeDns;
use crate::config::ServerConfig;
use crate::names::{Domain, HostName, NameError};
use crate::process::Deadline;
use hickory_proto::dnssec::rdata::tsig::TsigAlgorithm;
use hickory_proto::dnssec::tsig::TSigner;
use hickory_proto::op::{update_message, MessageFinalizer, ResponseCode, UpdateMessage};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::runtime::TokioRuntimeProvider;
use hickory_proto::udp::UdpClientStream;
use hickory_proto::xfer::{DnsHandle, FirstAnswer};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DnsError {
    #[error("TSIG key file {path}: {msg}")]
    KeyFile { path: PathBuf, msg: String },
    #[error("DNS update to {server} for {name}: TSIG key {key:?} rejected (wrong secret, name or algorithm; the server's key must match {path})")]
    TsigRejected {
        server: SocketAddr,
        name: String,
        key: String,
        path: PathBuf,
    },
    #[error("DNS update to {server} for {name} in zone {zone}: refused with {rcode} (is the TSIG key allowed to update this zone, and is the server its primary?)")]
    Refused {
        server: SocketAddr,
        name: String,
        zone: String,
        rcode: String,
    },
    #[error("DNS update to {server} for {name}: no answer within {after:?}")]
    Timeout {
        server: SocketAddr,
        name: String,
        after: Duration,
    },
    #[error("DNS update to {server} for {name}: {msg}")]
    Protocol {
        server: SocketAddr,
        name: String,
        msg: String,
    },
    #[error("DNS: {name} is not inside zone {zone}")]
    OutOfZone { name: String, zone: String },
    #[error("[dns] tsig_key_file is not set")]
    NoKeyFile,
    #[error(transparent)]
    Zone(#[from] NameError),
}

/// A TSIG key as `tsig-keygen` / `ddns-confgen` write it:
/// `key "NAME" { algorithm hmac-sha256; secret "BASE64"; };`
#[derive(Clone)]
pub struct TsigKey {
    pub name: String,
    pub algorithm: TsigAlgorithm,
    secret: Vec<u8>,
    pub path: PathBuf,
}

impl std::fmt::Debug for TsigKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("TsigKey")
            .field("name", &self.name)
            .field("algorithm", &self.algorithm)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TsigKey {
    pub fn load(path: &Path) -> Result<Self, DnsError> {
        let text = std::fs::read_to_string(path).map_err(|e| DnsError::KeyFile {
            path: path.to_owned(),
            msg: e.to_string(),
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, DnsError> {
        let err = |msg: &str| DnsError::KeyFile {
            path: path.to_owned(),
            msg: msg.to_owned(),
        };
        // Tokens: words, quoted strings, and the punctuation `{ } ;`. Comments are dropped.
        let mut tokens = Vec::new();
        for line in text.lines() {
            let line = line.split(['#']).next().unwrap_or("");
            let line = line.split("//").next().unwrap_or("");
            let mut rest = line;
            while let Some(c) = rest.chars().next() {
                if c.is_whitespace() {
                    rest = &rest[c.len_utf8()..];
                } else if c == '"' {
                    let end = rest[1..]
                        .find('"')
                        .ok_or_else(|| err("unterminated quote"))?;
                    tokens.push(rest[1..=end].to_owned());
                    rest = &rest[end + 2..];
                } else if matches!(c, '{' | '}' | ';') {
                    tokens.push(c.to_string());
                    rest = &rest[1..];
                } else {
                    let end = rest
                        .find(|c: char| c.is_whitespace() || matches!(c, '{' | '}' | ';' | '"'))
                        .unwrap_or(rest.len());
                    tokens.push(rest[..end].to_owned());
                    rest = &rest[end..];
                }
            }
        }
        let expected = "expected `key \"NAME\" { algorithm hmac-sha256; secret \"BASE64\"; };`";
        let mut it = tokens.iter().map(String::as_str);
        if it.next() != Some("key") {
            return Err(err(expected));
        }
        let name = it.next().ok_or_else(|| err(expected))?.to_owned();
        if it.next() != Some("{") {
            return Err(err(expected));
        }
        let (mut algorithm, mut secret) = (None, None);
        loop {
            match it.next() {
                Some("algorithm") => algorithm = it.next(),
                Some("secret") => secret = it.next(),
                Some("}") => break,
                _ => return Err(err(expected)),
            }
            if it.next() != Some(";") {
                return Err(err(expected));
            }
        }
        let algorithm = match algorithm.ok_or_else(|| err("no algorithm"))? {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            _ => {
                return Err(err(
                    "algorithm must be hmac-sha256, hmac-sha384 or hmac-sha512",
                ))
            }
        };
        let secret =
            ct_codecs::Base64::decode_to_vec(secret.ok_or_else(|| err("no secret"))?, None)
                .map_err(|_| err("secret is not base64"))?;
        if secret.len() < 16 {
            return Err(err("secret is shorter than 16 bytes"));
        }
        Name::from_ascii(&name).map_err(|_| err("key name is not a DNS name"))?;
        Ok(Self {
            name,
            algorithm,
            secret,
            path: path.to_owned(),
        })
    }
}

use ct_codecs::Decoder as _;

/// Sends signed updates to one server.
#[derive(Debug, Clone)]
pub struct Updater {
    pub server: SocketAddr,
    pub key: TsigKey,
    pub timeout: Duration,
}

/// [dns] update = "rfc2136": each event replaces or deletes the node's A and PTR with signed
/// updates. The key file is read at each event, so a rotated key needs no restart.
pub struct Rfc2136<'a> {
    pub cfg: &'a ServerConfig,
}

impl Rfc2136<'_> {
    /// The updater and both zones, checked in this order: key file set, key readable, zones.
    fn updater(&self, deadline: Deadline) -> Result<(Updater, Domain, Domain), DnsError> {
        let dns = &self.cfg.dns;
        let path = dns.tsig_key_file.as_deref().ok_or(DnsError::NoKeyFile)?;
        let updater = Updater {
            server: dns.server,
            key: TsigKey::load(path)?,
            timeout: deadline.cap(self.cfg.limits.dns_timeout()),
        };
        Ok((updater, self.cfg.forward_zone(), self.cfg.reverse_zone()?))
    }
}

impl NodeDns for Rfc2136<'_> {
    fn upsert_many(
        &self,
        nodes: &[(&HostName, Ipv4Addr)],
        deadline: Deadline,
    ) -> Vec<Result<bool, DnsError>> {
        match self.updater(deadline) {
            Ok((u, fwd, rev)) => u
                .upsert_many(nodes, &fwd, &rev, self.cfg.dns.ttl)
                .into_iter()
                .map(|r| r.map(|()| true))
                .collect(),
            Err(e) => nodes.iter().map(|_| Err(e.clone())).collect(),
        }
    }
    fn upsert(&self, host: &HostName, ip: Ipv4Addr, deadline: Deadline) -> Result<bool, DnsError> {
        let (u, fwd, rev) = self.updater(deadline)?;
        u.upsert(host, ip, &fwd, &rev, self.cfg.dns.ttl)?;
        Ok(true)
    }
    fn remove(&self, host: &HostName, ip: Ipv4Addr, deadline: Deadline) -> Result<bool, DnsError> {
        let (u, fwd, rev) = self.updater(deadline)?;
        u.remove(host, ip, &fwd, &rev)?;
        Ok(true)
    }
    fn is_live(&self) -> bool {
        true
    }
}

/// What one update does to one zone.
#[derive(Clone)]
enum Change {
    Replace(RData),
    Delete,
}

/// Hosts per batched update message: ~80 bytes of changes each, so 12 stay well inside one
/// unfragmented UDP datagram (1,232 bytes, the DNS flag day's size) with the TSIG record.
const PER_MESSAGE: usize = 12;

/// How errors name the changes of one message: the owner, or the first and how many more.
fn describe(changes: &[(String, RecordType, Change)]) -> String {
    match changes {
        [] => String::new(),
        [one] => one.0.clone(),
        [first, rest @ ..] => format!("{} and {} more", first.0, rest.len()),
    }
}

/// `38.7.134.10.in-addr.arpa` for 10.134.7.38.
pub fn reverse_name(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{}.{}.{}.{}.in-addr.arpa", o[3], o[2], o[1], o[0])
}

impl Updater {
    /// A and PTR for `host` → `ip`, replacing whatever was there.
    pub fn upsert(
        &self,
        host: &HostName,
        ip: Ipv4Addr,
        forward: &Domain,
        reverse: &Domain,
        ttl: u32,
    ) -> Result<(), DnsError> {
        let fqdn = fqdn(&host.to_string())?;
        self.send_all(
            &[
                (
                    host.to_string(),
                    forward,
                    RecordType::A,
                    Change::Replace(RData::A(A(ip))),
                ),
                (
                    reverse_name(ip),
                    reverse,
                    RecordType::PTR,
                    Change::Replace(RData::PTR(PTR(fqdn))),
                ),
            ],
            ttl,
        )
    }

    /// Deletes the A and PTR RRsets of `host` / `ip`.
    pub fn remove(
        &self,
        host: &HostName,
        ip: Ipv4Addr,
        forward: &Domain,
        reverse: &Domain,
    ) -> Result<(), DnsError> {
        self.send_all(
            &[
                (host.to_string(), forward, RecordType::A, Change::Delete),
                (reverse_name(ip), reverse, RecordType::PTR, Change::Delete),
            ],
            0,
        )
    }

    /// A and PTR for several hosts, replacing whatever was there, one result per host in
    /// order: the forward changes go together in messages of up to `PER_MESSAGE` hosts, and so
    /// do the reverse ones (each message one transaction on the server), instead of two
    /// messages per host. A message that fails fails each of its hosts.
    pub fn upsert_many(
        &self,
        nodes: &[(&HostName, Ipv4Addr)],
        forward: &Domain,
        reverse: &Domain,
        ttl: u32,
    ) -> Vec<Result<(), DnsError>> {
        let mut results: Vec<Result<(), DnsError>> = nodes.iter().map(|_| Ok(())).collect();
        // A host that cannot go in a message fails alone, before any message is made.
        let inside = |name: &str, zone: &Domain| -> Result<Name, DnsError> {
            let owner = fqdn(name)?;
            if fqdn(zone.as_str())?.zone_of(&owner) {
                Ok(owner)
            } else {
                Err(DnsError::OutOfZone {
                    name: name.to_owned(),
                    zone: zone.to_string(),
                })
            }
        };
        let mut entries = Vec::with_capacity(nodes.len());
        for (i, (host, ip)) in nodes.iter().enumerate() {
            let checked = inside(&host.to_string(), forward)
                .and_then(|name| inside(&reverse_name(*ip), reverse).map(|_| name));
            match checked {
                Ok(name) => entries.push((i, host.to_string(), *ip, name)),
                Err(e) => results[i] = Err(e),
            }
        }
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(r) => r,
            Err(e) => {
                let e = self.protocol("a batch of hosts", e.to_string());
                return results.into_iter().map(|_| Err(e.clone())).collect();
            }
        };
        runtime.block_on(async {
            for chunk in entries.chunks(PER_MESSAGE) {
                let a: Vec<(String, RecordType, Change)> = chunk
                    .iter()
                    .map(|(_, h, ip, _)| {
                        (h.clone(), RecordType::A, Change::Replace(RData::A(A(*ip))))
                    })
                    .collect();
                let ptr: Vec<(String, RecordType, Change)> = chunk
                    .iter()
                    .map(|(_, _, ip, name)| {
                        (
                            reverse_name(*ip),
                            RecordType::PTR,
                            Change::Replace(RData::PTR(PTR(name.clone()))),
                        )
                    })
                    .collect();
                for (zone, changes) in [(forward, a), (reverse, ptr)] {
                    if let Err(e) = self.timed(zone, &changes, ttl).await {
                        for (i, ..) in chunk {
                            if results[*i].is_ok() {
                                results[*i] = Err(e.clone());
                            }
                        }
                    }
                }
            }
        });
        results
    }

    fn send_all(
        &self,
        changes: &[(String, &Domain, RecordType, Change)],
        ttl: u32,
    ) -> Result<(), DnsError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.protocol(&changes[0].0, e.to_string()))?;
        runtime.block_on(async {
            for (name, zone, rtype, change) in changes {
                let one = [(name.clone(), *rtype, change.clone())];
                self.timed(zone, &one, ttl).await?;
            }
            Ok(())
        })
    }

    /// One update message for `changes` (all in `zone`), within this updater's timeout.
    async fn timed(
        &self,
        zone: &Domain,
        changes: &[(String, RecordType, Change)],
        ttl: u32,
    ) -> Result<(), DnsError> {
        let name = describe(changes);
        match tokio::time::timeout(self.timeout, self.send_one(&name, zone, changes, ttl)).await {
            Err(_) => Err(DnsError::Timeout {
                server: self.server,
                name,
                after: self.timeout,
            }),
            Ok(r) => r,
        }
    }

    fn protocol(&self, name: &str, msg: String) -> DnsError {
        DnsError::Protocol {
            server: self.server,
            name: name.to_owned(),
            msg,
        }
    }

    /// One message: for each change, delete the RRset, then (for a replace) add the new
    /// record. One transaction on the server. `name` names the changes in errors.
    async fn send_one(
        &self,
        name: &str,
        zone: &Domain,
        changes: &[(String, RecordType, Change)],
        ttl: u32,
    ) -> Result<(), DnsError> {
        let origin = fqdn(zone.as_str())?;
        let mut msg: Option<hickory_proto::op::Message> = None;
        for (owner_name, rtype, change) in changes {
            let owner = fqdn(owner_name)?;
            if !origin.zone_of(&owner) {
                return Err(DnsError::OutOfZone {
                    name: owner_name.clone(),
                    zone: zone.to_string(),
                });
            }
            let delete = Record::update0(owner.clone(), 0, *rtype);
            let m = match msg.as_mut() {
                None => msg.insert(update_message::delete_rrset(delete, origin.clone(), false)),
                Some(m) => {
                    // As `delete_rrset` makes it: class ANY, TTL 0, no data.
                    let mut delete = delete;
                    delete.set_dns_class(DNSClass::ANY);
                    delete.set_ttl(0);
                    m.add_update(delete);
                    m
                }
            };
            if let Change::Replace(rdata) = change {
                let mut add = Record::from_rdata(owner, ttl, rdata.clone());
                add.set_dns_class(DNSClass::IN);
                m.add_update(add);
            }
        }
        let Some(msg) = msg else { return Ok(()) };
        let signer = TSigner::new(
            self.key.secret.clone(),
            self.key.algorithm.clone(),
            Name::from_ascii(&self.key.name).map_err(|e| self.protocol(name, e.to_string()))?,
            300,
        )
        .map_err(|e| self.protocol(name, e.to_string()))?;
        let signer: Arc<dyn MessageFinalizer> = Arc::new(signer);
        let stream = UdpClientStream::builder(self.server, TokioRuntimeProvider::default())
            .with_timeout(Some(self.timeout))
            .with_signer(Some(signer))
            .build();
        let (client, background) = hickory_client::client::Client::connect(stream)
            .await
            .map_err(|e| self.protocol(name, e.to_string()))?;
        let bg = tokio::spawn(background);
        let answer = client.send(msg).first_answer().await;
        bg.abort();
        let response = match answer {
            Ok(r) => r,
            Err(e) => {
                let text = e.to_string();
                // hickory reports the server's unsigned BADSIG/BADKEY answer as a complaint
                // about "truncated HMACs": that is a rejected key, say so.
                if text.contains("truncated HMAC") || text.contains("TSIG") || text.contains("tsig")
                {
                    return Err(DnsError::TsigRejected {
                        server: self.server,
                        name: name.to_owned(),
                        key: self.key.name.clone(),
                        path: self.key.path.clone(),
                    });
                }
                return Err(self.protocol(name, text));
            }
        };
        match response.response_code() {
            ResponseCode::NoError => Ok(()),
            // NOTAUTH on a verified answer means "not authoritative for this zone"; a failed
            // TSIG check never gets here (its answer is unsigned and fails above).
            ResponseCode::BADSIG | ResponseCode::BADKEY | ResponseCode::BADTIME => {
                Err(DnsError::TsigRejected {
                    server: self.server,
                    name: name.to_owned(),
                    key: self.key.name.clone(),
                    path: self.key.path.clone(),
                })
            }
            rcode => Err(DnsError::Refused {
                server: self.server,
                name: name.to_owned(),
                zone: zone.to_string(),
                rcode: rcode.to_string(),
            }),
        }
    }
}

fn fqdn(s: &str) -> Result<Name, DnsError> {
    let mut n = Name::from_ascii(s).map_err(|_| DnsError::OutOfZone {
        name: s.to_owned(),
        zone: "(not a DNS name)".into(),
    })?;
    n.set_fqdn(true);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file() {
        let k = TsigKey::parse(
            "# made by tsig-keygen\nkey \"idhal-update\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0\";\n};\n",
            Path::new("k"),
        )
        .unwrap();
        assert_eq!(k.name, "idhal-update");
        assert!(!format!("{k:?}").contains("c2Vj"));
        let refused = |text: &str| match TsigKey::parse(text, Path::new("k")) {
            Err(DnsError::KeyFile { path, msg }) if path == Path::new("k") => msg,
            other => panic!("{text:?}: {other:?}"),
        };
        assert_eq!(
            refused("key x { algorithm hmac-md5; secret \"c2VjcmV0c2VjcmV0c2VjcmV0\"; };"),
            "algorithm must be hmac-sha256, hmac-sha384 or hmac-sha512"
        );
        assert_eq!(
            refused("nonsense"),
            "expected `key \"NAME\" { algorithm hmac-sha256; secret \"BASE64\"; };`"
        );
        assert_eq!(
            reverse_name("10.134.7.38".parse().unwrap()),
            "38.7.134.10.in-addr.arpa"
        );
    }

    /// Update messages Knot has logged ("DDNS, processing N updates" counts messages).
    fn ddns_updates(log: &Path) -> usize {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        text.lines()
            .filter_map(|l| l.split("DDNS, processing ").nth(1))
            .filter_map(|r| r.split_whitespace().next()?.parse::<usize>().ok())
            .sum()
    }

    /// The worker's batches: 30 hosts' A and PTR in a few messages, against a real Knot; a
    /// host outside the zones fails alone; a wrong key fails every host with its own error.
    #[test]
    fn a_batch_of_hosts_gets_its_records_in_a_few_messages() {
        use idhal_test_support::knot::{empty_zone, Knot, TSIG_SECRET};
        assert!(Knot::available(), "Knot (knotd, kdig) is needed");
        let knot = Knot::start(&[
            ("batch.test", empty_zone("batch.test")),
            ("134.10.in-addr.arpa", empty_zone("134.10.in-addr.arpa")),
        ]);
        let key_path = knot.dir.join("tsig.key");
        knot.write_key(&key_path, TSIG_SECRET);
        let u = Updater {
            server: format!("127.0.0.1:{}", knot.port).parse().unwrap(),
            key: TsigKey::load(&key_path).unwrap(),
            timeout: Duration::from_secs(10),
        };
        let (fwd, rev) = (
            Domain::parse("batch.test").unwrap(),
            Domain::parse("134.10.in-addr.arpa").unwrap(),
        );
        let host = |i: u8, domain: &str| HostName {
            label: crate::names::Label::parse(&format!("vnode-9-{i}")).unwrap(),
            domain: Domain::parse(domain).unwrap(),
        };
        let mut hosts: Vec<(HostName, Ipv4Addr)> = (1..=30)
            .map(|i| (host(i, "batch.test"), Ipv4Addr::new(10, 134, 9, i)))
            .collect();
        // One outside the forward zone, one outside the reverse zone.
        hosts.push((host(31, "elsewhere.test"), Ipv4Addr::new(10, 134, 9, 31)));
        hosts.push((host(32, "batch.test"), Ipv4Addr::new(10, 135, 9, 32)));
        let refs: Vec<(&HostName, Ipv4Addr)> = hosts.iter().map(|(h, ip)| (h, *ip)).collect();
        let log = knot.dir.join("knot.log");
        let updates_before = ddns_updates(&log);
        let results = u.upsert_many(&refs, &fwd, &rev, 60);
        // 30 hosts, 12 per message, two zones: 6 messages (two per host would be 60).
        assert_eq!(ddns_updates(&log) - updates_before, 6);
        for (k, r) in results.iter().enumerate().take(30) {
            assert!(r.is_ok(), "host {k}: {r:?}");
        }
        assert!(
            matches!(&results[30], Err(DnsError::OutOfZone { zone, .. }) if zone == "batch.test")
        );
        assert!(
            matches!(&results[31], Err(DnsError::OutOfZone { zone, .. }) if zone == "134.10.in-addr.arpa")
        );
        for i in 1..=30u8 {
            assert_eq!(
                knot.dig(&format!("vnode-9-{i}.batch.test"), "A"),
                [format!("10.134.9.{i}")]
            );
            assert_eq!(
                knot.dig(&format!("{i}.9.134.10.in-addr.arpa"), "PTR"),
                [format!("vnode-9-{i}.batch.test.")]
            );
        }
        // Replaced, not added to: a second batch moves three hosts.
        let moved: Vec<(HostName, Ipv4Addr)> = (1..=3)
            .map(|i| (host(i, "batch.test"), Ipv4Addr::new(10, 134, 8, i)))
            .collect();
        let refs: Vec<(&HostName, Ipv4Addr)> = moved.iter().map(|(h, ip)| (h, *ip)).collect();
        assert!(u
            .upsert_many(&refs, &fwd, &rev, 60)
            .iter()
            .all(Result::is_ok));
        assert_eq!(knot.dig("vnode-9-2.batch.test", "A"), ["10.134.8.2"]);
        // A key the server does not know: each host gets the refusal.
        let bad = knot.dir.join("bad.key");
        knot.write_key(&bad, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=");
        let u = Updater {
            key: TsigKey::load(&bad).unwrap(),
            ..u
        };
        let results = u.upsert_many(&refs, &fwd, &rev, 60);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(DnsError::TsigRejected { .. }))),
            "{results:?}"
        );
    }
}
