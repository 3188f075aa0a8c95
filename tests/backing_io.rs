//! `SEALVOL_BACKING_IO=uring` on real mounts (encrypted volumes, `--cache none`): fio
//! verify through FUSE, partial-sector writes beside asynchronous ones, and concurrent
//! overlapping writes with fsyncs that lose nothing across detach and re-attach; the
//! agent is checked to really run the io_uring thread (and not to without the switch).
//! Needs root and /dev/fuse (CI has them).

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Barrier};

use common::*;

/// `sealvol attach` with `SEALVOL_BACKING_IO=mode` (`None`: unset), `--cache cache`.
fn attach(vol: &Path, mnt: &Path, key: &Path, mode: Option<&str>, cache: &str) {
    let mut cmd = attach_command(vol, mnt, key, &["--cache", cache]);
    match mode {
        Some(m) => cmd.env("SEALVOL_BACKING_IO", m),
        None => cmd.env_remove("SEALVOL_BACKING_IO"),
    };
    let out = cmd.output().expect("spawn sealvol attach");
    assert!(
        out.status.success(),
        "attach ({mode:?}, {cache}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether the agent serving `mnt` runs the io_uring owner thread.
fn agent_runs_io_uring(mnt: &Path) -> bool {
    let mnt = mnt.canonicalize().expect("mountpoint");
    let needle = mnt.to_str().expect("utf8").as_bytes().to_vec();
    let agents: Vec<_> = std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|p| {
            let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
            cmd.starts_with(common::sealvol_bin().to_str().expect("utf8").as_bytes())
                && cmd.split(|&b| b == 0).any(|arg| arg == needle.as_slice())
                && cmd.split(|&b| b == 0).any(|arg| arg == b"attach")
        })
        .collect();
    assert!(!agents.is_empty(), "no agent serving {}", mnt.display());
    agents.iter().any(|p| {
        std::fs::read_dir(p.path().join("task"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "io-uring")
            })
    })
}

struct Volume {
    _dir: tempfile::TempDir,
    vol: std::path::PathBuf,
    key: std::path::PathBuf,
    mnt: std::path::PathBuf,
}

fn volume(sector_size: &str) -> Volume {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume_with(&vol, Some(&key), "1", &["--sector-size", sector_size]);
    Volume {
        _dir: dir,
        vol,
        key,
        mnt,
    }
}

#[test]
fn fio_verify_through_io_uring() {
    let test = "fio_verify_through_io_uring";
    if !privileged_env(test) || !tool_or_skip(test, "fio") {
        return;
    }
    let v = volume("4096");
    attach(&v.vol, &v.mnt, &v.key, Some("uring"), "none");
    let guard = AttachGuard {
        mountpoint: v.mnt.clone(),
    };
    assert!(agent_runs_io_uring(&v.mnt), "uring: the engine runs");
    let disk = v.mnt.join("disk");
    fio_verify(&disk, "uring-rand4k", "randwrite", "4k", "16");
    fio_verify(&disk, "uring-seq1m", "write", "1M", "4");
    fio_verify(&disk, "uring-rand64k", "randwrite", "64k", "32");
    detach(&v.mnt);
    drop(guard);
    // Without the switch the agent stays synchronous, and reads what uring wrote.
    attach(&v.vol, &v.mnt, &v.key, None, "none");
    let guard = AttachGuard {
        mountpoint: v.mnt.clone(),
    };
    assert!(!agent_runs_io_uring(&v.mnt), "sync by default");
    detach(&v.mnt);
    drop(guard);
    // `auto` takes io_uring for a --cache none volume, not for writeback.
    for (cache, uring) in [("none", true), ("writeback", false)] {
        attach(&v.vol, &v.mnt, &v.key, Some("auto"), cache);
        let guard = AttachGuard {
            mountpoint: v.mnt.clone(),
        };
        assert_eq!(
            agent_runs_io_uring(&v.mnt),
            uring,
            "auto with --cache {cache}"
        );
        detach(&v.mnt);
        drop(guard);
    }
}

#[test]
fn an_unknown_backing_io_mode_is_refused() {
    if !privileged_env("an_unknown_backing_io_mode_is_refused") {
        return;
    }
    let v = volume("4096");
    let out = std::process::Command::new(sealvol_bin())
        .args([
            "attach",
            "--path",
            v.vol.to_str().expect("utf8"),
            "--mountpoint",
            v.mnt.to_str().expect("utf8"),
            "--volume-key-file",
            v.key.to_str().expect("utf8"),
        ])
        .env("SEALVOL_BACKING_IO", "aio")
        .output()
        .expect("spawn");
    let _guard = AttachGuard {
        mountpoint: v.mnt.clone(),
    };
    assert!(!out.status.success(), "aio is no mode");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SEALVOL_BACKING_IO"), "{err}");
    assert!(!is_mounted(&v.mnt));
}

