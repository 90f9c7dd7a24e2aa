//! Validated values the hooks act on: node ids (certificate CNs, the manifest crate's `NodeId`),
//! server names, DNS labels and domains, the name template, and OAR property values. OAR pastes host names and values into SQL unescaped,
//! so only these types, whose charsets hold no quote, space or backslash, ever reach a backend.

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv4Addr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} {value:?} is not valid: {why}")]
    Invalid {
        what: &'static str,
        /// Shortened and Debug-escaped when shown, so a hostile value cannot forge log lines.
        value: String,
        why: Cow<'static, str>,
    },
    /// Two addresses of the pool would get one name (and so one OAR resource and one set of
    /// DNS records): the template must use every octet the pool's prefix leaves free.
    #[error("name template {template:?} gives two nodes of pool {pool} one name: {why} ({a} and {b} would both be {name:?})")]
    NotOneToOne {
        template: String,
        pool: Ipv4Net,
        why: String,
        a: Ipv4Addr,
        b: Ipv4Addr,
        name: String,
    },
}

fn invalid(what: &'static str, value: &str, why: &'static str) -> NameError {
    let mut short: String = value.chars().take(80).collect();
    if value.chars().count() > 80 {
        short.push('…');
    }
    NameError::Invalid {
        what,
        value: short,
        why: why.into(),
    }
}

use idhal_manifest::id::SAFE_NAME_RULE;
/// A node's identity, the CN of its client certificate (`client317`): the manifest crate's
/// type, so the enrollment side that names a node and the hooks that check it share one rule.
pub use idhal_manifest::NodeId;

/// A node id as OpenVPN (`common_name`) or an admin hands it over, refused in the words of the
/// role it plays here.
pub fn node_id(s: &str) -> Result<NodeId, NameError> {
    NodeId::try_from(s).map_err(|_| invalid("node id (certificate CN)", s, SAFE_NAME_RULE))
}

/// A VPN server's name (`[openvpn] name`, the host name by default), recorded with each node
/// it registers: the rule of node ids, so it is also a valid OAR property value and CN.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerName(NodeId);

