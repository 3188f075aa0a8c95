//! FUSE over io_uring (kernel 6.14+, `CONFIG_FUSE_IO_URING`): an opt-in transport for
//! the FUSE requests of a mount, beside fuser's `/dev/fuse` threads, which keep the INIT
//! handshake and what the kernel still sends on `/dev/fuse` (FORGET, INTERRUPT).
//!
//! `SEALVOL_FUSE_TRANSPORT` picks it, read once per agent ([`Transport::from_env`]):
//! `dev` (the default) serves everything through `/dev/fuse`; `uring` asks the kernel for
//! `FUSE_OVER_IO_URING` at INIT and fails the attach when it is not offered (the kernel
//! offers it only while `/sys/module/fuse/parameters/enable_uring` is `Y`); `auto` uses
//! the ring when offered and `/dev/fuse` otherwise.
//!
//! The kernel keeps one queue per possible CPU and routes a request to the queue of the
//! CPU that issued it; it switches a connection to the ring only once every queue holds
//! a registered entry ([`abi`], `fs/fuse/dev_uring.c`). Each queue gets `threads` workers
//! ([`queue`]), each with its own io_uring and one entry, so as many requests per queue
//! are in flight as `/dev/fuse` threads serve in `dev` mode. Answers come from
//! [`dispatch`], which asks the same [`VolumeFs`] methods as the fuser callbacks.
//! Unmount, detach and shutdown abort the connection: the kernel completes every entry
//! with `ENOTCONN` and the workers end; on kill -9 the kernel cancels the commands itself.
//!
//! Why `dev` stays the default: on the 2-core development machine (`scripts/bench --only
//! fio --variants fuse-uring`, release build, quiet machine, medians of 3) the ring gains
//! at queue depth 1 (4k reads +37 %, writes +28 %: one request less of /dev/fuse
//! read/write and wake-up each) and nothing beyond the spread at depth 16 or on 1 MiB
//! sequential I/O, where the time goes to XTS and the backing file's I/O; and it needs the
//! kernel switch that distributions leave off.

pub mod abi;
mod dispatch;
mod queue;

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::fuse::{MAX_WRITE, VolumeFs};

/// The environment variable that picks the transport.
pub const TRANSPORT_ENV: &str = "SEALVOL_FUSE_TRANSPORT";
/// The kernel's switch for FUSE over io_uring.
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// How long attach waits for the ring workers to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping agent waits for the ring workers to see the aborted connection.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Failures of the io_uring transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The variable names no transport.
    #[error("{TRANSPORT_ENV}={0:?}: expected dev, uring or auto")]
    Unknown(String),
    /// `uring` was asked for and the kernel switch is off (or absent).
    #[error(
        "{TRANSPORT_ENV}=uring: the kernel does not offer FUSE over io_uring \
         ({ENABLE_URING} is {0}; as root: echo Y > {ENABLE_URING}), or use dev/auto"
    )]
    SwitchOff(String),
    /// `uring` was asked for and the kernel did not offer the flag at INIT.
    #[error("{TRANSPORT_ENV}=uring: the kernel did not offer FUSE_OVER_IO_URING at INIT")]
    NotOffered,
    /// An io_uring could not be set up here.
    #[error("{TRANSPORT_ENV}: cannot set up an io_uring: {0}")]
    Ring(std::io::Error),
    /// The kernel refused to register a queue entry.
    #[error("FUSE over io_uring: registering queue {qid} failed: {source}")]
    Register {
        /// The queue.
        qid: u16,
        /// The errno of the REGISTER command.
        source: std::io::Error,
    },
    /// A ring worker could not be started.
    #[error("FUSE over io_uring: cannot start a ring worker: {0}")]
    Spawn(std::io::Error),
}

/// The transport a mount's FUSE requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// fuser's `/dev/fuse` threads only.
    Dev,
    /// FUSE over io_uring; fail if the kernel does not offer it.
    Uring,
    /// FUSE over io_uring when the kernel offers it, else `/dev/fuse`.
    Auto,
}