/// Unaligned writes (synchronous read-modify-write) beside aligned ones (io_uring) on
/// one volume, read back after each write and across re-attach without the switch.
#[test]
fn partial_sector_writes_beside_asynchronous_ones() {
    if !privileged_env("partial_sector_writes_beside_asynchronous_ones") {
        return;
    }
    const LEN: usize = 512 * 1024;
    for sector in ["512", "4096"] {
        let v = volume(sector);
        let mut model = vec![0u8; LEN];
        let writes: [(usize, usize, u8); 8] = [
            (0, 65536, 0x10),      // aligned: asynchronous
            (777, 1000, 0x11),     // inside one block
            (4095, 3, 0x22),       // across a 4 KiB boundary
            (512 * 3, 8192, 0x33), // 512-aligned, not 4096-aligned
            (8192, 4096, 0x44),    // one aligned block over partial neighbours
            (100_000, 70_000, 0x66),
            (131_072, 131_072, 0x77), // aligned, overwriting part of the previous
            (8192 + 10, 1, 0),
        ];
        for (i, mode) in [Some("uring"), None].into_iter().enumerate() {
            attach(&v.vol, &v.mnt, &v.key, mode, "none");
            let guard = AttachGuard {
                mountpoint: v.mnt.clone(),
            };
            let disk = OpenOptions::new()
                .read(true)
                .write(true)
                .open(v.mnt.join("disk"))
                .expect("open FUSE file");
            let mut back = vec![0u8; LEN];
            disk.read_exact_at(&mut back, 0).expect("read back");
            assert!(
                back == model,
                "{sector}: attach #{i} reads what was written"
            );
            for &(off, len, byte) in &writes {
                let fill = byte.wrapping_add(u8::try_from(i).expect("small"));
                let data = vec![fill; len];
                disk.write_all_at(&data, off as u64).expect("pwrite");
                model[off..off + len].copy_from_slice(&data);
                disk.read_exact_at(&mut back, 0).expect("read");
                assert!(
                    back == model,
                    "{sector}-byte sectors, {mode:?}: after the write of {len} at {off}"
                );
            }
            disk.sync_all().expect("fsync");
            drop(disk);
            detach(&v.mnt);
            drop(guard);
        }
    }
}

/// The bytes every write of round `round` puts at `offset` (4 KiB-aligned blocks).
fn fill(round: u32, block: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(16).enumerate() {
        let tag = (u64::from(round) << 40) | ((block + (i as u64 * 16) / 4096) << 8) | 0xA5;
        chunk.copy_from_slice(&[tag.to_le_bytes(), (!tag).to_le_bytes()].concat()[..chunk.len()]);
    }
}

/// Concurrent overlapping writes from several threads, with fsyncs between them: in each
/// round every thread writes the round's bytes over random overlapping ranges (so the
/// outcome is known whatever the order), and a barrier separates rounds; each write is
/// read back as soon as it is replied (a reply before the write landed shows), and a
/// write lost shows in the bytes read back after detach and re-attach.
#[test]
fn concurrent_overlapping_writes_and_fsyncs_lose_nothing() {
    if !privileged_env("concurrent_overlapping_writes_and_fsyncs_lose_nothing") {
        return;
    }
    const REGION: u64 = 4 << 20; // 1024 blocks of 4 KiB, 64 stripes
    const THREADS: usize = 6;
    const ROUNDS: u32 = 8;
    let v = volume("4096");
    attach(&v.vol, &v.mnt, &v.key, Some("uring"), "none");
    let guard = AttachGuard {
        mountpoint: v.mnt.clone(),
    };
    assert!(agent_runs_io_uring(&v.mnt));
    let disk = Arc::new(
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(v.mnt.join("disk"))
            .expect("open FUSE file"),
    );
    // Which round last wrote each block: rounds are ordered by the barrier.
    let last = Arc::new(std::sync::Mutex::new(vec![None::<u32>; 1024]));
    let barrier = Arc::new(Barrier::new(THREADS));
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (disk, last, barrier) =
                (Arc::clone(&disk), Arc::clone(&last), Arc::clone(&barrier));
            s.spawn(move || {
                let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                let mut next = move || {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state
                };
                for round in 0..ROUNDS {
                    for w in 0..24 {
                        let blocks = 1 + next() % 48;
                        let first = next() % (REGION / 4096 - blocks);
                        let mut buf = vec![0u8; usize::try_from(blocks * 4096).expect("small")];
                        fill(round, first, &mut buf);
                        disk.write_all_at(&buf, first * 4096).expect("pwrite");
                        // Replied means done: only this round's bytes can be there now.
                        let mut back = vec![0u8; buf.len()];
                        disk.read_exact_at(&mut back, first * 4096).expect("pread");
                        assert!(
                            back == buf,
                            "round {round}: read after the write at block {first}"
                        );
                        {
                            let mut last = last.lock().expect("test lock");
                            for b in first..first + blocks {
                                last[usize::try_from(b).expect("small")] = Some(round);
                            }
                        }
                        if (w + t) % 8 == 0 {
                            disk.sync_data().expect("fdatasync through FUSE");
                        }
                    }
                    barrier.wait();
                }
            });
        }
    });
    disk.sync_all().expect("fsync");
    let check = |what: &str| {
        let disk = OpenOptions::new()
            .read(true)
            .open(v.mnt.join("disk"))
            .expect("open FUSE file");
        let mut got = vec![0u8; 4096];
        let mut want = vec![0u8; 4096];
        let last = last.lock().expect("test lock");
        for (b, round) in last.iter().enumerate() {
            disk.read_exact_at(&mut got, b as u64 * 4096).expect("read");
            match round {
                Some(r) => fill(*r, b as u64, &mut want),
                None => want.fill(0),
            }
            assert!(
                got == want,
                "{what}: block {b} (last written in round {round:?})"
            );
        }
    };
    check("while attached");
    drop(disk);
    detach(&v.mnt);
    drop(guard);
    attach(&v.vol, &v.mnt, &v.key, None, "none");
    let guard = AttachGuard {
        mountpoint: v.mnt.clone(),
    };
    check("after detach and re-attach (synchronous)");
    detach(&v.mnt);
    drop(guard);
}
