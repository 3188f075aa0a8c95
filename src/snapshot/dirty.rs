//! The persisted dirty-chunk map: which chunks of a volume file changed since a snapshot.
//!
//! One file per volume, `<volume file>.dirty` ([`DirtyMap::path_for`]), binary:
//!
//! ```text
//! magic "SVDIRTY\0" | version u32 | flags u32 (bit 0: in use) | chunk_bytes u64 | chunks u64
//! | volume stamp: inode u64, size u64, mtime (ns) u64
//! | base length u32 | base (UTF-8 manifest key; length u32::MAX: no base)
//! | bitmap: ceil(chunks / 64) little-endian u64 words | BLAKE3 of everything before
//! ```
//!
//! The rule is qemu's for persistent bitmaps: while an agent serves the volume the file
//! says *in use*, and only a clean shutdown writes the bitmap back with the flag cleared.
//! A map that is missing, in use (the agent crashed), corrupt, relative to no snapshot, or
//! for another chunk size or file size is untrusted: [`Changes::Unknown`], and the
//! snapshot compares every chunk. So is a map whose volume stamp (inode, size, mtime taken
//! when the map was written clean) no longer matches the file: something wrote the volume
//! while no agent served it (an offline rekey, a restore in place, a header rewrap, a new
//! volume at the same path). A change is never missed; at worst a chunk is compared
//! for nothing. Every write goes to a temporary file that is synced and renamed over the
//! map, so a crash leaves the old map or the new one.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::CHUNK_BYTES;

const MAGIC: &[u8; 8] = b"SVDIRTY\0";
const VERSION: u32 = 1;
const FLAG_IN_USE: u32 = 1;
const NO_BASE: u32 = u32::MAX;
/// Longest base (manifest key) a map stores.
const MAX_BASE: usize = 4096;

/// Errors reading or writing a dirty map.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The map (or its volume) cannot be read or written.
    #[error(
        "dirty map {path}: cannot {op}: {source} (check that the volume's directory is writable)"
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`read`, `write`, `rename`, ...).
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// The map's bytes do not parse: torn, truncated, edited, or from another version.
    #[error(
        "dirty map {path} is corrupt: {why} (it is ignored: the next snapshot compares every chunk)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A base too long to be a manifest key.
    #[error("snapshot base of {0} bytes is too long for a dirty map (at most {MAX_BASE})")]
    BaseTooLong(usize),
}

/// What changed in a stopped volume since a snapshot, as far as its dirty map can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Only these chunks (ascending indices) may differ from snapshot `base`.
    Since {
        /// The snapshot the map is relative to (its manifest key).
        base: String,
        /// Chunks written or discarded since.
        chunks: Vec<u64>,
    },
    /// The map is missing, was left in use by a crashed agent, or is corrupt: any chunk
    /// may have changed, compare everything.
    Unknown,
}

/// A dirty-chunk map: one bit per [`CHUNK_BYTES`] chunk of the volume file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMap {
    /// Chunk size the bits refer to.
    pub chunk_bytes: u64,
    /// Number of chunks in the volume file.
    pub chunks: u64,
    /// The snapshot (manifest key) the bits are relative to; `None`: relative to nothing,
    /// every chunk may differ from any snapshot.
    pub base: Option<String>,
    /// An agent serves the volume (or crashed while serving it): the bits are untrusted.
    pub in_use: bool,
    /// The bitmap, chunk `i` at bit `i % 64` of word `i / 64`.
    pub bits: Vec<u64>,
    /// The volume file as it was when the map was written clean.
    pub stamp: VolumeStamp,
}

/// Identifies the state of a volume file: any write to it changes the stamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeStamp {
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch (as the filesystem keeps it).
    pub mtime_ns: u64,
}

impl VolumeStamp {
    /// The stamp of the volume file at `volume` now.
    ///
    /// # Errors
    /// The file cannot be stat'ed.
    pub fn of(volume: &Path) -> Result<Self, DirtyError> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(volume).map_err(|source| DirtyError::Io {
            path: volume.to_path_buf(),
            op: "stat",
            source,
        })?;
        let secs = u64::try_from(m.mtime()).unwrap_or(0);
        let nanos = u64::try_from(m.mtime_nsec()).unwrap_or(0);
        Ok(Self {
            ino: m.ino(),
            size: m.size(),
            mtime_ns: secs.saturating_mul(1_000_000_000).saturating_add(nanos),
        })
    }
}