impl Transport {
    /// `$SEALVOL_FUSE_TRANSPORT`, `dev` when unset or empty.
    ///
    /// # Errors
    /// A value other than `dev`, `uring`, `auto`.
    pub fn from_env() -> Result<Self, TransportError> {
        Self::parse(&std::env::var(TRANSPORT_ENV).unwrap_or_default())
    }

    /// Parses `dev`, `uring` or `auto` (empty: `dev`).
    ///
    /// # Errors
    /// Any other value.
    pub fn parse(s: &str) -> Result<Self, TransportError> {
        match s.trim() {
            "" | "dev" => Ok(Self::Dev),
            "uring" => Ok(Self::Uring),
            "auto" => Ok(Self::Auto),
            other => Err(TransportError::Unknown(other.to_string())),
        }
    }
}

/// A transport chosen before mounting ([`prepare`]), to be started once the kernel has
/// processed the INIT reply ([`Pending::start`]).
#[derive(Debug)]
pub struct Pending {
    transport: Transport,
    granted: Option<Arc<AtomicBool>>,
    ring_fs: Option<VolumeFs>,
}

/// Reads the transport from the environment and readies `fs` for it: for `uring` and
/// `auto`, the filesystem asks for `FUSE_OVER_IO_URING` at INIT.
///
/// # Errors
/// A bad variable; `uring` while the kernel switch is off or io_uring is unavailable.
pub fn prepare(fs: VolumeFs) -> Result<(VolumeFs, Pending), TransportError> {
    prepare_for(Transport::from_env()?, fs)
}

fn prepare_for(transport: Transport, fs: VolumeFs) -> Result<(VolumeFs, Pending), TransportError> {
    let usable = match transport {
        Transport::Dev => Ok(false),
        Transport::Uring | Transport::Auto => uring_usable(),
    };
    let usable = match (transport, usable) {
        (Transport::Uring, Err(e)) => return Err(e),
        (_, Err(e)) => {
            tracing::info!("FUSE transport auto: /dev/fuse ({e})");
            false
        }
        (_, Ok(u)) => u,
    };
    if !usable {
        return Ok((
            fs,
            Pending {
                transport,
                granted: None,
                ring_fs: None,
            },
        ));
    }
    let granted = Arc::new(AtomicBool::new(false));
    let ring_fs = fs.share();
    Ok((
        fs.with_uring(granted.clone()),
        Pending {
            transport,
            granted: Some(granted),
            ring_fs: Some(ring_fs),
        },
    ))
}

/// Whether the kernel switch is on and an SQE128 io_uring can be made here. Asking for
/// the flag without being able to register would leave the mount's requests waiting for
/// a ring that never comes.
fn uring_usable() -> Result<bool, TransportError> {
    let switch = std::fs::read_to_string(ENABLE_URING)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "absent".to_string());
    if switch != "Y" {
        return Err(TransportError::SwitchOff(switch));
    }
    io_uring::IoUring::<io_uring::squeue::Entry128, io_uring::cqueue::Entry>::builder()
        .build(1)
        .map_err(TransportError::Ring)?;
    Ok(true)
}

impl Pending {
    /// Starts the ring workers on the session's `/dev/fuse` descriptor `fuse` if the kernel
    /// granted the flag (INIT has been answered: `fuser::Session::new` returned), `threads`
    /// per queue, and waits until every queue has its entries registered.
    ///
    /// # Errors
    /// `uring` not granted; a worker that cannot start or register.
    pub fn start(self, fuse: BorrowedFd<'_>, threads: usize) -> Result<InEffect, TransportError> {
        let granted = self
            .granted
            .as_ref()
            .is_some_and(|g| g.load(Ordering::Acquire));
        let (true, Some(fs)) = (granted, self.ring_fs) else {
            if self.transport == Transport::Uring {
                return Err(TransportError::NotOffered);
            }
            tracing::info!("FUSE transport: /dev/fuse");
            return Ok(InEffect::dev());
        };
        let fuse: Arc<OwnedFd> =
            Arc::new(fuse.try_clone_to_owned().map_err(TransportError::Spawn)?);
        let queues = possible_cpus();
        let per_queue = threads.max(1);
        let served = Arc::new(AtomicU64::new(0));
        let (tx, rx) = mpsc::channel();
        let mut workers = Vec::new();
        for qid in 0..queues {
            for n in 0..per_queue {
                let worker = queue::Worker {
                    fuse: fuse.clone(),
                    qid,
                    entries: 1,
                    payload_len: (MAX_WRITE as usize).max(abi::MIN_READ_BUFFER),
                    fs: fs.share(),
                    served: served.clone(),
                };
                let tx = tx.clone();
                let handle = std::thread::Builder::new()
                    .name(format!("fuse-ring-q{qid}-{n}"))
                    .spawn(move || worker.run(&tx))
                    .map_err(TransportError::Spawn)?;
                workers.push(handle);
            }
        }
        drop(tx);
        let deadline = Instant::now() + REGISTER_TIMEOUT;
        for _ in 0..workers.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => {}
                Ok((qid, Err(source))) => return Err(TransportError::Register { qid, source }),
                Err(_) => {
                    return Err(TransportError::Register {
                        qid: 0,
                        source: std::io::Error::from(std::io::ErrorKind::TimedOut),
                    });
                }
            }
        }
        tracing::info!("FUSE transport: io_uring, {queues} queues x {per_queue} workers");
        Ok(InEffect {
            uring: true,
            workers,
            served,
        })
    }
}

