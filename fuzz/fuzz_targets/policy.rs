//! IAM policy parser and evaluator. Input: a policy document. Oracle: never a panic;
//! evaluation is deterministic; appending an explicit `Deny *` statement makes every
//! request denied (explicit deny wins) both as an identity policy and as a key policy;
//! removing every Allow statement never allows anything; `glob(t, t)` always holds.
#![no_main]

use kms_daemon::policy::{ConditionContext, Decision, PolicyDocument, Request, glob};
use kms_daemon::principal::Principal;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
const ACTIONS: [&str; 5] = ["kms:Decrypt", "kms:CreateGrant", "kms:DescribeKey", "kms:GenerateDataKeyWithoutPlaintext", "kms:PutKeyPolicy"];

fn principals() -> Vec<Principal> {
    [
        "arn:aws:iam::111122223333:user/Alice",
        "arn:aws:iam::111122223333:root",
        "arn:aws:iam::444455556666:user/Mallory",
    ]
    .iter()
    .map(|s| Principal::parse(s).expect("valid"))
    .chain([Principal::Service("ebs.amazonaws.com".into())])
    .collect()
}

fn contexts() -> Vec<ConditionContext> {
    let empty = ConditionContext::new();
    let mut via = ConditionContext::new();
    via.set("kms:ViaService", "workspaces.us-east-1.amazonaws.com");
    via.set("kms:CallerAccount", "111122223333");
    via.set("kms:GrantIsForAWSResource", "true");
    via.set("kms:EncryptionContext:aws:ebs:id", "vol-1");
    via.set_multi("kms:EncryptionContextKeys", vec!["aws:ebs:id".into(), "aws:workspaces:sid-directoryid".into()]);
    via.set_multi("kms:GrantOperations", vec!["Decrypt".into(), "RetireGrant".into()]);
    via.set("aws:PrincipalArn", "arn:aws:iam::111122223333:user/Alice");
    vec![empty, via]
}

fn with_statements(doc: &Value, f: impl Fn(Vec<Value>) -> Vec<Value>) -> Option<PolicyDocument> {
    let mut d = doc.clone();
    let sts = match d.get("Statement")? {
        Value::Array(a) => a.clone(),
        o @ Value::Object(_) => vec![o.clone()],
        _ => return None,
    };
    d["Statement"] = Value::Array(f(sts));
    PolicyDocument::parse(&d.to_string()).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Some((p, t)) = text.split_once('\u{1}') {
        let _ = glob(p, t, false);
        let _ = glob(p, t, true);
        assert!(glob(t, t, false) && glob(t, t, true) && glob("*", t, false));
    }
    let Ok(doc) = PolicyDocument::parse(text) else { return };
    let _ = doc.require_principals();
    let value: Value = serde_json::from_str(text).expect("parsed documents are JSON");
    let deny_all = json!({"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*"});
    let denied = with_statements(&value, |mut s| {
        s.push(deny_all.clone());
        s
    });
    let allowless = with_statements(&value, |s| {
        s.into_iter().filter(|st| st.get("Effect") != Some(&json!("Allow"))).collect()
    });
    let (principals, contexts) = (principals(), contexts());
    for p in &principals {
        for c in &contexts {
            for a in ACTIONS {
                let req = Request { principal: p, action: a, resource: KEY, conditions: c };
                let kp = doc.evaluate_key_policy(&req);
                let id = doc.evaluate_identity_policy(&req);
                assert_eq!(kp, doc.evaluate_key_policy(&req));
                assert_eq!(id, doc.evaluate_identity_policy(&req));
                if let Some(d) = &denied {
                    assert_eq!(d.evaluate_identity_policy(&req), Decision::Deny, "explicit deny must win");
                    assert!(d.evaluate_key_policy(&req).deny || p.is_service(), "explicit deny must win for {p:?}");
                }
                if let Some(d) = &allowless {
                    assert_ne!(d.evaluate_identity_policy(&req), Decision::Allow);
                    let o = d.evaluate_key_policy(&req);
                    assert!(!o.allow && !o.delegates_to_iam);
                }
            }
        }
    }
});
