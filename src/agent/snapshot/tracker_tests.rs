//! Unit tests of the chunk tracker and its snapshot view, over real devices on volume
//! files.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::backing::FileBacking;
use crate::device::{Crypt, Geometry};
use crate::secret::VolumeKey;
use crate::xts::{SectorCipher, SectorSize};

/// The header area: one chunk.
pub(crate) const DATA_OFFSET: u64 = CHUNK_BYTES;
/// Data size: the file's last chunk is short.
pub(crate) const SIZE: u64 = 8 * CHUNK_BYTES - 64 * 1024;
/// Chunks of the volume file.
pub(crate) const CHUNKS: u64 = 9;

/// A volume file with a non-zero "header" and encrypted data of `fill` everywhere.
pub(crate) fn volume(dir: &Path, key: &VolumeKey, fill: u8) -> PathBuf {
    let path = dir.join("vol.img");
    let f = File::create(&path).expect("create");
    f.set_len(DATA_OFFSET + SIZE).expect("size");
    f.write_all_at(&[0x5a; 4096], 0).expect("header");
    drop(f);
    let d = device(&path, key);
    d.write(0, &vec![fill; usize::try_from(SIZE).expect("small")])
        .expect("fill");
    d.flush().expect("flush");
    path
}

/// An XTS device over the volume file.
pub(crate) fn device(path: &Path, key: &VolumeKey) -> Arc<Device> {
    let backing = Arc::new(FileBacking::open(path).expect("open"));
    let geo = Geometry {
        data_offset: DATA_OFFSET,
        size: SIZE,
        sector_size: SectorSize::S4096,
    };
    Arc::new(Device::new(
        backing,
        geo,
        Crypt::Xts(SectorCipher::new(key, SectorSize::S4096)),
    ))
}

/// A tracked device over the volume file.
pub(crate) fn tracked(path: &Path, key: &VolumeKey) -> (Arc<Device>, Arc<ChunkTracker>) {
    let d = device(path, key);
    let staging = path.parent().expect("dir").join("run");
    let t = ChunkTracker::attach("disk", &d, path, &staging).expect("attach");
    (d, t)
}

/// The file chunk holding data offset `at`.
fn chunk_of(at: u64) -> u64 {
    (DATA_OFFSET + at) / CHUNK_BYTES
}

fn chunk_of_file(file: &[u8], chunk: u64) -> &[u8] {
    let start = usize::try_from(chunk * CHUNK_BYTES).expect("small");
    let end = (start + usize::try_from(CHUNK_BYTES).expect("small")).min(file.len());
    &file[start..end]
}

fn set_of(v: &[u64]) -> BTreeSet<u64> {
    v.iter().copied().collect()
}

