//! The dispatcher on hand-made request buffers: what the kernel would find in the
//! header and payload after each answer.

use std::sync::Arc;

use super::*;
use crate::backing::MemBacking;
use crate::device::{Crypt, Device, Geometry};
use crate::fuse::Export;
use crate::xts::SectorSize;

const SIZE: u64 = 1 << 20;
const DISK: u64 = 2;

fn fs() -> VolumeFs {
    let backing = Arc::new(MemBacking::new(usize::try_from(SIZE).expect("small")));
    let geo = Geometry {
        data_offset: 0,
        size: SIZE,
        sector_size: SectorSize::S4096,
    };
    let device = Arc::new(Device::new(backing, geo, Crypt::Plain));
    VolumeFs::new(vec![Export::new("disk", device)])
}

/// A request as the kernel lays it out: in header, op struct, payload.
struct Req {
    header: ReqHeader,
    payload: Vec<u8>,
}

fn req(fs: &VolumeFs, opcode: u32, nodeid: u64, op_in: &[u8], payload: &[u8]) -> Req {
    req_as(fs.owner_uid(), opcode, nodeid, op_in, payload)
}

fn req_as(uid: u32, opcode: u32, nodeid: u64, op_in: &[u8], payload: &[u8]) -> Req {
    let mut header = ReqHeader::default();
    let h = InHeader {
        len: 40,
        opcode,
        unique: 0xabcd_0000 + u64::from(opcode),
        nodeid,
        uid,
        gid: 0,
        pid: 1,
        total_extlen: 0,
        padding: 0,
    };
    assert!(h.write_to(&mut header.in_out));
    header.op_in[..op_in.len()].copy_from_slice(op_in);
    header.ring_ent_in_out.commit_id = h.unique;
    header.ring_ent_in_out.payload_sz = u32::try_from(payload.len()).expect("small");
    // The kernel's payload buffer is at least max_payload_sz; 1 MiB here too.
    let mut buf = vec![0u8; MAX_WRITE as usize];
    buf[..payload.len()].copy_from_slice(payload);
    Req {
        header,
        payload: buf,
    }
}

/// Runs the dispatcher; returns the out header and the reply bytes.
fn run(fs: &VolumeFs, mut r: Req) -> (OutHeader, Vec<u8>) {
    let unique = InHeader::read_from(&r.header.in_out).expect("in").unique;
    let handled = handle(fs, &mut r.header, &mut r.payload).expect("parsed");
    assert_eq!(handled.unique, unique);
    let out = OutHeader::read_from(&r.header.in_out).expect("out");
    assert_eq!(out.unique, unique, "the reply names its request");
    let n = r.header.ring_ent_in_out.payload_sz as usize;
    assert_eq!(out.len as usize, 16 + n, "out header len covers the reply");
    (out, r.payload[..n].to_vec())
}

#[test]
fn lookup_finds_the_export_and_misses_others() {
    let fs = fs();
    let (out, data) = run(&fs, req(&fs, opcode::LOOKUP, 1, &[], b"disk\0"));
    assert_eq!(out.error, 0);
    let e = EntryOut::read_from(&data).expect("entry_out");
    assert_eq!(data.len(), 128);
    assert_eq!(e.nodeid, DISK);
    assert_eq!(e.attr.ino, DISK);
    assert_eq!(e.attr.size, SIZE);
    assert_eq!(e.attr.mode, libc::S_IFREG | 0o600);
    assert_eq!((e.entry_valid, e.attr_valid), (1, 1));

    let (out, data) = run(&fs, req(&fs, opcode::LOOKUP, 1, &[], b"nope\0"));
    assert_eq!(out.error, -libc::ENOENT);
    assert!(data.is_empty());
    let (out, _) = run(&fs, req(&fs, opcode::LOOKUP, DISK, &[], b"disk\0"));
    assert_eq!(out.error, -libc::ENOENT, "only the root has entries");
}

