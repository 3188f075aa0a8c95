//! Real mounts: a volume attached through FUSE, ext4 on a loop device over it, fio verify,
//! and refusal of a wrong key. Needs root, /dev/fuse and loop devices (CI has them).

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

fn attach(vol: &Path, mnt: &Path, key: Option<&Path>) -> std::process::Output {
    let mut args = vec![
        "attach",
        "--path",
        vol.to_str().expect("utf8"),
        "--mountpoint",
        mnt.to_str().expect("utf8"),
    ];
    match key {
        Some(k) => args.extend(["--volume-key-file", k.to_str().expect("utf8")]),
        None => args.push("--unencrypted"),
    }
    run("sealvol", &args)
}

#[test]
fn ext4_on_loop_survives_detach_and_reattach() {
    if !privileged_env("ext4_on_loop_survives_detach_and_reattach") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    let fsdir = dir.path().join("fs");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    // Never overwrites without --force.
    let again = run(
        "sealvol",
        &[
            "create-volume",
            "--path",
            vol.to_str().expect("utf8"),
            "--size-gib",
            "1",
            "--volume-key-file",
            key.to_str().expect("utf8"),
        ],
    );
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let out = attach(&vol, &mnt, Some(&key));
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    let disk = mnt.join("disk");
    assert_eq!(std::fs::metadata(&disk).expect("disk").len(), 1 << 30);

    let lm = LoopMount::new(&disk, &fsdir, true);
    let payload: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    std::fs::write(fsdir.join("payload.bin"), &payload).expect("write payload");
    std::fs::create_dir(fsdir.join("docs")).expect("mkdir");
    std::fs::write(fsdir.join("docs/hello.txt"), "hello, sealvol\n").expect("write");
    lm.unmount();
    run_ok(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
    assert!(!is_mounted(&mnt), "detach unmounted FUSE");

    // The plaintext is nowhere in the backing file.
    let raw = std::fs::read(&vol).expect("read volume");
    assert!(
        !raw.windows(14).any(|w| w == b"hello, sealvol"),
        "plaintext leaked to disk"
    );

    let out = attach(&vol, &mnt, Some(&key));
    assert!(
        out.status.success(),
        "re-attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lm = LoopMount::new(&disk, &fsdir, false);
    assert_eq!(
        std::fs::read(fsdir.join("payload.bin")).expect("read payload"),
        payload
    );
    assert_eq!(
        std::fs::read_to_string(fsdir.join("docs/hello.txt")).expect("read"),
        "hello, sealvol\n"
    );
    lm.unmount();
    detach(&mnt);
}

#[test]
fn detach_releases_loop_and_filesystem_first() {
    if !privileged_env("detach_releases_loop_and_filesystem_first") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("plain.img");
    let mnt = dir.path().join("mnt");
    let fsdir = dir.path().join("fs");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, None, "1");
    let out = attach(&vol, &mnt, None);
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    let lm = LoopMount::new(&mnt.join("disk"), &fsdir, true);
    std::fs::write(fsdir.join("f"), "data").expect("write");
    let dev = lm.dev.clone();
    std::mem::forget(lm);
    // detach does the whole order itself: filesystem, loop, FUSE.
    run_ok(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
    assert!(!is_mounted(&fsdir) && !is_mounted(&mnt));
    let loops = run_ok("losetup", &["-l", "-n", "-O", "NAME"]);
    assert!(
        !loops.lines().any(|l| l.trim() == dev),
        "loop {dev} still attached"
    );

    // A loop device someone still holds open (udev's probe, blkid) is only marked for
    // release by `losetup -d` and keeps the file busy until it is closed: detach waits
    // for it instead of failing the FUSE unmount with EBUSY.
    let out = attach(&vol, &mnt, None);
    assert!(
        out.status.success(),
        "attach again: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lm = LoopMount::new(&mnt.join("disk"), &fsdir, false);
    run_ok("umount", &[fsdir.to_str().expect("utf8")]);
    let holder = std::fs::File::open(&lm.dev).expect("open the loop device");
    run_ok("losetup", &["-d", &lm.dev]);
    std::mem::forget(lm);
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        drop(holder);
    });
    run_ok(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
    release.join().expect("holder thread");
    assert!(!is_mounted(&mnt));
}

#[test]
fn wrong_key_is_refused_and_nothing_is_mounted() {
    if !privileged_env("wrong_key_is_refused_and_nothing_is_mounted") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let wrong = key_file(dir.path(), "wrong");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    let before = std::fs::read(&vol).expect("read");
    let out = attach(&vol, &mnt, Some(&wrong));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("digest mismatch"), "clear error: {err}");
    assert!(!is_mounted(&mnt));
    assert_eq!(
        std::fs::read(&vol).expect("read"),
        before,
        "nothing changed"
    );
    // A LUKS volume is never served as plaintext.
    let out = attach(&vol, &mnt, None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is a LUKS2 volume"));
    assert!(!is_mounted(&mnt));
}

#[test]
fn fio_crc32c_verify_through_fuse() {
    if !privileged_env("fio_crc32c_verify_through_fuse") {
        return;
    }
    if !tool_or_skip("fio_crc32c_verify_through_fuse", "fio") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    let out = attach(&vol, &mnt, Some(&key));
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    let disk = mnt.join("disk");
    fio_verify(&disk, "rand4k", "randwrite", "4k", "16");
    fio_verify(&disk, "seq1m", "write", "1M", "4");
    run_ok(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
}
