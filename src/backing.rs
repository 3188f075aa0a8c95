//! Where a volume's bytes live: the [`Backing`] trait and its implementations.
//!
//! A backing stores raw bytes (header and ciphertext); it knows nothing of sectors or keys.
//! [`FileBacking`] is the real one (positional `pread`/`pwrite`, `fdatasync`, and
//! `fallocate(PUNCH_HOLE)`), served in one of two [`CacheMode`]s; [`MemBacking`] serves
//! unit tests and micro-benchmarks. The crash simulator used by the crash tests is
//! another implementation. [`uring`] is the asynchronous path around the trait, for files
//! served with `--cache none`.

pub mod aligned;
mod cache;
pub mod uring;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

pub use cache::{CacheMode, DirectFile, UnknownCacheMode};

/// What failed, with where.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// An I/O error at a given offset.
    #[error("{op} of {len} bytes at offset {offset} in {path}: {source}")]
    Io {
        /// The operation (`read`, `write`, `flush`, `punch-hole`, ...).
        op: &'static str,
        /// The backing's name (file path or `memory`).
        path: String,
        /// Byte offset.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A read went past the end of the backing: the file is truncated.
    #[error(
        "{path} is truncated: wanted {len} bytes at offset {offset}, but it is only {size} bytes long"
    )]
    Truncated {
        /// The backing's name.
        path: String,
        /// Byte offset.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// Actual size.
        size: u64,
    },
}

impl BackingError {
    /// A read or write of `len` bytes at `offset` of `backing` that failed with `e`:
    /// [`BackingError::Truncated`] when it ran past the end of the file, else
    /// [`BackingError::Io`].
    #[must_use]
    pub fn transfer(
        backing: &dyn Backing,
        op: &'static str,
        offset: u64,
        len: u64,
        e: std::io::Error,
    ) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Self::Truncated {
                path: backing.name(),
                offset,
                len,
                size: backing.size().unwrap_or(0),
            }
        } else {
            Self::Io {
                op,
                path: backing.name(),
                offset,
                len,
                source: e,
            }
        }
    }
}

