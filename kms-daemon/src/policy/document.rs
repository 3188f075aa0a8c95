//! The policy language's JSON shapes, parsed with serde derive: a document's
//! `Version`, `Id` and `Statement` (one object or a list), a statement's elements, a
//! `Principal` (`"*"` or an object of `AWS` / `Service` / ... entries), string-or-list
//! elements (`Action`, `Resource`, `Principal.AWS`, ...) and `Condition` blocks. An
//! element that is present must hold a value of its type (`null` is not absence).
//! [`RawDocument::into_statements`] checks what the shapes cannot say (one of `Action`
//! and `NotAction`, no unknown element, known operators) and yields the evaluator's
//! statements.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::{Condition, Effect, Op, PolicyError, PrincipalSpec, SetOp, Statement, malformed};
use crate::principal::Principal;

/// Deserializes an element that, when present, must hold a `T`.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `Sid`: a string, when present.
fn sid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    String::deserialize(d)
        .map(Some)
        .map_err(|_| de::Error::custom("Sid must be a string"))
}

/// A string or a non-empty list of strings.
struct StringList(Vec<String>);

impl<'de> Deserialize<'de> for StringList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = StringList;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a non-empty list of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<StringList, E> {
                Ok(StringList(vec![s.to_owned()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<StringList, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<String>()? {
                    v.push(s);
                }
                if v.is_empty() {
                    return Err(de::Error::custom("empty list"));
                }
                Ok(StringList(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Declares a deserializer for an optional string-or-list element named `$what`.
macro_rules! string_list_element {
    ($fn:ident, $what:literal) => {
        #[doc = concat!("`", $what, "`: a string or a non-empty list of strings.")]
        fn $fn<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
            StringList::deserialize(d).map(|l| Some(l.0)).map_err(|_| {
                de::Error::custom(concat!(
                    $what,
                    " must be a string or a non-empty list of strings"
                ))
            })
        }
    };
}

string_list_element!(action, "Action");
string_list_element!(not_action, "NotAction");
string_list_element!(resource, "Resource");
string_list_element!(not_resource, "NotResource");
string_list_element!(principal_aws, "Principal.AWS");
string_list_element!(principal_service, "Principal.Service");

/// `Version`: one of the two policy-language versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version;

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d).ok().as_deref() {
            Some("2012-10-17" | "2008-10-17") => Ok(Version),
            _ => Err(de::Error::custom("unsupported Version")),
        }
    }
}

impl<'de> Deserialize<'de> for Effect {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match String::deserialize(d).ok().as_deref() {
            Some("Allow") => Ok(Effect::Allow),
            Some("Deny") => Ok(Effect::Deny),
            _ => Err(de::Error::custom("Effect must be Allow or Deny")),
        }
    }
}

/// The object form of a `Principal`.
#[derive(Deserialize)]
struct PrincipalObject {
    #[serde(rename = "AWS", default, deserialize_with = "principal_aws")]
    aws: Option<Vec<String>>,
    #[serde(rename = "Service", default, deserialize_with = "principal_service")]
    service: Option<Vec<String>>,
    #[serde(rename = "Federated", default)]
    _federated: Option<IgnoredAny>,
    #[serde(rename = "CanonicalUser", default)]
    _canonical_user: Option<IgnoredAny>,
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

impl TryFrom<PrincipalObject> for PrincipalSpec {
    type Error = String;

