//! `recover-workspaces`: after a host reboot (or any loss of agents), bring every
//! WorkSpace that should be running back to AVAILABLE, as `/etc/crypttab` and
//! `/etc/fstab` bring volumes back at boot.
//!
//! For each WorkSpace, by its recorded state:
//! - AVAILABLE, IMPAIRED, UNHEALTHY, REBOOTING, STARTING with a live agent: left alone
//!   (a REBOOTING or STARTING one whose agent came up is recorded AVAILABLE);
//! - the same states without one: leftovers of the dead agent are cleaned up (lazy
//!   unmounts, loop devices), a new agent unwraps the keys under the EBS grants (KMS
//!   refuses a disabled key or a retired grant), resumes any interrupted rekey, and mounts
//!   root and `/home`. A WorkSpace that cannot come back (a volume file missing, the key
//!   disabled, the grant gone) is recorded UNHEALTHY with the reason; the others go on;
//! - STOPPING: the stop finishes (STOPPED); TERMINATING: the termination finishes;
//! - PENDING, REBUILDING, RESTORING: an operation that rewrites volumes was cut short, so
//!   the volumes cannot be trusted: ERROR, with what to run (terminate, rebuild, restore);
//! - STOPPED, ERROR, TERMINATED: untouched.
//!
//! Running it again changes nothing that is already right: it is idempotent and safe while
//! some WorkSpaces are up. It needs no administrator's token: it starts only what the
//! registry already says runs, with the host's own service credentials, and KMS decides
//! every unwrap as at any attach.

use nix::fcntl::Flock;
use serde::Serialize;

use super::agent::{self, AgentPaths};
use super::error::{ApiError, ControllerError};
use super::registry::Workspace;
use super::state::{Event, WorkspaceState};
use super::workspaces::{Controller, lock_file};

/// What recovery did with one WorkSpace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RecoveryAction {
    /// Its agent was already running.
    AlreadyRunning,
    /// A new agent serves it again.
    Recovered,
    /// It could not be brought back (see the reason); it is left down.
    LeftDown,
    /// An interrupted stop or termination was finished.
    Finished,
    /// Nothing to do in its state.
    Unchanged,
}

