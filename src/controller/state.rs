//! The WorkSpace lifecycle as a typed state machine (DESIGN §6).
//!
//! [`WorkspaceState::on`] consumes a state and an [`Event`] and returns the next state or
//! an [`IllegalTransition`] naming both, the way the WorkSpaces API's preconditions do
//! (e.g. `RebootWorkspaces` needs AVAILABLE, IMPAIRED or UNHEALTHY).

use std::fmt;
use std::str::FromStr;

/// WorkSpace states, as the WorkSpaces API spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum WorkspaceState {
    /// Being launched.
    Pending,
    /// Running and healthy.
    Available,
    /// Running but degraded.
    Impaired,
    /// Its agent is gone (e.g. killed); reboot recovers it.
    Unhealthy,
    /// Rebooting.
    Rebooting,
    /// Starting from STOPPED.
    Starting,
    /// Rebuilding root from the bundle.
    Rebuilding,
    /// Restoring from snapshots.
    Restoring,
    /// Stopping.
    Stopping,
    /// Stopped (volumes detached, keys wiped).
    Stopped,
    /// Being terminated.
    Terminating,
    /// Gone.
    Terminated,
    /// Launch or an operation failed irrecoverably.
    Error,
}

/// What happens to a WorkSpace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Launch finished.
    Launched,
    /// Reboot requested.
    Reboot,
    /// Rebuild requested.
    Rebuild,
    /// Restore requested.
    Restore,
    /// Stop requested.
    Stop,
    /// Start requested.
    Start,
    /// Terminate requested.
    Terminate,
    /// The operation in progress finished: attached and serving.
    Attached,
    /// The operation in progress finished: detached.
    Detached,
    /// Terminate finished.
    Deleted,
    /// The agent did not come up after a reboot, start, rebuild or restore.
    AttachFailed,
    /// The agent died.
    AgentLost,
    /// An operation failed.
    Failed,
}

/// A transition the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot {event} a WorkSpace that is {state}")]
pub struct IllegalTransition {
    /// The state it was in.
    pub state: WorkspaceState,
    /// What was attempted.
    pub event: Event,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Launched => "finish launching",
            Self::Reboot => "reboot",
            Self::Rebuild => "rebuild",
            Self::Restore => "restore",
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Terminate => "terminate",
            Self::Attached => "finish attaching",
            Self::Detached => "finish detaching",
            Self::Deleted => "finish terminating",
            Self::AttachFailed => "fail to attach",
            Self::AgentLost => "lose the agent of",
            Self::Failed => "fail",
        };
        f.write_str(s)
    }
}

impl WorkspaceState {
    /// The next state after `event`, or why not.
    ///
    /// # Errors
    /// [`IllegalTransition`] when the API's preconditions are not met.
    pub fn on(self, event: Event) -> Result<Self, IllegalTransition> {
        use Event as E;
        use WorkspaceState as S;
        let next = match (self, event) {
            (S::Pending, E::Launched) => S::Available,
            (S::Available | S::Impaired | S::Unhealthy, E::Reboot) => S::Rebooting,
            (S::Available | S::Impaired | S::Unhealthy | S::Error | S::Stopped, E::Rebuild) => {
                S::Rebuilding
            }
            (S::Available | S::Impaired | S::Unhealthy | S::Error | S::Stopped, E::Restore) => {
                S::Restoring
            }
            (S::Available | S::Impaired | S::Unhealthy | S::Error, E::Stop) => S::Stopping,
            (S::Stopped, E::Start) => S::Starting,
            (s, E::Terminate) if !matches!(s, S::Terminating | S::Terminated) => S::Terminating,
            (S::Rebooting | S::Starting | S::Rebuilding | S::Restoring, E::Attached) => {
                S::Available
            }
            (S::Rebooting | S::Starting | S::Rebuilding | S::Restoring, E::AttachFailed) => {
                S::Unhealthy
            }
            (S::Stopping, E::Detached) => S::Stopped,
            (S::Terminating, E::Deleted) => S::Terminated,
            (S::Available | S::Impaired, E::AgentLost) => S::Unhealthy,
            (s, E::Failed) if !matches!(s, S::Terminated) => S::Error,
            (state, event) => return Err(IllegalTransition { state, event }),
        };
        Ok(next)
    }

