//! The changed-chunk tracker of one served volume and its snapshot view.
//!
//! The tracker is the device's [`WriteObserver`]: every write or punch sets the bits of
//! the [`CHUNK_BYTES`] chunks of the volume *file* it touches (one atomic load, and an
//! atomic OR the first time a chunk is dirtied; no lock). The bits are relative to a
//! base snapshot; a tracker that cannot vouch for its bits (untrusted map at attach, a
//! rekey) has no base.
//!
//! A snapshot view ([`ChunkTracker::begin`] … [`ChunkTracker::end`]) freezes the set of
//! chunks to read and keeps each of them readable as it was at `begin` while I/O goes on:
//! the first write to a frozen chunk that has not been read yet copies the chunk's
//! ciphertext aside into a sparse staging file (in the runtime directory, unlinked at
//! creation, so it never outlives the view, even after a crash) before it proceeds.
//!
//! Locking: writers hold their stripe locks and take the state mutex only for a frozen
//! chunk not yet read or copied (the `pending` bits). `begin` takes every stripe lock
//! (draining in-flight writes) and then the mutex; readers take the mutex only. While a
//! view is active a rekey is refused (it rewrites chunks outside the stripe locks), and a
//! view is refused while a rekey runs.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::backing::{Backing, BackingError};
use crate::device::{Device, WriteObserver};
use crate::snapshot::CHUNK_BYTES;
use crate::snapshot::dirty::{Changes, DirtyError, DirtyMap, VolumeStamp, chunk_count, words_for};

use super::Begun;

/// Errors of change tracking and snapshot views.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// A second view of the same export.
    #[error("a snapshot of {0} is already running; wait for it to finish")]
    AlreadyRunning(String),
    /// No view to read from or end.
    #[error("no snapshot of {0} is running (it was ended, or aborted when its connection dropped)")]
    NotRunning(String),
    /// A rekey rewrites every chunk: no view meanwhile.
    #[error("a rekey of {0} is in progress; snapshot it once the rekey has finished")]
    Rekeying(String),
    /// The agent is stopping (or the device is gone).
    #[error("{0} is no longer served (the agent is stopping)")]
    Closed(String),
    /// A chunk index past the end of the volume file.
    #[error("chunk {chunk} is past the end of {export} ({chunks} chunks)")]
    NoSuchChunk {
        /// The export.
        export: String,
        /// The chunk asked for.
        chunk: u64,
        /// How many the file has.
        chunks: u64,
    },
    /// A frozen chunk read twice: its frozen contents are no longer kept.
    #[error("chunk {chunk} of {export} was already read in this snapshot; read each chunk once")]
    AlreadyDelivered {
        /// The export.
        export: String,
        /// The chunk.
        chunk: u64,
    },
    /// Copying a chunk aside before a write failed: the view cannot be consistent.
    #[error("snapshot of {export} aborted: {why}")]
    CopyFailed {
        /// The export.
        export: String,
        /// What failed.
        why: String,
    },
    /// The staging file cannot be created or read.
    #[error("snapshot staging file in {dir}: {source} (is the runtime directory writable?)")]
    Staging {
        /// The directory.
        dir: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Reading the volume failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The persisted map cannot be written.
    #[error(transparent)]
    Map(#[from] DirtyError),
    /// The device already reports its writes to another tracker.
    #[error("{0} is already tracked")]
    AlreadyTracked(String),
}

/// What a tracker is, under its mutex.
#[derive(Debug)]
struct State {
    /// The snapshot the dirty bits are relative to; `None`: every chunk may differ.
    base: Option<String>,
    /// A rekey runs (no view meanwhile).
    rekeying: bool,
    /// The active view.
    view: Option<View>,
    /// The agent stopped serving: no more views, the map is written.
    closed: bool,
}

/// A snapshot view: what `begin` froze and what was copied aside since.
#[derive(Debug)]
struct View {
    /// Chunks to deliver as of `begin`.
    frozen: Vec<u64>,
    /// Frozen chunks whose contents at `begin` sit in the staging file (at the same
    /// offset as in the volume file).
    copied: Vec<u64>,
    staging: File,
    /// The tracker's base before `begin`, restored on abort.
    prev_base: Option<String>,
    /// A copy-before-write failed: the view can only be aborted.
    failed: Option<String>,
}

/// Tracks which chunks of a served volume file change, and serves snapshot views of it.
pub struct ChunkTracker {
    export: String,
    volume: PathBuf,
    staging_dir: PathBuf,
    backing: Arc<dyn Backing>,
    /// Weak: the device holds the tracker as its observer.
    device: Weak<Device>,
    file_size: u64,
    chunks: u64,
    /// Chunks holding the LUKS2 header, which changes outside the device (key rewrap):
    /// every view delivers them.
    header_chunks: u64,
    /// Chunks written or punched since the base (or since `begin` while a view runs).
    dirty: Vec<AtomicU64>,
    /// Frozen chunks neither delivered nor copied yet: a write to one copies it first.
    pending: Vec<AtomicU64>,
    state: Mutex<State>,
}

impl std::fmt::Debug for ChunkTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkTracker")
            .field("export", &self.export)
            .field("volume", &self.volume)
            .field("chunks", &self.chunks)
            .finish_non_exhaustive()
    }
}

