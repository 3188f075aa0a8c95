//! [`IoEngine`]: asynchronous backing I/O through io_uring, with many requests in flight
//! from any number of threads; and [`BackingIo`], the `SEALVOL_BACKING_IO` switch that
//! chooses between it and the synchronous path.
//!
//! One thread owns the ring (created `SINGLE_ISSUER`, `DEFER_TASKRUN` where the kernel
//! has them): it is the only one that submits and reaps, so the ring needs no lock and
//! completions are processed where they are waited for. Other threads hand it requests
//! through a queue and ring a doorbell, an eventfd whose read is itself a request in the
//! ring. A request owns its buffer until its callback gets it back; short reads and
//! writes are resubmitted for the rest; every callback runs exactly once, on the owner
//! thread (or on the submitting thread when the engine is shutting down), also on error
//! and when the engine is dropped, which waits for every request in flight. At most
//! `depth` requests are admitted at once: a submitter beyond that waits (back-pressure).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, ThreadId};

use io_uring::{IoUring, opcode, squeue, types};

use super::aligned::AlignedBuf;

/// Requests an engine keeps in flight at most by default: FUSE's `max_background`.
pub const DEFAULT_DEPTH: usize = 128;
/// The environment variable that chooses the backing I/O path (see [`BackingIo`]).
pub const BACKING_IO_ENV: &str = "SEALVOL_BACKING_IO";
/// The `user_data` of the doorbell read.
const DOORBELL: u64 = u64::MAX;

/// Errors setting up io_uring or parsing the switch.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// `io_uring_setup` failed (old kernel, seccomp, `kernel.io_uring_disabled`).
    #[error(
        "io_uring is not available here ({0}); unset {BACKING_IO_ENV} or set it to `sync` or `auto`"
    )]
    Setup(#[source] io::Error),
    /// The owner thread or its doorbell could not be created.
    #[error("cannot start the io_uring completion thread: {0}")]
    Thread(#[source] io::Error),
    /// An unknown value of [`BACKING_IO_ENV`].
    #[error("unknown {BACKING_IO_ENV} value {0:?}: use `sync`, `uring` or `auto`")]
    UnknownMode(String),
}

/// How served volume files are read and written (`SEALVOL_BACKING_IO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingIo {
    /// Synchronous `pread`/`pwrite` on the FUSE thread that got the request (the
    /// default): a FUSE thread serves one request at a time.
    Sync,
    /// io_uring ([`IoEngine`]) for aligned requests on files served with `--cache none`;
    /// the rest stays synchronous. Refused when the kernel has no io_uring.
    Uring,
    /// [`BackingIo::Uring`] when every served file is in `--cache none` and the kernel
    /// allows io_uring, else [`BackingIo::Sync`].
    Auto,
}

impl std::str::FromStr for BackingIo {
    type Err = UringError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Self::Sync),
            "uring" => Ok(Self::Uring),
            "auto" => Ok(Self::Auto),
            other => Err(UringError::UnknownMode(other.to_owned())),
        }
    }
}

impl BackingIo {
    /// The mode named by [`BACKING_IO_ENV`]; [`BackingIo::Sync`] when it is unset or
    /// empty.
    ///
    /// # Errors
    /// [`UringError::UnknownMode`] for any other value.
    pub fn from_env() -> Result<Self, UringError> {
        match std::env::var(BACKING_IO_ENV) {
            Ok(s) if !s.is_empty() => s.parse(),
            Ok(_) | Err(std::env::VarError::NotPresent) => Ok(Self::Sync),
            Err(std::env::VarError::NotUnicode(s)) => {
                Err(UringError::UnknownMode(s.to_string_lossy().into_owned()))
            }
        }
    }
}

/// Which way a request moves bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Fill the buffer from the file.
    Read,
    /// Write the buffer to the file.
    Write,
}

/// One request: the whole buffer is read or written at `offset` of `file`.
#[derive(Debug)]
pub struct IoRequest {
    /// Read or write.
    pub kind: IoKind,
    /// The file, kept open until the request completes.
    pub file: Arc<File>,
    /// Byte offset in the file.
    pub offset: u64,
    /// The buffer, owned by the engine until the callback gets it back.
    pub buf: AlignedBuf,
}

/// A request's callback: its buffer back, and whether every byte moved.
pub type IoDone = Box<dyn FnOnce(AlignedBuf, io::Result<()>) + Send>;

struct Op {
    req: IoRequest,
    /// Bytes already moved (short reads and writes are resubmitted for the rest).
    moved: usize,
    done: IoDone,
}

