//! One ring worker: a thread with its own io_uring (SQE128) that registers one entry
//! (a header buffer and an aligned payload buffer) on a kernel FUSE queue, then loops:
//! wait for the request the kernel put in the entry, answer it ([`super::dispatch`]),
//! commit the answer and fetch the next request in one SQE. A completion with an error
//! (`ENOTCONN` when the connection is aborted by unmount, detach or shutdown) retires
//! the entry; the worker ends with its last entry.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::abi::{CMD_COMMIT_AND_FETCH, CMD_REGISTER, CmdReq, IoVec, ReqHeader, Wire};
use super::dispatch;
use crate::backing::aligned::AlignedBuf;
use crate::fuse::VolumeFs;

/// One registered entry: the buffers the kernel reads requests into and replies from.
/// They are touched only between the completion that hands the entry to us and the
/// submission that hands it back (the protocol's ownership rule).
struct Entry {
    header: Box<ReqHeader>,
    payload: AlignedBuf,
    /// `sqe->addr` of the REGISTER points here; kept for the entry's lifetime.
    iov: Box<[IoVec; 2]>,
}

impl Entry {
    fn new(payload_len: usize) -> Self {
        let mut header = Box::new(ReqHeader::default());
        let mut payload = AlignedBuf::zeroed(payload_len);
        let iov = Box::new([
            IoVec {
                base: std::ptr::from_mut::<ReqHeader>(&mut *header).cast::<u8>(),
                len: std::mem::size_of::<ReqHeader>(),
            },
            IoVec {
                base: payload.as_mut_ptr(),
                len: payload.len(),
            },
        ]);
        Self {
            header,
            payload,
            iov,
        }
    }
}

/// What a worker serves and where.
pub(super) struct Worker {
    /// A descriptor of the session's `/dev/fuse` connection.
    pub fuse: Arc<OwnedFd>,
    /// The kernel queue (a possible CPU) the entries are registered on.
    pub qid: u16,
    /// Entries of this worker (each one request in flight).
    pub entries: usize,
    /// Bytes of each payload buffer (at least the kernel's `max_payload_sz`).
    pub payload_len: usize,
    /// The filesystem's answers.
    pub fs: VolumeFs,
    /// Requests answered through the ring, all workers together.
    pub served: Arc<AtomicU64>,
}

/// The 128-byte SQE of a FUSE ring command on `fd`: `cmd_op` and the `fuse_uring_cmd_req`
/// in the command area, and for REGISTER `addr`/`len` naming the two iovecs.
fn fuse_cmd(
    fd: i32,
    cmd: u32,
    req: &CmdReq,
    iov: Option<&[IoVec; 2]>,
    tag: u64,
) -> squeue::Entry128 {
    let mut area = [0u8; 80];
    req.write_to(&mut area);
    let mut op = opcode::UringCmd80::new(types::Fd(fd), cmd).cmd(area);
    if let Some(iov) = iov {
        op = op.addr(Some(iov.as_ptr() as u64));
    }
    let sqe = op.build().user_data(tag);
    match iov {
        Some(iov) => with_len(sqe, u32::try_from(iov.len()).unwrap_or(2)),
        None => sqe,
    }
}

/// `sqe->len` (offset 24 of `struct io_uring_sqe`), which `UringCmd80` does not set and
/// the kernel reads as the iovec count of a REGISTER.
fn with_len(sqe: squeue::Entry128, len: u32) -> squeue::Entry128 {
    const _: () = assert!(std::mem::size_of::<squeue::Entry128>() == 128);
    const LEN_AT: usize = 24;
    // SAFETY: Entry128 is a repr(C) pair of the kernel's 64-byte `io_uring_sqe` (plain
    // integers and unions of integers) and 64 command bytes: 128 bytes, no padding, any
    // bit pattern valid, so it converts to and from [u8; 128] (size asserted above).
    let mut bytes: [u8; 128] = unsafe { std::mem::transmute(sqe) };
    bytes[LEN_AT..LEN_AT + 4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: as above.
    unsafe { std::mem::transmute::<[u8; 128], squeue::Entry128>(bytes) }
}

impl Worker {
    /// Registers the entries, reports the outcome on `ready` (the kernel refuses a
    /// REGISTER at once, with the errno of `fuse_uring_cmd`), then serves until every
    /// entry is retired.
    pub fn run(self, ready: &Sender<(u16, std::io::Result<()>)>) {
        let qid = self.qid;
        let mut entries: Vec<Entry> = (0..self.entries)
            .map(|_| Entry::new(self.payload_len))
            .collect();
        let depth = u32::try_from(self.entries.max(1).next_power_of_two()).unwrap_or(1);
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(depth)
            .or_else(|_| IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(depth));
        let mut ring = match ring {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send((qid, Err(e)));
                return;
            }
        };
        let fd = self.fuse.as_raw_fd();
        let req = CmdReq {
            qid: self.qid,
            ..CmdReq::default()
        };
        for (tag, e) in entries.iter().enumerate() {
            let sqe = fuse_cmd(fd, CMD_REGISTER, &req, Some(&e.iov), tag as u64);
            // SAFETY: the iovecs and the buffers they name live in `entries`, which
            // outlives the ring (dropped after it at the end of this function; the kernel
            // drops its references when the ring closes or the entry is retired).
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                let _ = ready.send((qid, Err(std::io::Error::other("submission queue full"))));
                return;
            }
        }
        if let Err(e) = ring.submit() {
            let _ = ready.send((qid, Err(e)));
            return;
        }
        // A refused REGISTER completes at once; an accepted one only with a request
        // (which may already be here: keep it).
        let early: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        if let Some(&(_, res)) = early.iter().find(|(_, res)| *res < 0) {
            let _ = ready.send((qid, Err(std::io::Error::from_raw_os_error(-res))));
            return;
        }
        let _ = ready.send((qid, Ok(())));
        self.serve(&mut ring, &mut entries, fd, early);
        drop(ring);
    }

    fn serve(
        &self,
        ring: &mut IoUring<squeue::Entry128, cqueue::Entry>,
        entries: &mut [Entry],
        fd: i32,
        early: Vec<(u64, i32)>,
    ) {
        let mut live = entries.len();
        let mut done = early;
        while live > 0 {
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for (tag, res) in done.drain(..) {
                let Some(e) = usize::try_from(tag).ok().and_then(|i| entries.get_mut(i)) else {
                    continue;
                };
                if res < 0 {
                    live -= 1;
                    let err = std::io::Error::from_raw_os_error(-res);
                    if res != -libc::ENOTCONN && res != -libc::ECANCELED {
                        tracing::warn!("fuse ring q{}: entry retired: {err}", self.qid);
                    }
                    continue;
                }
                let Some(h) = dispatch::handle(&self.fs, &mut e.header, &mut e.payload[..]) else {
                    tracing::error!("fuse ring q{}: unreadable request header", self.qid);
                    live -= 1;
                    continue;
                };
                self.served.fetch_add(1, Ordering::Relaxed);
                let commit = CmdReq {
                    commit_id: h.unique,
                    qid: self.qid,
                    ..CmdReq::default()
                };
                let sqe = fuse_cmd(fd, CMD_COMMIT_AND_FETCH, &commit, None, tag);
                // SAFETY: the entry's buffers (registered before) stay alive in
                // `entries` for as long as the ring exists.
                if unsafe { ring.submission().push(&sqe) }.is_err() {
                    tracing::error!("fuse ring q{}: submission queue full", self.qid);
                    live -= 1;
                }
            }
            if live == 0 {
                break;
            }
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!("fuse ring q{}: {e}", self.qid);
                    break;
                }
            }
        }
    }
}
