//! [`Rekeyer`]: the hotzone loop of a rekey on an open device (DESIGN §7, steps 1-5),
//! online behind the device's fence or offline with merged checkpoints.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;

use super::journal::{
    SLOT_ALIGN, fingerprints, journal_checksum, journal_len, max_hotzone, write_runs,
};
use super::{
    DEFAULT_HOTZONE, HOTZONE_ALIGN, JournalRecord, Progress, RekeyError, RekeyOptions, RekeyState,
    Resilience, StepPhase, in_progress, state,
};
use crate::backing::{Backing, BackingError};
use crate::device::{Device, Geometry, is_zero};
use crate::luks2::{self, Header, Luks2Error, RekeyPlan};
use crate::secret::VolumeKey;
use crate::xts::{SectorCipher, SectorSize};

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
        let st = header.begin_rekey(
            &*backing,
            new,
            RekeyPlan {
                hotzone_bytes: hotzone,
                new_kms_token: opts.new_kms_token.clone(),
                resilience: opts.resilience,
            },
        )?;
        let sector_size = SectorSize::try_from(header.sector_size())
            .map_err(|e| RekeyError::BadToken(e.to_string()))?;
        device.begin_rekey(SectorCipher::new(new, sector_size))?;
        Ok(Self::at_checkpoint(device, header, st))
    }

    /// Resumes the rekey of a device opened in rekey mode (after [`recover`], e.g. by
    /// [`open_resuming`]).
    ///
    /// [`recover`]: super::recover
    /// [`open_resuming`]: super::open_resuming
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
    pub(super) fn two_slots(&self) -> bool {
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
            self.header.checkpoint_rekey(&*backing, &self.st)?;
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
            self.header.checkpoint_rekey(&*backing, &self.st)?;
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
        self.header.finish_rekey(&*backing, &self.st)?;
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
