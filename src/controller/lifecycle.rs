//! Lifecycle verbs over a batch of WorkSpaces: reboot, stop, start, terminate, rebuild,
//! restore; and the refusal to change encryption after launch.

use crate::luks2::KmsToken;
use crate::volume;

use super::agent::{self, AgentPaths};
use super::api::{BatchResult, FailedRequest, MAX_BATCH};
use super::binding::volume_context;
use super::binding::{check_key_usable, ebs_grant};
use super::error::{ApiError, ApiErrorCode, ControllerError, api};
use super::ids;
use super::kind::VolumeKind;
use super::registry::{Snapshot, User, Volume, Workspace};
use super::state::{Event, IllegalTransition, WorkspaceState};
use super::workspaces::{Controller, copy_sparse};

impl Controller {
    /// Runs `op` for each id with per-item failures (at most 25 ids).
    pub(super) fn batch(
        &self,
        ids: &[String],
        mut op: impl FnMut(&Self, &mut Workspace) -> Result<(), ApiError>,
    ) -> Result<BatchResult, ControllerError> {
        if ids.is_empty() || ids.len() > MAX_BATCH {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("give between 1 and {MAX_BATCH} --workspace-ids"),
            ));
        }
        self.authenticate_caller()?;
        let mut result = BatchResult::default();
        for id in ids {
            let outcome = match self.reg.workspace(id)? {
                None => Err(ApiError::new(
                    ApiErrorCode::ResourceNotFound,
                    format!("WorkSpace {id} does not exist"),
                )),
                Some(mut w) => {
                    self.refresh(&mut w);
                    op(self, &mut w)
                }
            };
            if let Err(e) = outcome {
                result.failed_requests.push(FailedRequest {
                    workspace_id: Some(id.clone()),
                    workspace_request: None,
                    error_code: e.code,
                    error_message: e.message,
                });
            }
        }
        Ok(result)
    }

    pub(super) fn transition(w: &Workspace, event: Event) -> Result<WorkspaceState, ApiError> {
        w.state.on(event).map_err(|e: IllegalTransition| {
            ApiError::new(
                ApiErrorCode::InvalidResourceState,
                format!("{}: {e}", w.workspace_id),
            )
        })
    }

    /// Refuses when an encrypted WorkSpace's key is not Enabled.
    pub(super) fn require_usable_key(&self, w: &Workspace, verb: &str) -> Result<(), ApiError> {
        let Some(key_arn) = w.key_arn.as_deref() else {
            return Ok(());
        };
        let client = self
            .service_for_admin()
            .map_err(|e| ApiError::new(ApiErrorCode::KmsUnavailable, e.to_string()))?;
        check_key_usable(&client, Some(key_arn), verb)
    }

    pub(super) fn restart(
        &self,
        w: &mut Workspace,
        pending: WorkspaceState,
    ) -> Result<(), ApiError> {
        w.state = pending;
        w.error = None;
        self.reg.update_workspace(w).map_err(ApiError::internal)?;
        agent::stop(&AgentPaths::new(&self.cfg.state_dir, &w.workspace_id));
        self.bring_up(w)
    }

    pub(super) fn bring_up(&self, w: &mut Workspace) -> Result<(), ApiError> {
        match self.start_agent(&w.workspace_id) {
            Ok(()) => {
                w.state = w.state.on(Event::Attached).map_err(ApiError::internal)?;
                self.reg.update_workspace(w).map_err(ApiError::internal)
            }
            Err(e) => {
                if let Ok(next) = w.state.on(Event::AttachFailed) {
                    w.state = next;
                }
                w.error = Some(e.clone());
                let _ = self.reg.update_workspace(w);
                Err(ApiError::new(ApiErrorCode::AttachFailed, e))
            }
        }
    }

    /// `reboot-workspaces`.
    ///
    /// # Errors
    /// Bad batch size or database failure.
    pub fn reboot(&self, ids: &[String]) -> Result<BatchResult, ControllerError> {
        self.batch(ids, |c, w| {
            let next = Self::transition(w, Event::Reboot)?;
            c.require_usable_key(w, "reboot")?;
            c.restart(w, next)
        })
    }

    /// `stop-workspaces`.
    ///
    /// # Errors
    /// Bad batch size or database failure.
    pub fn stop(&self, ids: &[String]) -> Result<BatchResult, ControllerError> {
        self.batch(ids, |c, w| {
            w.state = Self::transition(w, Event::Stop)?;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            w.state = w.state.on(Event::Detached).map_err(ApiError::internal)?;
            w.error = None;
            c.reg.update_workspace(w).map_err(ApiError::internal)
        })
    }

    /// `start-workspaces`.
    ///
    /// # Errors
    /// Bad batch size or database failure.
    pub fn start(&self, ids: &[String]) -> Result<BatchResult, ControllerError> {
        self.batch(ids, |c, w| {
            let next = Self::transition(w, Event::Start)?;
            c.require_usable_key(w, "start")?;
            c.restart(w, next)
        })
    }

    /// `terminate-workspaces`: stops the agent, retires every grant, deletes volumes and
    /// snapshots.
    ///
    /// # Errors
    /// Bad batch size or database failure.
    pub fn terminate(&self, ids: &[String]) -> Result<BatchResult, ControllerError> {
        self.batch(ids, |c, w| {
            w.state = Self::transition(w, Event::Terminate)?;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            c.teardown(w);
            w.state = w.state.on(Event::Deleted).map_err(ApiError::internal)?;
            w.error = None;
            c.reg.update_workspace(w).map_err(ApiError::internal)
        })
    }

    /// `rebuild-workspaces`: root from the bundle (with a fresh data key under the same
    /// grant and context), user volume from its latest snapshot.
    ///
    /// # Errors
    /// Bad batch size or database failure.
    pub fn rebuild(&self, ids: &[String]) -> Result<BatchResult, ControllerError> {
        self.batch(ids, |c, w| {
            let next = Self::transition(w, Event::Rebuild)?;
            c.require_usable_key(w, "rebuild")?;
            let bundle = c
                .reg
                .bundle(&w.bundle_id)
                .map_err(ApiError::internal)?
                .ok_or_else(|| {
                    ApiError::new(
                        ApiErrorCode::BundleNotFound,
                        format!("bundle {} no longer exists", w.bundle_id),
                    )
                })?;
            let user = c
                .reg
                .user(&w.directory_id, &w.user_name)
                .map_err(ApiError::internal)?
                .ok_or_else(|| ApiError::new(ApiErrorCode::UserNotFound, w.user_name.clone()))?;
            w.state = next;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            let vols = c
                .reg
                .volumes(Some(&w.workspace_id))
                .map_err(ApiError::internal)?;
            for v in vols {
                if v.kind == VolumeKind::Root {
                    let key = if v.encrypted {
                        Some(
                            c.new_data_key(w, &user, &v)
                                .map_err(|e| ApiError::from_kms(&e))?,
                        )
                    } else {
                        None
                    };
                    c.make_volume(&v, key.as_ref().map(|(k, t)| (k, t.clone())), Some(&bundle))
                        .map_err(ApiError::internal)?;
                } else if let Some(snap) = c
                    .latest_snapshot(&w.workspace_id, VolumeKind::User)
                    .map_err(ApiError::internal)?
                    && snap.volume_id == v.volume_id
                {
                    copy_sparse(&snap.path, &v.path).map_err(ApiError::internal)?;
                }
            }
            c.bring_up(w)
        })
    }

    /// `restore-workspace`: both volumes from their latest snapshots, as new volumes; each
    /// encrypted blob is re-encrypted to the new volume's context (ReEncrypt under a new
    /// EBS grant), the old grants retired.
    ///
    /// # Errors
    /// Unknown WorkSpace or database failure; refusals come back as a `FailedRequest`.
    pub fn restore(&self, workspace_id: &str) -> Result<BatchResult, ControllerError> {
        self.batch(&[workspace_id.to_string()], |c, w| {
            let next = Self::transition(w, Event::Restore)?;
            c.require_usable_key(w, "restore")?;
            let vols = c.reg.volumes(Some(&w.workspace_id)).map_err(ApiError::internal)?;
            let mut plan = Vec::new();
            for v in &vols {
                let snap = c
                    .latest_snapshot(&w.workspace_id, v.kind)
                    .map_err(ApiError::internal)?
                    .ok_or_else(|| ApiError::new(ApiErrorCode::InvalidResourceState, format!("no snapshot of the {} volume to restore from (create-snapshot first)", v.kind)))?;
                plan.push((v.clone(), snap));
            }
            let user = c.reg.user(&w.directory_id, &w.user_name).map_err(ApiError::internal)?.ok_or_else(|| ApiError::new(ApiErrorCode::UserNotFound, w.user_name.clone()))?;
            w.state = next;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            for (old, snap) in plan {
                c.restore_volume(w, &user, &old, &snap)?;
            }
            c.bring_up(w)
        })
    }

    pub(super) fn restore_volume(
        &self,
        w: &Workspace,
        user: &User,
        old: &Volume,
        snap: &Snapshot,
    ) -> Result<(), ApiError> {
        let volume_id = ids::volume_id();
        let path = self.volume_path(&volume_id);
        copy_sparse(&snap.path, &path).map_err(ApiError::internal)?;
        let mut row = Volume {
            volume_id: volume_id.clone(),
            path: path.clone(),
            grant_id: None,
            ..old.clone()
        };
        if old.encrypted {
            let old_key = old.key_arn.as_deref().ok_or_else(|| {
                ApiError::internal(format!(
                    "volume {} is encrypted but has no KMS key",
                    old.volume_id
                ))
            })?;
            let service = self.service().map_err(ApiError::internal)?;
            let ebs = self.ebs().map_err(ApiError::internal)?;
            let new_ctx = volume_context(&user.sid, &w.directory_id, &volume_id);
            let old_ctx = volume_context(&user.sid, &w.directory_id, &old.volume_id);
            let grant = service
                .create_grant(&ebs_grant(old_key, &new_ctx, &volume_id))
                .map_err(|e| ApiError::from_kms(&e))?;
            row.grant_id = Some(grant.grant_id.clone());
            let mut header = volume::read_header(&path).map_err(ApiError::internal)?;
            let token = header.kms_token().cloned().ok_or_else(|| {
                ApiError::internal(format!("snapshot {} has no KMS token", snap.snapshot_id))
            })?;
            let (blob, arn) = ebs
                .re_encrypt(
                    &token.ciphertext_blob,
                    &old_ctx,
                    old_key,
                    &new_ctx,
                    &[grant.grant_token],
                )
                .map_err(|e| ApiError::from_kms(&e))?;
            header.set_kms_token(KmsToken {
                key_arn: if arn.is_empty() {
                    old_key.to_string()
                } else {
                    arn
                },
                ciphertext_blob: blob,
                encryption_context: new_ctx,
                volume_id: volume_id.clone(),
                ..token
            });
            let backing = crate::backing::FileBacking::open(&path).map_err(ApiError::internal)?;
            header.write(&backing).map_err(ApiError::internal)?;
            if let Some(grant) = old.grant_id.as_deref() {
                let _ = service.retire_grant(old_key, grant);
            }
        }
        self.reg.put_volume(&row).map_err(ApiError::internal)?;
        self.reg
            .delete_volume(&old.volume_id)
            .map_err(ApiError::internal)?;
        let _ = std::fs::remove_file(&old.path);
        Ok(())
    }

    /// `modify-workspace-properties` for encryption: refused (encryption is chosen at launch).
    ///
    /// # Errors
    /// Always, with the reason.
    pub fn modify_encryption(
        &self,
        workspace_id: &str,
        root: Option<bool>,
        user: Option<bool>,
    ) -> Result<(), ControllerError> {
        let w = self.existing_workspace(workspace_id)?;
        let enabling =
            root == Some(true) && !w.root_encrypted || user == Some(true) && !w.user_encrypted;
        let disabling =
            root == Some(false) && w.root_encrypted || user == Some(false) && w.user_encrypted;
        if enabling {
            return Err(api(
                ApiErrorCode::UnsupportedWorkspaceConfiguration,
                format!(
                    "cannot encrypt existing WorkSpace {workspace_id}: encryption is chosen at launch; create a new encrypted WorkSpace and move the data"
                ),
            ));
        }
        if disabling {
            return Err(api(
                ApiErrorCode::UnsupportedWorkspaceConfiguration,
                format!(
                    "cannot disable encryption of WorkSpace {workspace_id}: an encrypted WorkSpace stays encrypted"
                ),
            ));
        }
        Ok(())
    }
}