/// Byte storage under a volume. Implementations are shared between threads.
pub trait Backing: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// I/O failure, or [`BackingError::Truncated`] past the end.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError>;
    /// Writes all of `buf` at `offset`, growing the backing if needed.
    ///
    /// # Errors
    /// I/O failure.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackingError>;
    /// Makes every completed write durable (`fdatasync`).
    ///
    /// # Errors
    /// I/O failure: the caller must not acknowledge durability.
    fn flush(&self) -> Result<(), BackingError>;
    /// Deallocates a byte range so that it reads back as zeros.
    ///
    /// # Errors
    /// I/O failure.
    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BackingError>;
    /// Current size in bytes.
    ///
    /// # Errors
    /// I/O failure.
    fn size(&self) -> Result<u64, BackingError>;
    /// Sets the size in bytes (sparse growth).
    ///
    /// # Errors
    /// I/O failure.
    fn set_size(&self, size: u64) -> Result<(), BackingError>;
    /// A human-readable name for error messages.
    fn name(&self) -> String;
    /// Serves from now on in `mode` (see [`CacheMode`]). The default, for backings
    /// without a host page cache, accepts only [`CacheMode::Writeback`].
    ///
    /// # Errors
    /// The mode cannot be had (the host filesystem refuses `O_DIRECT`).
    fn set_cache(&self, mode: CacheMode) -> Result<(), BackingError> {
        match mode {
            CacheMode::Writeback => Ok(()),
            CacheMode::None => Err(BackingError::Io {
                op: "open O_DIRECT",
                path: self.name(),
                offset: 0,
                len: 0,
                source: std::io::Error::from(std::io::ErrorKind::Unsupported),
            }),
        }
    }
    /// The mode set by [`Backing::set_cache`].
    fn cache(&self) -> CacheMode {
        CacheMode::Writeback
    }
    /// The open file and the alignment a request must have to go to it directly, for
    /// asynchronous I/O (io_uring) that bypasses this trait; `None` when the backing is
    /// not a file.
    fn async_target(&self) -> Option<AsyncTarget> {
        None
    }
    /// A hint that `[offset, offset + len)` was just written and will be flushed soon:
    /// start writing it back now so that the coming [`Backing::flush`] waits less. No
    /// durability promise; the default does nothing.
    fn start_writeback(&self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

/// Where asynchronous I/O may go (see [`Backing::async_target`]).
#[derive(Debug, Clone)]
pub struct AsyncTarget {
    /// The file (opened `O_DIRECT` in [`CacheMode::None`]).
    pub file: Arc<File>,
    /// Offsets and lengths must be multiples of this (a power of two; 1 when buffered),
    /// and buffers start at a multiple of it ([`aligned::AlignedBuf`] always does).
    pub align: u64,
}

/// A regular file on the host filesystem.
///
/// Always open buffered; in [`CacheMode::None`] it also holds a second, `O_DIRECT`
/// descriptor of the same file, which serves every request aligned as the host
/// filesystem demands (`statx` `STATX_DIOALIGN`). The rest (the LUKS2 header, a
/// 512-byte sector on a host that wants 4096) goes through the buffered descriptor: the
/// kernel keeps the two coherent (a direct request writes back and drops the cached
/// pages of its range first), and callers never overlap requests on one range.
#[derive(Debug)]
pub struct FileBacking {
    file: Arc<File>,
    path: PathBuf,
    writable: bool,
    direct: OnceLock<DirectFile>,
}

impl FileBacking {
    /// Opens an existing file read-write.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(path: &Path) -> Result<Self, BackingError> {
        Self::open_with(path, OpenOptions::new().read(true).write(true))
    }

    /// Opens an existing file read-write in `mode`.
    ///
    /// # Errors
    /// The file cannot be opened, or not `O_DIRECT` for [`CacheMode::None`].
    pub fn open_cached(path: &Path, mode: CacheMode) -> Result<Self, BackingError> {
        let backing = Self::open(path)?;
        backing.set_cache(mode)?;
        Ok(backing)
    }

    /// Opens an existing file read-only (writes will fail).
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open_read_only(path: &Path) -> Result<Self, BackingError> {
        let mut backing = Self::open_with(path, OpenOptions::new().read(true))?;
        backing.writable = false;
        Ok(backing)
    }

    /// Creates a new file; fails if it exists unless `overwrite`.
    ///
    /// # Errors
    /// The file exists (without `overwrite`) or cannot be created.
    pub fn create(path: &Path, overwrite: bool) -> Result<Self, BackingError> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if overwrite {
            opts.create(true).truncate(true);
        } else {
            opts.create_new(true);
        }
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        Self::open_with(path, &opts)
    }

    fn open_with(path: &Path, opts: &OpenOptions) -> Result<Self, BackingError> {
        let file = opts.open(path).map_err(|source| BackingError::Io {
            op: "open",
            path: path.display().to_string(),
            offset: 0,
            len: 0,
            source,
        })?;
        Ok(Self {
            file: Arc::new(file),
            path: path.to_path_buf(),
            writable: true,
            direct: OnceLock::new(),
        })
    }

    /// The descriptor for a request of `len` bytes at `offset` from memory at `ptr`: the
    /// direct one when it is set and the request meets its alignment.
    fn fd_for(&self, ptr: *const u8, offset: u64, len: usize) -> &File {
        match self.direct.get() {
            Some(d) if d.admits(ptr, offset, len) => &d.file,
            _ => &self.file,
        }
    }

    /// The path of the backing file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    ) -> BackingError {
        BackingError::Io {
            op,
            path: self.path.display().to_string(),
            offset,
            len,
            source,
        }
    }
}

