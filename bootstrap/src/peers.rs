//! `idhal-bootstrap peers`, top to bottom: enrollment → trust chain → this node's WireGuard key
//! and endpoints → signed request → verify the list → choose an endpoint per peer → record.
//! Owns `peers/state.lock`, `peers/wg.conf` and `peers/list`; reads `peers/wg.pub` and
//! `peers/endpoints`, which the scriptlet writes (docs/direct-paths.md).
//!
//! Nothing is written unless the list is signed by the enrollment key the signed manifest names
//! and answers this very request: a refusal (even "unknown" or "revoked", which are unsigned
//! bytes too) leaves both files as they were, and the path switch drops every peer once `list`
//! is older than 3 × refresh (fail safe). The private key (`wg.key`) is never read: X25519 is
//! not in the agent.

use crate::config::{Config, Proc};
use crate::error::AgentError;
use crate::log;
use crate::state::{write_atomic, StateDir};
use crate::trust::{self, NodeExchange, Refusals};
use idhal_manifest::peers::{self, endpoint_problem, Net4, Peer, Request, Response, WgKey};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;

/// The scriptlet makes it (0700) with the key pair before it calls `peers`.
pub const DIR: &str = "peers";
/// Not the run's `lock`: the run that started the scriptlet calling us holds that one.
const LOCK: &str = "peers/state.lock";
/// Written by the scriptlet: `wg pubkey`'s output.
pub const WG_PUB: &str = "wg.pub";
/// Written by the scriptlet: one `ADDR:PORT` per line, blank lines ignored; may be empty.
pub const ENDPOINTS: &str = "endpoints";
/// Written by us: one `[Peer]` per peer, no AllowedIPs; the switch applies it with `wg set`
/// (`wg addconf` would empty the AllowedIPs of every peer it names).
pub const WG_CONF: &str = "wg.conf";
/// Written by us, after `wg.conf`, at every verified answer (its mtime is the last
/// verification): the timings, then `peer KEY VPNADDR NODEID` lines.
pub const LIST: &str = "list";
/// Most bytes read of `wg.pub` and `endpoints` (8 IPv6 endpoints take ~400).
const MAX_INPUT: u64 = 4 << 10;
/// Most bytes read of `/proc/net/route` (~8,000 routes) and most connected subnets kept: a
/// node with a full routing table must not cost megabytes and seconds per refresh. A subnet
/// beyond them only loses its preference.
const MAX_ROUTES: u64 = 1 << 20;
const MAX_SUBNETS: usize = 256;
/// How the server refuses (malformed request, bad signature, unknown or revoked node, clock
/// skew, a bad endpoint): exit 5, never retried, nothing written. Any other failed exchange
/// is exit 4.
const REFUSALS: [u16; 6] = [400, 401, 403, 409, 410, 422];
/// Unknown (403) and revoked (410) too: a status is no signature, and acting on it would let
/// anyone on the path empty a node's list. The switch expires the list instead.
static REFUSED: Refusals = Refusals {
    cmd: "peers",
    statuses: &REFUSALS,
    error: AgentError::PeersRefused,
    suffix: "; the peer files are unchanged",
};

/// The path-switch timings a list carries, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub refresh: u32,
    pub keepalive: u32,
    pub fallback: u32,
}

