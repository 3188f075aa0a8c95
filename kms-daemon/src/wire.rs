//! AWS KMS JSON 1.1 request shapes (field names as AWS sends them). The operation
//! names carried in `X-Amz-Target` are [`crate::ops::Operation`], from the operation
//! table.

use std::fmt;

use base64::Engine;
use serde::{Deserialize, Deserializer};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;
use crate::keys::GrantConstraints;

/// A base64 binary field (plaintext or blob), zeroized on drop.
#[derive(Clone, Default)]
pub struct Binary(pub Zeroizing<Vec<u8>>);

impl fmt::Debug for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Binary({} bytes)", self.0.len())
    }
}

impl<'de> Deserialize<'de> for Binary {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Zeroizing::new(String::deserialize(d)?);
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map(|v| Binary(Zeroizing::new(v)))
            .map_err(|_| serde::de::Error::custom("invalid base64"))
    }
}

/// Base64-encodes bytes for a response field.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A tag.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
pub struct Tag {
    /// Key.
    pub tag_key: String,
    /// Value.
    pub tag_value: String,
}

/// CreateKey.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct CreateKeyRequest {
    pub policy: Option<String>,
    pub description: Option<String>,
    pub key_usage: Option<String>,
    pub customer_master_key_spec: Option<String>,
    pub key_spec: Option<String>,
    pub origin: Option<String>,
    pub custom_key_store_id: Option<String>,
    pub bypass_policy_lockout_safety_check: Option<bool>,
    pub tags: Option<Vec<Tag>>,
    pub multi_region: Option<bool>,
    pub xks_key_id: Option<String>,
}

/// Requests that only name a key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct KeyIdRequest {
    pub key_id: String,
}

/// DescribeKey.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct DescribeKeyRequest {
    pub key_id: String,
    pub grant_tokens: Option<Vec<String>>,
}

/// ListKeys / ListKeyPolicies / ListKeyRotations style paging.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct PageRequest {
    pub key_id: Option<String>,
    pub limit: Option<i64>,
    pub marker: Option<String>,
}

impl PageRequest {
    /// The `KeyId` of a listing that is about one key (ListKeyPolicies, ListKeyRotations).
    ///
    /// # Errors
    /// ValidationException when it is missing.
    pub fn required_key_id(&self) -> Result<String, crate::error::OpError> {
        self.key_id
            .clone()
            .ok_or_else(|| crate::error::OpError::Validation("KeyId is required".into()))
    }
}

/// ListKeys.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct ListKeysRequest {
    pub limit: Option<i64>,
    pub marker: Option<String>,
}

/// CreateAlias / UpdateAlias.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct AliasRequest {
    pub alias_name: String,
    pub target_key_id: String,
}

/// DeleteAlias.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct DeleteAliasRequest {
    pub alias_name: String,
}

/// ScheduleKeyDeletion.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct ScheduleKeyDeletionRequest {
    pub key_id: String,
    pub pending_window_in_days: Option<i64>,
}

/// EnableKeyRotation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct EnableKeyRotationRequest {
    pub key_id: String,
    pub rotation_period_in_days: Option<i64>,
}

/// Encrypt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct EncryptRequest {
    pub key_id: String,
    pub plaintext: Binary,
    pub encryption_context: Option<EncryptionContext>,
    pub grant_tokens: Option<Vec<String>>,
    pub encryption_algorithm: Option<String>,
    pub dry_run: Option<bool>,
}

/// Decrypt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct DecryptRequest {
    pub ciphertext_blob: Binary,
    pub encryption_context: Option<EncryptionContext>,
    pub grant_tokens: Option<Vec<String>>,
    pub key_id: Option<String>,
    pub encryption_algorithm: Option<String>,
    pub recipient: Option<serde_json::Value>,
    pub dry_run: Option<bool>,
}

/// GenerateDataKey and GenerateDataKeyWithoutPlaintext.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct GenerateDataKeyRequest {
    pub key_id: String,
    pub encryption_context: Option<EncryptionContext>,
    pub number_of_bytes: Option<i64>,
    pub key_spec: Option<String>,
    pub grant_tokens: Option<Vec<String>>,
    pub recipient: Option<serde_json::Value>,
    pub dry_run: Option<bool>,
}

/// ReEncrypt.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct ReEncryptRequest {
    pub ciphertext_blob: Binary,
    pub source_encryption_context: Option<EncryptionContext>,
    pub source_key_id: Option<String>,
    pub destination_key_id: String,
    pub destination_encryption_context: Option<EncryptionContext>,
    pub source_encryption_algorithm: Option<String>,
    pub destination_encryption_algorithm: Option<String>,
    pub grant_tokens: Option<Vec<String>>,
    pub dry_run: Option<bool>,
}

/// CreateGrant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct CreateGrantRequest {
    pub key_id: String,
    pub grantee_principal: Option<String>,
    pub grantee_service_principal: Option<String>,
    pub retiring_principal: Option<String>,
    pub retiring_service_principal: Option<String>,
    pub operations: Vec<String>,
    pub constraints: Option<GrantConstraints>,
    pub grant_tokens: Option<Vec<String>>,
    pub name: Option<String>,
    pub dry_run: Option<bool>,
}

/// ListGrants.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct ListGrantsRequest {
    pub key_id: String,
    pub limit: Option<i64>,
    pub marker: Option<String>,
    pub grant_id: Option<String>,
    pub grantee_principal: Option<String>,
}

/// ListRetirableGrants.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct ListRetirableGrantsRequest {
    pub retiring_principal: String,
    pub limit: Option<i64>,
    pub marker: Option<String>,
}

/// RetireGrant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct RetireGrantRequest {
    pub grant_token: Option<String>,
    pub key_id: Option<String>,
    pub grant_id: Option<String>,
    pub dry_run: Option<bool>,
}

/// RevokeGrant.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct RevokeGrantRequest {
    pub key_id: String,
    pub grant_id: String,
    pub dry_run: Option<bool>,
}

/// GetKeyPolicy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct GetKeyPolicyRequest {
    pub key_id: String,
    pub policy_name: Option<String>,
}

/// PutKeyPolicy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
#[allow(missing_docs)]
pub struct PutKeyPolicyRequest {
    pub key_id: String,
    pub policy_name: Option<String>,
    pub policy: String,
    pub bypass_policy_lockout_safety_check: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_wrong_types_and_bad_base64_are_rejected() {
        assert!(serde_json::from_str::<DecryptRequest>(r#"{"CiphertextBlob":"AAAA"}"#).is_ok());
        assert!(
            serde_json::from_str::<DecryptRequest>(r#"{"CiphertextBlob":"AAAA","Bogus":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<DecryptRequest>(r#"{"CiphertextBlob":"!!!"}"#).is_err());
        assert!(serde_json::from_str::<DecryptRequest>(r#"{"CiphertextBlob":5}"#).is_err());
        assert!(
            serde_json::from_str::<DecryptRequest>(
                r#"{"CiphertextBlob":"AAAA","EncryptionContext":{"a":1}}"#
            )
            .is_err()
        );
    }
}