impl Op {
    fn entry(&mut self, user_data: u64) -> squeue::Entry {
        let fd = types::Fd(self.req.file.as_raw_fd());
        let rest = &mut self.req.buf[self.moved..];
        // A longer request moves at most u32::MAX bytes at a time: a short transfer.
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let at = self.req.offset + self.moved as u64;
        match self.req.kind {
            IoKind::Read => opcode::Read::new(fd, rest.as_mut_ptr(), len)
                .offset(at)
                .build(),
            IoKind::Write => opcode::Write::new(fd, rest.as_ptr(), len)
                .offset(at)
                .build(),
        }
        .user_data(user_data)
    }
}

/// What one completion means for its request.
#[derive(Debug)]
enum Step {
    /// Submit again for the bytes not moved yet.
    Again,
    /// Finished, every byte moved or failed.
    Done(io::Result<()>),
}

/// Accounts a completion result `res` of a request of `len` bytes of which `moved`
/// had already moved.
fn advance(kind: IoKind, len: usize, moved: &mut usize, res: i32) -> Step {
    match usize::try_from(res) {
        Err(_) => match -res {
            libc::EINTR | libc::EAGAIN => Step::Again,
            errno => Step::Done(Err(io::Error::from_raw_os_error(errno))),
        },
        Ok(0) if *moved < len => Step::Done(Err(match kind {
            IoKind::Read => io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("end of file after {moved} of {len} bytes"),
            ),
            IoKind::Write => io::Error::new(
                io::ErrorKind::WriteZero,
                format!("wrote nothing after {moved} of {len} bytes"),
            ),
        })),
        Ok(n) => {
            *moved = (*moved + n).min(len);
            if *moved < len {
                Step::Again
            } else {
                Step::Done(Ok(()))
            }
        }
    }
}

struct State {
    /// Admitted, not yet taken by the owner thread.
    pending: VecDeque<Op>,
    /// Admitted and not yet called back.
    in_flight: usize,
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when requests are called back (room for more, or drained).
    changed: Condvar,
    doorbell: OwnedFd,
    depth: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Callbacks run outside the lock, so a panic never poisons it mid-update.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn ring(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live array to the eventfd we own. It cannot
        // fail short of a counter overflow (2^64 - 2 rings), which cannot happen.
        let _ = unsafe { libc::write(self.doorbell.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

/// An io_uring with its owner thread (see the module docs).
pub struct IoEngine {
    shared: Arc<Shared>,
    owner: Option<JoinHandle<()>>,
    owner_id: ThreadId,
}

impl std::fmt::Debug for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoEngine")
            .field("depth", &self.shared.depth)
            .finish_non_exhaustive()
    }
}

impl IoEngine {
    /// An engine keeping at most `depth` requests in flight.
    ///
    /// # Errors
    /// [`UringError::Setup`] when the kernel refuses io_uring; [`UringError::Thread`].
    pub fn new(depth: usize) -> Result<Self, UringError> {
        let depth = depth.clamp(1, 4096);
        // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(UringError::Thread(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nothing else.
        let doorbell = unsafe { OwnedFd::from_raw_fd(fd) };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: VecDeque::new(),
                in_flight: 0,
                closing: false,
            }),
            changed: Condvar::new(),
            doorbell,
            depth,
        });
        let entries = u32::try_from((depth + 1).next_power_of_two()).unwrap_or(8192);
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let owner_shared = Arc::clone(&shared);
        let owner = std::thread::Builder::new()
            .name("io-uring".into())
            .spawn(move || {
                // Created here: SINGLE_ISSUER binds the ring to the thread that submits.
                match new_ring(entries) {
                    Ok(ring) => {
                        let _ = tx.send(Ok(()));
                        Owner::new(owner_shared, ring).run();
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            })
            .map_err(UringError::Thread)?;
        let owner_id = owner.thread().id();
        match rx.recv() {
            Ok(Ok(())) => Ok(Self {
                shared,
                owner: Some(owner),
                owner_id,
            }),
            Ok(Err(e)) => {
                let _ = owner.join();
                Err(UringError::Setup(e))
            }
            Err(_) => {
                let _ = owner.join();
                Err(UringError::Thread(io::Error::other(
                    "the io_uring thread died while starting",
                )))
            }
        }
    }

    /// Whether the kernel lets this process use io_uring (sets up and drops a ring).
    #[must_use]
    pub fn available() -> bool {
        new_ring(2).is_ok()
    }

    /// The most requests in flight at once.
    #[must_use]
    pub fn depth(&self) -> usize {
        self.shared.depth
    }

    /// Submits `req`; `done` runs exactly once when it has finished (every byte moved,
    /// or an error). Waits while `depth` requests are in flight.
    pub fn submit(
        &self,
        req: IoRequest,
        done: impl FnOnce(AlignedBuf, io::Result<()>) + Send + 'static,
    ) {
        if req.buf.is_empty() {
            return done(req.buf, Ok(()));
        }
        let mut st = self
            .shared
            .changed
            .wait_while(self.shared.lock(), |s| {
                !s.closing && s.in_flight >= self.shared.depth
            })
            .unwrap_or_else(PoisonError::into_inner);
        if st.closing {
            drop(st);
            return done(
                req.buf,
                Err(io::Error::other("the I/O engine is shutting down")),
            );
        }
        st.in_flight += 1;
        let wake = st.pending.is_empty();
        st.pending.push_back(Op {
            req,
            moved: 0,
            done: Box::new(done),
        });
        drop(st);
        if wake {
            self.shared.ring();
        }
    }

    /// Waits until every request submitted so far has been called back.
    pub fn drain(&self) {
        if std::thread::current().id() == self.owner_id {
            return; // called from a callback: the owner cannot wait for itself
        }
        let _st = self
            .shared
            .changed
            .wait_while(self.shared.lock(), |s| s.in_flight > 0)
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Requests admitted and not yet called back.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.shared.lock().in_flight
    }
}

