//! The asynchronous path of a [`Device`]: aligned whole-sector requests on a file served
//! with `--cache none` go to an [`IoEngine`] and are answered from its completion, so the
//! FUSE thread that took a request is free for the next one and the queue depth an
//! application uses reaches the disk.
//!
//! A request takes its range lock exactly as the synchronous path does and owns it
//! ([`OwnedRangeGuard`]) until its I/O has completed: a discard, a rekey fence or a
//! snapshot drain of the range waits for it, and overlapping requests are ordered as
//! before. A write is encrypted, announced to the write observer, and then submitted; a
//! read is decrypted in place on completion. Both use the transform current at the time,
//! which the held range lock keeps consistent for the range (the rekey boundary moves only
//! under the write lock of the zone it crosses). Everything else (partial sectors,
//! unaligned requests, `--cache writeback`, memory backings) keeps the synchronous path.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use super::{Device, DeviceError, LockedStripes};
use crate::backing::aligned::{AlignedBuf, is_aligned};
use crate::backing::uring::{BackingIo, IoEngine, IoKind, IoRequest, UringError};
use crate::backing::{BackingError, CacheMode};

/// A byte range's stripe locks owned by a request in flight; released on drop.
pub struct OwnedRangeGuard {
    device: Arc<Device>,
    locked: LockedStripes,
}

impl OwnedRangeGuard {
    /// Locks `range` of `device` shared (`exclusive == false`) or exclusively, as
    /// [`Device::lock_read`] and [`Device::lock_write`] do.
    #[must_use]
    pub fn lock(device: &Arc<Device>, range: &Range<u64>, exclusive: bool) -> Self {
        Self {
            device: Arc::clone(device),
            locked: device.lock_stripes(range, exclusive),
        }
    }
}

impl Drop for OwnedRangeGuard {
    fn drop(&mut self) {
        // SAFETY: `locked` came from `lock_stripes` on this device and is released once.
        unsafe { self.device.unlock_stripes(&self.locked) };
    }
}

/// A device's asynchronous path: the engine and the `O_DIRECT` file requests go to.
#[derive(Debug, Clone)]
pub struct AsyncDevice {
    device: Arc<Device>,
    engine: Arc<IoEngine>,
    file: Arc<File>,
    /// Every offset and length on this path is a multiple of this.
    align: u64,
}

impl AsyncDevice {
    /// The asynchronous path of `device`, when its backing is a file served with
    /// `--cache none`; `None` otherwise (the synchronous path serves everything).
    #[must_use]
    pub fn new(device: Arc<Device>, engine: Arc<IoEngine>) -> Option<Self> {
        let backing = device.backing();
        if backing.cache() != CacheMode::None {
            return None;
        }
        let target = backing.async_target()?;
        let align = target.align.max(device.geo.sector_size.bytes_u64());
        if target.align <= 1 || !is_aligned(device.geo.data_offset, align) {
            return None;
        }
        Some(Self {
            device,
            engine,
            file: target.file,
            align,
        })
    }

    /// The device.
    #[must_use]
    pub fn device(&self) -> &Arc<Device> {
        &self.device
    }

    /// Whether a request of `len` bytes at `offset` takes this path: non-empty, inside
    /// the volume, and aligned for the direct descriptor (whole sectors).
    #[must_use]
    pub fn admits(&self, offset: u64, len: u64) -> bool {
        len > 0
            && offset
                .checked_add(len)
                .is_some_and(|end| end <= self.device.size())
            && is_aligned(offset, self.align)
            && is_aligned(len, self.align)
    }

    /// Reads `len` bytes at `offset` (a request [`AsyncDevice::admits`]); `done` gets the
    /// plaintext once the read has completed.
    pub fn read(
        &self,
        offset: u64,
        len: usize,
        done: impl FnOnce(Result<AlignedBuf, DeviceError>) + Send + 'static,
    ) {
        let span = offset..offset + len as u64;
        let guard = OwnedRangeGuard::lock(&self.device, &span, false);
        let at = self.device.geo.data_offset + offset;
        let req = IoRequest {
            kind: IoKind::Read,
            file: Arc::clone(&self.file),
            offset: at,
            buf: AlignedBuf::zeroed(len),
        };
        let device = Arc::clone(&self.device);
        self.engine.submit(req, move |mut buf, r| {
            let r = r
                .map_err(|e| {
                    DeviceError::Backing(BackingError::transfer(
                        &**device.backing(),
                        "read",
                        at,
                        len as u64,
                        e,
                    ))
                })
                .and_then(|()| device.decrypt(&mut buf, offset));
            // Answered before the range is let go: nothing overtakes a request that
            // has not been answered.
            done(r.map(|()| buf));
            drop(guard);
        });
    }

    /// Writes `data` at `offset` (a request [`AsyncDevice::admits`]); `done` runs once the
    /// ciphertext has reached the file.
    pub fn write(
        &self,
        offset: u64,
        data: &[u8],
        done: impl FnOnce(Result<(), DeviceError>) + Send + 'static,
    ) {
        let span = offset..offset + data.len() as u64;
        let guard = OwnedRangeGuard::lock(&self.device, &span, true);
        let mut buf = AlignedBuf::zeroed(data.len());
        buf.copy_from_slice(data);
        if let Err(e) = self.device.encrypt(&mut buf, offset) {
            drop(guard);
            return done(Err(e));
        }
        self.device.before_write(offset, data.len() as u64);
        let at = self.device.geo.data_offset + offset;
        let len = data.len() as u64;
        let req = IoRequest {
            kind: IoKind::Write,
            file: Arc::clone(&self.file),
            offset: at,
            buf,
        };
        let device = Arc::clone(&self.device);
        self.engine.submit(req, move |_, r| {
            let r = r.map_err(|e| {
                DeviceError::Backing(BackingError::transfer(
                    &**device.backing(),
                    "write",
                    at,
                    len,
                    e,
                ))
            });
            done(r);
            drop(guard);
        });
    }
}

/// The engine `mode` asks for, given the served devices: `None` for the synchronous
/// path ([`BackingIo::Sync`], or [`BackingIo::Auto`] when a file is not in
/// `--cache none` or the kernel refuses io_uring).
///
/// # Errors
/// [`BackingIo::Uring`] when io_uring cannot be set up.
pub fn engine_for(
    mode: BackingIo,
    devices: &[Arc<Device>],
) -> Result<Option<Arc<IoEngine>>, UringError> {
    let new = || IoEngine::new(crate::backing::uring::DEFAULT_DEPTH).map(Arc::new);
    match mode {
        BackingIo::Sync => Ok(None),
        BackingIo::Uring => new().map(Some),
        BackingIo::Auto => {
            let all_direct = !devices.is_empty()
                && devices
                    .iter()
                    .all(|d| d.backing().cache() == CacheMode::None);
            if !all_direct {
                return Ok(None);
            }
            match new() {
                Ok(e) => Ok(Some(e)),
                Err(e) => {
                    tracing::info!("{e}: serving with synchronous backing I/O");
                    Ok(None)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
