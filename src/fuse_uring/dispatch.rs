//! One ring request in, one answer out: decodes the request the kernel left in an
//! entry's header and payload buffers, asks [`VolumeFs`] (the same answers the fuser
//! callbacks give), and encodes the reply into the same buffers for the commit. Opcodes
//! the fuser callbacks leave to fuser's defaults get those defaults (OPENDIR, RELEASE,
//! RELEASEDIR, FLUSH); everything else is `ENOSYS`.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType};

use super::abi::{
    self, AttrOut, EntryOut, FallocateIn, GetattrIn, InHeader, OpenOut, OutHeader, ReadIn,
    ReqHeader, SetattrIn, StatfsOut, Wire, WriteIn, WriteOut, fattr, opcode,
};
use crate::fuse::{AttrChange, MAX_WRITE, VolumeFs};

/// What one request became: its id (for the commit) and opcode (for the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handled {
    /// The request's `unique`, the commit id.
    pub unique: u64,
    /// Its FUSE opcode.
    pub opcode: u32,
}

/// An answer before encoding: an errno, or `n` reply bytes already in the payload.
type Answer = Result<usize, Errno>;

/// Answers the request in `header`/`payload` and leaves the reply there (out header in
/// `in_out`, reply bytes in `payload`, their count in `ring_ent_in_out.payload_sz`).
/// `None` when the header cannot be parsed (the kernel never sends that).
pub fn handle(fs: &VolumeFs, header: &mut ReqHeader, payload: &mut [u8]) -> Option<Handled> {
    let req = InHeader::read_from(&header.in_out)?;
    let payload_len = usize::try_from(header.ring_ent_in_out.payload_sz)
        .unwrap_or(usize::MAX)
        .min(payload.len());
    let answer = if !known(req.opcode) {
        Err(Errno::ENOSYS)
    } else if req.uid != fs.owner_uid() && !any_uid(req.opcode) {
        // fuser's SessionACL::Owner: strangers get only what the kernel sends uid-less.
        Err(Errno::EACCES)
    } else {
        answer(fs, &req, &header.op_in, payload, payload_len)
    };
    let (error, len) = match answer {
        Ok(n) => (0, n),
        Err(e) => (-e.code(), 0),
    };
    let out = OutHeader {
        len: u32::try_from(std::mem::size_of::<OutHeader>() + len).unwrap_or(u32::MAX),
        error,
        unique: req.unique,
    };
    header.in_out = [0; abi::IN_OUT_HEADER_SZ];
    out.write_to(&mut header.in_out);
    header.ring_ent_in_out.payload_sz = u32::try_from(len).unwrap_or(u32::MAX);
    Some(Handled {
        unique: req.unique,
        opcode: req.opcode,
    })
}

/// The opcodes fuser decodes (it answers others `ENOSYS` before any access check).
fn known(op: u32) -> bool {
    matches!(op, 1..=6 | 8..=52)
}

/// The opcodes fuser lets through from a uid other than the owner's.
fn any_uid(op: u32) -> bool {
    matches!(
        op,
        opcode::INIT
            | opcode::DESTROY
            | opcode::READ
            | opcode::READDIR
            | opcode::READDIRPLUS
            | opcode::BATCH_FORGET
            | opcode::FORGET
            | opcode::WRITE
            | opcode::FSYNC
            | opcode::FSYNCDIR
            | opcode::RELEASE
            | opcode::RELEASEDIR
    )
}