impl ServerName {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        NodeId::try_from(s)
            .map(Self)
            .map_err(|_| invalid("server name", s, SAFE_NAME_RULE))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A network interface name (OpenVPN's `dev`, `tun0`; a LAN interface, `lan0`): what the kernel
/// takes (IFNAMSIZ - 1 = 15 bytes), in a charset that is safe in an argv, an `ip -batch` line
/// and a quoted BIRD string: A-Z a-z 0-9 _ . - (not `.` or `..`, which the kernel refuses).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct IfName(String);

impl IfName {
    pub const RULE: &'static str = "1-15 of A-Z a-z 0-9 _ . - (not . or ..)";

    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
        if s.is_empty() || s.len() > 15 || !s.chars().all(ok) || s == "." || s == ".." {
            return Err(invalid("interface name", s, Self::RULE));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IfName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One DNS label (RFC 1123 host name rules), lower case: `vnode-7-38`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Label(String);

impl Label {
    pub const RULE: &'static str =
        "1-63 of a-z 0-9 -, not starting or ending with - (upper case is folded)";

    pub fn parse(s: &str) -> Result<Self, NameError> {
        Self::parse_as("DNS label", s)
    }

    fn parse_as(what: &'static str, s: &str) -> Result<Self, NameError> {
        let lower = s.to_ascii_lowercase();
        let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
        if lower.is_empty()
            || lower.len() > 63
            || lower.starts_with('-')
            || lower.ends_with('-')
            || !lower.chars().all(ok_char)
        {
            return Err(invalid(what, s, Self::RULE));
        }
        Ok(Self(lower))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A DNS domain of one or more labels, without the trailing dot: `idhal.internal`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Domain(String);

impl Domain {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let s = s.strip_suffix('.').unwrap_or(s);
        if s.is_empty() || s.len() > 190 {
            return Err(invalid(
                "domain",
                s,
                "1-190 characters (room is kept for the node label)",
            ));
        }
        let labels = s
            .split('.')
            .map(|l| Label::parse_as("domain label", l).map(|l| l.0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(labels.join(".")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A node's full host name: its label in the configured domain. This is OAR's `network_address`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostName {
    pub label: Label,
    pub domain: Domain,
}

impl fmt::Display for HostName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.label, self.domain)
    }
}

impl HostName {
    /// Parses a full name back (as read from OAR) and checks it is in `domain`.
    pub fn parse_in(s: &str, domain: &Domain) -> Result<Self, NameError> {
        let Some(label) = s
            .strip_suffix(domain.as_str())
            .and_then(|l| l.strip_suffix('.'))
        else {
            return Err(invalid("host name", s, "not in the configured domain"));
        };
        Ok(Self {
            label: Label::parse(label)?,
            domain: domain.clone(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Octet(usize),
}

/// Turns a VPN address into a node label: `vnode-{3}-{4}` makes `vnode-7-38` of 10.134.7.38.
/// `{1}`..`{4}` are the address's octets; everything else is literal and must be label text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameTemplate {
    source: String,
    parts: Vec<Part>,
}

impl NameTemplate {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        const RULE: &str =
            "literal a-z 0-9 - and {1}..{4} for the address octets, at least one octet";
        let mut parts = Vec::new();
        let mut rest = s;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('{') {
                let (n, tail) = after
                    .split_once('}')
                    .ok_or_else(|| invalid("name template", s, RULE))?;
                let octet = match n {
                    "1" => 0,
                    "2" => 1,
                    "3" => 2,
                    "4" => 3,
                    _ => return Err(invalid("name template", s, RULE)),
                };
                parts.push(Part::Octet(octet));
                rest = tail;
            } else {
                let end = rest.find('{').unwrap_or(rest.len());
                let lit = &rest[..end];
                if !lit
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    return Err(invalid("name template", s, RULE));
                }
                parts.push(Part::Literal(lit.to_owned()));
                rest = &rest[end..];
            }
        }
        if !parts.iter().any(|p| matches!(p, Part::Octet(_))) {
            return Err(invalid("name template", s, RULE));
        }
        let t = Self {
            source: s.to_owned(),
            parts,
        };
        // A template that cannot make a valid label for some address is a config error now,
        // not a refused node at 3 a.m.
        t.render(Ipv4Addr::new(255, 255, 255, 255))?;
        t.render(Ipv4Addr::new(0, 0, 0, 0))?;
        Ok(t)
    }

    /// Refuses a template that could give two addresses of `pool` one name: it must hold
    /// every octet the prefix leaves (even partly) free, and two free octets must not run
    /// together (`{3}{4}` makes 10.134.1.11 and 10.134.11.1 both `111`). A config error at
    /// load, not a node taking over another's OAR resource and DNS records at 3 a.m.
    pub fn check_one_to_one(&self, pool: &Ipv4Net) -> Result<(), NameError> {
        let free = |i: usize| u32::from(pool.prefix) < (i as u32 + 1) * 8;
        // `pool.addr` with octet values `set` (last octet 1 unless set: not the network).
        let sample = |set: &[(usize, u8)]| {
            let mut o = pool.addr.octets();
            o[3] |= 1;
            for &(i, v) in set {
                o[i] = pool.addr.octets()[i] | v;
            }
            Ipv4Addr::from(o)
        };
        let fail = |why: String, a: Ipv4Addr, b: Ipv4Addr| NameError::NotOneToOne {
            template: self.source.clone(),
            pool: *pool,
            why,
            name: self.render(a).map(|l| l.0).unwrap_or_default(),
            a,
            b,
        };
        for i in (0..4).filter(|&i| free(i)) {
            if !self.parts.contains(&Part::Octet(i)) {
                // The lowest bits are the free ones: these two differ only in octet i.
                let (x, y) = if i == 3 { (1, 2) } else { (0, 1) };
                return Err(fail(
                    format!(
                        "it lacks {{{}}}, an octet the prefix /{} leaves free",
                        i + 1,
                        pool.prefix
                    ),
                    sample(&[(i, x)]),
                    sample(&[(i, y)]),
                ));
            }
        }
        // Free octets next to each other, or with only digits between: look for a collision
        // over both octets' values (at most 65,536 renders, once, at config load).
        let mut pairs = Vec::new();
        for (k, p) in self.parts.iter().enumerate() {
            let Part::Octet(x) = p else { continue };
            let y = match (self.parts.get(k + 1), self.parts.get(k + 2)) {
                (Some(Part::Octet(y)), _) => *y,
                (Some(Part::Literal(l)), Some(Part::Octet(y)))
                    if l.bytes().all(|b| b.is_ascii_digit()) =>
                {
                    *y
                }
                _ => continue,
            };
            if x != &y && free(*x) && free(y) {
                pairs.push((*x, y));
            }
        }
        for (x, y) in pairs {
            let mut seen = std::collections::HashMap::new();
            for vx in 0..=255u8 {
                for vy in 0..=255u8 {
                    let a = sample(&[(x, vx), (y, vy)]);
                    if !pool.contains(a) || a == pool.broadcast() {
                        continue;
                    }
                    let Ok(l) = self.render(a) else { continue };
                    if let Some(b) = seen.insert(l.0, a) {
                        return Err(fail(
                            format!(
                                "{{{}}} and {{{}}} run together: put a letter or - between them",
                                x + 1,
                                y + 1
                            ),
                            b,
                            a,
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    pub fn render(&self, addr: Ipv4Addr) -> Result<Label, NameError> {
        let o = addr.octets();
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Literal(l) => s.push_str(l),
                Part::Octet(i) => s.push_str(&o[*i].to_string()),
            }
        }
        Label::parse(&s)
    }
}

/// A value written into an OAR property column. Restricted to what addresses, names, ids and
/// timestamps need: no quote, space, backslash, comma, `=` or `;` can reach OAR's SQL. At most
/// 255 bytes: `oarproperty -c` makes VARCHAR(255) columns, which hold any host name (253).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropValue(String);

impl PropValue {
    /// OAR's property columns: VARCHAR(255) (`oarproperty -c`).
    pub const MAX: usize = 255;

    pub fn parse(s: &str) -> Result<Self, NameError> {
        let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':');
        if s.is_empty() || s.len() > Self::MAX || !s.chars().all(ok) {
            return Err(invalid("property value", s, "1-255 of A-Z a-z 0-9 . _ - :"));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for PropValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IPv4 network in CIDR form: the VPN address pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    pub fn parse(s: &str) -> Result<Self, NameError> {
        const RULE: &str = "an IPv4 network like 10.134.0.0/16 with no host bits set, prefix 8-30";
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| invalid("address pool", s, RULE))?;
        let addr: Ipv4Addr = a.parse().map_err(|_| invalid("address pool", s, RULE))?;
        let prefix: u8 = p.parse().map_err(|_| invalid("address pool", s, RULE))?;
        if !(8..=30).contains(&prefix) || u32::from(addr) & !Self::mask(prefix) != 0 {
            return Err(invalid("address pool", s, RULE));
        }
        Ok(Self { addr, prefix })
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & Self::mask(self.prefix) == u32::from(self.addr)
    }

    /// The dotted netmask (`255.255.0.0` for a /16), as OpenVPN wants it.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask(self.prefix))
    }

    /// The `n`th address of the network (0 is the network address); `None` for the broadcast
    /// address and beyond.
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.prefix));
        (u64::from(n) + 1 < size).then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }

    /// The last address of the network (all host bits set).
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !Self::mask(self.prefix))
    }

    /// Whether all of `inner` lies inside this network.
    pub fn contains_net(&self, inner: &Ipv4Net) -> bool {
        inner.prefix >= self.prefix && self.contains(inner.addr)
    }

    pub fn overlaps(&self, other: &Ipv4Net) -> bool {
        self.contains(other.addr) || other.contains(self.addr)
    }

    /// Usable host addresses (network and broadcast addresses left out).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.addr) + 1;
        let last = u32::from(self.addr) | !Self::mask(self.prefix);
        (first..last).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which rule refused a value: `what` and the value as shown.
    fn refused<T: fmt::Debug>(r: Result<T, NameError>) -> (&'static str, String) {
        match r {
            Err(NameError::Invalid { what, value, .. }) => (what, value),
            other => panic!("not refused by a rule: {other:?}"),
        }
    }

    /// Node ids and server names follow the manifest crate's one rule, and their refusals
    /// state that rule's one text.
    #[test]
    fn interface_names_are_what_the_kernel_takes_in_a_safe_charset() {
        for ok in ["tun0", "lan0", "a23456789012345", "br-lan.10", "tun_0", "a"] {
            assert_eq!(IfName::parse(ok).unwrap().to_string(), ok);
        }
        for bad in [
            "",
            "a234567890123456",
            "lan 0",
            "lan0\"",
            "eth0;",
            "tun0\nroute",
            "tun0:1",
            "é",
            ".",
            "..",
            "a/b",
        ] {
            let e = IfName::parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("interface name") && e.contains(IfName::RULE),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn node_ids_and_server_names() {
        assert_eq!(node_id("client317").unwrap().as_str(), "client317");
        assert_eq!(node_id("node-1.a_b").unwrap().to_string(), "node-1.a_b");
        assert_eq!(ServerName::parse("vpn1.a_b").unwrap().as_str(), "vpn1.a_b");
        for bad in [
            "",
            "-x",
            ".x",
            "a..b",
            "a b",
            "x'; DROP TABLE resources; --",
            "a\nb",
            "a/b",
            &"a".repeat(65),
        ] {
            assert_eq!(
                node_id(bad),
                Err(invalid("node id (certificate CN)", bad, SAFE_NAME_RULE))
            );
            assert_eq!(
                ServerName::parse(bad),
                Err(invalid("server name", bad, SAFE_NAME_RULE))
            );
            assert!(NodeId::try_from(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            node_id("a b").unwrap_err().to_string(),
            "node id (certificate CN) \"a b\" is not valid: 1-64 characters from A-Z a-z 0-9 \
             . _ -, starting with a letter or digit, without '..'"
        );
        // Shortened to 80 characters and marked, so a hostile value cannot flood a log line.
        let long = "a".repeat(65) + &"'".repeat(100);
        let Err(NameError::Invalid { value, .. }) = node_id(&long) else {
            panic!("accepted")
        };
        assert_eq!(value, format!("{}…", &long[..80]));
    }

    #[test]
    fn labels_and_domains() {
        assert_eq!(Label::parse("VNode-1").unwrap().to_string(), "vnode-1");
        assert_eq!(refused(Label::parse("-a")), ("DNS label", "-a".into()));
        assert_eq!(refused(Label::parse("a_b")), ("DNS label", "a_b".into()));
        assert_eq!(
            Domain::parse("Idhal.Internal.").unwrap().as_str(),
            "idhal.internal"
        );
        assert_eq!(refused(Domain::parse("a..b")), ("domain label", "".into()));
        assert_eq!(
            refused(Domain::parse("a'b")),
            ("domain label", "a'b".into())
        );
        let d = Domain::parse("idhal.internal").unwrap();
        let h = HostName::parse_in("vnode-7-38.idhal.internal", &d).unwrap();
        assert_eq!(h.to_string(), "vnode-7-38.idhal.internal");
        assert_eq!(
            refused(HostName::parse_in("x.other.internal", &d)),
            ("host name", "x.other.internal".into())
        );
    }

    #[test]
    fn template() {
        let t = NameTemplate::parse("vnode-{3}-{4}").unwrap();
        assert_eq!(
            t.render("10.134.7.38".parse().unwrap())
                .unwrap()
                .to_string(),
            "vnode-7-38"
        );
        let template = |s: &str| refused(NameTemplate::parse(s));
        assert_eq!(template("vnode"), ("name template", "vnode".into()));
        assert_eq!(template("v_{4}"), ("name template", "v_{4}".into()));
        assert_eq!(template("{5}"), ("name template", "{5}".into()));
        // Refused by rendering the highest octet: "-255" is no DNS label.
        assert_eq!(template("-{4}"), ("DNS label", "-255".into()));
        assert_eq!(template("{4"), ("name template", "{4".into()));
    }

    #[test]
    fn templates_are_one_to_one_over_the_pool() {
        let t = |s: &str| NameTemplate::parse(s).unwrap();
        let p = |s: &str| Ipv4Net::parse(s).unwrap();
        t("vnode-{3}-{4}")
            .check_one_to_one(&p("10.134.0.0/16"))
            .unwrap();
        t("vnode-{3}-{4}")
            .check_one_to_one(&p("10.134.0.0/17"))
            .unwrap();
        t("n{4}").check_one_to_one(&p("10.134.7.0/24")).unwrap();
        // The case: two projects in 10.0.0.0/8, 10.134.0.2 and 10.135.0.2 one name.
        let e = t("vnode-{3}-{4}")
            .check_one_to_one(&p("10.0.0.0/8"))
            .unwrap_err();
        let NameError::NotOneToOne { a, b, name, .. } = &e else {
            panic!("{e}")
        };
        assert_ne!(a, b);
        let tt = t("vnode-{3}-{4}");
        assert_eq!(tt.render(*a).unwrap().0, *name);
        assert_eq!(tt.render(*b).unwrap().0, *name);
        assert!(e.to_string().contains("lacks {2}"), "{e}");
        // /23: octet 3 is only one bit free, still needed.
        let e = t("n-{4}")
            .check_one_to_one(&p("10.134.6.0/23"))
            .unwrap_err();
        let NameError::NotOneToOne { a, b, .. } = &e else {
            panic!("{e}")
        };
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("10.134.6.1".into(), "10.134.7.1".into())
        );
        // Octets that run together: a real colliding pair is shown.
        for bad in ["n{3}{4}", "n{3}0{4}", "n{3}12{4}"] {
            let e = t(bad).check_one_to_one(&p("10.134.0.0/16")).unwrap_err();
            let NameError::NotOneToOne { a, b, name, .. } = &e else {
                panic!("{e}")
            };
            assert_ne!(a, b, "{bad}");
            assert_eq!(t(bad).render(*a).unwrap().0, *name, "{bad}");
            assert_eq!(t(bad).render(*b).unwrap().0, *name, "{bad}");
        }
        // A fixed octet next to a free one is harmless.
        t("n{2}{4}").check_one_to_one(&p("10.134.9.0/24")).unwrap();
    }

    #[test]
    fn prop_values_and_pools() {
        assert!(PropValue::parse("2001:db8::1").is_ok());
        // The longest host name (253) fits OAR's VARCHAR(255); one byte over it does not.
        assert!(PropValue::parse(&"a".repeat(255)).is_ok());
        assert_eq!(
            refused(PropValue::parse(&"a".repeat(256))).0,
            "property value"
        );
        assert_eq!(
            refused(PropValue::parse("a'b")),
            ("property value", "a'b".into())
        );
        assert_eq!(
            refused(PropValue::parse("a b")),
            ("property value", "a b".into())
        );
        let p = Ipv4Net::parse("10.134.0.0/16").unwrap();
        assert!(p.contains("10.134.7.38".parse().unwrap()));
        assert!(!p.contains("10.135.0.1".parse().unwrap()));
        assert_eq!(
            refused(Ipv4Net::parse("10.134.0.1/16")),
            ("address pool", "10.134.0.1/16".into())
        );
        assert_eq!(Ipv4Net::parse("10.0.0.0/30").unwrap().hosts().count(), 2);
        assert_eq!(p.broadcast().to_string(), "10.134.255.255");
        let eight = Ipv4Net::parse("10.0.0.0/8").unwrap();
        assert!(eight.contains_net(&p));
        assert!(!p.contains_net(&eight));
        assert!(!p.contains_net(&Ipv4Net::parse("10.135.0.0/16").unwrap()));
    }
}
