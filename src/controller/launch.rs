//! Launch (`create-workspaces`): key check, grants, data keys, volume files, agent start.

use std::path::Path;
use std::time::Instant;

use crate::kms::{KeyInfo, KmsClient};
use crate::luks2::KmsToken;
use crate::secret::VolumeKey;
use crate::volume::{self, CreateParams, Encryption, GIB};
use crate::xts::SectorSize;

use super::api::{
    CreateResult, FailedRequest, MAX_BATCH, WorkspaceProperties, WorkspaceRequest, WorkspaceView,
};
use super::binding::volume_context;
use super::binding::{
    DEFAULT_KEY_ALIAS, VolumeBinding, check_new_key, ebs_grant, new_data_key, workspaces_grant,
};
use super::error::{ApiError, ApiErrorCode, ControllerError, api};
use super::ids;
use super::kind::VolumeKind;
use super::registry::{Bundle, RegistryError, User, Volume, Workspace};
use super::state::{Event, WorkspaceState};
use super::workspaces::Controller;

impl Controller {
    /// `create-workspaces`: launches each request (the seed's eight steps).
    ///
    /// # Errors
    /// Only set-up failures; per-request problems land in `FailedRequests`.
    pub fn create_workspaces(
        &self,
        requests: Vec<WorkspaceRequest>,
    ) -> Result<CreateResult, ControllerError> {
        let mut result = CreateResult::default();
        if requests.len() > MAX_BATCH {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("at most {MAX_BATCH} WorkSpaces per request"),
            ));
        }
        self.authenticate_caller()?;
        for req in requests {
            match self.launch(&req) {
                Ok(view) => result.pending_requests.push(view),
                Err(e) => result.failed_requests.push(FailedRequest {
                    workspace_id: None,
                    workspace_request: Some(req),
                    error_code: e.code,
                    error_message: e.message,
                }),
            }
        }
        Ok(result)
    }

    pub(super) fn launch(&self, req: &WorkspaceRequest) -> Result<WorkspaceView, ApiError> {
        let reg_err = |e: RegistryError| ApiError::internal(e);
        if !self.reg.has_directory(&req.directory_id).map_err(reg_err)? {
            return Err(ApiError::new(
                ApiErrorCode::DirectoryNotFound,
                format!("directory {} is not registered", req.directory_id),
            ));
        }
        let user = self
            .reg
            .user(&req.directory_id, &req.user_name)
            .map_err(reg_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ApiErrorCode::UserNotFound,
                    format!(
                        "user {} is not in directory {}",
                        req.user_name, req.directory_id
                    ),
                )
            })?;
        let bundle = self
            .reg
            .bundle(&req.bundle_id)
            .map_err(reg_err)?
            .ok_or_else(|| {
                ApiError::new(
                    ApiErrorCode::BundleNotFound,
                    format!("bundle {} does not exist", req.bundle_id),
                )
            })?;
        let existing = self.reg.workspaces().map_err(reg_err)?;
        if let Some(w) = existing.iter().find(|w| {
            w.directory_id == req.directory_id
                && w.user_name == req.user_name
                && w.state != WorkspaceState::Terminated
        }) {
            return Err(ApiError::new(
                ApiErrorCode::WorkspaceExists,
                format!(
                    "user {} already has WorkSpace {} in {} (one per user and directory)",
                    req.user_name, w.workspace_id, req.directory_id
                ),
            ));
        }
        let props = req
            .workspace_properties
            .clone()
            .unwrap_or(WorkspaceProperties {
                root_volume_size_gib: bundle.size_gib,
                user_volume_size_gib: 10,
                cache_mode: None,
            });
        if props.root_volume_size_gib < bundle.size_gib {
            return Err(ApiError::new(
                ApiErrorCode::InvalidParameterValues,
                format!(
                    "root volume ({} GiB) is smaller than bundle {} ({} GiB)",
                    props.root_volume_size_gib, bundle.bundle_id, bundle.size_gib
                ),
            ));
        }
        if props.user_volume_size_gib == 0
            || props.user_volume_size_gib > 2000
            || props.root_volume_size_gib > 2000
        {
            return Err(ApiError::new(
                ApiErrorCode::InvalidParameterValues,
                "volume sizes must be between 1 and 2000 GiB",
            ));
        }
        let encrypt_any = req.root_volume_encryption_enabled || req.user_volume_encryption_enabled;
        if req.volume_encryption_key.is_some() && !encrypt_any {
            return Err(ApiError::new(
                ApiErrorCode::InvalidParameterValues,
                "--volume-encryption-key given but neither --root-volume-encryption-enabled nor --user-volume-encryption-enabled",
            ));
        }

        // Step 1: the key exists, is symmetric and enabled (the WorkSpaces service checks it
        // for the administrator).
        let mut key: Option<KeyInfo> = None;
        let mut ws_client = None;
        if encrypt_any {
            let client = self
                .service_for_admin()
                .map_err(|e| ApiError::new(ApiErrorCode::KmsUnavailable, e.to_string()))?;
            let key_id = req
                .volume_encryption_key
                .clone()
                .unwrap_or_else(|| DEFAULT_KEY_ALIAS.to_string());
            let info = check_new_key(&client, &key_id, "launch")?;
            key = Some(info);
            ws_client = Some(client);
        }

        let workspace_id = ids::workspace_id();
        let mut ws = Workspace {
            workspace_id: workspace_id.clone(),
            directory_id: req.directory_id.clone(),
            user_name: req.user_name.clone(),
            bundle_id: req.bundle_id.clone(),
            state: WorkspaceState::Pending,
            key_arn: key.as_ref().map(|k| k.arn.clone()),
            root_encrypted: req.root_volume_encryption_enabled,
            user_encrypted: req.user_volume_encryption_enabled,
            root_size_gib: props.root_volume_size_gib,
            user_size_gib: props.user_volume_size_gib,
            ws_grant_id: None,
            error: None,
            cache_mode: props.cache_mode.unwrap_or(super::api::DEFAULT_CACHE_MODE),
        };
        self.reg.insert_workspace(&ws).map_err(reg_err)?;
        let outcome =
            self.launch_volumes(&mut ws, &user, &bundle, key.as_ref(), ws_client.as_ref());
        if let Err(e) = outcome {
            // Undo: grants retired, files removed, the row marked ERROR with the reason.
            self.teardown(&ws);
            if let Ok(next) = ws.state.on(Event::Failed) {
                ws.state = next;
            }
            ws.error = Some(format!("{}: {}", e.code, e.message));
            let _ = self.reg.update_workspace(&ws);
            return Err(e);
        }
        match self.start_agent(&ws.workspace_id) {
            Ok(()) => {
                ws.state = ws
                    .state
                    .on(Event::Launched)
                    .map_err(|e| ApiError::new(ApiErrorCode::InternalError, e.to_string()))?;
                self.reg.update_workspace(&ws).map_err(reg_err)?;
                Ok(self.view(&ws, None))
            }
            Err(e) => {
                if let Ok(next) = ws.state.on(Event::Failed) {
                    ws.state = next;
                }
                ws.error = Some(e.clone());
                let _ = self.reg.update_workspace(&ws);
                Err(ApiError::new(ApiErrorCode::InternalError, e))
            }
        }
    }

    /// Steps 2–7: grants, data keys, volume files.
    pub(super) fn launch_volumes(
        &self,
        ws: &mut Workspace,
        user: &User,
        bundle: &Bundle,
        key: Option<&KeyInfo>,
        ws_client: Option<&KmsClient>,
    ) -> Result<(), ApiError> {
        let mut ws_grant_token = Vec::new();
        if let (Some(key), Some(client)) = (key, ws_client) {
            // Step 2: a grant for the WorkSpaces service, constrained to this user.
            let grant = client
                .create_grant(&workspaces_grant(
                    &key.arn,
                    &user.sid,
                    &ws.directory_id,
                    &ws.workspace_id,
                ))
                .map_err(|e| ApiError::from_kms(&e))?;
            ws.ws_grant_id = Some(grant.grant_id);
            ws_grant_token.push(grant.grant_token);
            self.reg.update_workspace(ws).map_err(ApiError::internal)?;
        }
        let service = if key.is_some() {
            Some(self.service().map_err(ApiError::internal)?)
        } else {
            None
        };
        let ebs = if key.is_some() {
            Some(self.ebs().map_err(ApiError::internal)?)
        } else {
            None
        };
        for (kind, encrypted, size_gib) in [
            (VolumeKind::Root, ws.root_encrypted, ws.root_size_gib),
            (VolumeKind::User, ws.user_encrypted, ws.user_size_gib),
        ] {
            let volume_id = ids::volume_id();
            let path = self.volume_path(&volume_id);
            let mut row = Volume {
                volume_id: volume_id.clone(),
                workspace_id: ws.workspace_id.clone(),
                kind,
                path: path.clone(),
                encrypted,
                key_arn: None,
                grant_id: None,
                size_gib,
                formatted: kind == VolumeKind::Root,
            };
            let data_key = match (encrypted, key, service.as_ref(), ebs.as_ref()) {
                (true, Some(key), Some(service), Some(ebs)) => {
                    let context = volume_context(&user.sid, &ws.directory_id, &volume_id);
                    // Step 3: one EBS grant per volume, for exactly this volume's context.
                    let grant = service
                        .create_grant(&ebs_grant(&key.arn, &context, &volume_id))
                        .map_err(|e| ApiError::from_kms(&e))?;
                    row.key_arn = Some(key.arn.clone());
                    row.grant_id = Some(grant.grant_id.clone());
                    self.reg.put_volume(&row).map_err(ApiError::internal)?;
                    // Steps 4–5: EBS generates the data key without plaintext, then
                    // unwraps it (as it does at attach) to write the header digest.
                    let binding = VolumeBinding {
                        key_arn: &key.arn,
                        sid: &user.sid,
                        directory_id: &ws.directory_id,
                        workspace_id: &ws.workspace_id,
                        volume_id: &volume_id,
                        kind,
                    };
                    Some(
                        new_data_key(ebs, &binding, &[grant.grant_token])
                            .map_err(|e| ApiError::from_kms(&e))?,
                    )
                }
                _ => None,
            };
            self.reg.put_volume(&row).map_err(ApiError::internal)?;
            self.make_volume(
                &row,
                data_key.as_ref().map(|(k, t)| (k, t.clone())),
                (kind == VolumeKind::Root).then_some(bundle),
            )
            .map_err(ApiError::internal)?;
        }
        Ok(())
    }

    /// Creates a volume file (encrypted with `key` + token, or plain) and, for a root
    /// volume, fills it from the bundle image.
    pub(super) fn make_volume(
        &self,
        v: &Volume,
        key: Option<(&VolumeKey, KmsToken)>,
        bundle: Option<&Bundle>,
    ) -> Result<(), ControllerError> {
        // The file is rewritten behind any agent's back: changes since the last snapshot
        // are unknown from here on.
        let _ = std::fs::remove_file(crate::snapshot::dirty::DirtyMap::path_for(&v.path));
        let size = v.size_gib * GIB;
        let encryption = key.as_ref().map(|(k, t)| Encryption {
            key: k,
            token: Some(t.clone()),
            label: format!("{}-{}", v.kind, v.volume_id),
        });
        volume::create(&CreateParams {
            path: &v.path,
            size,
            sector_size: SectorSize::S4096,
            force: true,
            encryption,
        })
        .map_err(ControllerError::from)?;
        if let Some(bundle) = bundle {
            let opened = match &key {
                Some((k, _)) => volume::open_encrypted(&v.path, k),
                None => volume::open_plain(&v.path),
            }
            .map_err(ControllerError::from)?;
            let progress = self.fill_progress.as_deref().unwrap_or(&|_, _| {});
            fill_from_image(&opened.device, &bundle.image_path, progress)?;
        }
        Ok(())
    }
}

/// Copies an image into a device, skipping all-zero chunks (they are holes already), with a
/// `progress` told (bytes done, total) as it goes.
pub(super) fn fill_from_image(
    device: &crate::device::Device,
    image: &Path,
    progress: &(dyn Fn(u64, u64) + Send + Sync),
) -> Result<(), ControllerError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image).map_err(|source| ControllerError::Io {
        path: image.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| ControllerError::Io {
            path: image.to_path_buf(),
            source,
        })?
        .len();
    if len > device.size() {
        return Err(ControllerError::ImageTooLarge {
            image: image.to_path_buf(),
            len,
        });
    }
    progress(0, len);
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(buf.len() as u64)).expect("at most 1 MiB");
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|source| ControllerError::Io {
                path: image.to_path_buf(),
                source,
            })?;
        if buf[..n].iter().any(|&b| b != 0) {
            device
                .write(off, &buf[..n])
                .map_err(ControllerError::from)?;
        }
        off += n as u64;
        progress(off, len);
    }
    device.flush().map_err(ControllerError::from)?;
    tracing::info!("filled {} bytes in {:?}", len, started.elapsed());
    Ok(())
}
