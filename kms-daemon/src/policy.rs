//! IAM policy documents (key policies and identity policies): parsing and evaluation.
//!
//! Supports what KMS key policies use: `Statement` as object or list, `Effect`,
//! `Principal`/`NotPrincipal` (incl. `*`, `AWS`, `Service`), `Action`/`NotAction` and
//! `Resource`/`NotResource` with `*`/`?` wildcards, and `Condition` with the string,
//! ARN, `Bool` and `Null` operators, `ForAnyValue:`/`ForAllValues:` prefixes and the
//! `IfExists` suffix. The JSON shapes are [`document`]'s, parsed with serde derive.

use std::collections::HashMap;

use serde::Deserialize;
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

impl PolicyDocument {
    /// Parses a policy document.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        // The text must be JSON first (PolicyError::Json); then its shape, by serde.
        let v: Value = serde_json::from_str(text).map_err(|_| PolicyError::Json)?;
        let raw = document::RawDocument::deserialize(v).map_err(|e| malformed(e.to_string()))?;
        let statements = raw.into_statements()?;
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

mod document;

#[cfg(test)]
mod invariant_tests;
#[cfg(test)]
mod tests;
