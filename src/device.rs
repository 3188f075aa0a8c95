//! The block device: plaintext byte ranges over encrypted sectors of a [`Backing`].
//!
//! Owns the sector arithmetic (aligning any byte range to sectors, read-modify-write of
//! partial sectors), the per-range locking that makes concurrent requests safe, the
//! "unwritten sectors read as zeros" rule (EBS semantics: a sector whose ciphertext is all
//! zeros is a hole and reads as plaintext zeros; writing an all-zero sector stores a hole),
//! and parallel crypto for large requests. The cipher itself lives in [`crate::xts`].
//!
//! Holes reveal which sectors have never been written or were discarded, as dm-crypt does
//! with discards enabled; see the threat model.

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};

use parking_lot::RawRwLock;
use parking_lot::lock_api::RawRwLock as _;

use crate::backing::aligned::AlignedBuf;
use crate::backing::{Backing, BackingError};
use crate::xts::{SectorCipher, SectorSize, XtsError};

/// Bytes covered by one lock stripe.
const STRIPE_BYTES: u64 = 64 * 1024;
/// Number of lock stripes (a power of two).
const STRIPES: usize = 1024;

/// Errors from device I/O.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A request that reaches past the end of the volume.
    #[error(
        "request at offset {offset} of {len} bytes is beyond the end of the {size}-byte volume"
    )]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Volume size.
        size: u64,
    },
    /// The backing failed.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// The cipher refused a buffer (a bug: the device aligns every request).
    #[error(transparent)]
    Cipher(#[from] XtsError),
}

/// Errors from the rekey transitions of a device's transform.
#[derive(Debug, thiserror::Error)]
pub enum CryptStateError {
    /// A rekey operation on a device that is not in the matching state.
    #[error(
        "the device is not in the state this rekey step needs (plain volume, a rekey already running, or none in progress)"
    )]
    WrongState,
    /// The cipher refused a buffer (a bug: callers pass whole sectors).
    #[error(transparent)]
    Cipher(#[from] XtsError),
    /// A snapshot of the device is being taken: a rekey would rewrite chunks the
    /// snapshot still has to read.
    #[error("a snapshot of this volume is running; start the rekey once it has finished")]
    SnapshotRunning,
}

/// Told about every change the device makes to its backing (see
/// [`Device::observe_writes`]): the seam between the device and snapshot change tracking
/// ([`crate::agent::snapshot`]).
pub trait WriteObserver: Send + Sync {
    /// `range` (bytes of the backing, i.e. of the volume file) is about to be written or
    /// punched. Called with the range's stripe write lock held, before the backing sees
    /// the change. Must not fail the write: an observer that cannot keep up records its
    /// own failure.
    fn before_write(&self, range: Range<u64>);
    /// A rekey is about to start rewriting every sector outside the stripe locks;
    /// `false` refuses it.
    fn before_rekey(&self) -> bool;
    /// The rekey that [`WriteObserver::before_rekey`] announced finished or did not start.
    fn after_rekey(&self);
}

/// How sectors are transformed between the backing and the caller: a closed set.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "one value per device; boxing would add an indirection per request"
)]
pub enum Crypt {
    /// No cipher: the unencrypted volume, the benchmark baseline (same code path).
    Plain,
    /// XTS-AES-256 with plain64 tweaks.
    Xts(SectorCipher),
    /// A rekey is in progress (see [`crate::rekey`]): sectors below `boundary` (a
    /// data-relative byte offset, sector-aligned) are under the `new` key, the rest under
    /// the `old` one. The boundary only moves while the rekey holds the write lock of the
    /// hotzone it just finished, so every request sees one consistent split.
    Rekeying {
        /// The key being retired.
        old: SectorCipher,
        /// The key being rolled out.
        new: SectorCipher,
        /// First byte still under `old`.
        boundary: u64,
    },
}

impl Crypt {
    /// Encrypts (`encrypt`) or decrypts whole sectors at data offset `at` in place; holes
    /// (all-zero sectors) are left alone.
    fn apply(&self, buf: &mut [u8], at: u64, ss: usize, encrypt: bool) -> Result<(), XtsError> {
        let first = at / ss as u64;
        let run = |cipher: &SectorCipher, run: &mut [u8], sector: u64| {
            if encrypt {
                cipher.par_encrypt_sectors(run, sector)
            } else {
                cipher.par_decrypt_sectors(run, sector)
            }
        };
        match self {
            Self::Plain => Ok(()),
            Self::Xts(cipher) => for_each_run(buf, ss, |i, r| run(cipher, r, first + i as u64)),
            Self::Rekeying { old, new, boundary } => {
                // Sectors [first, split) are under `new`, the rest under `old`.
                let split = (boundary / ss as u64).clamp(first, first + (buf.len() / ss) as u64);
                let at_split = usize::try_from(split - first).expect("bounded by buf.len()") * ss;
                let (below, above) = buf.split_at_mut(at_split);
                for_each_run(below, ss, |i, r| run(new, r, first + i as u64))?;
                for_each_run(above, ss, |i, r| run(old, r, split + i as u64))
            }
        }
    }
}

