//! The kernel routing table idhal writes connected nodes' /32s into (`[routing] table`), for
//! BIRD to export to the other servers and the head: `ip` with argv only, every call timed.
//!
//! A node's route is `A/32 dev DEV table T proto static metric S`, S = its session's start:
//! BIRD turns the metric into BGP local_pref, so the newest session wins at the head, and a
//! session ending deletes only its own route (the metric is part of the kernel's route key).

use crate::names::IfName;
use crate::process::{run_with, Finished, RunError};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{doing}")]
    Run {
        doing: String,
        #[source]
        source: RunError,
    },
    #[error("{doing}: {ip} said: {said}")]
    Refused {
        doing: String,
        ip: PathBuf,
        said: String,
    },
    #[error("{doing}: {ip} printed more than {limit} bytes ([routing] max_output_bytes)")]
    TooLarge {
        doing: String,
        ip: PathBuf,
        limit: u64,
    },
    #[error("{doing}: {ip} printed no route list idhal can read: {why}")]
    Unreadable {
        doing: String,
        ip: PathBuf,
        why: String,
    },
    /// The whole batch a route was part of failed.
    #[error("{doing}: {why}")]
    Batch { doing: String, why: String },
    #[error("session start {since} does not fit a route metric (u32)")]
    Metric { since: u64 },
}

/// A kernel routing table of idhal's own: 1-252 or 256-2^31-1. 0 (unspecified) and 253-255
/// (default, main, local) are refused: idhal deletes every /32 in its table it did not write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "u32")]
pub struct TableId(u32);

impl TryFrom<u32> for TableId {
    type Error = String;
    fn try_from(n: u32) -> Result<Self, String> {
        let taken = match n {
            0 => Some("0 (unspecified)"),
            253 => Some("253 (the kernel's default table)"),
            254 => Some("254 (the kernel's main table)"),
            255 => Some("255 (the kernel's local table)"),
            _ => None,
        };
        if let Some(what) = taken {
            return Err(format!("[routing] table = {what} is refused: idhal deletes every /32 in its table that no connected node holds, so it needs a table of its own (1-252 or 256-2147483647)"));
        }
        if n > i32::MAX as u32 {
            return Err(format!(
                "[routing] table = {n} is over 2147483647, the largest table ip(8) takes"
            ));
        }
        Ok(Self(n))
    }
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One node route: `addr/32 dev DEV metric METRIC` in idhal's table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub addr: Ipv4Addr,
    pub dev: IfName,
    pub metric: u32,
}

impl Route {
    /// The route a session writes: its metric is the session's start.
    pub fn of_session(addr: Ipv4Addr, dev: &IfName, since: u64) -> Result<Self, RoutingError> {
        Ok(Self {
            addr,
            dev: dev.clone(),
            metric: u32::try_from(since).map_err(|_| RoutingError::Metric { since })?,
        })
    }
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/32 dev {} metric {}",
            self.addr, self.dev, self.metric
        )
    }
}

/// What a withdrawal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Withdrawn {
    Removed,
    /// No such route (a newer session replaced it, or the device went and took it along).
    AlreadyGone,
}

/// The changes that make the table what it should be.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub add: Vec<Route>,
    pub del: Vec<Route>,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.del.is_empty()
    }
}

/// What one `apply` batch did; `failed` are the changes `ip` refused, with its reason.
#[derive(Debug, Default)]
pub struct Applied {
    pub added: usize,
    pub deleted: usize,
    pub failed: Vec<(Change, String)>,
}

/// One line of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Add(Route),
    Del(Route),
}

/// The table and the `ip` that writes it, from `[routing]`.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub table: TableId,
    pub ip: PathBuf,
    pub max_output: u64,
}

impl RouteTable {
    pub fn new(table: TableId, ip: &Path, max_output: u64) -> Self {
        Self {
            table,
            ip: ip.to_owned(),
            max_output,
        }
    }

    /// Writes each session's route, replacing any route its address has in the table (another
    /// metric, another device), in ONE `ip -force -batch -`: per route a `del` (which may find
    /// nothing) then an `add`. One result per route, in order.
    pub fn announce_many(
        &self,
        routes: &[Route],
        timeout: Duration,
    ) -> Vec<Result<(), RoutingError>> {
        if routes.is_empty() {
            return Vec::new();
        }
        let mut batch = String::new();
        for r in routes {
            batch.push_str(&format!("route del {}/32 table {}\n", r.addr, self.table));
            batch.push_str(&self.add_line(r));
        }
        let doing = |r: &Route| format!("writing route {r} in table {}", self.table);
        let failed = match self.batch(batch, timeout) {
            Ok(failed) => failed,
            Err(e) => {
                let why = crate::report::one_line(&e);
                return routes
                    .iter()
                    .map(|r| {
                        Err(RoutingError::Batch {
                            doing: doing(r),
                            why: why.clone(),
                        })
                    })
                    .collect();
            }
        };
        routes
            .iter()
            .enumerate()
            .map(|(i, r)| match failed.get(&(2 * i + 2)) {
                None => Ok(()),
                Some(said) => Err(RoutingError::Refused {
                    doing: doing(r),
                    ip: self.ip.clone(),
                    said: said.clone(),
                }),
            })
            .collect()
    }

