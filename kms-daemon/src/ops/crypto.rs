//! Cryptographic operations: Encrypt, Decrypt, ReEncrypt, GenerateDataKey*.

use serde_json::Value;

use super::checks::*;
use super::responses::{
    DataKeyResponse, DecryptResponse, EncryptResponse, ReEncryptResponse, to_value,
};
use super::{Kms, Touched};
use crate::authz::Ask;
use crate::blob::{CiphertextBlob, fill_random};
use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::KeyRecord;
use crate::principal::Caller;
use crate::wire::*;

/// A blob to open and what the caller says about it.
struct Unwrap<'a> {
    blob: &'a [u8],
    context: &'a EncryptionContext,
    key_id: Option<&'a str>,
    operation: &'a str,
    tokens: &'a [String],
}

impl Kms {
    /// GenerateDataKey.
    pub(super) fn generate_data_key(
        &self,
        caller: &Caller,
        r: GenerateDataKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.data_key(caller, r, true, touched)
    }

    /// GenerateDataKeyWithoutPlaintext.
    pub(super) fn generate_data_key_without_plaintext(
        &self,
        caller: &Caller,
        r: GenerateDataKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.data_key(caller, r, false, touched)
    }

    /// The key a new blob is sealed under (Encrypt, GenerateDataKey*, the destination of
    /// ReEncrypt): resolved and authorized for `operation` under `context`, grants
    /// included, then required enabled and symmetric.
    fn sealing_key(
        &self,
        caller: &Caller,
        key_id: &str,
        operation: &str,
        context: &EncryptionContext,
        tokens: &[String],
        touched: &mut Touched,
    ) -> Result<KeyRecord, OpError> {
        let key = self.authorized_key(
            caller,
            key_id,
            &Ask {
                operation,
                context: Some(context),
                grant_tokens: tokens,
                grants_apply: true,
                ..Ask::default()
            },
            touched,
        )?;
        require_enabled(&key)?;
        require_symmetric(&key)?;
        Ok(key)
    }