/// Geometry of the data area inside the backing.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Byte offset of sector 0 in the backing.
    pub data_offset: u64,
    /// Data size in bytes (a multiple of the sector size).
    pub size: u64,
    /// Sector size.
    pub sector_size: SectorSize,
}

/// A plaintext view of a volume's data area.
pub struct Device {
    backing: Arc<dyn Backing>,
    crypt: RwLock<Crypt>,
    geo: Geometry,
    /// Raw locks, so that a guard can own its locks past a borrow of the device (the
    /// asynchronous path holds them until its I/O completes, see [`async_io`]).
    stripes: Vec<RawRwLock>,
    /// The rekey's hotzone, while one is being rewritten: I/O overlapping it waits.
    /// Unlike the stripe locks, which alias every `STRIPES × STRIPE_BYTES`, the fence
    /// stops only I/O that really touches the zone.
    fence: Mutex<Option<Range<u64>>>,
    fence_lifted: Condvar,
    /// Told about every write and punch before it reaches the backing.
    observer: OnceLock<Arc<dyn WriteObserver>>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("backing", &self.backing.name())
            .field("geometry", &self.geo)
            .finish_non_exhaustive()
    }
}

/// A raised hotzone fence (see [`Device::fence`]); lifted on drop.
pub struct FenceGuard<'a> {
    device: &'a Device,
}

impl Drop for FenceGuard<'_> {
    fn drop(&mut self) {
        *self
            .device
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.device.fence_lifted.notify_all();
    }
}

/// Held stripe locks for a byte range; released on drop.
pub struct RangeGuard<'a> {
    device: &'a Device,
    locked: LockedStripes,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        // SAFETY: `locked` came from `lock_stripes` on this device and is released once.
        unsafe { self.device.unlock_stripes(&self.locked) };
    }
}

/// Stripe ids locked by [`Device::lock_stripes`], in one mode.
struct LockedStripes {
    ids: Vec<usize>,
    exclusive: bool,
}

impl Device {
    /// A device over `backing` with the given geometry and transform.
    #[must_use]
    pub fn new(backing: Arc<dyn Backing>, geo: Geometry, crypt: Crypt) -> Self {
        Self {
            backing,
            crypt: RwLock::new(crypt),
            geo,
            stripes: (0..STRIPES).map(|_| RawRwLock::INIT).collect(),
            fence: Mutex::new(None),
            fence_lifted: Condvar::new(),
            observer: OnceLock::new(),
        }
    }

    /// Installs the observer told about every write and punch from now on (and asked
    /// before a rekey starts). One per device.
    ///
    /// # Errors
    /// The observer given back when the device already has one.
    pub fn observe_writes(
        &self,
        observer: Arc<dyn WriteObserver>,
    ) -> Result<(), Arc<dyn WriteObserver>> {
        self.observer.set(observer)
    }

    fn before_write(&self, at: u64, len: u64) {
        if let Some(o) = self.observer.get() {
            let start = self.geo.data_offset + at;
            o.before_write(start..start + len);
        }
    }

    /// Volume size in bytes.
    #[must_use]
    pub fn size(&self) -> u64 {
        self.geo.size
    }

    /// The geometry.
    #[must_use]
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Whether sectors are encrypted.
    #[must_use]
    pub fn is_encrypted(&self) -> bool {
        !matches!(
            *self.crypt.read().expect("crypt lock is never poisoned"),
            Crypt::Plain
        )
    }

    /// The rekey boundary while a rekey is in progress (see [`Crypt::Rekeying`]).
    #[must_use]
    pub fn rekey_boundary(&self) -> Option<u64> {
        match &*self.crypt.read().expect("crypt lock is never poisoned") {
            Crypt::Rekeying { boundary, .. } => Some(*boundary),
            _ => None,
        }
    }

