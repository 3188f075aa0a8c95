//! FUSE adapter: serves each attached volume's [`Device`] as one regular file in a
//! directory. Callbacks only translate (inode/handle -> device, error -> errno); all sector
//! math and crypto live in [`crate::device`].

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, SessionACL, WriteFlags,
};

use crate::backing::aligned::AlignedBuf;
use crate::device::{Device, DeviceError};
use crate::metrics::{InFlight, IoOp, VolumeIo};

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

/// The FUSE filesystem: a root directory holding one file per export.
#[derive(Debug)]
pub struct VolumeFs {
    exports: Vec<Export>,
    uid: u32,
    gid: u32,
    started: SystemTime,
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
            exports,
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            started: SystemTime::now(),
        }
    }

    fn export(&self, ino: INodeNo) -> Option<&Export> {
        let idx = ino.0.checked_sub(ROOT + 1)?;
        self.exports.get(usize::try_from(idx).ok()?)
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
        Ok(())
    }

    fn destroy(&mut self) {
        for e in &self.exports {
            if let Err(err) = e.device.flush() {
                tracing::error!("final flush of {} failed: {err}", e.name);
            }
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let found = self
            .exports
            .iter()
            .position(|e| OsStr::new(&e.name) == name);
        match found.and_then(|i| self.attr(ROOT + 1 + i as u64)) {
            Some(attr) => reply.entry(&TTL, &attr, fuser::Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
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
        let Some(attr) = self.attr(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        // A volume has a fixed size and owner; timestamps are accepted and ignored.
        if size.is_some_and(|s| s != attr.size) || mode.is_some() || uid.is_some() || gid.is_some()
        {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.export(ino).is_none() {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
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
        let _busy = e.start();
        READ_BUF.with_borrow_mut(|buf| {
            // Grown once per FUSE thread, then reused: no 1 MiB allocate-and-zero per read.
            if buf.len() < want {
                buf.resize(want);
            }
            match e.device.read(offset, &mut buf[..want]) {
                Ok(n) => {
                    e.count(IoOp::Read, Ok(n as u64));
                    reply.data(&buf[..n]);
                }
                Err(err) => {
                    e.count(IoOp::Read, Err(()));
                    tracing::error!("read {}@{offset}+{size}: {err}", e.name);
                    reply.error(errno(&err));
                }
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
        let _busy = e.start();
        match e.device.write(offset, data) {
            // `data` is at most MAX_WRITE bytes, so its length fits u32.
            Ok(()) => {
                e.count(IoOp::Write, Ok(data.len() as u64));
                reply.written(u32::try_from(data.len()).expect("bounded by max_write"));
            }
            Err(err) => {
                e.count(IoOp::Write, Err(()));
                tracing::error!("write {}@{offset}+{}: {err}", e.name, data.len());
                reply.error(errno(&err));
            }
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
        let Some(e) = self.export(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let _busy = e.start();
        match e.device.flush() {
            Ok(()) => {
                e.count(IoOp::Flush, Ok(0));
                reply.ok();
            }
            Err(err) => {
                e.count(IoOp::Flush, Err(()));
                tracing::error!("fsync {}: {err}", e.name);
                reply.error(errno(&err));
            }
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
        let Some(e) = self.export(ino) else {
            return reply.error(Errno::ENOENT);
        };
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
                    return reply.error(Errno::ENOSPC);
                }
            }
            Fallocate::Unsupported(_) => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        match result {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(errno(&err)),
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
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        for (i, e) in self.exports.iter().enumerate() {
            entries.push((ROOT + 1 + i as u64, FileType::RegularFile, e.name.clone()));
        }
        for (i, (ino, kind, name)) in entries
            .into_iter()
            .enumerate()
            .skip(usize::try_from(offset).unwrap_or(usize::MAX))
        {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = self.exports.iter().map(|e| e.device.size()).sum();
        let files = self.exports.len() as u64;
        reply.statfs(bytes / 4096, 0, 0, files + 1, 0, 4096, 255, 4096);
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
