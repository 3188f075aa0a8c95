//! Aliases: CreateAlias, UpdateAlias, ListAliases, DeleteAlias.

use serde_json::Value;

use super::checks::*;
use super::responses::{AliasListEntry, Empty, to_value};
use super::{Kms, Touched, simple_ask};
use crate::error::OpError;
use crate::principal::Caller;
use crate::store::AliasRecord;
use crate::wire::*;

impl Kms {
    fn validate_alias_name(name: &str) -> Result<(), OpError> {
        let rest = name.strip_prefix("alias/").ok_or_else(|| {
            OpError::Validation("Alias must start with the prefix \"alias/\"".into())
        })?;
        if rest.is_empty()
            || name.len() > 256
            || !rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        {
            return Err(OpError::Validation(format!(
                "Alias name {name} is not valid"
            )));
        }
        if rest.starts_with("aws/") {
            return Err(OpError::InvalidAliasName(
                "Alias names starting with alias/aws/ are reserved for AWS managed keys".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn create_alias(
        &self,
        caller: &Caller,
        r: AliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        Self::validate_alias_name(&r.alias_name)?;
        if r.target_key_id.starts_with("alias/") || r.target_key_id.contains(":alias/") {
            return Err(OpError::Validation(
                "TargetKeyId must be a key id or key ARN".into(),
            ));
        }
        let key = self.authorized_key(
            caller,
            &r.target_key_id,
            &simple_ask("CreateAlias"),
            touched,
        )?;
        self.authz
            .authorize_alias_action(caller, &self.alias_arn(&r.alias_name), "CreateAlias")?;
        require_customer_managed(&key, caller, "CreateAlias")?;
        require_not_pending(&key)?;
        self.store
            .create_alias(&AliasRecord {
                name: r.alias_name.clone(),
                key_id: key.id.clone(),
                created: self.clock.now(),
            })
            .map_err(|e| match e {
                crate::store::StoreError::AlreadyExists => OpError::AlreadyExists(format!(
                    "An alias with the name {} already exists",
                    self.alias_arn(&r.alias_name)
                )),
                other => other.into(),
            })?;
        to_value(Empty {})
    }

    pub(super) fn update_alias(
        &self,
        caller: &Caller,
        r: AliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        Self::validate_alias_name(&r.alias_name)?;
        let existing = self.store.alias(&r.alias_name)?.ok_or_else(|| {
            OpError::NotFound(format!(
                "Alias {} is not found.",
                self.alias_arn(&r.alias_name)
            ))
        })?;
        let key = self.authorized_key(
            caller,
            &r.target_key_id,
            &simple_ask("UpdateAlias"),
            touched,
        )?;
        self.authz
            .authorize_alias_action(caller, &self.alias_arn(&r.alias_name), "UpdateAlias")?;
        require_not_pending(&key)?;
        self.store.delete_alias(&existing.name)?;
        self.store.create_alias(&AliasRecord {
            name: existing.name,
            key_id: key.id,
            created: existing.created,
        })?;
        to_value(Empty {})
    }

    pub(super) fn list_aliases(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_filter = match &r.key_id {
            Some(k) => {
                let key = self.authorized_key(caller, k, &simple_ask("ListAliases"), touched)?;
                Some(key.id)
            }
            None => {
                self.authz.authorize_account_action(caller, "ListAliases")?;
                None
            }
        };
        let items: Vec<AliasListEntry> = self
            .store
            .list_aliases(key_filter.as_deref())?
            .into_iter()
            .map(|a| AliasListEntry {
                alias_arn: self.alias_arn(&a.name),
                alias_name: a.name,
                target_key_id: a.key_id,
                creation_date: a.created,
                last_updated_date: a.created,
            })
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        paged("Aliases", items, next)
    }

    pub(super) fn delete_alias(
        &self,
        caller: &Caller,
        r: DeleteAliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        if r.alias_name.starts_with("alias/aws/") {
            return Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to perform: kms:DeleteAlias on resource: {} (AWS managed aliases cannot be deleted)",
                caller.effective().arn(),
                self.alias_arn(&r.alias_name)
            )));
        }
        let a = self.store.alias(&r.alias_name)?.ok_or_else(|| {
            OpError::NotFound(format!(
                "Alias {} is not found.",
                self.alias_arn(&r.alias_name)
            ))
        })?;
        self.authorized_key(caller, &a.key_id, &simple_ask("DeleteAlias"), touched)?;
        self.authz
            .authorize_alias_action(caller, &self.alias_arn(&r.alias_name), "DeleteAlias")?;
        self.store.delete_alias(&r.alias_name)?;
        to_value(Empty {})
    }
}