fn bit(words: &[u64], i: u64) -> bool {
    words[word(i)] & mask(i) != 0
}

fn set(words: &mut [u64], i: u64) {
    words[word(i)] |= mask(i);
}

fn word(i: u64) -> usize {
    usize::try_from(i / 64).expect("chunk bitmaps fit in memory")
}

fn mask(i: u64) -> u64 {
    1 << (i % 64)
}

fn ones(bits: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (w, &word) in (0u64..).zip(bits) {
        let mut word = word;
        while word != 0 {
            out.push(w * 64 + u64::from(word.trailing_zeros()));
            word &= word - 1;
        }
    }
    out
}

impl ChunkTracker {
    /// Starts tracking `device`, served as `export` from the volume file `volume`: loads
    /// the file's dirty map (an untrusted one leaves the tracker without a base), marks
    /// the map in use, and installs the tracker as the device's write observer. Call it
    /// before the device serves any write. Staging files of views go to `staging_dir`.
    ///
    /// # Errors
    /// The map cannot be read or marked in use (serving would then risk a stale map
    /// being trusted after a crash), or the device is tracked already.
    pub fn attach(
        export: &str,
        device: &Arc<Device>,
        volume: &Path,
        staging_dir: &Path,
    ) -> Result<Arc<Self>, ViewError> {
        let backing = device.backing().clone();
        let file_size = backing.size()?;
        let chunks = chunk_count(file_size);
        let words = words_for(chunks);
        let mut bits = vec![0u64; words];
        let mut base = match DirtyMap::load_changes(volume)? {
            Changes::Since { base, chunks: list } => {
                for i in list {
                    set(&mut bits, i);
                }
                Some(base)
            }
            Changes::Unknown => None,
        };
        let rekeying = device.rekey_boundary().is_some();
        if rekeying {
            base = None;
        }
        let tracker = Arc::new(Self {
            export: export.to_string(),
            volume: volume.to_path_buf(),
            staging_dir: staging_dir.to_path_buf(),
            backing,
            device: Arc::downgrade(device),
            file_size,
            chunks,
            header_chunks: chunk_count(device.geometry().data_offset).min(chunks),
            dirty: bits.into_iter().map(AtomicU64::new).collect(),
            pending: (0..words).map(|_| AtomicU64::new(0)).collect(),
            state: Mutex::new(State {
                base,
                rekeying,
                view: None,
                closed: false,
            }),
        });
        tracker.persist(&tracker.lock(), true)?;
        device
            .observe_writes(tracker.clone())
            .map_err(|_| ViewError::AlreadyTracked(export.to_string()))?;
        Ok(tracker)
    }

