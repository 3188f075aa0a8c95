//! Key lifecycle: CreateKey, DescribeKey, ListKeys, Enable/DisableKey,
//! Schedule/CancelKeyDeletion, and the default and WorkSpaces managed key policies.

use serde_json::{Value, json};

use super::checks::*;
use super::responses::{
    Empty, KeyIdResponse, KeyListEntry, KeyMetadata, KeyMetadataResponse, ScheduleDeletionResponse,
    to_value,
};
use super::{DAY, WORKSPACES_ALIAS, WORKSPACES_SERVICE};
use super::{Kms, Touched, simple_ask};
use crate::authz::Ask;
use crate::error::OpError;
use crate::keys::{KeyManager, KeyRecord, KeySpec, KeyState};
use crate::policy::PolicyDocument;
use crate::principal::Caller;
use crate::wire::*;

impl Kms {
    /// AWS's default key policy: the account root may do everything (delegates to IAM).
    pub fn default_key_policy(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [{
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{}:root", self.account)},
                "Action": "kms:*",
                "Resource": "*"
            }]
        }))
        .expect("a JSON literal serializes")
    }

    /// The fixed policy of the AWS managed key for WorkSpaces.
    pub fn workspaces_managed_policy(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "Version": "2012-10-17",
            "Id": "auto-workspaces-2",
            "Statement": [
                {
                    "Sid": "Allow access through WorkSpaces for all principals in the account that are authorized to use WorkSpaces",
                    "Effect": "Allow",
                    "Principal": {"AWS": "*"},
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:DescribeKey"],
                    "Resource": "*",
                    "Condition": {"StringEquals": {
                        "kms:ViaService": format!("workspaces.{}.amazonaws.com", self.region),
                        "kms:CallerAccount": self.account,
                    }}
                },
                {
                    "Sid": "Allow direct access to key metadata to the account",
                    "Effect": "Allow",
                    "Principal": {"AWS": format!("arn:aws:iam::{}:root", self.account)},
                    "Action": ["kms:Describe*", "kms:Get*", "kms:List*"],
                    "Resource": "*"
                },
                {
                    "Sid": "Allow the WorkSpaces service to use the key",
                    "Effect": "Allow",
                    "Principal": {"Service": WORKSPACES_SERVICE},
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:DescribeKey", "kms:ListGrants", "kms:RetireGrant"],
                    "Resource": "*"
                }
            ]
        }))
        .expect("a JSON literal serializes")
    }

    pub(super) fn create_workspaces_managed_key(&self) -> Result<String, OpError> {
        let key = self.new_key_record(
            KeySpec::SymmetricDefault,
            "ENCRYPT_DECRYPT",
            "Default key that protects my WorkSpaces when no other key is defined",
            self.workspaces_managed_policy(),
            KeyManager::Aws,
        );
        let m = self.new_material(&key.id, 1);
        match self.store.create_key(&key, &m, Some(WORKSPACES_ALIAS)) {
            Ok(()) => Ok(key.id),
            // Lost a race with another creator: use theirs.
            Err(crate::store::StoreError::AlreadyExists) => self
                .store
                .alias(WORKSPACES_ALIAS)?
                .map(|a| a.key_id)
                .ok_or_else(|| OpError::Internal("aws/workspaces alias vanished".into())),
            Err(e) => Err(e.into()),
        }
    }

    fn metadata(&self, k: &KeyRecord) -> KeyMetadataResponse {
        KeyMetadataResponse {
            key_metadata: KeyMetadata {
                aws_account_id: self.account.clone(),
                key_id: k.id.clone(),
                arn: k.arn.clone(),
                creation_date: k.created,
                enabled: k.state == KeyState::Enabled,
                description: k.description.clone(),
                key_usage: k.usage.clone(),
                key_state: k.state.as_str(),
                origin: "AWS_KMS",
                key_manager: k.manager.as_str(),
                customer_master_key_spec: k.spec.as_str(),
                key_spec: k.spec.as_str(),
                multi_region: false,
                encryption_algorithms: k.spec.encryption_algorithms(&k.usage),
                signing_algorithms: k.spec.signing_algorithms(&k.usage),
                deletion_date: k.deletion_date,
                pending_deletion_window_in_days: k.pending_window_days,
            },
        }
    }

    pub(super) fn create_key(
        &self,
        caller: &Caller,
        r: CreateKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.authz.authorize_account_action(caller, "CreateKey")?;
        let spec_name = match (&r.key_spec, &r.customer_master_key_spec) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(
                    "Specify KeySpec or CustomerMasterKeySpec, not both".into(),
                ));
            }
            (Some(s), None) | (None, Some(s)) => s.as_str(),
            (None, None) => "SYMMETRIC_DEFAULT",
        };
        let spec = KeySpec::parse(spec_name).ok_or_else(|| OpError::Validation(format!("1 validation error detected: Value '{spec_name}' at 'keySpec' failed to satisfy constraint")))?;
        let usage = match &r.key_usage {
            // AWS: KeyUsage may be omitted only for symmetric encryption keys.
            None if spec_name != "SYMMETRIC_DEFAULT" => {
                return Err(OpError::Validation(format!(
                    "KeyUsage is required when KeySpec is {spec_name}"
                )));
            }
            None => spec.usages()[0].to_owned(),
            Some(u) if spec.usages().contains(&u.as_str()) => u.clone(),
            Some(u) => {
                return Err(OpError::Validation(format!(
                    "KeyUsage {u} is not compatible with KeySpec {spec_name}"
                )));
            }
        };
        if let Some(o) = r.origin.as_deref().filter(|o| *o != "AWS_KMS") {
            return Err(OpError::UnsupportedOperation(format!(
                "Origin {o} is not supported"
            )));
        }
        if r.custom_key_store_id.is_some() || r.xks_key_id.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Custom key stores are not supported".into(),
            ));
        }
        if r.multi_region == Some(true) {
            return Err(OpError::UnsupportedOperation(
                "Multi-Region keys are not supported".into(),
            ));
        }
        let description = r.description.unwrap_or_default();
        if description.len() > 8192 {
            return Err(OpError::Validation(
                "Description is longer than 8192 characters".into(),
            ));
        }
        let policy = match r.policy {
            Some(p) => {
                if p.len() > 32_768 {
                    return Err(OpError::LimitExceeded(
                        "The key policy is larger than 32 KB".into(),
                    ));
                }
                PolicyDocument::parse(&p)?.require_principals()?;
                p
            }
            None => self.default_key_policy(),
        };
        let key = self.new_key_record(spec, &usage, &description, policy, KeyManager::Customer);
        let m = self.new_material(&key.id, 1);
        self.store.create_key(&key, &m, None)?;
        touched.keys.push(key.arn.clone());
        to_value(self.metadata(&key))
    }

    pub(super) fn describe_key(
        &self,
        caller: &Caller,
        r: DescribeKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let tokens = r.grant_tokens.unwrap_or_default();
        let key = self.authorized_key(
            caller,
            &r.key_id,
            &Ask {
                operation: "DescribeKey",
                grant_tokens: &tokens,
                grants_apply: true,
                ..Ask::default()
            },
            touched,
        )?;
        to_value(self.metadata(&key))
    }

    pub(super) fn list_keys(
        &self,
        caller: &Caller,
        r: ListKeysRequest,
        _touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.authz.authorize_account_action(caller, "ListKeys")?;
        let now = self.clock.now();
        let mut items = Vec::new();
        for (id, arn) in self.store.list_keys()? {
            if let Some(k) = self.store.key(&id)?
                && k.state == KeyState::PendingDeletion
                && k.deletion_date.is_some_and(|d| d <= now)
            {
                continue;
            }
            items.push(KeyListEntry {
                key_id: id,
                key_arn: arn,
            });
        }
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        paged("Keys", items, next)
    }

    /// EnableKey.
    pub(super) fn enable_key(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.set_enabled(caller, r, true, touched)
    }

    /// DisableKey.
    pub(super) fn disable_key(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.set_enabled(caller, r, false, touched)
    }

    /// Enables or disables a key.
    fn set_enabled(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        enable: bool,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let op = if enable { "EnableKey" } else { "DisableKey" };
        let mut key = self.authorized_key(caller, &r.key_id, &simple_ask(op), touched)?;
        require_customer_managed(&key, caller, op)?;
        require_not_pending(&key)?;
        key.state = if enable {
            KeyState::Enabled
        } else {
            KeyState::Disabled
        };
        self.store.update_key(&key)?;
        if enable {
            // A rotation that fell due while disabled happens now.
            self.refresh(key)?;
        }
        to_value(Empty {})
    }

    pub(super) fn schedule_deletion(
        &self,
        caller: &Caller,
        r: ScheduleKeyDeletionRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.authorized_key(
            caller,
            &r.key_id,
            &simple_ask("ScheduleKeyDeletion"),
            touched,
        )?;
        require_customer_managed(&key, caller, "ScheduleKeyDeletion")?;
        let days = r.pending_window_in_days.unwrap_or(30);
        if !(7..=30).contains(&days) {
            return Err(OpError::Validation(
                "PendingWindowInDays must be between 7 and 30".into(),
            ));
        }
        require_not_pending(&key)?;
        let when = self.clock.now() + days * DAY;
        key.state = KeyState::PendingDeletion;
        key.deletion_date = Some(when);
        key.pending_window_days = Some(days);
        self.store.update_key(&key)?;
        to_value(ScheduleDeletionResponse {
            key_id: &key.arn,
            deletion_date: when,
            key_state: "PendingDeletion",
            pending_window_in_days: days,
        })
    }

    pub(super) fn cancel_deletion(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key =
            self.authorized_key(caller, &r.key_id, &simple_ask("CancelKeyDeletion"), touched)?;
        require_customer_managed(&key, caller, "CancelKeyDeletion")?;
        if key.state != KeyState::PendingDeletion {
            return Err(OpError::InvalidState(format!(
                "{} is not pending deletion.",
                key.arn
            )));
        }
        key.state = KeyState::Disabled;
        key.deletion_date = None;
        key.pending_window_days = None;
        self.store.update_key(&key)?;
        to_value(KeyIdResponse { key_id: &key.arn })
    }
}