    pub fn announce(&self, route: &Route, timeout: Duration) -> Result<(), RoutingError> {
        self.announce_many(std::slice::from_ref(route), timeout)
            .pop()
            .expect("one result")
    }

    /// Deletes exactly this route: a newer session's route for the same address has another
    /// metric and stays.
    pub fn withdraw(&self, route: &Route, timeout: Duration) -> Result<Withdrawn, RoutingError> {
        let doing = format!("deleting route {route} from table {}", self.table);
        let mut cmd = Command::new(&self.ip);
        cmd.args(["route", "del"])
            .arg(format!("{}/32", route.addr))
            .args(["dev", route.dev.as_str()])
            .args(["table", &self.table.to_string()])
            .args(["metric", &route.metric.to_string()]);
        let f = self.run(&mut cmd, None, timeout, &doing)?;
        if f.success() {
            return Ok(Withdrawn::Removed);
        }
        if gone(&f.stderr) {
            return Ok(Withdrawn::AlreadyGone);
        }
        Err(RoutingError::Refused {
            doing,
            ip: self.ip.clone(),
            said: f.last_line().to_owned(),
        })
    }

    /// The /32 routes in the table (other routes are not idhal's business and are left out).
    pub fn list(&self, timeout: Duration) -> Result<Vec<Route>, RoutingError> {
        let doing = format!("listing table {}", self.table);
        let mut cmd = Command::new(&self.ip);
        cmd.args(["-j", "route", "show", "table", &self.table.to_string()]);
        let f = self.run(&mut cmd, None, timeout, &doing)?;
        if !f.success() {
            // A table nothing was ever written to does not exist yet.
            if f.stderr.contains("FIB table does not exist") {
                return Ok(Vec::new());
            }
            return Err(RoutingError::Refused {
                doing,
                ip: self.ip.clone(),
                said: f.last_line().to_owned(),
            });
        }
        parse_list(&f.stdout).map_err(|why| RoutingError::Unreadable {
            doing,
            ip: self.ip.clone(),
            why,
        })
    }

    /// Applies `changes` in ONE `ip -force -batch -`: the deletions first, then the additions.
    pub fn apply(&self, changes: &Changes, timeout: Duration) -> Result<Applied, RoutingError> {
        if changes.is_empty() {
            return Ok(Applied::default());
        }
        let lines: Vec<Change> = (changes.del.iter().cloned().map(Change::Del))
            .chain(changes.add.iter().cloned().map(Change::Add))
            .collect();
        let batch = lines
            .iter()
            .map(|c| match c {
                Change::Del(r) => format!(
                    "route del {}/32 dev {} table {} metric {}\n",
                    r.addr, r.dev, self.table, r.metric
                ),
                Change::Add(r) => self.add_line(r),
            })
            .collect();
        let failed = self.batch(batch, timeout)?;
        let mut applied = Applied::default();
        for (n, c) in lines.into_iter().enumerate() {
            match (failed.get(&(n + 1)), &c) {
                // A route that was gone already is what a deletion wants.
                (Some(said), Change::Del(_)) if gone(said) => applied.deleted += 1,
                (Some(said), _) => applied.failed.push((c, said.clone())),
                (None, Change::Add(_)) => applied.added += 1,
                (None, Change::Del(_)) => applied.deleted += 1,
            }
        }
        Ok(applied)
    }

    /// Reads the table and makes it `wanted` (see `plan`) in one batch.
    pub fn sync(
        &self,
        wanted: &[Route],
        keep: &Keep,
        timeout: Duration,
    ) -> Result<(Changes, Applied), RoutingError> {
        let deadline = crate::process::Deadline::after(timeout);
        let changes = plan(&self.list(timeout)?, wanted, keep);
        let applied = self.apply(&changes, deadline.remaining())?;
        Ok((changes, applied))
    }

    fn add_line(&self, r: &Route) -> String {
        format!(
            "route add {}/32 dev {} table {} proto static metric {}\n",
            r.addr, r.dev, self.table, r.metric
        )
    }

