//! IAM policy documents (key policies and identity policies): parsing and evaluation.
//!
//! Supports what KMS key policies use: `Statement` as object or list, `Effect`,
//! `Principal`/`NotPrincipal` (incl. `*`, `AWS`, `Service`), `Action`/`NotAction` and
//! `Resource`/`NotResource` with `*`/`?` wildcards, and `Condition` with the string,
//! ARN, `Bool` and `Null` operators, `ForAnyValue:`/`ForAllValues:` prefixes and the
//! `IfExists` suffix.

use std::collections::HashMap;

use serde_json::Value;

use crate::principal::Principal;

/// Why a policy document was rejected (MalformedPolicyDocumentException).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// Not JSON.
    #[error("policy is not valid JSON")]
    Json,
    /// Structure is wrong; the message names the element.
    #[error("malformed policy: {0}")]
    Malformed(String),
}

fn malformed(s: impl Into<String>) -> PolicyError {
    PolicyError::Malformed(s.into())
}

/// Allow or Deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Grants the matched actions.
    Allow,
    /// Refuses them, overriding any Allow.
    Deny,
}

/// A `Principal` element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrincipalSpec {
    /// `"*"` or `{"AWS":"*"}`: every principal, AWS services included.
    Any,
    /// Named principals.
    Named {
        /// `AWS` entries (ARNs or account ids).
        aws: Vec<String>,
        /// `Service` entries.
        service: Vec<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Bool,
    Null,
}

impl Op {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "StringEquals" | "ArnEquals" => Self::StringEquals,
            "StringNotEquals" | "ArnNotEquals" => Self::StringNotEquals,
            "StringEqualsIgnoreCase" => Self::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Self::StringNotEqualsIgnoreCase,
            "StringLike" | "ArnLike" => Self::StringLike,
            "StringNotLike" | "ArnNotLike" => Self::StringNotLike,
            "Bool" => Self::Bool,
            "Null" => Self::Null,
            _ => return None,
        })
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Self::StringNotEquals | Self::StringNotEqualsIgnoreCase | Self::StringNotLike
        )
    }

    /// Positive match of one request value against one policy value.
    fn matches_one(self, request: &str, policy: &str) -> bool {
        match self {
            Self::StringEquals | Self::StringNotEquals => request == policy,
            Self::StringEqualsIgnoreCase | Self::StringNotEqualsIgnoreCase => {
                request.eq_ignore_ascii_case(policy)
            }
            Self::StringLike | Self::StringNotLike => glob(policy, request, false),
            Self::Bool => request.eq_ignore_ascii_case(policy),
            Self::Null => false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetOp {
    Single,
    ForAnyValue,
    ForAllValues,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    op: Op,
    set: SetOp,
    if_exists: bool,
    key: String,
    values: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Statement {
    effect: Effect,
    principal: Option<PrincipalSpec>,
    not_principal: Option<PrincipalSpec>,
    action: Vec<String>,
    not_action: bool,
    resource: Option<(Vec<String>, bool)>,
    conditions: Vec<Condition>,
}

/// A parsed policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    statements: Vec<Statement>,
}

/// Condition-key values of one request; keys are stored lower-case.
#[derive(Debug, Clone, Default)]
pub struct ConditionContext(HashMap<String, Vec<String>>);

impl ConditionContext {
    /// Empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a single-valued key.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.0.insert(key.to_ascii_lowercase(), vec![value.into()]);
    }

    /// Sets a multi-valued key.
    pub fn set_multi(&mut self, key: &str, values: Vec<String>) {
        self.0.insert(key.to_ascii_lowercase(), values);
    }

    fn get(&self, key: &str) -> Option<&Vec<String>> {
        self.0.get(&key.to_ascii_lowercase())
    }
}

/// One authorization question.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The principal whose permissions are evaluated.
    pub principal: &'a Principal,
    /// The action, e.g. `kms:Decrypt`.
    pub action: &'a str,
    /// The resource ARN.
    pub resource: &'a str,
    /// Condition keys.
    pub conditions: &'a ConditionContext,
}

