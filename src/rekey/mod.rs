//! Online, crash-safe re-encryption of a volume under a new data key (DESIGN §7).
//!
//! # On disk
//!
//! While a rekey is in progress the LUKS2 header carries, besides the one crypt segment
//! and its digest of the **old** key:
//! - a second `pbkdf2` digest, of the **new** key, bound to no segment;
//! - the mandatory requirement [`luks2::REKEY_REQUIREMENT`], so `cryptsetup` refuses to
//!   activate or modify the half-converted volume;
//! - a token of type [`TOKEN_TYPE`] holding [`RekeyState`] (the token's codec and the
//!   typed header steps live in [`crate::luks2`]): both digest ids, the
//!   hotzone size, the **boundary** (data-relative byte offset: everything below it is
//!   under the new key, everything above under the old one), the optional new KMS token
//!   (installed at the end), and the **journal** record while a hotzone is being rewritten
//!   (which zone, where its journal lies in the keyslots area, and the BLAKE3 of the
//!   zone's old ciphertext), and the [`Resilience`] when it is not the default.
//!
//! The journal lies in one of two slots at the start of [`luks2::journal_area`] (the
//! keyslots area between the header copies and the data). What it holds is the
//! [`Resilience`], named after `cryptsetup reencrypt --resilience`:
//! - `journal` (the default, DESIGN §7): the zone's old ciphertext verbatim;
//! - `checksum`: the first 16 bytes of each 512-byte piece of the old ciphertext, 1/32 of
//!   the zone, so the rekey writes each byte about once instead of twice.
//!
//! # One hotzone `[b, e)`, behind a fence throughout ([`Device::fence`])
//!
//! 1. read the old ciphertext `C`; if it is all holes, just checkpoint `boundary = e`;
//! 2. write `C` to the journal, flush;
//! 3. checkpoint `journal = {zone b, blake3(C)}` (header update: both copies, flushed);
//! 4. re-encrypt `C` old -> new (holes stay holes), write it over the zone, flush;
//! 5. checkpoint `boundary = e, journal = none`; move the device's in-memory boundary.
//!
//! Foreground I/O on either side keeps running: reads and writes below the boundary use
//! the new key, above it the old key, and I/O touching the zone itself waits for the fence
//! to lift (only that I/O: the fence is an exact range, unlike the stripe locks). Because the
//! in-memory boundary never runs ahead of the one on disk while the zone is unlocked, a
//! foreground write that lands after step 5 is always interpreted with the right key after
//! a crash.
//!
//! # Recovery
//!
//! On open, with both keys: if the header records a journal, the zone's old ciphertext is
//! rebuilt and must match the recorded BLAKE3, and is written back, which undoes a
//! partial or torn step 4; the zone is then redone from step 2. With `journal` the copy is
//! the old ciphertext. With `checksum` the zone on disk is a mix of old and new
//! ciphertext, piece by piece (disks write 512 bytes atomically); a piece whose first 16
//! bytes differ from its fingerprint was rewritten, so its plaintext comes from the new
//! key, and since XTS blocks are independent given their tweaks, each sector is put back
//! together and encrypted again under the old key. A tear below 512 bytes cannot be
//! repaired that way; the BLAKE3 check turns it into [`RekeyError::JournalCorrupt`]
//! rather than wrong data.
//!
//! Without a journal record the zone at the boundary is untouched old ciphertext. A
//! finished zone is never re-encrypted twice: the boundary passes it only after its new
//! ciphertext is durable. After the last zone the header becomes a plain sealvol header
//! again: the new digest takes over the segment, the old digest, the token and the
//! requirement go, and the journal area is punched out.
//!
//! # Offline
//!
//! With nothing else doing I/O ([`Rekeyer::exclusive`]), steps 4 and 5 of zone `h` fold
//! into zone `h + 1`: its journal goes to the other slot, and one flush makes both that
//! journal and zone `h`'s new ciphertext durable before the checkpoint that names the new
//! journal also moves the boundary past zone `h`. Zone `h`'s new ciphertext is written
//! while zone `h + 1` is read, so two cores are busy.
//!
//! # Online, in the attach agent
//!
//! [`crate::agent::ControlServer`] listens on a Unix socket next to the agent's record
//! (root or the agent's user only) and runs rekeys of the devices it serves as background
//! jobs, streaming progress back as JSON lines; `sealvol rekey-volume --mountpoint` is its
//! client ([`crate::agent::request_online`]).
//!
//! # Layout
//!
//! - this file: options, errors, reports, and the checkpoint queries;
//! - `journal`: the journal area's slots and what a journal holds (copy or checksums),
//!   hotzone sizing, and the checksum journal's repair;
//! - `engine`: [`Rekeyer`], the hotzone loop;
//! - `offline`: crash recovery, [`open_resuming`], [`rekey_detached`].
//!
//! [`luks2::REKEY_REQUIREMENT`]: crate::luks2::REKEY_REQUIREMENT
//! [`luks2::journal_area`]: crate::luks2::journal_area
//! [`Device::fence`]: crate::device::Device::fence

