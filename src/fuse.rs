//! FUSE adapter: serves each attached volume's [`Device`] as one regular file in a
//! directory. Callbacks only translate (inode/handle -> device, error -> errno); all sector
//! math and crypto live in [`crate::device`].
//!
//! With an [`IoEngine`] ([`VolumeFs::with_engine`]), reads and writes that a device's
//! [`AsyncDevice`] admits hand their reply to the I/O's completion and return at once; a
//! write is replied only once its ciphertext reached the file, so an fsync (an
//! `fdatasync` of that file) covers every write replied before it, and a discard waits
//! for writes in flight on its range (their range locks).

use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, INodeNo, InitFlags, KernelConfig,
    LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, WriteFlags,
};

use crate::backing::aligned::AlignedBuf;
use crate::backing::uring::IoEngine;
use crate::device::async_io::AsyncDevice;
use crate::device::{Device, DeviceError};
use crate::metrics::{InFlight, IoOp, OwnedInFlight, VolumeIo};

mod ops;

pub(crate) use ops::AttrChange;

/// Largest write the kernel may send in one request.
pub const MAX_WRITE: u32 = 1024 * 1024;
/// Asynchronous requests the kernel keeps in flight to us (its default is 12).
const MAX_BACKGROUND: u16 = 128;
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

thread_local! {
    /// Each FUSE thread's read buffer (volume plaintext, never keys), at most MAX_WRITE;
    /// aligned, so that `--cache none` reads go to the disk directly.
    static READ_BUF: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::zeroed(0));
}

/// One served file: its name in the mount and its device.
#[derive(Debug, Clone)]
pub struct Export {
    /// File name (`disk`, `root`, `user`).
    pub name: String,
    /// The device behind it.
    pub device: Arc<Device>,
    /// Its metrics counters, when the agent serves metrics.
    pub io: Option<VolumeIo>,
}

impl Export {
    /// An export without metrics.
    #[must_use]
    pub fn new(name: impl Into<String>, device: Arc<Device>) -> Self {
        Self {
            name: name.into(),
            device,
            io: None,
        }
    }

    fn start(&self) -> Option<InFlight<'_>> {
        self.io.as_ref().map(VolumeIo::start)
    }

    fn count(&self, op: IoOp, outcome: Result<u64, ()>) {
        if let Some(io) = &self.io {
            io.done(op, outcome);
        }
    }
}

/// Counts a finished read or write at `at` (offset, length) that moved `moved(&value)`
/// bytes and maps a failure to its errno, logged: the one ending of every read and
/// write, synchronous or not.
fn settle<T>(
    io: Option<&VolumeIo>,
    name: &str,
    op: IoOp,
    at: (u64, usize),
    result: Result<T, DeviceError>,
    moved: impl FnOnce(&T) -> u64,
) -> Result<T, Errno> {
    if let Some(io) = io {
        io.done(op, result.as_ref().map(moved).map_err(|_| ()));
    }
    result.map_err(|err| {
        let verb = if op == IoOp::Write { "write" } else { "read" };
        tracing::error!("{verb} {name}@{}+{}: {err}", at.0, at.1);
        errno(&err)
    })
}

/// What an asynchronous request needs once it completes: its in-flight count (which
/// holds its counters) and its name.
struct Completion {
    busy: Option<OwnedInFlight>,
    name: Arc<str>,
}

impl Completion {
    fn settle<T>(
        &self,
        op: IoOp,
        at: (u64, usize),
        result: Result<T, DeviceError>,
        moved: impl FnOnce(&T) -> u64,
    ) -> Result<T, Errno> {
        let io = self.busy.as_ref().map(OwnedInFlight::io);
        settle(io, &self.name, op, at, result, moved)
    }
}

/// An export's asynchronous path.
#[derive(Debug)]
struct AsyncExport {
    path: AsyncDevice,
    name: Arc<str>,
}

/// The FUSE filesystem: a root directory holding one file per export.
#[derive(Debug)]
pub struct VolumeFs {
    exports: Vec<Export>,
    /// Per export, its asynchronous path (none without an engine).
    paths: Vec<Option<AsyncExport>>,
    engine: Option<Arc<IoEngine>>,
    uid: u32,
    gid: u32,
    started: SystemTime,
    /// Set by [`VolumeFs::with_uring`]: ask for `FUSE_OVER_IO_URING` at INIT and record
    /// here whether the kernel granted it.
    uring: Option<Arc<AtomicBool>>,
}

/// Mount settings derived from DESIGN §5.
#[must_use]
pub fn mount_config(threads: usize) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("sealvol".into()),
        MountOption::Subtype("sealvol".into()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::NoExec,
        MountOption::DefaultPermissions,
    ];
    config.acl = SessionACL::Owner;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    config
}

/// What a `fallocate(2)` mode asks of a served file, parsed from the raw flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fallocate {
    /// Punch a hole or zero a range (with or without `KEEP_SIZE`): discard it.
    Discard,
    /// Plain preallocation (with or without `KEEP_SIZE`): a no-op inside the fixed size.
    Preallocate,
    /// Any other combination of flags.
    Unsupported(i32),
}

impl From<i32> for Fallocate {
    fn from(mode: i32) -> Self {
        const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE;
        const ZERO_KEEP: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match mode {
            PUNCH | ZERO | ZERO_KEEP => Self::Discard,
            0 | libc::FALLOC_FL_KEEP_SIZE => Self::Preallocate,
            other => Self::Unsupported(other),
        }
    }
}

fn errno(e: &DeviceError) -> Errno {
    match e {
        DeviceError::OutOfRange { .. } => Errno::ENOSPC,
        DeviceError::Backing(_) | DeviceError::Cipher(_) => Errno::EIO,
    }
}

