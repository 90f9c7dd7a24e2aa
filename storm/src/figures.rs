//! The printed figures (one `FIGURE` line each, easy to grep) and the per-node CSV.

use crate::args::{Args, HookMode};
use crate::clients::{Kind, Report, Timeline};
use crate::enroll::Enrolled;
use crate::setup::Rig;
use std::io::Write as _;
use std::path::Path;

/// The value at quantile `q` of `v` (sorted here), None when empty.
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[((s.len() as f64 * q) as usize).min(s.len() - 1)])
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0} ms", v * 1e3))
}

fn secs(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.1} s"))
}

/// Connect-to-up of one node: from its start to Alive with A + PTR.
pub fn connect_to_up(t: &Timeline) -> Option<f64> {
    Some(t.up? - t.start?)
}

fn machine() -> String {
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!("{cores} cores, {mem}, load average now {}", load.join(" "))
}

/// Prints every figure; the exit code: 0 when every goal that is a count held (all up, none
/// lost, no duplicate, none taken down while connected, all Absent, none removed).
pub fn print(a: &Args, rig: &Rig, e: &Enrolled, r: &Report) -> i32 {
    let n = a.nodes as usize;
    let real = r.nodes.iter().filter(|t| t.kind == Kind::OpenVpn).count();
    let storm_at = r
        .nodes
        .iter()
        .filter_map(|t| t.start)
        .fold(f64::INFINITY, f64::min);
    println!();
    println!(
        "==== idhal-storm: {n} nodes ({real} OpenVPN clients, {} hook path), {} idhal serve, state {}, hook mode {}, reconcile every {} s",
        r.nodes.len() - real,
        a.serve,
        rig.state_desc,
        match a.hook_mode {
            HookMode::Sync => "sync",
            HookMode::Deferred => "deferred",
        },
        a.reconcile_every
    );
    enrollment(a, e);
    let up: Vec<&Timeline> = r.nodes.iter().filter(|t| t.up.is_some()).collect();
    let lost = r.nodes.len() - up.len() + e.failed.len();
    println!(
        "FIGURE all up (Alive in OAR, A and PTR in DNS): {}",
        match r.all_up {
            Some(t) => format!("all {} after {t:.1} s", r.nodes.len()),
            None => format!("only {} of {} within the deadline", up.len(), r.nodes.len()),
        }
    );
    for (what, kind) in [
        ("all", None),
        ("OpenVPN clients", Some(Kind::OpenVpn)),
        ("hook path", Some(Kind::Hook)),
    ] {
        let v: Vec<f64> = r
            .nodes
            .iter()
            .filter(|t| kind.is_none_or(|k| t.kind == k))
            .filter_map(connect_to_up)
            .collect();
        if v.is_empty() {
            continue;
        }
        let tunnel: Vec<f64> = r
            .nodes
            .iter()
            .filter(|t| kind.is_none_or(|k| t.kind == k))
            .filter_map(|t| Some(t.tunnel? - t.start?))
            .collect();
        println!(
            "FIGURE connect-to-Alive, {what} ({}): p50 {}, p99 {}, max {}; connect-to-tunnel p50 {}, p99 {}",
            v.len(),
            secs(quantile(&v, 0.5)),
            secs(quantile(&v, 0.99)),
            secs(quantile(&v, 1.0)),
            secs(quantile(&tunnel, 0.5)),
            secs(quantile(&tunnel, 0.99)),
        );
    }
    let restarts: u32 = r.nodes.iter().map(|t| t.restarts).sum();
    let restarted = r.nodes.iter().filter(|t| t.restarts > 0).count();
    println!(
        "FIGURE restarts: {restarts} ({restarted} nodes): real clients that restarted (TLS or push timeout, refusal), hook-path connects refused and tried again"
    );
    let before: Vec<f64> = r
        .probe
        .samples
        .iter()
        .filter(|s| s.0 < storm_at)
        .map(|s| s.1)
        .collect();
    let during: Vec<(f64, f64)> = r
        .probe
        .samples
        .iter()
        .filter(|s| s.0 >= storm_at && s.0 < r.disconnect_start)
        .copied()
        .collect();
    let worst = during
        .iter()
        .copied()
        .fold(None, |m: Option<(f64, f64)>, s| match m {
            Some(m) if m.1 >= s.1 => Some(m),
            _ => Some(s),
        });
    let d: Vec<f64> = during.iter().map(|s| s.1).collect();
    println!(
        "FIGURE longest stall of the OpenVPN server loop (management round trip every 100 ms): {} at {}; during the storm p50 {:.1} ms, p99 {:.1} ms ({} samples); before it p50 {:.1} ms",
        worst.map_or("-".into(), |w| format!("{:.0} ms", w.1)),
        worst.map_or("-".into(), |w| format!("{:.1} s", w.0 - storm_at)),
        quantile(&d, 0.5).unwrap_or(0.0),
        quantile(&d, 0.99).unwrap_or(0.0),
        d.len(),
        quantile(&before, 0.5).unwrap_or(0.0),
    );
    match &r.canary_pings {
        Some(p) => {
            let gaps: Vec<(f64, f64)> = p
                .windows(2)
                .filter(|w| w[1] >= storm_at && w[0] < r.disconnect_start)
                .map(|w| (w[0], w[1] - w[0]))
                .collect();
            let worst = gaps
                .iter()
                .copied()
                .fold((0.0, 0.0), |m, g| if g.1 > m.1 { g } else { m });
            println!(
                "FIGURE longest gap between keepalive pings to a client connected before the storm (the server pings every 10 s when it sent nothing else; the tunnel's start counts as the first): {:.1} s, from {:.1} s; {} pings received during the storm",
                worst.1,
                worst.0 - storm_at,
                gaps.len()
            );
        }
        None => println!("FIGURE keepalive gaps: no canary"),
    }
    if !r.probe.errors.is_empty() {
        println!("  probe errors: {:?}", r.probe.errors);
    }
    let rd: Vec<f64> = r.reconcile.iter().map(|x| x.secs).collect();
    let taken_down: usize = r.reconcile.iter().map(|x| x.taken_down).sum();
    let taken_connected: usize = r.reconcile.iter().map(|x| x.taken_down_connected).sum();
    let again: usize = r.reconcile.iter().map(|x| x.registered_again).sum();
    // Registered again while the nodes were connected (a repair of a missed connect), and
    // during the disconnect (a node listed by a status written before its disconnect).
    let again_connected: usize = r
        .reconcile
        .iter()
        .filter(|x| x.start < r.disconnect_start)
        .map(|x| x.registered_again)
        .sum();
    let failed_runs = r.reconcile.iter().filter(|x| x.code != Some(0)).count();
    println!(
        "FIGURE reconcile: {} runs, each p50 {}, max {}; {again} registered again ({again_connected} before the disconnect began, {} after), {taken_down} taken down, {taken_connected} of them while connected; {failed_runs} runs exited non-zero",
        r.reconcile.len(),
        secs(quantile(&rd, 0.5)),
        secs(quantile(&rd, 1.0)),
        again - again_connected,
    );
    if let Some(last) = r
        .reconcile
        .iter()
        .rev()
        .find(|x| x.start < r.disconnect_start)
    {
        println!("  last run while connected: {}", last.summary);
    }
    let flaps: u32 = r.nodes.iter().map(|t| t.flaps).sum();
    let dup = e.duplicate_ids + e.duplicate_addresses + r.duplicate_resources;
    println!(
        "FIGURE duplicates: {dup} (node ids {}, addresses {}, hosts with two OAR resources {}); address pushed ≠ enrolled: {}",
        e.duplicate_ids, e.duplicate_addresses, r.duplicate_resources, r.client_address_mismatch
    );
    println!("FIGURE lost nodes: {lost} (never Alive with A and PTR, or never enrolled)");
    println!(
        "FIGURE nodes reconcile took down while connected: {taken_connected}; Alive → not Alive while connected (any cause): {flaps}"
    );
    let absent = r.nodes.iter().filter(|t| t.absent.is_some()).count();
    let registered = r.nodes.iter().filter(|t| t.alive.is_some()).count();
    println!(
        "FIGURE disconnect: {}; removed from OAR: {}",
        match r.all_absent {
            Some(t) => format!("all {absent} registered nodes Absent after {t:.1} s"),
            None => format!("{absent} of the {registered} registered Absent within the deadline"),
        },
        r.removed
    );
    let mut rss = String::new();
    for (class, (one, sum)) in &r.rss.classes {
        rss.push_str(&format!(
            "\n  {class}: largest {:.1} MiB, sum at one time {:.1} MiB",
            *one as f64 / 1024.0,
            *sum as f64 / 1024.0
        ));
    }
    for (what, kb) in &r.rss.hwm {
        rss.push_str(&format!("\n  {what}: VmHWM {:.1} MiB", *kb as f64 / 1024.0));
    }
    println!("FIGURE peak RSS (sampled every second):{rss}");
    if !r.sim_failures.is_empty() {
        println!(
            "hook-path refusals (first {}):",
            r.sim_failures.len().min(10)
        );
        for f in r.sim_failures.iter().take(10) {
            println!("  {f}");
        }
    }
    let ok = r.all_up.is_some()
        && lost == 0
        && dup == 0
        && taken_connected == 0
        && r.all_absent.is_some()
        && r.removed == 0;
    i32::from(!ok)
}

