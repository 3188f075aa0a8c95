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
            let mut s = json!({"Effect": if allow { "Allow" } else { "Deny" }, "Resource": "*"});
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
    PolicyDocument::parse(&json!({"Version": "2012-10-17", "Statement": statements}).to_string())
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
