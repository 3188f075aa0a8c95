//! WorkSpace operations: the verbs of the WorkSpaces API over the registry, the KMS and
//! the agents. Batch verbs return per-item `FailedRequests`; a refused item changes
//! nothing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::kms::{FORWARDING_SERVICE, ForwardAccessToken, GrantSpec, KeyInfo, KmsClient, KmsError};
use crate::luks2::KmsToken;
use crate::secret::VolumeKey;
use crate::volume::{self, CreateParams, Encryption, GIB};
use crate::xts::SectorSize;

use super::agent::{self, AgentPaths, volume_context};
use super::ids;
use super::registry::{Bundle, Registry, RegistryError, Snapshot, User, Volume, Workspace};
use super::state::{Event, IllegalTransition, WorkspaceState};

/// The WorkSpaces service principal.
pub const WORKSPACES_SERVICE: &str = "workspaces.amazonaws.com";
/// The EBS service principal.
pub const EBS_SERVICE: &str = "ebs.amazonaws.com";
/// The AWS managed key used when encryption is requested without a key.
pub const DEFAULT_KEY_ALIAS: &str = "alias/aws/workspaces";
/// Batch verbs take at most this many ids (as the API).
pub const MAX_BATCH: usize = 25;

/// Controller errors (for non-batch verbs and set-up).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A request the API would reject, with its error code.
    #[error("An error occurred ({code}): {message}")]
    Api {
        /// AWS-style error code.
        code: String,
        /// Message.
        message: String,
    },
    /// KMS failure.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// Local failure.
    #[error("{0}")]
    Local(String),
}

fn api(code: &str, message: impl Into<String>) -> ControllerError {
    ControllerError::Api {
        code: code.into(),
        message: message.into(),
    }
}

/// Where state lives and which profiles sign.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// The administrator's profile (`--profile`).
    pub admin_profile: String,
    /// The WorkSpaces service's profile.
    pub service_profile: String,
    /// The EBS service's profile.
    pub ebs_profile: String,
}

/// `WorkspaceProperties` (sizes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct WorkspaceProperties {
    /// Root volume size.
    pub root_volume_size_gib: u64,
    /// User volume size.
    pub user_volume_size_gib: u64,
}

/// One launch request (`CreateWorkspaces` item).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct WorkspaceRequest {
    /// Directory.
    pub directory_id: String,
    /// User.
    pub user_name: String,
    /// Bundle.
    pub bundle_id: String,
    /// KMS key (id, ARN or alias).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_encryption_key: Option<String>,
    /// Encrypt the user volume.
    #[serde(default)]
    pub user_volume_encryption_enabled: bool,
    /// Encrypt the root volume.
    #[serde(default)]
    pub root_volume_encryption_enabled: bool,
    /// Sizes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_properties: Option<WorkspaceProperties>,
}

/// A WorkSpace as `DescribeWorkspaces` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct WorkspaceView {
    /// Id.
    pub workspace_id: String,
    /// Directory.
    pub directory_id: String,
    /// User.
    pub user_name: String,
    /// State.
    pub state: WorkspaceState,
    /// Bundle.
    pub bundle_id: String,
    /// Key ARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volume_encryption_key: Option<String>,
    /// Root encrypted.
    pub root_volume_encryption_enabled: bool,
    /// User encrypted.
    pub user_volume_encryption_enabled: bool,
    /// Sizes.
    pub workspace_properties: WorkspaceProperties,
    /// Last error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_message: Option<String>,
    /// Where the root filesystem is mounted while running.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mount_point: Option<String>,
    /// A warning when the KMS key is not usable (not part of the AWS shape).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_warning: Option<String>,
}

/// A failed item of a batch verb.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct FailedRequest {
    /// Which WorkSpace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_id: Option<String>,
    /// The launch request, for `CreateWorkspaces`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace_request: Option<WorkspaceRequest>,
    /// Error code.
    pub error_code: String,
    /// Error message.
    pub error_message: String,
}

/// `CreateWorkspaces` result.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct CreateResult {
    /// Refused requests.
    pub failed_requests: Vec<FailedRequest>,
    /// Launched WorkSpaces.
    pub pending_requests: Vec<WorkspaceView>,
}

/// Batch-verb result.
#[derive(Debug, Clone, Serialize, Default)]
#[serde(rename_all = "PascalCase")]
pub struct BatchResult {
    /// Refused items.
    pub failed_requests: Vec<FailedRequest>,
}

/// A volume as `describe-volumes` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeView {
    /// Id.
    pub volume_id: String,
    /// Owning WorkSpace.
    pub workspace_id: String,
    /// `root`/`user`.
    pub kind: String,
    /// Encrypted.
    pub encrypted: bool,
    /// Key ARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Size.
    pub size_gib: u64,
    /// Volume file.
    pub path: String,
    /// Encryption context bound in the header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption_context: Option<std::collections::BTreeMap<String, String>>,
}

