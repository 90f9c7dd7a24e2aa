//! Scriptlets die with the agent: with watchdog.rs, the agent's only unsafe code, a system call
//! musl already links (no crate: the size budget, scripts/agent-size.sh). Linux only, as the
//! agent.

use std::io;
use std::os::raw::c_long;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The agent's pid, for the child to check: a static, so the closure captures nothing and
/// costs no allocation (the size budget).
static AGENT: AtomicU32 = AtomicU32::new(0);

#[cfg(target_arch = "x86_64")]
const SYS_GETPPID: c_long = 110;
#[cfg(target_arch = "x86_64")]
const SYS_PRCTL: c_long = 157;
#[cfg(target_arch = "aarch64")]
const SYS_GETPPID: c_long = 173;
#[cfg(target_arch = "aarch64")]
const SYS_PRCTL: c_long = 167;
const PR_SET_PDEATHSIG: c_long = 1;
const SIGKILL: c_long = 9;

#[allow(unsafe_code)]
unsafe extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
}

/// The child `cmd` starts gets SIGKILL when the agent dies, even by `kill -9`. Its own
/// children live on, holding the scriptlet's lock (run.rs), so that no later run starts the
/// scriptlet again before they are gone.
#[allow(unsafe_code)]
pub fn die_with_agent(cmd: &mut Command) {
    AGENT.store(std::process::id(), Relaxed);
    // SAFETY: the closure runs in the forked child between fork and exec, where only
    // async-signal-safe calls are allowed: it makes two system calls (prctl, getppid) and
    // builds its error with `last_os_error`, which reads errno and neither allocates nor locks.
    unsafe {
        cmd.pre_exec(|| {
            let agent = c_long::from(AGENT.load(Relaxed));
            // An agent that died before prctl sends no signal: do not start.
            if syscall(SYS_PRCTL, PR_SET_PDEATHSIG, SIGKILL) == 0 && syscall(SYS_GETPPID) == agent {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}
