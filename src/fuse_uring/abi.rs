//! The kernel's FUSE-over-io_uring ABI (`include/uapi/linux/fuse.h`, protocol 7.42 and
//! later) and the classic FUSE structs that travel through it: `repr(C)` mirrors whose
//! sizes and field offsets are checked against the header at compile time, and the
//! opcode numbers. Parsing is by copy ([`Wire::read_from`]): buffers the kernel fills are
//! never reinterpreted in place.

use std::mem::{offset_of, size_of};

/// `FUSE_IO_URING_CMD_REGISTER`: hand an entry (header and payload buffers) to a queue.
pub const CMD_REGISTER: u32 = 1;
/// `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`: answer the entry's request and wait for the next.
pub const CMD_COMMIT_AND_FETCH: u32 = 2;
/// Size of `fuse_uring_req_header.in_out` (`FUSE_URING_IN_OUT_HEADER_SZ`).
pub const IN_OUT_HEADER_SZ: usize = 128;
/// Size of `fuse_uring_req_header.op_in` (`FUSE_URING_OP_IN_OUT_SZ`).
pub const OP_IN_OUT_SZ: usize = 128;
/// The kernel's smallest request buffer (`FUSE_MIN_READ_BUFFER`), a floor of the payload.
pub const MIN_READ_BUFFER: usize = 8192;

/// FUSE opcodes (`enum fuse_opcode`) that can reach the ring for this filesystem.
pub mod opcode {
    /// `FUSE_LOOKUP`
    pub const LOOKUP: u32 = 1;
    /// `FUSE_FORGET` (never through the ring: the kernel sends it on `/dev/fuse`)
    pub const FORGET: u32 = 2;
    /// `FUSE_GETATTR`
    pub const GETATTR: u32 = 3;
    /// `FUSE_SETATTR`
    pub const SETATTR: u32 = 4;
    /// `FUSE_OPEN`
    pub const OPEN: u32 = 14;
    /// `FUSE_READ`
    pub const READ: u32 = 15;
    /// `FUSE_WRITE`
    pub const WRITE: u32 = 16;
    /// `FUSE_STATFS`
    pub const STATFS: u32 = 17;
    /// `FUSE_RELEASE`
    pub const RELEASE: u32 = 18;
    /// `FUSE_FSYNC`
    pub const FSYNC: u32 = 20;
    /// `FUSE_GETXATTR`
    pub const GETXATTR: u32 = 22;
    /// `FUSE_LISTXATTR`
    pub const LISTXATTR: u32 = 23;
    /// `FUSE_FLUSH`
    pub const FLUSH: u32 = 25;
    /// `FUSE_INIT`
    pub const INIT: u32 = 26;
    /// `FUSE_OPENDIR`
    pub const OPENDIR: u32 = 27;
    /// `FUSE_READDIR`
    pub const READDIR: u32 = 28;
    /// `FUSE_RELEASEDIR`
    pub const RELEASEDIR: u32 = 29;
    /// `FUSE_FSYNCDIR`
    pub const FSYNCDIR: u32 = 30;
    /// `FUSE_ACCESS`
    pub const ACCESS: u32 = 34;
    /// `FUSE_DESTROY`
    pub const DESTROY: u32 = 38;
    /// `FUSE_BATCH_FORGET`
    pub const BATCH_FORGET: u32 = 42;
    /// `FUSE_FALLOCATE`
    pub const FALLOCATE: u32 = 43;
    /// `FUSE_READDIRPLUS`
    pub const READDIRPLUS: u32 = 44;
}

/// `fuse_setattr_in.valid` bits that change something we refuse to change.
pub mod fattr {
    /// `FATTR_MODE`
    pub const MODE: u32 = 1 << 0;
    /// `FATTR_UID`
    pub const UID: u32 = 1 << 1;
    /// `FATTR_GID`
    pub const GID: u32 = 1 << 2;
    /// `FATTR_SIZE`
    pub const SIZE: u32 = 1 << 3;
}

