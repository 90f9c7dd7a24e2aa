//! OAR's side of `Scheduler::nodes_up`: a batch of connected nodes registered with as few OAR
//! processes as OAR allows, each node's verdict still taken from its own read-back.

use super::{
    check, node_properties, parse_oarnodes, property_args, props_match, update_change, Change,
    Check, Oar, OarError, Resource, ASK_AGAIN, FIRST_POLL, LAST_POLL,
};
use crate::names::HostName;
use crate::process::Deadline;
use crate::scheduler::{NodeUp, UpOutcome};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};

/// Hosts per `oarnodes --sql "network_address IN (…)"` and per `oarnodesetting -s -h … -h …`:
/// keeps each command line and OAR's SQL statement short (200 names are ~6 KB).
const HOSTS_PER_CALL: usize = 200;

/// Per-host `oarnodesetting` calls of this process, across all batches (the hook worker runs
/// several batches at once): how many run (at most `[oar] parallel_calls`), and who waits, in
/// the order they go: the batch that reached its calls first, then its calls in order. A batch
/// that started earlier finishes first instead of every batch sharing the slots and all of them
/// finishing late.
struct Calls {
    running: usize,
    waiting: BTreeSet<(u64, usize)>,
}

static CALLS: (Mutex<Calls>, Condvar) = (
    Mutex::new(Calls {
        running: 0,
        waiting: BTreeSet::new(),
    }),
    Condvar::new(),
);

/// Numbers the batches as they reach their per-host calls.
static BATCHES: AtomicU64 = AtomicU64::new(0);

/// One of the `limit` slots, held for one call.
struct Slot;

impl Slot {
    fn take(limit: usize, turn: (u64, usize)) -> Slot {
        let (m, c) = &CALLS;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        g.waiting.insert(turn);
        while g.running >= limit.max(1) || g.waiting.first() != Some(&turn) {
            g = c.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        g.waiting.remove(&turn);
        g.running += 1;
        // The next in line may go too if a slot is still free.
        c.notify_all();
        Slot
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let (m, c) = &CALLS;
        m.lock().unwrap_or_else(|p| p.into_inner()).running -= 1;
        c.notify_all();
    }
}

/// `network_address IN ('h1','h2',…)`. Safe to paste into OAR's SQL: a `HostName` can only be
/// made by parsing, and its labels are [a-z0-9-] joined by dots (no quote, space or `\`).
fn in_list(hosts: &[&HostName]) -> String {
    let quoted: Vec<String> = hosts.iter().map(|h| format!("'{h}'")).collect();
    format!("network_address IN ({})", quoted.join(","))
}

/// `f` over `items`, at most `limit` at a time in this whole process; results in the items'
/// order.
fn parallel<T: Sync, R: Send>(limit: usize, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let batch = BATCHES.fetch_add(1, Ordering::Relaxed);
    let out: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..limit.max(1).min(items.len()) {
            s.spawn(|| loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(k) else { break };
                let _slot = Slot::take(limit, (batch, k));
                let r = f(item);
                *out[k].lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            });
        }
    });
    out.into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|p| p.into_inner())
                .expect("every item ran")
        })
        .collect()
}

/// The batch's verdicts so far: `None` while a node is still pending.
struct Verdicts(Vec<Option<Result<UpOutcome, OarError>>>);

impl Verdicts {
    fn pending(&self) -> Vec<usize> {
        (0..self.0.len()).filter(|&i| self.0[i].is_none()).collect()
    }

    fn set(&mut self, i: usize, r: Result<UpOutcome, OarError>) {
        self.0[i] = Some(r);
    }

    /// A step every pending node shared failed: each gets it as its own error.
    fn fail_pending(&mut self, ups: &[NodeUp], step: &'static str, e: &OarError) {
        for i in self.pending() {
            self.set(
                i,
                Err(OarError::BatchFailed {
                    host: ups[i].host.to_string(),
                    step,
                    cause: e.to_string(),
                }),
            );
        }
    }
}

