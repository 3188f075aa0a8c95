//! Snapshots and images: consistent copies of a WorkSpace's volumes.

use std::path::PathBuf;

use super::agent::AgentPaths;
use super::api::SnapshotView;
use super::error::{ApiErrorCode, ControllerError, api};
use super::ids;
use super::kind::VolumeKind;
use super::registry::{Registry, Snapshot};
use super::state::WorkspaceState;
use super::workspaces::{Controller, copy_sparse};

impl Controller {
    /// `create-snapshot`: copies ciphertext + header of both volumes (filesystems frozen
    /// while running, so the copy is consistent). Snapshots stay encrypted under the same
    /// data key.
    ///
    /// # Errors
    /// Unknown WorkSpace, bad state, copy failure.
    pub fn create_snapshot(
        &self,
        workspace_id: &str,
    ) -> Result<Vec<SnapshotView>, ControllerError> {
        let mut w = self.existing_workspace(workspace_id)?;
        self.refresh(&mut w);
        if !matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Stopped | WorkspaceState::Impaired
        ) {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!(
                    "cannot snapshot WorkSpace {workspace_id} while it is {}",
                    w.state
                ),
            ));
        }
        let paths = AgentPaths::new(&self.cfg.state_dir, workspace_id);
        let running = w.state != WorkspaceState::Stopped;
        let frozen: Vec<PathBuf> = if running {
            vec![paths.mnt_dir.join("home"), paths.mnt_dir.clone()]
        } else {
            Vec::new()
        };
        for m in &frozen {
            crate::host::run("fsfreeze", &["-f", &m.display().to_string()])
                .map_err(ControllerError::from)?;
        }
        let copies: Result<Vec<SnapshotView>, ControllerError> = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .map(|v| {
                let snapshot_id = ids::snapshot_id();
                let kind = v.kind;
                let path = self
                    .cfg
                    .state_dir
                    .join("snapshots")
                    .join(format!("{snapshot_id}.img"));
                copy_sparse(&v.path, &path)?;
                self.reg.add_snapshot(&Snapshot {
                    snapshot_id: snapshot_id.clone(),
                    volume_id: v.volume_id.clone(),
                    workspace_id: workspace_id.into(),
                    kind: v.kind,
                    path,
                    created: Registry::now(),
                })?;
                Ok(SnapshotView {
                    snapshot_id,
                    volume_id: v.volume_id,
                    kind,
                    encrypted: v.encrypted,
                })
            })
            .collect();
        for m in frozen.iter().rev() {
            let _ = crate::host::run("fsfreeze", &["-u", &m.display().to_string()]);
        }
        copies
    }

    pub(super) fn latest_snapshot(
        &self,
        workspace_id: &str,
        kind: VolumeKind,
    ) -> Result<Option<Snapshot>, ControllerError> {
        Ok(self
            .reg
            .snapshots(workspace_id)?
            .into_iter()
            .find(|s| s.kind == kind))
    }

    /// `create-workspace-image`: refused for encrypted WorkSpaces (as the API does).
    ///
    /// # Errors
    /// Encrypted or unknown WorkSpace, copy failure.
    pub fn create_image(
        &self,
        workspace_id: &str,
        name: &str,
        description: &str,
    ) -> Result<serde_json::Value, ControllerError> {
        let w = self.existing_workspace(workspace_id)?;
        if w.root_encrypted || w.user_encrypted {
            return Err(api(
                ApiErrorCode::OperationNotSupported,
                format!(
                    "WorkSpace {workspace_id} has encrypted volumes; images cannot be created from encrypted WorkSpaces"
                ),
            ));
        }
        if !matches!(w.state, WorkspaceState::Available | WorkspaceState::Stopped) {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!("WorkSpace {workspace_id} is {}", w.state),
            ));
        }
        let root = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .find(|v| v.kind == VolumeKind::Root)
            .ok_or_else(|| ControllerError::NoRootVolume)?;
        let image_id = ids::image_id();
        let path = self
            .cfg
            .state_dir
            .join("images")
            .join(format!("{image_id}.img"));
        copy_sparse(&root.path, &path)?;
        self.reg
            .add_image(&image_id, name, description, workspace_id, &path)?;
        Ok(
            serde_json::json!({"ImageId": image_id, "Name": name, "Description": description, "State": "AVAILABLE", "OperatingSystem": {"Type": "LINUX"}}),
        )
    }
}
