//! Online, crash-safe re-encryption of a volume under a new data key (DESIGN §7).
//!
//! # On disk
//!
//! While a rekey is in progress the LUKS2 header carries, besides the one crypt segment
//! and its digest of the **old** key:
//! - a second `pbkdf2` digest, of the **new** key, bound to no segment;
//! - the mandatory requirement [`luks2::REKEY_REQUIREMENT`], so `cryptsetup` refuses to
//!   activate or modify the half-converted volume;
//! - a token of type [`TOKEN_TYPE`] holding [`RekeyState`]: both digest ids, the
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
//! [`ControlServer`] listens on a Unix socket next to the agent's record (root or the
//! agent's user only) and runs rekeys of the devices it serves as background jobs,
//! streaming progress back as JSON lines; `sealvol rekey-volume --mountpoint` is its
//! client ([`request_online`]).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backing::{Backing, BackingError};
use crate::device::{CryptStateError, Device, DeviceError, Geometry, is_zero};
use crate::luks2::{self, Header, KmsToken, Luks2Error};
use crate::secret::{SecretError, VolumeKey};
use crate::volume::{self, VolumeError};
use crate::xts::{SectorCipher, SectorSize, XtsError};

/// LUKS2 token type holding the rekey checkpoint.
pub const TOKEN_TYPE: &str = "sealvol-rekey";
/// Version of the [`RekeyState`] format.
pub const STATE_VERSION: u32 = 1;
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
/// Journal slots start on this alignment.
const SLOT_ALIGN: u64 = 4096;
/// Hotzones are multiples of this (the device's range-lock granularity).
pub const HOTZONE_ALIGN: u64 = 64 * 1024;
/// The unit a disk writes atomically, and so the unit a crash can tear a sector into.
const PIECE: usize = 512;
/// Bytes of a piece's old ciphertext kept as its fingerprint (one AES block).
const FINGERPRINT: usize = 16;

/// How a hotzone's old ciphertext is protected while it is rewritten in place; the
/// choice and the names follow `cryptsetup reencrypt --resilience`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resilience {
    /// A full copy of the zone's old ciphertext (DESIGN §7): any torn write, at any
    /// granularity, is repaired from it. Writes every byte twice.
    #[default]
    Journal,
    /// The first 16 bytes of every 512-byte piece of the zone's old ciphertext, 1/32 of
    /// the zone. After a crash each piece is either old or new ciphertext (disks write
    /// 512 bytes atomically) and its fingerprint tells which; XTS blocks decrypt
    /// independently, so a torn sector is put back together under the old key. The
    /// zone's BLAKE3 then proves the repair; a tear below 512 bytes fails it with
    /// [`RekeyError::JournalCorrupt`] instead of returning wrong data.
    Checksum,
}

impl Resilience {
    pub(crate) fn is_journal(&self) -> bool {
        *self == Self::Journal
    }
}

/// Everything a rekey can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    /// Header problem.
    #[error(transparent)]
    Header(#[from] Luks2Error),
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

/// The journal record of the hotzone being rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalRecord {
    /// Data-relative offset of the zone (equals the boundary).
    pub zone_start: u64,
    /// Zone length in bytes.
    pub len: u64,
    /// Absolute backing offset of the journal copy (inside the keyslots area).
    pub offset: u64,
    /// Checksum of the zone's old ciphertext (what recovery must restore): BLAKE3, hex.
    pub blake3: String,
}

/// The checkpoint stored in the `sealvol-rekey` token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Digest id of the old key (bound to the segment until the end).
    pub old_digest: u32,
    /// Digest id of the new key (bound to nothing until the end).
    pub new_digest: u32,
    /// Hotzone size in bytes.
    pub hotzone_bytes: u64,
    /// Data-relative byte offset: below it the new key, from it on the old key.
    pub boundary: u64,
    /// The zone being rewritten, when its old ciphertext is journaled.
    pub journal: Option<JournalRecord>,
    /// The new key's KMS token, installed when the rekey finishes.
    pub new_kms_token: Option<KmsToken>,
    /// What the journal holds. Absent means a full copy, so journal-mode checkpoints read
    /// as before; a `checksum` checkpoint is refused by binaries that predate it.
    #[serde(default, skip_serializing_if = "Resilience::is_journal")]
    pub resilience: Resilience,
}

/// Progress of a rekey, in data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Progress {
    /// Bytes under the new key (the boundary).
    pub done: u64,
    /// Data size.
    pub total: u64,
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

/// The rekey state in a header, if a rekey is in progress.
///
/// # Errors
/// [`RekeyError::BadToken`] for a token that does not parse.
pub fn state(header: &Header) -> Result<Option<RekeyState>, RekeyError> {
    let Some(v) = header.token(TOKEN_TYPE) else {
        return Ok(None);
    };
    let mut obj = v
        .as_object()
        .cloned()
        .ok_or_else(|| RekeyError::BadToken("not an object".into()))?;
    obj.remove("type");
    obj.remove("keyslots");
    let st: RekeyState = serde_json::from_value(Value::Object(obj))
        .map_err(|e| RekeyError::BadToken(e.to_string()))?;
    if st.version != STATE_VERSION {
        return Err(RekeyError::BadToken(format!(
            "version {} (this sealvol knows {STATE_VERSION})",
            st.version
        )));
    }
    Ok(Some(st))
}