/// A snapshot as `create-snapshot` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnapshotView {
    /// Id.
    pub snapshot_id: String,
    /// Source volume.
    pub volume_id: String,
    /// `root`/`user`.
    pub kind: String,
    /// Still encrypted under the same data key.
    pub encrypted: bool,
}

/// The controller.
#[derive(Debug)]
pub struct Controller {
    cfg: ControllerConfig,
    reg: Registry,
}

fn ctx_subset(sid: &str, directory_id: &str) -> crate::kms::EncryptionContext {
    let mut c = crate::kms::EncryptionContext::new();
    c.insert(
        "aws:workspaces:sid-directoryid".into(),
        format!("{sid}@{directory_id}"),
    );
    c
}

/// The WorkSpaces service's grant on `key`: everything it needs, only within this user's
/// `sid-directoryid` context (CreateGrant lets it hand narrower grants to EBS).
fn workspaces_grant(key: &str, sid: &str, directory_id: &str, workspace_id: &str) -> GrantSpec {
    GrantSpec {
        key_id: key.into(),
        grantee: WORKSPACES_SERVICE.into(),
        retiring: Some(WORKSPACES_SERVICE.into()),
        operations: vec![
            "Decrypt",
            "GenerateDataKeyWithoutPlaintext",
            "ReEncryptFrom",
            "ReEncryptTo",
            "CreateGrant",
        ],
        context_equals: None,
        context_subset: Some(ctx_subset(sid, directory_id)),
        name: Some(format!("workspaces-{workspace_id}")),
    }
}

/// The EBS grant of one volume: exactly that volume's full context.
fn ebs_grant(key: &str, context: &crate::kms::EncryptionContext, volume_id: &str) -> GrantSpec {
    GrantSpec {
        key_id: key.into(),
        grantee: EBS_SERVICE.into(),
        retiring: Some(WORKSPACES_SERVICE.into()),
        operations: vec![
            "Decrypt",
            "GenerateDataKeyWithoutPlaintext",
            "ReEncryptFrom",
            "ReEncryptTo",
        ],
        context_equals: Some(context.clone()),
        context_subset: None,
        name: Some(format!("ebs-{volume_id}")),
    }
}

fn kms_failure(e: &KmsError) -> (String, String) {
    match e.code() {
        Some(code) => (format!("KMS.{code}"), e.to_string()),
        None => ("KMS.Unavailable".into(), e.to_string()),
    }
}

fn key_state_refusal(key: &KeyInfo, verb: &str) -> Option<(String, String)> {
    if key.state == "Enabled" {
        return None;
    }
    let code = if key.state == "Disabled" {
        "KMS.DisabledException"
    } else {
        "KMS.KMSInvalidStateException"
    };
    Some((
        code.into(),
        format!(
            "cannot {verb}: the WorkSpace's KMS key {} is {}; enable the key (or cancel its deletion) and retry. A running WorkSpace keeps working meanwhile.",
            key.arn, key.state
        ),
    ))
}

fn copy_sparse(from: &Path, to: &Path) -> Result<(), ControllerError> {
    crate::host::run(
        "cp",
        &[
            "--sparse=always",
            "--reflink=auto",
            &from.display().to_string(),
            &to.display().to_string(),
        ],
    )
    .map(|_| ())
    .map_err(|e| ControllerError::Local(e.to_string()))
}

impl Controller {
    /// Opens the controller over `cfg.state_dir`; it and its subdirectories are made
    /// private (0700, ours) whether or not they existed.
    ///
    /// # Errors
    /// State directory (e.g. owned by another user) or database failure.
    pub fn open(cfg: ControllerConfig) -> Result<Self, ControllerError> {
        for sub in [
            "",
            "volumes",
            "bundles",
            "snapshots",
            "images",
            "agents",
            "fuse",
            "mnt",
        ] {
            crate::private_file::ensure_dir(&cfg.state_dir.join(sub))
                .map_err(|e| ControllerError::Local(e.to_string()))?;
        }
        let reg = Registry::open(&cfg.state_dir)?;
        Ok(Self { cfg, reg })
    }

    /// The registry.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.reg
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The WorkSpaces service acting for the administrator, carrying a forward-access
    /// token the administrator's own credentials signed (no credentials, no client).
    fn service_for_admin(&self) -> Result<KmsClient, ControllerError> {
        let token = ForwardAccessToken::presign(&self.cfg.admin_profile, FORWARDING_SERVICE)?;
        Ok(KmsClient::connect_forwarding(
            &self.cfg.service_profile,
            &token,
        )?)
    }