    /// Switches an encrypted device into rekey mode with the boundary at 0 (every sector
    /// still under the old key, so no range lock is needed).
    ///
    /// # Errors
    /// [`CryptStateError::WrongState`] unless the device is [`Crypt::Xts`];
    /// [`CryptStateError::SnapshotRunning`] while the observer refuses.
    pub fn begin_rekey(&self, new: SectorCipher) -> Result<(), CryptStateError> {
        let observer = self.observer.get();
        if observer.is_some_and(|o| !o.before_rekey()) {
            return Err(CryptStateError::SnapshotRunning);
        }
        let mut crypt = self.crypt.write().expect("crypt lock is never poisoned");
        match std::mem::replace(&mut *crypt, Crypt::Plain) {
            Crypt::Xts(old) => {
                *crypt = Crypt::Rekeying {
                    old,
                    new,
                    boundary: 0,
                };
                Ok(())
            }
            other => {
                let rekeying = matches!(other, Crypt::Rekeying { .. });
                *crypt = other;
                if !rekeying && let Some(o) = observer {
                    o.after_rekey();
                }
                Err(CryptStateError::WrongState)
            }
        }
    }

    /// Moves the rekey boundary. The caller holds the write lock of every byte between
    /// the old and the new boundary.
    ///
    /// # Errors
    /// [`CryptStateError::WrongState`] if no rekey is in progress.
    pub fn set_rekey_boundary(&self, to: u64) -> Result<(), CryptStateError> {
        match &mut *self.crypt.write().expect("crypt lock is never poisoned") {
            Crypt::Rekeying { boundary, .. } => {
                *boundary = to;
                Ok(())
            }
            _ => Err(CryptStateError::WrongState),
        }
    }

    /// Ends a finished rekey: the device serves every sector under the new key (the old
    /// key schedule is wiped on drop).
    ///
    /// # Errors
    /// [`CryptStateError::WrongState`] if no rekey is in progress.
    pub fn finish_rekey(&self) -> Result<(), CryptStateError> {
        let mut crypt = self.crypt.write().expect("crypt lock is never poisoned");
        match std::mem::replace(&mut *crypt, Crypt::Plain) {
            Crypt::Rekeying { new, .. } => {
                *crypt = Crypt::Xts(new);
                drop(crypt);
                if let Some(o) = self.observer.get() {
                    o.after_rekey();
                }
                Ok(())
            }
            other => {
                *crypt = other;
                Err(CryptStateError::WrongState)
            }
        }
    }

    /// Re-encrypts raw ciphertext sectors at data offset `at` from the old key to the new
    /// one, in place (holes stay holes). The caller holds the range's write lock and the
    /// range lies at or above the rekey boundary.
    ///
    /// # Errors
    /// [`CryptStateError::WrongState`] if no rekey is in progress; cipher errors.
    pub fn rekey_sectors(&self, at: u64, buf: &mut [u8]) -> Result<(), CryptStateError> {
        let crypt = self.crypt.read().expect("crypt lock is never poisoned");
        let Crypt::Rekeying { old, new, .. } = &*crypt else {
            return Err(CryptStateError::WrongState);
        };
        let ss = self.geo.sector_size.bytes();
        let first = at / ss as u64;
        for_each_run(buf, ss, |i, run| {
            old.par_recrypt_sectors(new, run, first + i as u64)
        })?;
        Ok(())
    }

    /// The backing.
    #[must_use]
    pub fn backing(&self) -> &Arc<dyn Backing> {
        &self.backing
    }

    /// Replaces the transform (wiping the old key schedule on drop). The caller must hold
    /// whatever range locks make this safe.
    pub fn set_crypt(&self, crypt: Crypt) {
        *self.crypt.write().expect("crypt lock is never poisoned") = crypt;
    }

    fn stripe_ids(&self, range: &Range<u64>) -> Vec<usize> {
        if range.is_empty() {
            return Vec::new();
        }
        let first = range.start / STRIPE_BYTES;
        let last = (range.end - 1) / STRIPE_BYTES;
        let mut ids: Vec<usize> = if last - first + 1 >= STRIPES as u64 {
            (0..STRIPES).collect()
        } else {
            // Masked to STRIPES - 1, which fits any usize.
            #[allow(clippy::cast_possible_truncation)]
            (first..=last)
                .map(|s| (s as usize) & (STRIPES - 1))
                .collect()
        };
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Locks a byte range shared (concurrent readers) — sorted order, so no deadlock —
    /// waiting while it overlaps a raised fence.
    pub fn lock_read(&self, range: &Range<u64>) -> RangeGuard<'_> {
        RangeGuard {
            device: self,
            locked: self.lock_stripes(range, false),
        }
    }