/// Whether a header has a rekey in progress (token or requirement).
#[must_use]
pub fn in_progress(header: &Header) -> bool {
    header.token(TOKEN_TYPE).is_some()
        || header
            .mandatory_requirements()
            .iter()
            .any(|r| r == luks2::REKEY_REQUIREMENT)
}

fn store_state(
    header: &mut Header,
    st: &RekeyState,
    backing: &dyn Backing,
) -> Result<(), RekeyError> {
    let Value::Object(fields) =
        serde_json::to_value(st).map_err(|e| RekeyError::BadToken(e.to_string()))?
    else {
        return Err(RekeyError::BadToken("state is not an object".into()));
    };
    header.set_token(TOKEN_TYPE, fields);
    header.write(backing)?;
    Ok(())
}

/// The journal checksum: BLAKE3 of the copy (hex), hashed across the rayon pool. It
/// detects a journal copy that is not what the checkpoint recorded; BLAKE3 rather than
/// SHA-256 because SHA-256 was a third of the rekey's CPU time (bench/notes.md).
fn journal_checksum(buf: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update_rayon(buf);
    h.finalize().to_hex().to_string()
}

/// Writes the non-hole sector runs of `buf` at absolute offset `at` (holes are never
/// written, so sparse files stay sparse); with `punch`, hole runs are punched.
fn write_runs(
    backing: &dyn Backing,
    at: u64,
    buf: &[u8],
    ss: usize,
    punch: bool,
) -> Result<(), BackingError> {
    let sectors = buf.len() / ss;
    let mut i = 0;
    while i < sectors {
        let zero = is_zero(&buf[i * ss..(i + 1) * ss]);
        let start = i;
        while i < sectors && is_zero(&buf[i * ss..(i + 1) * ss]) == zero {
            i += 1;
        }
        let off = at + (start * ss) as u64;
        if !zero {
            backing.write_at(&buf[start * ss..i * ss], off)?;
        } else if punch {
            backing.punch_hole(off, ((i - start) * ss) as u64)?;
        }
    }
    Ok(())
}

/// The largest usable hotzone for a header: one journal slot fills the journal area.
#[must_use]
pub fn max_hotzone(header: &Header, resilience: Resilience) -> u64 {
    let area = luks2::journal_area(header);
    let len = area.end - area.start;
    let max = match resilience {
        Resilience::Journal => len,
        Resilience::Checksum => (len / SLOT_ALIGN * SLOT_ALIGN)
            .saturating_mul((PIECE / FINGERPRINT) as u64)
            .min(MAX_CHECKSUM_HOTZONE),
    };
    max / HOTZONE_ALIGN * HOTZONE_ALIGN
}

/// The default offline hotzone: as large as allows two journal slots, up to
/// [`DEFAULT_OFFLINE_HOTZONE`].
fn default_offline_hotzone(header: &Header, resilience: Resilience) -> u64 {
    (max_hotzone(header, resilience) / 2 / HOTZONE_ALIGN * HOTZONE_ALIGN)
        .min(DEFAULT_OFFLINE_HOTZONE)
}

fn check_keys(
    header: &Header,
    st: &RekeyState,
    old: &VolumeKey,
    new: &VolumeKey,
) -> Result<(), RekeyError> {
    let map = |e: Luks2Error, wrong: RekeyError| match e {
        Luks2Error::DigestMismatch => wrong,
        other => RekeyError::Header(other),
    };
    header
        .verify_key_against(st.old_digest, old)
        .map_err(|e| map(e, RekeyError::WrongOldKey))?;
    header
        .verify_key_against(st.new_digest, new)
        .map_err(|e| map(e, RekeyError::WrongNewKey))
}

