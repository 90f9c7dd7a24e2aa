//! Draining a VPN server (`idhal openvpn drain`): each connected node is told to move on to
//! its next remote, a few per second so the other servers are not stormed, and nodes that
//! connect meanwhile too, until none is left; then the admin stops OpenVPN. With `[hook]
//! down_grace_secs` longer than a move, no node goes Absent on the way.
//!
//! The telling is `client-kill CID RESTART,[N]` on the management interface: OpenVPN 2.6 sends
//! the client `RESTART,[N]` and the `[N]` makes it advance to its next `remote` (push.c,
//! `server_pushed_signal`). A plain `client-kill` (or `kill CN`) makes it reconnect to the
//! same server. Refusing nodes instead would not move them: after a refused connect
//! (AUTH_FAILED) an OpenVPN 2.6 client retries the same remote (`receive_auth_failed` sets
//! `no_advance`), every `connect-retry` MAX seconds, for as long as it is refused (measured).

use crate::openvpn::management::{Answer, Management, ManagementError};
use crate::openvpn::status::{Status, StatusError};
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    Management(#[from] ManagementError),
    #[error("still connected after {secs} s: {}", .nodes.join(" "))]
    Stayed { secs: u64, nodes: Vec<String> },
}

/// A connected client as the status lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connected {
    pub client_id: u64,
    pub node: String,
}

/// The clients of a status that have a client id (OpenVPN's `Client ID` column). Values are
/// OpenVPN's and only used to address it back; a line without a usable id is left out (and
/// stays listed: the drain then ends with it in `Stayed`).
pub fn connected(status: &Status) -> (Vec<Connected>, Vec<String>) {
    let mut ok = Vec::new();
    let mut unusable = Vec::new();
    for e in &status.clients {
        let node: String = e
            .fields
            .get("common_name")
            .map(|s| s.chars().take(64).collect())
            .unwrap_or_default();
        match e
            .fields
            .get("client_id")
            .and_then(|c| c.parse::<u64>().ok())
        {
            Some(client_id) => ok.push(Connected { client_id, node }),
            None => unusable.push(format!("{node} (line {}: no client id)", e.line)),
        }
    }
    (ok, unusable)
}

/// How a drain goes.
pub struct Pace {
    /// Clients told per second at most.
    pub per_second: u32,
    /// Give up when clients are still listed after this.
    pub timeout: Duration,
}

/// What a drain did.
#[derive(Debug, Default)]
pub struct Drained {
    /// Clients told to move on.
    pub told: usize,
    /// Clients already gone when told (`ERROR` from OpenVPN).
    pub gone: usize,
}

/// Tells every listed client to move on, paced, and reads the status again (telling newcomers
/// too) until nobody is listed or the timeout. `read` gives the current status (the management
/// interface's `status 2`); `progress` gets one line per round.
pub fn move_everyone(
    management: &Management,
    mut read: impl FnMut() -> Result<Status, StatusError>,
    pace: &Pace,
    mut progress: impl FnMut(&str),
) -> Result<Drained, DrainError> {
    let started = Instant::now();
    let gap = Duration::from_secs(1) / pace.per_second.max(1);
    let mut told: HashSet<u64> = HashSet::new();
    let mut done = Drained::default();
    loop {
        let (clients, unusable) = connected(&with_retries(&mut read)?);
        if clients.is_empty() && unusable.is_empty() {
            return Ok(done);
        }
        if started.elapsed() >= pace.timeout {
            let mut nodes: Vec<String> = clients.iter().map(|c| c.node.clone()).collect();
            nodes.extend(unusable);
            return Err(DrainError::Stayed {
                secs: pace.timeout.as_secs(),
                nodes,
            });
        }
        let fresh: Vec<&Connected> = clients
            .iter()
            .filter(|c| !told.contains(&c.client_id))
            .collect();
        progress(&format!(
            "{} connected, telling {} to move on to their next remote",
            clients.len() + unusable.len(),
            fresh.len()
        ));
        for c in fresh {
            let answer = with_retries(|| {
                management.command(
                    &format!("client-kill {} RESTART,[N]", c.client_id),
                    Answer::OneLine,
                )
            })?;
            told.insert(c.client_id);
            if answer.starts_with("SUCCESS") {
                done.told += 1;
            } else {
                // Gone meanwhile (OpenVPN: "ERROR: client-kill command failed").
                done.gone += 1;
            }
            std::thread::sleep(gap);
            if started.elapsed() >= pace.timeout {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// OpenVPN serves one management client at a time: a reconcile asking for `status 2` at the
/// same moment makes a command fail now and work a moment later. A drain half done is worse
/// than a drain a second late.
fn with_retries<T, E>(mut f: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let mut tries = 1;
    loop {
        match f() {
            Err(_) if tries < RETRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            done => return done,
        }
    }
}

/// Tries of one management command before the drain gives up.
const RETRIES: u32 = 3;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openvpn::status::parse_status;

    #[test]
    fn clients_without_a_usable_id_are_named_not_told() {
        let text = "TITLE,x\nTIME,t,1700000000\n\
            HEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address,Virtual IPv6 Address,Bytes Received,Bytes Sent,Connected Since,Connected Since (time_t),Username,Client ID,Peer ID,Data Channel Cipher\n\
            CLIENT_LIST,n1,10.99.0.101:4000,10.8.0.11,,1,2,x,1700000000,UNDEF,7,0,AES\n\
            CLIENT_LIST,n2,10.99.0.102:4000,10.8.0.12,,1,2,x,1700000000,UNDEF,-3,0,AES\n\
            CLIENT_LIST,n3,10.99.0.103:4000,10.8.0.13,,1,2,x,1700000000,UNDEF,99999999999999999999999,0,AES\n\
            END\n";
        let (ok, bad) = connected(&parse_status(text).unwrap());
        assert_eq!(
            ok,
            vec![Connected {
                client_id: 7,
                node: "n1".into()
            }]
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
        assert!(bad[0].starts_with("n2 (line 5"), "{bad:?}");
    }

    #[test]
    fn a_command_that_fails_for_a_moment_is_tried_again_a_few_times() {
        let mut calls = 0;
        let r: Result<u32, &str> = with_retries(|| {
            calls += 1;
            if calls < 3 {
                Err("busy")
            } else {
                Ok(7)
            }
        });
        assert_eq!((r, calls), (Ok(7), 3));
        let mut calls = 0;
        let r: Result<u32, &str> = with_retries(|| {
            calls += 1;
            Err("down")
        });
        assert_eq!((r, calls), (Err("down"), RETRIES));
    }
}
