//! Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant.

use serde_json::Value;

use super::MAX_GRANTS_PER_KEY;
use super::checks::*;
use super::responses::{CreateGrantResponse, Empty, GrantListEntry, to_value};
use super::{Kms, Touched};
use crate::authz::Ask;
use crate::authz::{Verdict, grantee_names};
use crate::blob::fill_random;
use crate::error::OpError;
use crate::keys::{GrantOperation, GrantRecord};
use crate::principal::Caller;
use crate::principal::{Principal, is_service_principal};
use crate::wire::*;

/// `kms:GrantIsForAWSResource` when an AWS service forwarded the call.
fn grant_is_for_aws_resource(caller: &Caller) -> Vec<(&'static str, String)> {
    if caller.via_service().is_some() {
        vec![("kms:GrantIsForAWSResource", "true".to_owned())]
    } else {
        Vec::new()
    }
}

impl Kms {
    fn principal_field(
        arn: Option<String>,
        service: Option<String>,
        what: &str,
        required: bool,
    ) -> Result<Option<String>, OpError> {
        let v = match (arn, service) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(format!(
                    "Specify {what}Principal or {what}ServicePrincipal, not both"
                )));
            }
            (Some(a), None) => {
                if Principal::parse(&a).is_none() {
                    return Err(OpError::Validation(format!("Invalid {what}Principal {a}")));
                }
                Some(Principal::parse(&a).map(|p| p.arn()).unwrap_or(a))
            }
            (None, Some(s)) => {
                if !is_service_principal(&s) {
                    return Err(OpError::Validation(format!(
                        "Invalid {what}ServicePrincipal {s}"
                    )));
                }
                Some(s)
            }
            (None, None) if required => {
                return Err(OpError::Validation(format!("{what}Principal is required")));
            }
            (None, None) => None,
        };
        Ok(v)
    }

    pub(super) fn create_grant(
        &self,
        caller: &Caller,
        r: CreateGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let grantee = Self::principal_field(
            r.grantee_principal,
            r.grantee_service_principal,
            "Grantee",
            true,
        )?
        .ok_or_else(|| OpError::Validation("GranteePrincipal is required".into()))?;
        let retiring = Self::principal_field(
            r.retiring_principal,
            r.retiring_service_principal,
            "Retiring",
            false,
        )?;
        if r.operations.is_empty() {
            return Err(OpError::Validation(
                "Operations must name at least one operation".into(),
            ));
        }
        let operations = r
            .operations
            .iter()
            .map(|op| {
                GrantOperation::from_name(op).ok_or_else(|| {
                    OpError::Validation(format!(
                        "Value '{op}' at 'operations' failed to satisfy constraint"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let constraints = r.constraints.unwrap_or_default();
        if constraints.subset.is_some() && constraints.equals.is_some() {
            return Err(OpError::Validation(
                "Specify EncryptionContextSubset or EncryptionContextEquals, not both".into(),
            ));
        }
        if !constraints.is_empty()
            && operations.iter().any(|&o| {
                !o.is_cryptographic()
                    && o != GrantOperation::CreateGrant
                    && o != GrantOperation::RetireGrant
            })
        {
            return Err(OpError::Validation(
                "Grant constraints are not supported for the non-cryptographic operations listed"
                    .into(),
            ));
        }
        if let Some(n) = &r.name
            && (n.is_empty()
                || n.len() > 256
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":/_-".contains(c)))
        {
            return Err(OpError::Validation("Grant name is not valid".into()));
        }
        let key = self.resolve(caller, &r.key_id, touched)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let mut extra = vec![("kms:GranteePrincipal", grantee.clone())];
        if let Some(rp) = &retiring {
            extra.push(("kms:RetiringPrincipal", rp.clone()));
        }
        if caller.via_service().is_some() {
            extra.push(("kms:GrantIsForAWSResource", "true".into()));
        }
        let ask = Ask {
            operation: "CreateGrant",
            context: None,
            grant_tokens: &tokens,
            extra,
            extra_multi: vec![(
                "kms:GrantOperations",
                operations.iter().map(|o| o.as_str().to_owned()).collect(),
            )],
            grants_apply: false,
        };
        let verdict = match self.authz.evaluate(caller, &key, &ask)? {
            // A grantee holding CreateGrant may create narrower grants only, and only
            // when no explicit Deny applies (evaluate() answers that first).
            Verdict::NotAllowed
                if self
                    .authz
                    .parent_grant_allows(caller, &key, &operations, &constraints)? =>
            {
                Verdict::Allowed
            }
            v => v,
        };
        verdict.into_result(caller.effective(), "CreateGrant", &key.arn)?;
        require_not_pending(&key)?;
        if self.store.grants_for_key(&key.id)?.len() >= MAX_GRANTS_PER_KEY {
            return Err(OpError::LimitExceeded(format!(
                "{} already has {MAX_GRANTS_PER_KEY} grants",
                key.arn
            )));
        }
        dry_run(r.dry_run)?;
        let mut token_bytes = [0u8; 48];
        fill_random(&mut token_bytes);
        let grant = GrantRecord {
            id: random_hex(32),
            key_id: key.id.clone(),
            name: r.name.unwrap_or_default(),
            grantee,
            retiring,
            operations,
            constraints,
            issuing_account: format!("arn:aws:iam::{}:root", self.account),
            created: self.clock.now(),
            token: {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token_bytes)
            },
        };
        self.store.insert_grant(&grant)?;
        to_value(CreateGrantResponse {
            grant_token: &grant.token,
            grant_id: &grant.id,
        })
    }

    /// One entry of a grant listing.
    fn grant_entry<'a>(g: &'a GrantRecord, key_arn: &'a str) -> GrantListEntry<'a> {
        GrantListEntry {
            key_id: key_arn,
            grant_id: &g.id,
            name: &g.name,
            creation_date: g.created,
            grantee_principal: &g.grantee,
            issuing_account: &g.issuing_account,
            operations: &g.operations,
            retiring_principal: g.retiring.as_deref(),
            constraints: &g.constraints,
        }
    }

    pub(super) fn list_grants(
        &self,
        caller: &Caller,
        r: ListGrantsRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.authorized_key(
            caller,
            &r.key_id,
            &Ask {
                operation: "ListGrants",
                extra: grant_is_for_aws_resource(caller),
                ..Ask::default()
            },
            touched,
        )?;
        let grants = self.store.grants_for_key(&key.id)?;
        let items: Vec<GrantListEntry<'_>> = grants
            .iter()
            .filter(|g| r.grant_id.as_ref().is_none_or(|id| *id == g.id))
            .filter(|g| r.grantee_principal.as_ref().is_none_or(|p| *p == g.grantee))
            .map(|g| Self::grant_entry(g, &key.arn))
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        paged("Grants", items, next)
    }

    pub(super) fn list_retirable(
        &self,
        caller: &Caller,
        r: ListRetirableGrantsRequest,
        _touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let is_self = grantee_names(caller).contains(&r.retiring_principal);
        if !is_self {
            self.authz
                .authorize_account_action(caller, "ListRetirableGrants")?;
        }
        let grants = self.store.retirable_grants(&r.retiring_principal)?;
        let arns: Vec<String> = grants.iter().map(|g| self.key_arn(&g.key_id)).collect();
        let items: Vec<GrantListEntry<'_>> = grants
            .iter()
            .zip(&arns)
            .map(|(g, arn)| Self::grant_entry(g, arn))
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        paged("Grants", items, next)
    }

    pub(super) fn retire_grant(
        &self,
        caller: &Caller,
        r: RetireGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let grant = match (&r.grant_token, &r.key_id, &r.grant_id) {
            (Some(t), _, _) => match self.store.grant_by_token(t)? {
                Some(g) => g,
                None if self.store.token_issued(t)? => {
                    return Err(OpError::NotFound(
                        "The grant has already been retired or revoked.".into(),
                    ));
                }
                None => {
                    return Err(OpError::InvalidGrantToken(
                        "The grant token is not valid.".into(),
                    ));
                }
            },
            (None, Some(k), Some(id)) => {
                let key = self.resolve(caller, k, touched)?;
                let g = self.store.grant(id)?.filter(|g| g.key_id == key.id);
                g.ok_or_else(|| OpError::NotFound(format!("Grant ID {id} not found")))?
            }
            (None, None, Some(_)) | (None, Some(_), None) => {
                return Err(OpError::Validation(
                    "RetireGrant needs GrantToken, or KeyId and GrantId".into(),
                ));
            }
            (None, None, None) => {
                return Err(OpError::Validation(
                    "RetireGrant needs GrantToken, or KeyId and GrantId".into(),
                ));
            }
        };
        touched.keys.push(self.key_arn(&grant.key_id));
        let names = grantee_names(caller);
        let account_root = format!("arn:aws:iam::{}:root", self.account);
        let allowed = grant.retiring.as_ref().is_some_and(|rp| names.contains(rp))
            || (names.contains(&grant.grantee)
                && grant.operations.contains(&GrantOperation::RetireGrant))
            || names.contains(&account_root);
        if !allowed {
            return Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to retire grant {}",
                caller.effective().arn(),
                grant.id
            )));
        }
        dry_run(r.dry_run)?;
        self.store.delete_grant(&grant.id)?;
        to_value(Empty {})
    }

    pub(super) fn revoke_grant(
        &self,
        caller: &Caller,
        r: RevokeGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.authorized_key(
            caller,
            &r.key_id,
            &Ask {
                operation: "RevokeGrant",
                extra: grant_is_for_aws_resource(caller),
                ..Ask::default()
            },
            touched,
        )?;
        if r.grant_id.len() != 64 || !r.grant_id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(OpError::InvalidGrantId(format!(
                "Invalid grant ID {}",
                r.grant_id
            )));
        }
        let g = self
            .store
            .grant(&r.grant_id)?
            .filter(|g| g.key_id == key.id);
        if g.is_none() {
            return Err(OpError::NotFound(format!(
                "Grant ID {} not found",
                r.grant_id
            )));
        }
        dry_run(r.dry_run)?;
        self.store.delete_grant(&r.grant_id)?;
        to_value(Empty {})
    }
}