/// Crash recovery, before a volume with a rekey in progress is served: checks both keys
/// against their digests and, if the header names a journal, restores the hotzone from it
/// (the zone is then redone by [`Rekeyer::step`]). Returns the checkpoint.
///
/// # Errors
/// Wrong keys, a corrupt journal, I/O failure.
pub fn recover(
    backing: &dyn Backing,
    header: &Header,
    old: &VolumeKey,
    new: &VolumeKey,
) -> Result<RekeyState, RekeyError> {
    let st = state(header)?.ok_or(RekeyError::NotInProgress)?;
    check_keys(header, &st, old, new)?;
    if let Some(j) = &st.journal {
        let len =
            usize::try_from(j.len).map_err(|_| RekeyError::BadToken("journal length".into()))?;
        let sector_size = SectorSize::try_from(header.sector_size())
            .map_err(|e| RekeyError::BadToken(e.to_string()))?;
        let ss = sector_size.bytes();
        let area = luks2::journal_area(header);
        if j.zone_start != st.boundary
            || !len.is_multiple_of(ss)
            || j.offset < area.start
            || j.offset.saturating_add(journal_len(st.resilience, j.len)) > area.end
        {
            return Err(RekeyError::BadToken(
                "the journal record does not match the boundary or the journal area".into(),
            ));
        }
        let zone_at = header.data_offset() + j.zone_start;
        let buf = match st.resilience {
            Resilience::Journal => {
                let mut buf = vec![0u8; len];
                backing.read_at(&mut buf, j.offset)?;
                buf
            }
            Resilience::Checksum => {
                let mut fingerprints = vec![0u8; len / PIECE * FINGERPRINT];
                backing.read_at(&mut fingerprints, j.offset)?;
                let mut zone = vec![0u8; len];
                backing.read_at(&mut zone, zone_at)?;
                let ciphers = (
                    SectorCipher::new(old, sector_size),
                    SectorCipher::new(new, sector_size),
                );
                reassemble_old(&mut zone, &fingerprints, j.zone_start, &ciphers)
                    .map_err(CryptStateError::from)?;
                zone
            }
        };
        if journal_checksum(&buf) != j.blake3 {
            return Err(RekeyError::JournalCorrupt {
                zone_start: j.zone_start,
            });
        }
        write_runs(backing, zone_at, &buf, ss, true)?;
        backing.flush()?;
        tracing::info!(
            "rekey recovery: restored the hotzone at {} ({} bytes) from the {:?} journal",
            j.zone_start,
            j.len,
            st.resilience
        );
    }
    Ok(st)
}

/// Bytes the journal of a `len`-byte zone takes.
fn journal_len(resilience: Resilience, len: u64) -> u64 {
    match resilience {
        Resilience::Journal => len,
        Resilience::Checksum => len / PIECE as u64 * FINGERPRINT as u64,
    }
}

/// The checksum journal of a zone: each 512-byte piece's first 16 bytes.
fn fingerprints(zone: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(zone.len() / PIECE * FINGERPRINT);
    for piece in zone.chunks_exact(PIECE) {
        out.extend_from_slice(&piece[..FINGERPRINT]);
    }
    out
}

/// Turns a zone that a crash left as a mix of old and new ciphertext, 512-byte piece by
/// piece, back into old ciphertext: a piece whose start differs from its fingerprint was
/// rewritten, so its plaintext comes from the new key, the others' from the old key (XTS
/// blocks are independent given their tweaks), and the sector is encrypted again under
/// the old key. The caller checks the result against the zone's BLAKE3.
fn reassemble_old(
    zone: &mut [u8],
    fingerprints: &[u8],
    zone_start: u64,
    (old, new): &(SectorCipher, SectorCipher),
) -> Result<(), XtsError> {
    let ss = old.sector_size().bytes();
    let first = zone_start / ss as u64;
    let per_sector = ss / PIECE;
    for (i, sector) in zone.chunks_exact_mut(ss).enumerate() {
        let fp = &fingerprints[i * per_sector * FINGERPRINT..][..per_sector * FINGERPRINT];
        let rewritten: Vec<bool> = sector
            .chunks_exact(PIECE)
            .zip(fp.chunks_exact(FINGERPRINT))
            .map(|(piece, f)| piece[..FINGERPRINT] != *f)
            .collect();
        if !rewritten.contains(&true) {
            continue;
        }
        let n = first + i as u64;
        let mut via_new = sector.to_vec();
        new.decrypt_sectors(&mut via_new, n)?;
        old.decrypt_sectors(sector, n)?;
        for (p, _) in rewritten.iter().enumerate().filter(|(_, r)| **r) {
            sector[p * PIECE..(p + 1) * PIECE].copy_from_slice(&via_new[p * PIECE..][..PIECE]);
        }
        old.encrypt_sectors(sector, n)?;
    }
    Ok(())
}

/// A rekey in progress on an open device: drives it hotzone by hotzone.
pub struct Rekeyer {
    device: Arc<Device>,
    header: Header,
    st: RekeyState,
    journal_area: Range<u64>,
    /// No other I/O on the device (offline): checkpoints are merged, see [`Rekeyer::exclusive`].
    exclusive: bool,
    /// The last zone's new ciphertext is written but not yet flushed (merged mode).
    unflushed: bool,
    /// Merged mode: the last zone's new ciphertext, not yet written. The next step writes
    /// it while it reads its own zone (two cores busy instead of one), and its journal
    /// flush makes it durable as before.
    pending: Option<Rewrite>,
    /// Zone buffers (old and new ciphertext), reused from zone to zone.
    scratch: (Vec<u8>, Vec<u8>),
}

/// A zone's new ciphertext waiting to be written in place.
struct Rewrite {
    zone: Range<u64>,
    buf: Vec<u8>,
}

impl Rewrite {
    /// Writes the zone's non-hole runs and starts their writeback.
    fn write(&self, backing: &dyn Backing, geo: Geometry) -> Result<(), BackingError> {
        let at = geo.data_offset + self.zone.start;
        write_runs(backing, at, &self.buf, geo.sector_size.bytes(), false)?;
        backing.start_writeback(at, self.zone.end - self.zone.start);
        Ok(())
    }
}

