//! The S3 snapshot store against a real S3-compatible server: a single-node Garage on
//! loopback started by each test (tests/support/garage.rs). Without garage installed these
//! tests skip, saying so, outside CI; under CI=true they fail.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sealvol::snapshot::store::{self, S3Settings, SnapshotStore, StoreError, StoreUrl};

#[path = "support/garage.rs"]
mod garage;

use garage::Garage;

fn settings(
    config: std::path::PathBuf,
    credentials: std::path::PathBuf,
    profile: &str,
) -> S3Settings {
    S3Settings {
        profile: Some(profile.to_owned()),
        config_file: Some(config),
        credentials_file: Some(credentials),
    }
}

/// Opens `url` on `g` with a correct profile.
fn open(g: &Garage, url: &str) -> Box<dyn SnapshotStore> {
    let (config, creds) = g.write_profile("store", &g.endpoint, &g.secret_key);
    let url: StoreUrl = url.parse().expect("url");
    store::open_with(&url, &settings(config, creds, "store"))
        .unwrap_or_else(|e| panic!("open {url}: {e}\ngarage log:\n{}", g.log()))
}

/// What every store must do, run over the file store and the S3 store alike: round trip,
/// overwrite, NotFound, more keys than one ListObjectsV2 page (1000) written from 16 threads
/// at once and listed sorted, idempotent delete, bad keys refused.
fn contract(s: &dyn SnapshotStore) {
    assert!(!s.exists("workspaces/ws-1/user/t.json").expect("exists"));
    match s.get("workspaces/ws-1/user/t.json") {
        Err(StoreError::NotFound { key }) => assert_eq!(key, "workspaces/ws-1/user/t.json"),
        other => panic!("{other:?}"),
    }
    s.put("workspaces/ws-1/user/t.json", b"{\"v\":1}")
        .expect("put");
    s.put("workspaces/ws-1/user/t.json", b"{\"v\":2}")
        .expect("overwrite");
    assert!(s.exists("workspaces/ws-1/user/t.json").expect("exists"));
    assert_eq!(
        s.get("workspaces/ws-1/user/t.json").expect("get"),
        b"{\"v\":2}"
    );
    let big: Vec<u8> = (0..512 * 1024u32).map(|i| (i % 251) as u8).collect();
    s.put("chunks/big", &big).expect("put a whole chunk");
    assert_eq!(s.get("chunks/big").expect("get"), big);

    let keys: Vec<String> = (0..1100).map(|i| format!("chunks/{i:05x}")).collect();
    std::thread::scope(|scope| {
        for part in keys.chunks(keys.len().div_ceil(16)) {
            scope.spawn(move || {
                for k in part {
                    s.put(k, k.as_bytes()).expect("put");
                }
            });
        }
    });
    let listed = s.list("chunks/").expect("list");
    let mut want: Vec<String> = keys.clone();
    want.push("chunks/big".into());
    want.sort();
    assert_eq!(
        listed.len(),
        want.len(),
        "list must return every key, past one page"
    );
    assert_eq!(
        listed.iter().map(|o| o.key.clone()).collect::<Vec<_>>(),
        want
    );
    assert!(
        listed
            .iter()
            .filter(|o| o.key != "chunks/big")
            .all(|o| o.size == o.key.len() as u64)
    );
    assert_eq!(s.list("chunks/big").expect("list")[0].size, 512 * 1024);
    assert_eq!(s.list("chunks/0000").expect("list").len(), 16);
    assert_eq!(s.list("").expect("list all").len(), want.len() + 1);
    assert_eq!(s.list("workspaces/").expect("list").len(), 1);
    assert!(s.list("nothing/").expect("list").is_empty());

    s.delete("chunks/00000").expect("delete");
    s.delete("chunks/00000").expect("delete again");
    assert!(!s.exists("chunks/00000").expect("exists"));
    assert!(matches!(
        s.get("chunks/00000"),
        Err(StoreError::NotFound { .. })
    ));
    let after: BTreeSet<String> = s
        .list("chunks/")
        .expect("list")
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(after.len(), want.len() - 1);

    for bad in ["../escape", "/abs", "a//b", ""] {
        assert!(
            matches!(s.put(bad, b"x"), Err(StoreError::BadKey { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn the_file_store_keeps_the_contract() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url: StoreUrl = format!("file://{}/snaps", dir.path().display())
        .parse()
        .expect("url");
    let s = store::open(&url, None).expect("open");
    assert_eq!(s.describe(), url.to_string());
    contract(s.as_ref());
}

#[test]
fn the_s3_store_keeps_the_contract_against_garage() {
    let Some(g) = Garage::start_or_skip("the_s3_store_keeps_the_contract_against_garage") else {
        return;
    };
    let s = open(&g, &format!("s3://{}/site-a", g.bucket));
    assert_eq!(s.describe(), "s3://snapshots/site-a");
    contract(s.as_ref());

    // The prefix isolates: the bucket's root sees the keys under site-a/, another prefix
    // sees none of them.
    let root = open(&g, &format!("s3://{}", g.bucket));
    assert!(root.exists("site-a/chunks/00001").expect("exists"));
    assert!(!root.exists("chunks/00001").expect("exists"));
    let other = open(&g, &format!("s3://{}/site-b", g.bucket));
    assert!(other.list("").expect("list").is_empty());
}

#[test]
fn an_unreachable_endpoint_fails_open_quickly() {
    // Nothing listens on this port: no Garage is needed.
    let dir = tempfile::tempdir().expect("tempdir");
    let dead = format!("http://127.0.0.1:{}", garage::free_port());
    let config = dir.path().join("config");
    let creds = dir.path().join("credentials");
    std::fs::write(
        &config,
        format!("[profile dead]\nregion = garage\nendpoint_url = {dead}\n"),
    )
    .expect("config");
    std::fs::write(
        &creds,
        "[dead]\naws_access_key_id = GK000000000000000000000000\naws_secret_access_key = 00\n",
    )
    .expect("credentials");
    let url: StoreUrl = "s3://snapshots/p".parse().expect("url");
    let started = Instant::now();
    let Err(e) = store::open_with(&url, &settings(config, creds, "dead")) else {
        panic!("opened a store at {dead}, where nothing listens");
    };
    let took = started.elapsed();
    match &e {
        StoreError::Unreachable { store, .. } => assert!(store.contains(&dead), "{store}"),
        other => panic!("{other:?}"),
    }
    assert!(took < Duration::from_secs(10), "took {took:?}: {e}");
    let msg = e.to_string();
    assert!(msg.contains("AWS_ENDPOINT_URL_S3"), "{msg}");
}

#[test]
fn a_wrong_bucket_is_no_such_bucket() {
    let Some(g) = Garage::start_or_skip("a_wrong_bucket_is_no_such_bucket") else {
        return;
    };
    let (config, creds) = g.write_profile("store", &g.endpoint, &g.secret_key);
    let url: StoreUrl = "s3://no-such-bucket/p".parse().expect("url");
    match store::open_with(&url, &settings(config, creds, "store")) {
        Err(StoreError::NoSuchBucket { bucket }) => assert_eq!(bucket, "no-such-bucket"),
        Err(other) => panic!("{other:?}"),
        Ok(s) => panic!("opened {}", s.describe()),
    }
}

#[test]
fn a_bucket_the_key_may_not_use_is_access_denied() {
    let Some(g) = Garage::start_or_skip("a_bucket_the_key_may_not_use_is_access_denied") else {
        return;
    };
    g.create_bucket("someone-else");
    let (config, creds) = g.write_profile("store", &g.endpoint, &g.secret_key);
    let url: StoreUrl = "s3://someone-else".parse().expect("url");
    match store::open_with(&url, &settings(config, creds, "store")) {
        Err(StoreError::AccessDenied { detail, .. }) => assert!(detail.contains("403"), "{detail}"),
        Err(other) => panic!("{other:?}"),
        Ok(s) => panic!("opened {}", s.describe()),
    }
}

#[test]
fn a_wrong_secret_is_access_denied() {
    let Some(g) = Garage::start_or_skip("a_wrong_secret_is_access_denied") else {
        return;
    };
    let wrong = "f".repeat(64);
    let (config, creds) = g.write_profile("wrong", &g.endpoint, &wrong);
    let url: StoreUrl = format!("s3://{}/p", g.bucket).parse().expect("url");
    match store::open_with(&url, &settings(config, creds, "wrong")) {
        Err(e @ StoreError::AccessDenied { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("--snapshot-store-profile"), "{msg}");
            assert!(
                !msg.contains(&wrong),
                "the secret must never be printed: {msg}"
            );
        }
        Err(other) => panic!("{other:?}"),
        Ok(s) => panic!("opened {}", s.describe()),
    }
}

/// Runs [`open_reads_the_endpoint_and_profile_from_the_standard_environment`] again in a
/// child process with `env` (and none of the caller's AWS variables), where it plays the
/// child's part ([`open_from_the_environment`]), so the standard sources are read as a
/// real process reads them.
fn run_child(url: &str, profile: &str, expect: &str, env: &[(&str, String)]) {
    let mut cmd = std::process::Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "open_reads_the_endpoint_and_profile_from_the_standard_environment",
        "--exact",
        "--nocapture",
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    // The default chain would ask the EC2 instance metadata service (a link-local address)
    // for credentials and region: tests talk to loopback only.
    cmd.env("AWS_EC2_METADATA_DISABLED", "true");
    cmd.env("SEALVOL_TEST_CHILD_URL", url)
        .env("SEALVOL_TEST_CHILD_PROFILE", profile)
        .env("SEALVOL_TEST_CHILD_EXPECT", expect);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the child test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("1 passed"),
        "the child test did not run:\n{text}"
    );
}

#[test]
fn open_reads_the_endpoint_and_profile_from_the_standard_environment() {
    if let Ok(url) = std::env::var("SEALVOL_TEST_CHILD_URL") {
        return open_from_the_environment(&url);
    }
    let Some(g) =
        Garage::start_or_skip("open_reads_the_endpoint_and_profile_from_the_standard_environment")
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config");
    let creds = dir.path().join("credentials");
    // No endpoint in the profile: AWS_ENDPOINT_URL_S3 names it. `nocreds` has no keys.
    std::fs::write(
        &config,
        "[profile store]\nregion = garage\n\n[profile nocreds]\nregion = garage\n",
    )
    .expect("config");
    std::fs::write(
        &creds,
        format!(
            "[store]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            g.access_key, g.secret_key
        ),
    )
    .expect("credentials");
    let env = [
        ("AWS_CONFIG_FILE", config.display().to_string()),
        ("AWS_SHARED_CREDENTIALS_FILE", creds.display().to_string()),
        ("AWS_ENDPOINT_URL_S3", g.endpoint.clone()),
    ];
    let url = format!("s3://{}/env", g.bucket);
    run_child(&url, "store", "ok", &env);
    run_child(&url, "nocreds", "access-denied", &env);
}

/// The child's part: opens the store named by the environment the parent set up and
/// checks the outcome it expects.
fn open_from_the_environment(url: &str) {
    let profile = std::env::var("SEALVOL_TEST_CHILD_PROFILE").expect("profile");
    let expect = std::env::var("SEALVOL_TEST_CHILD_EXPECT").expect("expectation");
    let url: StoreUrl = url.parse().expect("url");
    match (store::open(&url, Some(&profile)), expect.as_str()) {
        (Ok(s), "ok") => {
            assert_eq!(s.describe(), url.to_string());
            s.put("chunks/env", b"from the environment").expect("put");
            assert_eq!(s.get("chunks/env").expect("get"), b"from the environment");
        }
        (Err(StoreError::AccessDenied { detail, .. }), "access-denied") => {
            assert!(detail.contains("credentials"), "{detail}");
        }
        (Ok(s), want) => panic!("opened {} but expected {want}", s.describe()),
        (Err(e), want) => panic!("{e} (expected {want})"),
    }
}

#[test]
fn a_store_whose_server_died_is_unreachable_within_seconds() {
    let Some(mut g) =
        Garage::start_or_skip("a_store_whose_server_died_is_unreachable_within_seconds")
    else {
        return;
    };
    let s = open(&g, &format!("s3://{}", g.bucket));
    s.put("chunks/aa", b"x").expect("put");
    g.kill();
    let started = Instant::now();
    for result in [s.get("chunks/aa").map(|_| ()), s.put("chunks/bb", b"y")] {
        match result {
            Err(StoreError::Unreachable { store, detail }) => {
                assert!(store.contains(&g.endpoint), "{store}");
                assert!(!detail.is_empty());
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}
