//! Online rekey through real mounts: the attach agent re-encrypts the volume while fio
//! writes and verifies in the foreground; a kill -9 of the agent mid-rekey is followed by
//! a re-attach that resumes and finishes it. Needs root, /dev/fuse, fio and cryptsetup
//! (CI has them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Attaches `vol` at `mnt` with `key` (the attach must succeed); detached on drop.
fn attached(vol: &Path, mnt: &Path, key: &Path) -> AttachGuard {
    let out = attach(vol, mnt, key, None);
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    AttachGuard {
        mountpoint: mnt.to_path_buf(),
    }
}

fn attach(vol: &Path, mnt: &Path, key: &Path, new: Option<&Path>) -> std::process::Output {
    let mut args = vec![
        "attach",
        "--path",
        s(vol),
        "--mountpoint",
        s(mnt),
        "--volume-key-file",
        s(key),
    ];
    if let Some(n) = new {
        args.extend(["--new-volume-key-file", s(n)]);
    }
    run("sealvol", &args)
}

fn prerequisites(test: &str) -> bool {
    if !privileged_env(test) {
        return false;
    }
    let missing: Vec<&str> = ["fio", "cryptsetup"]
        .into_iter()
        .filter(|t| which(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {missing:?} missing in CI"
    );
    eprintln!("SKIPPED {test}: needs {missing:?} (not in CI, so skipping)");
    false
}

/// A temp dir with a fresh 1 GiB volume under a random old key, a random new key file and
/// an empty mountpoint: (dir guard, volume, old key, new key, mountpoint).
fn new_volume() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let old = key_file(dir.path(), "old.key");
    let new = key_file(dir.path(), "new.key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&old), "1");
    (dir, vol, old, new, mnt)
}

/// fio arguments for a deterministic region: `write` fills it, `verify` checks it.
fn fio_region(
    disk: &Path,
    name: &str,
    offset: &str,
    size: &str,
    bs: &str,
    verify_only: bool,
) -> Vec<String> {
    let mut a: Vec<String> = [
        format!("--name={name}"),
        format!("--filename={}", disk.display()),
        "--rw=write".into(),
        format!("--bs={bs}"),
        format!("--offset={offset}"),
        format!("--size={size}"),
        "--ioengine=libaio".into(),
        "--iodepth=8".into(),
        "--direct=1".into(),
        "--verify=crc32c".into(),
        "--verify_fatal=1".into(),
        "--randseed=4242".into(),
        "--output-format=json".into(),
    ]
    .into();
    if verify_only {
        a.push("--verify_only".into());
    } else {
        a.push("--do_verify=0".into());
        a.push("--end_fsync=1".into());
    }
    a
}

fn fio_ok(args: &[String], what: &str) {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("fio", &refs);
    assert!(
        out.status.success(),
        "fio {what}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    assert_eq!(json["jobs"][0]["error"], 0, "fio {what}");
}

fn describe(vol: &Path) -> serde_json::Value {
    serde_json::from_str(&run_ok(
        "sealvol",
        &["describe-volume", "--path", s(vol), "--output", "json"],
    ))
    .expect("describe json")
}

fn rekey_done_bytes(vol: &Path) -> Option<u64> {
    describe(vol)
        .get("RekeyInProgress")
        .and_then(|p| p["Done"].as_u64())
}

fn rekey_online(mnt: &Path, new: &Path, hotzone_mib: &str, resilience: &str) -> Child {
    spawn_sealvol(&[
        "rekey-volume",
        "--mountpoint",
        s(mnt),
        "--new-volume-key-file",
        s(new),
        "--hotzone-mib",
        hotzone_mib,
        "--resilience",
        resilience,
        "--output",
        "json",
    ])
}

/// `sealvol ARGS` in the background, stdout and stderr captured.
fn spawn_sealvol(args: &[&str]) -> Child {
    Command::new(sealvol_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sealvol")
}

/// The agent's pid, from its record in the runtime directory.
fn agent_pid(mnt: &Path) -> i32 {
    let canon = mnt.canonicalize().expect("mountpoint");
    let dir = std::env::var_os("SEALVOL_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/run/sealvol"), PathBuf::from);
    for entry in std::fs::read_dir(&dir).expect("runtime dir").flatten() {
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Ok(rec) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        if rec["mountpoint"].as_str() == canon.to_str() {
            return i32::try_from(rec["pid"].as_i64().expect("pid")).expect("pid fits");
        }
    }
    panic!("no agent record for {}", mnt.display());
}

fn check_plain_header(vol: &Path) {
    let dump = run_ok("cryptsetup", &["luksDump", "--dump-json-metadata", s(vol)]);
    let meta: serde_json::Value = serde_json::from_str(&dump).expect("luksDump json");
    assert_eq!(
        meta["digests"].as_object().map(serde_json::Map::len),
        Some(1),
        "one digest: {dump}"
    );
    assert!(
        meta["config"].get("requirements").is_none(),
        "no requirement left: {dump}"
    );
    assert!(
        !dump.contains("sealvol-rekey"),
        "no rekey token left: {dump}"
    );
    run_ok("cryptsetup", &["isLuks", s(vol)]);
}

#[test]
fn online_rekey_while_fio_verifies_in_the_foreground() {
    if !prerequisites("online_rekey_while_fio_verifies_in_the_foreground") {
        return;
    }
    let (_dir, vol, old, new, mnt) = new_volume();
    let _guard = attached(&vol, &mnt, &old);
    let disk = mnt.join("disk");
    fio_ok(
        &fio_region(&disk, "base", "0", "256M", "1M", false),
        "base write",
    );

    // Foreground: random writes then a full verify of their region, while the agent
    // rekeys the whole volume underneath.
    let fg = Command::new(which("fio").expect("fio"))
        .args([
            "--name=fg",
            &format!("--filename={}", disk.display()),
            "--rw=randwrite",
            "--bs=4k",
            "--offset=512M",
            "--size=64M",
            "--ioengine=libaio",
            "--iodepth=16",
            "--direct=1",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    // The checksum journal here; the kill -9 test below runs the full-copy journal.
    let rekey = rekey_online(&mnt, &new, "2", "checksum")
        .wait_with_output()
        .expect("rekey-volume");
    assert!(
        rekey.status.success(),
        "online rekey: {}",
        String::from_utf8_lossy(&rekey.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&rekey.stdout).expect("rekey json");
    assert_eq!(report["TotalBytes"], 1u64 << 30);
    let fg = fg.wait_with_output().expect("fio");
    assert!(
        fg.status.success(),
        "foreground fio during the rekey: {}\n{}",
        String::from_utf8_lossy(&fg.stderr),
        String::from_utf8_lossy(&fg.stdout)
    );
    assert!(
        rekey_done_bytes(&vol).is_none(),
        "no rekey left in the header"
    );

    fio_ok(
        &fio_region(&disk, "base", "0", "256M", "1M", true),
        "verify under the new key, still attached",
    );
    run_ok("sealvol", &["detach", "--mountpoint", s(&mnt)]);
    check_plain_header(&vol);

    let refused = attach(&vol, &mnt, &old, None);
    assert!(!refused.status.success(), "the old key must be refused");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("digest mismatch"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let out = attach(&vol, &mnt, &new, None);
    assert!(
        out.status.success(),
        "attach with the new key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_ok(
        &fio_region(&disk, "base", "0", "256M", "1M", true),
        "verify after re-attach",
    );
    detach(&mnt);
}

#[test]
fn kill_9_mid_rekey_then_reattach_resumes_and_finishes() {
    if !prerequisites("kill_9_mid_rekey_then_reattach_resumes_and_finishes") {
        return;
    }
    let (_dir, vol, old, new, mnt) = new_volume();
    let _guard = attached(&vol, &mnt, &old);
    let disk = mnt.join("disk");
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", false),
        "base write",
    );

    // Small hotzones so the rekey is still running when the agent dies.
    let client = rekey_online(&mnt, &new, "1", "journal");
    wait_until("the rekey to pass 64 MiB", Duration::from_secs(120), || {
        rekey_done_bytes(&vol).is_some_and(|d| d >= 64 << 20)
    });
    let pid = agent_pid(&mnt);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the agent");
    let client = client.wait_with_output().expect("rekey client");
    assert!(
        !client.status.success(),
        "the client notices the agent died"
    );
    let done = rekey_done_bytes(&vol).expect("the rekey is recorded as unfinished");
    assert!(done < 1 << 30, "{done}");
    run_ok("sealvol", &["detach", "--mountpoint", s(&mnt)]);
    wait_until("dead FUSE mount gone", Duration::from_secs(10), || {
        !is_mounted(&mnt)
    });

    // cryptsetup refuses to activate the half-converted volume.
    let dump = run_ok("cryptsetup", &["luksDump", "--dump-json-metadata", s(&vol)]);
    assert!(
        dump.contains("sealvol-rekey-v1"),
        "mandatory requirement present: {dump}"
    );

    // One key is not enough, and the error says how to resume.
    let one = attach(&vol, &mnt, &old, None);
    assert!(!one.status.success());
    let err = String::from_utf8_lossy(&one.stderr);
    assert!(
        err.contains("rekey-volume") && err.contains("--new-volume-key-file"),
        "{err}"
    );
    assert!(!is_mounted(&mnt));

    // Both keys: attach resumes in the background; the same command follows it to the end.
    let out = attach(&vol, &mnt, &old, Some(&new));
    assert!(
        out.status.success(),
        "resume attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", true),
        "verify mid-resume",
    );
    let again = rekey_online(&mnt, &new, "1", "journal")
        .wait_with_output()
        .expect("rekey-volume again");
    assert!(
        again.status.success(),
        "follow the resumed rekey: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(rekey_done_bytes(&vol).is_none(), "finished");
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", true),
        "verify after the resumed rekey",
    );
    run_ok("sealvol", &["detach", "--mountpoint", s(&mnt)]);
    check_plain_header(&vol);

    let out = attach(&vol, &mnt, &new, None);
    assert!(
        out.status.success(),
        "new key only: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", true),
        "verify under the new key",
    );
    detach(&mnt);
}

/// `rekey-volume --path --resilience checksum` (the fingerprint journal) killed with -9
/// mid-way: the header keeps the mode, the same command resumes and finishes, and fio
/// verifies every byte under the new key.
#[test]
fn offline_checksum_rekey_killed_then_resumed_by_the_same_command() {
    if !prerequisites("offline_checksum_rekey_killed_then_resumed_by_the_same_command") {
        return;
    }
    let (_dir, vol, old, new, mnt) = new_volume();
    let mount = |key: &Path| {
        let out = attach(&vol, &mnt, key, None);
        assert!(
            out.status.success(),
            "attach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let disk = mnt.join("disk");
    mount(&old);
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", false),
        "base write",
    );
    run_ok("sealvol", &["detach", "--mountpoint", s(&mnt)]);

    let rekey = || {
        spawn_sealvol(&[
            "rekey-volume",
            "--path",
            s(&vol),
            "--volume-key-file",
            s(&old),
            "--new-volume-key-file",
            s(&new),
            "--resilience",
            "checksum",
            "--hotzone-mib",
            "1",
            "--output",
            "json",
        ])
    };
    let mut first = rekey();
    wait_until("the rekey to pass 32 MiB", Duration::from_secs(120), || {
        rekey_done_bytes(&vol).is_some_and(|d| d >= 32 << 20)
    });
    first.kill().expect("kill -9 the rekey");
    let _ = first.wait();
    let dump = run_ok("cryptsetup", &["luksDump", "--dump-json-metadata", s(&vol)]);
    assert!(
        dump.contains("\"resilience\":\"checksum\"") && dump.contains("sealvol-rekey-v1"),
        "checkpoint keeps the mode and the requirement: {dump}"
    );
    let done = rekey_done_bytes(&vol).expect("unfinished after kill -9");
    assert!(done < 1 << 30, "{done}");

    let again = rekey().wait_with_output().expect("rekey-volume again");
    assert!(
        again.status.success(),
        "resume: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&again.stdout).expect("json report");
    assert_eq!(report["Resumed"], true, "{report}");
    assert!(rekey_done_bytes(&vol).is_none(), "finished");
    check_plain_header(&vol);
    mount(&new);
    fio_ok(
        &fio_region(&disk, "base", "0", "768M", "1M", true),
        "verify under the new key",
    );
    detach(&mnt);
}

/// The online rekey hands the new key to the agent over its control socket, not as a
/// path for the agent to open: a key that exists only in the client's stdin (a pipe
/// from a key service, never on disk) works. Before, the agent opened `/dev/stdin`
/// itself (its own: /dev/null) and refused a 0-byte key.
#[test]
fn online_rekey_takes_the_new_key_from_the_clients_stdin() {
    if !prerequisites("online_rekey_takes_the_new_key_from_the_clients_stdin") {
        return;
    }
    let (_dir, vol, old, new, mnt) = new_volume();
    let _guard = attached(&vol, &mnt, &old);
    let disk = mnt.join("disk");
    fio_ok(
        &fio_region(&disk, "base", "0", "64M", "1M", false),
        "base write",
    );
    let rekey = Command::new(sealvol_bin())
        .args([
            "rekey-volume",
            "--mountpoint",
            s(&mnt),
            "--new-volume-key-file",
            "/dev/stdin",
            "--output",
            "json",
        ])
        .stdin(std::fs::File::open(&new).expect("new key"))
        .output()
        .expect("rekey-volume");
    assert!(
        rekey.status.success(),
        "online rekey with the key on stdin: {}",
        String::from_utf8_lossy(&rekey.stderr)
    );
    fio_ok(
        &fio_region(&disk, "base", "0", "64M", "1M", true),
        "verify under the new key, still attached",
    );
    run_ok("sealvol", &["detach", "--mountpoint", s(&mnt)]);
    check_plain_header(&vol);
    let out = attach(&vol, &mnt, &new, None);
    assert!(
        out.status.success(),
        "attach with the new key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_ok(
        &fio_region(&disk, "base", "0", "64M", "1M", true),
        "verify after re-attach",
    );
    detach(&mnt);
}
