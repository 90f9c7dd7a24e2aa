//! The BIRD 2 config text of a VPN server and of a head node, from a checked [`Cluster`]. Only
//! typed values are written into it (addresses, networks, numbers, an interface name); the one
//! free text, the idhal config's path in the header comment, is Debug-quoted so it cannot end
//! the comment.

use super::{BirdError, Cluster};
use crate::names::ServerName;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;

/// Where a rendered config came from, for its header comment.
#[derive(Debug, Clone, Copy)]
pub struct Rendered<'a> {
    /// The idhal config file (`--config`), if any.
    pub config: Option<&'a Path>,
}

/// BGP timers shared by the servers and the heads (R10-findings §2, measured): a lost peer is
/// noticed in 3 s without BFD (0.5 s with it), and a session that failed is retried after
/// 1 s, 5 s at most, instead of BIRD's 60-300 s, so a server back from a restart announces
/// its nodes again within ~5 s.
const TIMERS: &str = "hold time 3; keepalive time 1; error wait time 1, 5;";

fn header(out: &mut String, what: &str, command: &str, cluster: &Cluster<'_>, src: Rendered<'_>) {
    let config = match src.config {
        Some(p) => format!("{:?}", p.display().to_string()),
        None => "(none: idhal's defaults)".into(),
    };
    let _ = writeln!(
        out,
        "# BIRD 2 config for {what}, rendered by `{command}`\n\
         # from the idhal config {config} ([bird], [names] pool {pool}, kernel table {table}).\n\
         # Overwritten at the next render: change the idhal config, not this file.\n\
         # Check: bird -p -c FILE; load: birdc configure (docs/multi-server.md).",
        pool = cluster.pool,
        table = cluster.table,
    );
}

/// Common to servers and heads: the router id, interfaces, the node pool as a prefix set, the
/// kernel main table fed with routes learned over BGP, BFD.
fn common(out: &mut String, cluster: &Cluster<'_>, router_id: Ipv4Addr) {
    let b = cluster.bird;
    let _ = writeln!(
        out,
        "\n\
         router id {router_id};\n\
         \n\
         # Interfaces: `direct` BGP and BFD need {ifname} known.\n\
         protocol device {{ scan time 10; }}\n\
         \n\
         # Only node /32s of [names] pool are announced or accepted: nothing else in the\n\
         # kernel table, and nothing a peer sends, can reach the main table.\n\
         define NODE_POOL = [ {pool}{{32,32}} ];\n\
         \n\
         # Nodes on other servers (learned over BGP) into the kernel's main table, next hop\n\
         # their server's LAN address; several servers announcing a node equally: all paths.\n\
         protocol kernel main_table {{\n\
         \x20 ipv4 {{ import none; export where source = RTS_BGP; }};\n\
         \x20 merge paths yes;\n\
         }}",
        ifname = b.interface,
        pool = cluster.pool,
    );
    if b.bfd {
        let _ = writeln!(
            out,
            "\n\
             # BFD on the LAN: a dead peer's routes go in ~0.5 s (100 ms x 5) instead of the\n\
             # 3 s hold time.\n\
             protocol bfd lan_bfd {{\n\
             \x20 interface \"{ifname}\" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 5; }};\n\
             }}",
            ifname = b.interface,
        );
    }
}

