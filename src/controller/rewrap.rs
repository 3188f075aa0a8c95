//! Key changes of an existing WorkSpace: fresh data keys, rewrap under another KMS key
//! (ReEncrypt of the blobs), rekey of the data (every sector re-encrypted).

use crate::kms::{KmsClient, KmsError};
use crate::luks2::KmsToken;
use crate::secret::VolumeKey;
use crate::volume;

use super::agent::AgentPaths;
use super::api::VolumeView;
use super::binding::{self, VolumeBinding, check_new_key_info, ebs_grant, workspaces_grant};
use super::binding::{unwrap_volume_key, volume_context};
use super::error::{ApiErrorCode, ControllerError, api, serving};
use super::registry::{User, Volume, Workspace};
use super::state::WorkspaceState;
use super::workspaces::Controller;

impl Controller {
    /// A fresh data key for an existing volume id (same context, same EBS grant).
    pub(super) fn new_data_key(
        &self,
        w: &Workspace,
        user: &User,
        v: &Volume,
    ) -> Result<(VolumeKey, KmsToken), KmsError> {
        let ebs = KmsClient::connect_to(&self.cfg.ebs_profile, &self.cfg.kms)?;
        let binding = VolumeBinding {
            // An encrypted volume always has a key; the KMS refuses an empty one.
            key_arn: v.key_arn.as_deref().unwrap_or_default(),
            sid: &user.sid,
            directory_id: &w.directory_id,
            workspace_id: &w.workspace_id,
            volume_id: &v.volume_id,
            kind: v.kind,
        };
        binding::new_data_key(&ebs, &binding, &[])
    }

