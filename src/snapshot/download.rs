//! Restoring a snapshot into a new volume file: every chunk fetched in parallel, checked
//! against its BLAKE3 before a byte of it is written, holes left sparse. The file appears
//! under its name only once complete (written as `<name>.partial`, synced, renamed), so a
//! failed restore leaves nothing half-restored.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::manifest::Manifest;
use super::store::{SnapshotStore, StoreError};

/// Parallel downloads.
const DOWNLOADERS: usize = 16;

/// Restore errors.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// A chunk's bytes do not hash to its name.
    #[error(
        "chunk {hash} (chunk {index} of snapshot {manifest}) is corrupted in the store (BLAKE3 mismatch); nothing was restored"
    )]
    Corrupted {
        /// Expected hash.
        hash: String,
        /// Chunk index.
        index: u64,
        /// Manifest key.
        manifest: String,
    },
    /// A chunk the manifest names is not in the store.
    #[error(
        "chunk {hash} (chunk {index} of snapshot {manifest}) is missing from the store; nothing was restored"
    )]
    Missing {
        /// Expected hash.
        hash: String,
        /// Chunk index.
        index: u64,
        /// Manifest key.
        manifest: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the new file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Bytes and chunks fetched.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct DownloadStats {
    /// Chunks fetched.
    pub chunks: u64,
    /// Bytes fetched.
    pub bytes: u64,
}

/// Writes the volume file `manifest` describes at `dest` (which must not exist).
///
/// # Errors
/// A chunk is missing or corrupted, the store failed, or the file cannot be written;
/// `dest` is then absent.
pub fn download(
    store: &dyn SnapshotStore,
    manifest: &Manifest,
    dest: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DownloadStats, DownloadError> {
    let partial = dest.with_extension("partial");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DownloadError::Io { path, source }
    };
    let _ = std::fs::remove_file(&partial);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&partial)
        .map_err(io(&partial))?;
    let result = fill(store, manifest, &file, progress).and_then(|stats| {
        file.set_len(manifest.file_size).map_err(io(&partial))?;
        file.sync_all().map_err(io(&partial))?;
        std::fs::rename(&partial, dest).map_err(io(dest))?;
        if let Some(dir) = dest.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Ok(stats)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

fn fill(
    store: &dyn SnapshotStore,
    manifest: &Manifest,
    file: &std::fs::File,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DownloadStats, DownloadError> {
    let wanted: Vec<(u64, &str)> = manifest
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, h)| h.as_deref().map(|h| (i as u64, h)))
        .collect();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let bytes = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let first_error: Mutex<Option<DownloadError>> = Mutex::new(None);
    let key = manifest.own_key();
    let total = wanted.len() as u64;
    std::thread::scope(|s| {
        for _ in 0..DOWNLOADERS {
            s.spawn(|| {
                while !failed.load(Ordering::SeqCst) {
                    let Some(&(index, hash)) = wanted.get(next.fetch_add(1, Ordering::SeqCst))
                    else {
                        return;
                    };
                    let r = fetch_one(store, manifest, &key, index, hash).and_then(|body| {
                        file.write_all_at(&body, index * manifest.chunk_bytes)
                            .map_err(|source| DownloadError::Io {
                                path: PathBuf::from(format!("chunk {index}")),
                                source,
                            })?;
                        Ok(body.len() as u64)
                    });
                    match r {
                        Ok(n) => {
                            bytes.fetch_add(n, Ordering::Relaxed);
                            progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                        }
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            first_error
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner)
                                .get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        return Err(e);
    }
    Ok(DownloadStats {
        chunks: total,
        bytes: bytes.into_inner(),
    })
}

fn fetch_one(
    store: &dyn SnapshotStore,
    manifest: &Manifest,
    key: &str,
    index: u64,
    hash: &str,
) -> Result<Vec<u8>, DownloadError> {
    let body = match store.get(&Manifest::chunk_key(hash)) {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(DownloadError::Missing {
                hash: hash.into(),
                index,
                manifest: key.into(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let got = blake3::hash(&body).to_hex();
    if body.len() as u64 != manifest.chunk_len(index)
        || !bool::from(subtle::ConstantTimeEq::ct_eq(
            got.as_bytes(),
            hash.as_bytes(),
        ))
    {
        return Err(DownloadError::Corrupted {
            hash: hash.into(),
            index,
            manifest: key.into(),
        });
    }
    Ok(body)
}
