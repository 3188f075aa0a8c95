//! KMS binding: the service principals, the grant each one gets (operations and
//! encryption-context constraints) and how a key's state or a KMS failure becomes an API
//! error code.

use crate::kms::{EncryptionContext, GrantSpec, KeyInfo, Kms, KmsError};
use crate::luks2::KmsToken;
use crate::secret::VolumeKey;

use super::error::{ApiError, ApiErrorCode};
use super::kind::VolumeKind;

/// The WorkSpaces service principal.
pub const WORKSPACES_SERVICE: &str = "workspaces.amazonaws.com";
/// The EBS service principal.
pub const EBS_SERVICE: &str = "ebs.amazonaws.com";
/// The AWS managed key used when encryption is requested without a key.
pub const DEFAULT_KEY_ALIAS: &str = "alias/aws/workspaces";

pub(super) fn ctx_subset(sid: &str, directory_id: &str) -> crate::kms::EncryptionContext {
    let mut c = crate::kms::EncryptionContext::new();
    c.insert(
        "aws:workspaces:sid-directoryid".into(),
        format!("{sid}@{directory_id}"),
    );
    c
}

/// What a volume's data key needs from the KMS key: make it, unwrap it, rewrap it. Both
/// services' grants allow these; only the WorkSpaces service may also create grants.
const VOLUME_KEY_OPERATIONS: [&str; 4] = [
    "Decrypt",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
];

/// The WorkSpaces service's grant on `key`: everything it needs, only within this user's
/// `sid-directoryid` context (CreateGrant lets it hand narrower grants to EBS).
pub(super) fn workspaces_grant(
    key: &str,
    sid: &str,
    directory_id: &str,
    workspace_id: &str,
) -> GrantSpec {
    GrantSpec {
        key_id: key.into(),
        grantee: WORKSPACES_SERVICE.into(),
        retiring: Some(WORKSPACES_SERVICE.into()),
        operations: [VOLUME_KEY_OPERATIONS.as_slice(), &["CreateGrant"]].concat(),
        context_equals: None,
        context_subset: Some(ctx_subset(sid, directory_id)),
        name: Some(format!("workspaces-{workspace_id}")),
    }
}

/// The EBS grant of one volume: exactly that volume's full context.
pub(super) fn ebs_grant(
    key: &str,
    context: &crate::kms::EncryptionContext,
    volume_id: &str,
) -> GrantSpec {
    GrantSpec {
        key_id: key.into(),
        grantee: EBS_SERVICE.into(),
        retiring: Some(WORKSPACES_SERVICE.into()),
        operations: VOLUME_KEY_OPERATIONS.to_vec(),
        context_equals: Some(context.clone()),
        context_subset: None,
        name: Some(format!("ebs-{volume_id}")),
    }
}

pub(super) fn key_state_refusal(key: &KeyInfo, verb: &str) -> Option<ApiError> {
    if key.state == "Enabled" {
        return None;
    }
    let code = if key.state == "Disabled" {
        ApiErrorCode::KmsDisabled
    } else {
        ApiErrorCode::KmsInvalidState
    };
    Some(ApiError::new(
        code,
        format!(
            "cannot {verb}: the WorkSpace's KMS key {} is {}; enable the key (or cancel its deletion) and retry. A running WorkSpace keeps working meanwhile.",
            key.arn, key.state
        ),
    ))
}

/// The key a WorkSpace is launched or rewrapped under: it must exist, be a symmetric
/// encryption key and be Enabled (`verb` names the refused operation in the message).
///
/// # Errors
/// The KMS's refusal (`KMS.<code>`), `KMS.InvalidKeyUsageException`, or the key-state
/// refusal of [`key_state_refusal`].
pub(super) fn check_new_key(kms: &impl Kms, key_id: &str, verb: &str) -> Result<KeyInfo, ApiError> {
    let info = kms
        .describe_key(key_id)
        .map_err(|e| ApiError::from_kms(&e))?;
    check_new_key_info(&info, verb)?;
    Ok(info)
}