impl VolumeFs {
    /// A filesystem serving `exports`, owned by the current user.
    #[must_use]
    pub fn new(exports: Vec<Export>) -> Self {
        Self {
            paths: exports.iter().map(|_| None).collect(),
            engine: None,
            exports,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            started: SystemTime::now(),
            uring: None,
        }
    }

    /// Serves aligned requests of the exports in `--cache none` through `engine` (see
    /// the module docs); `None` keeps every request synchronous.
    #[must_use]
    pub fn with_engine(mut self, engine: Option<Arc<IoEngine>>) -> Self {
        self.paths = self
            .exports
            .iter()
            .map(|e| {
                let path = AsyncDevice::new(Arc::clone(&e.device), Arc::clone(engine.as_ref()?))?;
                Some(AsyncExport {
                    path,
                    name: e.name.as_str().into(),
                })
            })
            .collect();
        self.engine = engine;
        self
    }

    fn export(&self, ino: INodeNo) -> Option<&Export> {
        let idx = ino.0.checked_sub(ROOT + 1)?;
        self.exports.get(usize::try_from(idx).ok()?)
    }

    /// The asynchronous path of `ino` when it admits `len` bytes at `offset`.
    fn async_path(&self, ino: INodeNo, offset: u64, len: u64) -> Option<&AsyncExport> {
        let idx = usize::try_from(ino.0.checked_sub(ROOT + 1)?).ok()?;
        self.paths
            .get(idx)?
            .as_ref()
            .filter(|a| a.path.admits(offset, len))
    }

    fn completion(e: &Export, a: &AsyncExport) -> Completion {
        Completion {
            busy: e.io.as_ref().map(VolumeIo::start_owned),
            name: Arc::clone(&a.name),
        }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (
                FileType::RegularFile,
                0o600,
                self.export(INodeNo(ino))?.device.size(),
                1,
            )
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        // Without FUSE_ASYNC_DIO the kernel turns every asynchronous direct request
        // (libaio, io_uring: what fio, qemu and databases use) into a synchronous one, so
        // a queue depth of 16 reaches us as 1 and the other FUSE threads sit idle. libfuse
        // asks for it by default; fuser does not. Async requests count against
        // max_background, which must then cover the deepest queue we expect.
        if config.add_capabilities(InitFlags::FUSE_ASYNC_DIO).is_err() {
            tracing::warn!("kernel lacks FUSE_ASYNC_DIO: asynchronous direct I/O is serialized");
        }
        let _ = config.set_max_background(MAX_BACKGROUND);
        if let Some(granted) = &self.uring {
            let offered = config
                .add_capabilities(InitFlags::FUSE_OVER_IO_URING)
                .is_ok();
            granted.store(offered, Ordering::Release);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        // Replied writes have completed; this waits for the rest before the last flush.
        if let Some(engine) = &self.engine {
            engine.drain();
        }
        for e in &self.exports {
            if let Err(err) = e.device.flush() {
                tracing::error!("final flush of {} failed: {err}", e.name);
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.lookup_attr(parent.0, name) {
            Ok(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.getattr_of(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = AttrChange {
            mode: mode.is_some(),
            owner: uid.is_some() || gid.is_some(),
            size,
        };
        match self.setattr_of(ino.0, change) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.open_flags(ino.0) {
            Ok(flags) => reply.opened(FileHandle(0), flags),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(e) = self.export(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let want = size.min(MAX_WRITE) as usize;
        if let Some(a) = self.async_path(ino, offset, want as u64) {
            let done = Self::completion(e, a);
            return a.path.read(offset, want, move |r| {
                match done.settle(IoOp::Read, (offset, want), r, |b| b.len() as u64) {
                    Ok(buf) => reply.data(&buf),
                    Err(e) => reply.error(e),
                }
            });
        }
        READ_BUF.with_borrow_mut(|buf| {
            // Grown once per FUSE thread, then reused: no 1 MiB allocate-and-zero per read.
            if buf.len() < want {
                buf.resize(want);
            }
            match self.read_export(ino.0, offset, &mut buf[..want]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(e) = self.export(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if let Some(a) = self.async_path(ino, offset, data.len() as u64) {
            let done = Self::completion(e, a);
            let len = data.len();
            return a.path.write(offset, data, move |r| {
                match done.settle(IoOp::Write, (offset, len), r, |()| len as u64) {
                    // At most MAX_WRITE bytes, so the length fits u32.
                    Ok(()) => reply.written(u32::try_from(len).expect("bounded by max_write")),
                    Err(e) => reply.error(e),
                }
            });
        }
        match self.write_export(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.fsync_export(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.fallocate_export(ino.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.dir_entries(ino.0, offset) {
            Ok(entries) => {
                for d in entries {
                    if reply.add(INodeNo(d.ino), d.next_offset, d.kind, d.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.statfs_numbers();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Fallocate;

    #[test]
    fn fallocate_modes_parse() {
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert_eq!(Fallocate::from(punch), Fallocate::Discard);
        assert_eq!(
            Fallocate::from(libc::FALLOC_FL_ZERO_RANGE),
            Fallocate::Discard
        );
        assert_eq!(Fallocate::from(0), Fallocate::Preallocate);
        assert_eq!(
            Fallocate::from(libc::FALLOC_FL_KEEP_SIZE),
            Fallocate::Preallocate
        );
        // A hole punch must keep the size (the kernel requires it).
        assert_eq!(
            Fallocate::from(libc::FALLOC_FL_PUNCH_HOLE),
            Fallocate::Unsupported(libc::FALLOC_FL_PUNCH_HOLE)
        );
    }
}
