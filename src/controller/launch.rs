//! Launch (`create-workspaces`): key check, grants, data keys, volume files, agent start.

use std::path::Path;
use std::time::Instant;

use crate::kms::{KeyInfo, KmsClient};
use crate::luks2::KmsToken;
use crate::secret::VolumeKey;
use crate::volume::{self, CreateParams, Encryption, GIB};
use crate::xts::SectorSize;

use super::agent::volume_context;
use super::api::{
    CreateResult, FailedRequest, MAX_BATCH, WorkspaceProperties, WorkspaceRequest, WorkspaceView,
};
use super::binding::{
    DEFAULT_KEY_ALIAS, ebs_grant, key_state_refusal, kms_failure, workspaces_grant,
};
use super::error::{ControllerError, api};
use super::ids;
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
                "InvalidParameterValuesException",
                format!("at most {MAX_BATCH} WorkSpaces per request"),
            ));
        }
        self.authenticate_caller()?;
        for req in requests {
            match self.launch(&req) {
                Ok(view) => result.pending_requests.push(view),
                Err((code, message)) => result.failed_requests.push(FailedRequest {
                    workspace_id: None,
                    workspace_request: Some(req),
                    error_code: code,
                    error_message: message,
                }),
            }
        }
        Ok(result)
    }

    pub(super) fn launch(&self, req: &WorkspaceRequest) -> Result<WorkspaceView, (String, String)> {
        let fail = |code: &str, msg: String| (code.to_string(), msg);
        let reg_err = |e: RegistryError| ("InternalError".to_string(), e.to_string());
        if !self.reg.has_directory(&req.directory_id).map_err(reg_err)? {
            return Err(fail(
                "ResourceNotFound.Directory",
                format!("directory {} is not registered", req.directory_id),
            ));
        }
        let user = self
            .reg
            .user(&req.directory_id, &req.user_name)
            .map_err(reg_err)?
            .ok_or_else(|| {
                fail(
                    "ResourceNotFound.User",
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
                fail(
                    "ResourceNotFound.Bundle",
                    format!("bundle {} does not exist", req.bundle_id),
                )
            })?;
        let existing = self.reg.workspaces().map_err(reg_err)?;
        if let Some(w) = existing.iter().find(|w| {
            w.directory_id == req.directory_id
                && w.user_name == req.user_name
                && w.state != WorkspaceState::Terminated
        }) {
            return Err(fail(
                "ResourceExists.Workspace",
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
            });
        if props.root_volume_size_gib < bundle.size_gib {
            return Err(fail(
                "InvalidParameterValuesException",
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
            return Err(fail(
                "InvalidParameterValuesException",
                "volume sizes must be between 1 and 2000 GiB".into(),
            ));
        }
        let encrypt_any = req.root_volume_encryption_enabled || req.user_volume_encryption_enabled;
        if req.volume_encryption_key.is_some() && !encrypt_any {
            return Err(fail(
                "InvalidParameterValuesException",
                "--volume-encryption-key given but neither --root-volume-encryption-enabled nor --user-volume-encryption-enabled".into(),
            ));
        }

        // Step 1: the key exists, is symmetric and enabled (the WorkSpaces service checks it
        // for the administrator).
        let mut key: Option<KeyInfo> = None;
        let mut ws_client = None;
        if encrypt_any {
            let client = self
                .service_for_admin()
                .map_err(|e| fail("KMS.Unavailable", e.to_string()))?;
            let key_id = req
                .volume_encryption_key
                .clone()
                .unwrap_or_else(|| DEFAULT_KEY_ALIAS.to_string());
            let info = client.describe_key(&key_id).map_err(|e| kms_failure(&e))?;
            if info.spec != "SYMMETRIC_DEFAULT" {
                return Err(fail(
                    "KMS.InvalidKeyUsageException",
                    format!(
                        "key {} is {}, not a symmetric encryption key",
                        info.arn, info.spec
                    ),
                ));
            }
            if let Some(refusal) = key_state_refusal(&info, "launch") {
                return Err(refusal);
            }
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
            key_arn: key.as_ref().map(|k| k.arn.clone()).unwrap_or_default(),
            root_encrypted: req.root_volume_encryption_enabled,
            user_encrypted: req.user_volume_encryption_enabled,
            root_size_gib: props.root_volume_size_gib,
            user_size_gib: props.user_volume_size_gib,
            ws_grant_id: String::new(),
            error: String::new(),
        };
        self.reg.insert_workspace(&ws).map_err(reg_err)?;
        let outcome =
            self.launch_volumes(&mut ws, &user, &bundle, key.as_ref(), ws_client.as_ref());
        if let Err((code, message)) = outcome {
            // Undo: grants retired, files removed, the row marked ERROR with the reason.
            self.teardown(&ws);
            ws.state = WorkspaceState::Error;
            ws.error = format!("{code}: {message}");
            let _ = self.reg.update_workspace(&ws);
            return Err((code, message));
        }
        match self.start_agent(&ws.workspace_id) {
            Ok(()) => {
                ws.state = ws
                    .state
                    .on(Event::Launched)
                    .map_err(|e| fail("InternalError", e.to_string()))?;
                self.reg.update_workspace(&ws).map_err(reg_err)?;
                Ok(self.view(&ws, None))
            }
            Err(e) => {
                ws.state = WorkspaceState::Error;
                ws.error = e.clone();
                let _ = self.reg.update_workspace(&ws);
                Err(fail("InternalError", e))
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
    ) -> Result<(), (String, String)> {
        let local = |e: String| ("InternalError".to_string(), e);
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
                .map_err(|e| kms_failure(&e))?;
            ws.ws_grant_id = grant.grant_id;
            ws_grant_token.push(grant.grant_token);
            self.reg
                .update_workspace(ws)
                .map_err(|e| local(e.to_string()))?;
        }
        let service = if key.is_some() {
            Some(self.service().map_err(|e| local(e.to_string()))?)
        } else {
            None
        };
        let ebs = if key.is_some() {
            Some(self.ebs().map_err(|e| local(e.to_string()))?)
        } else {
            None
        };
        for (kind, encrypted, size_gib) in [
            ("root", ws.root_encrypted, ws.root_size_gib),
            ("user", ws.user_encrypted, ws.user_size_gib),
        ] {
            let volume_id = ids::volume_id();
            let path = self
                .cfg
                .state_dir
                .join("volumes")
                .join(format!("{volume_id}.img"));
            let mut row = Volume {
                volume_id: volume_id.clone(),
                workspace_id: ws.workspace_id.clone(),
                kind: kind.into(),
                path: path.clone(),
                encrypted,
                key_arn: String::new(),
                grant_id: String::new(),
                size_gib,
                formatted: kind == "root",
            };
            let data_key = match (encrypted, key, service.as_ref(), ebs.as_ref()) {
                (true, Some(key), Some(service), Some(ebs)) => {
                    let context = volume_context(&user.sid, &ws.directory_id, &volume_id);
                    // Step 3: one EBS grant per volume, for exactly this volume's context.
                    let grant = service
                        .create_grant(&ebs_grant(&key.arn, &context, &volume_id))
                        .map_err(|e| kms_failure(&e))?;
                    row.key_arn = key.arn.clone();
                    row.grant_id = grant.grant_id.clone();
                    self.reg
                        .put_volume(&row)
                        .map_err(|e| local(e.to_string()))?;
                    // Steps 4–5: EBS generates the data key without plaintext, then
                    // unwraps it (as it does at attach) to write the header digest.
                    let tokens = vec![grant.grant_token];
                    let (blob, key_arn) = ebs
                        .generate_data_key_without_plaintext(&key.arn, &context, &tokens)
                        .map_err(|e| kms_failure(&e))?;
                    let data_key = ebs
                        .decrypt_volume_key(&blob, &context, Some(&key.arn), &tokens)
                        .map_err(|e| kms_failure(&e))?;
                    let token = KmsToken {
                        key_arn: if key_arn.is_empty() {
                            key.arn.clone()
                        } else {
                            key_arn
                        },
                        ciphertext_blob: blob,
                        encryption_context: context,
                        volume_kind: kind.into(),
                        volume_id: volume_id.clone(),
                        workspace_id: ws.workspace_id.clone(),
                    };
                    Some((data_key, token))
                }
                _ => None,
            };
            self.reg
                .put_volume(&row)
                .map_err(|e| local(e.to_string()))?;
            self.make_volume(
                &row,
                data_key.as_ref().map(|(k, t)| (k, t.clone())),
                (kind == "root").then_some(bundle),
            )
            .map_err(|e| local(e.to_string()))?;
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
        .map_err(|e| ControllerError::Local(e.to_string()))?;
        if let Some(bundle) = bundle {
            let opened = match &key {
                Some((k, _)) => volume::open_encrypted(&v.path, k),
                None => volume::open_plain(&v.path),
            }
            .map_err(|e| ControllerError::Local(e.to_string()))?;
            fill_from_image(&opened.device, &bundle.image_path)?;
        }
        Ok(())
    }
}

/// Copies an image into a device, skipping all-zero chunks (they are holes already), with a
/// progress bar on a terminal.
pub(super) fn fill_from_image(
    device: &crate::device::Device,
    image: &Path,
) -> Result<(), ControllerError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(image)
        .map_err(|e| ControllerError::Local(format!("{}: {e}", image.display())))?;
    let len = file
        .metadata()
        .map_err(|e| ControllerError::Local(e.to_string()))?
        .len();
    if len > device.size() {
        return Err(ControllerError::Local(format!(
            "image {} ({len} bytes) is larger than the volume",
            image.display()
        )));
    }
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(len),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("filling root volume from bundle");
    let started = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(buf.len() as u64)).expect("at most 1 MiB");
        file.read_exact_at(&mut buf[..n], off)
            .map_err(|e| ControllerError::Local(format!("{}: {e}", image.display())))?;
        if buf[..n].iter().any(|&b| b != 0) {
            device
                .write(off, &buf[..n])
                .map_err(|e| ControllerError::Local(e.to_string()))?;
        }
        off += n as u64;
        bar.set_position(off);
    }
    device
        .flush()
        .map_err(|e| ControllerError::Local(e.to_string()))?;
    bar.finish_and_clear();
    tracing::info!("filled {} bytes in {:?}", len, started.elapsed());
    Ok(())
}