impl Backing for FileBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        let file = self.fd_for(buf.as_ptr(), offset, buf.len());
        file.read_exact_at(buf, offset)
            .map_err(|e| BackingError::transfer(self, "read", offset, buf.len() as u64, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackingError> {
        self.fd_for(buf.as_ptr(), offset, buf.len())
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", offset, buf.len() as u64, e))
    }

    fn set_cache(&self, mode: CacheMode) -> Result<(), BackingError> {
        match mode {
            CacheMode::Writeback if self.direct.get().is_none() => Ok(()),
            CacheMode::None if self.direct.get().is_some() => Ok(()),
            CacheMode::Writeback => Err(self.io_err(
                "reopen buffered",
                0,
                0,
                std::io::Error::other("the backing already serves with --cache none"),
            )),
            CacheMode::None => {
                let direct = DirectFile::open(&self.path, self.writable)
                    .map_err(|e| self.io_err("open O_DIRECT", 0, 0, e))?;
                let _ = self.direct.set(direct);
                Ok(())
            }
        }
    }

    fn cache(&self) -> CacheMode {
        if self.direct.get().is_some() {
            CacheMode::None
        } else {
            CacheMode::Writeback
        }
    }

    fn async_target(&self) -> Option<AsyncTarget> {
        Some(match self.direct.get() {
            Some(d) => AsyncTarget {
                file: Arc::clone(&d.file),
                align: d.align(),
            },
            None => AsyncTarget {
                file: Arc::clone(&self.file),
                align: 1,
            },
        })
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range only reads its integer arguments; a failure is harmless
        // (the hint is dropped and the later fdatasync does the work).
        let _ = unsafe {
            libc::sync_file_range(self.file.as_raw_fd(), off, l, libc::SYNC_FILE_RANGE_WRITE)
        };
    }

    fn flush(&self) -> Result<(), BackingError> {
        nix::unistd::fdatasync(&*self.file)
            .map_err(|e| self.io_err("fdatasync", 0, 0, std::io::Error::from(e)))
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        use nix::fcntl::{FallocateFlags, fallocate};
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(self.io_err(
                "punch-hole",
                offset,
                len,
                std::io::Error::from(std::io::ErrorKind::InvalidInput),
            ));
        };
        fallocate(
            &*self.file,
            FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
        .map_err(|e| self.io_err("punch-hole", offset, len, std::io::Error::from(e)))
    }

    fn size(&self) -> Result<u64, BackingError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.io_err("stat", 0, 0, e))
    }

    fn set_size(&self, size: u64) -> Result<(), BackingError> {
        self.file
            .set_len(size)
            .map_err(|e| self.io_err("truncate", size, 0, e))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// An in-memory backing for tests and benchmarks.
#[derive(Debug, Default)]
pub struct MemBacking {
    bytes: RwLock<Vec<u8>>,
}

impl MemBacking {
    /// A zero-filled backing of `size` bytes.
    #[must_use]
    pub fn new(size: usize) -> Self {
        Self {
            bytes: RwLock::new(vec![0; size]),
        }
    }

    /// A copy of the whole contents.
    #[must_use]
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes
            .read()
            .expect("lock poisoned only by a panicking test")
            .clone()
    }

    /// A backing holding exactly `bytes`.
    #[must_use]
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RwLock::new(bytes),
        }
    }
}

fn mem_range(offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    Some(start..start.checked_add(len)?)
}