    /// The export this tracker serves.
    #[must_use]
    pub fn export(&self) -> &str {
        &self.export
    }

    /// The snapshot the tracked changes are relative to, if the tracker can vouch for
    /// them (`None` while a view runs: the base is pending until the view ends).
    #[must_use]
    pub fn base(&self) -> Option<String> {
        self.lock().base.clone()
    }

    /// The chunks written or punched since the base (or, while a view runs, since
    /// `begin`), ascending.
    #[must_use]
    pub fn dirty_chunks(&self) -> Vec<u64> {
        let words: Vec<u64> = self
            .dirty
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect();
        ones(&words)
    }

    /// Whether a snapshot view is active.
    #[must_use]
    pub fn snapshot_running(&self) -> bool {
        self.lock().view.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn chunk_len(&self, chunk: u64) -> usize {
        let len = CHUNK_BYTES.min(self.file_size - chunk * CHUNK_BYTES);
        usize::try_from(len).expect("a chunk fits in memory")
    }

    /// Writes the map: the bits, the base, and whether the volume is (still) served.
    fn persist(&self, st: &State, in_use: bool) -> Result<(), DirtyError> {
        let mut map = DirtyMap::empty(self.chunks, st.base.clone());
        for (m, w) in map.bits.iter_mut().zip(&self.dirty) {
            *m = w.load(Ordering::Relaxed);
        }
        map.in_use = in_use;
        if !in_use {
            // Every write is done: any later change to the file unstamps the map.
            map.stamp = VolumeStamp::of(&self.volume)?;
        }
        map.store(&DirtyMap::path_for(&self.volume))
    }

    fn staging_file(&self) -> Result<File, ViewError> {
        let err = |source| ViewError::Staging {
            dir: self.staging_dir.clone(),
            source,
        };
        // An existing directory (the volume file's) is used as it is; only a missing one
        // is made (private).
        if !self.staging_dir.is_dir() {
            crate::private_file::ensure_dir(&self.staging_dir)
                .map_err(|e| err(std::io::Error::other(e.to_string())))?;
        }
        let path = self.staging_dir.join(format!(
            "snapshot-{}-{}-{}.staging",
            std::process::id(),
            self.export,
            uuid::Uuid::new_v4().simple()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(err)?;
        // Unlinked at once: the copies live as long as the view, even if the agent dies.
        std::fs::remove_file(&path).map_err(err)?;
        Ok(file)
    }

    /// Begins a snapshot view relative to `base` (the parent snapshot's manifest key):
    /// drains in-flight writes, then freezes the chunks changed since `base` (every
    /// chunk when the tracker has no base or another one) plus the header's, and starts
    /// tracking afresh. `changed` in the answer is `None` when every chunk must be
    /// compared.
    ///
    /// # Errors
    /// A view already running, a rekey in progress, the agent stopping, the staging file.
    pub fn begin(&self, base: Option<&str>) -> Result<Begun, ViewError> {
        let device = self
            .device
            .upgrade()
            .ok_or_else(|| ViewError::Closed(self.export.clone()))?;
        // Every stripe, as the rekey's fence drains a zone: no write is in flight below.
        let _drained = device.lock_write(&(0..device.size()));
        let mut st = self.lock();
        if st.closed {
            return Err(ViewError::Closed(self.export.clone()));
        }
        if st.view.is_some() {
            return Err(ViewError::AlreadyRunning(self.export.clone()));
        }
        if st.rekeying || device.rekey_boundary().is_some() {
            return Err(ViewError::Rekeying(self.export.clone()));
        }
        let staging = self.staging_file()?;
        let trusted = base.is_some() && st.base.as_deref() == base;
        let mut frozen: Vec<u64> = self
            .dirty
            .iter()
            .map(|w| w.swap(0, Ordering::Relaxed))
            .collect();
        if trusted {
            for i in 0..self.header_chunks {
                set(&mut frozen, i);
            }
        } else {
            frozen.fill(u64::MAX);
            if let Some(last) = frozen.last_mut()
                && !self.chunks.is_multiple_of(64)
            {
                *last = (1 << (self.chunks % 64)) - 1;
            }
        }
        for (p, &f) in self.pending.iter().zip(&frozen) {
            p.store(f, Ordering::Release);
        }
        let changed = trusted.then(|| ones(&frozen));
        let prev_base = st.base.take();
        st.view = Some(View {
            copied: vec![0; frozen.len()],
            frozen,
            staging,
            prev_base,
            failed: None,
        });
        Ok(Begun {
            chunk_bytes: CHUNK_BYTES,
            chunks: self.chunks,
            file_size: self.file_size,
            changed,
        })
    }

    /// Reads `chunk` of the volume file into `buf` (resized to the chunk's length) as it
    /// was at `begin`: from the staging file if a write copied it aside, else live (no
    /// write to it can run meanwhile), and marks it delivered. A chunk that is not frozen
    /// reads live, as it is now.
    ///
    /// # Errors
    /// No view, a chunk past the end, a frozen chunk read twice, a failed copy, I/O.
    pub fn read(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), ViewError> {
        if chunk >= self.chunks {
            return Err(ViewError::NoSuchChunk {
                export: self.export.clone(),
                chunk,
                chunks: self.chunks,
            });
        }
        buf.clear();
        buf.resize(self.chunk_len(chunk), 0);
        let offset = chunk * CHUNK_BYTES;
        let mut st = self.lock();
        let view = st
            .view
            .as_mut()
            .ok_or_else(|| ViewError::NotRunning(self.export.clone()))?;
        if let Some(why) = &view.failed {
            return Err(ViewError::CopyFailed {
                export: self.export.clone(),
                why: why.clone(),
            });
        }
        if bit(&view.copied, chunk) {
            read_sparse(&view.staging, buf, offset).map_err(|source| ViewError::Staging {
                dir: self.staging_dir.clone(),
                source,
            })?;
            clear_bit(&mut view.copied, chunk);
            return Ok(());
        }
        if !bit(&view.frozen, chunk) {
            drop(st); // writers take their stripes before the mutex: never the reverse
            return self.read_live(offset, buf);
        }
        let w = &self.pending[word(chunk)];
        if w.load(Ordering::Acquire) & mask(chunk) == 0 {
            return Err(ViewError::AlreadyDelivered {
                export: self.export.clone(),
                chunk,
            });
        }
        // Pending: any writer of this chunk waits on the mutex we hold.
        self.backing.read_at(buf, offset)?;
        w.fetch_and(!mask(chunk), Ordering::Release);
        Ok(())
    }

    /// Reads the file at `offset` as it is now, under the stripe read locks of the data
    /// it covers (no torn sector).
    fn read_live(&self, offset: u64, buf: &mut [u8]) -> Result<(), ViewError> {
        let device = self
            .device
            .upgrade()
            .ok_or_else(|| ViewError::Closed(self.export.clone()))?;
        let data_offset = device.geometry().data_offset;
        let end = offset + buf.len() as u64;
        let data = offset.saturating_sub(data_offset)..end.saturating_sub(data_offset);
        let _locked = device.lock_read(&data);
        self.backing.read_at(buf, offset)?;
        Ok(())
    }

    /// Ends the view. `Some(new_base)`: the snapshot was committed; the tracked changes
    /// (those since `begin`) are now relative to it. `None`: aborted; the frozen chunks
    /// are added back to the tracked changes, so none is lost. Either way the staging
    /// file goes.
    ///
    /// # Errors
    /// No view; committing a view whose copy-before-write failed (it is aborted).
    pub fn end(&self, committed: Option<&str>) -> Result<(), ViewError> {
        let mut st = self.lock();
        let view = st
            .view
            .take()
            .ok_or_else(|| ViewError::NotRunning(self.export.clone()))?;
        for p in &self.pending {
            p.store(0, Ordering::Release);
        }
        match (committed, &view.failed) {
            (Some(new_base), None) => {
                st.base = Some(new_base.to_string());
                if let Err(e) = self.persist(&st, true) {
                    // In use either way: a crash makes it untrusted, a clean stop rewrites it.
                    tracing::warn!("{e}");
                }
                Ok(())
            }
            (_, failed) => {
                for (d, &f) in self.dirty.iter().zip(&view.frozen) {
                    d.fetch_or(f, Ordering::Relaxed);
                }
                st.base = view.prev_base.clone();
                match (committed, failed) {
                    (Some(_), Some(why)) => Err(ViewError::CopyFailed {
                        export: self.export.clone(),
                        why: why.clone(),
                    }),
                    _ => Ok(()),
                }
            }
        }
    }

    /// The agent stops serving (every write is done and flushed): aborts a running view
    /// and writes the map back clean (not in use), so the next attach or an offline
    /// snapshot can trust it.
    ///
    /// # Errors
    /// The map cannot be written (it stays in use: the next snapshot compares every
    /// chunk).
    pub fn close(&self) -> Result<(), ViewError> {
        let aborted = self.end(None).is_ok();
        if aborted {
            tracing::warn!(
                "the snapshot of {} was aborted: the agent is stopping",
                self.export
            );
        }
        let mut st = self.lock();
        st.closed = true;
        self.persist(&st, false)?;
        Ok(())
    }

    /// Copies `chunk` aside before its first write since `begin`, once.
    fn copy_aside(&self, chunk: u64) {
        let mut st = self.lock();
        let w = &self.pending[word(chunk)];
        if w.load(Ordering::Acquire) & mask(chunk) == 0 {
            return; // delivered or copied meanwhile, or the view ended
        }
        let Some(view) = st.view.as_mut() else {
            return;
        };
        let offset = chunk * CHUNK_BYTES;
        let mut buf = vec![0u8; self.chunk_len(chunk)];
        let copied = self
            .backing
            .read_at(&mut buf, offset)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                if buf.iter().all(|&b| b == 0) {
                    Ok(()) // a hole stays a hole in the sparse staging file
                } else {
                    view.staging
                        .write_all_at(&buf, offset)
                        .map_err(|e| format!("staging write: {e}"))
                }
            });
        match copied {
            Ok(()) => set(&mut view.copied, chunk),
            Err(e) => {
                tracing::error!(
                    "snapshot of {}: copy-before-write of chunk {chunk}: {e}",
                    self.export
                );
                view.failed = Some(format!("copy-before-write of chunk {chunk} failed: {e}"));
            }
        }
        w.fetch_and(!mask(chunk), Ordering::Release);
    }
}

fn clear_bit(words: &mut [u64], i: u64) {
    words[word(i)] &= !mask(i);
}

/// Reads `buf.len()` bytes at `offset` of a sparse file that may end before them (zeros).
fn read_sparse(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl WriteObserver for ChunkTracker {
    fn before_write(&self, range: std::ops::Range<u64>) {
        if range.is_empty() || range.start >= self.file_size {
            return;
        }
        let first = range.start / CHUNK_BYTES;
        let last = ((range.end - 1) / CHUNK_BYTES).min(self.chunks - 1);
        for chunk in first..=last {
            let (w, m) = (word(chunk), mask(chunk));
            // Ordered against `begin`'s swap by the stripe locks both hold.
            if self.dirty[w].load(Ordering::Relaxed) & m == 0 {
                self.dirty[w].fetch_or(m, Ordering::Relaxed);
            }
            if self.pending[w].load(Ordering::Acquire) & m != 0 {
                self.copy_aside(chunk);
            }
        }
    }

    fn before_rekey(&self) -> bool {
        let mut st = self.lock();
        if st.view.is_some() {
            return false;
        }
        // The rekey rewrites every chunk, outside the stripe locks: no base to vouch for.
        st.rekeying = true;
        st.base = None;
        true
    }

    fn after_rekey(&self) {
        self.lock().rekeying = false;
    }
}

#[cfg(test)]
#[path = "tracker_tests.rs"]
pub(crate) mod tests;