impl std::fmt::Debug for Rekeyer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekeyer")
            .field("device", &self.device)
            .field("checkpoint", &self.st)
            .finish_non_exhaustive()
    }
}

impl Rekeyer {
    /// Starts a rekey of `device` (open under its current key, which the header's
    /// segment digest names) to `new`: adds the new digest, the token and the mandatory
    /// requirement, then switches the device into rekey mode at boundary 0.
    ///
    /// # Errors
    /// A rekey already in progress, `new` equal to the current key, a KMS-backed volume
    /// without a new KMS token, passphrase keyslots, a bad hotzone, I/O failure.
    pub fn start(
        device: Arc<Device>,
        new: &VolumeKey,
        opts: &RekeyOptions,
    ) -> Result<Self, RekeyError> {
        let backing = device.backing().clone();
        let mut header = Header::read(&*backing)?;
        if in_progress(&header) {
            return Err(RekeyError::AlreadyInProgress);
        }
        match header.verify_key(new) {
            Ok(()) => return Err(RekeyError::SameKey),
            Err(Luks2Error::DigestMismatch) => {}
            Err(e) => return Err(e.into()),
        }
        if header.kms_token().is_some() && opts.new_kms_token.is_none() {
            return Err(RekeyError::KmsTokenNeeded);
        }
        if header.keyslot_count() > 0 {
            return Err(RekeyError::HasKeyslots(header.keyslot_count()));
        }
        let max = max_hotzone(&header, opts.resilience);
        let hotzone = opts.hotzone_bytes.unwrap_or(DEFAULT_HOTZONE.min(max));
        let ss = u64::from(header.sector_size());
        if hotzone == 0
            || !hotzone.is_multiple_of(HOTZONE_ALIGN)
            || !hotzone.is_multiple_of(ss)
            || hotzone > max
        {
            return Err(RekeyError::BadHotzone {
                requested: hotzone,
                max,
            });
        }
        let old_digest = header
            .digests()
            .iter()
            .find(|(_, d)| !d.segments.is_empty())
            .map(|(id, _)| *id)
            .ok_or_else(|| RekeyError::BadToken("the segment has no digest".into()))?;
        let new_digest = header.add_digest_for(new);
        header.set_mandatory_requirement(luks2::REKEY_REQUIREMENT);
        let st = RekeyState {
            version: STATE_VERSION,
            old_digest,
            new_digest,
            hotzone_bytes: hotzone,
            boundary: 0,
            journal: None,
            new_kms_token: opts.new_kms_token.clone(),
            resilience: opts.resilience,
        };
        store_state(&mut header, &st, &*backing)?;
        let sector_size = SectorSize::try_from(header.sector_size())
            .map_err(|e| RekeyError::BadToken(e.to_string()))?;
        device.begin_rekey(SectorCipher::new(new, sector_size))?;
        Ok(Self::at_checkpoint(device, header, st))
    }

    /// Resumes the rekey of a device opened in rekey mode (after [`recover`], e.g. by
    /// [`open_resuming`]).
    ///
    /// # Errors
    /// No rekey in the header, or the device's boundary differs from the header's.
    pub fn resume(device: Arc<Device>) -> Result<Self, RekeyError> {
        let header = Header::read(&**device.backing())?;
        let st = state(&header)?.ok_or(RekeyError::NotInProgress)?;
        if device.rekey_boundary() != Some(st.boundary) {
            return Err(RekeyError::BadToken(format!(
                "the device is at boundary {:?} but the header says {}",
                device.rekey_boundary(),
                st.boundary
            )));
        }
        Ok(Self::at_checkpoint(device, header, st))
    }

    /// A rekeyer (online, nothing unflushed) at the checkpoint `st` of `header`.
    fn at_checkpoint(device: Arc<Device>, header: Header, st: RekeyState) -> Self {
        let journal_area = luks2::journal_area(&header);
        Self {
            device,
            header,
            st,
            journal_area,
            exclusive: false,
            unflushed: false,
            pending: None,
            scratch: (Vec::new(), Vec::new()),
        }
    }

    /// Declares that nothing else does I/O on the device (an offline rekey). Each hotzone
    /// then costs one header update and one data flush instead of two of each: the
    /// checkpoint that names the journal of zone `h` (in one of two alternating journal
    /// slots, so the slot the header names is never overwritten) also records that zone
    /// `h - 1` is done, the journal's flush makes zone `h - 1`'s new ciphertext durable
    /// too, and all-hole zones are passed without a checkpoint. (When two slots do not
    /// fit, the steps stay unmerged.) This is unsafe with concurrent writers, whose
    /// writes below an unrecorded boundary would be read with the old key after a crash.
    #[must_use]
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// Bytes of one journal slot.
    fn slot_len(&self) -> u64 {
        journal_len(self.st.resilience, self.st.hotzone_bytes).next_multiple_of(SLOT_ALIGN)
    }

