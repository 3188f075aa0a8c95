//! The Rust AWS SDK (the client the volume code uses) against a spawned daemon:
//! GenerateDataKeyWithoutPlaintext (64 bytes, XTS-AES-256) + Decrypt with an encryption
//! context, using only the profile files the daemon writes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_kms::Client;
use aws_sdk_kms::error::ProvideErrorMetadata;
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{GrantConstraints, GrantOperation};

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon() -> Daemon {
    let dir = tempfile::tempdir().expect("tempdir");
    let ready = dir.path().join("ready.json");
    let child = Command::new(env!("CARGO_BIN_EXE_kms-daemon"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::null())
        .spawn()
        .expect("kms-daemon starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready.exists() {
        assert!(Instant::now() < deadline, "kms-daemon did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon { child, dir }
}

// `ProfileFiles` is re-exported under a deprecated alias; the replacement lives in
// aws-runtime, which is not otherwise a dependency.
#[allow(deprecated)]
async fn sdk_config(state: &Path, profile: &str) -> aws_config::SdkConfig {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    let files = ProfileFiles::builder()
        .with_file(ProfileFileKind::Credentials, state.join("credentials"))
        .with_file(ProfileFileKind::Config, state.join("config"))
        .build();
    aws_config::defaults(BehaviorVersion::latest())
        .profile_files(files)
        .profile_name(profile)
        .load()
        .await
}

async fn client(state: &Path, profile: &str) -> Client {
    Client::new(&sdk_config(state, profile).await)
}

fn state_dir(d: &Daemon) -> PathBuf {
    d.dir.path().join("state")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_data_key_without_plaintext_then_decrypt_with_context() {
    let d = start_daemon();
    let state = state_dir(&d);
    let admin = client(&state, "admin").await;
    let ebs = client(&state, "ebs").await;

    let key = admin
        .create_key()
        .description("sdk round trip")
        .send()
        .await
        .expect("CreateKey");
    let key_id = key.key_metadata().expect("metadata").key_id().to_owned();
    let ctx = [
        ("aws:workspaces:sid-directoryid", "S-1-5-21-42@d-9067000001"),
        ("aws:ebs:id", "vol-0sdk"),
    ];

    // Without a grant the EBS principal is refused.
    let denied = ebs
        .generate_data_key_without_plaintext()
        .key_id(&key_id)
        .number_of_bytes(64)
        .set_encryption_context(Some(
            ctx.iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        ))
        .send()
        .await
        .expect_err("no grant yet");
    assert_eq!(
        denied.into_service_error().code(),
        Some("AccessDeniedException")
    );

    let mut constraints = GrantConstraints::builder();
    for (k, v) in ctx {
        constraints = constraints.encryption_context_equals(k, v);
    }
    admin
        .create_grant()
        .key_id(&key_id)
        .grantee_principal("ebs.amazonaws.com")
        .operations(GrantOperation::GenerateDataKeyWithoutPlaintext)
        .operations(GrantOperation::Decrypt)
        .constraints(constraints.build())
        .send()
        .await
        .expect("CreateGrant");

    let mut gdk = ebs
        .generate_data_key_without_plaintext()
        .key_id(&key_id)
        .number_of_bytes(64);
    let dec_builder = |blob: Vec<u8>| {
        let mut b = ebs.decrypt().ciphertext_blob(Blob::new(blob));
        for (k, v) in ctx {
            b = b.encryption_context(k, v);
        }
        b
    };
    for (k, v) in ctx {
        gdk = gdk.encryption_context(k, v);
    }
    let out = gdk.send().await.expect("GenerateDataKeyWithoutPlaintext");
    assert!(out.key_id().expect("key id").ends_with(&key_id));
    let blob = out.ciphertext_blob().expect("blob").as_ref().to_vec();

    let plain = dec_builder(blob.clone()).send().await.expect("Decrypt");
    assert_eq!(plain.plaintext().expect("plaintext").as_ref().len(), 64);
    assert!(plain.key_id().expect("key id").ends_with(&key_id));

    let wrong = ebs
        .decrypt()
        .ciphertext_blob(Blob::new(blob))
        .encryption_context("aws:ebs:id", "vol-0sdk")
        .send()
        .await
        .expect_err("grant constraint does not match");
    assert_eq!(
        wrong.into_service_error().code(),
        Some("AccessDeniedException")
    );
}

/// Alice's forward-access token for WorkSpaces, presigned with her own credentials.
async fn alice_token(state: &Path, endpoint_host: &str, delegate: &str, age: i64) -> String {
    use aws_credential_types::provider::ProvideCredentials;
    let conf = sdk_config(state, "alice").await;
    let creds = conf
        .credentials_provider()
        .expect("provider")
        .provide_credentials()
        .await
        .expect("alice has credentials");
    kms_daemon::forward::presign(&kms_daemon::forward::PresignInput {
        host: endpoint_host,
        delegate,
        nonce: "0123456789abcdef0123456789abcdef",
        access_key: creds.access_key_id(),
        secret: creds.secret_access_key(),
        region: "us-east-1",
        time: kms_daemon::clock::wall_clock_secs() - age,
        expires: 300,
    })
    .expect("presign")
}

fn endpoint_host(state: &Path) -> String {
    let config = std::fs::read_to_string(state.join("config")).expect("config");
    let url = config
        .lines()
        .find_map(|l| l.strip_prefix("endpoint_url = "))
        .expect("endpoint_url");
    url.trim_start_matches("http://").to_owned()
}

/// How the WorkSpaces service acts for a user with the Rust SDK: the user's
/// forward-access token goes in `x-sealvol-forward-access`, added before signing so SigV4
/// covers it, and the user's key policy statements with `kms:ViaService` apply. A token
/// that is stale or names another delegate gets AccessDeniedException.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workspaces_acts_for_alice_with_her_forward_access_token() {
    let d = start_daemon();
    let state = state_dir(&d);
    let admin = client(&state, "admin").await;
    let workspaces = client(&state, "workspaces").await;
    let policy = include_str!("../policies/workspaces-key-policy.json");
    let key = admin
        .create_key()
        .policy(policy)
        .send()
        .await
        .expect("CreateKey");
    let key_id = key.key_metadata().expect("metadata").key_id().to_owned();

    // As itself, WorkSpaces has no statement in Alice's key policy.
    let denied = workspaces
        .generate_data_key_without_plaintext()
        .key_id(&key_id)
        .number_of_bytes(64)
        .send()
        .await
        .expect_err("no grant, no statement");
    assert_eq!(
        denied.into_service_error().code(),
        Some("AccessDeniedException")
    );

    let host = endpoint_host(&state);
    let gdk = |token: String| {
        workspaces
            .generate_data_key_without_plaintext()
            .key_id(&key_id)
            .number_of_bytes(64)
            .encryption_context("aws:ebs:id", "vol-0fwd")
            .customize()
            .mutate_request(move |req| {
                req.headers_mut()
                    .insert("x-sealvol-forward-access", token.clone());
            })
            .send()
    };
    let out = gdk(alice_token(&state, &host, "workspaces.amazonaws.com", 0).await)
        .await
        .expect("allowed through kms:ViaService for Alice");
    assert!(out.ciphertext_blob().is_some());
    for token in [
        alice_token(&state, &host, "workspaces.amazonaws.com", 301).await,
        alice_token(&state, &host, "ebs.amazonaws.com", 0).await,
        "arn:aws:iam::111122223333:root".to_owned(),
    ] {
        let e = gdk(token).await.expect_err("refused");
        assert_eq!(e.into_service_error().code(), Some("AccessDeniedException"));
    }
}