#[test]
fn view_reads_every_chunk_as_at_begin_while_writes_go_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 0xa1);
    let (d, t) = tracked(&path, &key);
    let begun = t.begin(None).expect("begin");
    assert_eq!(begun.changed, None, "no base: compare everything");
    assert_eq!(
        (begun.chunks, begun.file_size),
        (CHUNKS, DATA_OFFSET + SIZE)
    );
    let at_begin = std::fs::read(&path).expect("copy at begin");

    // Before any read: overwrite chunks 1..=4 entirely and punch a hole in 5 (these must
    // be copied aside), then keep writing everywhere while the chunks are read.
    d.write(
        0,
        &vec![0xb2; usize::try_from(4 * CHUNK_BYTES).expect("small")],
    )
    .expect("write B");
    d.discard(4 * CHUNK_BYTES, CHUNK_BYTES).expect("discard");
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3u64)
        .map(|w| {
            let (d, stop) = (d.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut written = BTreeSet::new();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) || i < 3 * 64 {
                    // Unaligned, sector-straddling writes over the whole volume.
                    let at = (i * 37 * 4096 + 100 + w * 513) % (SIZE - 9000);
                    d.write(at, &[0xc3 ^ u8::try_from(w).expect("small"); 9000])
                        .expect("write");
                    written.insert(chunk_of(at));
                    written.insert(chunk_of(at + 8999));
                    i += 3;
                }
                written
            })
        })
        .collect();
    let mut buf = Vec::new();
    for chunk in (0..CHUNKS).rev() {
        t.read(chunk, &mut buf).expect("read");
        assert!(
            buf == chunk_of_file(&at_begin, chunk),
            "chunk {chunk} differs from the volume at begin"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let mut written: BTreeSet<u64> = (1..=5).collect();
    for w in writers {
        written.extend(w.join().expect("writer"));
    }
    t.end(Some("s1")).expect("end");
    assert_eq!(t.base().as_deref(), Some("s1"));
    assert_eq!(
        set_of(&t.dirty_chunks()),
        written,
        "exactly the chunks written since begin"
    );
    assert!(
        std::fs::read_dir(dir.path().join("run"))
            .expect("runtime dir")
            .next()
            .is_none(),
        "no staging file left"
    );
}

#[test]
fn abort_keeps_the_frozen_and_the_new_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (d, t) = tracked(&path, &key);
    assert_eq!(t.base().as_deref(), Some("s0"));
    d.write(CHUNK_BYTES + 10, &[7; 100]).expect("write"); // file chunk 2
    d.discard(2 * CHUNK_BYTES, 4096).expect("discard"); // file chunk 3
    let begun = t.begin(Some("s0")).expect("begin");
    assert_eq!(
        begun.changed,
        Some(vec![0, 2, 3]),
        "the written chunks and the header's"
    );
    d.write(5 * CHUNK_BYTES, &[9; 4096])
        .expect("write after begin"); // file chunk 6
    assert_eq!(t.dirty_chunks(), vec![6]);
    t.end(None).expect("abort");
    assert_eq!(t.dirty_chunks(), vec![0, 2, 3, 6]);
    assert_eq!(t.base().as_deref(), Some("s0"), "the base is back");
    // The next view relative to s0 delivers all of them.
    assert_eq!(
        t.begin(Some("s0")).expect("begin").changed,
        Some(vec![0, 2, 3, 6])
    );
    t.end(Some("s1")).expect("commit");
    assert_eq!(t.dirty_chunks(), Vec::<u64>::new());
}

#[test]
fn another_base_compares_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (_d, t) = tracked(&path, &key);
    assert_eq!(t.begin(Some("other")).expect("begin").changed, None);
    t.end(None).expect("abort");
    assert_eq!(t.begin(None).expect("begin").changed, None);
}

#[test]
fn one_view_at_a_time_and_each_frozen_chunk_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    let (_d, t) = tracked(&path, &key);
    let mut buf = Vec::new();
    assert!(matches!(t.read(0, &mut buf), Err(ViewError::NotRunning(_))));
    t.begin(None).expect("begin");
    let second = t.begin(None).expect_err("second begin");
    assert_eq!(
        second.to_string(),
        "a snapshot of disk is already running; wait for it to finish"
    );
    t.read(CHUNKS - 1, &mut buf).expect("last chunk");
    assert_eq!(
        buf.len() as u64,
        CHUNK_BYTES - 64 * 1024,
        "the last chunk is short"
    );
    assert!(matches!(
        t.read(CHUNKS - 1, &mut buf),
        Err(ViewError::AlreadyDelivered { .. })
    ));
    assert!(matches!(
        t.read(CHUNKS, &mut buf),
        Err(ViewError::NoSuchChunk { .. })
    ));
    t.end(None).expect("end");
    assert!(matches!(t.end(None), Err(ViewError::NotRunning(_))));
}