// Not inlined into main, like `enroll`: inlined, it made the agent's code 848 B larger.
#[inline(never)]
pub fn peers(cfg: &Config, proc: &Proc) -> Result<(), AgentError> {
    let state = StateDir::new(&cfg.state_dir);
    if !state.root.is_dir() {
        return Err(trust::no_manifest(cfg, "peers"));
    }
    let x = trust::node_exchange(cfg, &state, "peers", peers::URL_PARAM, peers::PATH)?;
    let NodeExchange {
        node,
        address,
        key: node_key,
        enroll_key,
        fetcher,
    } = &*x;

    let dir = state.path(DIR);
    if !dir.is_dir() {
        return Err(no_key(&dir.join(WG_PUB)));
    }
    let _lock = state.lock(LOCK)?;
    let wg_key: WgKey = {
        let path = dir.join(WG_PUB);
        let text = read_input(&path)?;
        text.strip_suffix('\n')
            .unwrap_or(&text)
            .parse()
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?
    };
    let endpoints = {
        let path = dir.join(ENDPOINTS);
        parse_endpoints(&read_input(&path)?)
            .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?
    };
    let request = Request {
        node: node.as_str().to_owned(),
        time: 0,
        nonce: [0; 16],
        wg_key,
        endpoints: endpoints.clone(),
    };
    // Signing refuses a bad node id or endpoint, the same in every attempt: checked once,
    // before anything is sent.
    request
        .sign(node_key)
        .map_err(|e| AgentError::Config(format!("peers request of node {node}: {e}")))?;
    let (body, digest) = trust::post(
        fetcher,
        peers::CONTENT_TYPE,
        peers::MAX_RESPONSE,
        &REFUSED,
        &mut |time, nonce| {
            Request {
                time,
                nonce,
                ..request.clone()
            }
            .sign(node_key)
            .unwrap_or_default() // Cannot fail: checked above with the same node and endpoints.
        },
    )?;
    let r = Response::verify(&body, enroll_key, &digest)
        .map_err(|e| AgentError::PeersRefused(format!("peer list from {}: {e}", fetcher.base)))?;
    if r.node != node.as_str() {
        return Err(AgentError::PeersRefused(format!(
            "peer list from {}: it is for node {}, not for this node ({node})",
            fetcher.base, r.node
        )));
    }

    let subnets = connected_subnets(&read_prefix(&proc.root.join("net/route"), MAX_ROUTES));
    let mut own: Vec<IpAddr> = endpoints.iter().map(|e| e.ip()).collect();
    own.extend(address.parse::<Ipv4Addr>().ok().map(IpAddr::V4));
    let chosen: Vec<_> = r
        .peers
        .iter()
        .map(|p| (p, choose(&p.endpoints, &subnets, &own, &r.pool)))
        .collect();
    let timings = Timings {
        refresh: r.refresh,
        keepalive: r.keepalive,
        fallback: r.fallback,
    };
    record(&dir, node.as_str(), &timings, &chosen)?;
    log(&format!(
        "peers: {} peers (project {}), refresh {} s",
        r.peers.len(),
        r.project,
        r.refresh
    ));
    Ok(())
}

fn no_key(path: &Path) -> AgentError {
    AgentError::Config(format!(
        "{}: missing: the scriptlet makes the WireGuard key pair first (umask 077; wg genkey | \
         tee wg.key | wg pubkey > wg.pub) and lists this node's endpoints in `endpoints`",
        path.display()
    ))
}

/// A file the scriptlet wrote: whole, at most `MAX_INPUT` bytes, UTF-8.
fn read_input(path: &Path) -> Result<String, AgentError> {
    let bad = |why: String| AgentError::Config(format!("{}: {why}", path.display()));
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(f) => f.take(MAX_INPUT + 1).read_to_end(&mut bytes),
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_key(path)),
        Err(e) => Err(e),
    }
    .map_err(|e| bad(e.to_string()))?;
    if bytes.len() as u64 > MAX_INPUT {
        return Err(bad(format!("larger than {MAX_INPUT} bytes")));
    }
    String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text".into()))
}

/// At most `limit` bytes of a file, cut after its last whole line when that limit was hit;
/// empty when it cannot be read. For the kernel's files: what cannot be read there only loses
/// a preference.
fn read_prefix(path: &Path, limit: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(f) = File::open(path) {
        let _ = f.take(limit).read_to_end(&mut bytes);
    }
    if bytes.len() as u64 == limit {
        let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        bytes.truncate(end);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The `endpoints` file: one `ADDR:PORT` (`[ADDR]:PORT` for IPv6) per line, blank lines
/// ignored, at most `peers::MAX_ENDPOINTS`, each one another host can reach, none twice. The
/// first bad line refuses the whole file.
pub fn parse_endpoints(text: &str) -> Result<Vec<SocketAddr>, String> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |why: String| format!("line {}: {why}", i + 1);
        let e: SocketAddr = line.parse().map_err(|_| {
            let shown: String = line.chars().take(60).collect();
            bad(format!("{shown:?} is not ADDR:PORT"))
        })?;
        if let Some(why) = endpoint_problem(&e, None) {
            return Err(bad(format!("{e}: {why}")));
        }
        if out.contains(&e) {
            return Err(bad(format!("{e} twice")));
        }
        if out.len() == peers::MAX_ENDPOINTS {
            return Err(bad(format!("more than {} endpoints", peers::MAX_ENDPOINTS)));
        }
        out.push(e);
    }
    Ok(out)
}