/// What a key policy says about a request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyPolicyOutcome {
    /// An applicable Deny statement.
    pub deny: bool,
    /// An applicable Allow statement naming the principal.
    pub allow: bool,
    /// An applicable Allow statement for the principal's account root: IAM policies of
    /// the principal may grant the action.
    pub delegates_to_iam: bool,
}

/// What an identity policy says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Explicit deny.
    Deny,
    /// Allowed.
    Allow,
    /// Says nothing.
    NotApplicable,
}

fn strings(v: &Value, what: &str) -> Result<Vec<String>, PolicyError> {
    match v {
        Value::String(s) => Ok(vec![s.clone()]),
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| malformed(format!("{what} entries must be strings")))
            })
            .collect(),
        _ => Err(malformed(format!(
            "{what} must be a string or a non-empty list of strings"
        ))),
    }
}

fn condition_values(v: &Value) -> Result<Vec<String>, PolicyError> {
    let one = |x: &Value| match x {
        Value::String(s) => Ok(s.clone()),
        Value::Bool(b) => Ok(b.to_string()),
        Value::Number(n) => Ok(n.to_string()),
        _ => Err(malformed(
            "condition values must be strings, booleans or numbers",
        )),
    };
    match v {
        Value::Array(a) => a.iter().map(one).collect(),
        x => Ok(vec![one(x)?]),
    }
}

fn principal_spec(v: &Value) -> Result<PrincipalSpec, PolicyError> {
    match v {
        Value::String(s) if s == "*" => Ok(PrincipalSpec::Any),
        Value::Object(m) => {
            let mut aws = Vec::new();
            let mut service = Vec::new();
            for (k, val) in m {
                match k.as_str() {
                    "AWS" => aws = strings(val, "Principal.AWS")?,
                    "Service" => service = strings(val, "Principal.Service")?,
                    "Federated" | "CanonicalUser" => {}
                    other => return Err(malformed(format!("unknown principal type {other}"))),
                }
            }
            if aws.iter().any(|a| a == "*") {
                return Ok(PrincipalSpec::Any);
            }
            for a in &aws {
                if Principal::parse(a).is_none() {
                    return Err(malformed(format!("invalid principal {a}")));
                }
            }
            Ok(PrincipalSpec::Named { aws, service })
        }
        _ => Err(malformed("Principal must be \"*\" or an object")),
    }
}

fn parse_statement(v: &Value) -> Result<Statement, PolicyError> {
    let m = v
        .as_object()
        .ok_or_else(|| malformed("statement must be an object"))?;
    let mut effect = None;
    let mut st = Statement {
        effect: Effect::Allow,
        principal: None,
        not_principal: None,
        action: Vec::new(),
        not_action: false,
        resource: None,
        conditions: Vec::new(),
    };
    let mut has_action = false;
    for (k, val) in m {
        match k.as_str() {
            "Sid" => {
                if !val.is_string() {
                    return Err(malformed("Sid must be a string"));
                }
            }
            "Effect" => {
                effect = Some(match val.as_str() {
                    Some("Allow") => Effect::Allow,
                    Some("Deny") => Effect::Deny,
                    _ => return Err(malformed("Effect must be Allow or Deny")),
                })
            }
            "Principal" => st.principal = Some(principal_spec(val)?),
            "NotPrincipal" => st.not_principal = Some(principal_spec(val)?),
            "Action" | "NotAction" => {
                if has_action {
                    return Err(malformed("only one of Action and NotAction"));
                }
                has_action = true;
                st.action = strings(val, k)?;
                st.not_action = k == "NotAction";
            }
            "Resource" | "NotResource" => {
                if st.resource.is_some() {
                    return Err(malformed("only one of Resource and NotResource"));
                }
                st.resource = Some((strings(val, k)?, k == "NotResource"));
            }
            "Condition" => {
                let ops = val
                    .as_object()
                    .ok_or_else(|| malformed("Condition must be an object"))?;
                for (op_name, keys) in ops {
                    let (set, rest) = if let Some(r) = op_name.strip_prefix("ForAnyValue:") {
                        (SetOp::ForAnyValue, r)
                    } else if let Some(r) = op_name.strip_prefix("ForAllValues:") {
                        (SetOp::ForAllValues, r)
                    } else {
                        (SetOp::Single, op_name.as_str())
                    };
                    let (base, if_exists) = match rest.strip_suffix("IfExists") {
                        Some(b) => (b, true),
                        None => (rest, false),
                    };
                    let op = Op::parse(base).ok_or_else(|| {
                        malformed(format!("unsupported condition operator {op_name}"))
                    })?;
                    let keys = keys
                        .as_object()
                        .ok_or_else(|| malformed("condition operator must map keys to values"))?;
                    for (key, values) in keys {
                        st.conditions.push(Condition {
                            op,
                            set,
                            if_exists,
                            key: key.to_ascii_lowercase(),
                            values: condition_values(values)?,
                        });
                    }
                }
            }
            other => return Err(malformed(format!("unknown statement element {other}"))),
        }
    }
    st.effect = effect.ok_or_else(|| malformed("statement without Effect"))?;
    if !has_action {
        return Err(malformed("statement without Action"));
    }
    Ok(st)
}

