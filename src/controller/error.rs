//! The controller's errors: [`ApiError`], a refusal the WorkSpaces API would return (its
//! code an [`ApiErrorCode`], spelled on the wire exactly as AWS does), and
//! [`ControllerError`], which adds the local failures (registry, KMS transport, external
//! commands, volume files) behind a verb.

use std::fmt;
use std::path::PathBuf;

use crate::device::DeviceError;
use crate::host::HostError;
use crate::kms::KmsError;
use crate::private_file::PrivateFileError;
use crate::volume::VolumeError;

use super::registry::RegistryError;

/// The error codes the controller returns, as an enum; [`ApiErrorCode::as_str`] (and
/// `Display`, and `Serialize`) give the AWS wire spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiErrorCode {
    /// `InvalidParameterValuesException`.
    InvalidParameterValues,
    /// `ResourceNotFoundException`.
    ResourceNotFound,
    /// `InvalidResourceStateException`.
    InvalidResourceState,
    /// `UnsupportedWorkspaceConfigurationException`.
    UnsupportedWorkspaceConfiguration,
    /// `OperationNotSupportedException`.
    OperationNotSupported,
    /// `ResourceNotFound.Directory` (a launch item).
    DirectoryNotFound,
    /// `ResourceNotFound.User`.
    UserNotFound,
    /// `ResourceNotFound.Bundle`.
    BundleNotFound,
    /// `ResourceExists.Workspace`: one WorkSpace per user and directory.
    WorkspaceExists,
    /// `AttachFailed`: the agent did not come up.
    AttachFailed,
    /// `InternalError`.
    InternalError,
    /// `KMS.Unavailable`: the KMS could not be reached or gave no code.
    KmsUnavailable,
    /// `KMS.DisabledException`: the key is disabled.
    KmsDisabled,
    /// `KMS.KMSInvalidStateException`: the key is pending deletion (or otherwise not
    /// Enabled).
    KmsInvalidState,
    /// `KMS.InvalidKeyUsageException`: not a symmetric encryption key.
    KmsInvalidKeyUsage,
    /// `KMS.<code>`: a refusal passed on from the KMS with the code it returned.
    Kms(String),
    /// `ResourceInUseException`: another host serves the WorkSpace.
    ResourceInUse,
    /// `SnapshotStore.Unavailable`: the snapshot store could not be reached or refused.
    SnapshotStoreUnavailable,
    /// `SnapshotStore.Corrupted`: a manifest or chunk failed its BLAKE3 check or is missing.
    SnapshotCorrupted,
}

impl ApiErrorCode {
    /// The AWS wire spelling, e.g. `InvalidResourceStateException`.
    #[must_use]
    pub fn as_str(&self) -> std::borrow::Cow<'static, str> {
        let s = match self {
            Self::InvalidParameterValues => "InvalidParameterValuesException",
            Self::ResourceNotFound => "ResourceNotFoundException",
            Self::InvalidResourceState => "InvalidResourceStateException",
            Self::UnsupportedWorkspaceConfiguration => "UnsupportedWorkspaceConfigurationException",
            Self::OperationNotSupported => "OperationNotSupportedException",
            Self::DirectoryNotFound => "ResourceNotFound.Directory",
            Self::UserNotFound => "ResourceNotFound.User",
            Self::BundleNotFound => "ResourceNotFound.Bundle",
            Self::WorkspaceExists => "ResourceExists.Workspace",
            Self::AttachFailed => "AttachFailed",
            Self::InternalError => "InternalError",
            Self::KmsUnavailable => "KMS.Unavailable",
            Self::KmsDisabled => "KMS.DisabledException",
            Self::KmsInvalidState => "KMS.KMSInvalidStateException",
            Self::KmsInvalidKeyUsage => "KMS.InvalidKeyUsageException",
            Self::ResourceInUse => "ResourceInUseException",
            Self::SnapshotStoreUnavailable => "SnapshotStore.Unavailable",
            Self::SnapshotCorrupted => "SnapshotStore.Corrupted",
            Self::Kms(code) => return format!("KMS.{code}").into(),
        };
        s.into()
    }
}

impl fmt::Display for ApiErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl serde::Serialize for ApiErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

/// A refusal as the API returns it: a code and a message for a person.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("An error occurred ({code}): {message}")]
pub struct ApiError {
    /// The error code.
    pub code: ApiErrorCode,
    /// What went wrong and, where possible, what to do.
    pub message: String,
}

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// An `InternalError` carrying `e`'s message.
    pub fn internal(e: impl fmt::Display) -> Self {
        Self::new(ApiErrorCode::InternalError, e.to_string())
    }

    /// A KMS failure passed on under its own code (`KMS.<code>`), or `KMS.Unavailable`
    /// when the KMS gave none (transport failure).
    #[must_use]
    pub fn from_kms(e: &KmsError) -> Self {
        match e.code() {
            Some(code) => Self::new(ApiErrorCode::Kms(code.to_string()), e.to_string()),
            None => Self::new(ApiErrorCode::KmsUnavailable, e.to_string()),
        }
    }
}

/// A boxed error from a serving-side module (rekey engine, control socket, header I/O,
/// agent), kept with its source chain.
pub type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Controller errors (for non-batch verbs and set-up).
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// Registry failure.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// A request the API would reject, with its error code.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// KMS failure.
    #[error(transparent)]
    Kms(#[from] KmsError),
    /// An external command (mkfs, cp, fsfreeze) failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A private state directory or file could not be made.
    #[error(transparent)]
    PrivateFile(#[from] PrivateFileError),
    /// A volume file could not be created, opened or read.
    #[error(transparent)]
    Volume(#[from] VolumeError),
    /// Writing through an opened volume failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Reading a file (e.g. a bundle image) failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// A bundle image does not fit the root volume.
    #[error("image {} ({len} bytes) is larger than the volume", image.display())]
    ImageTooLarge {
        /// The image.
        image: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// A registry row names a user that is gone.
    #[error("user {0} vanished")]
    UserVanished(String),
    /// An encrypted volume's header carries no KMS token.
    #[error("volume {0} has no KMS token")]
    NoKmsToken(String),
    /// A WorkSpace has no root volume row.
    #[error("no root volume")]
    NoRootVolume,
    /// A header write, rekey or control-socket request failed.
    #[error(transparent)]
    Serving(BoxedError),
    /// The WorkSpace agent stopped with an error.
    #[error(transparent)]
    Agent(BoxedError),
}

/// An [`ApiError`] as a [`ControllerError`].
pub(super) fn api(code: ApiErrorCode, message: impl Into<String>) -> ControllerError {
    ControllerError::Api(ApiError::new(code, message))
}

/// A serving-side failure as a [`ControllerError`].
pub(super) fn serving(e: impl std::error::Error + Send + Sync + 'static) -> ControllerError {
    ControllerError::Serving(Box::new(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_keep_their_wire_spelling() {
        assert_eq!(
            ApiErrorCode::InvalidResourceState.to_string(),
            "InvalidResourceStateException"
        );
        assert_eq!(
            ApiErrorCode::Kms("NotFoundException".into()).to_string(),
            "KMS.NotFoundException"
        );
        assert_eq!(
            serde_json::to_string(&ApiErrorCode::KmsDisabled).expect("serialises"),
            "\"KMS.DisabledException\""
        );
        let e = ControllerError::from(ApiError::new(ApiErrorCode::ResourceNotFound, "gone"));
        assert_eq!(
            e.to_string(),
            "An error occurred (ResourceNotFoundException): gone"
        );
    }
}
