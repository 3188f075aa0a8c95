//! Authorization as AWS does it: explicit Deny anywhere wins; otherwise Allow from the
//! key policy, from the principal's IAM policies when the key policy delegates to the
//! account, or from a live grant.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::{GrantConstraints, GrantOperation, KeyRecord};
use crate::policy::{ConditionContext, Decision, PolicyDocument, PolicyError, Request};
use crate::principal::{Caller, Principal};
use crate::store::KeyStore;

/// Parsed policies kept at most (the cache is cleared when it is full).
const POLICY_CACHE_SIZE: usize = 4096;

/// What is being asked of a key.
#[derive(Debug, Clone, Default)]
pub struct Ask<'a> {
    /// Grant operation name (`Decrypt`, `ReEncryptFrom`, ...); also gives the action.
    pub operation: &'a str,
    /// Encryption context of a cryptographic operation.
    pub context: Option<&'a EncryptionContext>,
    /// Grant tokens presented.
    pub grant_tokens: &'a [String],
    /// Extra single-valued condition keys.
    pub extra: Vec<(&'static str, String)>,
    /// Extra multi-valued condition keys.
    pub extra_multi: Vec<(&'static str, Vec<String>)>,
    /// Whether grants may authorize this operation.
    pub grants_apply: bool,
}

/// Decides who may do what: owns the key policies' and IAM policies' evaluation, the
/// grants' part in it and the cache of parsed policy documents. The operation
/// dispatcher holds one and asks it before acting on a key.
pub struct Authorizer {
    /// Durable state: key policies come with the key, IAM policies and grants from here.
    store: Arc<dyn KeyStore>,
    /// Account id (its root principal is always allowed by IAM).
    account: String,
    /// Region (for `kms:ViaService`).
    region: String,
    /// Parsed policy documents by their text (parsing is costlier than a lookup).
    policy_cache: Mutex<HashMap<String, Arc<PolicyDocument>>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("account", &self.account)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Authorizer {
    /// An authorizer over `store` for `account` in `region`.
    pub fn new(store: Arc<dyn KeyStore>, account: &str, region: &str) -> Self {
        Self {
            store,
            account: account.to_owned(),
            region: region.to_owned(),
            policy_cache: Mutex::default(),
        }
    }

    /// Parses a stored policy document, memoized by its text.
    pub(crate) fn parsed_policy(&self, text: &str) -> Result<Arc<PolicyDocument>, PolicyError> {
        let mut cache = self
            .policy_cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = cache.get(text) {
            return Ok(p.clone());
        }
        let parsed = Arc::new(PolicyDocument::parse(text)?);
        if cache.len() >= POLICY_CACHE_SIZE {
            cache.clear();
        }
        cache.insert(text.to_owned(), parsed.clone());
        Ok(parsed)
    }

    /// Condition keys common to every request of `caller`.
    pub(crate) fn base_conditions(&self, caller: &Caller, ask: &Ask<'_>) -> ConditionContext {
        let mut c = ConditionContext::new();
        let eff = caller.effective();
        c.set("aws:PrincipalArn", eff.arn());
        if let Some(acct) = eff.account() {
            c.set("kms:CallerAccount", acct);
        }
        if let Some(svc) = caller.via_service() {
            let prefix = svc.strip_suffix(".amazonaws.com").unwrap_or(svc);
            c.set(
                "kms:ViaService",
                format!("{prefix}.{}.amazonaws.com", self.region),
            );
        }
        if let Some(ctx) = ask.context {
            for (k, v) in ctx.iter() {
                c.set(&format!("kms:EncryptionContext:{k}"), v);
            }
            c.set_multi(
                "kms:EncryptionContextKeys",
                ctx.iter().map(|(k, _)| k.to_owned()).collect(),
            );
        }
        for (k, v) in &ask.extra {
            c.set(k, v.clone());
        }
        for (k, v) in &ask.extra_multi {
            c.set_multi(k, v.clone());
        }
        c
    }

    /// Checks that every grant token was issued by this daemon.
    pub(crate) fn check_grant_tokens(&self, tokens: &[String]) -> Result<(), OpError> {
        if tokens.len() > 10 {
            return Err(OpError::Validation(
                "GrantTokens may hold at most 10 tokens".into(),
            ));
        }
        for t in tokens {
            if t.is_empty() || t.len() > 8192 || !self.store.token_issued(t)? {
                return Err(OpError::InvalidGrantToken(
                    "The grant token is not valid.".into(),
                ));
            }
        }
        Ok(())
    }

    /// IAM identity-policy decision for `principal`.
    pub(crate) fn identity_decision(
        &self,
        principal: &Principal,
        req: &Request<'_>,
    ) -> Result<Decision, OpError> {
        match principal {
            Principal::Root { account } if *account == self.account => Ok(Decision::Allow),
            Principal::Root { .. } | Principal::Service(_) => Ok(Decision::NotApplicable),
            Principal::Iam { .. } => {
                let mut out = Decision::NotApplicable;
                for doc in self.store.principal_policies(&principal.arn())? {
                    let Ok(p) = self.parsed_policy(&doc) else {
                        continue;
                    };
                    match p.evaluate_identity_policy(req) {
                        Decision::Deny => return Ok(Decision::Deny),
                        Decision::Allow => out = Decision::Allow,
                        Decision::NotApplicable => {}
                    }
                }
                Ok(out)
            }
        }
    }

    /// What the policies say about `ask` on `key` for `caller`, explicit Deny first:
    /// a Deny in the key policy (for the effective principal or, on a forwarded call,
    /// the service that signed it) or in the principal's IAM policies is final, whatever
    /// a policy or grant would allow.
    pub(crate) fn evaluate(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        ask: &Ask<'_>,
    ) -> Result<Verdict, OpError> {
        self.check_grant_tokens(ask.grant_tokens)?;
        let action = format!("kms:{}", ask.operation);
        let conditions = self.base_conditions(caller, ask);
        let principal = caller.effective();
        let req = Request {
            principal,
            action: &action,
            resource: &key.arn,
            conditions: &conditions,
        };
        let policy = self.parsed_policy(&key.policy).map_err(|e| {
            OpError::Internal(format!(
                "stored key policy of {} does not parse: {e}",
                key.id
            ))
        })?;
        let kp = policy.evaluate_key_policy(&req);
        let signer_denied = caller.forwarded.is_some()
            && policy
                .evaluate_key_policy(&Request {
                    principal: &caller.signer,
                    ..req.clone()
                })
                .deny;
        let iam = self.identity_decision(principal, &req)?;
        if kp.deny || signer_denied || iam == Decision::Deny {
            return Ok(Verdict::ExplicitDeny);
        }
        let iam_allows = iam == Decision::Allow && kp.delegates_to_iam;
        let root_allows = matches!(principal, Principal::Root { .. }) && kp.allow;
        if kp.allow || iam_allows || root_allows {
            return Ok(Verdict::Allowed);
        }
        if ask.grants_apply && self.grant_allows(caller, key, ask)? {
            return Ok(Verdict::Allowed);
        }
        Ok(Verdict::NotAllowed)
    }

    /// Authorizes `ask` on `key` for `caller`.
    pub(crate) fn authorize(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        ask: &Ask<'_>,
    ) -> Result<(), OpError> {
        let verdict = self.evaluate(caller, key, ask)?;
        verdict.into_result(caller.effective(), ask.operation, &key.arn)
    }

    /// Whether a live grant authorizes the request.
    pub(crate) fn grant_allows(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        ask: &Ask<'_>,
    ) -> Result<bool, OpError> {
        let names = grantee_names(caller);
        let grants = self.store.grants_for_key(&key.id)?;
        // An operation no grant may name (ListGrants, ...) is never granted.
        let Some(operation) = GrantOperation::from_name(ask.operation) else {
            return Ok(false);
        };
        Ok(grants.iter().any(|g| {
            names
                .iter()
                .any(|n| g.authorizes(n, operation, ask.context))
        }))
    }

    /// Authorizes an operation that targets no key (CreateKey, ListKeys, ...): IAM only.
    pub(crate) fn authorize_account_action(
        &self,
        caller: &Caller,
        operation: &str,
    ) -> Result<(), OpError> {
        let action = format!("kms:{operation}");
        let conditions = self.base_conditions(caller, &Ask::default());
        let principal = caller.effective();
        let req = Request {
            principal,
            action: &action,
            resource: "*",
            conditions: &conditions,
        };
        match self.identity_decision(principal, &req)? {
            Decision::Allow => Ok(()),
            _ => Err(denied(
                principal,
                &action,
                "*",
                "because no identity-based policy allows the action",
            )),
        }
    }
    /// Authorizes `operation` on the alias `alias_arn`: aliases are resources of their
    /// own, so the caller needs the action on them too (root and IAM-delegated
    /// principals). Alias ARNs are covered by `Resource: *`.
    pub(crate) fn authorize_alias_action(
        &self,
        caller: &Caller,
        alias_arn: &str,
        operation: &str,
    ) -> Result<(), OpError> {
        let action = format!("kms:{operation}");
        let conditions = self.base_conditions(caller, &Ask::default());
        let req = Request {
            principal: caller.effective(),
            action: &action,
            resource: alias_arn,
            conditions: &conditions,
        };
        match self.identity_decision(caller.effective(), &req)? {
            Decision::Allow => Ok(()),
            _ => Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to perform: {action} on resource: {alias_arn}",
                caller.effective().arn()
            ))),
        }
    }

    /// Whether a live grant to the caller holding CreateGrant covers a new grant of
    /// `operations` under `constraints` (same or narrower).
    pub(crate) fn parent_grant_allows(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        operations: &[GrantOperation],
        constraints: &GrantConstraints,
    ) -> Result<bool, OpError> {
        let names = grantee_names(caller);
        Ok(self.store.grants_for_key(&key.id)?.iter().any(|g| {
            names.contains(&g.grantee)
                && g.operations.contains(&GrantOperation::CreateGrant)
                && operations.iter().all(|o| g.operations.contains(o))
                && g.constraints.is_narrowed_by(constraints)
        }))
    }
}

