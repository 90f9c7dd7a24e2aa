//! The benchmark's options: the size of the storm, and the knobs that select the configuration
//! under test (state backend, hook mode, number of `idhal serve`), so one harness measures
//! before and after.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// The hook mode written to `[hook] mode` in idhal's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum HookMode {
    /// Today's synchronous hooks: nothing is written (the default of every idhal so far).
    Sync,
    /// `[hook] mode = "deferred"` (issue 13 §2; refused by an idhal that does not have it).
    Deferred,
}

#[derive(Debug, Parser)]
#[command(
    name = "idhal-storm",
    about = "The boot-storm benchmark: N nodes enroll and connect at once (real OAR, Knot, OpenVPN 2.6, idhal serve; 127.0.0.1 only)",
    long_about = "The boot-storm benchmark: N nodes enroll and connect at once.\n\n\
It starts OAR 2.5 (on a private PostgreSQL), Knot, --serve `idhal serve` processes and an OpenVPN \
2.6 server rendered by `idhal openvpn server-config` (hooks = `idhal hook`), all on 127.0.0.1 with \
ephemeral ports. It creates one token per node, enrolls every node with its own token through serve, \
then connects them all at once: --openvpn-clients real OpenVPN client processes (--dev null), the \
rest by running `idhal hook client-connect` with the environment OpenVPN gives, one at a time like \
OpenVPN's own loop (--hook-concurrency). `idhal reconcile` runs every --reconcile-every seconds \
throughout, on OpenVPN's status plus the hook-path sessions. Then every node disconnects.\n\n\
It prints: time until all N are Alive in OAR with A and PTR in DNS, enrollments/s, p50/p99 of \
connect-to-Alive, the longest stall of the OpenVPN server's event loop (management interface \
round trip, every 100 ms), duplicates, lost nodes, nodes reconcile took down while connected, \
peak RSS of the server processes; and after the disconnect: Absent, removed. It writes \
OUT/storm.csv (one line per node) and OUT/storm.svg.\n\n\
Needs root and the Debian packages of scripts/apt-packages.txt. Every process it starts is \
stopped by pid when it ends, fails, or gets Ctrl-C.\n\n\
Exit codes: 0 every node came up and went Absent, no duplicate, none lost, none taken down while \
connected, none removed; 1 one of those failed (the figures say which); 2 usage, or something \
it needs is missing.",
    after_help = "Examples:\n  scripts/storm.sh --nodes 100\n  scripts/storm.sh --nodes 1000 --openvpn-clients 200\n  scripts/storm.sh --nodes 1000 --serve 2 --state-url pg --hook-mode deferred   # the AFTER configuration"
)]
pub struct Args {
    /// Simulated nodes (each its own token, key, certificate and address)
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=60000))]
    pub nodes: u32,
    /// How many nodes connect as real OpenVPN client processes (at most --nodes); the rest go
    /// through the hook path directly
    #[arg(long, default_value_t = 200)]
    pub openvpn_clients: u32,
    /// `idhal serve` processes; enrollments are spread over them round-robin
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub serve: u32,
    /// The state database: none for SQLite in the state dir (today), `pg` for a database on the
    /// benchmark's own PostgreSQL, or a postgresql:// URL; written as `[state] database`
    #[arg(long, value_name = "URL")]
    pub state_url: Option<String>,
    /// How idhal runs the connect hook
    #[arg(long, value_enum, default_value_t = HookMode::Sync)]
    pub hook_mode: HookMode,
    /// Enrollments in flight at once (HTTP clients)
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub enroll_concurrency: u32,
    /// Hook-path connects run at once: 1 is one OpenVPN server's loop, which runs one
    /// client-connect script at a time
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub hook_concurrency: u32,
    /// Spread the nodes' starts over this many seconds (0: all at once)
    #[arg(long, default_value_t = 0)]
    pub connect_over: u64,
    /// Seconds between `idhal reconcile` runs (the next starts when the last one ended if it
    /// took longer)
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub reconcile_every: u64,
    /// Give up waiting for all nodes to come up (or go Absent) after this many seconds
    /// (default: 120 + 2 per node)
    #[arg(long)]
    pub deadline: Option<u64>,
    /// Seconds to stay connected once all are up, before everyone disconnects
    #[arg(long, default_value_t = 15)]
    pub hold: u64,
    /// How often OAR (its database) and DNS are polled for the nodes' state, in ms
    #[arg(long, default_value_t = 250, value_parser = clap::value_parser!(u64).range(20..))]
    pub poll_ms: u64,
    /// Where storm.csv and storm.svg go
    #[arg(long, default_value = "storm-out")]
    pub out: PathBuf,
    /// The idhal binary (default: built now, in the benchmark's own profile)
    #[arg(long, value_name = "PATH")]
    pub idhal: Option<PathBuf>,
    /// TOML appended to idhal's server config (for settings that have no option here)
    #[arg(long, value_name = "FILE")]
    pub config_extra: Option<PathBuf>,
    /// Stop after the enrollment (its figures only): e.g. to try several serve on one state
    #[arg(long)]
    pub enroll_only: bool,
    /// Keep the work directory (configs, logs, state) instead of removing it at exit
    #[arg(long)]
    pub keep: bool,
}

pub fn parse() -> Args {
    Args::parse()
}

/// What must hold before anything starts: one line saying what is missing.
pub fn check(a: &Args) -> Result<(), String> {
    if !idhal_test_support::is_root() {
        return Err("needs root: PostgreSQL, OAR and OpenVPN run as their own users, OpenVPN needs a tun device".into());
    }
    let mut need: Vec<String> = idhal_test_support::oar::programs();
    need.extend(idhal_test_support::knot::PROGRAMS.map(String::from));
    need.extend(idhal_test_support::openvpn::PROGRAMS.map(String::from));
    let missing: Vec<String> = need
        .into_iter()
        .filter(|p| !std::path::Path::new(p).exists())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing {} (install scripts/apt-packages.txt with scripts/setup-debian.sh)",
            missing.join(", ")
        ));
    }
    if let Some(f) = &a.config_extra {
        if !f.is_file() {
            return Err(format!("--config-extra {}: no such file", f.display()));
        }
    }
    Ok(())
}

impl Args {
    /// Real OpenVPN clients: at most the number of nodes.
    pub fn real_clients(&self) -> usize {
        self.openvpn_clients.min(self.nodes) as usize
    }

    pub fn deadline_secs(&self) -> u64 {
        self.deadline.unwrap_or(120 + 2 * u64::from(self.nodes))
    }
}
