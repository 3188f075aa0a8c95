//! Taking a snapshot: read the chunks that may have changed, hash them, upload the ones
//! the store does not have, in parallel. The manifest is the caller's last write.
//!
//! One reader (the chunk source is a single agent connection or a file) feeds a bounded
//! queue, so memory stays at a few dozen chunks whatever the volume's size; a pool of
//! uploaders drains it. A chunk whose hash the parent already lists is not uploaded; a
//! chunk the store already holds (content addressing: an interrupted snapshot's chunks, or
//! another volume's) costs one HEAD.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};

use super::CHUNK_BYTES;
use super::manifest::Manifest;
use super::store::{SnapshotStore, StoreError};

/// Parallel uploads.
const UPLOADERS: usize = 8;
/// Chunks read ahead of the uploaders.
const QUEUE: usize = 16;

/// Upload errors.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Reading a chunk from the volume failed.
    #[error("cannot read chunk {chunk} of the volume: {detail}")]
    Read {
        /// Chunk index.
        chunk: u64,
        /// Why.
        detail: String,
    },
    /// The store refused or could not be reached.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Where chunks come from: the serving agent (a consistent view while I/O goes on) or
/// the file of a volume nobody serves.
pub trait ChunkSource {
    /// The volume file's size in bytes.
    fn file_size(&self) -> u64;
    /// Reads chunk `chunk` into `buf` (resized to the chunk's length).
    ///
    /// # Errors
    /// The read failed (message for the user).
    fn read(&mut self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), String>;
}

/// What a snapshot cost.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct UploadStats {
    /// Chunks in the volume.
    pub chunks: u64,
    /// Chunks read and hashed.
    pub chunks_read: u64,
    /// Chunks uploaded.
    pub chunks_uploaded: u64,
    /// Bytes uploaded (chunk bodies).
    pub bytes_uploaded: u64,
    /// Chunks that were holes.
    pub holes: u64,
}

/// What to upload.
pub struct Plan<'a> {
    /// The parent snapshot, if any.
    pub parent: Option<&'a Manifest>,
    /// Chunks changed since the parent, or `None` when that is unknown (every chunk is
    /// then read and compared by hash).
    pub changed: Option<&'a [u64]>,
    /// Chunks `0..always` are read whatever `changed` says (the LUKS2 header area).
    pub always: u64,
}

/// Uploads the chunks of `source` that the parent does not already hold and returns the
/// full chunk list for the new manifest. `progress(done, total)` is called as chunks are
/// read.
///
/// # Errors
/// A read or the store failed; nothing is referenced yet, so a retry resumes (the chunks
/// already uploaded cost a HEAD each).
pub fn upload(
    store: &dyn SnapshotStore,
    source: &mut dyn ChunkSource,
    plan: &Plan<'_>,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<(Vec<Option<String>>, UploadStats), UploadError> {
    let size = source.file_size();
    let n = size.div_ceil(CHUNK_BYTES);
    let parent = plan
        .parent
        .filter(|p| p.file_size == size && p.chunk_bytes == CHUNK_BYTES);
    let mut entries: Vec<Option<String>> = parent.map_or_else(
        || vec![None; usize::try_from(n).expect("chunk count fits")],
        |p| p.chunks.clone(),
    );
    let to_read: Vec<u64> = match (parent, plan.changed) {
        (Some(_), Some(changed)) => {
            let mut v: Vec<u64> = (0..plan.always.min(n))
                .chain(changed.iter().copied().filter(|&c| c < n))
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        }
        _ => (0..n).collect(),
    };
    let mut stats = UploadStats {
        chunks: n,
        ..UploadStats::default()
    };
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<UploadError>> = Mutex::new(None);
    let uploaded = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let fail = |e: UploadError| {
        failed.store(true, Ordering::SeqCst);
        first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(e);
    };
    let (tx, rx) = mpsc::sync_channel::<(String, Vec<u8>)>(QUEUE);
    let rx = Mutex::new(rx);
    std::thread::scope(|s| {
        for _ in 0..UPLOADERS {
            s.spawn(|| {
                loop {
                    let next = rx
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .recv();
                    let Ok((hash, body)) = next else { return };
                    if failed.load(Ordering::SeqCst) {
                        continue;
                    }
                    let key = Manifest::chunk_key(&hash);
                    let put = store.exists(&key).and_then(|there| {
                        if there {
                            Ok(false)
                        } else {
                            store.put(&key, &body).map(|()| true)
                        }
                    });
                    match put {
                        Ok(true) => {
                            uploaded.fetch_add(1, Ordering::Relaxed);
                            bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => fail(e.into()),
                    }
                }
            });
        }
        let chunk_cap = usize::try_from(CHUNK_BYTES).expect("fits");
        let mut buf = Vec::with_capacity(chunk_cap);
        let total = to_read.len() as u64;
        for (done, &i) in to_read.iter().enumerate() {
            if failed.load(Ordering::SeqCst) {
                break;
            }
            if let Err(detail) = source.read(i, &mut buf) {
                fail(UploadError::Read { chunk: i, detail });
                break;
            }
            stats.chunks_read += 1;
            let slot = &mut entries[usize::try_from(i).expect("chunk index fits")];
            if crate::device::is_zero(&buf) {
                stats.holes += 1;
                *slot = None;
            } else {
                let hash = blake3::hash(&buf).to_hex().to_string();
                if slot.as_deref() != Some(hash.as_str()) {
                    *slot = Some(hash.clone());
                    // The chunk moves to its uploader; the next read fills a new buffer.
                    let body = std::mem::replace(&mut buf, Vec::with_capacity(chunk_cap));
                    if tx.send((hash, body)).is_err() {
                        break;
                    }
                }
            }
            progress(done as u64 + 1, total);
        }
        drop(tx);
    });
    if let Some(e) = first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    stats.chunks_uploaded = uploaded.into_inner();
    stats.bytes_uploaded = bytes.into_inner();
    Ok((entries, stats))
}

/// Reads chunks straight from a volume file nobody serves.
pub struct FileSource {
    file: std::fs::File,
    size: u64,
}

impl FileSource {
    /// Opens `path` read-only.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl ChunkSource for FileSource {
    fn file_size(&self) -> u64 {
        self.size
    }

    fn read(&mut self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let at = chunk * CHUNK_BYTES;
        let len = CHUNK_BYTES.min(self.size.saturating_sub(at));
        buf.resize(usize::try_from(len).expect("a chunk fits"), 0);
        self.file.read_exact_at(buf, at).map_err(|e| e.to_string())
    }
}