/// The outcome of policy evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// An explicit Deny applies: nothing may allow the request.
    ExplicitDeny,
    /// A policy or a grant allows it, and nothing denies it.
    Allowed,
    /// Nothing allows it (a parent grant still may, for CreateGrant).
    NotAllowed,
}

impl Verdict {
    /// `Ok` only for [`Verdict::Allowed`]; else AccessDeniedException saying why.
    pub(crate) fn into_result(
        self,
        p: &Principal,
        operation: &str,
        resource: &str,
    ) -> Result<(), OpError> {
        let action = format!("kms:{operation}");
        match self {
            Self::Allowed => Ok(()),
            Self::ExplicitDeny => Err(denied(p, &action, resource, "with an explicit deny")),
            Self::NotAllowed => Err(denied(
                p,
                &action,
                resource,
                "because no resource-based policy allows the action",
            )),
        }
    }
}

/// The names under which grants may list the caller as grantee: the signer, and the
/// user whose verified forward-access token it presented.
pub(crate) fn grantee_names(caller: &Caller) -> Vec<String> {
    let mut v = vec![caller.signer.arn()];
    if let Some(f) = &caller.forwarded {
        v.push(f.user.arn());
    }
    v
}

fn denied(p: &Principal, action: &str, resource: &str, why: &str) -> OpError {
    OpError::AccessDenied(format!(
        "User: {} is not authorized to perform: {action} on resource: {resource} {why}",
        p.arn()
    ))
}