    /// A new data key sealed under the key, with or without its plaintext.
    fn data_key(
        &self,
        caller: &Caller,
        r: GenerateDataKeyRequest,
        with_plaintext: bool,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let op = if with_plaintext {
            "GenerateDataKey"
        } else {
            "GenerateDataKeyWithoutPlaintext"
        };
        let n = match (r.number_of_bytes, r.key_spec.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(
                    "Specify NumberOfBytes or KeySpec, not both".into(),
                ));
            }
            (Some(n), None) if (1..=1024).contains(&n) => usize::try_from(n).unwrap_or(32),
            (Some(_), None) => {
                return Err(OpError::Validation(
                    "NumberOfBytes must be between 1 and 1024".into(),
                ));
            }
            (None, Some("AES_256")) => 32,
            (None, Some("AES_128")) => 16,
            (None, Some(s)) => {
                return Err(OpError::Validation(format!(
                    "KeySpec {s} is not AES_256 or AES_128"
                )));
            }
            (None, None) => {
                return Err(OpError::Validation(
                    "Please specify either number of bytes or key spec.".into(),
                ));
            }
        };
        if r.recipient.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let ctx = ctx_of(r.encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let key = self.sealing_key(caller, &r.key_id, op, &ctx, &tokens, touched)?;
        dry_run(r.dry_run)?;
        let mut plaintext = zeroize::Zeroizing::new(vec![0u8; n]);
        fill_random(&mut plaintext);
        let blob = self.seal_for(&key, &ctx, &plaintext)?;
        to_value(DataKeyResponse {
            ciphertext_blob: blob,
            key_id: key.arn,
            plaintext: with_plaintext.then_some(plaintext),
        })
    }

    pub(super) fn encrypt(
        &self,
        caller: &Caller,
        r: EncryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        if r.plaintext.0.is_empty() || r.plaintext.0.len() > 4096 {
            return Err(OpError::Validation(
                "Plaintext must be between 1 and 4096 bytes".into(),
            ));
        }
        check_algorithm(r.encryption_algorithm.as_deref())?;
        let ctx = ctx_of(r.encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let key = self.sealing_key(caller, &r.key_id, "Encrypt", &ctx, &tokens, touched)?;
        dry_run(r.dry_run)?;
        let blob = self.seal_for(&key, &ctx, &r.plaintext.0)?;
        to_value(EncryptResponse::new(blob, key.arn))
    }

    /// Opens a blob for `operation` (Decrypt or ReEncryptFrom) in DESIGN §3's order.
    fn open_blob(
        &self,
        caller: &Caller,
        u: Unwrap<'_>,
        touched: &mut Touched,
    ) -> Result<(KeyRecord, zeroize::Zeroizing<Vec<u8>>), OpError> {
        let Unwrap {
            blob: blob_bytes,
            context: ctx,
            key_id,
            operation,
            tokens,
        } = u;
        // 1. The blob parses.
        let parsed = CiphertextBlob::parse(blob_bytes)?;
        // 2. KeyId, if given, names the blob's key.
        if let Some(k) = key_id {
            let named = self.resolve(caller, k, &mut Touched::default())?;
            if named.id != parsed.key_id {
                return Err(OpError::IncorrectKey("The key ID in the request does not identify a KMS key that can perform this operation.".into()));
            }
        }
        let key = match self.store.key(&parsed.key_id)? {
            Some(k) => self.refresh(k)?,
            None => None,
        }
        .ok_or_else(|| OpError::InvalidCiphertext(String::new()))?;
        touched.keys.push(key.arn.clone());
        // 3. The caller is authorized.
        self.authz.authorize(
            caller,
            &key,
            &Ask {
                operation,
                context: Some(ctx),
                grant_tokens: tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        // 4. Key state.
        require_enabled(&key)?;
        require_symmetric(&key)?;
        // 5. The context authenticates.
        let material = self
            .material_for(&key, parsed.material_version)?
            .ok_or_else(|| OpError::InvalidCiphertext(String::new()))?;
        let plaintext = parsed.open(&material, ctx)?;
        Ok((key, plaintext))
    }

    pub(super) fn decrypt(
        &self,
        caller: &Caller,
        r: DecryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        check_algorithm(r.encryption_algorithm.as_deref())?;
        if r.recipient.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let ctx = ctx_of(r.encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let (key, plaintext) = self.open_blob(
            caller,
            Unwrap {
                blob: &r.ciphertext_blob.0,
                context: &ctx,
                key_id: r.key_id.as_deref(),
                operation: "Decrypt",
                tokens: &tokens,
            },
            touched,
        )?;
        dry_run(r.dry_run)?;
        to_value(DecryptResponse::new(key.arn, plaintext))
    }

    pub(super) fn re_encrypt(
        &self,
        caller: &Caller,
        r: ReEncryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        check_algorithm(r.source_encryption_algorithm.as_deref())?;
        check_algorithm(r.destination_encryption_algorithm.as_deref())?;
        let src_ctx = ctx_of(r.source_encryption_context)?;
        let dst_ctx = ctx_of(r.destination_encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let (src, plaintext) = self.open_blob(
            caller,
            Unwrap {
                blob: &r.ciphertext_blob.0,
                context: &src_ctx,
                key_id: r.source_key_id.as_deref(),
                operation: "ReEncryptFrom",
                tokens: &tokens,
            },
            touched,
        )?;
        let dst = self.sealing_key(
            caller,
            &r.destination_key_id,
            "ReEncryptTo",
            &dst_ctx,
            &tokens,
            touched,
        )?;
        dry_run(r.dry_run)?;
        let blob = self.seal_for(&dst, &dst_ctx, &plaintext)?;
        to_value(ReEncryptResponse::new(blob, src.arn, dst.arn))
    }
}
