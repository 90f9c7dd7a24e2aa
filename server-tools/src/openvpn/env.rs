//! What OpenVPN tells a client-connect/client-disconnect script, parsed into validated types.
//! Raw environment strings never leave this module: a value that does not parse is refused here.

use crate::names::{node_id, Ipv4Net, NameError, NodeId};
use crate::routing::Dev;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("OpenVPN variable {var} is missing (is this running as an OpenVPN client-connect/client-disconnect script?)")]
    Missing { var: &'static str },
    #[error("OpenVPN variable {var}")]
    Name {
        var: &'static str,
        source: NameError,
    },
    #[error("OpenVPN variable {var}={value:?} is not {expected}")]
    Bad {
        var: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("OpenVPN variable ifconfig_pool_remote_ip={addr} is no node's address: it is {what}")]
    Reserved { addr: Ipv4Addr, what: String },
}

/// The addresses a node may be given: inside `pool` ([names] pool), and none of `reserved`
/// (every pool's network and broadcast address and its VPN server's own, with what it is).
#[derive(Debug, Clone)]
pub struct NodeAddresses {
    pub pool: Ipv4Net,
    pub reserved: BTreeMap<Ipv4Addr, String>,
}

impl NodeAddresses {
    /// `[names] pool` and the project pools inside it. A VPN server takes its pool's first
    /// host (`server NET MASK` in the rendered config), so that is reserved too.
    pub fn new<'a>(pool: Ipv4Net, projects: impl IntoIterator<Item = (&'a str, Ipv4Net)>) -> Self {
        let mut reserved = BTreeMap::new();
        let mut add = |p: &Ipv4Net, whose: &str| {
            reserved.insert(p.addr, format!("the network address of {whose} {p}"));
            reserved.insert(
                p.broadcast(),
                format!("the broadcast address of {whose} {p}"),
            );
            if let Some(server) = p.host(1) {
                reserved.insert(
                    server,
                    format!("the VPN server's own address in {whose} {p}"),
                );
            }
        };
        for (name, p) in projects {
            add(&p, &format!("project {name:?}'s pool"));
        }
        add(&pool, "[names] pool");
        Self { pool, reserved }
    }

    /// Why `ip` cannot be a node's address, if it cannot.
    pub fn refusal(&self, ip: Ipv4Addr) -> Option<String> {
        if !self.pool.contains(ip) {
            return Some(format!("outside [names] pool {}", self.pool));
        }
        self.reserved.get(&ip).cloned()
    }
}

/// Whether OpenVPN gave the client an address (`ifconfig_pool_remote_ip`, from a pool or a
/// client-config-dir). With `server … nopool` and no ccd it is unset at connect; at disconnect
/// it is unset for a client whose connect was refused (it never came up).
pub fn has_pool_address(env: &HashMap<String, String>) -> bool {
    env.get("ifconfig_pool_remote_ip")
        .is_some_and(|v| !v.is_empty())
}

/// The certificate CN (`common_name`, checked against `X509_0_CN` when present): the node id.
pub fn node_from_env(env: &HashMap<String, String>) -> Result<NodeId, EnvError> {
    let get = |var: &'static str| env.get(var).map(String::as_str);
    let cn = get("common_name").ok_or(EnvError::Missing { var: "common_name" })?;
    let node = node_id(cn).map_err(|source| EnvError::Name {
        var: "common_name",
        source,
    })?;
    // When OpenVPN passes the certificate's own CN too, it must agree: a CN that differs
    // from X509_0_CN means something rewrote common_name (username-as-common-name).
    if let Some(x509) = get("X509_0_CN") {
        if x509 != node.as_str() {
            return Err(EnvError::Bad {
                var: "X509_0_CN",
                value: shorten(x509),
                expected: "equal to common_name",
            });
        }
    }
    Ok(node)
}