/// A plain-old-data wire struct: `repr(C)`, integer fields only, no padding bytes (each
/// impl's size assertion equals the sum of its fields), so every byte pattern is a valid
/// value and every value is fully initialised bytes.
///
/// # Safety
/// Implement only for types that satisfy all of the above.
pub unsafe trait Wire: Copy + Sized {
    /// A copy of the value at the start of `bytes`, or `None` when `bytes` is shorter.
    fn read_from(bytes: &[u8]) -> Option<Self> {
        let src = bytes.get(..size_of::<Self>())?;
        // SAFETY: `src` holds size_of::<Self>() initialised bytes; any bit pattern is a
        // valid Self (trait contract); read_unaligned has no alignment requirement.
        Some(unsafe { std::ptr::read_unaligned(src.as_ptr().cast::<Self>()) })
    }

    /// The value's bytes.
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: Self has no padding (trait contract), so all size_of::<Self>() bytes
        // behind the reference are initialised; u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts((self as *const Self).cast::<u8>(), size_of::<Self>()) }
    }

    /// Copies the value into the start of `out`; `false` when `out` is shorter.
    fn write_to(&self, out: &mut [u8]) -> bool {
        match out.get_mut(..size_of::<Self>()) {
            Some(dst) => {
                dst.copy_from_slice(self.as_bytes());
                true
            }
            None => false,
        }
    }
}

