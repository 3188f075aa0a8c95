//! Lifecycle verbs over a batch of WorkSpaces: reboot, stop, start, terminate, rebuild,
//! restore; and the refusal to change encryption after launch.

use std::path::Path;

use crate::luks2::KmsToken;
use crate::snapshot::manifest::Manifest;
use crate::snapshot::store::SnapshotStore;
use crate::volume;

use super::agent::{self, AgentPaths};
use super::api::{BatchResult, FailedRequest, MAX_BATCH};
use super::binding::volume_context;
use super::binding::{check_key_usable, ebs_grant};
use super::error::{ApiError, ApiErrorCode, ControllerError, api};
use super::ids;
use super::kind::VolumeKind;
use super::registry::{User, Volume, Workspace};
use super::snapshots::check_owner;
use super::state::{Event, IllegalTransition, WorkspaceState};
use super::workspaces::Controller;

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
            let vols = c
                .reg
                .volumes(Some(&w.workspace_id))
                .map_err(ApiError::internal)?;
            // The user volume comes from its latest snapshot, fetched before anything
            // changes: a store failure leaves the WorkSpace as it was.
            let store = c.snapshot_store()?;
            let staged = match (
                c.latest_snapshot(store.as_ref(), w, &user, VolumeKind::User)?,
                vols.iter().find(|v| v.kind == VolumeKind::User),
            ) {
                (Some(m), Some(old)) => {
                    let mut staged = c.stage(store.as_ref(), &[(old.clone(), m)])?;
                    staged.pop()
                }
                _ => None,
            };
            w.state = next;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
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
                }
            }
            if let Some((old, new_id, m)) = staged {
                c.restore_volume(w, &user, &old, &new_id, &m)?;
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
            let user = c.reg.user(&w.directory_id, &w.user_name).map_err(ApiError::internal)?.ok_or_else(|| ApiError::new(ApiErrorCode::UserNotFound, w.user_name.clone()))?;
            let store = c.snapshot_store()?;
            let (root, home) = c
                .latest_restore_point(store.as_ref(), &w.workspace_id)?
                .ok_or_else(|| ApiError::new(ApiErrorCode::InvalidResourceState, format!("WorkSpace {} has no snapshot of both volumes to restore from (create-snapshot first)", w.workspace_id)))?;
            check_owner(&root, w, &user)?;
            check_owner(&home, w, &user)?;
            let vols = c.reg.volumes(Some(&w.workspace_id)).map_err(ApiError::internal)?;
            let mut plan = Vec::new();
            for (kind, m) in [(VolumeKind::Root, root), (VolumeKind::User, home)] {
                let old = vols.iter().find(|v| v.kind == kind).ok_or_else(|| ApiError::internal(format!("WorkSpace {} has no {kind} volume", w.workspace_id)))?;
                plan.push((old.clone(), m));
            }
            // Every volume is fetched and checked before the WorkSpace is touched.
            let staged = c.stage(store.as_ref(), &plan)?;
            w.state = next;
            c.reg.update_workspace(w).map_err(ApiError::internal)?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            for (old, new_id, m) in staged {
                c.restore_volume(w, &user, &old, &new_id, &m)?;
            }
            c.bring_up(w)
        })
    }

    /// Fetches each snapshot into the file of a new volume id. All or nothing: on any
    /// failure the files fetched so far are removed.
    pub(super) fn stage(
        &self,
        store: &dyn SnapshotStore,
        plan: &[(Volume, Manifest)],
    ) -> Result<Vec<(Volume, String, Manifest)>, ApiError> {
        let mut staged: Vec<(Volume, String, Manifest)> = Vec::new();
        for (old, m) in plan {
            let volume_id = ids::volume_id();
            if let Err(e) = self.fetch_volume(store, m, &self.volume_path(&volume_id)) {
                for (_, id, _) in &staged {
                    let path = self.volume_path(id);
                    let _ = std::fs::remove_file(crate::snapshot::dirty::DirtyMap::path_for(&path));
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
            staged.push((old.clone(), volume_id, m.clone()));
        }
        Ok(staged)
    }

    /// Makes the fetched file of `volume_id` the WorkSpace's volume in place of `old`: an
    /// encrypted blob is re-encrypted from the snapshot's context to the new volume's
    /// (ReEncrypt under a new EBS grant, as EBS does), the old volume's grant retired.
    pub(super) fn restore_volume(
        &self,
        w: &Workspace,
        user: &User,
        old: &Volume,
        volume_id: &str,
        snap: &Manifest,
    ) -> Result<(), ApiError> {
        let path = self.volume_path(volume_id);
        let mut row = Volume {
            volume_id: volume_id.to_string(),
            path: path.clone(),
            grant_id: None,
            ..old.clone()
        };
        if snap.encrypted {
            let token = snap.kms.clone().ok_or_else(|| {
                ApiError::internal(format!("snapshot {} has no KMS token", snap.own_key()))
            })?;
            row.grant_id = Some(self.rebind(w, user, &path, volume_id, token)?);
            row.key_arn = w.key_arn.clone().or_else(|| old.key_arn.clone());
        }
        // The file is final (header re-bound): changes are counted from this snapshot.
        crate::snapshot::dirty::DirtyMap::reset(&path, snap.chunks.len() as u64, &snap.own_key())
            .map_err(ApiError::internal)?;
        self.reg.put_volume(&row).map_err(ApiError::internal)?;
        // An imported volume's predecessor lives on another host: nothing of it is here.
        if old.volume_id != volume_id && !old.path.as_os_str().is_empty() {
            if let (Some(key), Some(grant)) = (old.key_arn.as_deref(), old.grant_id.as_deref())
                && let Ok(service) = self.service()
            {
                let _ = service.retire_grant(key, grant);
            }
            self.reg
                .delete_volume(&old.volume_id)
                .map_err(ApiError::internal)?;
            let _ = std::fs::remove_file(crate::snapshot::dirty::DirtyMap::path_for(&old.path));
            let _ = std::fs::remove_file(&old.path);
        }
        Ok(())
    }

    /// Re-binds the data key in the header of `path` (from a snapshot) to `volume_id`'s
    /// context and gives EBS a grant for it; returns the grant id.
    pub(super) fn rebind(
        &self,
        w: &Workspace,
        user: &User,
        path: &Path,
        volume_id: &str,
        token: KmsToken,
    ) -> Result<String, ApiError> {
        let key = token.key_arn.clone();
        let service = self.service().map_err(ApiError::internal)?;
        let new_ctx = volume_context(&user.sid, &w.directory_id, volume_id);
        let grant = service
            .create_grant(&ebs_grant(&key, &new_ctx, volume_id))
            .map_err(|e| ApiError::from_kms(&e))?;
        // The WorkSpaces service re-encrypts under its own grant, which covers every
        // context of this user: the snapshot's volume may be gone (and its EBS grant
        // retired), on this host or on the one the WorkSpace came from.
        let rebound = service
            .re_encrypt(
                &token.ciphertext_blob,
                &token.encryption_context,
                &key,
                &new_ctx,
                std::slice::from_ref(&grant.grant_token),
            )
            .map_err(|e| {
                let _ = service.retire_grant(&key, &grant.grant_id);
                ApiError::from_kms(&e)
            })?;
        let (blob, arn) = rebound;
        let mut header = volume::read_header(path).map_err(ApiError::internal)?;
        header.set_kms_token(KmsToken {
            key_arn: if arn.is_empty() { key } else { arn },
            ciphertext_blob: blob,
            encryption_context: new_ctx,
            volume_id: volume_id.to_string(),
            workspace_id: w.workspace_id.clone(),
            ..token
        });
        let backing = crate::backing::FileBacking::open(path).map_err(ApiError::internal)?;
        header.write(&backing).map_err(ApiError::internal)?;
        Ok(grant.grant_id)
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

    /// Sets how the agent caches the WorkSpace's volume files on the host; a running
    /// agent keeps its mode until the next start, reboot, rebuild or restore. Returns
    /// whether anything changed.
    ///
    /// # Errors
    /// No such WorkSpace, it is terminated, or the registry fails.
    pub fn set_cache_mode(
        &self,
        workspace_id: &str,
        mode: crate::backing::CacheMode,
    ) -> Result<bool, ControllerError> {
        let mut w = self.existing_workspace(workspace_id)?;
        if w.state == WorkspaceState::Terminated {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!("WorkSpace {workspace_id} is terminated"),
            ));
        }
        if w.cache_mode == mode {
            return Ok(false);
        }
        w.cache_mode = mode;
        self.reg.update_workspace(&w).map_err(ApiError::internal)?;
        Ok(true)
    }
}