/// The number of [`CHUNK_BYTES`] chunks in a file of `file_size` bytes (the last one may
/// be short).
#[must_use]
pub fn chunk_count(file_size: u64) -> u64 {
    file_size.div_ceil(CHUNK_BYTES)
}

/// The number of 64-bit words a bitmap of `chunks` bits takes.
#[must_use]
pub fn words_for(chunks: u64) -> usize {
    usize::try_from(chunks.div_ceil(64)).expect("a bitmap of a volume file fits in memory")
}

impl DirtyMap {
    /// Where the map of the volume file `volume` lives: `<volume>.dirty`.
    #[must_use]
    pub fn path_for(volume: &Path) -> PathBuf {
        let mut name = volume.as_os_str().to_os_string();
        name.push(".dirty");
        PathBuf::from(name)
    }

    /// An empty, clean map of `chunks` chunks relative to `base`.
    #[must_use]
    pub fn empty(chunks: u64, base: Option<String>) -> Self {
        Self {
            chunk_bytes: CHUNK_BYTES,
            chunks,
            base,
            in_use: false,
            bits: vec![0; words_for(chunks)],
            stamp: VolumeStamp::default(),
        }
    }

    /// The chunks whose bit is set, ascending.
    #[must_use]
    pub fn changed(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, &word) in (0u64..).zip(&self.bits) {
            let mut word = word;
            while word != 0 {
                let bit = u64::from(word.trailing_zeros());
                let i = w * 64 + bit;
                if i < self.chunks {
                    out.push(i);
                }
                word &= word - 1;
            }
        }
        out
    }

    /// Reads the map at `path`; `Ok(None)` when there is none.
    ///
    /// # Errors
    /// [`DirtyError::Corrupt`] for bytes that do not parse, [`DirtyError::Io`] when the
    /// file exists but cannot be read.
    pub fn load(path: &Path) -> Result<Option<Self>, DirtyError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(DirtyError::Io {
                    path: path.to_path_buf(),
                    op: "read",
                    source,
                });
            }
        };
        Self::decode(&bytes)
            .map(Some)
            .map_err(|why| DirtyError::Corrupt {
                path: path.to_path_buf(),
                why,
            })
    }

    /// Writes the map to `path` atomically (temporary file, fsync, rename, fsync of the
    /// directory), mode 0600.
    ///
    /// # Errors
    /// [`DirtyError::BaseTooLong`], or I/O failure (the old map, if any, is left intact).
    pub fn store(&self, path: &Path) -> Result<(), DirtyError> {
        let bytes = self.encode()?;
        let io = |op: &'static str, p: &Path| {
            let p = p.to_path_buf();
            move |source| DirtyError::Io {
                path: p,
                op,
                source,
            }
        };
        let mut tmp_name = path.as_os_str().to_os_string();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(&bytes).map_err(io("write", &tmp))?;
        f.sync_all().map_err(io("fsync", &tmp))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(io("rename", path))?;
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io("fsync the directory of", path))?;
        Ok(())
    }

    /// What changed in the stopped volume `volume` since its last snapshot, from its map.
    ///
    /// [`Changes::Unknown`] when the map is missing, in use (an agent serves the volume
    /// or crashed while serving it), corrupt, relative to no snapshot, or for another
    /// chunk size or volume size.
    ///
    /// # Errors
    /// The map or the volume exists but cannot be read.
    pub fn load_changes(volume: &Path) -> Result<Changes, DirtyError> {
        let stamp = VolumeStamp::of(volume)?;
        let map = match Self::load(&Self::path_for(volume)) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Changes::Unknown),
            Err(DirtyError::Corrupt { path, why }) => {
                tracing::warn!(
                    "dirty map {} is corrupt ({why}): comparing every chunk",
                    path.display()
                );
                return Ok(Changes::Unknown);
            }
            Err(e) => return Err(e),
        };
        Ok(map.trusted(stamp))
    }

    /// The changes this map vouches for in the volume file whose stamp is now `stamp`.
    #[must_use]
    pub fn trusted(self, stamp: VolumeStamp) -> Changes {
        if self.in_use
            || self.chunk_bytes != CHUNK_BYTES
            || self.chunks != chunk_count(stamp.size)
            || self.stamp != stamp
        {
            return Changes::Unknown;
        }
        let changed = self.changed();
        match self.base {
            Some(base) => Changes::Since {
                base,
                chunks: changed,
            },
            None => Changes::Unknown,
        }
    }

    /// Writes a clean, empty map of `chunks` chunks relative to snapshot `base` for the
    /// stopped volume `volume`: after a successful snapshot of it, or a restore from
    /// `base`. Never call it for a volume an agent serves (the agent owns the map then).
    ///
    /// # Errors
    /// I/O failure, or a base too long.
    pub fn reset(volume: &Path, chunks: u64, base: &str) -> Result<(), DirtyError> {
        let mut map = Self::empty(chunks, Some(base.to_string()));
        map.stamp = VolumeStamp::of(volume)?;
        map.store(&Self::path_for(volume))
    }

    fn encode(&self) -> Result<Vec<u8>, DirtyError> {
        let mut out = Vec::with_capacity(48 + self.bits.len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.in_use { FLAG_IN_USE } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(&self.chunk_bytes.to_le_bytes());
        out.extend_from_slice(&self.chunks.to_le_bytes());
        for v in [self.stamp.ino, self.stamp.size, self.stamp.mtime_ns] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        match &self.base {
            Some(b) if b.len() > MAX_BASE => return Err(DirtyError::BaseTooLong(b.len())),
            Some(b) => {
                let len = u32::try_from(b.len()).expect("at most MAX_BASE");
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(b.as_bytes());
            }
            None => out.extend_from_slice(&NO_BASE.to_le_bytes()),
        }
        let words = words_for(self.chunks);
        for i in 0..words {
            let w = self.bits.get(i).copied().unwrap_or(0);
            out.extend_from_slice(&w.to_le_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        Ok(out)
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let body_len = bytes
            .len()
            .checked_sub(32)
            .ok_or_else(|| format!("{} bytes is too short", bytes.len()))?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return Err("checksum mismatch (torn or edited)".into());
        }
        let mut r = Reader { bytes: body };
        if r.take(8)? != MAGIC {
            return Err("not a sealvol dirty map (bad magic)".into());
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(format!("version {version}, this sealvol reads {VERSION}"));
        }
        let flags = r.u32()?;
        if flags & !FLAG_IN_USE != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        let chunk_bytes = r.u64()?;
        let chunks = r.u64()?;
        let stamp = VolumeStamp {
            ino: r.u64()?,
            size: r.u64()?,
            mtime_ns: r.u64()?,
        };
        let base = match r.u32()? {
            NO_BASE => None,
            len => {
                let len = usize::try_from(len).map_err(|e| e.to_string())?;
                if len > MAX_BASE {
                    return Err(format!("base of {len} bytes"));
                }
                let b = r.take(len)?;
                Some(String::from_utf8(b.to_vec()).map_err(|_| "base is not UTF-8")?)
            }
        };
        let words = usize::try_from(chunks.div_ceil(64))
            .ok()
            .filter(|&w| w.checked_mul(8) == Some(r.bytes.len()))
            .ok_or_else(|| {
                format!(
                    "{chunks} chunks need {} bitmap bytes, the map has {}",
                    chunks.div_ceil(64).saturating_mul(8),
                    r.bytes.len()
                )
            })?;
        let mut bits = Vec::with_capacity(words);
        for _ in 0..words {
            bits.push(r.u64()?);
        }
        Ok(Self {
            chunk_bytes,
            chunks,
            base,
            in_use: flags & FLAG_IN_USE != 0,
            bits,
            stamp,
        })
    }
}

/// A cursor over the map's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < n {
            return Err("truncated".into());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("took 4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("took 8 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volume(dir: &Path, chunks: u64) -> PathBuf {
        let p = dir.join("vol.img");
        let f = File::create(&p).expect("create volume");
        f.set_len(chunks * CHUNK_BYTES - 4096).expect("size");
        p
    }

    fn with_bits(chunks: u64, set: &[u64], base: Option<&str>, in_use: bool) -> DirtyMap {
        let mut m = DirtyMap::empty(chunks, base.map(str::to_string));
        for &i in set {
            m.bits[usize::try_from(i / 64).expect("small")] |= 1 << (i % 64);
        }
        m.in_use = in_use;
        m
    }

    #[test]
    fn path_is_beside_the_volume() {
        assert_eq!(
            DirtyMap::path_for(Path::new("/a/b/user.img")),
            PathBuf::from("/a/b/user.img.dirty")
        );
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("m.dirty");
        let mut stamped = with_bits(130, &[0, 63, 64, 129], Some("ws/user/2026.json"), false);
        stamped.stamp = VolumeStamp {
            ino: 1,
            size: 2,
            mtime_ns: 3,
        };
        for m in [
            stamped,
            with_bits(1, &[], None, true),
            with_bits(0, &[], Some(""), false),
        ] {
            m.store(&p).expect("store");
            assert_eq!(DirtyMap::load(&p).expect("load"), Some(m.clone()));
        }
        assert_eq!(
            with_bits(130, &[0, 63, 64, 129], None, false).changed(),
            vec![0, 63, 64, 129]
        );
    }

    /// Stores `m` as the map of `vol`, stamped with the volume as it is now.
    fn store_for(vol: &Path, mut m: DirtyMap) {
        m.stamp = VolumeStamp::of(vol).expect("stamp");
        m.store(&DirtyMap::path_for(vol)).expect("store");
    }

    #[test]
    fn clean_map_reports_its_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), 100);
        store_for(&vol, with_bits(100, &[3, 99], Some("s1"), false));
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("changes"),
            Changes::Since {
                base: "s1".into(),
                chunks: vec![3, 99]
            }
        );
    }

    #[test]
    fn a_volume_written_since_the_map_is_unknown() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), 100);
        store_for(&vol, with_bits(100, &[3], Some("s1"), false));
        // An offline rekey or a restore in place: mtime moves (set explicitly, as a
        // coarse filesystem clock might not tick between the two writes).
        let f = OpenOptions::new().write(true).open(&vol).expect("open");
        f.write_all_at(&[1], 5 * CHUNK_BYTES).expect("write");
        f.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .expect("set mtime");
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("written"),
            Changes::Unknown
        );
        // A new volume file at the same path.
        store_for(&vol, with_bits(100, &[3], Some("s1"), false));
        let stamp = VolumeStamp::of(&vol).expect("stamp");
        std::fs::rename(&vol, dir.path().join("old.img")).expect("rename");
        let vol = volume(dir.path(), 100);
        let f = OpenOptions::new().write(true).open(&vol).expect("open");
        f.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .expect("set mtime");
        assert_ne!(VolumeStamp::of(&vol).expect("stamp").ino, stamp.ino);
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("replaced"),
            Changes::Unknown
        );
    }

    #[test]
    fn missing_in_use_baseless_or_resized_map_is_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), 100);
        let map = DirtyMap::path_for(&vol);
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("missing"),
            Changes::Unknown
        );
        assert!(!map.exists(), "loading creates nothing");
        store_for(&vol, with_bits(100, &[3], Some("s1"), true));
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("in use"),
            Changes::Unknown
        );
        store_for(&vol, with_bits(100, &[3], None, false));
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("no base"),
            Changes::Unknown
        );
        store_for(&vol, with_bits(101, &[3], Some("s1"), false));
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("resized"),
            Changes::Unknown
        );
    }

    #[test]
    fn corrupt_map_is_unknown() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), 100);
        let map = DirtyMap::path_for(&vol);
        store_for(&vol, with_bits(100, &[3], Some("s1"), false));
        let good = std::fs::read(&map).expect("read");
        // A flipped bitmap bit, a truncation, garbage: each would hide or invent changes.
        let mut flipped = good.clone();
        let at = flipped.len() - 33;
        flipped[at] ^= 1;
        for bad in [
            flipped,
            good[..good.len() - 1].to_vec(),
            b"garbage".to_vec(),
        ] {
            std::fs::write(&map, &bad).expect("write");
            assert!(matches!(
                DirtyMap::load(&map),
                Err(DirtyError::Corrupt { .. })
            ));
            assert_eq!(
                DirtyMap::load_changes(&vol).expect("corrupt"),
                Changes::Unknown
            );
        }
    }

    #[test]
    fn reset_writes_a_clean_empty_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vol = volume(dir.path(), 100);
        with_bits(100, &[1, 2], Some("old"), true)
            .store(&DirtyMap::path_for(&vol))
            .expect("store");
        DirtyMap::reset(&vol, 100, "new").expect("reset");
        assert_eq!(
            DirtyMap::load_changes(&vol).expect("changes"),
            Changes::Since {
                base: "new".into(),
                chunks: vec![]
            }
        );
        assert!(!dir.path().join("vol.img.dirty.tmp").exists());
    }

    #[test]
    fn overlong_base_is_refused() {
        let m = with_bits(1, &[], Some(&"x".repeat(MAX_BASE + 1)), false);
        assert!(matches!(
            m.store(Path::new("/nonexistent/m")),
            Err(DirtyError::BaseTooLong(_))
        ));
    }
}
