//! Checks and helpers the operations share: request limits, key-state requirements,
//! paging.

use serde_json::Value;

use super::responses::to_value;
use crate::blob::fill_random;
use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::{KeyManager, KeyRecord, KeySpec, KeyState};
use crate::principal::Caller;

/// The request's encryption context (empty if absent), at most 8 KiB.
pub(super) fn ctx_of(c: Option<EncryptionContext>) -> Result<EncryptionContext, OpError> {
    let c = c.unwrap_or_default();
    if c.byte_size() > 8192 {
        return Err(OpError::Validation(
            "EncryptionContext is larger than 8192 bytes".into(),
        ));
    }
    Ok(c)
}

/// Only SYMMETRIC_DEFAULT encrypts here.
pub(super) fn check_algorithm(a: Option<&str>) -> Result<(), OpError> {
    match a {
        None | Some("SYMMETRIC_DEFAULT") => Ok(()),
        Some("RSAES_OAEP_SHA_1" | "RSAES_OAEP_SHA_256" | "SM2PKE") => {
            Err(OpError::InvalidKeyUsage(
                "The requested encryption algorithm is not supported by the key".into(),
            ))
        }
        Some(_) => Err(OpError::Validation(
            "EncryptionAlgorithm must be SYMMETRIC_DEFAULT".into(),
        )),
    }
}

/// One page of `items` from `marker` (an index) with at most `limit` items, and the
/// next marker if more remain.
pub(super) fn page<T>(
    items: Vec<T>,
    limit: Option<i64>,
    marker: Option<&str>,
) -> Result<(Vec<T>, Option<String>), OpError> {
    let limit = match limit {
        None => 100,
        Some(l) if (1..=1000).contains(&l) => usize::try_from(l).unwrap_or(100),
        Some(_) => {
            return Err(OpError::Validation(
                "Limit must be between 1 and 1000".into(),
            ));
        }
    };
    let start = match marker {
        None => 0,
        Some(m) => m
            .parse::<usize>()
            .map_err(|_| OpError::InvalidMarker("The marker is not valid.".into()))?,
    };
    let total = items.len();
    let end = start.saturating_add(limit).min(total);
    let next = (end < total).then(|| end.to_string());
    Ok((
        items
            .into_iter()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect(),
        next,
    ))
}

/// A list response: `items` under `field`, `Truncated` and the next marker (absent on
/// the last page).
pub(super) fn paged<T: serde::Serialize>(
    field: &str,
    items: Vec<T>,
    next: Option<String>,
) -> Result<Value, OpError> {
    let mut out = serde_json::Map::new();
    out.insert(field.to_owned(), to_value(items)?);
    out.insert("Truncated".to_owned(), Value::Bool(next.is_some()));
    if let Some(n) = next {
        out.insert("NextMarker".to_owned(), Value::String(n));
    }
    Ok(Value::Object(out))
}

/// `n` random bytes, hex-encoded.
pub(super) fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    hex::encode(b)
}

/// The error for using a key in the state it is in.
pub(super) fn state_error(key: &KeyRecord) -> OpError {
    match key.state {
        KeyState::Disabled => OpError::Disabled(format!("{} is disabled.", key.arn)),
        _ => OpError::InvalidState(format!("{} is pending deletion.", key.arn)),
    }
}

/// Fails unless `key` is enabled.
pub(super) fn require_enabled(key: &KeyRecord) -> Result<(), OpError> {
    if key.state == KeyState::Enabled {
        Ok(())
    } else {
        Err(state_error(key))
    }
}

/// Fails if `key` is pending deletion.
pub(super) fn require_not_pending(key: &KeyRecord) -> Result<(), OpError> {
    if key.state == KeyState::PendingDeletion {
        Err(state_error(key))
    } else {
        Ok(())
    }
}

/// Fails unless `key` is a SYMMETRIC_DEFAULT key.
pub(super) fn require_symmetric(key: &KeyRecord) -> Result<(), OpError> {
    if key.spec == KeySpec::SymmetricDefault {
        Ok(())
    } else {
        Err(OpError::InvalidKeyUsage(format!(
            "{} key usage is {} with key spec {}; this operation needs a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key",
            key.arn,
            key.usage,
            key.spec.as_str()
        )))
    }
}

/// Fails for AWS managed keys, which the caller may not change.
pub(super) fn require_customer_managed(
    key: &KeyRecord,
    caller: &Caller,
    action: &str,
) -> Result<(), OpError> {
    if key.manager == KeyManager::Aws {
        return Err(OpError::AccessDenied(format!(
            "User: {} is not authorized to perform: kms:{action} on resource: {} because it is an AWS managed key",
            caller.effective().arn(),
            key.arn
        )));
    }
    Ok(())
}

/// DryRunOperationException once every check passed, if the caller asked for a dry run.
pub(super) fn dry_run(flag: Option<bool>) -> Result<(), OpError> {
    if flag == Some(true) {
        Err(OpError::DryRun)
    } else {
        Ok(())
    }
}