/// This node's connected IPv4 subnets from `/proc/net/route`: routes without a gateway (no G
/// flag) and with a non-zero, contiguous mask. The kernel prints addresses as the hex of the
/// in-memory (network order) word read natively. Lines that do not parse are no subnet.
pub fn connected_subnets(text: &str) -> Vec<Net4> {
    const RTF_GATEWAY: u32 = 0x2;
    let mut out: Vec<Net4> = Vec::new();
    for line in text.lines() {
        if out.len() == MAX_SUBNETS {
            break;
        }
        let mut fields = line.split_ascii_whitespace();
        let mut hex = |skip: usize| {
            fields
                .nth(skip)
                .filter(|f| f.len() <= 8)
                .and_then(|f| u32::from_str_radix(f, 16).ok())
        };
        let (Some(dest), Some(flags), Some(mask)) = (hex(1), hex(1), hex(3)) else {
            continue;
        };
        let ip = |word: u32| u32::from(Ipv4Addr::from(word.to_ne_bytes()));
        let mask = ip(mask);
        if flags & RTF_GATEWAY != 0 || mask == 0 || mask.leading_ones() != mask.count_ones() {
            continue;
        }
        let net = Net4 {
            addr: Ipv4Addr::from(ip(dest) & mask),
            prefix: mask.leading_ones() as u8,
        };
        if !out.contains(&net) {
            out.push(net);
        }
    }
    out
}

fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) => Some(a),
        IpAddr::V6(a) => a.to_ipv4_mapped(),
    }
}

/// The endpoint this node dials for a peer: the first candidate inside one of its connected
/// subnets, else the first allowed one, else none (the peer then only reaches us). Never one
/// of this node's own addresses (`own`: two NATed VMs share 10.0.2.15), never one
/// `endpoint_problem` refuses with the project's pool (that would be WireGuard over the tunnel).
pub fn choose(
    candidates: &[SocketAddr],
    subnets: &[Net4],
    own: &[IpAddr],
    pool: &Net4,
) -> Option<SocketAddr> {
    let mine = |ip: IpAddr| {
        own.iter()
            .any(|o| *o == ip || v4(*o).is_some_and(|a| v4(ip) == Some(a)))
    };
    let allowed = |e: &&SocketAddr| endpoint_problem(e, Some(pool)).is_none() && !mine(e.ip());
    let local = |e: &&SocketAddr| v4(e.ip()).is_some_and(|a| subnets.iter().any(|n| n.contains(a)));
    let in_subnet = candidates.iter().filter(allowed).find(local);
    in_subnet
        .or_else(|| candidates.iter().find(allowed))
        .copied()
}

/// `list`: exactly the three timing lines, then `peer KEY VPNADDR NODEID` per peer.
pub fn list_text(t: &Timings, peers: &[(&Peer, Option<SocketAddr>)]) -> String {
    let mut s = format!(
        "refresh {}\nkeepalive {}\nfallback {}\n",
        t.refresh, t.keepalive, t.fallback
    );
    for (p, _) in peers {
        s.push_str(&format!("peer {} {} {}\n", p.wg_key, p.address, p.node));
    }
    s
}

/// `wg.conf`, read by the switch and applied with `wg set` (never `wg addconf`, which empties
/// AllowedIPs): a comment naming the node, then one `[Peer]` per peer. No AllowedIPs: the
/// switch gives a peer its /32 while its path lives. No time either: the text changes only
/// when the list does, so the switch re-applies nothing (and resets no roaming) per refresh.
pub fn wg_conf_text(node: &str, keepalive: u32, peers: &[(&Peer, Option<SocketAddr>)]) -> String {
    let mut s = format!("# idhal-bootstrap peers for {node}\n");
    for (p, endpoint) in peers {
        s.push_str(&format!("\n[Peer]\nPublicKey = {}\n", p.wg_key));
        if let Some(e) = endpoint {
            s.push_str(&format!("Endpoint = {e}\n"));
        }
        s.push_str(&format!("PersistentKeepalive = {keepalive}\n"));
    }
    s
}