#[test]
fn getattr_and_setattr_answer_like_the_callbacks() {
    let fs = fs();
    let (out, data) = run(
        &fs,
        req(
            &fs,
            opcode::GETATTR,
            1,
            GetattrIn::default().as_bytes(),
            &[],
        ),
    );
    assert_eq!(out.error, 0);
    let a = AttrOut::read_from(&data).expect("attr_out");
    assert_eq!(data.len(), 104);
    assert_eq!(a.attr.mode, libc::S_IFDIR | 0o700);
    assert_eq!(a.attr.nlink, 2);

    let same = SetattrIn {
        valid: fattr::SIZE,
        size: SIZE,
        ..SetattrIn::default()
    };
    let (out, data) = run(&fs, req(&fs, opcode::SETATTR, DISK, same.as_bytes(), &[]));
    assert_eq!(out.error, 0, "the same size is accepted");
    assert_eq!(AttrOut::read_from(&data).expect("attr").attr.size, SIZE);
    for valid in [fattr::MODE, fattr::UID, fattr::GID] {
        let s = SetattrIn {
            valid,
            ..SetattrIn::default()
        };
        let (out, _) = run(&fs, req(&fs, opcode::SETATTR, DISK, s.as_bytes(), &[]));
        assert_eq!(out.error, -libc::EPERM, "valid {valid:#x}");
    }
    let grow = SetattrIn {
        valid: fattr::SIZE,
        size: SIZE + 4096,
        ..SetattrIn::default()
    };
    let (out, _) = run(&fs, req(&fs, opcode::SETATTR, DISK, grow.as_bytes(), &[]));
    assert_eq!(out.error, -libc::EPERM);
}

#[test]
fn open_opendir_and_the_empty_answers() {
    let fs = fs();
    let (out, data) = run(
        &fs,
        req(
            &fs,
            opcode::OPEN,
            DISK,
            abi::OpenIn::default().as_bytes(),
            &[],
        ),
    );
    assert_eq!(out.error, 0);
    let o = OpenOut::read_from(&data).expect("open_out");
    let want = fuser::FopenFlags::FOPEN_DIRECT_IO | fuser::FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
    assert_eq!(o.open_flags, want.bits());
    let (out, _) = run(
        &fs,
        req(&fs, opcode::OPEN, 1, abi::OpenIn::default().as_bytes(), &[]),
    );
    assert_eq!(out.error, -libc::EISDIR);
    let (out, data) = run(
        &fs,
        req(
            &fs,
            opcode::OPENDIR,
            1,
            abi::OpenIn::default().as_bytes(),
            &[],
        ),
    );
    assert_eq!((out.error, data.len()), (0, 16));
    for op in [
        opcode::FLUSH,
        opcode::RELEASE,
        opcode::RELEASEDIR,
        opcode::FSYNC,
    ] {
        let (out, data) = run(&fs, req(&fs, op, DISK, &[0; 24], &[]));
        assert_eq!((out.error, data.len()), (0, 0), "opcode {op}");
    }
}

#[test]
fn write_then_read_round_trips_through_the_payload() {
    let fs = fs();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let w = WriteIn {
        offset: 4096 + 100,
        size: 8192,
        ..WriteIn::default()
    };
    let (out, reply) = run(&fs, req(&fs, opcode::WRITE, DISK, w.as_bytes(), &data));
    assert_eq!(out.error, 0);
    assert_eq!(WriteOut::read_from(&reply).expect("write_out").size, 8192);

    let r = ReadIn {
        offset: 4096 + 100,
        size: 8192,
        ..ReadIn::default()
    };
    let (out, reply) = run(&fs, req(&fs, opcode::READ, DISK, r.as_bytes(), &[]));
    assert_eq!(out.error, 0);
    assert_eq!(reply, data);

    // Past the end: a short read, as the device gives it.
    let tail = ReadIn {
        offset: SIZE - 10,
        size: 4096,
        ..ReadIn::default()
    };
    let (out, reply) = run(&fs, req(&fs, opcode::READ, DISK, tail.as_bytes(), &[]));
    assert_eq!((out.error, reply.len()), (0, 10));
    let beyond = WriteIn {
        offset: SIZE,
        size: 4096,
        ..WriteIn::default()
    };
    let (out, _) = run(
        &fs,
        req(&fs, opcode::WRITE, DISK, beyond.as_bytes(), &[1; 4096]),
    );
    assert_eq!(out.error, -libc::ENOSPC);
}