    /// Locks a byte range exclusively, waiting while it overlaps a raised fence.
    pub fn lock_write(&self, range: &Range<u64>) -> RangeGuard<'_> {
        RangeGuard {
            device: self,
            locked: self.lock_stripes(range, true),
        }
    }

    /// Takes the stripe locks of `range` in sorted order, then checks the fence: if
    /// `range` overlaps it, lets the locks go, waits for the fence to lift and tries
    /// again.
    fn lock_stripes(&self, range: &Range<u64>, exclusive: bool) -> LockedStripes {
        loop {
            let locked = LockedStripes {
                ids: self.stripe_ids(range),
                exclusive,
            };
            for &i in &locked.ids {
                if exclusive {
                    self.stripes[i].lock_exclusive();
                } else {
                    self.stripes[i].lock_shared();
                }
            }
            if !self.fenced(range) {
                return locked;
            }
            // SAFETY: just locked above, released once.
            unsafe { self.unlock_stripes(&locked) };
            self.wait_for_fence(range);
        }
    }

    /// Releases stripe locks.
    ///
    /// # Safety
    /// `locked` was returned by [`Device::lock_stripes`] of this device, and is released
    /// only this once.
    unsafe fn unlock_stripes(&self, locked: &LockedStripes) {
        for &i in &locked.ids {
            // SAFETY: the caller guarantees this thread's request holds the lock in
            // this mode (raw locks are not tied to the locking thread).
            unsafe {
                if locked.exclusive {
                    self.stripes[i].unlock_exclusive();
                } else {
                    self.stripes[i].unlock_shared();
                }
            }
        }
    }

    /// Raises a fence over `zone` for the rekey: returns once no I/O touches the zone,
    /// and until the guard drops, I/O overlapping it waits while everything else runs.
    /// One fence at a time (the rekey is one job per device).
    ///
    /// Why it is exclusive: I/O checks the fence *after* taking its stripe locks, and the
    /// fence is raised *before* the zone's stripes are drained (each taken for writing
    /// and released), so an I/O either finished before the drain or sees the fence.
    pub fn fence(&self, zone: &Range<u64>) -> FenceGuard<'_> {
        {
            let mut f = self
                .fence
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            debug_assert!(f.is_none(), "one fence at a time");
            *f = Some(zone.clone());
        }
        for i in self.stripe_ids(zone) {
            self.stripes[i].lock_exclusive();
            // SAFETY: locked exclusively on the line above.
            unsafe { self.stripes[i].unlock_exclusive() };
        }
        FenceGuard { device: self }
    }

    fn fenced(&self, range: &Range<u64>) -> bool {
        self.fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|z| z.start < range.end && range.start < z.end)
    }

    fn wait_for_fence(&self, range: &Range<u64>) {
        let f = self
            .fence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _f = self
            .fence_lifted
            .wait_while(f, |z| {
                z.as_ref()
                    .is_some_and(|z| z.start < range.end && range.start < z.end)
            })
            .unwrap_or_else(std::sync::PoisonError::into_inner);
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.geo.size => Ok(()),
            _ => Err(DeviceError::OutOfRange {
                offset,
                len,
                size: self.geo.size,
            }),
        }
    }

    /// The sector-aligned span covering `[offset, offset+len)`.
    fn aligned(&self, offset: u64, len: u64) -> Range<u64> {
        let ss = self.geo.sector_size.bytes_u64();
        let start = offset / ss * ss;
        let end = (offset + len).div_ceil(ss) * ss;
        start..end
    }

    /// Reads up to `buf.len()` bytes at `offset`; returns the count (short only at the end).
    ///
    /// # Errors
    /// Backing failure. Reads starting past the end return 0.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<usize, DeviceError> {
        if offset >= self.geo.size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(self.geo.size - offset);
        let span = self.aligned(offset, len);
        let _guard = self.lock_read(&span);
        let n = usize::try_from(len).expect("len <= buf.len()");
        if span.start == offset && span.end == offset + len {
            self.read_sectors(span.start, &mut buf[..n])?;
        } else {
            let mut tmp = AlignedBuf::zeroed(
                usize::try_from(span.end - span.start).expect("bounded by request"),
            );
            self.read_sectors(span.start, &mut tmp)?;
            let skip = usize::try_from(offset - span.start).expect("less than a sector");
            buf[..n].copy_from_slice(&tmp[skip..skip + n]);
        }
        Ok(n)
    }

    /// Writes all of `data` at `offset` (read-modify-write for partial sectors).
    ///
    /// # Errors
    /// [`DeviceError::OutOfRange`] past the end; backing failure.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if data.is_empty() {
            return Ok(());
        }
        let span = self.aligned(offset, len);
        let _guard = self.lock_write(&span);
        // Aligned, so that `--cache none` sends it to the disk directly.
        let mut tmp =
            AlignedBuf::zeroed(usize::try_from(span.end - span.start).expect("bounded by request"));
        let ss = self.geo.sector_size.bytes_u64();
        let head_partial = offset != span.start;
        let tail_partial = offset + len != span.end;
        if head_partial {
            self.read_sectors(span.start, &mut tmp[..self.geo.sector_size.bytes()])?;
        }
        if tail_partial && (span.end - span.start > ss || !head_partial) {
            let at = tmp.len() - self.geo.sector_size.bytes();
            self.read_sectors(span.end - ss, &mut tmp[at..])?;
        }
        let skip = usize::try_from(offset - span.start).expect("less than a sector");
        tmp[skip..skip + data.len()].copy_from_slice(data);
        self.write_sectors(span.start, &mut tmp)
    }

    /// Discards a byte range: whole sectors become holes (punched in the backing), partial
    /// edges are zeroed by read-modify-write. Reads of the range then return zeros.
    ///
    /// # Errors
    /// Out of range or backing failure.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.check_range(offset, len)?;
        let ss = self.geo.sector_size.bytes_u64();
        let inner = offset.div_ceil(ss) * ss..(offset + len) / ss * ss;
        if inner.start >= inner.end {
            return self.write_zeros(offset, len);
        }
        self.write_zeros(offset, inner.start - offset)?;
        {
            let _guard = self.lock_write(&inner);
            self.before_write(inner.start, inner.end - inner.start);
            self.backing
                .punch_hole(self.geo.data_offset + inner.start, inner.end - inner.start)?;
        }
        self.write_zeros(inner.end, offset + len - inner.end)
    }

    fn write_zeros(&self, offset: u64, len: u64) -> Result<(), DeviceError> {
        if len == 0 {
            return Ok(());
        }
        self.write(
            offset,
            &vec![0u8; usize::try_from(len).expect("less than a sector")],
        )
    }

    /// Makes every completed write durable.
    ///
    /// # Errors
    /// Backing failure: nothing may be acknowledged as durable.
    pub fn flush(&self) -> Result<(), DeviceError> {
        Ok(self.backing.flush()?)
    }

    /// Reads and decrypts whole sectors at the aligned data offset `at`. The caller holds
    /// the range lock.
    pub fn read_sectors(&self, at: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.backing.read_at(buf, self.geo.data_offset + at)?;
        self.decrypt(buf, at)
    }

    /// Decrypts whole sectors in place at the aligned data offset `at`, with the
    /// transform current now (the caller holds the range lock).
    fn decrypt(&self, buf: &mut [u8], at: u64) -> Result<(), DeviceError> {
        let crypt = self.crypt.read().expect("crypt lock is never poisoned");
        Ok(crypt.apply(buf, at, self.geo.sector_size.bytes(), false)?)
    }

    /// Encrypts whole sectors in place at the aligned data offset `at`, with the
    /// transform current now (the caller holds the range lock).
    fn encrypt(&self, buf: &mut [u8], at: u64) -> Result<(), DeviceError> {
        let crypt = self.crypt.read().expect("crypt lock is never poisoned");
        Ok(crypt.apply(buf, at, self.geo.sector_size.bytes(), true)?)
    }

    /// Encrypts (in place, clobbering `buf`) and writes whole sectors at the aligned data
    /// offset `at`. All-zero plaintext sectors are stored as holes. The caller holds the
    /// range lock.
    pub fn write_sectors(&self, at: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.encrypt(buf, at)?;
        self.before_write(at, buf.len() as u64);
        self.backing.write_at(buf, self.geo.data_offset + at)?;
        Ok(())
    }
}

/// Calls `f(first_sector_index, run)` for each maximal run of sectors that are not all
/// zeros; all-zero sectors (holes) are left untouched.
fn for_each_run(
    buf: &mut [u8],
    ss: usize,
    mut f: impl FnMut(usize, &mut [u8]) -> Result<(), XtsError>,
) -> Result<(), XtsError> {
    let sectors = buf.len() / ss;
    let mut i = 0;
    while i < sectors {
        if is_zero(&buf[i * ss..(i + 1) * ss]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < sectors && !is_zero(&buf[i * ss..(i + 1) * ss]) {
            i += 1;
        }
        f(start, &mut buf[start * ss..i * ss])?;
    }
    Ok(())
}

/// Whether a sector is all zeros (word-wise; sectors are multiples of 16 bytes).
pub(crate) fn is_zero(sector: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u128 has no invalid bit patterns; align_to returns correctly aligned
        // middle slice and unaligned head/tail.
        unsafe { sector.align_to::<u128>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

pub mod async_io;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod concurrent_model_tests;
