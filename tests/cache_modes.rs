//! `--cache none|writeback` on real mounts: fio verify through FUSE in both modes, the
//! host page cache left empty by `none` (and filled by `writeback`), partial-sector
//! writes on 512- and 4096-byte-sector volumes, sparse and fully allocated files, data
//! written in one mode read back in the other. Needs root and /dev/fuse (CI has them).

mod common;

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

fn attach(vol: &Path, mnt: &Path, key: &Path, cache: &str) {
    attach_encrypted(vol, mnt, key, &["--cache", cache]);
}

/// Drops the host page cache of `file` (clean pages only; the file is fsync'ed).
fn drop_page_cache(file: &Path) {
    let f = std::fs::File::open(file).expect("open backing");
    f.sync_all().expect("fsync backing");
    // SAFETY: a valid descriptor; posix_fadvise only advises the kernel.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(rc, 0, "posix_fadvise");
}

/// Bytes of `file` in the host page cache (`fincore`).
fn cached_bytes(file: &Path) -> u64 {
    let out = run_ok(
        "fincore",
        &[
            "--bytes",
            "--noheadings",
            "--output",
            "RES",
            file.to_str().expect("utf8"),
        ],
    );
    out.trim().parse().expect("fincore prints a byte count")
}

#[test]
fn fio_verify_in_both_cache_modes_and_none_bypasses_the_host_cache() {
    let test = "fio_verify_in_both_cache_modes_and_none_bypasses_the_host_cache";
    if !privileged_env(test) {
        return;
    }
    if !tool_or_skip(test, "fio") || !tool_or_skip(test, "fincore") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    for cache in ["none", "writeback"] {
        drop_page_cache(&vol);
        attach(&vol, &mnt, &key, cache);
        let guard = AttachGuard {
            mountpoint: mnt.clone(),
        };
        let disk = mnt.join("disk");
        fio_verify(&disk, &format!("rand4k-{cache}"), "randwrite", "4k", "16");
        fio_verify(&disk, &format!("seq1m-{cache}"), "write", "1M", "4");
        let cached = cached_bytes(&vol);
        detach(&mnt);
        drop(guard);
        if cache == "none" {
            // The header is read buffered at open; 64 MiB of data went past the cache.
            assert!(
                cached < 4 << 20,
                "--cache none left {cached} bytes of the volume file in the host page cache"
            );
        } else {
            assert!(
                cached >= 32 << 20,
                "--cache writeback should go through the host page cache, found {cached} bytes"
            );
        }
    }
}

/// A model of the first `LEN` bytes of the volume, written with unaligned pwrites
/// through the FUSE file and read back after every step and across re-attach in the
/// other cache mode.
fn partial_writes(sector_size: &str, allocated: bool) {
    const LEN: usize = 256 * 1024;
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume_with(&vol, Some(&key), "1", &["--sector-size", sector_size]);
    if allocated {
        // Every block allocated (unwritten extents read as zeros: still "never written").
        let len = std::fs::metadata(&vol).expect("stat").len();
        run_ok(
            "fallocate",
            &["-l", &len.to_string(), vol.to_str().expect("utf8")],
        );
    }
    let mut model = vec![0u8; LEN];
    let writes: [(usize, usize, u8); 7] = [
        (777, 1000, 0x11),     // inside one 4 KiB block, crossing 512-byte sectors
        (4095, 3, 0x22),       // across a 4 KiB boundary
        (512 * 3, 8192, 0x33), // 512-aligned, not 4096-aligned
        (8192, 4096, 0x44),    // exactly one 4 KiB sector
        (65536 - 100, 200, 0x55),
        (100_000, 70_000, 0x66), // large and unaligned at both ends
        (8192 + 10, 1, 0),       // a zero byte inside written data
    ];
    for (i, cache) in ["none", "writeback", "none"].iter().enumerate() {
        attach(&vol, &mnt, &key, cache);
        let guard = AttachGuard {
            mountpoint: mnt.clone(),
        };
        let disk = OpenOptions::new()
            .read(true)
            .write(true)
            .open(mnt.join("disk"))
            .expect("open FUSE file");
        let mut back = vec![0u8; LEN];
        disk.read_exact_at(&mut back, 0).expect("read back");
        assert!(
            back == model,
            "{sector_size}-byte sectors, allocated={allocated}: attach #{i} ({cache}) reads what was written before"
        );
        for &(off, len, byte) in &writes {
            let fill = byte.wrapping_add(u8::try_from(i).expect("small"));
            let data = vec![fill; len];
            disk.write_all_at(&data, off as u64).expect("pwrite");
            model[off..off + len].copy_from_slice(&data);
            let mut span = vec![0u8; len + 2048];
            let start = off.saturating_sub(1024);
            disk.read_exact_at(&mut span[..len + 2048], start as u64)
                .expect("read around the write");
            assert!(
                span[..] == model[start..start + len + 2048],
                "{sector_size}-byte sectors, {cache}: read after the write of {len} at {off}"
            );
        }
        disk.sync_all().expect("fsync");
        drop(disk);
        detach(&mnt);
        drop(guard);
    }
}

#[test]
fn partial_sector_writes_on_sparse_and_allocated_volumes() {
    if !privileged_env("partial_sector_writes_on_sparse_and_allocated_volumes") {
        return;
    }
    for sector in ["512", "4096"] {
        for allocated in [false, true] {
            partial_writes(sector, allocated);
        }
    }
}

#[test]
fn an_unknown_cache_mode_is_refused_before_anything_is_mounted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(
        "sealvol",
        &[
            "attach",
            "--path",
            dir.path().join("v").to_str().expect("utf8"),
            "--mountpoint",
            dir.path().to_str().expect("utf8"),
            "--unencrypted",
            "--cache",
            "directsync",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("writeback") && err.contains("none"),
        "the error names the modes: {err}"
    );
}
