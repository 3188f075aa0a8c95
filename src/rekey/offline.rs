//! Rekeying with nothing else serving the volume: crash recovery from the journal
//! ([`recover`]), opening a volume mid-rekey with both keys ([`open_resuming`]), and the
//! offline rekey of a detached file ([`rekey_detached`]).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use super::journal::{
    FINGERPRINT, PIECE, default_offline_hotzone, journal_checksum, journal_len, reassemble_old,
    write_runs,
};
use super::{
    Progress, RekeyError, RekeyOptions, RekeyReport, RekeyState, Rekeyer, Resilience, in_progress,
    report, state,
};
use crate::backing::Backing;
use crate::device::CryptStateError;
use crate::luks2::{self, Header, Luks2Error};
use crate::secret::VolumeKey;
use crate::volume::{self, VolumeError};
use crate::xts::{SectorCipher, SectorSize};

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

/// Rekeys (or resumes the rekey of) a detached volume file.
///
/// The rekey is exclusive (merged checkpoints, see [`Rekeyer::exclusive`]): the caller
/// must make sure that no agent serves the file (e.g. refuse with
/// [`RekeyError::Attached`] when an agent serves it; `crate::agent::rekey_offline` does), since a
/// concurrent writer's data could be read with the wrong key after a crash.
///
/// # Errors
/// Wrong keys, I/O failure.
pub fn rekey_detached(
    path: &Path,
    old: &VolumeKey,
    new: &VolumeKey,
    opts: &RekeyOptions,
    progress: impl FnMut(Progress),
) -> Result<RekeyReport, RekeyError> {
    let start = Instant::now();
    let header = volume::read_header(path)?;
    let (mut rekeyer, resumed) = if in_progress(&header) {
        let vol = open_resuming(path, old, new)?;
        (Rekeyer::resume(vol.device)?.exclusive(), true)
    } else {
        if header.verify_key(new).is_ok() {
            let total = header.data_size(std::fs::metadata(path).map(|m| m.len()).unwrap_or(0));
            return Ok(RekeyReport::already_done(total));
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