    /// Runs `ip -force -batch -` with `batch` on stdin: the lines `ip` refused (numbered from
    /// 1), each with what it said. `-force` goes on past a failed line, so a `del` that finds
    /// nothing never stops the `add` after it.
    fn batch(
        &self,
        batch: String,
        timeout: Duration,
    ) -> Result<BTreeMap<usize, String>, RoutingError> {
        let doing = format!("writing table {}", self.table);
        let mut cmd = Command::new(&self.ip);
        cmd.args(["-force", "-batch", "-"]);
        let f = self.run(&mut cmd, Some(batch.into_bytes()), timeout, &doing)?;
        let failed = failed_lines(&f.stderr);
        if !f.success() && failed.is_empty() {
            return Err(RoutingError::Refused {
                doing,
                ip: self.ip.clone(),
                said: f.last_line().to_owned(),
            });
        }
        Ok(failed)
    }

    fn run(
        &self,
        cmd: &mut Command,
        stdin: Option<Vec<u8>>,
        timeout: Duration,
        doing: &str,
    ) -> Result<Finished, RoutingError> {
        let f = run_with(cmd.env_clear(), timeout, stdin, self.max_output).map_err(|source| {
            RoutingError::Run {
                doing: doing.to_owned(),
                source,
            }
        })?;
        if f.overflow {
            return Err(RoutingError::TooLarge {
                doing: doing.to_owned(),
                ip: self.ip.clone(),
                limit: self.max_output,
            });
        }
        Ok(f)
    }
}

/// What `ip` says when the route to delete is not there: no such route, its table was never
/// made, or its device went (and the kernel deleted the device's routes with it).
fn gone(said: &str) -> bool {
    said.contains("No such process")
        || said.contains("FIB table does not exist")
        || said.contains("Cannot find device")
}

/// `ip -force -batch`'s failures: each failing line prints its error, then `Command failed
/// -:N`.
fn failed_lines(stderr: &str) -> BTreeMap<usize, String> {
    let mut failed = BTreeMap::new();
    let mut said: Vec<&str> = Vec::new();
    for line in stderr.lines() {
        match line
            .strip_prefix("Command failed -:")
            .and_then(|n| n.trim().parse::<usize>().ok())
        {
            Some(n) => {
                let why = if said.is_empty() {
                    "(no reason given)".to_owned()
                } else {
                    said.join("; ")
                };
                failed.insert(n, why);
                said.clear();
            }
            None if !line.trim().is_empty() => said.push(line.trim()),
            None => {}
        }
    }
    failed
}

#[derive(serde::Deserialize)]
struct JsonRoute {
    dst: String,
    dev: Option<String>,
    metric: Option<u32>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// `ip -j route show`'s host routes (`dst` without a prefix length) with a device.
fn parse_list(json: &str) -> Result<Vec<Route>, String> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let all: Vec<JsonRoute> = serde_json::from_str(json).map_err(|e| e.to_string())?;
    Ok(all
        .into_iter()
        .filter(|r| r.kind.as_deref().is_none_or(|k| k == "unicast"))
        .filter_map(|r| {
            Some(Route {
                addr: r.dst.parse().ok()?,
                dev: IfName::parse(r.dev.as_deref()?).ok()?,
                metric: r.metric.unwrap_or(0),
            })
        })
        .collect())
}

/// Routes that no wanted route replaces and that stay anyway.
#[derive(Debug, Default)]
pub struct Keep {
    /// A route whose metric (its session's start) is this or later: its session started after
    /// what `wanted` was read from (a status file) and may simply not be listed yet.
    pub from_metric: u32,
    /// Addresses the status lists on a line that could not be used (a client there is
    /// connected, whatever its line says): its route is not taken away.
    pub listed: BTreeSet<Ipv4Addr>,
}