mod engine;
mod journal;
mod offline;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backing::BackingError;
use crate::device::{CryptStateError, DeviceError};
use crate::luks2::{Header, KmsToken, Luks2Error};
use crate::secret::SecretError;
use crate::volume::VolumeError;

pub use crate::luks2::{
    JournalRecord, Progress, REKEY_TOKEN_TYPE as TOKEN_TYPE, RekeyState, Resilience, STATE_VERSION,
};
pub use engine::Rekeyer;
pub use journal::max_hotzone;
pub use offline::{open_resuming, open_resuming_backing, recover, rekey_detached};

/// Default hotzone size online (I/O touching the zone waits while it is rewritten, so
/// small: with 2 MiB, 4 KiB QD16 random I/O keeps about 0.9× its IOPS during a rekey,
/// with 8 MiB a quarter; bench/rekey-online.sh).
pub const DEFAULT_HOTZONE: u64 = 2 * 1024 * 1024;
/// Default hotzone size offline (nothing waits; larger zones mean fewer checkpoints, but
/// past 8 MiB the read, crypto and writeback of consecutive zones overlap less: with the
/// checksum journal, 16/32/64 MiB zones measured 684-872/621-709/543-657 MB/s against
/// 781-889 for 8 MiB).
pub const DEFAULT_OFFLINE_HOTZONE: u64 = 8 * 1024 * 1024;
/// Largest hotzone with the checksum journal (memory, not the journal area, limits it).
pub const MAX_CHECKSUM_HOTZONE: u64 = 256 * 1024 * 1024;
/// Hotzones are multiples of this (the device's range-lock granularity).
pub const HOTZONE_ALIGN: u64 = 64 * 1024;

/// Everything a rekey can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// Header problem.
    #[error(transparent)]
    Header(Luks2Error),
    /// Device problem.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The device is not in the state a rekey step needs.
    #[error(transparent)]
    CryptState(#[from] CryptStateError),
    /// Storage problem.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Opening the volume failed.
    #[error(transparent)]
    Volume(Box<VolumeError>),
    /// A key file could not be used.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The `sealvol-rekey` token does not parse.
    #[error("the {TOKEN_TYPE} token in the header is malformed: {0}")]
    BadToken(String),
    /// The old key is not the one the rekey started from.
    #[error(
        "the old volume key does not match the volume (digest mismatch); pass the key the volume was encrypted with as --volume-key-file"
    )]
    WrongOldKey,
    /// The new key is not the one the interrupted rekey started with.
    #[error(
        "the new volume key does not match the interrupted rekey's new key (digest mismatch); resume with the same --new-volume-key-file it was started with"
    )]
    WrongNewKey,
    /// New key == old key.
    #[error(
        "the new volume key is the volume's current key; generate a fresh one (`head -c 64 /dev/urandom > NEW`)"
    )]
    SameKey,
    /// A rekey is already in progress (start refused).
    #[error("a rekey is already in progress on this volume; resume it instead")]
    AlreadyInProgress,
    /// No rekey in progress (resume refused).
    #[error("no rekey is in progress on this volume")]
    NotInProgress,
    /// The volume has a KMS token but no new wrapped key was supplied.
    #[error(
        "this volume's data key is wrapped by KMS; a rekey must store the new key's KMS blob too (rekey it through the KMS path, not with key files only)"
    )]
    KmsTokenNeeded,
    /// Passphrase keyslots (added with cryptsetup) would keep unlocking the old key.
    #[error(
        "the volume has {0} passphrase keyslot(s) added with cryptsetup; they hold the old key, so remove them first (`cryptsetup luksKillSlot`) and add them again after the rekey"
    )]
    HasKeyslots(usize),
    /// The hotzone size is unusable.
    #[error(
        "hotzone of {requested} bytes is not usable: it must be a positive multiple of {HOTZONE_ALIGN} bytes and at most {max} bytes (what one journal slot in the keyslots area covers)"
    )]
    BadHotzone {
        /// Requested size.
        requested: u64,
        /// Largest usable size.
        max: u64,
    },
    /// The journal copy does not match its checksum in the header.
    #[error(
        "the rekey journal for the hotzone at byte {zone_start} does not match its checksum in the header; the volume cannot be recovered automatically (restore from a snapshot)"
    )]
    JournalCorrupt {
        /// Data offset of the zone.
        zone_start: u64,
    },
    /// Stopped between two hotzones (detach); the checkpoint is consistent.
    #[error(
        "rekey paused at byte {0} (the volume was detached); it resumes on the next attach with both keys or with `sealvol rekey-volume`"
    )]
    Cancelled(u64),
    /// The volume is attached: use the online path.
    #[error(
        "{0} is attached at {1}; rekey it online with `sealvol rekey-volume --mountpoint {1} --new-volume-key-file NEW`"
    )]
    Attached(PathBuf, PathBuf),
    /// Talking to the attach agent failed.
    #[error("attach agent control socket {path}: {why}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// What went wrong.
        why: String,
    },
    /// The agent reported a failure.
    #[error("the attach agent's rekey failed: {0}")]
    Agent(String),
}

