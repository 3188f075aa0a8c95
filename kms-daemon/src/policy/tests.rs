//! Policy parsing and evaluation against the sample key and IAM policies.

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
    PolicyDocument::parse(include_str!("../../policies/workspaces-key-policy.json"))
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
    let iam = PolicyDocument::parse(include_str!(
        "../../policies/alice-workspaces-iam-policy.json"
    ))
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