/// The config of VPN server `name`: learns the node /32s idhal writes into the kernel table
/// and announces them to every head with `bgp_local_pref = krt_metric` (the session's start:
/// the newest session of a node wins at the head), and installs the other servers' nodes in
/// its main table.
pub fn render_server(
    cluster: &Cluster<'_>,
    name: &ServerName,
    src: Rendered<'_>,
) -> Result<String, BirdError> {
    let me = cluster.server(name)?;
    let b = cluster.bird;
    let mut out = String::new();
    header(
        &mut out,
        &format!("VPN server {name}"),
        &format!("idhal bird config --name {name}"),
        cluster,
        src,
    );
    common(&mut out, cluster, me);
    let _ = writeln!(
        out,
        "\n\
         # The node /32s idhal writes (`A/32 dev tun0 table {table} proto static metric SINCE`)\n\
         # get their own BIRD table: one BIRD table takes one kernel protocol.\n\
         ipv4 table nodes4;\n\
         protocol kernel nodes {{\n\
         \x20 kernel table {table};\n\
         \x20 learn;          # routes written by idhal, not by BIRD\n\
         \x20 scan time 10;   # netlink reports each change at once; the scan is a safety net\n\
         \x20 # 200 beats BGP's 100: this server keeps its own nodes on its tun even while\n\
         \x20 # another server still announces them (else it could never announce them itself).\n\
         \x20 ipv4 {{ table nodes4; import all; export none; preference 200; }};\n\
         }}\n\
         protocol pipe nodes_pipe {{ table nodes4; peer table master4; import none; export all; }}",
        table = cluster.table,
    );
    for (i, head) in b.heads.iter().enumerate() {
        let bfd = if b.bfd { " bfd yes;" } else { "" };
        let _ = writeln!(
            out,
            "\n\
             # Head {head} (route reflector): this server's nodes out, the other servers' in.\n\
             protocol bgp head{n} {{\n\
             \x20 local {me} as {asn};\n\
             \x20 neighbor {head} as {asn};\n\
             \x20 direct;{bfd}\n\
             \x20 {TIMERS} connect retry time 1;\n\
             \x20 ipv4 {{\n\
             \x20   import where net ~ NODE_POOL;\n\
             \x20   next hop self;\n\
             \x20   gateway direct;\n\
             \x20   # krt_metric = the session's start (unix seconds) idhal wrote: the newest\n\
             \x20   # session wins at the head when a node moved and its old server has not noticed.\n\
             \x20   export filter {{\n\
             \x20     if proto = \"nodes\" && net ~ NODE_POOL then {{ bgp_local_pref = krt_metric; accept; }}\n\
             \x20     reject;\n\
             \x20   }};\n\
             \x20 }};\n\
             }}",
            n = i + 1,
            asn = b.asn,
        );
    }
    Ok(out)
}

/// The config of a head node: a route reflector for each VPN server of `[bird.servers]`, by
/// address (not the whole LAN: any host there could otherwise announce a node's /32 with a
/// higher local_pref and draw its traffic), installing all node /32s in its main table.
pub fn render_head(
    cluster: &Cluster<'_>,
    router_id: Option<Ipv4Addr>,
    src: Rendered<'_>,
) -> Result<String, BirdError> {
    let me = cluster.head(router_id)?;
    let b = cluster.bird;
    if b.servers.iter().next().is_none() {
        return Err(BirdError::NoServers);
    }
    let mut out = String::new();
    let command = match router_id {
        Some(a) => format!("idhal bird config --head --router-id {a}"),
        None => "idhal bird config --head".into(),
    };
    header(&mut out, &format!("head {me}"), &command, cluster, src);
    common(&mut out, cluster, me);
    let bfd = if b.bfd { " bfd yes;" } else { "" };
    let _ = writeln!(
        out,
        "\n\
         # One session per VPN server of [bird.servers], and none for anyone else on the LAN\n\
         # (`birdc show protocols`: srv1, srv2..., each with its server's name as description).\n\
         template bgp vpn_server {{\n\
         \x20 local {me} as {asn};\n\
         \x20 direct; rr client;{bfd}\n\
         \x20 {TIMERS} connect retry time 1;\n\
         \x20 ipv4 {{ import where net ~ NODE_POOL; export all; gateway direct; }};\n\
         }}",
        asn = b.asn,
    );
    for (i, (name, addr)) in b.servers.iter().enumerate() {
        let _ = writeln!(
            out,
            "protocol bgp srv{n} from vpn_server {{ description \"{name}\"; neighbor {addr} as {asn}; }}",
            n = i + 1,
            asn = b.asn,
        );
    }
    Ok(out)
}
