//! OAR's side of `Scheduler::nodes_up` and `nodes_down`: a batch of nodes registered (or taken
//! down) with as few OAR processes as OAR allows, each node's verdict still taken from its own
//! read-back.

use super::{
    check, node_properties, parse_oarnodes, property_args, props_match, registered, update_change,
    Change, Check, Oar, OarError, PropValue, Resource, ASK_AGAIN, FIRST_POLL, LAST_POLL,
};
use crate::names::HostName;
use crate::process::Deadline;
use crate::scheduler::{DownGuard, DownOutcome, NodeUp, UpOutcome};
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
    /// Waits for `turn`, which `Line::join` put in the line.
    fn take(limit: usize, turn: (u64, usize)) -> Slot {
        let (m, c) = &CALLS;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
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

/// A batch's place in the line: all its turns join at once, when it reaches its calls. Were
/// each turn to join only when a thread gets to it, a batch's thread between two of its calls
/// would let a later batch's call in (measured: `BBABBAAA`). Leaving (also on a panic) takes
/// whatever turns never ran out of the line, so that no other batch waits for them.
struct Line {
    batch: u64,
    n: usize,
}

impl Line {
    fn join(batch: u64, n: usize) -> Line {
        let (m, _) = &CALLS;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        g.waiting.extend((0..n).map(|k| (batch, k)));
        Line { batch, n }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let (m, c) = &CALLS;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        for k in 0..self.n {
            g.waiting.remove(&(self.batch, k));
        }
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
    let _line = Line::join(batch, items.len());
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
struct Verdicts<T>(Vec<Option<Result<T, OarError>>>);

impl<T> Verdicts<T> {
    fn new(n: usize) -> Self {
        Verdicts((0..n).map(|_| None).collect())
    }

    fn pending(&self) -> Vec<usize> {
        (0..self.0.len()).filter(|&i| self.0[i].is_none()).collect()
    }

    fn set(&mut self, i: usize, r: Result<T, OarError>) {
        self.0[i] = Some(r);
    }

    /// A step every pending node shared failed: each gets it as its own error.
    fn fail_pending(&mut self, hosts: &[&HostName], step: &'static str, e: &OarError) {
        for i in self.pending() {
            self.set(
                i,
                Err(OarError::BatchFailed {
                    host: hosts[i].to_string(),
                    step,
                    cause: e.to_string(),
                }),
            );
        }
    }

    /// A host given twice is refused (each node's lock is the caller's: a second entry for
    /// one host is a caller's mistake, refused rather than guessed at).
    fn refuse_repeats(&mut self, hosts: &[&HostName]) {
        let mut seen = BTreeSet::new();
        for (i, h) in hosts.iter().enumerate() {
            if !seen.insert(h.to_string()) {
                self.set(
                    i,
                    Err(OarError::TwiceInBatch {
                        host: h.to_string(),
                    }),
                );
            }
        }
    }

    fn into_results(self) -> Vec<Result<T, OarError>> {
        self.0
            .into_iter()
            .map(|r| r.expect("every node has a verdict"))
            .collect()
    }
}

/// `oarnodesetting -n -s STATE -h h1 -h h2 …` for `which` of `hosts`, `HOSTS_PER_CALL` at a
/// time; when a call fails (one missing host fails it, exit 4, after setting the others) each
/// host of it alone, so each gets its own error.
fn set_states<T>(
    oar: &Oar,
    hosts: &[&HostName],
    which: &[usize],
    state: &'static str,
    v: &mut Verdicts<T>,
    deadline: Deadline,
) {
    for chunk in which.chunks(HOSTS_PER_CALL) {
        let mut args: Vec<String> = vec!["-n".into(), "-s".into(), state.into()];
        for &i in chunk {
            args.extend(["-h".to_string(), hosts[i].to_string()]);
        }
        if oar.run(&oar.oarnodesetting, &args, deadline).is_err() {
            for &i in chunk {
                if let Err(e) = oar.set_state(hosts[i], state, deadline) {
                    v.set(i, Err(e));
                }
            }
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
        let all: Vec<&HostName> = ups.iter().map(|u| &u.host).collect();
        let mut v = Verdicts::new(ups.len());
        v.refuse_repeats(&all);
        if let Err(e) = self.ensure_properties(deadline, false) {
            v.fail_pending(&all, "creating idhal's property columns", &e);
        }
        let existing = self.read_pending(&all, &mut v, "reading the hosts", deadline);
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
        set_states(self, &all, &state_only, "Alive", &mut v, deadline);
        let props = |i: usize| node_properties(&ups[i]);
        let done = |i: usize, rs: &[Resource]| UpOutcome {
            created: created[i],
            resource_ids: rs.iter().map(|r| r.id).collect(),
        };
        self.confirm_batch(&all, "Alive", &props, &done, &mut v, deadline);
        v.into_results()
    }

    /// The resources of the pending hosts, in one read; a failed read fails them all.
    fn read_pending<T>(
        &self,
        hosts: &[&HostName],
        v: &mut Verdicts<T>,
        step: &'static str,
        deadline: Deadline,
    ) -> BTreeMap<String, Vec<Resource>> {
        let todo: Vec<&HostName> = v.pending().into_iter().map(|i| hosts[i]).collect();
        if todo.is_empty() {
            return BTreeMap::new();
        }
        self.resources_of(&todo, deadline).unwrap_or_else(|e| {
            v.fail_pending(hosts, step, &e);
            BTreeMap::new()
        })
    }

    /// `Scheduler::nodes_down` for OAR, `down` for many hosts:
    /// 1. one `oarnodes -J --sql "network_address IN (…)"` for the whole batch; each host's
    ///    guard decides from it (unknown, a newer session spared, already Absent);
    /// 2. one `oarnodesetting -n -s Absent -h h1 -h h2 …` for the rest;
    /// 3. one read-back of all pending hosts per poll round, until each is Absent or
    ///    `state_confirm` passes: each node's verdict comes from it.
    pub(super) fn downs(
        &self,
        downs: &[(HostName, DownGuard)],
        deadline: Deadline,
    ) -> Vec<Result<DownOutcome, OarError>> {
        let all: Vec<&HostName> = downs.iter().map(|(h, _)| h).collect();
        let mut v = Verdicts::new(downs.len());
        v.refuse_repeats(&all);
        let existing = self.read_pending(&all, &mut v, "reading the hosts", deadline);
        let mut to_set = Vec::new();
        for i in v.pending() {
            let (host, guard) = &downs[i];
            let found = existing
                .get(&host.to_string())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            if found.is_empty() {
                v.set(i, Ok(DownOutcome::Unknown));
            } else if found
                .iter()
                .filter_map(registered)
                .any(|r| guard.spares(&r))
            {
                v.set(i, Ok(DownOutcome::NewerSession));
            } else if found.iter().all(|r| r.state == "Absent") {
                v.set(i, Ok(DownOutcome::AlreadyDown));
            } else {
                to_set.push(i);
            }
        }
        set_states(self, &all, &to_set, "Absent", &mut v, deadline);
        let done = |_: usize, _: &[Resource]| DownOutcome::MarkedDown;
        self.confirm_batch(&all, "Absent", &|_| Vec::new(), &done, &mut v, deadline);
        v.into_results()
    }

    /// Reads the pending hosts back, all in one call per round, until each is `wanted` with
    /// its `props`; `done` makes its verdict. A host whose properties did not stick is retried
    /// once, as `up` does.
    fn confirm_batch<T>(
        &self,
        hosts: &[&HostName],
        wanted: &'static str,
        props: &(dyn Fn(usize) -> Vec<(&'static str, PropValue)> + Sync),
        done: &dyn Fn(usize, &[Resource]) -> T,
        v: &mut Verdicts<T>,
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
        let mut retried = vec![false; hosts.len()];
        let mut asked = std::time::Instant::now();
        loop {
            let pending = v.pending();
            if pending.is_empty() {
                return;
            }
            let asking: Vec<&HostName> = pending.iter().map(|&i| hosts[i]).collect();
            let found = match self.resources_of(&asking, deadline) {
                Ok(found) => found,
                Err(e) => return v.fail_pending(hosts, "reading the hosts back", &e),
            };
            let mut retry = Vec::new();
            let mut waiting = Vec::new();
            let mut lost_hosts = Vec::new();
            for &i in &pending {
                let rs = found
                    .get(&hosts[i].to_string())
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                match check(hosts[i], rs, wanted, &props(i)) {
                    Check::Done => v.set(i, Ok(done(i, rs))),
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
                                    host: hosts[i].to_string(),
                                    step: "re-creating idhal's property columns",
                                    cause: e.to_string(),
                                }),
                            );
                        }
                    }
                    Ok(()) => {
                        let calls = parallel(self.parallel_calls, &retry, |&(i, change)| {
                            self.set_properties(hosts[i], change, &props(i), deadline)
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
                    let mut args: Vec<String> = vec!["-n".into(), "-s".into(), wanted.into()];
                    for &i in chunk {
                        args.extend(["-h".to_string(), hosts[i].to_string()]);
                    }
                    if let Err(e) = self.run(&self.oarnodesetting, &args, deadline) {
                        return v.fail_pending(hosts, "asking OAR again for the state", &e);
                    }
                }
                asked = std::time::Instant::now();
            }
            if until.remaining() <= pause {
                for (i, seen) in waiting {
                    v.set(
                        i,
                        Err(OarError::NotApplied {
                            host: hosts[i].to_string(),
                            wanted,
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