    /// Whether two journal slots fit in the journal area for this hotzone size.
    fn two_slots(&self) -> bool {
        self.journal_area.start + 2 * self.slot_len() <= self.journal_area.end
    }

    /// Whether checkpoints are merged (see [`Rekeyer::exclusive`]): only offline, and only
    /// when the next journal never overwrites the one the header names.
    fn merged(&self) -> bool {
        self.exclusive && self.two_slots()
    }

    /// Where the next journal copy goes: the slot the header does not name.
    fn next_slot(&self) -> u64 {
        let slot0 = self.journal_area.start;
        let slot1 = slot0 + self.slot_len();
        match &self.st.journal {
            Some(j) if j.offset == slot0 && self.two_slots() => slot1,
            _ => slot0,
        }
    }

    /// Progress so far.
    #[must_use]
    pub fn progress(&self) -> Progress {
        Progress {
            done: self.st.boundary,
            total: self.device.size(),
        }
    }

    /// The checkpoint as last written.
    #[must_use]
    pub fn checkpoint(&self) -> &RekeyState {
        &self.st
    }

    /// Re-encrypts the next hotzone, or finishes the rekey after the last; returns true
    /// once finished.
    ///
    /// # Errors
    /// I/O failure: the on-disk checkpoint stays consistent and the rekey can resume.
    pub fn step(&mut self) -> Result<bool, RekeyError> {
        self.step_with(&mut |_, _| {})
    }

    /// [`Rekeyer::step`], calling `observe(phase, zone)` after each durable phase while
    /// the zone's fence is raised (I/O outside the zone may run there).
    ///
    /// # Errors
    /// As [`Rekeyer::step`].
    pub fn step_with(
        &mut self,
        observe: &mut dyn FnMut(StepPhase, Range<u64>),
    ) -> Result<bool, RekeyError> {
        let size = self.device.size();
        let b = self.st.boundary;
        if b >= size {
            self.finish()?;
            return Ok(true);
        }
        let e = b.saturating_add(self.st.hotzone_bytes).min(size);
        let zone = b..e;
        let backing = self.device.backing().clone();
        let geo = self.device.geometry();
        let ss = geo.sector_size.bytes();
        let _fence = self.device.fence(&zone);
        let len = usize::try_from(e - b).expect("a hotzone fits in memory");
        let (mut old, mut new) = std::mem::take(&mut self.scratch);
        old.resize(len, 0);
        // Merged mode: the previous zone's rewrite runs beside this zone's read.
        let pending = self.pending.take();
        let (rewritten, read) = rayon::join(
            || {
                pending
                    .map(|p| p.write(&*backing, geo).map(|()| p))
                    .transpose()
            },
            || backing.read_at(&mut old, geo.data_offset + b),
        );
        if let Some(p) = rewritten? {
            observe(StepPhase::Rewritten, p.zone);
            new = p.buf;
        }
        read?;
        let all_holes = old.par_chunks(ss).all(is_zero);
        if !all_holes {
            // The journal write and its flush overlap with the checksum and the crypto,
            // which only read the old ciphertext.
            new.clear();
            new.extend_from_slice(&old);
            let device = &self.device;
            let journal_offset = self.next_slot();
            let resilience = self.st.resilience;
            let (journaled, (sum, crypted)) = rayon::join(
                || {
                    let fp;
                    let journal = match resilience {
                        Resilience::Journal => &old,
                        Resilience::Checksum => {
                            fp = fingerprints(&old);
                            &fp
                        }
                    };
                    backing.write_at(journal, journal_offset)?;
                    backing.start_writeback(journal_offset, journal.len() as u64);
                    // (Exclusive: this flush also makes the previous zone's new
                    // ciphertext durable, see below.)
                    backing.flush()
                },
                || (journal_checksum(&old), device.rekey_sectors(b, &mut new)),
            );
            journaled?;
            crypted?;
            observe(StepPhase::Journaled, zone.clone());
            self.st.journal = Some(JournalRecord {
                zone_start: b,
                len: e - b,
                offset: journal_offset,
                blake3: sum,
            });
            store_state(&mut self.header, &self.st, &*backing)?;
            observe(StepPhase::Checkpointed, zone.clone());
            let rewrite = Rewrite {
                zone: zone.clone(),
                buf: new,
            };
            if self.merged() {
                // Nothing reads this zone before the next checkpoint, and until then the
                // header names this zone's journal (in the slot the next journal does not
                // use), so a crash restores and redoes it: the next step writes the zone
                // while it reads its own, its journal's flush makes the zone durable in
                // the same fdatasync, and `settle` writes and flushes the last.
                self.pending = Some(rewrite);
                self.unflushed = true;
                new = Vec::new();
            } else {
                rewrite.write(&*backing, geo)?;
                backing.flush()?;
                observe(StepPhase::Rewritten, zone.clone());
                new = rewrite.buf;
            }
        }
        self.scratch = (old, new);
        self.st.boundary = e;
        if !self.merged() {
            self.st.journal = None;
            store_state(&mut self.header, &self.st, &*backing)?;
        }
        // (Exclusive: the next zone's checkpoint records this boundary; until then the
        // header still names this zone's journal, which stays intact in its slot.)
        self.device.set_rekey_boundary(e)?;
        observe(StepPhase::Advanced, zone);
        Ok(false)
    }