    /// Proves the caller is who `--profile` says before a verb changes anything: the
    /// KMS verifies the forward-access token the caller's credentials signed.
    fn authenticate_caller(&self) -> Result<(), ControllerError> {
        self.service_for_admin()?.verify_forward_access()?;
        Ok(())
    }

    fn service(&self) -> Result<KmsClient, ControllerError> {
        Ok(KmsClient::connect(&self.cfg.service_profile)?)
    }

    fn ebs(&self) -> Result<KmsClient, ControllerError> {
        Ok(KmsClient::connect(&self.cfg.ebs_profile)?)
    }

    /// `register-directory`.
    ///
    /// # Errors
    /// Bad id or database failure.
    pub fn register_directory(&self, id: &str) -> Result<bool, ControllerError> {
        if !ids::is_directory_id(id) {
            return Err(api(
                "InvalidParameterValuesException",
                format!("{id:?} is not a directory id (d- followed by 10 hex digits)"),
            ));
        }
        Ok(self.reg.add_directory(id)?)
    }

    /// `create-user`: assigns a stable SID (or takes `sid`).
    ///
    /// # Errors
    /// Unknown directory, bad name or SID.
    pub fn create_user(
        &self,
        directory_id: &str,
        user_name: &str,
        sid: Option<&str>,
    ) -> Result<User, ControllerError> {
        if !self.reg.has_directory(directory_id)? {
            return Err(api(
                "ResourceNotFoundException",
                format!(
                    "directory {directory_id} is not registered (sealvol register-directory --directory-id {directory_id})"
                ),
            ));
        }
        if !ids::is_user_name(user_name) {
            return Err(api(
                "InvalidParameterValuesException",
                format!("{user_name:?} is not a valid user name"),
            ));
        }
        if let Some(existing) = self.reg.user(directory_id, user_name)? {
            return Ok(existing);
        }
        let sid = match sid {
            Some(s) if ids::is_sid(s) => s.to_string(),
            Some(s) => {
                return Err(api(
                    "InvalidParameterValuesException",
                    format!("{s:?} is not a SID of the form S-1-5-21-a-b-c-RID"),
                ));
            }
            None => ids::user_sid(directory_id, user_name),
        };
        Ok(self.reg.add_user(&User {
            directory_id: directory_id.into(),
            user_name: user_name.into(),
            sid,
        })?)
    }

