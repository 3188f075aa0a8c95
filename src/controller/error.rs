//! The controller's error type.

use crate::kms::KmsError;

use super::registry::RegistryError;

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

pub(super) fn api(code: &str, message: impl Into<String>) -> ControllerError {
    ControllerError::Api {
        code: code.into(),
        message: message.into(),
    }
}
