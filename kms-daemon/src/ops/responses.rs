//! Typed response bodies of the cryptographic operations (field names as AWS sends
//! them). Plaintext stays in zeroizing buffers until it is serialized; the base64 text
//! made on the way is wiped too, and the server wipes the response it writes.

use serde::{Serialize, Serializer};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::error::OpError;
use crate::keys::{GrantConstraints, GrantOperation};
use crate::wire::b64;

/// The only encryption algorithm of symmetric keys.
const SYMMETRIC_DEFAULT: &str = "SYMMETRIC_DEFAULT";

/// Serializes bytes as base64, wiping the intermediate text.
fn base64<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    let text = Zeroizing::new(b64(bytes));
    s.serialize_str(&text)
}

/// Serializes optional plaintext as base64 (absent fields are skipped).
fn base64_secret<S: Serializer>(
    bytes: &Option<Zeroizing<Vec<u8>>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match bytes {
        Some(b) => base64(b, s),
        None => s.serialize_none(),
    }
}

/// The response as a JSON value (the server's wipe reaches its strings).
pub(super) fn to_value(r: impl Serialize) -> Result<Value, OpError> {
    serde_json::to_value(r).map_err(|e| OpError::Internal(format!("response: {e}")))
}

/// Encrypt.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct EncryptResponse {
    /// The sealed blob.
    #[serde(serialize_with = "base64")]
    pub ciphertext_blob: Vec<u8>,
    /// ARN of the key that sealed it.
    pub key_id: String,
    /// Always SYMMETRIC_DEFAULT.
    pub encryption_algorithm: &'static str,
}

impl EncryptResponse {
    /// `blob` sealed under `key_arn`.
    pub fn new(ciphertext_blob: Vec<u8>, key_id: String) -> Self {
        Self {
            ciphertext_blob,
            key_id,
            encryption_algorithm: SYMMETRIC_DEFAULT,
        }
    }
}

/// GenerateDataKey and GenerateDataKeyWithoutPlaintext.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct DataKeyResponse {
    /// The data key sealed under the key.
    #[serde(serialize_with = "base64")]
    pub ciphertext_blob: Vec<u8>,
    /// ARN of the key.
    pub key_id: String,
    /// The data key itself (GenerateDataKey only).
    #[serde(
        serialize_with = "base64_secret",
        skip_serializing_if = "Option::is_none"
    )]
    pub plaintext: Option<Zeroizing<Vec<u8>>>,
}

/// Decrypt.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct DecryptResponse {
    /// ARN of the key that opened the blob.
    pub key_id: String,
    /// Always SYMMETRIC_DEFAULT.
    pub encryption_algorithm: &'static str,
    /// The opened plaintext.
    #[serde(serialize_with = "base64")]
    pub plaintext: Zeroizing<Vec<u8>>,
}

impl DecryptResponse {
    /// `plaintext` opened with `key_arn`.
    pub fn new(key_id: String, plaintext: Zeroizing<Vec<u8>>) -> Self {
        Self {
            key_id,
            encryption_algorithm: SYMMETRIC_DEFAULT,
            plaintext,
        }
    }
}

/// ReEncrypt.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ReEncryptResponse {
    /// The blob sealed under the destination key.
    #[serde(serialize_with = "base64")]
    pub ciphertext_blob: Vec<u8>,
    /// ARN of the key that opened the source blob.
    pub source_key_id: String,
    /// ARN of the destination key.
    pub key_id: String,
    /// Always SYMMETRIC_DEFAULT.
    pub source_encryption_algorithm: &'static str,
    /// Always SYMMETRIC_DEFAULT.
    pub destination_encryption_algorithm: &'static str,
}

impl ReEncryptResponse {
    /// `blob` moved from `source_key_id` to `key_id`.
    pub fn new(ciphertext_blob: Vec<u8>, source_key_id: String, key_id: String) -> Self {
        Self {
            ciphertext_blob,
            source_key_id,
            key_id,
            source_encryption_algorithm: SYMMETRIC_DEFAULT,
            destination_encryption_algorithm: SYMMETRIC_DEFAULT,
        }
    }
}

