//! The API's request and response shapes (`CreateWorkspaces` requests, `DescribeWorkspaces`
//! views, batch results), serialised in the AWS spelling.

use serde::{Deserialize, Serialize};

use super::kind::VolumeKind;
use super::state::WorkspaceState;
use crate::backing::CacheMode;

/// Batch verbs take at most this many ids (as the API).
pub const MAX_BATCH: usize = 25;

/// The cache mode of a WorkSpace launched or imported without one: `none` (O_DIRECT),
/// chosen from the benchmarks (README, "Cache modes").
pub const DEFAULT_CACHE_MODE: CacheMode = CacheMode::None;

/// `WorkspaceProperties` (sizes, and sealvol's host cache mode).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct WorkspaceProperties {
    /// Root volume size.
    pub root_volume_size_gib: u64,
    /// User volume size.
    pub user_volume_size_gib: u64,
    /// How the agent caches the volume files on the host (not part of the AWS shape):
    /// `none` or `writeback`; [`DEFAULT_CACHE_MODE`] when a request leaves it out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_mode: Option<CacheMode>,
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
    pub error_code: super::error::ApiErrorCode,
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
    pub kind: VolumeKind,
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
    pub kind: VolumeKind,
    /// Still encrypted under the same data key.
    pub encrypted: bool,
    /// When it was taken (also its manifest's name in the store).
    pub snapshot_time: String,
    /// The manifest's key in the snapshot store.
    pub manifest: String,
    /// Taken by the schedule.
    pub automatic: bool,
    /// What it cost: chunks read, uploaded, bytes uploaded, holes.
    pub upload: crate::snapshot::upload::UploadStats,
}