#[test]
fn readdir_lists_entries_that_fit() {
    let fs = fs();
    let all = ReadIn {
        size: 4096,
        ..ReadIn::default()
    };
    let (out, data) = run(&fs, req(&fs, opcode::READDIR, 1, all.as_bytes(), &[]));
    assert_eq!(out.error, 0);
    // ".", "..", "disk": 32 bytes each after padding.
    assert_eq!(data.len(), 96);
    assert_eq!(&data[64 + 24..64 + 28], b"disk");
    assert_eq!(abi::Dirent::read_from(&data[64..]).expect("dirent").off, 3);
    let small = ReadIn {
        size: 40,
        ..ReadIn::default()
    };
    let (_, data) = run(&fs, req(&fs, opcode::READDIR, 1, small.as_bytes(), &[]));
    assert_eq!(data.len(), 32, "only what fits");
    let rest = ReadIn {
        offset: 2,
        size: 4096,
        ..ReadIn::default()
    };
    let (_, data) = run(&fs, req(&fs, opcode::READDIR, 1, rest.as_bytes(), &[]));
    assert_eq!(data.len(), 32);
    let (out, _) = run(&fs, req(&fs, opcode::READDIR, DISK, all.as_bytes(), &[]));
    assert_eq!(out.error, -libc::ENOTDIR);
}

#[test]
fn statfs_fallocate_and_the_rest() {
    let fs = fs();
    let (out, data) = run(&fs, req(&fs, opcode::STATFS, 1, &[], &[]));
    assert_eq!((out.error, data.len()), (0, 80));
    let s = StatfsOut::read_from(&data).expect("statfs");
    assert_eq!((s.blocks, s.bsize, s.files), (SIZE / 4096, 4096, 2));

    let punch = FallocateIn {
        offset: 0,
        length: 4096,
        mode: (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u32,
        ..FallocateIn::default()
    };
    let (out, _) = run(
        &fs,
        req(&fs, opcode::FALLOCATE, DISK, punch.as_bytes(), &[]),
    );
    assert_eq!(out.error, 0);
    let bad = FallocateIn {
        mode: libc::FALLOC_FL_PUNCH_HOLE as u32,
        ..punch
    };
    let (out, _) = run(&fs, req(&fs, opcode::FALLOCATE, DISK, bad.as_bytes(), &[]));
    assert_eq!(out.error, -libc::EOPNOTSUPP);

    for op in [
        opcode::ACCESS,
        opcode::GETXATTR,
        opcode::LISTXATTR,
        opcode::FSYNCDIR,
        8,
        200,
    ] {
        let (out, data) = run(&fs, req(&fs, op, 1, &[0; 16], b"user.x\0"));
        assert_eq!((out.error, data.len()), (-libc::ENOSYS, 0), "opcode {op}");
    }
}

#[test]
fn strangers_get_only_what_fuser_lets_through() {
    let fs = fs();
    let stranger = fs.owner_uid().wrapping_add(1);
    let (out, _) = run(&fs, req_as(stranger, opcode::GETATTR, 1, &[0; 16], &[]));
    assert_eq!(out.error, -libc::EACCES);
    let (out, _) = run(&fs, req_as(stranger, opcode::LOOKUP, 1, &[], b"disk\0"));
    assert_eq!(out.error, -libc::EACCES);
    let r = ReadIn {
        size: 512,
        ..ReadIn::default()
    };
    let (out, data) = run(&fs, req_as(stranger, opcode::READ, DISK, r.as_bytes(), &[]));
    assert_eq!(
        (out.error, data.len()),
        (0, 512),
        "the kernel sends READ uid-less"
    );
}
