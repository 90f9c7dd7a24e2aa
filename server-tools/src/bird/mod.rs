//! BIRD 2 configs that carry node /32s between the VPN servers and the head node(s) over iBGP
//! (issue 10, docs/multi-server.md): the typed values of `[bird]`, the checks across them, and
//! the rendering (`render.rs`). Every value that reaches a BIRD config passes through a type here.

mod render;

pub use render::{render_head, render_server, Rendered};

use crate::names::{IfName, Ipv4Net, ServerName};
use crate::routing::TableId;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

/// Why a `[bird]` value or the cluster it describes is refused: each a line an admin can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BirdError {
    #[error("[bird] asn {0} is not usable: BGP AS numbers are 1..=4294967294 (0 and 4294967295 are reserved)")]
    Asn(u32),
    #[error("[bird] lan {0:?} is not valid: an IPv4 network like 172.16.0.0/24, no host bits set, prefix 8-30")]
    Lan(String),
    #[error("[bird] lan is not set: it is the cluster LAN the VPN servers and the head share (e.g. lan = \"172.16.0.0/24\")")]
    NoLan,
    #[error("[bird.servers] is empty: a head peers only with the VPN servers listed there (vpnA = \"172.16.0.11\")")]
    NoServers,
    #[error("[bird] heads is empty: every VPN server peers with at least one head (route reflector); e.g. heads = [\"172.16.0.1\"]")]
    NoHeads,
    #[error(
        "[bird] lan {lan} overlaps [names] pool {pool}: a node address could be a LAN address"
    )]
    LanOverlapsPool { lan: Ipv4Net, pool: Ipv4Net },
    #[error("[bird.servers] {name} = {addr} is not a host address of [bird] lan {lan}")]
    ServerOutsideLan {
        name: ServerName,
        addr: Ipv4Addr,
        lan: Ipv4Net,
    },
    #[error("[bird] heads: {addr} is not a host address of [bird] lan {lan}")]
    HeadOutsideLan { addr: Ipv4Addr, lan: Ipv4Net },
    #[error("[bird] heads lists {0} twice")]
    HeadTwice(Ipv4Addr),
    #[error("[bird.servers] {a} and {b} both have address {addr}: each server's address is its BGP router id and must be its own")]
    ServersShareAddress {
        a: ServerName,
        b: ServerName,
        addr: Ipv4Addr,
    },
    #[error("[bird.servers] {name} = {addr} is also in [bird] heads: a VPN server and a head need their own addresses (router ids)")]
    ServerIsHead { name: ServerName, addr: Ipv4Addr },
    #[error("no [bird.servers] entry for {name} (known: {known}): add `{name} = \"LAN ADDRESS\"` under [bird.servers]")]
    UnknownServer { name: ServerName, known: String },
    #[error("--router-id {0} is not in [bird] heads: the VPN servers peer only with the heads listed there")]
    RouterIdNotHead(Ipv4Addr),
}

/// A BGP AS number (RFC 6793 four-octet), without the reserved 0 and 4294967295 (RFC 7607,
/// RFC 7300). Every server and head share one (iBGP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "u32")]
pub struct Asn(u32);

impl Asn {
    pub fn new(n: u32) -> Result<Self, BirdError> {
        if n == 0 || n == u32::MAX {
            return Err(BirdError::Asn(n));
        }
        Ok(Self(n))
    }
}

impl TryFrom<u32> for Asn {
    type Error = BirdError;
    fn try_from(n: u32) -> Result<Self, BirdError> {
        Self::new(n)
    }
}

impl Default for Asn {
    fn default() -> Self {
        // A private AS number (RFC 6996: 64512-65534), the one docs/multi-server.md uses.
        Self(65000)
    }
}

impl fmt::Display for Asn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `[bird] lan`: refused in its own words (the shared `Ipv4Net` parser speaks of the address
/// pool).
pub fn de_lan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Net>, D::Error> {
    let s = String::deserialize(d)?;
    Ipv4Net::parse(&s)
        .map(Some)
        .map_err(|_| serde::de::Error::custom(BirdError::Lan(s.chars().take(40).collect())))
}

/// `[bird.servers]`: each VPN server's LAN address (its BGP router id) by its `[openvpn] name`,
/// in name order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Servers(Vec<(ServerName, Ipv4Addr)>);

impl Servers {
    pub fn iter(&self) -> impl Iterator<Item = &(ServerName, Ipv4Addr)> {
        self.0.iter()
    }

    pub fn get(&self, name: &ServerName) -> Option<Ipv4Addr> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, a)| *a)
    }
}

impl<'de> Deserialize<'de> for Servers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = BTreeMap::<String, Ipv4Addr>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, a)| {
                ServerName::parse(&k)
                    .map(|n| (n, a))
                    .map_err(serde::de::Error::custom)
            })
            .collect::<Result<_, _>>()
            .map(Servers)
    }
}

/// `[bird]` (a section of the server config, docs/multi-server.md): the cluster `idhal bird
/// config` renders BIRD 2 configs for. Each value is typed here; how they agree with each other (addresses inside `lan`, none
/// shared) is checked by [`Cluster::check`] when a config is rendered, so a `[bird]` being
/// edited never stops the hooks.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BirdSection {
    /// The AS every server and head share (iBGP).
    pub asn: Asn,
    /// The cluster LAN the VPN servers and the heads share (`172.16.0.0/24`); the heads accept
    /// BGP sessions from any address in it.
    #[serde(deserialize_with = "crate::bird::de_lan")]
    pub lan: Option<Ipv4Net>,
    /// The LAN interface of the servers and the heads (BFD runs on it).
    pub interface: IfName,
    /// The heads' LAN addresses: route reflectors, each VPN server peers with every one.
    pub heads: Vec<Ipv4Addr>,
    /// BFD on the LAN: a dead peer's routes go in ~0.5 s instead of the 3 s hold time.
    pub bfd: bool,
    /// `[bird.servers]`: each VPN server's LAN address (its BGP router id) by `[openvpn] name`.
    pub servers: Servers,
}

