//! Snapshot sessions with a real agent: `sealvol attach` serves a volume through FUSE, the
//! test writes through the mount and snapshots over the agent's control socket, and the
//! dirty map the agent leaves behind on detach (clean) or on a crash (in use). Needs root
//! and /dev/fuse (CI has them).

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use sealvol::agent::SnapshotSession;
use sealvol::snapshot::CHUNK_BYTES;
use sealvol::snapshot::dirty::{Changes, DirtyMap};

fn attach(vol: &Path, mnt: &Path, key: &Path) {
    attach_encrypted(vol, mnt, key, &[]);
}

fn write_through(mnt: &Path, offset: u64, byte: u8) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("disk"))
        .expect("open disk");
    f.write_all_at(&[byte; 4096], offset).expect("write");
    f.sync_data().expect("sync");
}

fn read_file_chunk(vol: &Path, chunk: u64) -> Vec<u8> {
    let f = std::fs::File::open(vol).expect("open volume");
    let mut buf = vec![0u8; usize::try_from(CHUNK_BYTES).expect("small")];
    f.read_exact_at(&mut buf, chunk * CHUNK_BYTES)
        .expect("read volume");
    buf
}

#[test]
fn agent_serves_consistent_snapshots_and_keeps_its_dirty_map() {
    if !privileged_env("agent_serves_consistent_snapshots_and_keeps_its_dirty_map") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = dir.path().join("vol.luks");
    let key = key_file(dir.path(), "key");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    let data_offset = sealvol::volume::read_header(&vol)
        .expect("header")
        .data_offset();
    let header_chunks = data_offset.div_ceil(CHUNK_BYTES);
    let chunk_of = |at: u64| (data_offset + at) / CHUNK_BYTES;

    attach(&vol, &mnt, &key);
    let guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    assert_eq!(
        DirtyMap::load_changes(&vol).expect("changes"),
        Changes::Unknown,
        "in use while served"
    );
    write_through(&mnt, 3 << 20, 0x11);
    let written = chunk_of(3 << 20);

    // First snapshot: no base, so everything is to be compared.
    let (mut s, begun) = SnapshotSession::begin(&mnt, "disk", None).expect("begin");
    assert_eq!(begun.changed, None);
    assert_eq!(begun.chunks, begun.file_size.div_ceil(CHUNK_BYTES));
    let before = read_file_chunk(&vol, written);
    // A write during the snapshot: the session still reads the chunk as at begin.
    write_through(&mnt, 3 << 20, 0x22);
    assert_ne!(
        read_file_chunk(&vol, written),
        before,
        "the write reached the file"
    );
    let mut buf = Vec::new();
    s.read(written, &mut buf).expect("read");
    assert!(buf == before, "chunk {written} as it was at begin");
    s.end(Some("s1")).expect("commit");

    // The clean stop writes the map back, relative to s1 with the write made during it.
    write_through(&mnt, 40 << 20, 0x33);
    detach(&mnt);
    drop(guard);
    assert_eq!(
        DirtyMap::load_changes(&vol).expect("changes"),
        Changes::Since {
            base: "s1".into(),
            chunks: vec![written, chunk_of(40 << 20)]
        }
    );

    // Served again: the next snapshot relative to s1 reads only those (and the header).
    attach(&vol, &mnt, &key);
    let guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    let (s, begun) = SnapshotSession::begin(&mnt, "disk", Some("s1")).expect("begin");
    let mut expected: Vec<u64> = (0..header_chunks).collect();
    expected.extend([written, chunk_of(40 << 20)]);
    assert_eq!(begun.changed, Some(expected));
    s.end(None).expect("abort");

    // The agent is killed: the map stays in use, so nothing it says is trusted.
    let pid = sealvol::agent::live_at(&mnt).expect("agent record").pid;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    wait_until("the agent is dead", Duration::from_secs(20), || {
        sealvol::agent::live_at(&mnt).is_none()
    });
    drop(guard);
    let _ = run(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
    assert_eq!(
        DirtyMap::load_changes(&vol).expect("changes"),
        Changes::Unknown
    );
    attach(&vol, &mnt, &key);
    let _guard = AttachGuard {
        mountpoint: mnt.clone(),
    };
    let (s, begun) = SnapshotSession::begin(&mnt, "disk", Some("s1")).expect("begin");
    assert_eq!(begun.changed, None, "after a crash every chunk is compared");
    s.end(None).expect("abort");
}
