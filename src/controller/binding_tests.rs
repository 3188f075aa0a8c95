//! The controller's KMS decisions against an in-memory fake KMS (no daemon).

use std::cell::RefCell;
use std::collections::BTreeMap;

use crate::kms::{EncryptionContext, Grant, GrantSpec, KeyInfo, Kms, KmsError};
use crate::secret::VolumeKey;

use super::*;

/// A fake KMS: keys by id or ARN; a blob is the key ARN and the context it was made under,
/// so Decrypt checks the context the way the real KMS does; every call is recorded.
#[derive(Default)]
struct FakeKms {
    keys: BTreeMap<String, KeyInfo>,
    calls: RefCell<Vec<String>>,
    fail_with: Option<&'static str>,
}

const ARN: &str = "arn:aws:kms:us-east-1:111122223333:key/k1";

impl FakeKms {
    fn with_key(state: &str, spec: &str) -> Self {
        let mut f = Self::default();
        f.keys.insert(
            ARN.into(),
            KeyInfo {
                arn: ARN.into(),
                key_id: "k1".into(),
                state: state.into(),
                spec: spec.into(),
                manager: "CUSTOMER".into(),
            },
        );
        f
    }
    fn refuse(&self, op: &'static str) -> Result<(), KmsError> {
        self.calls.borrow_mut().push(op.into());
        match self.fail_with {
            Some(code) => Err(KmsError::Service {
                op,
                code: code.into(),
                message: "refused".into(),
            }),
            None => Ok(()),
        }
    }
    fn blob(key: &str, ctx: &EncryptionContext) -> Vec<u8> {
        serde_json::to_vec(&(key, ctx)).expect("serialises")
    }
}

impl Kms for FakeKms {
    fn describe_key(&self, key_id: &str) -> Result<KeyInfo, KmsError> {
        self.refuse("DescribeKey")?;
        self.keys.get(key_id).cloned().ok_or(KmsError::Service {
            op: "DescribeKey",
            code: "NotFoundException".into(),
            message: format!("{key_id} not found"),
        })
    }
    fn create_grant(&self, spec: &GrantSpec) -> Result<Grant, KmsError> {
        self.refuse("CreateGrant")?;
        Ok(Grant {
            grant_id: format!("g-{}", spec.grantee),
            grant_token: "t".into(),
        })
    }
    fn retire_grant(&self, _key_id: &str, _grant_id: &str) -> Result<(), KmsError> {
        self.refuse("RetireGrant")
    }
    fn generate_data_key_without_plaintext(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        _grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        self.refuse("GenerateDataKeyWithoutPlaintext")?;
        Ok((Self::blob(key_id, context), String::new()))
    }
    fn decrypt_volume_key(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        key_id: Option<&str>,
        _grant_tokens: &[String],
    ) -> Result<VolumeKey, KmsError> {
        self.refuse("Decrypt")?;
        if blob != Self::blob(key_id.unwrap_or(ARN), context) {
            return Err(KmsError::Service {
                op: "Decrypt",
                code: "InvalidCiphertextException".into(),
                message: "context mismatch".into(),
            });
        }
        let mut raw: [u8; 64] = std::array::from_fn(|i| u8::try_from(i).expect("< 64"));
        Ok(VolumeKey::from_slice(&mut raw).expect("64 bytes"))
    }
    fn re_encrypt(
        &self,
        _blob: &[u8],
        _source_context: &EncryptionContext,
        destination_key: &str,
        destination_context: &EncryptionContext,
        _grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        self.refuse("ReEncrypt")?;
        Ok((
            Self::blob(destination_key, destination_context),
            destination_key.into(),
        ))
    }
}

#[test]
fn an_enabled_symmetric_key_is_accepted() {
    let kms = FakeKms::with_key("Enabled", "SYMMETRIC_DEFAULT");
    let info = check_new_key(&kms, ARN, "launch").expect("usable");
    assert_eq!(info.arn, ARN);
    assert!(check_key_usable(&kms, Some(ARN), "reboot").is_ok());
}

#[test]
fn a_disabled_key_refuses_reboot_and_rebuild() {
    let kms = FakeKms::with_key("Disabled", "SYMMETRIC_DEFAULT");
    for verb in ["reboot", "rebuild"] {
        let e = check_key_usable(&kms, Some(ARN), verb).expect_err("refused");
        assert_eq!(e.code, ApiErrorCode::KmsDisabled);
        assert_eq!(e.code.to_string(), "KMS.DisabledException");
        assert!(e.message.starts_with(&format!("cannot {verb}: ")), "{e}");
        assert!(e.message.contains("is Disabled"), "{e}");
    }
}

#[test]
fn a_key_pending_deletion_is_an_invalid_state() {
    let kms = FakeKms::with_key("PendingDeletion", "SYMMETRIC_DEFAULT");
    let e = check_key_usable(&kms, Some(ARN), "rebuild").expect_err("refused");
    assert_eq!(e.code.to_string(), "KMS.KMSInvalidStateException");
    let e = check_new_key(&kms, ARN, "launch").expect_err("refused");
    assert_eq!(e.code, ApiErrorCode::KmsInvalidState);
}

#[test]
fn an_unencrypted_workspace_does_not_ask_the_kms() {
    let kms = FakeKms {
        fail_with: Some("DisabledException"),
        ..FakeKms::default()
    };
    assert!(check_key_usable(&kms, None, "reboot").is_ok());
    assert!(kms.calls.borrow().is_empty());
}