impl PolicyDocument {
    /// Parses a policy document.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let v: Value = serde_json::from_str(text).map_err(|_| PolicyError::Json)?;
        let m = v
            .as_object()
            .ok_or_else(|| malformed("policy must be a JSON object"))?;
        let mut statements = None;
        for (k, val) in m {
            match k.as_str() {
                "Version" => {
                    if !matches!(val.as_str(), Some("2012-10-17" | "2008-10-17")) {
                        return Err(malformed("unsupported Version"));
                    }
                }
                "Id" => {}
                "Statement" => {
                    statements = Some(match val {
                        Value::Array(a) => a
                            .iter()
                            .map(parse_statement)
                            .collect::<Result<Vec<_>, _>>()?,
                        o @ Value::Object(_) => vec![parse_statement(o)?],
                        _ => return Err(malformed("Statement must be an object or a list")),
                    })
                }
                other => return Err(malformed(format!("unknown policy element {other}"))),
            }
        }
        let statements = statements.ok_or_else(|| malformed("policy without Statement"))?;
        if statements.is_empty() {
            return Err(malformed("policy without statements"));
        }
        Ok(Self { statements })
    }

    /// Requires every statement to name a principal (key policies must).
    pub fn require_principals(&self) -> Result<(), PolicyError> {
        if self
            .statements
            .iter()
            .all(|s| s.principal.is_some() || s.not_principal.is_some())
        {
            Ok(())
        } else {
            Err(malformed("every key policy statement needs a Principal"))
        }
    }

    /// Evaluates as a key policy.
    pub fn evaluate_key_policy(&self, req: &Request<'_>) -> KeyPolicyOutcome {
        let mut out = KeyPolicyOutcome::default();
        for st in &self.statements {
            if !st.applies(req) {
                continue;
            }
            let (direct, account) = st.principal_match(req.principal);
            match st.effect {
                Effect::Deny if direct || account => out.deny = true,
                Effect::Allow if direct => out.allow = true,
                Effect::Allow if account => out.delegates_to_iam = true,
                _ => {}
            }
        }
        out
    }

    /// Evaluates as an identity (IAM) policy of the request's principal.
    pub fn evaluate_identity_policy(&self, req: &Request<'_>) -> Decision {
        let mut allow = false;
        for st in &self.statements {
            if !st.applies(req) {
                continue;
            }
            match st.effect {
                Effect::Deny => return Decision::Deny,
                Effect::Allow => allow = true,
            }
        }
        if allow {
            Decision::Allow
        } else {
            Decision::NotApplicable
        }
    }
}

impl Statement {
    fn applies(&self, req: &Request<'_>) -> bool {
        let action_hit = self.action.iter().any(|a| glob(a, req.action, true));
        if action_hit == self.not_action {
            return false;
        }
        if let Some((res, not)) = &self.resource {
            let hit = res.iter().any(|r| glob(r, req.resource, false));
            if hit == *not {
                return false;
            }
        }
        self.conditions.iter().all(|c| c.holds(req.conditions))
    }

