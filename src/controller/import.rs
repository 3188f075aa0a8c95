//! `import-workspace`: another host takes a WorkSpace from its latest snapshots in the
//! shared store and serves it.
//!
//! The volumes get new ids (their own `aws:ebs:id`); each data key blob is re-encrypted
//! from the snapshot's context to the new volume's under a new EBS grant, as EBS does.
//!
//! Two hosts never serve one WorkSpace: the WorkSpaces service's grant on the key, named
//! `workspaces-<ws-id>`, is the lease. A host holds it from launch (or import) until
//! terminate retires it. An importing host first creates its own grant, then lists the
//! key's grants: any other live grant of that name means another host holds the
//! WorkSpace, so it retires its own and refuses. Create-then-check on the KMS's single
//! ordered store means two importers racing can both back off but never both win. (The
//! store cannot be the guard: Garage accepts a second `PutObject` with `If-None-Match: *`.)

use crate::kms::KmsClient;

use super::api::WorkspaceView;
use super::binding::{check_new_key, workspaces_grant};
use super::error::{ApiError, ApiErrorCode, ControllerError, api};
use super::kind::VolumeKind;
use super::registry::{User, Volume, Workspace};
use super::state::{Event, WorkspaceState};
use super::workspaces::Controller;

impl Controller {
    /// `import-workspace`: takes `workspace_id` from its latest snapshots of both volumes.
    ///
    /// # Errors
    /// No snapshots, directory or user unknown here, the WorkSpace is held by another
    /// host, the key is not usable, the store or a chunk failed (nothing is left behind).
    pub fn import_workspace(&self, workspace_id: &str) -> Result<WorkspaceView, ControllerError> {
        self.authenticate_caller()?;
        if let Some(w) = self.reg.workspace(workspace_id)?
            && w.state != WorkspaceState::Terminated
        {
            return Err(api(
                ApiErrorCode::WorkspaceExists,
                format!(
                    "WorkSpace {workspace_id} is already on this host ({})",
                    w.state
                ),
            ));
        }
        let store = self.snapshot_store()?;
        let (root, home) = self
            .latest_restore_point(store.as_ref(), workspace_id)?
            .ok_or_else(|| {
                api(
                    ApiErrorCode::ResourceNotFound,
                    format!(
                        "{} holds no snapshot of both volumes of WorkSpace {workspace_id} (create-snapshot on the host that serves it)",
                        store.describe()
                    ),
                )
            })?;
        let meta = home.workspace.clone();
        if root.workspace != meta || meta.workspace_id != workspace_id {
            return Err(api(
                ApiErrorCode::SnapshotCorrupted,
                format!(
                    "the snapshots of WorkSpace {workspace_id} disagree about which WorkSpace they belong to"
                ),
            ));
        }
        let user = self.import_user(&meta.directory_id, &meta.user_name, &meta.user_sid)?;
        let mut ws = Workspace {
            workspace_id: workspace_id.to_string(),
            directory_id: meta.directory_id.clone(),
            user_name: meta.user_name.clone(),
            bundle_id: meta.bundle_id.clone(),
            state: WorkspaceState::Pending,
            key_arn: meta.key_arn.clone(),
            root_encrypted: meta.root_encrypted,
            user_encrypted: meta.user_encrypted,
            root_size_gib: meta.root_size_gib,
            user_size_gib: meta.user_size_gib,
            ws_grant_id: None,
            error: None,
            // A host's own choice: the snapshots do not carry it.
            cache_mode: super::api::DEFAULT_CACHE_MODE,
        };
        let key_arn = ws
            .key_arn
            .clone()
            .filter(|_| ws.root_encrypted || ws.user_encrypted);
        let Some(key_arn) = key_arn else {
            return Err(api(
                ApiErrorCode::UnsupportedWorkspaceConfiguration,
                format!(
                    "WorkSpace {workspace_id} has no encrypted volume: the guard that keeps two hosts from serving it is its KMS grant, so only WorkSpaces with encrypted volumes can be imported"
                ),
            ));
        };
        let client = self
            .service_for_admin()
            .map_err(|e| ApiError::new(ApiErrorCode::KmsUnavailable, e.to_string()))?;
        let key = check_new_key(&client, &key_arn, "import")?;
        let grant = self.take_lease(&client, &key.arn, &user, &ws)?;
        ws.ws_grant_id = Some(grant);
        ws.key_arn = Some(key.arn.clone());
        self.reg.insert_workspace(&ws)?;
        if let Err(e) = self.import_volumes(&ws, &user, store.as_ref(), [root, home]) {
            self.teardown(&ws);
            if let Ok(next) = ws.state.on(Event::Failed) {
                ws.state = next;
            }
            ws.error = Some(format!("{}: {}", e.code, e.message));
            let _ = self.reg.update_workspace(&ws);
            return Err(e.into());
        }
        match self.start_agent(workspace_id) {
            Ok(()) => {
                ws.state = ws.state.on(Event::Launched).map_err(ApiError::internal)?;
                self.reg.update_workspace(&ws)?;
                Ok(self.view(&ws, Some(&key)))
            }
            Err(e) => {
                if let Ok(next) = ws.state.on(Event::Failed) {
                    ws.state = next;
                }
                ws.error = Some(e.clone());
                let _ = self.reg.update_workspace(&ws);
                Err(api(ApiErrorCode::AttachFailed, e))
            }
        }
    }