    /// Turns the header back into a plain one under the new key and the device to
    /// serve the new key only.
    fn finish(&mut self) -> Result<(), RekeyError> {
        let backing = self.device.backing().clone();
        // The last zone's new ciphertext, before the header stops naming its journal.
        self.settle()?;
        let digests = self.header.digests_mut();
        let segments = digests
            .get(&self.st.old_digest)
            .map(|d| d.segments.clone())
            .unwrap_or_default();
        let new = digests
            .get_mut(&self.st.new_digest)
            .ok_or(RekeyError::Header(Luks2Error::NoSuchDigest(
                self.st.new_digest,
            )))?;
        new.segments = segments;
        digests.remove(&self.st.old_digest);
        self.header.remove_token(TOKEN_TYPE);
        self.header
            .clear_mandatory_requirement(luks2::REKEY_REQUIREMENT);
        if let Some(t) = self.st.new_kms_token.clone() {
            self.header.set_kms_token(t);
        }
        self.header.write(&*backing)?;
        if self.device.rekey_boundary().is_some() {
            self.device.finish_rekey()?;
        }
        // The journal holds old-key ciphertext: wipe it.
        let area = &self.journal_area;
        let len = self.slot_len().saturating_mul(2).min(area.end - area.start);
        backing.punch_hole(area.start, len)?;
        backing.flush()?;
        self.st.boundary = self.device.size();
        Ok(())
    }

    /// Merged mode: writes the last zone's new ciphertext if the next step has not, and
    /// makes it durable. The device then holds on disk what it serves.
    fn settle(&mut self) -> Result<(), RekeyError> {
        let backing = self.device.backing().clone();
        if let Some(p) = self.pending.take() {
            p.write(&*backing, self.device.geometry())?;
        }
        if std::mem::take(&mut self.unflushed) {
            backing.flush()?;
        }
        Ok(())
    }

