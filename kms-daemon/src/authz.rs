//! Authorization as AWS does it: explicit Deny anywhere wins; otherwise Allow from the
//! key policy, from the principal's IAM policies when the key policy delegates to the
//! account, or from a live grant.

use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::KeyRecord;
use crate::ops::Kms;
use crate::policy::{ConditionContext, Decision, Request};
use crate::principal::{Caller, Principal};

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

impl Kms {
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
        Ok(self.store.grants_for_key(&key.id)?.iter().any(|g| {
            names
                .iter()
                .any(|n| g.authorizes(n, ask.operation, ask.context))
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{Value, json};

    use crate::blob::SymmetricKey;
    use crate::clock::OffsetClock;
    use crate::error::OpError;
    use crate::keys::RootKey;
    use crate::ops::{Kms, Touched};
    use crate::principal::{Caller, Principal};
    use crate::store::SqliteStore;
    use crate::wire::Operation;

    const ACCT: &str = "111122223333";

    fn kms(dir: &std::path::Path) -> Kms {
        let store = SqliteStore::open(&dir.join("kms.db")).expect("opens");
        let alice = format!("arn:aws:iam::{ACCT}:user/Alice");
        crate::store::KeyStore::put_principal_policy(
            &store,
            &alice,
            "p",
            crate::state::ALICE_IAM_POLICY,
        )
        .expect("policy");
        Kms::new(
            Arc::new(store),
            RootKey::from_key(SymmetricKey::generate()),
            Arc::new(OffsetClock::new(0)),
            ACCT,
            "us-east-1",
        )
    }

    fn caller(p: &str, forwarded_for: Option<&str>) -> Caller {
        Caller {
            signer: Principal::parse(p).expect("principal"),
            access_key_id: "AKIATEST".into(),
            forwarded: forwarded_for.map(|u| crate::principal::Forwarded {
                user: Principal::parse(u).expect("user"),
                access_key_id: "AKIAUSER".into(),
                expires_at: i64::MAX,
            }),
        }
    }

    fn call(k: &Kms, c: &Caller, op: Operation, body: Value) -> Result<Value, OpError> {
        k.execute(c, op, body.to_string().as_bytes(), &mut Touched::default())
    }

    /// Creates a key as `admin` with `body` and returns its id.
    fn create_key(k: &Kms, admin: &Caller, body: Value) -> String {
        call(k, admin, Operation::CreateKey, body).expect("CreateKey")["KeyMetadata"]["KeyId"]
            .as_str()
            .expect("id")
            .to_owned()
    }

    fn code(r: Result<Value, OpError>) -> &'static str {
        match r {
            Ok(_) => "Ok",
            Err(e) => e.code(),
        }
    }

    #[test]
    fn key_policy_iam_grants_and_deny_combine_as_aws_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kms(dir.path());
        let admin = caller(&format!("arn:aws:iam::{ACCT}:root"), None);
        let alice = caller(&format!("arn:aws:iam::{ACCT}:user/Alice"), None);
        let ebs = caller("ebs.amazonaws.com", None);
        let ws_for_alice = caller(
            "workspaces.amazonaws.com",
            Some(&format!("arn:aws:iam::{ACCT}:user/Alice")),
        );
        let policy = crate::state::WORKSPACES_KEY_POLICY;
        let key = create_key(&k, &admin, json!({"Policy": policy}));
        let ctx = json!({"aws:ebs:id": "vol-1"});
        let gdk = json!({"KeyId": key, "NumberOfBytes": 64, "EncryptionContext": ctx});
        // Root statement delegates to IAM; Alice's IAM policy allows Describe but not use.
        assert_eq!(
            code(call(
                &k,
                &alice,
                Operation::DescribeKey,
                json!({"KeyId": key})
            )),
            "Ok"
        );
        assert_eq!(
            code(call(
                &k,
                &alice,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "AccessDeniedException"
        );
        // Through WorkSpaces the key policy's ViaService statement allows Alice.
        assert_eq!(
            code(call(
                &k,
                &ws_for_alice,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "Ok"
        );
        // EBS: nothing, then a grant with a matching constraint.
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "AccessDeniedException"
        );
        let grant = call(&k, &ws_for_alice, Operation::CreateGrant, json!({
            "KeyId": key, "GranteePrincipal": "ebs.amazonaws.com", "Operations": ["GenerateDataKeyWithoutPlaintext"],
            "Constraints": {"EncryptionContextEquals": ctx}
        }))
        .expect("CreateGrant through WorkSpaces (GrantIsForAWSResource)");
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "Ok"
        );
        let other = json!({"KeyId": key, "NumberOfBytes": 64, "EncryptionContext": {"aws:ebs:id": "vol-2"}});
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                other
            )),
            "AccessDeniedException"
        );
        // An explicit Deny in the key policy beats the grant.
        let deny = json!({"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Principal": {"AWS": format!("arn:aws:iam::{ACCT}:root")}, "Action": "kms:*", "Resource": "*"},
            {"Effect": "Deny", "Principal": {"Service": "ebs.amazonaws.com"}, "Action": "kms:GenerateDataKey*", "Resource": "*"}
        ]});
        call(
            &k,
            &admin,
            Operation::PutKeyPolicy,
            json!({"KeyId": key, "Policy": deny.to_string()}),
        )
        .expect("PutKeyPolicy");
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "AccessDeniedException"
        );
        // Revoked grants stop at once.
        call(
            &k,
            &admin,
            Operation::PutKeyPolicy,
            json!({"KeyId": key, "Policy": k.default_key_policy()}),
        )
        .expect("PutKeyPolicy");
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk.clone()
            )),
            "Ok"
        );
        call(
            &k,
            &admin,
            Operation::RevokeGrant,
            json!({"KeyId": key, "GrantId": grant["GrantId"]}),
        )
        .expect("RevokeGrant");
        assert_eq!(
            code(call(
                &k,
                &ebs,
                Operation::GenerateDataKeyWithoutPlaintext,
                gdk
            )),
            "AccessDeniedException"
        );
    }

    #[test]
    fn explicit_deny_beats_parent_grants_and_binds_the_forwarding_service() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = kms(dir.path());
        let root = format!("arn:aws:iam::{ACCT}:root");
        let alice_arn = format!("arn:aws:iam::{ACCT}:user/Alice");
        let admin = caller(&root, None);
        let alice = caller(&alice_arn, None);
        let key = create_key(&k, &admin, json!({}));
        call(&k, &admin, Operation::CreateGrant, json!({
            "KeyId": key, "GranteePrincipal": alice_arn, "Operations": ["Decrypt", "CreateGrant"]
        }))
        .expect("parent grant");
        let sub = json!({"KeyId": key, "GranteePrincipal": "ebs.amazonaws.com", "Operations": ["Decrypt"]});
        assert_eq!(
            code(call(&k, &alice, Operation::CreateGrant, sub.clone())),
            "Ok"
        );
        let policy = |deny_principal: Value, action: &str| {
            json!({"Version": "2012-10-17", "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": root}, "Action": "kms:*", "Resource": "*"},
                {"Effect": "Deny", "Principal": deny_principal, "Action": action, "Resource": "*"}
            ]})
            .to_string()
        };
        call(
            &k,
            &admin,
            Operation::PutKeyPolicy,
            json!({
                "KeyId": key, "Policy": policy(json!({"AWS": alice_arn}), "kms:CreateGrant")
            }),
        )
        .expect("PutKeyPolicy");
        assert_eq!(
            code(call(&k, &alice, Operation::CreateGrant, sub)),
            "AccessDeniedException",
            "a parent grant never overrides an explicit Deny"
        );
        // A Deny of the forwarding service applies to what it does for a user too.
        call(&k, &admin, Operation::PutKeyPolicy, json!({
            "KeyId": key, "Policy": policy(json!({"Service": "workspaces.amazonaws.com"}), "kms:DescribeKey")
        }))
        .expect("PutKeyPolicy");
        assert_eq!(
            code(call(
                &k,
                &alice,
                Operation::DescribeKey,
                json!({"KeyId": key})
            )),
            "Ok"
        );
        let ws_for_alice = caller("workspaces.amazonaws.com", Some(&alice_arn));
        assert_eq!(
            code(call(
                &k,
                &ws_for_alice,
                Operation::DescribeKey,
                json!({"KeyId": key})
            )),
            "AccessDeniedException"
        );
    }

    #[test]
    fn sweep_purges_keys_whose_deletion_window_passed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SqliteStore::open(&dir.path().join("kms.db")).expect("opens"));
        let clock = Arc::new(OffsetClock::new(0));
        let k = Kms::new(
            store.clone(),
            RootKey::from_key(SymmetricKey::generate()),
            clock.clone(),
            ACCT,
            "us-east-1",
        );
        let admin = caller(&format!("arn:aws:iam::{ACCT}:root"), None);
        let key = create_key(&k, &admin, json!({}));
        call(
            &k,
            &admin,
            Operation::ScheduleKeyDeletion,
            json!({"KeyId": key, "PendingWindowInDays": 7}),
        )
        .expect("schedule");
        assert_eq!(k.sweep().expect("sweeps"), 0);
        clock.advance(7 * 86_400 + 1);
        assert_eq!(k.sweep().expect("sweeps"), 1);
        assert!(
            crate::store::KeyStore::materials(store.as_ref(), &key)
                .expect("reads")
                .is_empty()
        );
    }
}
