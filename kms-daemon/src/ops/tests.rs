//! Operations end to end through [`Kms::execute`]: policies, IAM, grants and Deny
//! combined as AWS does, and the lifecycle sweep.
use std::sync::Arc;

use serde_json::{Value, json};

use super::{Kms, Operation, Touched};
use crate::blob::SymmetricKey;
use crate::clock::OffsetClock;
use crate::error::OpError;
use crate::keys::RootKey;
use crate::principal::{Caller, Principal};
use crate::store::SqliteStore;

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
    let other =
        json!({"KeyId": key, "NumberOfBytes": 64, "EncryptionContext": {"aws:ebs:id": "vol-2"}});
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
    call(
        &k,
        &admin,
        Operation::CreateGrant,
        json!({
            "KeyId": key, "GranteePrincipal": alice_arn, "Operations": ["Decrypt", "CreateGrant"]
        }),
    )
    .expect("parent grant");
    let sub =
        json!({"KeyId": key, "GranteePrincipal": "ebs.amazonaws.com", "Operations": ["Decrypt"]});
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

#[test]
fn operations_parse_from_their_target_only() {
    assert_eq!(
        Operation::from_target("TrentService.Decrypt"),
        Some(Operation::Decrypt)
    );
    assert_eq!(Operation::from_target("TrentService.Sign"), None);
    assert_eq!(Operation::from_target("Decrypt"), None);
    assert_eq!(Operation::Decrypt.name(), "Decrypt");
    assert!(Operation::Decrypt.runs_inline() && !Operation::Decrypt.read_only());
    assert!(Operation::ListKeys.read_only() && !Operation::ListKeys.runs_inline());
}

#[test]
fn typed_responses_keep_the_wire_field_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let k = kms(dir.path());
    let root = caller(&format!("arn:aws:iam::{ACCT}:root"), None);
    let keys = |v: &Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k.join(",")
    };
    let created = call(&k, &root, Operation::CreateKey, json!({})).expect("CreateKey");
    assert_eq!(
        keys(&created["KeyMetadata"]),
        "AWSAccountId,Arn,CreationDate,CustomerMasterKeySpec,Description,Enabled,EncryptionAlgorithms,KeyId,KeyManager,KeySpec,KeyState,KeyUsage,MultiRegion,Origin"
    );
    let id = created["KeyMetadata"]["KeyId"]
        .as_str()
        .expect("id")
        .to_owned();
    let enc = call(
        &k,
        &root,
        Operation::Encrypt,
        json!({"KeyId": id, "Plaintext": "AAAA"}),
    )
    .expect("Encrypt");
    assert_eq!(keys(&enc), "CiphertextBlob,EncryptionAlgorithm,KeyId");
    let dec = call(
        &k,
        &root,
        Operation::Decrypt,
        json!({"CiphertextBlob": enc["CiphertextBlob"]}),
    )
    .expect("Decrypt");
    assert_eq!(keys(&dec), "EncryptionAlgorithm,KeyId,Plaintext");
    assert_eq!(dec["Plaintext"], "AAAA");
    let re = call(
        &k,
        &root,
        Operation::ReEncrypt,
        json!({"CiphertextBlob": enc["CiphertextBlob"], "DestinationKeyId": id}),
    )
    .expect("ReEncrypt");
    assert_eq!(
        keys(&re),
        "CiphertextBlob,DestinationEncryptionAlgorithm,KeyId,SourceEncryptionAlgorithm,SourceKeyId"
    );
    let gdk = call(
        &k,
        &root,
        Operation::GenerateDataKey,
        json!({"KeyId": id, "NumberOfBytes": 32}),
    )
    .expect("GenerateDataKey");
    assert_eq!(keys(&gdk), "CiphertextBlob,KeyId,Plaintext");
    let bare = call(
        &k,
        &root,
        Operation::GenerateDataKeyWithoutPlaintext,
        json!({"KeyId": id, "KeySpec": "AES_256"}),
    )
    .expect("GenerateDataKeyWithoutPlaintext");
    assert_eq!(keys(&bare), "CiphertextBlob,KeyId");
    call(
        &k,
        &root,
        Operation::ScheduleKeyDeletion,
        json!({"KeyId": id}),
    )
    .expect("schedule");
    let d = call(&k, &root, Operation::DescribeKey, json!({"KeyId": id})).expect("DescribeKey");
    assert_eq!(d["KeyMetadata"]["PendingDeletionWindowInDays"], 30);
    assert!(d["KeyMetadata"]["DeletionDate"].is_i64());
}