#[test]
fn an_asymmetric_key_is_refused_before_its_state() {
    let kms = FakeKms::with_key("Disabled", "RSA_2048");
    let e = check_new_key(&kms, ARN, "launch").expect_err("refused");
    assert_eq!(e.code.to_string(), "KMS.InvalidKeyUsageException");
}

#[test]
fn kms_refusals_keep_their_code_and_transport_failures_are_unavailable() {
    let kms = FakeKms::with_key("Enabled", "SYMMETRIC_DEFAULT");
    let e = check_new_key(&kms, "alias/missing", "launch").expect_err("unknown key");
    assert_eq!(e.code.to_string(), "KMS.NotFoundException");
    let refusing = FakeKms {
        fail_with: Some("AccessDeniedException"),
        ..FakeKms::with_key("Enabled", "SYMMETRIC_DEFAULT")
    };
    let e = check_key_usable(&refusing, Some(ARN), "start").expect_err("denied");
    assert_eq!(e.code, ApiErrorCode::Kms("AccessDeniedException".into()));
    let down = ApiError::from_kms(&KmsError::Transport {
        op: "DescribeKey",
        detail: "connection refused".into(),
    });
    assert_eq!(down.code.to_string(), "KMS.Unavailable");
}

#[test]
fn grants_are_scoped_to_the_user_and_to_the_volume() {
    let ws = workspaces_grant(ARN, "S-1-5-21-1-2-3-1001", "d-0123456789", "ws-abc");
    assert_eq!(ws.grantee, WORKSPACES_SERVICE);
    assert_eq!(ws.retiring.as_deref(), Some(WORKSPACES_SERVICE));
    assert!(ws.operations.contains(&"CreateGrant"));
    assert!(ws.context_equals.is_none());
    let subset = ws.context_subset.expect("constrained");
    assert_eq!(
        subset
            .get("aws:workspaces:sid-directoryid")
            .map(String::as_str),
        Some("S-1-5-21-1-2-3-1001@d-0123456789")
    );
    assert_eq!(subset.len(), 1);

    let ctx = volume_context("S-1-5-21-1-2-3-1001", "d-0123456789", "vol-1");
    let ebs = ebs_grant(ARN, &ctx, "vol-1");
    assert_eq!(ebs.grantee, EBS_SERVICE);
    assert!(
        !ebs.operations.contains(&"CreateGrant"),
        "EBS cannot re-grant"
    );
    assert_eq!(ebs.context_equals.as_ref(), Some(&ctx));
    assert!(ebs.context_subset.is_none());
    assert_eq!(ebs.name.as_deref(), Some("ebs-vol-1"));
}

#[test]
fn a_new_data_key_is_bound_to_the_volume_context() {
    let kms = FakeKms::with_key("Enabled", "SYMMETRIC_DEFAULT");
    let b = VolumeBinding {
        key_arn: ARN,
        sid: "S-1-5-21-1-2-3-1001",
        directory_id: "d-0123456789",
        workspace_id: "ws-abc",
        volume_id: "vol-9",
        kind: VolumeKind::User,
    };
    let (_key, token) = new_data_key(&kms, &b, &[]).expect("data key");
    assert_eq!(
        token.encryption_context,
        volume_context(b.sid, b.directory_id, "vol-9")
    );
    assert_eq!(token.key_arn, ARN, "falls back to the key asked for");
    assert_eq!(
        (token.volume_kind.as_str(), token.volume_id.as_str()),
        ("user", "vol-9")
    );
    assert_eq!(
        kms.calls.borrow().as_slice(),
        ["GenerateDataKeyWithoutPlaintext", "Decrypt"]
    );
    let refusing = FakeKms {
        fail_with: Some("DisabledException"),
        ..FakeKms::default()
    };
    let e = new_data_key(&refusing, &b, &[]).expect_err("refused");
    assert_eq!(e.code(), Some("DisabledException"));
}

#[test]
fn a_volume_key_is_unwrapped_under_the_registry_context_not_the_headers() {
    let kms = FakeKms::with_key("Enabled", "SYMMETRIC_DEFAULT");
    let registry = volume_context("S-1-5-21-1-2-3-1001", "d-0123456789", "vol-9");
    let other = volume_context("S-1-5-21-1-2-3-1002", "d-0123456789", "vol-7");
    let token = |blob_ctx: &EncryptionContext, header_ctx: &EncryptionContext| KmsToken {
        key_arn: ARN.into(),
        ciphertext_blob: FakeKms::blob(ARN, blob_ctx),
        encryption_context: header_ctx.clone(),
        volume_kind: "user".into(),
        volume_id: "vol-9".into(),
        workspace_id: "ws-abc".into(),
    };
    // A header whose claimed context was edited: the blob still opens under the context
    // the registry gives this volume.
    let edited = token(&registry, &other);
    unwrap_volume_key(&kms, &edited, &registry, &[]).expect("registry context unwraps");
    // A volume file copied from another user's WorkSpace, header and all: its own context
    // would unwrap it, the registry's must not.
    let copied = token(&other, &other);
    let e = unwrap_volume_key(&kms, &copied, &registry, &[]).expect_err("foreign volume");
    assert_eq!(e.code(), Some("InvalidCiphertextException"));
    assert_eq!(kms.calls.borrow().as_slice(), ["Decrypt", "Decrypt"]);
}
