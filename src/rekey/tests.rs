//! Unit tests of the rekey engine and the checksum journal.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::journal::{
    PIECE, default_offline_hotzone, fingerprints, journal_checksum, journal_len, reassemble_old,
};
use super::*;
use crate::backing::{Backing, MemBacking};
use crate::device::{Crypt, Device, is_zero};
use crate::luks2::{self, FormatParams};
use crate::secret::VolumeKey;
use crate::volume;
use crate::xts::{SectorCipher, SectorSize};

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