/// The changes that make `current` equal to `wanted` (one route per address): a missing route
/// is added, a route with another metric or device is replaced, a route no one wants goes,
/// unless `keep` keeps it. A route newer than the wanted one stays as it is (its session
/// started after the status was written).
pub fn plan(current: &[Route], wanted: &[Route], keep: &Keep) -> Changes {
    let want: BTreeMap<Ipv4Addr, &Route> = wanted.iter().map(|r| (r.addr, r)).collect();
    let mut by_addr: BTreeMap<Ipv4Addr, Vec<&Route>> = BTreeMap::new();
    for r in current {
        by_addr.entry(r.addr).or_default().push(r);
    }
    let mut changes = Changes::default();
    let mut seen = BTreeSet::new();
    for (addr, have) in &by_addr {
        seen.insert(*addr);
        match want.get(addr) {
            Some(&w) => {
                // The wanted route, or a newer session's, stays; the others go.
                let newest = *have.iter().max_by_key(|r| r.metric).expect("one");
                let keep = if have.contains(&w) {
                    Some(w)
                } else {
                    Some(newest).filter(|n| n.metric > w.metric)
                };
                changes.del.extend(
                    have.iter()
                        .filter(|&&r| Some(r) != keep)
                        .map(|&r| r.clone()),
                );
                if keep.is_none() {
                    changes.add.push(w.clone());
                }
            }
            None if keep.listed.contains(addr) => {}
            None => changes.del.extend(
                have.iter()
                    .filter(|r| r.metric < keep.from_metric)
                    .map(|r| (*r).clone()),
            ),
        }
    }
    for (addr, w) in &want {
        if !seen.contains(addr) {
            changes.add.push((*w).clone());
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(addr: &str, dev: &str, metric: u32) -> Route {
        Route {
            addr: addr.parse().unwrap(),
            dev: IfName::parse(dev).unwrap(),
            metric,
        }
    }

    #[test]
    fn kernel_tables_are_refused() {
        for n in [0, 253, 254, 255, 1 << 31, u32::MAX] {
            TableId::try_from(n).unwrap_err();
        }
        for n in [1, 100, 252, 256, i32::MAX as u32] {
            TableId::try_from(n).unwrap();
        }
    }

    #[test]
    fn batch_failures_are_found_by_line() {
        let f = failed_lines(
            "Error: FIB table does not exist.\nCommand failed -:1\nCannot find device \"x\"\nCommand failed -:4\n",
        );
        assert_eq!(f.len(), 2);
        assert_eq!(f[&1], "Error: FIB table does not exist.");
        assert_eq!(f[&4], "Cannot find device \"x\"");
    }

    #[test]
    fn listing_keeps_host_routes_only() {
        let json = r#"[{"dst":"10.8.0.5","dev":"tun0","protocol":"static","scope":"link","metric":1000,"flags":[]},
            {"dst":"10.8.0.0/16","dev":"tun0","flags":[]},
            {"type":"broadcast","dst":"10.8.0.9","dev":"tun0","flags":[]},
            {"dst":"default","gateway":"1.2.3.4","dev":"eth0","flags":[]},
            {"dst":"10.8.0.6","dev":"tun1","flags":[]}]"#;
        assert_eq!(
            parse_list(json).unwrap(),
            [r("10.8.0.5", "tun0", 1000), r("10.8.0.6", "tun1", 0)]
        );
        parse_list("[{").unwrap_err();
        assert_eq!(parse_list("").unwrap(), []);
    }

    #[test]
    fn plan_repairs_and_spares_young_routes() {
        let current = [
            r("10.8.0.2", "tun0", 100), // right
            r("10.8.0.3", "tun0", 50),  // older than wanted: replaced
            r("10.8.0.4", "tun0", 300), // newer than wanted: stays
            r("10.8.0.5", "tun0", 10),  // nobody's: goes
            r("10.8.0.6", "tun0", 900), // nobody's but young: stays
            r("10.8.0.7", "tun0", 70),  // right, with a stale twin
            r("10.8.0.7", "tun0", 60),
            r("10.8.0.8", "tun1", 80), // wrong device: replaced
        ];
        let wanted = [
            r("10.8.0.2", "tun0", 100),
            r("10.8.0.3", "tun0", 200),
            r("10.8.0.4", "tun0", 200),
            r("10.8.0.7", "tun0", 70),
            r("10.8.0.8", "tun0", 80),
            r("10.8.0.9", "tun0", 80), // missing: added
        ];
        let keep = |from_metric| Keep {
            from_metric,
            listed: BTreeSet::new(),
        };
        let c = plan(&current, &wanted, &keep(800));
        assert_eq!(
            c.del,
            [
                r("10.8.0.3", "tun0", 50),
                r("10.8.0.5", "tun0", 10),
                r("10.8.0.7", "tun0", 60),
                r("10.8.0.8", "tun1", 80)
            ]
        );
        assert_eq!(
            c.add,
            [
                r("10.8.0.3", "tun0", 200),
                r("10.8.0.8", "tun0", 80),
                r("10.8.0.9", "tun0", 80)
            ]
        );
        assert!(plan(&wanted, &wanted, &keep(0)).is_empty());
        // An address the status lists on a line that did not validate keeps its route.
        let listed = Keep {
            from_metric: 800,
            listed: ["10.8.0.5".parse().unwrap()].into(),
        };
        let c = plan(&current, &wanted, &listed);
        assert!(!c.del.contains(&r("10.8.0.5", "tun0", 10)), "{c:?}");
    }
}