impl Backing for MemBacking {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        let bytes = self
            .bytes
            .read()
            .expect("lock poisoned only by a panicking test");
        match mem_range(offset, buf.len()).and_then(|r| bytes.get(r)) {
            Some(src) => {
                buf.copy_from_slice(src);
                Ok(())
            }
            None => Err(BackingError::Truncated {
                path: self.name(),
                offset,
                len: buf.len() as u64,
                size: bytes.len() as u64,
            }),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackingError> {
        let mut bytes = self
            .bytes
            .write()
            .expect("lock poisoned only by a panicking test");
        let range = mem_range(offset, buf.len()).ok_or_else(|| BackingError::Io {
            op: "write",
            path: "memory".into(),
            offset,
            len: buf.len() as u64,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        if bytes.len() < range.end {
            bytes.resize(range.end, 0);
        }
        bytes[range].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<(), BackingError> {
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        let mut bytes = self
            .bytes
            .write()
            .expect("lock poisoned only by a panicking test");
        let size = bytes.len() as u64;
        let start = offset.min(size);
        let end = offset.saturating_add(len).min(size);
        // Both bounds are <= bytes.len(), which is a usize.
        #[allow(clippy::cast_possible_truncation)]
        bytes[start as usize..end as usize].fill(0);
        Ok(())
    }

    fn size(&self) -> Result<u64, BackingError> {
        Ok(self
            .bytes
            .read()
            .expect("lock poisoned only by a panicking test")
            .len() as u64)
    }

    fn set_size(&self, size: u64) -> Result<(), BackingError> {
        let size = usize::try_from(size).map_err(|_| BackingError::Io {
            op: "truncate",
            path: "memory".into(),
            offset: size,
            len: 0,
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        })?;
        self.bytes
            .write()
            .expect("lock poisoned only by a panicking test")
            .resize(size, 0);
        Ok(())
    }

    fn name(&self) -> String {
        "memory".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One suite, run over every backing.
    fn exercise(b: &dyn Backing) {
        b.set_size(8192).expect("resize");
        b.write_at(&[0xAB; 100], 4000).expect("write");
        let mut buf = [0u8; 100];
        b.read_at(&mut buf, 4000).expect("read");
        assert_eq!(buf, [0xAB; 100]);
        b.punch_hole(4096, 4096).expect("punch");
        b.read_at(&mut buf, 4000).expect("read");
        assert_eq!(&buf[..96], &[0xAB; 96][..]);
        assert_eq!(&buf[96..], &[0; 4][..]);
        b.flush().expect("flush");
        assert_eq!(b.size().expect("size"), 8192);
        let mut past = [0u8; 10];
        assert!(matches!(
            b.read_at(&mut past, 8190),
            Err(BackingError::Truncated { .. })
        ));
    }

    #[test]
    fn memory_backing() {
        exercise(&MemBacking::new(0));
    }

    #[test]
    fn file_backing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        let b = FileBacking::create(&path, false).expect("create");
        exercise(&b);
        assert!(
            FileBacking::create(&path, false).is_err(),
            "never overwrites without force"
        );
    }

    /// `--cache none`: the same suite (unaligned requests go buffered), then aligned
    /// requests through the O_DIRECT descriptor, over a hole and over data, read back
    /// through both descriptors.
    #[test]
    fn direct_file_backing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vol");
        drop(FileBacking::create(&path, false).expect("create"));
        let b = FileBacking::open_cached(&path, CacheMode::None).expect("O_DIRECT on ext4");
        assert_eq!(b.cache(), CacheMode::None);
        exercise(&b);
        let target = b.async_target().expect("a file");
        assert!(target.align >= 512, "direct alignment {}", target.align);
        b.set_size(1 << 20).expect("sparse growth");
        let mut block = aligned::AlignedBuf::zeroed(8192);
        block.fill(0x5A);
        b.write_at(&block, 65536).expect("direct write into a hole");
        let mut back = aligned::AlignedBuf::zeroed(8192);
        b.read_at(&mut back, 65536).expect("direct read");
        assert_eq!(&back[..], &block[..]);
        let mut unaligned = vec![0u8; 10];
        b.read_at(&mut unaligned, 65536 + 3)
            .expect("buffered read of the same bytes");
        assert_eq!(unaligned, [0x5A; 10]);
        b.write_at(&[1, 2, 3], 65536 + 8190)
            .expect("buffered write across a block");
        b.read_at(&mut back, 65536)
            .expect("direct read sees the buffered write");
        assert_eq!(&back[8190..], &[1, 2]);
        assert_eq!(b.size().expect("size"), 1 << 20);
        assert!(
            b.set_cache(CacheMode::Writeback).is_err(),
            "one mode per open"
        );
        let ro = FileBacking::open_read_only(&path).expect("read-only");
        ro.set_cache(CacheMode::None).expect("read-only O_DIRECT");
        ro.read_at(&mut back, 65536).expect("read-only direct read");
        assert_eq!(&back[..2], &[0x5A, 0x5A]);
    }
}