    fn try_from(p: PrincipalObject) -> Result<Self, String> {
        if let Some(other) = p.other.keys().next() {
            return Err(format!("unknown principal type {other}"));
        }
        let aws = p.aws.unwrap_or_default();
        if aws.iter().any(|a| a == "*") {
            return Ok(PrincipalSpec::Any);
        }
        if let Some(a) = aws.iter().find(|a| Principal::parse(a).is_none()) {
            return Err(format!("invalid principal {a}"));
        }
        Ok(PrincipalSpec::Named {
            aws,
            service: p.service.unwrap_or_default(),
        })
    }
}

impl<'de> Deserialize<'de> for PrincipalSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PrincipalSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("Principal must be \"*\" or an object")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PrincipalSpec, E> {
                if s == "*" {
                    Ok(PrincipalSpec::Any)
                } else {
                    Err(E::custom("Principal must be \"*\" or an object"))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PrincipalSpec, A::Error> {
                let p = PrincipalObject::deserialize(de::value::MapAccessDeserializer::new(map))?;
                PrincipalSpec::try_from(p).map_err(de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One condition value as the policy writes it.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    String(String),
    Bool(bool),
    Number(serde_json::Number),
}

impl Scalar {
    fn into_string(self) -> String {
        match self {
            Self::String(s) => s,
            Self::Bool(b) => b.to_string(),
            Self::Number(n) => n.to_string(),
        }
    }
}

/// The values a condition compares against: one scalar or a list of them.
struct ConditionValues(Vec<String>);

impl<'de> Deserialize<'de> for ConditionValues {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            Many(Vec<Scalar>),
            One(Scalar),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::Many(v)) => Ok(Self(v.into_iter().map(Scalar::into_string).collect())),
            Ok(OneOrMany::One(s)) => Ok(Self(vec![s.into_string()])),
            Err(_) => Err(de::Error::custom(
                "condition values must be strings, booleans or numbers",
            )),
        }
    }
}

/// A `Condition` block: operator -> condition key -> values.
type ConditionBlock = BTreeMap<String, BTreeMap<String, ConditionValues>>;

/// One statement as written.
#[derive(Deserialize)]
struct RawStatement {
    #[serde(rename = "Sid", default, deserialize_with = "sid")]
    _sid: Option<String>,
    #[serde(rename = "Effect", default, deserialize_with = "present")]
    effect: Option<Effect>,
    #[serde(rename = "Principal", default, deserialize_with = "present")]
    principal: Option<PrincipalSpec>,
    #[serde(rename = "NotPrincipal", default, deserialize_with = "present")]
    not_principal: Option<PrincipalSpec>,
    #[serde(rename = "Action", default, deserialize_with = "action")]
    action: Option<Vec<String>>,
    #[serde(rename = "NotAction", default, deserialize_with = "not_action")]
    not_action: Option<Vec<String>>,
    #[serde(rename = "Resource", default, deserialize_with = "resource")]
    resource: Option<Vec<String>>,
    #[serde(rename = "NotResource", default, deserialize_with = "not_resource")]
    not_resource: Option<Vec<String>>,
    #[serde(rename = "Condition", default, deserialize_with = "present")]
    condition: Option<ConditionBlock>,
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

/// `Statement`: one statement object or a list of them.
struct Statements(Vec<RawStatement>);

impl<'de> Deserialize<'de> for Statements {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Statements;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("Statement must be an object or a list")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Statements, A::Error> {
                let mut v = Vec::new();
                while let Some(s) = a.next_element::<RawStatement>()? {
                    v.push(s);
                }
                Ok(Statements(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Statements, A::Error> {
                let s = RawStatement::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Statements(vec![s]))
            }
        }
        d.deserialize_any(V)
    }
}

/// A policy document as written.
#[derive(Deserialize)]
pub(super) struct RawDocument {
    #[serde(rename = "Version", default, deserialize_with = "present")]
    _version: Option<Version>,
    #[serde(rename = "Id", default)]
    _id: Option<IgnoredAny>,
    #[serde(rename = "Statement", default, deserialize_with = "present")]
    statement: Option<Statements>,
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

impl RawDocument {
    /// The evaluator's statements, after the checks the shapes cannot express.
    pub(super) fn into_statements(self) -> Result<Vec<Statement>, PolicyError> {
        if let Some(other) = self.other.keys().next() {
            return Err(malformed(format!("unknown policy element {other}")));
        }
        let statements = self
            .statement
            .ok_or_else(|| malformed("policy without Statement"))?
            .0
            .into_iter()
            .map(RawStatement::into_statement)
            .collect::<Result<Vec<_>, _>>()?;
        if statements.is_empty() {
            return Err(malformed("policy without statements"));
        }
        Ok(statements)
    }
}

impl RawStatement {
    fn into_statement(self) -> Result<Statement, PolicyError> {
        if let Some(other) = self.other.keys().next() {
            return Err(malformed(format!("unknown statement element {other}")));
        }
        let (action, not_action) = match (self.action, self.not_action) {
            (Some(_), Some(_)) => return Err(malformed("only one of Action and NotAction")),
            (Some(a), None) => (a, false),
            (None, Some(a)) => (a, true),
            (None, None) => return Err(malformed("statement without Action")),
        };
        let resource = match (self.resource, self.not_resource) {
            (Some(_), Some(_)) => return Err(malformed("only one of Resource and NotResource")),
            (Some(r), None) => Some((r, false)),
            (None, Some(r)) => Some((r, true)),
            (None, None) => None,
        };
        let mut conditions = Vec::new();
        for (op_name, keys) in self.condition.unwrap_or_default() {
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
            let op = Op::parse(base)
                .ok_or_else(|| malformed(format!("unsupported condition operator {op_name}")))?;
            for (key, values) in keys {
                conditions.push(Condition {
                    op,
                    set,
                    if_exists,
                    key: key.to_ascii_lowercase(),
                    values: values.0,
                });
            }
        }
        Ok(Statement {
            effect: self
                .effect
                .ok_or_else(|| malformed("statement without Effect"))?,
            principal: self.principal,
            not_principal: self.not_principal,
            action,
            not_action,
            resource,
            conditions,
        })
    }
}
