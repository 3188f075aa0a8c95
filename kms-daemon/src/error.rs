//! The error every operation returns, with its AWS `__type` code.

use crate::blob::BlobError;
use crate::policy::PolicyError;
use crate::store::StoreError;

/// An operation failure as the client sees it.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Disabled(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    InvalidCiphertext(String),
    #[error("{0}")]
    IncorrectKey(String),
    #[error("{0}")]
    AccessDenied(String),
    #[error("{0}")]
    Validation(String),
    #[error("{0}")]
    Serialization(String),
    #[error("{0}")]
    InvalidKeyUsage(String),
    #[error("{0}")]
    InvalidGrantToken(String),
    #[error("{0}")]
    InvalidGrantId(String),
    #[error("{0}")]
    MalformedPolicy(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    LimitExceeded(String),
    #[error("{0}")]
    InvalidMarker(String),
    #[error("{0}")]
    InvalidAliasName(String),
    #[error("{0}")]
    UnsupportedOperation(String),
    #[error("The request would have succeeded, but the DryRun parameter was set.")]
    DryRun,
    #[error("{0}")]
    UnknownOperation(String),
    /// Internal fault; the detail is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl OpError {
    /// AWS `__type`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound(_) => "NotFoundException",
            Self::Disabled(_) => "DisabledException",
            Self::InvalidState(_) => "KMSInvalidStateException",
            Self::InvalidCiphertext(_) => "InvalidCiphertextException",
            Self::IncorrectKey(_) => "IncorrectKeyException",
            Self::AccessDenied(_) => "AccessDeniedException",
            Self::Validation(_) => "ValidationException",
            Self::Serialization(_) => "SerializationException",
            Self::InvalidKeyUsage(_) => "InvalidKeyUsageException",
            Self::InvalidGrantToken(_) => "InvalidGrantTokenException",
            Self::InvalidGrantId(_) => "InvalidGrantIdException",
            Self::MalformedPolicy(_) => "MalformedPolicyDocumentException",
            Self::AlreadyExists(_) => "AlreadyExistsException",
            Self::LimitExceeded(_) => "LimitExceededException",
            Self::InvalidMarker(_) => "InvalidMarkerException",
            Self::InvalidAliasName(_) => "InvalidAliasNameException",
            Self::UnsupportedOperation(_) => "UnsupportedOperationException",
            Self::DryRun => "DryRunOperationException",
            Self::UnknownOperation(_) => "UnknownOperationException",
            Self::Internal(_) => "KMSInternalException",
        }
    }

    /// HTTP status.
    pub fn status(&self) -> u16 {
        if matches!(self, Self::Internal(_)) {
            500
        } else {
            400
        }
    }

    /// The message sent to the client (internal detail withheld).
    pub fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "An internal error occurred.".into(),
            other => other.to_string(),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists => Self::AlreadyExists("The resource already exists.".into()),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<BlobError> for OpError {
    fn from(_: BlobError) -> Self {
        Self::InvalidCiphertext(String::new())
    }
}

impl From<PolicyError> for OpError {
    fn from(e: PolicyError) -> Self {
        Self::MalformedPolicy(e.to_string())
    }
}