impl From<VolumeError> for RekeyError {
    fn from(e: VolumeError) -> Self {
        Self::Volume(Box::new(e))
    }
}

impl From<Luks2Error> for RekeyError {
    /// A malformed checkpoint token is [`RekeyError::BadToken`]; anything else about the
    /// header is [`RekeyError::Header`].
    fn from(e: Luks2Error) -> Self {
        match e {
            Luks2Error::BadRekeyToken(why) => Self::BadToken(why),
            other => Self::Header(other),
        }
    }
}

/// Options for starting a rekey.
#[derive(Debug, Clone, Default)]
pub struct RekeyOptions {
    /// Hotzone size in bytes (`None`: [`DEFAULT_HOTZONE`], capped by the journal area).
    pub hotzone_bytes: Option<u64>,
    /// The new key's KMS token (the seam for KMS-backed volumes), stored at the end.
    pub new_kms_token: Option<KmsToken>,
    /// What each hotzone's journal holds.
    pub resilience: Resilience,
}

/// Where a step is, for [`Rekeyer::step_with`]'s observer (crash tests interleave
/// foreground I/O there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPhase {
    /// The zone's old ciphertext is in the journal and flushed.
    Journaled,
    /// The header names the journal.
    Checkpointed,
    /// The zone holds the new ciphertext, flushed.
    Rewritten,
    /// The header's boundary passed the zone.
    Advanced,
}

/// The rekey state in a header, if a rekey is in progress ([`Header::rekey_state`]).
///
/// # Errors
/// [`RekeyError::BadToken`] for a token that does not parse.
pub fn state(header: &Header) -> Result<Option<RekeyState>, RekeyError> {
    Ok(header.rekey_state()?)
}

/// Whether a header has a rekey in progress (token or requirement,
/// [`Header::rekey_in_progress`]).
#[must_use]
pub fn in_progress(header: &Header) -> bool {
    header.rekey_in_progress()
}

/// Runs `f` (an online rekey) on a one-thread rayon pool at nice 10: its crypto and
/// hashing (`par_*` calls inside run on the current pool) then take one core at most and
/// yield it to the foreground I/O of the volume being rekeyed.
pub(crate) fn in_background<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .thread_name(|_| "sealvol-rekey".into())
        .start_handler(|_| {
            // SAFETY: setpriority takes integers only; on Linux, PRIO_PROCESS with 0 sets
            // the nice value of the calling thread alone. A failure keeps the default.
            let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
        })
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(e) => {
            tracing::warn!(
                "no background pool for the rekey ({e}); running in the foreground pool"
            );
            f()
        }
    }
}

/// What a finished rekey reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RekeyReport {
    /// Volume data bytes.
    pub total_bytes: u64,
    /// Bytes re-encrypted in this run (from the resume point to the end).
    pub bytes_this_run: u64,
    /// Whether an interrupted rekey was resumed.
    pub resumed: bool,
    /// Whether the volume was already under the new key (nothing to do).
    pub already_done: bool,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Throughput of this run in MB/s (10^6 bytes).
    pub mb_per_s: f64,
}

impl RekeyReport {
    /// The report of a rekey with nothing to do: the volume is already under the new key.
    #[must_use]
    pub fn already_done(total_bytes: u64) -> Self {
        Self {
            total_bytes,
            bytes_this_run: 0,
            resumed: false,
            already_done: true,
            seconds: 0.0,
            mb_per_s: 0.0,
        }
    }
}

/// The report of a run that started at `start` from boundary `from` of `total` bytes.
pub(crate) fn report(start: Instant, from: u64, total: u64, resumed: bool) -> RekeyReport {
    let seconds = start.elapsed().as_secs_f64();
    let bytes = total - from;
    RekeyReport {
        total_bytes: total,
        bytes_this_run: bytes,
        resumed,
        already_done: false,
        seconds,
        mb_per_s: if seconds > 0.0 {
            bytes as f64 / seconds / 1e6
        } else {
            0.0
        },
    }
}