    /// (matches the principal directly, matches it through its account root)
    fn principal_match(&self, p: &Principal) -> (bool, bool) {
        if let Some(np) = &self.not_principal {
            let (d, a) = spec_match(np, p);
            return (!(d || a), false);
        }
        match &self.principal {
            Some(spec) => spec_match(spec, p),
            None => (false, false),
        }
    }
}

fn spec_match(spec: &PrincipalSpec, p: &Principal) -> (bool, bool) {
    match spec {
        PrincipalSpec::Any => (true, false),
        PrincipalSpec::Named { aws, service } => {
            if let Principal::Service(name) = p {
                return (service.iter().any(|s| s == name), false);
            }
            let mut direct = false;
            let mut account = false;
            for entry in aws {
                match Principal::parse(entry) {
                    Some(Principal::Root { account: a }) => {
                        if matches!(p, Principal::Root { account: pa } if *pa == a) {
                            direct = true;
                        } else if p.account() == Some(a.as_str()) {
                            account = true;
                        }
                    }
                    Some(other) => direct |= other == *p,
                    None => {}
                }
            }
            (direct, account)
        }
    }
}

impl Condition {
    fn holds(&self, ctx: &ConditionContext) -> bool {
        let vals = ctx.get(&self.key).filter(|v| !v.is_empty());
        if self.op == Op::Null {
            let want_absent = self.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
            return want_absent == vals.is_none();
        }
        let Some(vals) = vals else {
            return match self.set {
                SetOp::ForAllValues => true,
                SetOp::ForAnyValue => false,
                SetOp::Single => self.if_exists || self.op.negated(),
            };
        };
        let any_match = |v: &String| self.values.iter().any(|pv| self.op.matches_one(v, pv));
        match self.set {
            SetOp::Single | SetOp::ForAnyValue => {
                let hit = vals.iter().any(any_match);
                if self.op.negated() { !hit } else { hit }
            }
            SetOp::ForAllValues => {
                if self.op.negated() {
                    vals.iter().all(|v| !any_match(v))
                } else {
                    vals.iter().all(any_match)
                }
            }
        }
    }
}