    /// `rewrap-volume`: re-encrypts every volume's data-key blob of a WorkSpace under
    /// another KMS key (ReEncrypt; no data rewritten), with new grants on that key and an
    /// atomic header update per volume; the old key's grants are retired, so the old key
    /// can then be disabled and the WorkSpace still reboots.
    ///
    /// # Errors
    /// Unknown or unencrypted WorkSpace, unusable key, KMS refusals (nothing is changed
    /// for a volume whose rewrap failed; volumes already rewrapped stay valid).
    pub fn rewrap(
        &self,
        workspace_id: &str,
        new_key: &str,
    ) -> Result<Vec<VolumeView>, ControllerError> {
        let mut w = self.existing_workspace(workspace_id)?;
        let Some(old_key) = w.key_arn.clone() else {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!("WorkSpace {workspace_id} has no encrypted volume to rewrap"),
            ));
        };
        if matches!(
            w.state,
            WorkspaceState::Terminating | WorkspaceState::Terminated | WorkspaceState::Pending
        ) {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!("WorkSpace {workspace_id} is {}", w.state),
            ));
        }
        let user = self
            .reg
            .user(&w.directory_id, &w.user_name)?
            .ok_or_else(|| ControllerError::UserVanished(w.user_name.clone()))?;
        let admin = self.service_for_admin()?;
        let info = admin.describe_key(new_key)?;
        check_new_key_info(&info, "rewrap")?;
        if info.arn == old_key {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("WorkSpace {workspace_id} is already under {}", info.arn),
            ));
        }
        for v in self.reg.volumes(Some(workspace_id))? {
            if let Ok(h) = volume::read_header(&v.path)
                && crate::rekey::in_progress(&h)
            {
                return Err(api(
                    ApiErrorCode::InvalidResourceState,
                    format!(
                        "volume {} is being rekeyed; rewrap after the rekey finishes",
                        v.volume_id
                    ),
                ));
            }
        }
        let old_ws_grant = w.ws_grant_id.clone();
        // A WorkSpaces grant on the new key, for this user.
        let ws_grant = admin.create_grant(&workspaces_grant(
            &info.arn,
            &user.sid,
            &w.directory_id,
            workspace_id,
        ))?;
        let service = self.service()?;
        let ebs = self.ebs()?;
        for v in self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .filter(|v| v.encrypted)
        {
            let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
            let grant = service.create_grant(&ebs_grant(&info.arn, &context, &v.volume_id))?;
            let mut header = volume::read_header(&v.path).map_err(ControllerError::from)?;
            let token = header
                .kms_token()
                .cloned()
                .ok_or_else(|| ControllerError::NoKmsToken(v.volume_id.clone()))?;
            let (blob, arn) = ebs.re_encrypt(
                &token.ciphertext_blob,
                &context,
                &info.arn,
                &context,
                std::slice::from_ref(&grant.grant_token),
            )?;
            header.set_kms_token(KmsToken {
                key_arn: if arn.is_empty() {
                    info.arn.clone()
                } else {
                    arn
                },
                ciphertext_blob: blob,
                ..token
            });
            let backing = crate::backing::FileBacking::open(&v.path).map_err(serving)?;
            header.write(&backing).map_err(serving)?;
            let old_grant = v.grant_id.clone();
            self.reg.put_volume(&Volume {
                key_arn: Some(info.arn.clone()),
                grant_id: Some(grant.grant_id),
                ..v
            })?;
            if let Some(old_grant) = old_grant
                && let Err(e) = service.retire_grant(&old_key, &old_grant)
            {
                tracing::warn!("retiring the old EBS grant {old_grant}: {e}");
            }
        }
        w.key_arn = Some(info.arn.clone());
        w.ws_grant_id = Some(ws_grant.grant_id);
        self.reg.update_workspace(&w)?;
        if let Some(old_ws_grant) = old_ws_grant
            && let Err(e) = service.retire_grant(&old_key, &old_ws_grant)
        {
            tracing::warn!("retiring the old WorkSpaces grant {old_ws_grant}: {e}");
        }
        self.describe_volumes(Some(workspace_id))
    }

    /// `rekey-volume --workspace-id`: a new data key for each encrypted volume (or one),
    /// generated by EBS under the volume's grant and context, every sector re-encrypted.
    /// Online through the agent's control socket while the WorkSpace runs (the new key
    /// travels over the root-only socket's key file in the runtime directory, a tmpfs,
    /// deleted as soon as the agent has read it); offline when it is stopped. The new
    /// key's blob sits in the rekey checkpoint, so a crash resumes at the next attach.
    ///
    /// # Errors
    /// Unknown or unencrypted WorkSpace, key not Enabled, KMS refusal, rekey failure.
    pub fn rekey(
        &self,
        workspace_id: &str,
        volume_id: Option<&str>,
        hotzone_bytes: Option<u64>,
        mut progress: impl FnMut(&str, crate::rekey::Progress),
    ) -> Result<Vec<(String, crate::rekey::RekeyReport)>, ControllerError> {
        let mut w = self.existing_workspace(workspace_id)?;
        self.refresh(&mut w);
        if !matches!(w.state, WorkspaceState::Available | WorkspaceState::Stopped) {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!(
                    "cannot rekey WorkSpace {workspace_id} while it is {}",
                    w.state
                ),
            ));
        }
        self.require_usable_key(&w, "rekey")?;
        let user = self
            .reg
            .user(&w.directory_id, &w.user_name)?
            .ok_or_else(|| ControllerError::UserVanished(w.user_name.clone()))?;
        let vols: Vec<Volume> = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .filter(|v| v.encrypted && volume_id.is_none_or(|id| id == v.volume_id))
            .collect();
        if vols.is_empty() {
            return Err(api(
                ApiErrorCode::ResourceNotFound,
                format!(
                    "no encrypted volume {} in WorkSpace {workspace_id}",
                    volume_id.unwrap_or("")
                ),
            ));
        }
        let paths = AgentPaths::new(&self.cfg.state_dir, workspace_id);
        let running = w.state == WorkspaceState::Available;
        let mut out = Vec::new();
        for v in vols {
            // An interrupted rekey continues to the key in its checkpoint; otherwise EBS
            // makes a fresh one.
            let header = volume::read_header(&v.path).map_err(ControllerError::from)?;
            let pending = crate::rekey::state(&header)
                .map_err(serving)?
                .and_then(|st| st.new_kms_token);
            let (new_key, token) = match pending {
                Some(token) => {
                    let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
                    let key = unwrap_volume_key(&self.ebs()?, &token, &context, &[])?;
                    (key, token)
                }
                None => self.new_data_key(&w, &user, &v)?,
            };
            let report = if running {
                // The key goes to the agent over its uid-checked control socket, never
                // through a file.
                let req = crate::agent::ControlRequest::Rekey {
                    export: Some(v.kind.to_string()),
                    new_volume_key: new_key,
                    hotzone_bytes,
                    new_kms_token: Some(token),
                    resilience: crate::rekey::Resilience::Journal,
                };
                crate::agent::request_online(&paths.fuse_dir, &req, |p| {
                    progress(&v.volume_id, p);
                })
                .map_err(serving)?
            } else {
                let ebs = self.ebs()?;
                let old_token = header
                    .kms_token()
                    .cloned()
                    .ok_or_else(|| ControllerError::NoKmsToken(v.volume_id.clone()))?;
                let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
                let old_key = unwrap_volume_key(&ebs, &old_token, &context, &[])?;
                let opts = crate::rekey::RekeyOptions {
                    hotzone_bytes,
                    new_kms_token: Some(token),
                    resilience: crate::rekey::Resilience::Journal,
                };
                crate::agent::rekey_offline(&v.path, &old_key, &new_key, &opts, |p| {
                    progress(&v.volume_id, p)
                })
                .map_err(serving)?
            };
            out.push((v.volume_id.clone(), report));
        }
        Ok(out)
    }
}