impl Oar {
    /// The resources of `hosts` by network_address: one `oarnodes` per `HOSTS_PER_CALL` hosts.
    fn resources_of(
        &self,
        hosts: &[&HostName],
        deadline: Deadline,
    ) -> Result<BTreeMap<String, Vec<Resource>>, OarError> {
        let mut by_host: BTreeMap<String, Vec<Resource>> = BTreeMap::new();
        for chunk in hosts.chunks(HOSTS_PER_CALL) {
            let out = self.run(
                &self.oarnodes,
                &["-J".into(), "--sql".into(), in_list(chunk)],
                deadline,
            )?;
            for r in parse_oarnodes(&out.stdout, "a batch of hosts")? {
                if let Some(h) = r.props.get("network_address").cloned() {
                    by_host.entry(h).or_default().push(r);
                }
            }
        }
        Ok(by_host)
    }

    /// `Scheduler::nodes_up` for OAR:
    /// 1. one `oarnodes -J --sql "network_address IN (…)"` for the whole batch;
    /// 2. a new host: `oarnodesetting -a -h H -p …` (one each: `-a` is per host anyway);
    /// 3. a host whose properties differ: `-h H -p …`, with `-n -s Alive` in the same call when
    ///    it is not Alive (one host per call: `-p` gives every host of a call the same value);
    /// 4. hosts whose properties are right but are not Alive: one `-n -s Alive -h h1 -h h2 …`;
    /// 5. one read-back of all pending hosts per poll round, until each is Alive with its
    ///    properties or `state_confirm` passes: each node's verdict comes from it.
    pub(super) fn ups(
        &self,
        ups: &[NodeUp],
        deadline: Deadline,
    ) -> Vec<Result<UpOutcome, OarError>> {
        let mut v = Verdicts(ups.iter().map(|_| None).collect());
        // One entry per host: the caller holds each node's lock, so a second entry for one
        // host is a caller's mistake, refused rather than guessed at.
        let mut seen = BTreeSet::new();
        for (i, up) in ups.iter().enumerate() {
            if !seen.insert(up.host.to_string()) {
                v.set(
                    i,
                    Err(OarError::TwiceInBatch {
                        host: up.host.to_string(),
                    }),
                );
            }
        }
        if let Err(e) = self.ensure_properties(deadline, false) {
            v.fail_pending(ups, "creating idhal's property columns", &e);
        }
        let todo = v.pending();
        let hosts: Vec<&HostName> = todo.iter().map(|&i| &ups[i].host).collect();
        let existing = if todo.is_empty() {
            BTreeMap::new()
        } else {
            match self.resources_of(&hosts, deadline) {
                Ok(found) => found,
                Err(e) => {
                    v.fail_pending(ups, "reading the hosts", &e);
                    BTreeMap::new()
                }
            }
        };
        let mut created = vec![false; ups.len()];
        let mut per_host = Vec::new();
        let mut state_only = Vec::new();
        for i in v.pending() {
            let props = node_properties(&ups[i]);
            match existing.get(&ups[i].host.to_string()) {
                None => {
                    created[i] = true;
                    per_host.push((i, Change::Create));
                }
                Some(found) => match (props_match(found, &props).is_ok(), update_change(found)) {
                    (true, Change::Properties) => {}
                    (true, _) => state_only.push(i),
                    (false, change) => per_host.push((i, change)),
                },
            }
        }
        let calls = parallel(self.parallel_calls, &per_host, |&(i, change)| {
            let args = property_args(&ups[i].host, change, &node_properties(&ups[i]));
            self.run(&self.oarnodesetting, &args, deadline)
        });
        for (&(i, _), r) in per_host.iter().zip(calls) {
            if let Err(e) = r {
                v.set(i, Err(e));
            }
        }
        for chunk in state_only.chunks(HOSTS_PER_CALL) {
            let mut args: Vec<String> = vec!["-n".into(), "-s".into(), "Alive".into()];
            for &i in chunk {
                args.extend(["-h".to_string(), ups[i].host.to_string()]);
            }
            if self.run(&self.oarnodesetting, &args, deadline).is_err() {
                // One missing host fails the call (exit 4) after setting the others: each
                // host alone, so each gets its own verdict.
                for &i in chunk {
                    if let Err(e) = self.set_state(&ups[i].host, "Alive", deadline) {
                        v.set(i, Err(e));
                    }
                }
            }
        }
        self.confirm_batch(ups, &mut v, &created, deadline);
        v.0.into_iter()
            .map(|r| r.expect("every node has a verdict"))
            .collect()
    }