    /// `create-bundle`: an ext4 root image made with `mkfs.ext4 -d DIR`.
    ///
    /// # Errors
    /// Bad id, missing directory, mkfs failure.
    pub fn create_bundle(
        &self,
        bundle_id: &str,
        from_dir: &Path,
        size_gib: u64,
    ) -> Result<Bundle, ControllerError> {
        if !ids::is_bundle_id(bundle_id) {
            return Err(api(
                "InvalidParameterValuesException",
                format!("{bundle_id:?} is not a bundle id (wsb- followed by letters and digits)"),
            ));
        }
        if !from_dir.is_dir() {
            return Err(api(
                "InvalidParameterValuesException",
                format!("{} is not a directory", from_dir.display()),
            ));
        }
        if size_gib == 0 || size_gib > 2000 {
            return Err(api(
                "InvalidParameterValuesException",
                "--size-gib must be between 1 and 2000",
            ));
        }
        let image = self
            .cfg
            .state_dir
            .join("bundles")
            .join(format!("{bundle_id}.img"));
        let tmp = crate::private_file::PrivateTemp::beside(&image)
            .map_err(|e| ControllerError::Local(e.to_string()))?;
        crate::host::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-d",
                &from_dir.display().to_string(),
                "-L",
                "root",
                &tmp.path().display().to_string(),
                &format!("{size_gib}G"),
            ],
        )
        .map_err(|e| ControllerError::Local(e.to_string()))?;
        tmp.persist(&image)
            .map_err(|e| ControllerError::Local(e.to_string()))?;
        let b = Bundle {
            bundle_id: bundle_id.into(),
            image_path: image,
            size_gib,
        };
        self.reg.put_bundle(&b)?;
        Ok(b)
    }

    fn view(&self, w: &Workspace, key: Option<&KeyInfo>) -> WorkspaceView {
        let paths = AgentPaths::new(&self.cfg.state_dir, &w.workspace_id);
        WorkspaceView {
            workspace_id: w.workspace_id.clone(),
            directory_id: w.directory_id.clone(),
            user_name: w.user_name.clone(),
            state: w.state,
            bundle_id: w.bundle_id.clone(),
            volume_encryption_key: (!w.key_arn.is_empty()).then(|| w.key_arn.clone()),
            root_volume_encryption_enabled: w.root_encrypted,
            user_volume_encryption_enabled: w.user_encrypted,
            workspace_properties: WorkspaceProperties {
                root_volume_size_gib: w.root_size_gib,
                user_volume_size_gib: w.user_size_gib,
            },
            error_message: (!w.error.is_empty()).then(|| w.error.clone()),
            mount_point: w
                .state
                .is_running()
                .then(|| paths.mnt_dir.display().to_string()),
            key_warning: key.and_then(|k| {
                (k.state != "Enabled").then(|| {
                    format!(
                        "KMS key {} is {}: reboot, rebuild, start and restore will be refused",
                        k.arn, k.state
                    )
                })
            }),
        }
    }

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

    fn launch(&self, req: &WorkspaceRequest) -> Result<WorkspaceView, (String, String)> {
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
    fn launch_volumes(
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
    fn make_volume(
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

    fn start_agent(&self, workspace_id: &str) -> Result<(), String> {
        let paths = AgentPaths::new(&self.cfg.state_dir, workspace_id);
        agent::force_cleanup(&paths);
        let args: Vec<std::ffi::OsString> = vec![
            "agent".into(),
            "--state-dir".into(),
            self.cfg.state_dir.clone().into(),
            "--workspace-id".into(),
            workspace_id.into(),
            "--ebs-profile".into(),
            self.cfg.ebs_profile.clone().into(),
        ];
        crate::attach::spawn_agent(&args, Some(&paths.log))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn teardown(&self, ws: &Workspace) {
        let paths = AgentPaths::new(&self.cfg.state_dir, &ws.workspace_id);
        agent::stop(&paths);
        let vols = self.reg.volumes(Some(&ws.workspace_id)).unwrap_or_default();
        if let Ok(service) = self.service() {
            for v in &vols {
                if !v.grant_id.is_empty()
                    && let Err(e) = service.retire_grant(&v.key_arn, &v.grant_id)
                {
                    tracing::warn!("retiring EBS grant {} of {}: {e}", v.grant_id, v.volume_id);
                }
            }
            if !ws.ws_grant_id.is_empty()
                && let Err(e) = service.retire_grant(&ws.key_arn, &ws.ws_grant_id)
            {
                tracing::warn!("retiring WorkSpaces grant {}: {e}", ws.ws_grant_id);
            }
        }
        for v in &vols {
            let _ = std::fs::remove_file(&v.path);
            let _ = self.reg.delete_volume(&v.volume_id);
        }
        for s in self.reg.snapshots(&ws.workspace_id).unwrap_or_default() {
            let _ = std::fs::remove_file(&s.path);
        }
        let _ = self.reg.delete_snapshots(&ws.workspace_id);
        let _ = std::fs::remove_dir(&paths.mnt_dir);
        let _ = std::fs::remove_dir(&paths.fuse_dir);
    }

    /// Marks running WorkSpaces whose agent died as UNHEALTHY.
    fn refresh(&self, w: &mut Workspace) {
        if matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Impaired
        ) && agent::live_pid(&AgentPaths::new(&self.cfg.state_dir, &w.workspace_id)).is_none()
            && let Ok(next) = w.state.on(Event::AgentLost)
        {
            w.state = next;
            w.error = "the WorkSpace's agent is not running; reboot-workspaces recovers it".into();
            let _ = self.reg.update_workspace(w);
        }
    }

    /// `describe-workspaces`.
    ///
    /// # Errors
    /// Database failure.
    pub fn describe_workspaces(
        &self,
        ids: &[String],
        check_keys: bool,
    ) -> Result<Vec<WorkspaceView>, ControllerError> {
        let client = if check_keys {
            self.service_for_admin().ok()
        } else {
            None
        };
        let mut out = Vec::new();
        for mut w in self.reg.workspaces()? {
            if !ids.is_empty() && !ids.contains(&w.workspace_id) {
                continue;
            }
            if ids.is_empty() && w.state == WorkspaceState::Terminated {
                continue;
            }
            self.refresh(&mut w);
            let key = match (&client, w.key_arn.is_empty(), w.state) {
                (Some(c), false, s) if s != WorkspaceState::Terminated => {
                    c.describe_key(&w.key_arn).ok()
                }
                _ => None,
            };
            out.push(self.view(&w, key.as_ref()));
        }
        Ok(out)
    }

    /// `describe-volumes`.
    ///
    /// # Errors
    /// Database failure.
    pub fn describe_volumes(
        &self,
        workspace_id: Option<&str>,
    ) -> Result<Vec<VolumeView>, ControllerError> {
        Ok(self
            .reg
            .volumes(workspace_id)?
            .into_iter()
            .map(|v| {
                let ctx = volume::read_header(&v.path)
                    .ok()
                    .and_then(|h| h.kms_token().map(|t| t.encryption_context.clone()));
                VolumeView {
                    volume_id: v.volume_id,
                    workspace_id: v.workspace_id,
                    kind: v.kind,
                    encrypted: v.encrypted,
                    kms_key_id: (!v.key_arn.is_empty()).then_some(v.key_arn),
                    size_gib: v.size_gib,
                    path: v.path.display().to_string(),
                    encryption_context: ctx,
                }
            })
            .collect())
    }

    /// Runs `op` for each id with per-item failures (at most 25 ids).
    fn batch(
        &self,
        ids: &[String],
        mut op: impl FnMut(&Self, &mut Workspace) -> Result<(), (String, String)>,
    ) -> Result<BatchResult, ControllerError> {
        if ids.is_empty() || ids.len() > MAX_BATCH {
            return Err(api(
                "InvalidParameterValuesException",
                format!("give between 1 and {MAX_BATCH} --workspace-ids"),
            ));
        }
        self.authenticate_caller()?;
        let mut result = BatchResult::default();
        for id in ids {
            let outcome = match self.reg.workspace(id)? {
                None => Err((
                    "ResourceNotFoundException".to_string(),
                    format!("WorkSpace {id} does not exist"),
                )),
                Some(mut w) => {
                    self.refresh(&mut w);
                    op(self, &mut w)
                }
            };
            if let Err((code, message)) = outcome {
                result.failed_requests.push(FailedRequest {
                    workspace_id: Some(id.clone()),
                    workspace_request: None,
                    error_code: code,
                    error_message: message,
                });
            }
        }
        Ok(result)
    }

    fn transition(w: &Workspace, event: Event) -> Result<WorkspaceState, (String, String)> {
        w.state.on(event).map_err(|e: IllegalTransition| {
            (
                "InvalidResourceStateException".to_string(),
                format!("{}: {e}", w.workspace_id),
            )
        })
    }

    /// Refuses when an encrypted WorkSpace's key is not Enabled.
    fn require_usable_key(&self, w: &Workspace, verb: &str) -> Result<(), (String, String)> {
        if w.key_arn.is_empty() {
            return Ok(());
        }
        let client = self
            .service_for_admin()
            .map_err(|e| ("KMS.Unavailable".to_string(), e.to_string()))?;
        let info = client
            .describe_key(&w.key_arn)
            .map_err(|e| kms_failure(&e))?;
        key_state_refusal(&info, verb).map_or(Ok(()), Err)
    }

    fn restart(&self, w: &mut Workspace, pending: WorkspaceState) -> Result<(), (String, String)> {
        w.state = pending;
        w.error.clear();
        self.reg
            .update_workspace(w)
            .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
        agent::stop(&AgentPaths::new(&self.cfg.state_dir, &w.workspace_id));
        self.bring_up(w)
    }

    fn bring_up(&self, w: &mut Workspace) -> Result<(), (String, String)> {
        match self.start_agent(&w.workspace_id) {
            Ok(()) => {
                w.state = w
                    .state
                    .on(Event::Attached)
                    .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
                self.reg
                    .update_workspace(w)
                    .map_err(|e| ("InternalError".to_string(), e.to_string()))
            }
            Err(e) => {
                w.state = WorkspaceState::Unhealthy;
                w.error = e.clone();
                let _ = self.reg.update_workspace(w);
                Err(("AttachFailed".to_string(), e))
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
            c.reg
                .update_workspace(w)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            w.state = w
                .state
                .on(Event::Detached)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
            w.error.clear();
            c.reg
                .update_workspace(w)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))
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
            c.reg
                .update_workspace(w)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
            c.teardown(w);
            w.state = w
                .state
                .on(Event::Deleted)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))?;
            w.error.clear();
            c.reg
                .update_workspace(w)
                .map_err(|e| ("InternalError".to_string(), e.to_string()))
        })
    }

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
        let mut w = self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                "ResourceNotFoundException",
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })?;
        self.refresh(&mut w);
        if !matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Stopped | WorkspaceState::Impaired
        ) {
            return Err(api(
                "InvalidResourceStateException",
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
                .map_err(|e| ControllerError::Local(e.to_string()))?;
        }
        let copies: Result<Vec<SnapshotView>, ControllerError> = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .map(|v| {
                let snapshot_id = ids::snapshot_id();
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
                    kind: v.kind.clone(),
                    path,
                    created: Registry::now(),
                })?;
                Ok(SnapshotView {
                    snapshot_id,
                    volume_id: v.volume_id,
                    kind: v.kind,
                    encrypted: v.encrypted,
                })
            })
            .collect();
        for m in frozen.iter().rev() {
            let _ = crate::host::run("fsfreeze", &["-u", &m.display().to_string()]);
        }
        copies
    }

    fn latest_snapshot(
        &self,
        workspace_id: &str,
        kind: &str,
    ) -> Result<Option<Snapshot>, ControllerError> {
        Ok(self
            .reg
            .snapshots(workspace_id)?
            .into_iter()
            .find(|s| s.kind == kind))
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
            let local = |e: ControllerError| ("InternalError".to_string(), e.to_string());
            let bundle = c
                .reg
                .bundle(&w.bundle_id)
                .map_err(|e| local(e.into()))?
                .ok_or_else(|| {
                    (
                        "ResourceNotFound.Bundle".to_string(),
                        format!("bundle {} no longer exists", w.bundle_id),
                    )
                })?;
            let user = c
                .reg
                .user(&w.directory_id, &w.user_name)
                .map_err(|e| local(e.into()))?
                .ok_or_else(|| ("ResourceNotFound.User".to_string(), w.user_name.clone()))?;
            w.state = next;
            c.reg.update_workspace(w).map_err(|e| local(e.into()))?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            let vols = c
                .reg
                .volumes(Some(&w.workspace_id))
                .map_err(|e| local(e.into()))?;
            for v in vols {
                if v.kind == "root" {
                    let key = if v.encrypted {
                        Some(c.new_data_key(w, &user, &v).map_err(|e| kms_failure(&e))?)
                    } else {
                        None
                    };
                    c.make_volume(&v, key.as_ref().map(|(k, t)| (k, t.clone())), Some(&bundle))
                        .map_err(local)?;
                } else if let Some(snap) =
                    c.latest_snapshot(&w.workspace_id, "user").map_err(local)?
                    && snap.volume_id == v.volume_id
                {
                    copy_sparse(&snap.path, &v.path).map_err(local)?;
                }
            }
            c.bring_up(w)
        })
    }

    /// A fresh data key for an existing volume id (same context, same EBS grant).
    fn new_data_key(
        &self,
        w: &Workspace,
        user: &User,
        v: &Volume,
    ) -> Result<(VolumeKey, KmsToken), KmsError> {
        let ebs = KmsClient::connect(&self.cfg.ebs_profile)?;
        let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
        let (blob, arn) = ebs.generate_data_key_without_plaintext(&v.key_arn, &context, &[])?;
        let key = ebs.decrypt_volume_key(&blob, &context, Some(&v.key_arn), &[])?;
        let token = KmsToken {
            key_arn: if arn.is_empty() {
                v.key_arn.clone()
            } else {
                arn
            },
            ciphertext_blob: blob,
            encryption_context: context,
            volume_kind: v.kind.clone(),
            volume_id: v.volume_id.clone(),
            workspace_id: w.workspace_id.clone(),
        };
        Ok((key, token))
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
            let local = |e: ControllerError| ("InternalError".to_string(), e.to_string());
            let vols = c.reg.volumes(Some(&w.workspace_id)).map_err(|e| local(e.into()))?;
            let mut plan = Vec::new();
            for v in &vols {
                let snap = c
                    .latest_snapshot(&w.workspace_id, &v.kind)
                    .map_err(local)?
                    .ok_or_else(|| ("InvalidResourceStateException".to_string(), format!("no snapshot of the {} volume to restore from (create-snapshot first)", v.kind)))?;
                plan.push((v.clone(), snap));
            }
            let user = c.reg.user(&w.directory_id, &w.user_name).map_err(|e| local(e.into()))?.ok_or_else(|| ("ResourceNotFound.User".to_string(), w.user_name.clone()))?;
            w.state = next;
            c.reg.update_workspace(w).map_err(|e| local(e.into()))?;
            agent::stop(&AgentPaths::new(&c.cfg.state_dir, &w.workspace_id));
            for (old, snap) in plan {
                c.restore_volume(w, &user, &old, &snap)?;
            }
            c.bring_up(w)
        })
    }

    fn restore_volume(
        &self,
        w: &Workspace,
        user: &User,
        old: &Volume,
        snap: &Snapshot,
    ) -> Result<(), (String, String)> {
        let local = |e: String| ("InternalError".to_string(), e);
        let volume_id = ids::volume_id();
        let path = self
            .cfg
            .state_dir
            .join("volumes")
            .join(format!("{volume_id}.img"));
        copy_sparse(&snap.path, &path).map_err(|e| local(e.to_string()))?;
        let mut row = Volume {
            volume_id: volume_id.clone(),
            path: path.clone(),
            grant_id: String::new(),
            ..old.clone()
        };
        if old.encrypted {
            let service = self.service().map_err(|e| local(e.to_string()))?;
            let ebs = self.ebs().map_err(|e| local(e.to_string()))?;
            let new_ctx = volume_context(&user.sid, &w.directory_id, &volume_id);
            let old_ctx = volume_context(&user.sid, &w.directory_id, &old.volume_id);
            let grant = service
                .create_grant(&ebs_grant(&old.key_arn, &new_ctx, &volume_id))
                .map_err(|e| kms_failure(&e))?;
            row.grant_id = grant.grant_id.clone();
            let mut header = volume::read_header(&path).map_err(|e| local(e.to_string()))?;
            let token = header
                .kms_token()
                .cloned()
                .ok_or_else(|| local(format!("snapshot {} has no KMS token", snap.snapshot_id)))?;
            let (blob, arn) = ebs
                .re_encrypt(
                    &token.ciphertext_blob,
                    &old_ctx,
                    &old.key_arn,
                    &new_ctx,
                    &[grant.grant_token],
                )
                .map_err(|e| kms_failure(&e))?;
            header.set_kms_token(KmsToken {
                key_arn: if arn.is_empty() {
                    old.key_arn.clone()
                } else {
                    arn
                },
                ciphertext_blob: blob,
                encryption_context: new_ctx,
                volume_id: volume_id.clone(),
                ..token
            });
            let backing =
                crate::backing::FileBacking::open(&path).map_err(|e| local(e.to_string()))?;
            header.write(&backing).map_err(|e| local(e.to_string()))?;
            if !old.grant_id.is_empty() {
                let _ = service.retire_grant(&old.key_arn, &old.grant_id);
            }
        }
        self.reg
            .put_volume(&row)
            .map_err(|e| local(e.to_string()))?;
        self.reg
            .delete_volume(&old.volume_id)
            .map_err(|e| local(e.to_string()))?;
        let _ = std::fs::remove_file(&old.path);
        Ok(())
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
        let mut w = self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                "ResourceNotFoundException",
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })?;
        if w.key_arn.is_empty() {
            return Err(api(
                "InvalidResourceStateException",
                format!("WorkSpace {workspace_id} has no encrypted volume to rewrap"),
            ));
        }
        if matches!(
            w.state,
            WorkspaceState::Terminating | WorkspaceState::Terminated | WorkspaceState::Pending
        ) {
            return Err(api(
                "InvalidResourceStateException",
                format!("WorkSpace {workspace_id} is {}", w.state),
            ));
        }
        let user = self
            .reg
            .user(&w.directory_id, &w.user_name)?
            .ok_or_else(|| ControllerError::Local(format!("user {} vanished", w.user_name)))?;
        let admin = self.service_for_admin()?;
        let info = admin.describe_key(new_key)?;
        if info.spec != "SYMMETRIC_DEFAULT" {
            return Err(api(
                "KMS.InvalidKeyUsageException",
                format!(
                    "key {} is {}, not a symmetric encryption key",
                    info.arn, info.spec
                ),
            ));
        }
        if let Some((code, message)) = key_state_refusal(&info, "rewrap") {
            return Err(api(&code, message));
        }
        if info.arn == w.key_arn {
            return Err(api(
                "InvalidParameterValuesException",
                format!("WorkSpace {workspace_id} is already under {}", info.arn),
            ));
        }
        for v in self.reg.volumes(Some(workspace_id))? {
            if let Ok(h) = volume::read_header(&v.path)
                && crate::rekey::in_progress(&h)
            {
                return Err(api(
                    "InvalidResourceStateException",
                    format!(
                        "volume {} is being rekeyed; rewrap after the rekey finishes",
                        v.volume_id
                    ),
                ));
            }
        }
        let old_key = w.key_arn.clone();
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
            let mut header =
                volume::read_header(&v.path).map_err(|e| ControllerError::Local(e.to_string()))?;
            let token = header.kms_token().cloned().ok_or_else(|| {
                ControllerError::Local(format!("volume {} has no KMS token", v.volume_id))
            })?;
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
            let backing = crate::backing::FileBacking::open(&v.path)
                .map_err(|e| ControllerError::Local(e.to_string()))?;
            header
                .write(&backing)
                .map_err(|e| ControllerError::Local(e.to_string()))?;
            let old_grant = v.grant_id.clone();
            self.reg.put_volume(&Volume {
                key_arn: info.arn.clone(),
                grant_id: grant.grant_id,
                ..v
            })?;
            if !old_grant.is_empty()
                && let Err(e) = service.retire_grant(&old_key, &old_grant)
            {
                tracing::warn!("retiring the old EBS grant {old_grant}: {e}");
            }
        }
        w.key_arn = info.arn.clone();
        w.ws_grant_id = ws_grant.grant_id;
        self.reg.update_workspace(&w)?;
        if !old_ws_grant.is_empty()
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
        let mut w = self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                "ResourceNotFoundException",
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })?;
        self.refresh(&mut w);
        if !matches!(w.state, WorkspaceState::Available | WorkspaceState::Stopped) {
            return Err(api(
                "InvalidResourceStateException",
                format!(
                    "cannot rekey WorkSpace {workspace_id} while it is {}",
                    w.state
                ),
            ));
        }
        self.require_usable_key(&w, "rekey")
            .map_err(|(code, message)| api(&code, message))?;
        let user = self
            .reg
            .user(&w.directory_id, &w.user_name)?
            .ok_or_else(|| ControllerError::Local(format!("user {} vanished", w.user_name)))?;
        let vols: Vec<Volume> = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .filter(|v| v.encrypted && volume_id.is_none_or(|id| id == v.volume_id))
            .collect();
        if vols.is_empty() {
            return Err(api(
                "ResourceNotFoundException",
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
            let header =
                volume::read_header(&v.path).map_err(|e| ControllerError::Local(e.to_string()))?;
            let pending = crate::rekey::state(&header)
                .map_err(|e| ControllerError::Local(e.to_string()))?
                .and_then(|st| st.new_kms_token);
            let (new_key, token) = match pending {
                Some(token) => {
                    let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
                    let key = self.ebs()?.decrypt_volume_key(
                        &token.ciphertext_blob,
                        &context,
                        Some(&token.key_arn),
                        &[],
                    )?;
                    (key, token)
                }
                None => self.new_data_key(&w, &user, &v)?,
            };
            let report = if running {
                // The key goes to the agent over its uid-checked control socket, never
                // through a file.
                let req = crate::control::ControlRequest::Rekey {
                    export: Some(v.kind.clone()),
                    new_volume_key: new_key,
                    hotzone_bytes,
                    new_kms_token: Some(token),
                    resilience: crate::rekey::Resilience::Journal,
                };
                crate::control::request_online(&paths.fuse_dir, &req, |p| {
                    progress(&v.volume_id, p);
                })
                .map_err(|e| ControllerError::Local(e.to_string()))?
            } else {
                let ebs = self.ebs()?;
                let old_token = header.kms_token().cloned().ok_or_else(|| {
                    ControllerError::Local(format!("volume {} has no KMS token", v.volume_id))
                })?;
                let context = volume_context(&user.sid, &w.directory_id, &v.volume_id);
                let old_key = ebs.decrypt_volume_key(
                    &old_token.ciphertext_blob,
                    &context,
                    Some(&old_token.key_arn),
                    &[],
                )?;
                let opts = crate::rekey::RekeyOptions {
                    hotzone_bytes,
                    new_kms_token: Some(token),
                    resilience: crate::rekey::Resilience::Journal,
                };
                crate::rekey::rekey_detached(&v.path, &old_key, &new_key, &opts, |p| {
                    progress(&v.volume_id, p)
                })
                .map_err(|e| ControllerError::Local(e.to_string()))?
            };
            out.push((v.volume_id.clone(), report));
        }
        Ok(out)
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
        let w = self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                "ResourceNotFoundException",
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })?;
        if w.root_encrypted || w.user_encrypted {
            return Err(api(
                "OperationNotSupportedException",
                format!(
                    "WorkSpace {workspace_id} has encrypted volumes; images cannot be created from encrypted WorkSpaces"
                ),
            ));
        }
        if !matches!(w.state, WorkspaceState::Available | WorkspaceState::Stopped) {
            return Err(api(
                "InvalidResourceStateException",
                format!("WorkSpace {workspace_id} is {}", w.state),
            ));
        }
        let root = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .find(|v| v.kind == "root")
            .ok_or_else(|| ControllerError::Local("no root volume".into()))?;
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
        let w = self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                "ResourceNotFoundException",
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })?;
        let enabling =
            root == Some(true) && !w.root_encrypted || user == Some(true) && !w.user_encrypted;
        let disabling =
            root == Some(false) && w.root_encrypted || user == Some(false) && w.user_encrypted;
        if enabling {
            return Err(api(
                "UnsupportedWorkspaceConfigurationException",
                format!(
                    "cannot encrypt existing WorkSpace {workspace_id}: encryption is chosen at launch; create a new encrypted WorkSpace and move the data"
                ),
            ));
        }
        if disabling {
            return Err(api(
                "UnsupportedWorkspaceConfigurationException",
                format!(
                    "cannot disable encryption of WorkSpace {workspace_id}: an encrypted WorkSpace stays encrypted"
                ),
            ));
        }
        Ok(())
    }

    /// The agent entry point (`sealvol agent`).
    ///
    /// # Errors
    /// Whatever stops the agent from serving.
    pub fn run_agent(
        state_dir: &Path,
        workspace_id: &str,
        ebs_profile: &str,
        on_ready: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Result<(), ControllerError> {
        agent::run(state_dir, workspace_id, ebs_profile, on_ready)
            .map_err(|e| ControllerError::Local(e.to_string()))
    }
}

/// Copies an image into a device, skipping all-zero chunks (they are holes already), with a
/// progress bar on a terminal.
fn fill_from_image(device: &crate::device::Device, image: &Path) -> Result<(), ControllerError> {
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