#[test]
fn crash_leaves_the_map_untrusted_and_a_clean_stop_vouches_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    {
        let (d, _t) = tracked(&path, &key);
        assert_eq!(
            DirtyMap::load_changes(&path).expect("changes"),
            Changes::Unknown,
            "in use while served"
        );
        d.write(0, &[1; 4096]).expect("write");
        // The agent dies: no close.
    }
    assert_eq!(
        DirtyMap::load_changes(&path).expect("changes"),
        Changes::Unknown
    );
    let (d, t) = tracked(&path, &key);
    assert_eq!(t.begin(Some("s0")).expect("begin").changed, None);
    t.end(Some("s1")).expect("commit");
    d.write(3 * CHUNK_BYTES, &[1; 4096]).expect("write");
    t.close().expect("close");
    assert_eq!(
        DirtyMap::load_changes(&path).expect("changes"),
        Changes::Since {
            base: "s1".into(),
            chunks: vec![4]
        }
    );
    assert!(matches!(t.begin(None), Err(ViewError::Closed(_))));
}

#[test]
fn close_aborts_a_running_view_without_losing_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (d, t) = tracked(&path, &key);
    d.write(0, &[1; 4096]).expect("write");
    t.begin(Some("s0")).expect("begin");
    t.close().expect("close");
    assert_eq!(
        DirtyMap::load_changes(&path).expect("changes"),
        Changes::Since {
            base: "s0".into(),
            chunks: vec![0, 1]
        }
    );
}

#[test]
fn rekey_and_view_exclude_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (d, t) = tracked(&path, &key);
    let new = || SectorCipher::new(&VolumeKey::generate(), SectorSize::S4096);
    t.begin(Some("s0")).expect("begin");
    assert!(matches!(
        d.begin_rekey(new()),
        Err(crate::device::CryptStateError::SnapshotRunning)
    ));
    t.end(None).expect("end");
    d.begin_rekey(new()).expect("rekey");
    assert!(matches!(t.begin(Some("s0")), Err(ViewError::Rekeying(_))));
    d.finish_rekey().expect("finish");
    assert_eq!(
        t.begin(Some("s0")).expect("begin").changed,
        None,
        "a rekey rewrote every chunk"
    );
}

#[test]
fn a_chunk_that_is_not_frozen_reads_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (d, t) = tracked(&path, &key);
    assert_eq!(t.begin(Some("s0")).expect("begin").changed, Some(vec![0]));
    d.write(2 * CHUNK_BYTES, &[9; 4096]).expect("write"); // file chunk 3, not frozen
    let now = std::fs::read(&path).expect("file now");
    let mut buf = Vec::new();
    t.read(3, &mut buf).expect("read");
    assert!(buf == chunk_of_file(&now, 3), "live contents");
    t.read(3, &mut buf)
        .expect("again: not frozen, so not delivered");
    t.end(None).expect("end");
}

/// Begin while writes are in flight: whatever the view delivers, every chunk it differs
/// from the file in afterwards is one the tracker holds (no change falls between the
/// snapshot and the next one).
#[test]
fn begin_under_load_misses_no_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 1);
    let (d, t) = tracked(&path, &key);
    for round in 0..5u8 {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let writers: Vec<_> = (0..3u64)
            .map(|w| {
                let (d, stop, done) = (d.clone(), stop.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let at = (i * 7919 * 512) % (SIZE - 4096);
                        let byte = u8::try_from((i + u64::from(round)) % 251).expect("small");
                        if i % 5 == 0 {
                            d.discard(at / 4096 * 4096, 4096).expect("discard");
                        } else {
                            d.write(at, &[byte; 4096]).expect("write");
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                        i += 3;
                    }
                })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.load(Ordering::Relaxed) < 50 {
            assert!(std::time::Instant::now() < deadline, "writers stalled");
            std::thread::yield_now();
        }
        t.begin(None).expect("begin");
        let mut view = Vec::new();
        let mut buf = Vec::new();
        for chunk in 0..CHUNKS {
            t.read(chunk, &mut buf).expect("read");
            view.push(buf.clone());
        }
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().expect("writer");
        }
        t.end(Some("s")).expect("end");
        let now = std::fs::read(&path).expect("file now");
        let dirty = set_of(&t.dirty_chunks());
        for (chunk, v) in (0..CHUNKS).zip(&view) {
            assert!(
                dirty.contains(&chunk) || v.as_slice() == chunk_of_file(&now, chunk),
                "round {round}: chunk {chunk} changed after begin but is not tracked"
            );
        }
    }
}
