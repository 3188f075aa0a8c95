//! The asynchronous path against the synchronous one on a real `--cache none` file.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use parking_lot::lock_api::RawRwLock as _;

use super::*;
use crate::backing::{Backing, FileBacking};
use crate::device::{Crypt, Geometry, WriteObserver};
use crate::secret::VolumeKey;
use crate::xts::{SectorCipher, SectorSize};

const SIZE: u64 = 4 << 20;
const DATA_OFFSET: u64 = 64 * 1024;

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    device: Arc<Device>,
    path_async: AsyncDevice,
}

fn setup(cache: CacheMode) -> Option<Setup> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol");
    let b = FileBacking::create(&path, false).expect("create");
    b.set_size(DATA_OFFSET + SIZE).expect("size");
    b.set_cache(cache).expect("O_DIRECT on the test filesystem");
    let geo = Geometry {
        data_offset: DATA_OFFSET,
        size: SIZE,
        sector_size: SectorSize::S4096,
    };
    let crypt = Crypt::Xts(SectorCipher::new(&VolumeKey::generate(), SectorSize::S4096));
    let device = Arc::new(Device::new(Arc::new(b), geo, crypt));
    let engine = Arc::new(IoEngine::new(16).expect("io_uring"));
    let path_async = AsyncDevice::new(Arc::clone(&device), engine)?;
    Some(Setup {
        _dir: dir,
        path,
        device,
        path_async,
    })
}

fn block(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            // Wraps on purpose: a pattern.
            #[allow(clippy::cast_possible_truncation)]
            let v = (i as u8).wrapping_mul(7) ^ seed;
            v
        })
        .collect()
}

#[test]
fn only_direct_files_and_aligned_requests_take_the_path() {
    assert!(
        setup(CacheMode::Writeback).is_none(),
        "--cache writeback stays synchronous"
    );
    let s = setup(CacheMode::None).expect("--cache none has the path");
    let a = &s.path_async;
    assert!(a.admits(0, 4096) && a.admits(SIZE - 8192, 8192));
    assert!(!a.admits(512, 4096), "unaligned offset");
    assert!(!a.admits(0, 1000), "partial sector");
    assert!(!a.admits(0, 0), "empty");
    assert!(!a.admits(SIZE - 4096, 8192), "past the end");
}

#[test]
fn async_and_sync_paths_read_each_others_writes() {
    let s = setup(CacheMode::None).expect("path");
    let (tx, rx) = mpsc::channel();
    for i in 0..64u8 {
        let tx = tx.clone();
        s.path_async
            .write(u64::from(i) * 8192, &block(i, 8192), move |r| {
                tx.send(r.map(|()| Vec::new())).expect("receiver");
            });
    }
    for _ in 0..64 {
        rx.recv().expect("callback").expect("async write");
    }
    let mut back = vec![0u8; 8192];
    for i in 0..64u8 {
        s.device
            .read(u64::from(i) * 8192, &mut back)
            .expect("sync read");
        assert_eq!(back, block(i, 8192), "block {i} through the sync path");
    }
    s.device.write(4096, &block(200, 4096)).expect("sync write");
    s.device.write(12288, &[0u8; 4096]).expect("a hole");
    for (at, want) in [(4096, block(200, 4096)), (12288, vec![0u8; 4096])] {
        let tx = tx.clone();
        s.path_async.read(at, 4096, move |r| {
            tx.send(r.map(|b| b.to_vec())).expect("receiver");
        });
        assert_eq!(rx.recv().expect("callback").expect("async read"), want);
    }
    // The ciphertext on disk is not the plaintext, and a zero sector is a hole.
    let raw = std::fs::read(&s.path).expect("read file");
    let at = usize::try_from(DATA_OFFSET).expect("small");
    assert_ne!(&raw[at..at + 8192], &block(0, 8192)[..]);
    assert!(raw[at + 12288..at + 16384].iter().all(|&b| b == 0));
}

#[derive(Default)]
struct Seen(Mutex<Vec<Range<u64>>>);

impl WriteObserver for Seen {
    fn before_write(&self, range: Range<u64>) {
        self.0.lock().expect("test lock").push(range);
    }
    fn before_rekey(&self) -> bool {
        true
    }
    fn after_rekey(&self) {}
}

#[test]
fn async_writes_are_observed_and_hold_the_range_until_complete() {
    let s = setup(CacheMode::None).expect("path");
    let seen = Arc::new(Seen::default());
    s.device
        .observe_writes(seen.clone())
        .map_err(|_| "observer")
        .expect("first observer");
    let (tx, rx) = mpsc::channel();
    let dev = Arc::clone(&s.device);
    s.path_async.write(65536, &block(3, 65536), move |r| {
        // The completion runs with the range still locked: a reader would wait.
        let free = dev.stripes[1].try_lock_shared();
        if free {
            // SAFETY: just taken above.
            unsafe { dev.stripes[1].unlock_shared() };
        }
        tx.send((r.is_ok(), free)).expect("receiver");
    });
    let (ok, free) = rx.recv().expect("callback");
    assert!(ok, "write");
    assert!(!free, "the write lock is held until the I/O completed");
    assert_eq!(
        *seen.0.lock().expect("test lock"),
        vec![DATA_OFFSET + 65536..DATA_OFFSET + 131_072]
    );
    // Released afterwards.
    drop(s.device.lock_write(&(65536..131_072)));
}

#[test]
fn overlapping_async_writes_and_discards_keep_their_order() {
    let s = setup(CacheMode::None).expect("path");
    let (tx, rx) = mpsc::channel();
    for round in 0..20u8 {
        let tx = tx.clone();
        s.path_async.write(0, &block(round, 16384), move |r| {
            tx.send(r.is_ok()).expect("receiver");
        });
        if round % 5 == 4 {
            // Waits for the write above (its range lock), then punches.
            s.device.discard(0, 16384).expect("discard");
        }
    }
    for _ in 0..20 {
        assert!(rx.recv().expect("callback"), "write");
    }
    let mut back = vec![1u8; 16384];
    s.device.read(0, &mut back).expect("read");
    assert!(back.iter().all(|&b| b == 0), "the last discard came last");
    s.path_async.write(0, &block(77, 16384), move |r| {
        tx.send(r.is_ok()).expect("receiver");
    });
    assert!(rx.recv().expect("callback"));
    s.device.read(0, &mut back).expect("read");
    assert_eq!(back, block(77, 16384));
}