    /// Reads the pending hosts back, all in one call per round, until each is Alive with its
    /// properties. A host whose properties did not stick is retried once, as `up` does.
    fn confirm_batch(
        &self,
        ups: &[NodeUp],
        v: &mut Verdicts,
        created: &[bool],
        deadline: Deadline,
    ) {
        // The changes are made: confirming them gets at least one read and the confirm time
        // even when the budget ran out meanwhile (a storm's queue). Giving up here would
        // refuse nodes OAR now holds Alive, and their retries would do it all again.
        let deadline = Deadline::after(
            deadline
                .remaining()
                .max(self.state_confirm + self.command_timeout),
        );
        let limit = deadline.cap(self.state_confirm);
        let until = Deadline::after(limit);
        let mut pause = FIRST_POLL;
        let mut retried = vec![false; ups.len()];
        let mut asked = std::time::Instant::now();
        loop {
            let pending = v.pending();
            if pending.is_empty() {
                return;
            }
            let hosts: Vec<&HostName> = pending.iter().map(|&i| &ups[i].host).collect();
            let found = match self.resources_of(&hosts, deadline) {
                Ok(found) => found,
                Err(e) => return v.fail_pending(ups, "reading the hosts back", &e),
            };
            let mut retry = Vec::new();
            let mut waiting = Vec::new();
            let mut lost_hosts = Vec::new();
            for &i in &pending {
                let rs = found
                    .get(&ups[i].host.to_string())
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                match check(&ups[i].host, rs, "Alive", &node_properties(&ups[i])) {
                    Check::Done => v.set(
                        i,
                        Ok(UpOutcome {
                            created: created[i],
                            resource_ids: rs.iter().map(|r| r.id).collect(),
                        }),
                    ),
                    Check::Failed(OarError::PropertiesRejected { .. }) if !retried[i] => {
                        retry.push((i, update_change(rs)));
                    }
                    Check::Failed(e) => v.set(i, Err(e)),
                    Check::Waiting { seen, lost } => {
                        if lost {
                            lost_hosts.push(i);
                        }
                        waiting.push((i, seen));
                    }
                }
            }
            if !retry.is_empty() {
                // A column vanished or the marker lies: look again, create, retry once.
                match self.ensure_properties(deadline, true) {
                    Err(e) => {
                        for &(i, _) in &retry {
                            v.set(
                                i,
                                Err(OarError::BatchFailed {
                                    host: ups[i].host.to_string(),
                                    step: "re-creating idhal's property columns",
                                    cause: e.to_string(),
                                }),
                            );
                        }
                    }
                    Ok(()) => {
                        let calls = parallel(self.parallel_calls, &retry, |&(i, change)| {
                            let props = node_properties(&ups[i]);
                            self.set_properties(&ups[i].host, change, &props, deadline)
                        });
                        for (&(i, _), r) in retry.iter().zip(calls) {
                            retried[i] = true;
                            if let Err(e) = r {
                                v.set(i, Err(e));
                            }
                        }
                    }
                }
                continue;
            }
            if !lost_hosts.is_empty() && asked.elapsed() >= ASK_AGAIN {
                // Requests NodeChangeState dropped (see `Check`): asked again, together.
                for chunk in lost_hosts.chunks(HOSTS_PER_CALL) {
                    let mut args: Vec<String> = vec!["-n".into(), "-s".into(), "Alive".into()];
                    for &i in chunk {
                        args.extend(["-h".to_string(), ups[i].host.to_string()]);
                    }
                    if let Err(e) = self.run(&self.oarnodesetting, &args, deadline) {
                        return v.fail_pending(ups, "asking OAR again for Alive", &e);
                    }
                }
                asked = std::time::Instant::now();
            }
            if until.remaining() <= pause {
                for (i, seen) in waiting {
                    v.set(
                        i,
                        Err(OarError::NotApplied {
                            host: ups[i].host.to_string(),
                            wanted: "Alive",
                            seen,
                            after: limit,
                        }),
                    );
                }
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(LAST_POLL);
        }
    }
}

#[cfg(test)]
mod tests;