fn answer(
    fs: &VolumeFs,
    req: &InHeader,
    op_in: &[u8],
    payload: &mut [u8],
    payload_len: usize,
) -> Answer {
    let ino = req.nodeid;
    match req.opcode {
        opcode::LOOKUP => {
            let name = payload.get(..payload_len).ok_or(Errno::EIO)?;
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            let attr = fs.lookup_attr(ino, OsStr::from_bytes(name))?;
            reply(payload, &entry_out(&attr))
        }
        opcode::GETATTR => {
            let _in = parse::<GetattrIn>(op_in)?;
            reply(payload, &attr_out(&fs.getattr_of(ino)?))
        }
        opcode::SETATTR => {
            let a = parse::<SetattrIn>(op_in)?;
            let change = AttrChange {
                mode: a.valid & fattr::MODE != 0,
                owner: a.valid & (fattr::UID | fattr::GID) != 0,
                size: (a.valid & fattr::SIZE != 0).then_some(a.size),
            };
            reply(payload, &attr_out(&fs.setattr_of(ino, change)?))
        }
        opcode::OPEN => {
            let flags = fs.open_flags(ino)?;
            reply(
                payload,
                &OpenOut {
                    fh: 0,
                    open_flags: flags.bits(),
                    backing_id: 0,
                },
            )
        }
        // fuser's default opendir: handle 0, no flags.
        opcode::OPENDIR => reply(payload, &OpenOut::default()),
        opcode::READ => {
            let r = parse::<ReadIn>(op_in)?;
            let want = (r.size.min(MAX_WRITE) as usize).min(payload.len());
            fs.read_export(ino, r.offset, &mut payload[..want])
        }
        opcode::WRITE => {
            let w = parse::<WriteIn>(op_in)?;
            let len = (w.size as usize).min(payload_len);
            let written = fs.write_export(ino, w.offset, &payload[..len])?;
            reply(
                payload,
                &WriteOut {
                    size: written,
                    padding: 0,
                },
            )
        }
        // fuser's defaults for these (VolumeFs's flush is the same `ok`).
        opcode::FLUSH | opcode::RELEASE | opcode::RELEASEDIR => Ok(0),
        opcode::FSYNC => fs.fsync_export(ino).map(|()| 0),
        opcode::FALLOCATE => {
            let f = parse::<FallocateIn>(op_in)?;
            let mode = i32::from_ne_bytes(f.mode.to_ne_bytes());
            fs.fallocate_export(ino, f.offset, f.length, mode)
                .map(|()| 0)
        }
        opcode::READDIR => {
            let r = parse::<ReadIn>(op_in)?;
            readdir(fs, ino, r.offset, r.size as usize, payload)
        }
        opcode::STATFS => {
            let s = fs.statfs_numbers();
            reply(
                payload,
                &StatfsOut {
                    blocks: s.blocks,
                    bfree: s.bfree,
                    bavail: s.bavail,
                    files: s.files,
                    ffree: s.ffree,
                    bsize: s.bsize,
                    namelen: s.namelen,
                    frsize: s.frsize,
                    padding: 0,
                    spare: [0; 6],
                },
            )
        }
        // fuser answers INIT after the handshake with EIO.
        opcode::INIT => Err(Errno::EIO),
        _ => Err(Errno::ENOSYS),
    }
}

fn parse<T: Wire>(op_in: &[u8]) -> Result<T, Errno> {
    T::read_from(op_in).ok_or(Errno::EIO)
}

fn reply<T: Wire>(payload: &mut [u8], value: &T) -> Answer {
    if value.write_to(payload) {
        Ok(std::mem::size_of::<T>())
    } else {
        Err(Errno::EIO)
    }
}

/// fuser's `ReplyDirectory`: entries while they fit in `size` bytes.
fn readdir(fs: &VolumeFs, ino: u64, offset: u64, size: usize, payload: &mut [u8]) -> Answer {
    let size = size.min(payload.len());
    let mut used = 0;
    for d in fs.dir_entries(ino, offset)? {
        let typ = match d.kind {
            FileType::Directory => libc::DT_DIR,
            _ => libc::DT_REG,
        };
        let bytes = abi::dirent_bytes(d.ino, d.next_offset, u32::from(typ), d.name.as_bytes());
        if used + bytes.len() > size {
            break;
        }
        payload[used..used + bytes.len()].copy_from_slice(&bytes);
        used += bytes.len();
    }
    Ok(used)
}

fn since_epoch(t: SystemTime) -> (u64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs(), d.subsec_nanos()),
        Err(_) => (0, 0),
    }
}

/// fuser's `fuse_attr_from_attr` on Linux.
fn wire_attr(a: &FileAttr) -> abi::Attr {
    let (atime, atimensec) = since_epoch(a.atime);
    let (mtime, mtimensec) = since_epoch(a.mtime);
    let (ctime, ctimensec) = since_epoch(a.ctime);
    let kind = match a.kind {
        FileType::Directory => libc::S_IFDIR,
        _ => libc::S_IFREG,
    };
    abi::Attr {
        ino: a.ino.0,
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        atimensec,
        mtimensec,
        ctimensec,
        mode: kind | u32::from(a.perm),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: a.blksize,
        flags: 0,
    }
}

fn entry_out(a: &FileAttr) -> EntryOut {
    let ttl = VolumeFs::ttl();
    EntryOut {
        nodeid: a.ino.0,
        generation: 0,
        entry_valid: ttl.as_secs(),
        attr_valid: ttl.as_secs(),
        entry_valid_nsec: ttl.subsec_nanos(),
        attr_valid_nsec: ttl.subsec_nanos(),
        attr: wire_attr(a),
    }
}

fn attr_out(a: &FileAttr) -> AttrOut {
    let ttl = VolumeFs::ttl();
    AttrOut {
        attr_valid: ttl.as_secs(),
        attr_valid_nsec: ttl.subsec_nanos(),
        dummy: 0,
        attr: wire_attr(a),
    }
}

#[cfg(test)]
#[path = "dispatch_tests.rs"]
mod tests;