    /// The API spelling, e.g. `AVAILABLE`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Available => "AVAILABLE",
            Self::Impaired => "IMPAIRED",
            Self::Unhealthy => "UNHEALTHY",
            Self::Rebooting => "REBOOTING",
            Self::Starting => "STARTING",
            Self::Rebuilding => "REBUILDING",
            Self::Restoring => "RESTORING",
            Self::Stopping => "STOPPING",
            Self::Stopped => "STOPPED",
            Self::Terminating => "TERMINATING",
            Self::Terminated => "TERMINATED",
            Self::Error => "ERROR",
        }
    }

    /// States in which an agent should be serving the volumes.
    #[must_use]
    pub fn is_running(self) -> bool {
        matches!(self, Self::Available | Self::Impaired | Self::Unhealthy)
    }
}

impl fmt::Display for WorkspaceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for WorkspaceState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        const ALL: [WorkspaceState; 13] = [
            WorkspaceState::Pending,
            WorkspaceState::Available,
            WorkspaceState::Impaired,
            WorkspaceState::Unhealthy,
            WorkspaceState::Rebooting,
            WorkspaceState::Starting,
            WorkspaceState::Rebuilding,
            WorkspaceState::Restoring,
            WorkspaceState::Stopping,
            WorkspaceState::Stopped,
            WorkspaceState::Terminating,
            WorkspaceState::Terminated,
            WorkspaceState::Error,
        ];
        ALL.into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown WorkSpace state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Event as E;
    use WorkspaceState as S;

    #[test]
    fn happy_paths() {
        let s = S::Pending.on(E::Launched).expect("launch");
        assert_eq!(s, S::Available);
        assert_eq!(
            s.on(E::Reboot).and_then(|s| s.on(E::Attached)),
            Ok(S::Available)
        );
        let stopped = s.on(E::Stop).and_then(|s| s.on(E::Detached)).expect("stop");
        assert_eq!(stopped, S::Stopped);
        assert_eq!(
            stopped.on(E::Start).and_then(|s| s.on(E::Attached)),
            Ok(S::Available)
        );
        assert_eq!(
            s.on(E::Terminate).and_then(|s| s.on(E::Deleted)),
            Ok(S::Terminated)
        );
        assert_eq!(
            s.on(E::AgentLost).and_then(|s| s.on(E::Reboot)),
            Ok(S::Rebooting)
        );
    }

    #[test]
    fn illegal_transitions_are_errors() {
        assert_eq!(
            S::Stopped.on(E::Reboot),
            Err(IllegalTransition {
                state: S::Stopped,
                event: E::Reboot
            })
        );
        assert!(S::Available.on(E::Start).is_err());
        assert!(S::Terminated.on(E::Terminate).is_err());
        assert!(S::Terminated.on(E::Start).is_err());
        assert!(S::Pending.on(E::Reboot).is_err());
        assert_eq!(
            S::Stopped.on(E::Reboot).expect_err("illegal").to_string(),
            "cannot reboot a WorkSpace that is STOPPED"
        );
    }

    #[test]
    fn failures_have_their_own_transitions() {
        assert_eq!(S::Pending.on(E::Failed), Ok(S::Error));
        assert_eq!(S::Rebooting.on(E::AttachFailed), Ok(S::Unhealthy));
        assert_eq!(S::Restoring.on(E::AttachFailed), Ok(S::Unhealthy));
        assert!(S::Available.on(E::AttachFailed).is_err());
        assert!(S::Terminated.on(E::Failed).is_err());
    }

    #[test]
    fn names_round_trip() {
        for s in [
            S::Pending,
            S::Available,
            S::Unhealthy,
            S::Terminated,
            S::Error,
        ] {
            assert_eq!(s.as_str().parse::<WorkspaceState>(), Ok(s));
        }
        assert!("BOGUS".parse::<WorkspaceState>().is_err());
    }
}
