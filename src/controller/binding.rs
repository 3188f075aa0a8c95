//! KMS binding: the service principals, the grant each one gets (operations and
//! encryption-context constraints) and how a key's state or a KMS failure becomes an API
//! error code.

use crate::kms::{GrantSpec, KeyInfo, KmsError};

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
pub(super) fn ebs_grant(
    key: &str,
    context: &crate::kms::EncryptionContext,
    volume_id: &str,
) -> GrantSpec {
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

pub(super) fn kms_failure(e: &KmsError) -> (String, String) {
    match e.code() {
        Some(code) => (format!("KMS.{code}"), e.to_string()),
        None => ("KMS.Unavailable".into(), e.to_string()),
    }
}

pub(super) fn key_state_refusal(key: &KeyInfo, verb: &str) -> Option<(String, String)> {
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