    /// The snapshot's owner must be a user of this host's directory, with the same SID
    /// (the SID is part of every volume's encryption context).
    fn import_user(&self, directory_id: &str, name: &str, sid: &str) -> Result<User, ApiError> {
        if !self
            .reg
            .has_directory(directory_id)
            .map_err(ApiError::internal)?
        {
            return Err(ApiError::new(
                ApiErrorCode::DirectoryNotFound,
                format!(
                    "directory {directory_id} is not registered on this host; register it (register-workspace-directory) and add user {name} first"
                ),
            ));
        }
        let user = self
            .reg
            .user(directory_id, name)
            .map_err(ApiError::internal)?
            .ok_or_else(|| {
                ApiError::new(
                    ApiErrorCode::UserNotFound,
                    format!("user {name} is not in directory {directory_id} on this host; add them first (SID {sid})"),
                )
            })?;
        if user.sid != sid {
            return Err(ApiError::new(
                ApiErrorCode::InvalidResourceState,
                format!(
                    "user {name} in {directory_id} has SID {} here but the snapshots belong to SID {sid}: they are another user's WorkSpace",
                    user.sid
                ),
            ));
        }
        if let Some(other) = self
            .reg
            .workspaces()
            .map_err(ApiError::internal)?
            .into_iter()
            .find(|w| {
                w.directory_id == directory_id
                    && w.user_name == name
                    && w.state != WorkspaceState::Terminated
            })
        {
            return Err(ApiError::new(
                ApiErrorCode::WorkspaceExists,
                format!(
                    "user {name} already has WorkSpace {} in {directory_id} on this host (one per user and directory)",
                    other.workspace_id
                ),
            ));
        }
        Ok(user)
    }

    /// Creates this host's `workspaces-<ws-id>` grant, then refuses (retiring it) if
    /// another live grant of that name exists.
    fn take_lease(
        &self,
        client: &KmsClient,
        key_arn: &str,
        user: &User,
        ws: &Workspace,
    ) -> Result<String, ApiError> {
        let spec = workspaces_grant(key_arn, &user.sid, &ws.directory_id, &ws.workspace_id);
        let name = spec.name.clone().unwrap_or_default();
        let grant = client
            .create_grant(&spec)
            .map_err(|e| ApiError::from_kms(&e))?;
        let others: Vec<String> = match client.list_named_grants(key_arn) {
            Ok(all) => all
                .into_iter()
                .filter(|(id, n)| *n == name && *id != grant.grant_id)
                .map(|(id, _)| id)
                .collect(),
            Err(e) => {
                let _ = client.retire_grant(key_arn, &grant.grant_id);
                return Err(ApiError::from_kms(&e));
            }
        };
        if !others.is_empty() {
            let _ = client.retire_grant(key_arn, &grant.grant_id);
            return Err(ApiError::new(
                ApiErrorCode::ResourceInUse,
                format!(
                    "WorkSpace {} is held by another host (its WorkSpaces grant {} on {key_arn} is live); terminate it there first, then import",
                    ws.workspace_id,
                    others.join(", ")
                ),
            ));
        }
        Ok(grant.grant_id)
    }

    fn import_volumes(
        &self,
        ws: &Workspace,
        user: &User,
        store: &dyn crate::snapshot::store::SnapshotStore,
        manifests: [crate::snapshot::manifest::Manifest; 2],
    ) -> Result<(), ApiError> {
        let plan: Vec<_> = manifests
            .into_iter()
            .zip([VolumeKind::Root, VolumeKind::User])
            .map(|(m, kind)| {
                let old = Volume {
                    volume_id: m.volume_id.clone(),
                    workspace_id: ws.workspace_id.clone(),
                    kind,
                    path: std::path::PathBuf::new(),
                    encrypted: m.encrypted,
                    key_arn: ws.key_arn.clone().filter(|_| m.encrypted),
                    grant_id: None,
                    size_gib: if kind == VolumeKind::Root {
                        ws.root_size_gib
                    } else {
                        ws.user_size_gib
                    },
                    formatted: true,
                };
                (old, m)
            })
            .collect();
        let staged = self.stage(store, &plan)?;
        for (i, (old, new_id, m)) in staged.iter().enumerate() {
            if let Err(e) = self.restore_volume(ws, user, old, new_id, m) {
                // Files not yet recorded as volumes are not torn down with the WorkSpace.
                for (_, id, _) in &staged[i..] {
                    let _ = std::fs::remove_file(self.volume_path(id));
                }
                return Err(e);
            }
        }
        Ok(())
    }
}