/// IAM wildcard match: `*` any run, `?` any one character.
pub fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let eq = |a: char, b: char| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut ti) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && eq(p[pi], t[ti]))) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k";

    fn alice() -> Principal {
        Principal::parse("arn:aws:iam::111122223333:user/Alice").expect("valid")
    }

    fn ask<'a>(p: &'a Principal, action: &'a str, c: &'a ConditionContext) -> Request<'a> {
        Request {
            principal: p,
            action,
            resource: KEY,
            conditions: c,
        }
    }

    fn sample_key_policy() -> PolicyDocument {
        PolicyDocument::parse(include_str!("../policies/workspaces-key-policy.json"))
            .expect("sample parses")
    }

    #[test]
    fn glob_matches_iam_wildcards() {
        assert!(glob("kms:ReEncrypt*", "kms:ReEncryptFrom", true));
        assert!(glob("kms:*", "kms:Decrypt", true));
        assert!(glob("KMS:decrypt", "kms:Decrypt", true));
        assert!(!glob("kms:Describe*", "kms:Decrypt", true));
        assert!(glob("a?c*", "abcdef", false));
        assert!(!glob("a?c", "ac", false));
        assert!(glob("*", "", false));
    }

    #[test]
    fn sample_key_policy_root_delegates_and_alice_needs_via_service() {
        let kp = sample_key_policy();
        let root = Principal::Root {
            account: "111122223333".into(),
        };
        let none = ConditionContext::new();
        assert!(
            kp.evaluate_key_policy(&ask(&root, "kms:DisableKey", &none))
                .allow
        );
        let a = alice();
        let direct = kp.evaluate_key_policy(&ask(&a, "kms:Decrypt", &none));
        assert!(!direct.allow);
        assert!(direct.delegates_to_iam);
        let mut via = ConditionContext::new();
        via.set("kms:ViaService", "workspaces.us-east-1.amazonaws.com");
        via.set("kms:CallerAccount", "111122223333");
        assert!(kp.evaluate_key_policy(&ask(&a, "kms:Decrypt", &via)).allow);
        assert!(
            kp.evaluate_key_policy(&ask(&a, "kms:GenerateDataKeyWithoutPlaintext", &via))
                .allow
        );
        let mut wrong = ConditionContext::new();
        wrong.set("kms:ViaService", "ec2.us-east-1.amazonaws.com");
        assert!(
            !kp.evaluate_key_policy(&ask(&a, "kms:Decrypt", &wrong))
                .allow
        );
        // CreateGrant needs GrantIsForAWSResource.
        assert!(
            !kp.evaluate_key_policy(&ask(&a, "kms:CreateGrant", &via))
                .allow
        );
        via.set("kms:GrantIsForAWSResource", "true");
        assert!(
            kp.evaluate_key_policy(&ask(&a, "kms:CreateGrant", &via))
                .allow
        );
        // "*" matches services too, but a service has no kms:CallerAccount, so the
        // sample's account-scoped statement does not allow EBS; its Deny would.
        let ebs = Principal::Service("ebs.amazonaws.com".into());
        let mut svc = ConditionContext::new();
        svc.set("kms:ViaService", "workspaces.us-east-1.amazonaws.com");
        assert_eq!(
            kp.evaluate_key_policy(&ask(&ebs, "kms:Decrypt", &svc)),
            KeyPolicyOutcome::default()
        );
        let deny_all = PolicyDocument::parse(
            r#"{"Statement":{"Effect":"Deny","Principal":"*","Action":"kms:Decrypt","Resource":"*"}}"#,
        )
        .expect("parses");
        assert!(
            deny_all
                .evaluate_key_policy(&ask(&ebs, "kms:Decrypt", &none))
                .deny
        );
        let deny_aws = PolicyDocument::parse(
            r#"{"Statement":{"Effect":"Deny","Principal":{"AWS":"*"},"Action":"kms:Decrypt","Resource":"*"}}"#,
        )
        .expect("parses");
        assert!(
            deny_aws
                .evaluate_key_policy(&ask(&ebs, "kms:Decrypt", &none))
                .deny
        );
    }

    #[test]
    fn sample_iam_policy_grants_describe_list_creategrant_only() {
        let iam =
            PolicyDocument::parse(include_str!("../policies/alice-workspaces-iam-policy.json"))
                .expect("parses");
        let a = alice();
        let c = ConditionContext::new();
        assert_eq!(
            iam.evaluate_identity_policy(&ask(&a, "kms:DescribeKey", &c)),
            Decision::Allow
        );
        assert_eq!(
            iam.evaluate_identity_policy(&ask(&a, "kms:ListGrants", &c)),
            Decision::Allow
        );
        assert_eq!(
            iam.evaluate_identity_policy(&ask(&a, "kms:CreateGrant", &c)),
            Decision::Allow
        );
        assert_eq!(
            iam.evaluate_identity_policy(&ask(&a, "kms:Decrypt", &c)),
            Decision::NotApplicable
        );
    }

    #[test]
    fn explicit_deny_and_not_action() {
        let p = PolicyDocument::parse(
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Deny","Principal":"*","NotAction":"kms:Describe*","Resource":"*"}}"#,
        )
        .expect("parses");
        let a = alice();
        let c = ConditionContext::new();
        assert!(p.evaluate_key_policy(&ask(&a, "kms:Decrypt", &c)).deny);
        assert!(!p.evaluate_key_policy(&ask(&a, "kms:DescribeKey", &c)).deny);
    }

    #[test]
    fn set_operators_and_context_keys() {
        let p = PolicyDocument::parse(
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"kms:*","Resource":"*","Condition":{
                "ForAllValues:StringEquals":{"kms:EncryptionContextKeys":["aws:ebs:id","aws:workspaces:sid-directoryid"]},
                "StringLike":{"kms:EncryptionContext:aws:ebs:id":"vol-*"}}}]}"#,
        )
        .expect("parses");
        let a = alice();
        let mut c = ConditionContext::new();
        c.set_multi("kms:EncryptionContextKeys", vec!["aws:ebs:id".into()]);
        c.set("kms:EncryptionContext:aws:ebs:id", "vol-1");
        assert_eq!(
            p.evaluate_identity_policy(&ask(&a, "kms:Decrypt", &c)),
            Decision::Allow
        );
        c.set_multi(
            "kms:EncryptionContextKeys",
            vec!["aws:ebs:id".into(), "other".into()],
        );
        assert_eq!(
            p.evaluate_identity_policy(&ask(&a, "kms:Decrypt", &c)),
            Decision::NotApplicable
        );
        let mut d = ConditionContext::new();
        d.set("kms:EncryptionContext:aws:ebs:id", "snap-1");
        assert_eq!(
            p.evaluate_identity_policy(&ask(&a, "kms:Decrypt", &d)),
            Decision::NotApplicable
        );
    }

    #[test]
    fn malformed_documents_are_rejected() {
        for bad in [
            "not json",
            "[]",
            r#"{"Statement":[]}"#,
            r#"{"Statement":{"Effect":"Maybe","Action":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Condition":{"Frobnicate":{"a":"b"}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Principal":{"AWS":"bob"}}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Extra":1}}"#,
        ] {
            assert!(PolicyDocument::parse(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod invariant_tests {
    //! Evaluation invariants over random documents and requests: an applicable explicit
    //! Deny always wins, and removing an Allow statement never grants more.
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/k";
    const PRINCIPALS: [&str; 4] = [
        "arn:aws:iam::111122223333:user/Alice",
        "arn:aws:iam::111122223333:root",
        "arn:aws:iam::444455556666:user/Mallory",
        "ebs.amazonaws.com",
    ];
    const ACTIONS: [&str; 5] = [
        "kms:Decrypt",
        "kms:CreateGrant",
        "kms:DescribeKey",
        "kms:GenerateDataKey",
        "kms:PutKeyPolicy",
    ];

    fn principal(i: usize) -> Principal {
        Principal::parse(PRINCIPALS[i]).unwrap_or_else(|| Principal::Service(PRINCIPALS[i].into()))
    }

    fn statement() -> impl Strategy<Value = Value> {
        let principal = prop_oneof![
            Just(json!("*")),
            Just(json!({"AWS": "arn:aws:iam::111122223333:root"})),
            Just(json!({"AWS": ["arn:aws:iam::111122223333:user/Alice", "444455556666"]})),
            Just(json!({"Service": "ebs.amazonaws.com"})),
        ];
        let action = prop_oneof![
            Just(json!("kms:*")),
            Just(json!("kms:Decrypt")),
            Just(json!(["kms:Describe*", "kms:CreateGrant"])),
            Just(json!("kms:Generate?ataKey*")),
        ];
        let condition = prop_oneof![
            Just(None),
            Just(Some(
                json!({"StringEquals": {"kms:CallerAccount": "111122223333"}})
            )),
            Just(Some(
                json!({"StringLike": {"kms:ViaService": "workspaces.*.amazonaws.com"}})
            )),
            Just(Some(json!({"Bool": {"kms:GrantIsForAWSResource": "true"}}))),
            Just(Some(
                json!({"ForAllValues:StringEquals": {"kms:EncryptionContextKeys": ["aws:ebs:id"]}})
            )),
            Just(Some(
                json!({"StringNotEqualsIfExists": {"kms:EncryptionContext:aws:ebs:id": "vol-2"}})
            )),
            Just(Some(json!({"Null": {"kms:ViaService": "true"}}))),
        ];
        (
            any::<bool>(),
            0u8..3,
            principal,
            any::<bool>(),
            action,
            condition,
        )
            .prop_map(|(allow, p_kind, p, not_action, a, c)| {
                let mut s =
                    json!({"Effect": if allow { "Allow" } else { "Deny" }, "Resource": "*"});
                match p_kind {
                    0 => s["Principal"] = p,
                    1 => s["NotPrincipal"] = p,
                    _ => {}
                }
                s[if not_action { "NotAction" } else { "Action" }] = a;
                if let Some(c) = c {
                    s["Condition"] = c;
                }
                s
            })
    }

    fn conditions(via: bool, ebs: bool) -> ConditionContext {
        let mut c = ConditionContext::new();
        c.set("kms:CallerAccount", "111122223333");
        if via {
            c.set("kms:ViaService", "workspaces.us-east-1.amazonaws.com");
            c.set("kms:GrantIsForAWSResource", "true");
        }
        if ebs {
            c.set("kms:EncryptionContext:aws:ebs:id", "vol-1");
            c.set_multi("kms:EncryptionContextKeys", vec!["aws:ebs:id".into()]);
        }
        c
    }

    fn doc(statements: &[Value]) -> Option<PolicyDocument> {
        PolicyDocument::parse(
            &json!({"Version": "2012-10-17", "Statement": statements}).to_string(),
        )
        .ok()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn explicit_deny_wins_and_removing_an_allow_never_grants_more(
            statements in proptest::collection::vec(statement(), 1..6),
            p in 0usize..4, a in 0usize..5, via in any::<bool>(), ebs in any::<bool>(),
            remove in any::<prop::sample::Index>(),
        ) {
            let Some(full) = doc(&statements) else { return Ok(()); };
            let principal = principal(p);
            let c = conditions(via, ebs);
            let req = Request { principal: &principal, action: ACTIONS[a], resource: KEY, conditions: &c };
            let kp = full.evaluate_key_policy(&req);
            let id = full.evaluate_identity_policy(&req);

            // An applicable explicit Deny wins over every Allow.
            let mut denied = statements.clone();
            denied.push(json!({"Effect": "Deny", "Principal": {"AWS": PRINCIPALS[p]}, "Action": ACTIONS[a], "Resource": "*"}));
            if !principal.is_service() {
                let d = doc(&denied).expect("adding a well-formed Deny keeps the document valid");
                prop_assert!(d.evaluate_key_policy(&req).deny);
                prop_assert_eq!(d.evaluate_identity_policy(&req), Decision::Deny);
            }
            let mut denied_any = statements.clone();
            denied_any.push(json!({"Effect": "Deny", "Action": "*", "Resource": "*"}));
            let d = doc(&denied_any).expect("valid");
            prop_assert_eq!(d.evaluate_identity_policy(&req), Decision::Deny);
            // A Deny that applies on its own still applies next to any Allow.
            let only_denies: Vec<Value> = statements.iter().filter(|s| s["Effect"] == "Deny").cloned().collect();
            if let Some(dd) = doc(&only_denies) {
                if dd.evaluate_identity_policy(&req) == Decision::Deny {
                    prop_assert_eq!(id, Decision::Deny);
                }
                if dd.evaluate_key_policy(&req).deny {
                    prop_assert!(kp.deny);
                }
            }

            // Removing one Allow statement never grants more (and never removes a Deny).
            let allows: Vec<usize> = statements.iter().enumerate().filter(|(_, s)| s["Effect"] == "Allow").map(|(i, _)| i).collect();
            if !allows.is_empty() {
                let i = allows[remove.index(allows.len())];
                let mut fewer = statements.clone();
                fewer.remove(i);
                if let Some(f) = doc(&fewer) {
                    let kp2 = f.evaluate_key_policy(&req);
                    prop_assert!(!kp2.allow || kp.allow);
                    prop_assert!(!kp2.delegates_to_iam || kp.delegates_to_iam);
                    prop_assert_eq!(kp2.deny, kp.deny);
                    let id2 = f.evaluate_identity_policy(&req);
                    prop_assert!(id2 != Decision::Allow || id == Decision::Allow);
                    prop_assert_eq!(id2 == Decision::Deny, id == Decision::Deny);
                }
            }
        }
    }
}
