//! Unit tests of `device`.

use super::*;
use crate::backing::MemBacking;
use crate::secret::VolumeKey;
use proptest::prelude::*;

const SIZE: u64 = 256 * 1024;

fn device(encrypted: bool, ss: SectorSize) -> (Device, Arc<MemBacking>) {
    let backing = Arc::new(MemBacking::new(
        usize::try_from(SIZE + 8192).expect("small"),
    ));
    let crypt = if encrypted {
        Crypt::Xts(SectorCipher::new(&VolumeKey::generate(), ss))
    } else {
        Crypt::Plain
    };
    let geo = Geometry {
        data_offset: 8192,
        size: SIZE,
        sector_size: ss,
    };
    (Device::new(backing.clone(), geo, crypt), backing)
}

#[test]
fn unwritten_reads_zero_and_zero_writes_are_holes() {
    let (d, b) = device(true, SectorSize::S4096);
    let mut buf = vec![1u8; 10_000];
    assert_eq!(d.read(100, &mut buf).expect("read"), 10_000);
    assert!(buf.iter().all(|&x| x == 0));
    d.write(4096, &[7u8; 4096]).expect("write");
    let raw = b.snapshot();
    assert!(
        raw[8192 + 4096..8192 + 8192].iter().any(|&x| x != 7),
        "stored encrypted"
    );
    d.write(4096, &[0u8; 4096]).expect("write zeros");
    assert!(
        b.snapshot()[8192 + 4096..8192 + 8192]
            .iter()
            .all(|&x| x == 0),
        "hole"
    );
}

#[test]
fn discard_zeroes_range_including_partial_edges() {
    let (d, _) = device(true, SectorSize::S512);
    d.write(0, &[9u8; 8192]).expect("write");
    d.discard(100, 5000).expect("discard");
    let mut buf = vec![0u8; 8192];
    d.read(0, &mut buf).expect("read");
    assert!(buf[..100].iter().all(|&x| x == 9));
    assert!(buf[100..5100].iter().all(|&x| x == 0));
    assert!(buf[5100..].iter().all(|&x| x == 9));
}

#[test]
fn out_of_range_and_eof() {
    let (d, _) = device(false, SectorSize::S4096);
    assert!(matches!(
        d.write(SIZE - 10, &[1u8; 11]),
        Err(DeviceError::OutOfRange { .. })
    ));
    let mut buf = [0u8; 100];
    assert_eq!(d.read(SIZE - 10, &mut buf).expect("read"), 10);
    assert_eq!(d.read(SIZE, &mut buf).expect("read"), 0);
}

#[test]
fn concurrent_writers_to_shared_sectors_lose_nothing() {
    let (d, _) = device(true, SectorSize::S4096);
    let d = Arc::new(d);
    // 8 threads each own every 8th byte-run of 100 bytes; runs share sectors, so every
    // write is a read-modify-write racing its neighbours.
    let threads: Vec<_> = (0..8u8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let slot = i * 8 + u64::from(t);
                    d.write(slot * 100, &[t + 1; 100]).expect("write");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let mut buf = vec![0u8; 1600 * 100];
    d.read(0, &mut buf).expect("read");
    for (slot, chunk) in buf.chunks(100).enumerate() {
        let want = u8::try_from(slot % 8).expect("small") + 1;
        assert!(chunk.iter().all(|&x| x == want), "slot {slot}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// Random writes and reads at any offset/length match a plain in-memory model.
    #[test]
    fn matches_model(
        encrypted in any::<bool>(),
        s4096 in any::<bool>(),
        ops in proptest::collection::vec((0u64..SIZE, 1usize..70_000, any::<u8>(), 0u8..4), 1..40),
    ) {
        let ss = if s4096 { SectorSize::S4096 } else { SectorSize::S512 };
        let (d, _) = device(encrypted, ss);
        let mut model = vec![0u8; usize::try_from(SIZE).expect("small")];
        for (off, len, val, kind) in ops {
            let len = len.min(usize::try_from(SIZE - off).expect("small"));
            let o = usize::try_from(off).expect("small");
            match kind {
                0 | 1 => {
                    let data: Vec<u8> = (0..len).map(|i| val.wrapping_add(i.to_le_bytes()[0])).collect();
                    d.write(off, &data).expect("write");
                    model[o..o + len].copy_from_slice(&data);
                }
                2 => {
                    d.discard(off, len as u64).expect("discard");
                    model[o..o + len].fill(0);
                }
                _ => {
                    let mut buf = vec![0xEEu8; len];
                    let n = d.read(off, &mut buf).expect("read");
                    prop_assert_eq!(n, len);
                    prop_assert_eq!(&buf[..], &model[o..o + len]);
                }
            }
        }
        let mut all = vec![0u8; model.len()];
        d.read(0, &mut all).expect("read all");
        prop_assert_eq!(all, model);
    }
}