macro_rules! wire {
    ($($(#[$m:meta])* struct $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? } = $size:expr;)*) => {
        $(
            $(#[$m])*
            #[repr(C)]
            #[derive(Debug, Clone, Copy, PartialEq, Eq)]
            #[allow(missing_docs)]
            pub struct $name { $($(#[$fm])* pub $field: $ty),* }
            // The header's size, and no padding: the fields add up to it.
            const _: () = assert!(size_of::<$name>() == $size);
            const _: () = assert!(0 $(+ size_of::<$ty>())* == $size);
            // SAFETY: repr(C), integer (or integer array) fields only, and the assertion
            // above proves there is no padding.
            unsafe impl Wire for $name {}
        )*
    };
}

wire! {
    /// `struct fuse_in_header`
    #[derive(Default)]
    struct InHeader {
        len: u32, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32, pid: u32,
        total_extlen: u16, padding: u16,
    } = 40;
    /// `struct fuse_out_header`
    #[derive(Default)]
    struct OutHeader { len: u32, error: i32, unique: u64 } = 16;
    /// `struct fuse_attr`
    #[derive(Default)]
    struct Attr {
        ino: u64, size: u64, blocks: u64, atime: u64, mtime: u64, ctime: u64,
        atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32, nlink: u32, uid: u32,
        gid: u32, rdev: u32, blksize: u32, flags: u32,
    } = 88;
    /// `struct fuse_entry_out`
    #[derive(Default)]
    struct EntryOut {
        nodeid: u64, generation: u64, entry_valid: u64, attr_valid: u64,
        entry_valid_nsec: u32, attr_valid_nsec: u32, attr: Attr,
    } = 128;
    /// `struct fuse_attr_out`
    #[derive(Default)]
    struct AttrOut { attr_valid: u64, attr_valid_nsec: u32, dummy: u32, attr: Attr } = 104;
    /// `struct fuse_getattr_in`
    #[derive(Default)]
    struct GetattrIn { getattr_flags: u32, dummy: u32, fh: u64 } = 16;
    /// `struct fuse_setattr_in`
    #[derive(Default)]
    struct SetattrIn {
        valid: u32, padding: u32, fh: u64, size: u64, lock_owner: u64, atime: u64,
        mtime: u64, ctime: u64, atimensec: u32, mtimensec: u32, ctimensec: u32, mode: u32,
        unused4: u32, uid: u32, gid: u32, unused5: u32,
    } = 88;
    /// `struct fuse_open_in`
    #[derive(Default)]
    struct OpenIn { flags: u32, open_flags: u32 } = 8;
    /// `struct fuse_open_out`
    #[derive(Default)]
    struct OpenOut { fh: u64, open_flags: u32, backing_id: i32 } = 16;
    /// `struct fuse_read_in`
    #[derive(Default)]
    struct ReadIn {
        fh: u64, offset: u64, size: u32, read_flags: u32, lock_owner: u64, flags: u32,
        padding: u32,
    } = 40;
    /// `struct fuse_write_in`
    #[derive(Default)]
    struct WriteIn {
        fh: u64, offset: u64, size: u32, write_flags: u32, lock_owner: u64, flags: u32,
        padding: u32,
    } = 40;
    /// `struct fuse_write_out`
    #[derive(Default)]
    struct WriteOut { size: u32, padding: u32 } = 8;
    /// `struct fuse_kstatfs` (the whole of `struct fuse_statfs_out`)
    #[derive(Default)]
    struct StatfsOut {
        blocks: u64, bfree: u64, bavail: u64, files: u64, ffree: u64, bsize: u32,
        namelen: u32, frsize: u32, padding: u32, spare: [u32; 6],
    } = 80;
    /// `struct fuse_fsync_in`
    #[derive(Default)]
    struct FsyncIn { fh: u64, fsync_flags: u32, padding: u32 } = 16;
    /// `struct fuse_fallocate_in`
    #[derive(Default)]
    struct FallocateIn { fh: u64, offset: u64, length: u64, mode: u32, padding: u32 } = 32;
    /// `struct fuse_dirent` without its trailing name
    #[derive(Default)]
    struct Dirent { ino: u64, off: u64, namelen: u32, typ: u32 } = 24;
    /// `struct fuse_uring_ent_in_out`: the commit id (the request's `unique`) and the
    /// bytes used in the payload buffer, in either direction.
    #[derive(Default)]
    struct EntInOut { flags: u64, commit_id: u64, payload_sz: u32, padding: u32, reserved: u64 } = 32;
    /// `struct fuse_uring_req_header`: iov[0] of a REGISTER. `in_out` holds the
    /// `fuse_in_header` on fetch and our `fuse_out_header` on commit; `op_in` the
    /// opcode's fixed argument struct (the kernel's `in_args[0]`).
    struct ReqHeader {
        in_out: [u8; IN_OUT_HEADER_SZ], op_in: [u8; OP_IN_OUT_SZ], ring_ent_in_out: EntInOut,
    } = 288;
    /// `struct fuse_uring_cmd_req`: the start of the SQE128's 80-byte command area.
    #[derive(Default)]
    struct CmdReq { flags: u64, commit_id: u64, qid: u16, padding: [u8; 6] } = 24;
}

impl Default for ReqHeader {
    fn default() -> Self {
        Self {
            in_out: [0; IN_OUT_HEADER_SZ],
            op_in: [0; OP_IN_OUT_SZ],
            ring_ent_in_out: EntInOut::default(),
        }
    }
}

// Offsets the kernel relies on (fuse.h), beyond what the sizes already pin down.
const _: () = assert!(offset_of!(InHeader, opcode) == 4);
const _: () = assert!(offset_of!(InHeader, unique) == 8);
const _: () = assert!(offset_of!(InHeader, nodeid) == 16);
const _: () = assert!(offset_of!(InHeader, uid) == 24);
const _: () = assert!(offset_of!(InHeader, total_extlen) == 36);
const _: () = assert!(offset_of!(OutHeader, error) == 4);
const _: () = assert!(offset_of!(OutHeader, unique) == 8);
const _: () = assert!(offset_of!(Attr, atimensec) == 48);
const _: () = assert!(offset_of!(Attr, mode) == 60);
const _: () = assert!(offset_of!(Attr, flags) == 84);
const _: () = assert!(offset_of!(EntryOut, attr) == 40);
const _: () = assert!(offset_of!(AttrOut, attr) == 16);
const _: () = assert!(offset_of!(SetattrIn, size) == 16);
const _: () = assert!(offset_of!(SetattrIn, mode) == 68);
const _: () = assert!(offset_of!(SetattrIn, uid) == 76);
const _: () = assert!(offset_of!(ReadIn, offset) == 8);
const _: () = assert!(offset_of!(ReadIn, size) == 16);
const _: () = assert!(offset_of!(WriteIn, size) == 16);
const _: () = assert!(offset_of!(FallocateIn, mode) == 24);
const _: () = assert!(offset_of!(EntInOut, commit_id) == 8);
const _: () = assert!(offset_of!(EntInOut, payload_sz) == 16);
const _: () = assert!(offset_of!(ReqHeader, op_in) == 128);
const _: () = assert!(offset_of!(ReqHeader, ring_ent_in_out) == 256);
const _: () = assert!(offset_of!(CmdReq, commit_id) == 8);
const _: () = assert!(offset_of!(CmdReq, qid) == 16);
// The command struct fits the SQE128's 80-byte command area.
const _: () = assert!(size_of::<CmdReq>() <= 80);

/// `struct iovec`, as `sqe->addr` points at two of them (header, payload).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    /// `iov_base`
    pub base: *mut u8,
    /// `iov_len`
    pub len: usize,
}
const _: () = assert!(size_of::<IoVec>() == size_of::<libc::iovec>());
const _: () = assert!(offset_of!(IoVec, len) == offset_of!(libc::iovec, iov_len));

/// The bytes of `fuse_dirent` for one entry, padded to 8 bytes as `FUSE_DIRENT_ALIGN`.
#[must_use]
pub fn dirent_bytes(ino: u64, off: u64, typ: u32, name: &[u8]) -> Vec<u8> {
    let head = Dirent {
        ino,
        off,
        namelen: u32::try_from(name.len()).unwrap_or(u32::MAX),
        typ,
    };
    let len = (size_of::<Dirent>() + name.len()).next_multiple_of(8);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(name);
    out.resize(len, 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_header() {
        // Re-stated at run time so that a change shows up in the test report too.
        assert_eq!(size_of::<InHeader>(), 40);
        assert_eq!(size_of::<OutHeader>(), 16);
        assert_eq!(size_of::<EntInOut>(), 32);
        assert_eq!(size_of::<ReqHeader>(), 288);
        assert_eq!(size_of::<CmdReq>(), 24);
        assert_eq!(size_of::<EntryOut>(), 128);
        assert_eq!(size_of::<AttrOut>(), 104);
        assert_eq!(size_of::<StatfsOut>(), 80);
        assert_eq!(offset_of!(ReqHeader, ring_ent_in_out), 256);
    }

    #[test]
    fn wire_round_trips_and_short_buffers_are_refused() {
        let h = InHeader {
            len: 80,
            opcode: opcode::READ,
            unique: 0x0102_0304_0506_0708,
            nodeid: 2,
            uid: 1000,
            gid: 1000,
            pid: 42,
            total_extlen: 0,
            padding: 0,
        };
        let mut buf = [0u8; 64];
        assert!(h.write_to(&mut buf));
        assert_eq!(&buf[8..16], &0x0102_0304_0506_0708u64.to_ne_bytes());
        assert_eq!(InHeader::read_from(&buf), Some(h));
        assert_eq!(InHeader::read_from(&buf[..39]), None);
        assert!(!h.write_to(&mut buf[..39]));
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes() {
        let d = dirent_bytes(2, 3, 8, b"disk");
        assert_eq!(d.len(), 32);
        assert_eq!(&d[16..20], &4u32.to_ne_bytes());
        assert_eq!(&d[24..28], b"disk");
        assert_eq!(dirent_bytes(1, 1, 4, b"12345678").len(), 32);
        assert_eq!(dirent_bytes(1, 1, 4, b"123456789").len(), 40);
    }
}