/// Writes `wg.conf`, then `list` (last: the scriptlet reads it first), each atomically, even
/// when unchanged: `list`'s mtime tells the switch when a list was last verified.
fn record(
    dir: &Path,
    node: &str,
    t: &Timings,
    peers: &[(&Peer, Option<SocketAddr>)],
) -> Result<(), AgentError> {
    let conf = wg_conf_text(node, t.keepalive, peers);
    write_atomic(&dir.join(WG_CONF), conf.as_bytes(), 0o600)?;
    write_atomic(&dir.join(LIST), list_text(t, peers).as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the kernel prints it (x86_64), with a gateway default route, two connected subnets,
    /// the tunnel's pool, and a host route.
    const ROUTE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0202000A\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
eth1\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
tun0\t0000860A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth1\t0000A8C0\t014DA8C0\t0003\t0\t0\t0\t0000FFFF\t0\t0\t0
wg0\t0500860A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
";

    fn net(s: &str) -> Net4 {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn connected_subnets_from_proc_net_route() {
        let want: Vec<Net4> = [
            "10.0.2.0/24",
            "192.168.77.0/24",
            "10.134.0.0/16",
            "10.134.0.5/32",
        ]
        .iter()
        .map(|s| net(s))
        .collect();
        assert_eq!(connected_subnets(ROUTE), want);
        // A route the kernel lists twice (two devices) is one subnet.
        assert_eq!(connected_subnets(&format!("{ROUTE}{ROUTE}")), want);
    }

    #[test]
    fn hostile_route_tables_are_no_subnets() {
        for text in [
            "",
            "\n\n\n",
            "Iface\tDestination\n",
            "garbage",
            "eth0 zzzzzzzz 00000000 0001 0 0 0 00FFFFFF",
            // Fields too long, a missing mask, a zero mask, a mask with holes, a gateway route.
            "eth0 0000000002000A 00000000 0001 0 0 0 00FFFFFF",
            "eth0 0002000A 00000000 0001 0 0 0",
            "eth0 0002000A 00000000 0001 0 0 0 00000000",
            "eth0 0002000A 00000000 0001 0 0 0 FF00FFFF",
            "eth0 0002000A 0202000A 0003 0 0 0 00FFFFFF",
            "\u{0}\u{ff}\t\t\t\t\t\t\t\t",
        ] {
            assert_eq!(connected_subnets(text), [], "{text:?}");
        }
        // Host bits in the destination are cleared, not trusted.
        assert_eq!(
            connected_subnets("eth0 0702000A 00000000 0001 0 0 0 00FFFFFF"),
            [net("10.0.2.0/24")]
        );
        // Huge: read up to the cap, cut after the last whole line, at most MAX_SUBNETS kept.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("route");
        let mut big = String::new();
        for i in 0..40_000u32 {
            let dest = u32::from_ne_bytes(Ipv4Addr::from((10 << 24) | (i << 8)).octets());
            big.push_str(&format!(
                "eth0\t{dest:08X}\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
            ));
        }
        std::fs::write(&path, &big).unwrap();
        let text = read_prefix(&path, MAX_ROUTES);
        assert!(text.len() as u64 <= MAX_ROUTES && text.ends_with('\n'));
        assert!(big.len() as u64 > MAX_ROUTES);
        let subnets = connected_subnets(&text);
        assert_eq!(subnets.len(), MAX_SUBNETS);
        assert_eq!(subnets[0], net("10.0.0.0/24"));
        assert_eq!(read_prefix(&dir.path().join("none"), MAX_ROUTES), "");
    }

    #[test]
    fn endpoints_file() {
        let text = "\n192.168.77.11:51820\n  \n[2001:db8::1]:51820\r\n 10.0.2.15:51820 \n";
        assert_eq!(
            parse_endpoints(text).unwrap(),
            [
                addr("192.168.77.11:51820"),
                addr("[2001:db8::1]:51820"),
                addr("10.0.2.15:51820")
            ]
        );
        assert_eq!(parse_endpoints("").unwrap(), []);
        assert_eq!(parse_endpoints("\n \n").unwrap(), []);
        let eight: String = (1..=8).map(|p| format!("192.168.1.1:{p}\n")).collect();
        assert_eq!(parse_endpoints(&eight).unwrap().len(), 8);
        let long = "9".repeat(3000);
        for (text, want) in [
            ("192.168.1.1\n", "line 1: \"192.168.1.1\" is not ADDR:PORT"),
            ("\n\nfoo bar\n", "line 3: \"foo bar\" is not ADDR:PORT"),
            ("192.168.1.1:0\n", "line 1: 192.168.1.1:0: port 0"),
            ("127.0.0.1:51820", "127.0.0.1:51820: not a unicast address"),
            ("0.0.0.0:51820", "not a unicast address"),
            ("224.0.0.1:51820", "not a unicast address"),
            ("[fe80::1]:51820", "not a unicast address"),
            ("192.168.1.1:70000", "is not ADDR:PORT"),
            ("192.168.001.1:5", "is not ADDR:PORT"),
            ("1.2.3.4:5\n1.2.3.4:5\n", "line 2: 1.2.3.4:5 twice"),
            (
                &format!("{eight}192.168.1.1:9\n"),
                "line 9: more than 8 endpoints",
            ),
            (
                &long,
                &format!("line 1: {:?} is not ADDR:PORT", &long[..60]),
            ),
        ] {
            let err = parse_endpoints(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn scriptlet_files_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(ENDPOINTS);
        let msg = |r: Result<String, AgentError>| match r {
            Err(e @ AgentError::Config(_)) => e.to_string(),
            other => panic!("{other:?}"),
        };
        assert!(msg(read_input(&p)).contains("endpoints: missing: the scriptlet makes"));
        std::fs::write(&p, "\n".repeat(MAX_INPUT as usize)).unwrap();
        assert_eq!(read_input(&p).unwrap().len(), MAX_INPUT as usize);
        std::fs::write(&p, "\n".repeat(MAX_INPUT as usize + 1)).unwrap();
        assert!(msg(read_input(&p)).ends_with("endpoints: larger than 4096 bytes"));
        std::fs::write(&p, [0xff, 0xfe, b'\n']).unwrap();
        assert!(msg(read_input(&p)).ends_with("endpoints: not UTF-8 text"));
        std::fs::create_dir(dir.path().join("d")).unwrap();
        assert!(matches!(
            read_input(&dir.path().join("d")),
            Err(AgentError::Config(_))
        ));
    }

    #[test]
    fn endpoint_choice() {
        let pool = net("10.134.0.0/16");
        let subnets = connected_subnets(ROUTE);
        let own: Vec<IpAddr> = vec![
            "192.168.77.11".parse().unwrap(),
            "10.0.2.15".parse().unwrap(),
            "10.134.0.2".parse().unwrap(),
        ];
        let pick = |c: &[&str]| {
            let c: Vec<SocketAddr> = c.iter().map(|s| addr(s)).collect();
            choose(&c, &subnets, &own, &pool).map(|e| e.to_string())
        };
        let some = |s: &str| Some(s.to_owned());
        // Own subnet first, wherever it is in the list.
        assert_eq!(
            pick(&["203.0.113.7:51820", "192.168.77.12:51820"]),
            some("192.168.77.12:51820")
        );
        // This node's own address is never a peer's (QEMU user-net: every VM is 10.0.2.15).
        assert_eq!(
            pick(&["10.0.2.15:51820", "192.168.77.12:51820"]),
            some("192.168.77.12:51820")
        );
        assert_eq!(pick(&["[::ffff:192.168.77.11]:51820"]), None);
        // The pool is refused even though the tunnel makes it a connected subnet.
        assert_eq!(
            pick(&["10.134.0.9:51820", "203.0.113.7:51820"]),
            some("203.0.113.7:51820")
        );
        // No candidate in a subnet: the first allowed one.
        assert_eq!(
            pick(&["10.0.2.15:1", "[2001:db8::1]:51820", "203.0.113.7:51820"]),
            some("[2001:db8::1]:51820")
        );
        assert_eq!(
            pick(&["[::ffff:192.168.77.12]:51820"]),
            some("[::ffff:192.168.77.12]:51820")
        );
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&["10.0.2.15:51820", "10.134.0.7:51820"]), None);
        // No route table at all: the first allowed candidate.
        let c = [addr("10.0.2.15:51820"), addr("192.168.9.9:51820")];
        assert_eq!(choose(&c, &[], &own, &pool), Some(c[1]));
    }

    fn peer(node: &str, address: &str, key: u8) -> Peer {
        Peer {
            node: node.into(),
            address: address.parse().unwrap(),
            wg_key: WgKey([key; 32]),
            endpoints: vec![],
        }
    }

    #[test]
    fn output_files_exact_text() {
        let (a, b) = (
            peer("client4", "10.134.0.4", 1),
            peer("client5", "10.134.0.5", 2),
        );
        let chosen = [(&a, Some(addr("192.168.77.12:51820"))), (&b, None)];
        let t = Timings {
            refresh: 30,
            keepalive: 1,
            fallback: 3,
        };
        assert_eq!(
            list_text(&t, &chosen),
            format!(
                "refresh 30\nkeepalive 1\nfallback 3\npeer {} 10.134.0.4 client4\npeer {} \
                 10.134.0.5 client5\n",
                a.wg_key, b.wg_key
            )
        );
        assert_eq!(
            wg_conf_text("client3", 1, &chosen),
            format!(
                "# idhal-bootstrap peers for client3\n\n[Peer]\n\
                 PublicKey = {}\nEndpoint = 192.168.77.12:51820\nPersistentKeepalive = 1\n\n\
                 [Peer]\nPublicKey = {}\nPersistentKeepalive = 1\n",
                a.wg_key, b.wg_key
            )
        );
        assert_eq!(
            a.wg_key.to_string(),
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
        );
    }

    /// Every verified answer rewrites both files, unchanged or not: `list`'s mtime is when a
    /// list was last verified (the switch expires an old one), and `wg.conf`'s text is the same.
    #[test]
    fn record_rewrites_list_and_keeps_wg_conf_text() {
        let dir = tempfile::tempdir().unwrap();
        let a = peer("client4", "10.134.0.4", 1);
        let t = Timings {
            refresh: 30,
            keepalive: 2,
            fallback: 6,
        };
        record(dir.path(), "client3", &t, &[(&a, None)]).unwrap();
        let list = std::fs::read_to_string(dir.path().join(LIST)).unwrap();
        let conf = std::fs::read_to_string(dir.path().join(WG_CONF)).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(dir.path().join(LIST))
            .unwrap()
            .set_modified(old)
            .unwrap();
        record(dir.path(), "client3", &t, &[(&a, None)]).unwrap();
        let meta = std::fs::metadata(dir.path().join(LIST)).unwrap();
        assert!(meta.modified().unwrap() > old, "list not rewritten");
        assert_eq!(
            std::fs::read_to_string(dir.path().join(LIST)).unwrap(),
            list
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join(WG_CONF)).unwrap(),
            conf
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [LIST, WG_CONF], "temp files left behind");
    }

    /// The answer names the request by the digest `trust::post` computes for every exchange
    /// (enrollment's): all are SHA-256 of the whole encoded request.
    #[test]
    fn the_request_digest_is_the_one_the_server_computes() {
        let kp =
            idhal_manifest::enroll::KeyPair::from_seed(idhal_manifest::enroll::Seed::new([7; 32]));
        let enc = Request {
            node: "client3".into(),
            time: 1,
            nonce: [0; 16],
            wg_key: WgKey([9; 32]),
            endpoints: vec![addr("192.168.77.11:51820")],
        }
        .sign(&kp)
        .unwrap();
        let digest = idhal_manifest::enroll::request_digest(&enc);
        assert_eq!(Request::parse(&enc).unwrap().digest, digest);
        assert_eq!(idhal_manifest::peers::request_digest(&enc), digest);
    }
}
