//! The journal area (DESIGN §7): two slots at the start of [`luks2::journal_area`], what
//! a slot holds for each [`Resilience`] (the zone's old ciphertext, or the fingerprint of
//! each 512-byte piece), the zone checksum, hotzone sizing, and the checksum journal's
//! repair of a zone torn between old and new ciphertext.

use super::{DEFAULT_OFFLINE_HOTZONE, HOTZONE_ALIGN, MAX_CHECKSUM_HOTZONE, Resilience};
use crate::backing::{Backing, BackingError};
use crate::device::is_zero;
use crate::luks2::{self, Header};
use crate::xts::{SectorCipher, XtsError};

/// Journal slots start on this alignment.
pub(super) const SLOT_ALIGN: u64 = 4096;
/// The unit a disk writes atomically, and so the unit a crash can tear a sector into.
pub(super) const PIECE: usize = 512;
/// Bytes of a piece's old ciphertext kept as its fingerprint (one AES block).
pub(super) const FINGERPRINT: usize = 16;

/// The journal checksum: BLAKE3 of the copy (hex), hashed across the rayon pool. It
/// detects a journal copy that is not what the checkpoint recorded; BLAKE3 rather than
/// SHA-256 because SHA-256 was a third of the rekey's CPU time (bench/notes.md).
pub(super) fn journal_checksum(buf: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update_rayon(buf);
    h.finalize().to_hex().to_string()
}

/// Writes the non-hole sector runs of `buf` at absolute offset `at` (holes are never
/// written, so sparse files stay sparse); with `punch`, hole runs are punched.
pub(super) fn write_runs(
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
pub(super) fn default_offline_hotzone(header: &Header, resilience: Resilience) -> u64 {
    (max_hotzone(header, resilience) / 2 / HOTZONE_ALIGN * HOTZONE_ALIGN)
        .min(DEFAULT_OFFLINE_HOTZONE)
}

/// Bytes the journal of a `len`-byte zone takes.
pub(super) fn journal_len(resilience: Resilience, len: u64) -> u64 {
    match resilience {
        Resilience::Journal => len,
        Resilience::Checksum => len / PIECE as u64 * FINGERPRINT as u64,
    }
}

/// The checksum journal of a zone: each 512-byte piece's first 16 bytes.
pub(super) fn fingerprints(zone: &[u8]) -> Vec<u8> {
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
pub(super) fn reassemble_old(
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