/// The transport serving a mount.
#[derive(Debug)]
pub struct InEffect {
    uring: bool,
    workers: Vec<JoinHandle<()>>,
    served: Arc<AtomicU64>,
}

impl InEffect {
    fn dev() -> Self {
        Self {
            uring: false,
            workers: Vec::new(),
            served: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `dev` or `uring`, as the agent record shows it.
    #[must_use]
    pub fn name(&self) -> &'static str {
        if self.uring { "uring" } else { "dev" }
    }

    /// After the FUSE session ended (the connection is aborted): waits, bounded, for
    /// the ring workers to end, and logs how many requests the ring answered.
    pub fn finish(self) {
        let deadline = Instant::now() + STOP_TIMEOUT;
        for w in self.workers {
            while !w.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if w.is_finished() {
                let _ = w.join();
            } else {
                tracing::error!("a FUSE ring worker did not stop; leaving it");
            }
        }
        if self.uring {
            tracing::info!(
                "FUSE transport io_uring answered {} requests",
                self.served.load(Ordering::Relaxed)
            );
        }
    }
}

/// Kernel queues: one per possible CPU (`/sys/devices/system/cpu/possible`, e.g. `0-1`).
fn possible_cpus() -> u16 {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible").unwrap_or_default();
    let n = count_cpu_list(text.trim());
    if n > 0 {
        return n;
    }
    // SAFETY: sysconf has no preconditions.
    let conf = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    u16::try_from(conf).unwrap_or(1).max(1)
}

/// The number of CPUs in a kernel CPU list such as `0-3,8,10-11`.
fn count_cpu_list(list: &str) -> u16 {
    let mut n: u32 = 0;
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        match (lo.trim().parse::<u32>(), hi.trim().parse::<u32>()) {
            (Ok(lo), Ok(hi)) if hi >= lo => n += hi - lo + 1,
            _ => return 0,
        }
    }
    u16::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transports_parse() {
        assert_eq!(Transport::parse("").expect("empty"), Transport::Dev);
        assert_eq!(Transport::parse("dev").expect("dev"), Transport::Dev);
        assert_eq!(Transport::parse("uring").expect("uring"), Transport::Uring);
        assert_eq!(Transport::parse(" auto\n").expect("auto"), Transport::Auto);
        let e = Transport::parse("fast").expect_err("unknown");
        assert!(e.to_string().contains("dev, uring or auto"), "{e}");
    }

    #[test]
    fn cpu_lists_count() {
        assert_eq!(count_cpu_list("0-1"), 2);
        assert_eq!(count_cpu_list("0"), 1);
        assert_eq!(count_cpu_list("0-3,8,10-11"), 7);
        assert_eq!(count_cpu_list("junk"), 0);
        assert_eq!(count_cpu_list(""), 0);
    }

    #[test]
    fn the_switch_off_error_names_the_sysfs_switch() {
        let e = TransportError::SwitchOff("N".into()).to_string();
        assert!(e.contains(ENABLE_URING), "{e}");
    }
}