/// The machine, the tokens and the enrollment (all that `--enroll-only` prints).
pub fn enrollment(a: &Args, e: &Enrolled) {
    let n = a.nodes as usize;
    println!("machine: {}", machine());
    println!(
        "FIGURE tokens: {n} and the canary's created in {:.1} s ({:.0}/s, `idhal token create`, 4 at a time)",
        e.tokens_secs,
        n as f64 / e.tokens_secs
    );
    let lat: Vec<f64> = e.nodes.iter().map(|n| n.enroll_secs).collect();
    println!(
        "FIGURE enrollment: {} ({n} nodes and the canary) in {:.1} s = {:.0}/s ({} in flight over {} serve: {:?}); latency p50 {}, p99 {}; {} retries, {} failed",
        e.nodes.len() + usize::from(e.canary.is_some()),
        e.wall_secs,
        (e.nodes.len() + usize::from(e.canary.is_some())) as f64 / e.wall_secs,
        a.enroll_concurrency,
        a.serve,
        e.per_serve,
        ms(quantile(&lat, 0.5)),
        ms(quantile(&lat, 0.99)),
        e.retries,
        e.failed.len()
    );
    let dup = e.duplicate_ids + e.duplicate_addresses;
    println!(
        "FIGURE enrollment duplicates: {dup} (node ids {}, addresses {})",
        e.duplicate_ids, e.duplicate_addresses
    );
}