/// `KeyMetadata` of CreateKey and DescribeKey.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyMetadata {
    /// Account that owns the key.
    #[serde(rename = "AWSAccountId")]
    pub aws_account_id: String,
    /// Key id (a UUID).
    pub key_id: String,
    /// Key ARN.
    pub arn: String,
    /// Creation time, epoch seconds.
    pub creation_date: i64,
    /// Whether the key is enabled.
    pub enabled: bool,
    /// Description.
    pub description: String,
    /// `ENCRYPT_DECRYPT`, `SIGN_VERIFY`, ...
    pub key_usage: String,
    /// `Enabled`, `Disabled`, `PendingDeletion`.
    pub key_state: &'static str,
    /// Always `AWS_KMS`.
    pub origin: &'static str,
    /// `CUSTOMER` or `AWS`.
    pub key_manager: &'static str,
    /// The key spec under its old name.
    pub customer_master_key_spec: String,
    /// The key spec.
    pub key_spec: String,
    /// Always false.
    pub multi_region: bool,
    /// Encryption algorithms (none for signing keys).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub encryption_algorithms: Vec<&'static str>,
    /// Signing algorithms (none for encryption keys).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub signing_algorithms: Vec<&'static str>,
    /// When a pending deletion completes, epoch seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deletion_date: Option<i64>,
    /// The pending-deletion window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_deletion_window_in_days: Option<i64>,
}

/// CreateKey and DescribeKey.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyMetadataResponse {
    /// The key's metadata.
    pub key_metadata: KeyMetadata,
}

/// An operation that answers with an empty object (`{}`).
#[derive(Serialize)]
pub(super) struct Empty {}

/// Responses that name only the key: CancelKeyDeletion, RotateKeyOnDemand.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyIdResponse<'a> {
    pub key_id: &'a str,
}

/// ScheduleKeyDeletion.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct ScheduleDeletionResponse<'a> {
    pub key_id: &'a str,
    pub deletion_date: i64,
    pub key_state: &'static str,
    pub pending_window_in_days: i64,
}

/// One entry of ListKeys.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyListEntry {
    pub key_id: String,
    pub key_arn: String,
}

/// One entry of ListAliases.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct AliasListEntry {
    pub alias_name: String,
    pub alias_arn: String,
    pub target_key_id: String,
    pub creation_date: i64,
    pub last_updated_date: i64,
}

/// CreateGrant.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct CreateGrantResponse<'a> {
    pub grant_token: &'a str,
    pub grant_id: &'a str,
}

/// One entry of ListGrants and ListRetirableGrants.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct GrantListEntry<'a> {
    pub key_id: &'a str,
    pub grant_id: &'a str,
    pub name: &'a str,
    pub creation_date: i64,
    pub grantee_principal: &'a str,
    pub issuing_account: &'a str,
    pub operations: &'a [GrantOperation],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retiring_principal: Option<&'a str>,
    #[serde(skip_serializing_if = "GrantConstraints::is_empty")]
    pub constraints: &'a GrantConstraints,
}

/// GetKeyRotationStatus. The period and next date appear together or not at all.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RotationStatusResponse<'a> {
    pub key_id: &'a str,
    pub key_rotation_enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotation_period_in_days: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_rotation_date: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_demand_rotation_start_date: Option<i64>,
}

/// One entry of ListKeyRotations.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct RotationListEntry<'a> {
    pub key_id: &'a str,
    pub rotation_date: i64,
    pub rotation_type: &'static str,
}

/// GetKeyPolicy.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyPolicyResponse<'a> {
    pub policy: &'a str,
    pub policy_name: &'static str,
}

/// ListKeyPolicies: the one policy every key has.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct KeyPolicyNamesResponse {
    pub policy_names: [&'static str; 1],
    pub truncated: bool,
}