    /// Runs to the end, reporting progress after each hotzone; stops early (with
    /// [`RekeyError::Cancelled`], checkpoint consistent) when `cancel` is set.
    ///
    /// # Errors
    /// I/O failure or cancellation.
    pub fn run(
        &mut self,
        cancel: &AtomicBool,
        mut progress: impl FnMut(Progress),
    ) -> Result<(), RekeyError> {
        progress(self.progress());
        loop {
            if cancel.load(Ordering::Relaxed) {
                self.settle()?;
                return Err(RekeyError::Cancelled(self.st.boundary));
            }
            let done = self.step()?;
            progress(self.progress());
            if done {
                return Ok(());
            }
        }
    }
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

/// Opens a volume whose header has a rekey in progress, with both keys: checks them,
/// recovers the hotzone from the journal, and returns the volume with its device in rekey
/// mode at the checkpoint's boundary (ready for [`Rekeyer::resume`]).
///
/// # Errors
/// Wrong keys, no rekey in progress, corrupt journal, I/O failure.
pub fn open_resuming(
    path: &Path,
    old: &VolumeKey,
    new: &VolumeKey,
) -> Result<volume::OpenVolume, RekeyError> {
    let backing: Arc<dyn Backing> = Arc::new(crate::backing::FileBacking::open(path)?);
    open_resuming_backing(backing, path, old, new)
}

/// [`open_resuming`] over any backing (the crash tests use the simulator's images).
///
/// # Errors
/// As [`open_resuming`].
pub fn open_resuming_backing(
    backing: Arc<dyn Backing>,
    path: &Path,
    old: &VolumeKey,
    new: &VolumeKey,
) -> Result<volume::OpenVolume, RekeyError> {
    let header = Header::read(&*backing)?;
    let st = recover(&*backing, &header, old, new)?;
    let ss = SectorSize::try_from(header.sector_size())
        .map_err(|e| RekeyError::BadToken(e.to_string()))?;
    let crypt = crate::device::Crypt::Rekeying {
        old: SectorCipher::new(old, ss),
        new: SectorCipher::new(new, ss),
        boundary: st.boundary,
    };
    Ok(volume::device_for(backing, header, path, crypt)?)
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

/// Rekeys (or resumes the rekey of) a detached volume file.
///
/// # Errors
/// The volume is attached, wrong keys, I/O failure.
pub fn rekey_detached(
    path: &Path,
    old: &VolumeKey,
    new: &VolumeKey,
    opts: &RekeyOptions,
    progress: impl FnMut(Progress),
) -> Result<RekeyReport, RekeyError> {
    if let Some(mountpoint) = crate::attach::attached_at(path) {
        return Err(RekeyError::Attached(path.to_path_buf(), mountpoint));
    }
    let start = Instant::now();
    let header = volume::read_header(path)?;
    let (mut rekeyer, resumed) = if in_progress(&header) {
        let vol = open_resuming(path, old, new)?;
        (Rekeyer::resume(vol.device)?.exclusive(), true)
    } else {
        if header.verify_key(new).is_ok() {
            let total = header.data_size(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
            return Ok(RekeyReport {
                total_bytes: total,
                bytes_this_run: 0,
                resumed: false,
                already_done: true,
                seconds: 0.0,
                mb_per_s: 0.0,
            });
        }
        let vol = volume::open_encrypted(path, old).map_err(|e| match e {
            VolumeError::WrongKey { .. } => RekeyError::WrongOldKey,
            other => other.into(),
        })?;
        // Offline: two journal slots, so a hotzone is at most half the journal area.
        let mut opts = opts.clone();
        opts.hotzone_bytes = opts
            .hotzone_bytes
            .or(Some(default_offline_hotzone(&header, opts.resilience)));
        (Rekeyer::start(vol.device, new, &opts)?.exclusive(), false)
    };
    let from = rekeyer.progress().done;
    let total = rekeyer.progress().total;
    rekeyer.run(&AtomicBool::new(false), progress)?;
    Ok(report(start, from, total, resumed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::MemBacking;
    use crate::device::Crypt;
    use crate::luks2::FormatParams;
    use std::collections::HashMap;

    fn volume(size: u64, ss: u32, key: &VolumeKey) -> Arc<Device> {
        let backing: Arc<dyn Backing> = Arc::new(MemBacking::new(0));
        let params = FormatParams {
            data_size: size,
            sector_size: ss,
            label: String::new(),
            token: None,
        };
        let header = Header::format(&*backing, key, &params).expect("format");
        let sector = SectorSize::try_from(ss).expect("valid");
        volume::device_for(
            backing,
            header,
            Path::new("mem"),
            Crypt::Xts(SectorCipher::new(key, sector)),
        )
        .expect("device")
        .device
    }

    /// The checksum journal's repair: a zone torn 512-byte piece by piece between old and
    /// new ciphertext comes back as the old ciphertext; a tear inside a piece does not,
    /// and the zone's BLAKE3 (checked by `recover`) tells.
    #[test]
    fn checksum_journal_repairs_512_byte_tears_and_detects_finer_ones() {
        for ss in [SectorSize::S4096, SectorSize::S512] {
            let (k1, k2) = (VolumeKey::generate(), VolumeKey::generate());
            let ciphers = (SectorCipher::new(&k1, ss), SectorCipher::new(&k2, ss));
            let zone_start = 3 * 65536;
            let first = zone_start / ss.bytes_u64();
            let mut old = vec![0u8; 65536];
            rand::fill(&mut old[..]);
            old[4096..8192].fill(0); // a hole stays a hole
            let fp = fingerprints(&old);
            assert_eq!(fp.len() as u64, journal_len(Resilience::Checksum, 65536));
            let mut new = old.clone();
            for_each_nonzero_sector(&mut new, ss.bytes(), |i, s| {
                ciphers
                    .0
                    .par_recrypt_sectors(&ciphers.1, s, first + i as u64)
                    .expect("aligned");
            });
            let mut mixed = old.clone();
            for (p, piece) in mixed.chunks_exact_mut(PIECE).enumerate() {
                if p % 3 != 1 {
                    piece.copy_from_slice(&new[p * PIECE..][..PIECE]);
                }
            }
            assert_ne!(mixed, old);
            reassemble_old(&mut mixed, &fp, zone_start, &ciphers).expect("aligned");
            assert!(mixed == old, "{ss:?}: pieces reassembled");
            let mut torn = old.clone();
            torn[5 * PIECE + 100..6 * PIECE].copy_from_slice(&new[5 * PIECE + 100..6 * PIECE]);
            reassemble_old(&mut torn, &fp, zone_start, &ciphers).expect("aligned");
            assert_ne!(journal_checksum(&torn), journal_checksum(&old), "{ss:?}");
        }
    }

    fn for_each_nonzero_sector(buf: &mut [u8], ss: usize, mut f: impl FnMut(usize, &mut [u8])) {
        for (i, s) in buf.chunks_exact_mut(ss).enumerate() {
            if !is_zero(s) {
                f(i, s);
            }
        }
    }

    /// Writers and readers hammer the device from several threads while the rekey moves
    /// the boundary through it; every thread owns every 4th 4 KiB block and checks what
    /// it reads against what it wrote last.
    #[test]
    fn concurrent_io_stays_correct_while_the_boundary_moves() {
        let old = VolumeKey::generate();
        let new = VolumeKey::generate();
        let size = 4 << 20;
        let dev = volume(size, 4096, &old);
        let mut r = Rekeyer::start(
            dev.clone(),
            &new,
            &RekeyOptions {
                hotzone_bytes: Some(128 * 1024),
                new_kms_token: None,
                resilience: Resilience::Journal,
            },
        )
        .expect("start");
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let dev = dev.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let blocks = size / 4096;
                    let mut mine: HashMap<u64, u8> = HashMap::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let b = (i.wrapping_mul(2_654_435_761) % (blocks / 4)) * 4 + t;
                        let v = u8::try_from(i % 250).expect("small") + 1;
                        // Unaligned, straddling writes: read-modify-write of two sectors.
                        dev.write(b * 4096 + 1000, &[v; 2000]).expect("write");
                        mine.insert(b, v);
                        let probe = (i.wrapping_mul(40_503) % (blocks / 4)) * 4 + t;
                        let mut buf = [0u8; 2000];
                        dev.read(probe * 4096 + 1000, &mut buf).expect("read");
                        let want = mine.get(&probe).copied().unwrap_or(0);
                        assert!(
                            buf.iter().all(|&x| x == want),
                            "block {probe}: read back wrong data mid-rekey"
                        );
                        i += 1;
                    }
                    mine
                })
            })
            .collect();
        while !r.step().expect("step") {}
        stop.store(true, Ordering::Relaxed);
        let owned: Vec<HashMap<u64, u8>> = threads
            .into_iter()
            .map(|t| t.join().expect("io thread"))
            .collect();
        assert_eq!(dev.rekey_boundary(), None, "finished");
        // Reopen from the backing with the new key only.
        let header = Header::read(&**dev.backing()).expect("header");
        header.verify_key(&new).expect("new key");
        assert!(header.verify_key(&old).is_err());
        let fresh = volume::device_for(
            dev.backing().clone(),
            header,
            Path::new("mem"),
            Crypt::Xts(SectorCipher::new(&new, SectorSize::S4096)),
        )
        .expect("device")
        .device;
        for mine in owned {
            for (b, v) in mine {
                let mut buf = [0u8; 2000];
                fresh.read(b * 4096 + 1000, &mut buf).expect("read");
                assert!(buf.iter().all(|&x| x == v), "block {b} after the rekey");
            }
        }
    }

