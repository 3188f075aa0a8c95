//! Cache modes, with qemu's names: whether a volume file's ciphertext goes through the
//! host page cache (`writeback`) or straight to the disk (`none`, `O_DIRECT`).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

/// How a volume file is cached on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    /// Through the host page cache; durable at flush (`fdatasync`). Reads of recently
    /// used data are memory copies, and the WorkSpace's data is cached twice (plaintext
    /// in its own ext4, ciphertext in the host's).
    Writeback,
    /// `O_DIRECT`: no host page cache, as on EBS; reads and writes reach the disk, and a
    /// flush still makes them durable.
    None,
}

impl CacheMode {
    /// The name on the command line and in describe output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writeback => "writeback",
            Self::None => "none",
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown cache mode name.
#[derive(Debug, thiserror::Error)]
#[error("unknown cache mode {0:?}: use `writeback` or `none`")]
pub struct UnknownCacheMode(pub String);

impl std::str::FromStr for CacheMode {
    type Err = UnknownCacheMode;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "writeback" => Ok(Self::Writeback),
            "none" => Ok(Self::None),
            other => Err(UnknownCacheMode(other.to_owned())),
        }
    }
}

impl serde::Serialize for CacheMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for CacheMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// A volume file opened `O_DIRECT`, with the alignment the host filesystem demands.
#[derive(Debug)]
pub struct DirectFile {
    /// The `O_DIRECT` descriptor.
    pub file: Arc<File>,
    /// Buffers must start at a multiple of this.
    mem_align: u64,
    /// Offsets and lengths must be multiples of this.
    offset_align: u64,
}

impl DirectFile {
    /// Opens `path` `O_DIRECT` (read-write when `writable`) and asks the filesystem for
    /// its direct I/O alignment.
    ///
    /// # Errors
    /// The filesystem refuses `O_DIRECT` (tmpfs before 6.6, some FUSE filesystems), or
    /// does not report an alignment.
    pub fn open(path: &Path, writable: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("the host filesystem refuses O_DIRECT ({e}); use --cache writeback"),
                )
            })?;
        let (mem_align, offset_align) = dio_align(&file)?;
        Ok(Self {
            file: Arc::new(file),
            mem_align,
            offset_align,
        })
    }

    /// The one alignment that satisfies both memory and offsets.
    #[must_use]
    pub fn align(&self) -> u64 {
        self.mem_align.max(self.offset_align)
    }

    /// Whether a request of `len` bytes at `offset` from memory at `ptr` may go direct.
    #[must_use]
    pub fn admits(&self, ptr: *const u8, offset: u64, len: usize) -> bool {
        super::aligned::is_aligned(ptr as u64, self.mem_align)
            && super::aligned::is_aligned(offset, self.offset_align)
            && super::aligned::is_aligned(len as u64, self.offset_align)
    }
}

/// `statx(STATX_DIOALIGN)`: (memory alignment, offset alignment).
fn dio_align(file: &File) -> std::io::Result<(u64, u64)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor, an empty path with AT_EMPTY_PATH (so the descriptor
    // itself is asked about), and a pointer to a statx the call fills in.
    let rc = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &raw mut stx,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let (mem, off) = (
        u64::from(stx.stx_dio_mem_align),
        u64::from(stx.stx_dio_offset_align),
    );
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || mem == 0 || off == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "the host filesystem does not support direct I/O on this file; use --cache writeback",
        ));
    }
    if !mem.is_power_of_two() || !off.is_power_of_two() || mem.max(off) > 4096 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!(
                "direct I/O alignment {mem}/{off} is not one sealvol serves; use --cache writeback"
            ),
        ));
    }
    Ok((mem, off))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for m in [CacheMode::Writeback, CacheMode::None] {
            assert_eq!(m.as_str().parse::<CacheMode>().expect("parse"), m);
        }
        let err = "direct".parse::<CacheMode>().expect_err("unknown");
        assert!(err.to_string().contains("writeback"), "{err}");
        let json = serde_json::to_string(&CacheMode::None).expect("serialize");
        assert_eq!(json, "\"none\"");
        assert_eq!(
            serde_json::from_str::<CacheMode>("\"writeback\"").expect("deserialize"),
            CacheMode::Writeback
        );
        assert!(serde_json::from_str::<CacheMode>("\"unsafe\"").is_err());
    }
}
