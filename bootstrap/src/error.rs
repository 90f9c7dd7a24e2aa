//! The agent's errors and the one place they become exit codes (documented in docs/agent.md and
//! in `idhal-bootstrap --help`).

use idhal_manifest::VerifyError;
use std::path::PathBuf;

/// Exit codes of `idhal-bootstrap`. Stable: admins and monitoring key on them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    Usage = 2,
    Config = 3,
    Fetch = 4,
    Refused = 5,
    ScriptletFailed = 6,
    Busy = 7,
    State = 8,
    /// `status` only: nothing failed, but some scriptlets have not run yet.
    Pending = 9,
    /// `status --wait` only: no outcome before the deadline.
    TimedOut = 10,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("config: {0}")]
    Config(String),
    #[error("fetch {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("refused: {0}")]
    Refused(#[from] VerifyError),
    #[error("refused: {0}")]
    Pin(String),
    /// The enrollment server said no (bad, unknown, used-up or expired token; clock skew;
    /// `renew`: unknown or revoked node, expired certificate), or its answer did not verify.
    #[error("refused: {0}")]
    EnrollRefused(String),
    /// `peers`: the server refused the registration (unknown or revoked node, bad signature,
    /// clock skew, bad request), or its peer list did not verify.
    #[error("refused: {0}")]
    PeersRefused(String),
    #[error("scriptlet {id} failed with {outcome}; see {}", log.display())]
    Scriptlet {
        id: String,
        outcome: String,
        log: PathBuf,
    },
    /// `lock` (another run), `enroll.lock` (another enroll), `peers/state.lock` (another
    /// `peers`), or `scriptlets/<id>/lock`: that scriptlet, started by an earlier run, is still
    /// alive (that agent was killed, what the scriptlet ran was not), or a process that kept its
    /// standard input is.
    #[error("{} is held by another idhal-bootstrap run or a scriptlet one started; not running twice", .0.display())]
    Busy(PathBuf),
    #[error("state {}: {source}", path.display())]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn exit(&self) -> Exit {
        match self {
            AgentError::Usage(_) => Exit::Usage,
            AgentError::Config(_) => Exit::Config,
            AgentError::Fetch { .. } => Exit::Fetch,
            AgentError::Refused(_)
            | AgentError::Pin(_)
            | AgentError::EnrollRefused(_)
            | AgentError::PeersRefused(_) => Exit::Refused,
            AgentError::Scriptlet { .. } => Exit::ScriptletFailed,
            AgentError::Busy(_) => Exit::Busy,
            AgentError::State { .. } => Exit::State,
        }
    }

    pub fn state(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        AgentError::State {
            path: path.into(),
            source,
        }
    }
}