pub fn write_csv(path: &Path, e: &Enrolled, r: &Report) {
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).unwrap_or_else(|err| panic!("{}: {err}", path.display())),
    );
    let o = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.3}"));
    let _ = writeln!(
        f,
        "node,address,host,kind,serve,enroll_start_s,enroll_ms,connect_start_s,tunnel_s,alive_s,dns_s,up_s,connect_to_up_s,restarts,flaps,taken_down,disconnect_s,absent_s"
    );
    for (n, t) in e.nodes.iter().zip(&r.nodes) {
        let _ = writeln!(
            f,
            "{},{},{},{},{},{:.3},{:.1},{},{},{},{},{},{},{},{},{},{},{}",
            n.id,
            n.address,
            n.host,
            match t.kind {
                Kind::OpenVpn => "openvpn",
                Kind::Hook => "hook",
            },
            n.serve,
            n.enroll_start,
            n.enroll_secs * 1e3,
            o(t.start),
            o(t.tunnel),
            o(t.alive),
            o(t.dns),
            o(t.up),
            o(connect_to_up(t)),
            t.restarts,
            t.flaps,
            t.taken_down,
            o(t.down_start),
            o(t.absent),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_unsorted_values() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&v, 0.0), Some(1.0));
        assert_eq!(quantile(&v, 0.5), Some(3.0));
        assert_eq!(quantile(&v, 0.99), Some(5.0));
        assert_eq!(quantile(&v, 1.0), Some(5.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