/// The checks of [`check_new_key`] on a described key: symmetric, then Enabled.
///
/// # Errors
/// `KMS.InvalidKeyUsageException` or the refusal of [`key_state_refusal`].
pub(super) fn check_new_key_info(info: &KeyInfo, verb: &str) -> Result<(), ApiError> {
    if info.spec != "SYMMETRIC_DEFAULT" {
        return Err(ApiError::new(
            ApiErrorCode::KmsInvalidKeyUsage,
            format!(
                "key {} is {}, not a symmetric encryption key",
                info.arn, info.spec
            ),
        ));
    }
    if let Some(refusal) = key_state_refusal(info, verb) {
        return Err(refusal);
    }
    Ok(())
}

/// Refuses `verb` when the WorkSpace's key (`key_arn`, `None` for an unencrypted
/// WorkSpace) is not Enabled.
///
/// # Errors
/// The KMS's refusal or the key-state refusal of [`key_state_refusal`].
pub(super) fn check_key_usable(
    kms: &impl Kms,
    key_arn: Option<&str>,
    verb: &str,
) -> Result<(), ApiError> {
    let Some(key_arn) = key_arn else {
        return Ok(());
    };
    let info = kms
        .describe_key(key_arn)
        .map_err(|e| ApiError::from_kms(&e))?;
    key_state_refusal(&info, verb).map_or(Ok(()), Err)
}

/// Where a volume's data key is bound: its WorkSpace, user and id.
#[derive(Debug, Clone, Copy)]
pub(super) struct VolumeBinding<'a> {
    /// The KMS key ARN.
    pub key_arn: &'a str,
    /// The user's SID.
    pub sid: &'a str,
    /// The directory.
    pub directory_id: &'a str,
    /// The WorkSpace.
    pub workspace_id: &'a str,
    /// The volume.
    pub volume_id: &'a str,
    /// Root or user volume.
    pub kind: VolumeKind,
}

/// The encryption context of a volume, as bound at launch.
#[must_use]
pub fn volume_context(sid: &str, directory_id: &str, volume_id: &str) -> EncryptionContext {
    let mut c = EncryptionContext::new();
    c.insert(
        "aws:workspaces:sid-directoryid".into(),
        format!("{sid}@{directory_id}"),
    );
    c.insert("aws:ebs:id".into(), volume_id.into());
    c
}

/// A fresh data key for a volume: EBS generates it without plaintext under the volume's
/// full encryption context (user SID @ directory, volume id), then unwraps it as it does at
/// attach; the returned token is what the header carries.
///
/// # Errors
/// The KMS's refusal of either call.
pub(super) fn new_data_key(
    ebs: &impl Kms,
    b: &VolumeBinding<'_>,
    grant_tokens: &[String],
) -> Result<(VolumeKey, KmsToken), KmsError> {
    let context = volume_context(b.sid, b.directory_id, b.volume_id);
    let (blob, arn) = ebs.generate_data_key_without_plaintext(b.key_arn, &context, grant_tokens)?;
    let token = KmsToken {
        key_arn: if arn.is_empty() {
            b.key_arn.to_string()
        } else {
            arn
        },
        ciphertext_blob: blob,
        encryption_context: context.clone(),
        volume_kind: b.kind.to_string(),
        volume_id: b.volume_id.to_string(),
        workspace_id: b.workspace_id.to_string(),
    };
    let key = unwrap_volume_key(ebs, &token, &context, grant_tokens)?;
    Ok((key, token))
}

/// The one data-key unwrap: Decrypt of `token`'s blob under its key, with the `context`
/// this volume must have according to the registry ([`volume_context`]), never the
/// context the header's token claims. KMS authenticates the context against the blob, so
/// a volume file copied from another WorkSpace, or edited to another user's context,
/// cannot be unwrapped.
///
/// # Errors
/// The KMS's refusal (wrong context, no grant, disabled key) or a bad key.
pub(super) fn unwrap_volume_key(
    kms: &impl Kms,
    token: &KmsToken,
    context: &EncryptionContext,
    grant_tokens: &[String],
) -> Result<VolumeKey, KmsError> {
    kms.decrypt_volume_key(
        &token.ciphertext_blob,
        context,
        Some(&token.key_arn),
        grant_tokens,
    )
}

#[cfg(test)]
#[path = "binding_tests.rs"]
mod tests;