impl Default for BirdSection {
    fn default() -> Self {
        Self {
            asn: Asn::default(),
            lan: None,
            interface: IfName::parse("lan0").expect("valid default"),
            heads: Vec::new(),
            bfd: true,
            servers: Servers::default(),
        }
    }
}

/// A `[bird]` section whose values agree with each other, with the two values it takes from
/// elsewhere: the node pool (`[names] pool`, the only routes the configs let through) and the
/// kernel table idhal writes (`[routing] table`).
#[derive(Debug, Clone)]
pub struct Cluster<'a> {
    pub bird: &'a BirdSection,
    pub pool: Ipv4Net,
    pub table: TableId,
}

impl<'a> Cluster<'a> {
    /// Refuses, in the first one found: no LAN, no head, a LAN overlapping the pool, a head or
    /// server outside the LAN's host addresses, a head listed twice, two servers (or a server
    /// and a head) with one address.
    pub fn check(bird: &'a BirdSection, pool: Ipv4Net, table: TableId) -> Result<Self, BirdError> {
        let lan = bird.lan.ok_or(BirdError::NoLan)?;
        if bird.heads.is_empty() {
            return Err(BirdError::NoHeads);
        }
        if lan.overlaps(&pool) {
            return Err(BirdError::LanOverlapsPool { lan, pool });
        }
        let host = |a: Ipv4Addr| lan.contains(a) && a != lan.addr && a != lan.broadcast();
        for (i, &h) in bird.heads.iter().enumerate() {
            if !host(h) {
                return Err(BirdError::HeadOutsideLan { addr: h, lan });
            }
            if bird.heads[..i].contains(&h) {
                return Err(BirdError::HeadTwice(h));
            }
        }
        let mut seen: BTreeMap<Ipv4Addr, &ServerName> = BTreeMap::new();
        for (name, addr) in bird.servers.iter() {
            if !host(*addr) {
                return Err(BirdError::ServerOutsideLan {
                    name: name.clone(),
                    addr: *addr,
                    lan,
                });
            }
            if bird.heads.contains(addr) {
                return Err(BirdError::ServerIsHead {
                    name: name.clone(),
                    addr: *addr,
                });
            }
            if let Some(first) = seen.insert(*addr, name) {
                return Err(BirdError::ServersShareAddress {
                    a: first.clone(),
                    b: name.clone(),
                    addr: *addr,
                });
            }
        }
        Ok(Self { bird, pool, table })
    }

    /// The LAN address (router id) of VPN server `name`.
    pub fn server(&self, name: &ServerName) -> Result<Ipv4Addr, BirdError> {
        self.bird
            .servers
            .get(name)
            .ok_or_else(|| BirdError::UnknownServer {
                name: name.clone(),
                known: match self.bird.servers.iter().count() {
                    0 => "none".into(),
                    _ => self
                        .bird
                        .servers
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                },
            })
    }

    /// A head's router id: `router_id` if it is one of `[bird] heads`, else the first head.
    pub fn head(&self, router_id: Option<Ipv4Addr>) -> Result<Ipv4Addr, BirdError> {
        match router_id {
            None => Ok(self.bird.heads[0]),
            Some(a) if self.bird.heads.contains(&a) => Ok(a),
            Some(a) => Err(BirdError::RouterIdNotHead(a)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        Ipv4Net::parse(s).unwrap()
    }

    #[test]
    fn typed_values_refuse_what_bird_or_the_kernel_would_not_take() {
        assert_eq!(Asn::new(0), Err(BirdError::Asn(0)));
        assert_eq!(Asn::new(u32::MAX), Err(BirdError::Asn(u32::MAX)));
        assert!(Asn::new(1).is_ok() && Asn::new(u32::MAX - 1).is_ok());
        for ok in [1, 100, 252, 256, 0x7fff_ffff] {
            assert!(TableId::try_from(ok).is_ok(), "{ok}");
        }
    }

    fn section(lan: &str, heads: &[&str], servers: &[(&str, &str)]) -> BirdSection {
        BirdSection {
            lan: Some(net(lan)),
            heads: heads.iter().map(|h| h.parse().unwrap()).collect(),
            servers: Servers(
                servers
                    .iter()
                    .map(|(n, a)| (ServerName::parse(n).unwrap(), a.parse().unwrap()))
                    .collect(),
            ),
            ..BirdSection::default()
        }
    }

    #[test]
    fn the_lan_must_not_be_the_pool_and_hold_no_network_or_broadcast_address() {
        let pool = net("10.134.0.0/16");
        let t = TableId::try_from(100).unwrap();
        let s = section("10.134.7.0/24", &["10.134.7.1"], &[]);
        assert!(matches!(
            Cluster::check(&s, pool, t),
            Err(BirdError::LanOverlapsPool { .. })
        ));
        for edge in ["172.16.0.0", "172.16.0.255"] {
            let s = section("172.16.0.0/24", &["172.16.0.1"], &[("vpnA", edge)]);
            assert!(matches!(
                Cluster::check(&s, pool, t),
                Err(BirdError::ServerOutsideLan { .. })
            ));
        }
        let s = section("172.16.0.0/24", &["172.16.0.1", "172.16.0.1"], &[]);
        assert_eq!(
            Cluster::check(&s, pool, t).unwrap_err(),
            BirdError::HeadTwice("172.16.0.1".parse().unwrap())
        );
    }
}