/// One client's session as OpenVPN describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Certificate CN: the node's identity.
    pub node: NodeId,
    /// The VPN address OpenVPN gave the node (inside the pool).
    pub vpn_ip: Ipv4Addr,
    /// The node's real (outer) address, as OpenVPN saw it.
    pub client_ip: IpAddr,
    /// Its real port (`trusted_port`): with `since`, what tells two sessions of one node
    /// apart when both started within the same second.
    pub client_port: Option<u16>,
    /// When the session started (unix seconds).
    pub since: u64,
    /// OpenVPN's tun device (`dev`), where the node's route goes; none in a status file.
    pub dev: Option<Dev>,
}

fn shorten(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `ifconfig_pool_remote_ip`, inside the pool and not reserved.
fn pool_address(
    env: &HashMap<String, String>,
    addresses: &NodeAddresses,
) -> Result<Ipv4Addr, EnvError> {
    let raw_ip = env
        .get("ifconfig_pool_remote_ip")
        .ok_or(EnvError::Missing {
            var: "ifconfig_pool_remote_ip",
        })?;
    let vpn_ip: Ipv4Addr = raw_ip.parse().map_err(|_| EnvError::Bad {
        var: "ifconfig_pool_remote_ip",
        value: shorten(raw_ip),
        expected: "an IPv4 address",
    })?;
    if !addresses.pool.contains(vpn_ip) {
        return Err(EnvError::Bad {
            var: "ifconfig_pool_remote_ip",
            value: vpn_ip.to_string(),
            expected: "inside the configured pool ([names] pool)",
        });
    }
    if let Some(what) = addresses.reserved.get(&vpn_ip) {
        return Err(EnvError::Reserved {
            addr: vpn_ip,
            what: what.clone(),
        });
    }
    Ok(vpn_ip)
}

impl Session {
    /// Parses the variables of `env` (normally `std::env::vars()`). `now` fills in `time_unix`
    /// when OpenVPN did not set it (older versions).
    pub fn from_env(
        env: &HashMap<String, String>,
        addresses: &NodeAddresses,
        now: u64,
    ) -> Result<Self, EnvError> {
        Self::parse(env, addresses, now, None)
    }

    /// As `from_env`, with the VPN address idhal gives the node (from the state database,
    /// checked by the caller) instead of `ifconfig_pool_remote_ip`.
    pub fn with_address(
        env: &HashMap<String, String>,
        addresses: &NodeAddresses,
        now: u64,
        vpn_ip: Ipv4Addr,
    ) -> Result<Self, EnvError> {
        Self::parse(env, addresses, now, Some(vpn_ip))
    }

    fn parse(
        env: &HashMap<String, String>,
        addresses: &NodeAddresses,
        now: u64,
        given: Option<Ipv4Addr>,
    ) -> Result<Self, EnvError> {
        let get = |var: &'static str| env.get(var).map(String::as_str);
        let node = node_from_env(env)?;
        let vpn_ip = match given {
            Some(ip) => ip,
            None => pool_address(env, addresses)?,
        };
        let client_ip = match (get("trusted_ip"), get("trusted_ip6")) {
            (Some(v4), _) => v4
                .parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| EnvError::Bad {
                    var: "trusted_ip",
                    value: shorten(v4),
                    expected: "an IPv4 address",
                })?,
            (None, Some(v6)) => v6.parse().map_err(|_| EnvError::Bad {
                var: "trusted_ip6",
                value: shorten(v6),
                expected: "an IP address",
            })?,
            (None, None) => return Err(EnvError::Missing { var: "trusted_ip" }),
        };
        let client_port = match get("trusted_port") {
            None => None,
            Some(p) => Some(
                Some(p)
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u16>().ok())
                    .ok_or_else(|| EnvError::Bad {
                        var: "trusted_port",
                        value: shorten(p),
                        expected: "a port number",
                    })?,
            ),
        };
        let since = match get("time_unix") {
            None => now,
            // Digits only: `u64::from_str` would also take a leading `+`.
            Some(t) => Some(t)
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| EnvError::Bad {
                    var: "time_unix",
                    value: shorten(t),
                    expected: "a unix time in seconds",
                })?,
        };
        // It goes into `ip` commands: refused here unless the kernel could name a device so.
        let dev = match get("dev") {
            None => None,
            Some(d) => Some(Dev::parse(d).map_err(|_| EnvError::Bad {
                var: "dev",
                value: shorten(d),
                expected: "a network interface name (1-15 bytes, no '/', ':' or spaces)",
            })?),
        };
        Ok(Self {
            node,
            vpn_ip,
            client_ip,
            client_port,
            since,
            dev,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn pool() -> NodeAddresses {
        NodeAddresses::new(Ipv4Net::parse("10.134.0.0/16").unwrap(), [])
    }

    #[test]
    fn good_session() {
        let e = env(&[
            ("common_name", "client317"),
            ("ifconfig_pool_remote_ip", "10.134.7.38"),
            ("trusted_ip", "192.0.2.7"),
            ("time_unix", "1700000000"),
        ]);
        let s = Session::from_env(&e, &pool(), 5).unwrap();
        assert_eq!(s.node.as_str(), "client317");
        assert_eq!(s.since, 1_700_000_000);
    }

    #[test]
    fn hostile_values_refused() {
        let base = [
            ("common_name", "client317"),
            ("ifconfig_pool_remote_ip", "10.134.7.38"),
            ("trusted_ip", "192.0.2.7"),
            ("time_unix", "1700000000"),
        ];
        for (k, bad) in [
            ("common_name", "x' OR '1'='1"),
            ("ifconfig_pool_remote_ip", "10.134.7.38'; --"),
            ("ifconfig_pool_remote_ip", "10.135.0.1"),
            ("trusted_ip", "1.2.3.4 OR 1=1"),
            ("time_unix", "+17"),
            ("time_unix", "17;"),
            ("trusted_port", "70000"),
            ("trusted_port", "+1"),
            ("dev", "tun0 table 254"),
            ("dev", ""),
            ("dev", "../tun0"),
            ("dev", "tun0\nroute"),
            ("dev", "tun0123456789012"),
        ] {
            let mut e = env(&base);
            e.insert(k.into(), bad.into());
            let r = Session::from_env(&e, &pool(), 5);
            // Refused as the variable it came in.
            assert!(
                matches!(&r, Err(EnvError::Bad { var, .. } | EnvError::Name { var, .. }) if *var == k),
                "{k}={bad:?}: {r:?}"
            );
        }
        let mut e = env(&base);
        e.remove("common_name");
        assert!(matches!(
            Session::from_env(&e, &pool(), 5),
            Err(EnvError::Missing { var: "common_name" })
        ));
    }

    #[test]
    fn network_broadcast_and_server_addresses_are_no_nodes() {
        let a = NodeAddresses::new(
            Ipv4Net::parse("10.0.0.0/8").unwrap(),
            [("p", Ipv4Net::parse("10.134.0.0/16").unwrap())],
        );
        let with = |ip: &str| {
            env(&[
                ("common_name", "client317"),
                ("ifconfig_pool_remote_ip", ip),
                ("trusted_ip", "192.0.2.7"),
            ])
        };
        for (ip, what) in [
            ("10.134.0.0", "network address of project \"p\""),
            ("10.134.255.255", "broadcast address of project \"p\""),
            ("10.134.0.1", "VPN server's own address in project \"p\""),
            ("10.0.0.0", "network address of [names] pool"),
            ("10.255.255.255", "broadcast address of [names] pool"),
            ("10.0.0.1", "VPN server's own address in [names] pool"),
        ] {
            let e = Session::from_env(&with(ip), &a, 5).unwrap_err();
            assert!(matches!(e, EnvError::Reserved { .. }), "{ip}: {e}");
            assert!(e.to_string().contains(what), "{ip}: {e}");
        }
        let s = Session::from_env(&with("10.134.0.2"), &a, 5).unwrap();
        assert_eq!((s.vpn_ip.octets()[3], s.client_port), (2, None));
        let mut e = with("10.134.255.254");
        e.insert("trusted_port".into(), "40001".into());
        assert_eq!(
            Session::from_env(&e, &a, 5).unwrap().client_port,
            Some(40001)
        );
    }
}