/// One line of the recovery report.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct RecoveryResult {
    /// The WorkSpace.
    pub workspace_id: String,
    /// Its state before recovery.
    pub previous_state: WorkspaceState,
    /// Its state now.
    pub state: WorkspaceState,
    /// What recovery did.
    pub action: RecoveryAction,
    /// Why it is left down (or what was finished).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Controller {
    /// `recover-workspaces`: see the module documentation.
    ///
    /// # Errors
    /// Only a registry failure; each WorkSpace's own failure is in its result.
    pub fn recover_workspaces(&self) -> Result<Vec<RecoveryResult>, ControllerError> {
        // One recovery at a time (the boot unit and an operator, say): a second one waits,
        // then finds the WorkSpaces up instead of cleaning up the mounts of agents the
        // first just started.
        let _one_at_a_time = self.recovery_lock()?;
        let mut results = Vec::new();
        for mut w in self.reg.workspaces()? {
            if w.state == WorkspaceState::Terminated {
                continue;
            }
            let previous_state = w.state;
            let (action, reason) = self.recover_one(&mut w);
            results.push(RecoveryResult {
                workspace_id: w.workspace_id.clone(),
                previous_state,
                state: w.state,
                action,
                reason,
            });
        }
        Ok(results)
    }

    fn recovery_lock(&self) -> Result<Flock<std::fs::File>, ControllerError> {
        let path = self.cfg.state_dir.join("recover.lock");
        Ok(lock_file(&path, true)?.expect("a lock waited for is held"))
    }

    fn recover_one(&self, w: &mut Workspace) -> (RecoveryAction, Option<String>) {
        use WorkspaceState as S;
        let paths = AgentPaths::new(&self.cfg.state_dir, &w.workspace_id);
        let outcome = match w.state {
            S::Available | S::Impaired | S::Unhealthy | S::Rebooting | S::Starting => {
                if agent::live_pid(&paths).is_some() {
                    self.record_running(w)
                } else {
                    self.bring_back(w)
                }
            }
            S::Stopping => {
                agent::stop(&paths);
                self.finish(w, Event::Detached, "the interrupted stop was finished")
            }
            S::Terminating => {
                self.teardown(w);
                self.finish(
                    w,
                    Event::Deleted,
                    "the interrupted termination was finished",
                )
            }
            S::Pending | S::Rebuilding | S::Restoring => {
                agent::stop(&paths);
                let what = match w.state {
                    S::Pending => "launch; terminate it and launch again",
                    S::Rebuilding => "rebuild; run rebuild-workspaces again",
                    _ => "restore; run restore-workspace again",
                };
                self.left_down(
                    w,
                    Event::Failed,
                    format!("the host stopped during its {what}"),
                )
            }
            S::Stopped | S::Error | S::Terminated => Ok((RecoveryAction::Unchanged, None)),
        };
        outcome.unwrap_or_else(|e| (RecoveryAction::LeftDown, Some(e.message)))
    }

    /// A live agent serves it: a reboot or start that the host cut short after the agent
    /// came up is recorded as done.
    fn record_running(
        &self,
        w: &mut Workspace,
    ) -> Result<(RecoveryAction, Option<String>), ApiError> {
        if matches!(
            w.state,
            WorkspaceState::Rebooting | WorkspaceState::Starting
        ) {
            w.state = Self::transition(w, Event::Attached)?;
            w.error = None;
            self.reg.update_workspace(w).map_err(ApiError::internal)?;
        }
        Ok((RecoveryAction::AlreadyRunning, None))
    }

    /// No agent: reboot it the way `reboot-workspaces` does, without the caller's key check
    /// (KMS refuses the unwrap itself when the key or grant is gone).
    fn bring_back(&self, w: &mut Workspace) -> Result<(RecoveryAction, Option<String>), ApiError> {
        if matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Impaired
        ) {
            w.state = Self::transition(w, Event::AgentLost)?;
        }
        if let Some(missing) = self
            .reg
            .volumes(Some(&w.workspace_id))
            .map_err(ApiError::internal)?
            .into_iter()
            .find(|v| !v.path.exists())
        {
            let why = format!(
                "volume {} ({} volume) is missing: {} does not exist; restore-workspace rebuilds it from snapshots",
                missing.volume_id,
                missing.kind,
                missing.path.display()
            );
            return self.left_down(w, Event::AgentLost, why);
        }
        let next = match w.state {
            WorkspaceState::Unhealthy => Self::transition(w, Event::Reboot)?,
            pending => pending,
        };
        match self.restart(w, next) {
            Ok(()) => Ok((RecoveryAction::Recovered, None)),
            Err(e) => Ok((RecoveryAction::LeftDown, Some(e.message))),
        }
    }

    fn finish(
        &self,
        w: &mut Workspace,
        event: Event,
        what: &str,
    ) -> Result<(RecoveryAction, Option<String>), ApiError> {
        w.state = Self::transition(w, event)?;
        w.error = None;
        self.reg.update_workspace(w).map_err(ApiError::internal)?;
        Ok((RecoveryAction::Finished, Some(what.to_string())))
    }

    /// Records it down with `why`: `event` moves it to its down state when it is not
    /// there yet (UNHEALTHY or ERROR stay as they are).
    fn left_down(
        &self,
        w: &mut Workspace,
        event: Event,
        why: String,
    ) -> Result<(RecoveryAction, Option<String>), ApiError> {
        if let Ok(next) = w.state.on(event) {
            w.state = next;
        }
        w.error = Some(why.clone());
        self.reg.update_workspace(w).map_err(ApiError::internal)?;
        Ok((RecoveryAction::LeftDown, Some(why)))
    }
}
