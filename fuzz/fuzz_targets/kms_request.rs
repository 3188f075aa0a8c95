//! KMS request decoding per operation, through the real service: `Kms::execute` (the
//! daemon minus HTTP and SigV4) over a SQLite store in a private state directory, called
//! as the account root. Input: first byte picks the operation, the rest is the JSON body;
//! the placeholders `$KEY`, `$ARN`, `$BLOB` and `$GRANT` are replaced by a live key id,
//! its ARN, a valid ciphertext blob (context {"a":"b"}) and a live grant id, so bodies get
//! past lookup and authentication. Oracle: never a panic, never an internal error (500),
//! and the audit request-parameter extraction accepts every body.
#![no_main]

use std::sync::OnceLock;

use kms_daemon::audit::request_parameters;
use kms_daemon::clock::OffsetClock;
use kms_daemon::error::OpError;
use kms_daemon::ops::{Kms, Operation, Touched};
use kms_daemon::principal::{Caller, Principal};
use kms_daemon::state::StateDir;
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

const OPS: [&str; 29] = [
    "CreateKey", "DescribeKey", "ListKeys", "CreateAlias", "ListAliases", "DeleteAlias", "UpdateAlias",
    "EnableKey", "DisableKey", "ScheduleKeyDeletion", "CancelKeyDeletion", "EnableKeyRotation",
    "DisableKeyRotation", "GetKeyRotationStatus", "RotateKeyOnDemand", "ListKeyRotations",
    "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt", "ReEncrypt",
    "CreateGrant", "ListGrants", "ListRetirableGrants", "RetireGrant", "RevokeGrant", "GetKeyPolicy",
    "PutKeyPolicy", "ListKeyPolicies",
];

struct World {
    kms: Kms,
    caller: Caller,
    subst: Vec<(&'static str, String)>,
}

fn call(w: &Kms, c: &Caller, op: &str, body: &Value) -> Value {
    let op = Operation::from_target(&format!("TrentService.{op}")).expect("known op");
    w.execute(c, op, body.to_string().as_bytes(), &mut Touched::default()).expect("setup call")
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm".into() } else { std::env::temp_dir() };
        let dir = base.join(format!("sealvol-fuzz-kms-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let st = StateDir::open(&dir, "111122223333", "us-east-1").expect("state dir");
        let kms = Kms::new(
            std::sync::Arc::new(kms_daemon::cache::CachedStore::new(st.store)),
            st.root,
            std::sync::Arc::new(OffsetClock::new(0)),
            "111122223333",
            "us-east-1",
        );
        let caller = Caller {
            signer: Principal::parse("arn:aws:iam::111122223333:root").expect("root"),
            access_key_id: "AKIDFUZZ".into(),
            forwarded: None,
        };
        let key = call(&kms, &caller, "CreateKey", &json!({}));
        let id = key["KeyMetadata"]["KeyId"].as_str().expect("id").to_owned();
        let arn = key["KeyMetadata"]["Arn"].as_str().expect("arn").to_owned();
        let enc = call(&kms, &caller, "Encrypt", &json!({"KeyId": id, "Plaintext": "AAAA", "EncryptionContext": {"a": "b"}}));
        let blob = enc["CiphertextBlob"].as_str().expect("blob").to_owned();
        let g = call(&kms, &caller, "CreateGrant", &json!({"KeyId": id, "GranteePrincipal": "arn:aws:iam::111122223333:user/Alice", "Operations": ["Decrypt"]}));
        let grant = g["GrantId"].as_str().expect("grant").to_owned();
        World { kms, caller, subst: vec![("$KEY", id), ("$ARN", arn), ("$BLOB", blob), ("$GRANT", grant)] }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else { return };
    let w = world();
    let _ = request_parameters(body);
    let mut body = body.to_vec();
    if body.len() < 16 * 1024 && body.contains(&b'$') {
        let mut s = String::from_utf8_lossy(&body).into_owned();
        for (k, v) in &w.subst {
            s = s.replace(k, v);
        }
        body = s.into_bytes();
    }
    let op = Operation::from_target(&format!("TrentService.{}", OPS[usize::from(sel) % OPS.len()])).expect("known op");
    match w.kms.execute(&w.caller, op, &body, &mut Touched::default()) {
        Err(OpError::Internal(detail)) => panic!("internal error for {op:?}: {detail}"),
        Err(e) => assert!(e.status() < 500, "{op:?}: {e:?}"),
        Ok(v) => assert!(v.is_object()),
    }
});