    #[test]
    fn refuses_bad_hotzones_same_key_and_kms_volumes_without_a_new_token() {
        let old = VolumeKey::generate();
        let dev = volume(1 << 20, 4096, &old);
        let bad = RekeyOptions {
            hotzone_bytes: Some(1000),
            new_kms_token: None,
            resilience: Resilience::Journal,
        };
        assert!(matches!(
            Rekeyer::start(dev.clone(), &VolumeKey::generate(), &bad),
            Err(RekeyError::BadHotzone { .. })
        ));
        let huge = RekeyOptions {
            hotzone_bytes: Some(64 << 20),
            new_kms_token: None,
            resilience: Resilience::Journal,
        };
        assert!(matches!(
            Rekeyer::start(dev.clone(), &VolumeKey::generate(), &huge),
            Err(RekeyError::BadHotzone { .. })
        ));
        assert!(matches!(
            Rekeyer::start(dev.clone(), &old, &RekeyOptions::default()),
            Err(RekeyError::SameKey)
        ));
        assert_eq!(dev.rekey_boundary(), None, "nothing changed");
        // The checksum journal is 1/32 of its zone: a zone the journal area could not
        // copy fits, two slots and all; one past 32 areas does not.
        let h = Header::read(&**dev.backing()).expect("header");
        let (area, fits) = (
            max_hotzone(&h, Resilience::Journal),
            max_hotzone(&h, Resilience::Checksum),
        );
        assert!(fits >= 16 * area, "{fits} vs {area}");
        assert!(default_offline_hotzone(&h, Resilience::Checksum) <= fits / 2);
        let too_big = RekeyOptions {
            hotzone_bytes: Some(fits + HOTZONE_ALIGN),
            resilience: Resilience::Checksum,
            ..RekeyOptions::default()
        };
        assert!(matches!(
            Rekeyer::start(dev.clone(), &VolumeKey::generate(), &too_big),
            Err(RekeyError::BadHotzone { .. })
        ));
        let bigger_than_area = RekeyOptions {
            hotzone_bytes: Some(area * 2),
            resilience: Resilience::Checksum,
            ..RekeyOptions::default()
        };
        let r = Rekeyer::start(dev.clone(), &VolumeKey::generate(), &bigger_than_area)
            .expect("checksum zone larger than the journal area");
        assert!(r.two_slots(), "slots of 1/32 the zone");
        drop(r);
        let dev = volume(1 << 20, 4096, &old);
        // The checkpoint token round-trips and names both digests.
        let new = VolumeKey::generate();
        let r = Rekeyer::start(dev.clone(), &new, &RekeyOptions::default()).expect("start");
        let h = Header::read(&**dev.backing()).expect("header");
        let st = state(&h).expect("parses").expect("present");
        assert_eq!(&st, r.checkpoint());
        assert_eq!(
            h.mandatory_requirements(),
            [luks2::REKEY_REQUIREMENT.to_string()]
        );
        assert!(matches!(
            Rekeyer::start(dev, &VolumeKey::generate(), &RekeyOptions::default()),
            Err(RekeyError::AlreadyInProgress)
        ));
    }
}
