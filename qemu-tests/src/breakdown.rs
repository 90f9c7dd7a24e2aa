//! Where a test vnode's boot-to-Alive goes: one row per step, from QEMU's start to the moment
//! `idhal hook client-connect` said the node is Alive (it reads OAR back first), on the host's
//! clock. Guest steps carry the guest's uptime (`uptime=` on the console markers); host steps
//! are stamped when their line appeared ([`crate::console::LineTimes`]). The two clocks meet at
//! the guest's uptime 0, placed at the smallest (stamp − uptime) of the guest's markers: a
//! marker's stamp is late by at most one poll, so that is the tightest bound the host has. The
//! rows add up to the total by construction.
use crate::console::LineTimes;
use crate::vm::Vm;
use crate::vpn::OpenVpnServer;
use std::fmt;
use std::time::Instant;

/// One boot's breakdown; `Display` prints it as one `FIGURE` line's text.
#[derive(Debug, Clone)]
pub struct Breakdown {
    pub rows: Vec<(&'static str, f64)>,
    /// QEMU start to the hook's line, seconds.
    pub total: f64,
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "boot to Alive {:.2} s =", self.total)?;
        for (i, (what, secs)) in self.rows.iter().enumerate() {
            let sep = if i == 0 { " " } else { " + " };
            write!(f, "{sep}{what} {:.2}", shown(*secs))?;
        }
        Ok(())
    }
}

/// A row as printed: a difference of figures rounded to 10 ms can be a hair below zero; that is
/// 0.00, not -0.00 or -0.01.
pub fn shown(secs: f64) -> f64 {
    if secs > -0.015 && secs < 0.005 {
        0.0
    } else {
        secs
    }
}

/// The uptime a guest marker carries (`… uptime=2.06`).
fn uptime_of(line: &str) -> Option<f64> {
    line.rsplit("uptime=")
        .next()
        .filter(|_| line.contains("uptime="))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The seconds a hook line gives for a step: `<step> … in 0.41 s` up to the next `, ` or `;`.
fn step_secs(line: &str, step: &str) -> Option<f64> {
    let at = line.find(step)?;
    let rest = &line[at..];
    let end = rest.find([',', ';']).unwrap_or(rest.len());
    rest[..end]
        .rsplit(" in ")
        .next()?
        .strip_suffix(" s")?
        .parse()
        .ok()
}

/// The breakdown of `vm`'s boot for `node`, whose connect `vpn` ran. `Err` names what is
/// missing (a marker, the server's line).
pub fn boot_to_alive(vm: &Vm, vpn: &OpenVpnServer, node: &str) -> Result<Breakdown, String> {
    let started = vm.started;
    let stamped: &LineTimes = vm.stamped();
    let lines = stamped.all();
    let offset = lines
        .iter()
        .filter(|(_, l)| l.starts_with("IDHAL-"))
        .filter_map(|(t, l)| Some(t.duration_since(started).as_secs_f64() - uptime_of(l)?))
        .fold(f64::INFINITY, f64::min);
    if !offset.is_finite() {
        return Err(format!("{}: no console marker with an uptime", vm.name));
    }
    let guest = |prefix: &str| -> Result<f64, String> {
        lines
            .iter()
            .find(|(_, l)| l.starts_with(prefix))
            .and_then(|(_, l)| uptime_of(l))
            .ok_or_else(|| format!("{}: no {prefix:?} marker", vm.name))
    };
    // A host stamp as guest uptime.
    let on_guest_clock = |t: Instant| t.duration_since(started).as_secs_f64() - offset;
    let host = |what: &str, found: Option<(Instant, String)>| {
        found
            .map(|(t, l)| (on_guest_clock(t), l))
            .ok_or_else(|| format!("{}: no {what}", vm.name))
    };
    let init = guest("IDHAL-EVENT init ")?;
    let run = guest(crate::console::RUN_START)?;
    // Said only when the manifest is new to the node (its first boot, a new serial): a reboot
    // on the same manifest has one row from the run's start to the scriptlet instead.
    let verified = stamped
        .first(started, |l| l.contains("accepted manifest serial"))
        .map(|(t, _)| on_guest_clock(t));
    let enroll = guest("IDHAL-TEST enroll-start ")?;
    let enrolled = guest("IDHAL-TEST enrolled ")?;
    let (connected, _) = host(
        "\"Peer Connection Initiated\" in the server's log",
        vpn.seen(started, |l| {
            l.contains(&format!("[{node}] Peer Connection Initiated"))
        }),
    )?;
    let hook_prefix = format!("idhal hook client-connect: {node} → ");
    let (alive, hook) = host(
        "client-connect hook line",
        vpn.seen(started, |l| {
            l.starts_with(&hook_prefix) && l.contains(" Alive")
        }),
    )?;
    let mut rows = vec![
        ("QEMU to kernel", offset),
        ("kernel to /init", init),
        ("/init (modules, network, state disk)", run - init),
    ];
    match verified {
        Some(v) => rows.extend([
            ("key pinned and manifest verified", v - run),
            ("to the scriptlet", enroll - v),
        ]),
        None => rows.push(("agent: manifest checked, to the scriptlet", enroll - run)),
    }
    rows.extend([
        ("enrolment", enrolled - enroll),
        ("OpenVPN start, TCP and TLS", connected - enrolled),
    ]);
    // The hook's own figures, when its line has them: its steps under the node's lock, and
    // the rest (OpenVPN calling it, its start, the state database, the checks).
    match (
        step_secs(&hook, "resource"),
        step_secs(&hook, "DNS"),
        hook.rsplit("; ")
            .next()
            .and_then(|t| t.strip_suffix(" s in all"))
            .and_then(|t| t.parse::<f64>().ok()),
    ) {
        (Some(oar), Some(dns), Some(all)) => rows.extend([
            ("hook: start and checks", alive - connected - all),
            ("hook: OAR", oar),
            ("hook: DNS", dns),
            ("hook: the rest", all - oar - dns),
        ]),
        _ => rows.push(("client-connect hook", alive - connected)),
    }
    Ok(Breakdown {
        rows,
        total: offset + alive,
    })
}

/// The row of `b` named `what`, seconds.
pub fn row(b: &Breakdown, what: &str) -> Option<f64> {
    b.rows.iter().find(|(w, _)| *w == what).map(|(_, s)| *s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_uptimes_and_hook_steps() {
        assert_eq!(uptime_of("IDHAL-EVENT init uptime=1.56"), Some(1.56));
        assert_eq!(
            uptime_of("IDHAL-TEST enrolled node=client1 addr=10.134.0.2 uptime=2.42"),
            Some(2.42)
        );
        assert_eq!(uptime_of("IDHAL-EVENT init"), None);
        assert_eq!(uptime_of("IDHAL-EVENT init uptime="), None);
        let hook = "idhal hook client-connect: client1 → vnode-0-2.idhal.test (10.134.0.2): \
                    OAR resource [1] Alive (created) in 0.41 s, DNS A+PTR set in 0.03 s; 0.45 s in all";
        assert_eq!(step_secs(hook, "resource"), Some(0.41));
        assert_eq!(step_secs(hook, "DNS"), Some(0.03));
        assert_eq!(step_secs(hook, "route"), None);
        assert_eq!(step_secs("OAR resource [1] Alive", "resource"), None);
        assert_eq!(format!("{:.2}", shown(-0.004)), "0.00");
        assert_eq!(format!("{:.2}", shown(-0.01)), "0.00");
        assert_eq!(format!("{:.2}", shown(0.012)), "0.01");
        assert_eq!(format!("{:.2}", shown(-0.2)), "-0.20");
    }
}