impl Drop for IoEngine {
    /// Refuses new requests, lets every admitted one finish (callbacks included), then
    /// stops the owner thread.
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.changed.notify_all();
        self.shared.ring();
        if let Some(owner) = self.owner.take()
            && std::thread::current().id() != self.owner_id
        {
            let _ = owner.join();
        }
    }
}

fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::new(entries))
}

/// The owner thread's side: the ring and the requests in it.
struct Owner {
    shared: Arc<Shared>,
    ring: IoUring,
    /// Requests in the ring, indexed by `user_data`.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    live: usize,
    /// The doorbell read's target; boxed so that it never moves while the read runs.
    bell: Box<[u8; 8]>,
    bell_armed: bool,
}

impl Owner {
    fn new(shared: Arc<Shared>, ring: IoUring) -> Self {
        Self {
            shared,
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            bell: Box::new([0; 8]),
            bell_armed: false,
        }
    }

    /// Queues an SQE. The ring has room for every live request plus the doorbell, and
    /// everything queued is submitted before the next batch, so this cannot fail.
    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: every entry points into a buffer owned by a request in `slots` (or at
        // `bell`), with its file held open by the request; neither is dropped nor moved
        // (heap allocations) until the entry's completion has been reaped.
        let pushed = unsafe { self.ring.submission().push(entry) };
        if pushed.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let again = unsafe { self.ring.submission().push(entry) };
            debug_assert!(again.is_ok(), "the ring is sized for every live request");
        }
    }

    fn arm_bell(&mut self) {
        let fd = types::Fd(self.shared.doorbell.as_raw_fd());
        let entry = opcode::Read::new(fd, self.bell.as_mut_ptr(), 8)
            .build()
            .user_data(DOORBELL);
        self.push(&entry);
        self.bell_armed = true;
    }

    fn start(&mut self, mut op: Op) {
        let idx = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let entry = op.entry(idx as u64);
        self.slots[idx] = Some(op);
        self.live += 1;
        self.push(&entry);
    }

    fn run(mut self) {
        self.arm_bell();
        // Exits once the doorbell is no longer armed (closing) and nothing is in the ring.
        while self.bell_armed || self.live > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        tracing::error!("io_uring_enter: {e}");
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
            let reaped: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            let mut finished = Vec::new();
            let mut rang = false;
            for (user_data, res) in reaped {
                if user_data == DOORBELL {
                    self.bell_armed = false;
                    rang = true;
                    continue;
                }
                let Ok(idx) = usize::try_from(user_data) else {
                    continue;
                };
                let Some(mut op) = self.slots.get_mut(idx).and_then(Option::take) else {
                    continue;
                };
                let len = op.req.buf.len();
                match advance(op.req.kind, len, &mut op.moved, res) {
                    Step::Again => {
                        let entry = op.entry(user_data);
                        self.slots[idx] = Some(op);
                        self.push(&entry);
                    }
                    Step::Done(result) => {
                        self.free.push(idx);
                        self.live -= 1;
                        finished.push((op, result));
                    }
                }
            }
            if rang {
                let (new, closing) = {
                    let mut st = self.shared.lock();
                    (std::mem::take(&mut st.pending), st.closing)
                };
                for op in new {
                    self.start(op);
                }
                if !closing {
                    self.arm_bell();
                }
            }
            // Started requests go to the kernel before callbacks run.
            if let Err(e) = self.ring.submit() {
                tracing::debug!("io_uring submit: {e}");
            }
            let n = finished.len();
            for (op, result) in finished {
                let done = op.done;
                let buf = op.req.buf;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| done(buf, result)))
                    .is_err()
                {
                    tracing::error!("an I/O completion callback panicked");
                }
            }
            if n > 0 {
                self.shared.lock().in_flight -= n;
                self.shared.changed.notify_all();
            }
        }
    }
}

#[cfg(test)]
mod tests;
