//! The answers behind the FUSE callbacks, shared by fuser's `/dev/fuse` threads (the
//! [`Filesystem`](fuser::Filesystem) impl in the parent module) and the io_uring
//! transport ([`crate::fuse_uring`]): each takes decoded arguments and returns a typed
//! answer or an errno, so both transports answer alike.

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use fuser::{Errno, FileAttr, FileType, FopenFlags, INodeNo};

use super::{Fallocate, ROOT, TTL, VolumeFs, errno, settle};
use crate::metrics::IoOp;

/// What a SETATTR asks to change, as far as the answer depends on it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AttrChange {
    /// A new mode was asked for.
    pub mode: bool,
    /// A new owner or group was asked for.
    pub owner: bool,
    /// A new size, if one was asked for.
    pub size: Option<u64>,
}

/// One directory entry of the mount's root, as READDIR lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DirEntry {
    /// Its inode.
    pub ino: u64,
    /// The offset that continues the listing after it.
    pub next_offset: u64,
    /// Directory or regular file.
    pub kind: FileType,
    /// Its name.
    pub name: String,
}

/// The numbers of a STATFS answer, in `statfs(2)` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatfsNumbers {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

impl VolumeFs {
    /// Asks the kernel for `FUSE_OVER_IO_URING` at INIT; `granted` tells afterwards
    /// whether it offered the flag (and so took it).
    #[must_use]
    pub fn with_uring(mut self, granted: Arc<AtomicBool>) -> Self {
        self.uring = Some(granted);
        self
    }

    /// Another handle on the same exports, owner and timestamps, for a second transport.
    /// It serves every request synchronously (the ring dispatcher calls the devices
    /// directly), so it takes no share of the backing I/O engine.
    #[must_use]
    pub(crate) fn share(&self) -> Self {
        Self {
            paths: self.exports.iter().map(|_| None).collect(),
            engine: None,
            exports: self.exports.clone(),
            uid: self.uid,
            gid: self.gid,
            started: self.started,
            uring: None,
        }
    }

    /// The user the mount belongs to (fuser's `SessionACL::Owner`).
    pub(crate) fn owner_uid(&self) -> u32 {
        self.uid
    }

    /// How long the kernel may cache entries and attributes.
    pub(crate) const fn ttl() -> Duration {
        TTL
    }

    pub(crate) fn lookup_attr(&self, parent: u64, name: &OsStr) -> Result<FileAttr, Errno> {
        if parent != ROOT {
            return Err(Errno::ENOENT);
        }
        let found = self
            .exports
            .iter()
            .position(|e| OsStr::new(&e.name) == name);
        found
            .and_then(|i| self.attr(ROOT + 1 + i as u64))
            .ok_or(Errno::ENOENT)
    }

    pub(crate) fn getattr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.attr(ino).ok_or(Errno::ENOENT)
    }

    pub(crate) fn setattr_of(&self, ino: u64, change: AttrChange) -> Result<FileAttr, Errno> {
        let attr = self.attr(ino).ok_or(Errno::ENOENT)?;
        // A volume has a fixed size and owner; timestamps are accepted and ignored.
        if change.size.is_some_and(|s| s != attr.size) || change.mode || change.owner {
            return Err(Errno::EPERM);
        }
        Ok(attr)
    }

    pub(crate) fn open_flags(&self, ino: u64) -> Result<FopenFlags, Errno> {
        if self.export(INodeNo(ino)).is_none() {
            return Err(Errno::EISDIR);
        }
        Ok(FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES)
    }

    /// READ into `buf` (at most [`super::MAX_WRITE`] bytes), counted like the fuser callback.
    pub(crate) fn read_export(
        &self,
        ino: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, Errno> {
        let e = self.export(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let _busy = e.start();
        let at = (offset, buf.len());
        settle(
            e.io.as_ref(),
            &e.name,
            IoOp::Read,
            at,
            e.device.read(offset, buf),
            |&n| n as u64,
        )
    }

    /// WRITE of `data` (at most [`super::MAX_WRITE`] bytes), counted like the fuser callback.
    pub(crate) fn write_export(&self, ino: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let e = self.export(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let len = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        let _busy = e.start();
        let written = e.device.write(offset, data);
        settle(
            e.io.as_ref(),
            &e.name,
            IoOp::Write,
            (offset, data.len()),
            written,
            |()| u64::from(len),
        )?;
        Ok(len)
    }

    pub(crate) fn fsync_export(&self, ino: u64) -> Result<(), Errno> {
        let e = self.export(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let _busy = e.start();
        match e.device.flush() {
            Ok(()) => {
                e.count(IoOp::Flush, Ok(0));
                Ok(())
            }
            Err(err) => {
                e.count(IoOp::Flush, Err(()));
                tracing::error!("fsync {}: {err}", e.name);
                Err(errno(&err))
            }
        }
    }

    pub(crate) fn fallocate_export(
        &self,
        ino: u64,
        offset: u64,
        length: u64,
        mode: i32,
    ) -> Result<(), Errno> {
        let e = self.export(INodeNo(ino)).ok_or(Errno::ENOENT)?;
        let _busy = e.start();
        let result = match Fallocate::from(mode) {
            Fallocate::Discard => {
                let r = e.device.discard(offset, length);
                e.count(IoOp::Discard, r.as_ref().map(|()| length).map_err(|_| ()));
                r
            }
            // Preallocation inside the fixed size is a no-op; growing is not allowed.
            Fallocate::Preallocate => {
                if offset
                    .checked_add(length)
                    .is_some_and(|end| end <= e.device.size())
                {
                    Ok(())
                } else {
                    return Err(Errno::ENOSPC);
                }
            }
            Fallocate::Unsupported(_) => return Err(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        result.map_err(|err| errno(&err))
    }

    /// The root's entries from `offset` on (`.`, `..`, then one per export).
    pub(crate) fn dir_entries(&self, ino: u64, offset: u64) -> Result<Vec<DirEntry>, Errno> {
        if ino != ROOT {
            return Err(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        for (i, e) in self.exports.iter().enumerate() {
            entries.push((ROOT + 1 + i as u64, FileType::RegularFile, e.name.clone()));
        }
        Ok(entries
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
            .map(|(i, (ino, kind, name))| DirEntry {
                ino,
                next_offset: i as u64 + 1,
                kind,
                name,
            })
            .collect())
    }

    pub(crate) fn statfs_numbers(&self) -> StatfsNumbers {
        let bytes: u64 = self.exports.iter().map(|e| e.device.size()).sum();
        let files = self.exports.len() as u64;
        StatfsNumbers {
            blocks: bytes / 4096,
            bfree: 0,
            bavail: 0,
            files: files + 1,
            ffree: 0,
            bsize: 4096,
            namelen: 255,
            frsize: 4096,
        }
    }
}
