//! Device byte-range arithmetic against a model: a sequence of writes, reads and
//! discards at arbitrary u64 offsets and lengths (overflowing ones included) on a small
//! encrypted or plain volume with 512- or 4096-byte sectors. Oracle: the device's answers
//! (bytes, short reads at the end, OutOfRange refusals) equal a plain byte-array model.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use sealvol::backing::MemBacking;
use sealvol::device::{Crypt, Device, DeviceError, Geometry};
use sealvol::secret::VolumeKey;
use sealvol::xts::{SectorCipher, SectorSize};

const SIZE: u64 = 64 * 1024;
const DATA_OFFSET: u64 = 4096;

fn key() -> &'static VolumeKey {
    static K: OnceLock<VolumeKey> = OnceLock::new();
    K.get_or_init(VolumeKey::generate)
}

fn u64_at(d: &[u8], i: usize) -> u64 {
    let mut b = [0u8; 8];
    for (j, x) in b.iter_mut().enumerate() {
        *x = d.get(i + j).copied().unwrap_or(0);
    }
    u64::from_le_bytes(b)
}

/// Offsets mostly inside the volume, sometimes anywhere in u64.
fn offset(raw: u64) -> u64 {
    if raw >> 63 == 1 { raw } else { raw % (SIZE + 8192) }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, ops)) = data.split_first() else { return };
    let ss = if mode & 1 == 0 { SectorSize::S512 } else { SectorSize::S4096 };
    let crypt = if mode & 2 == 0 { Crypt::Plain } else { Crypt::Xts(SectorCipher::new(key(), ss)) };
    let backing = Arc::new(MemBacking::new((DATA_OFFSET + SIZE) as usize));
    let d = Device::new(backing, Geometry { data_offset: DATA_OFFSET, size: SIZE, sector_size: ss }, crypt);
    let mut model = vec![0u8; SIZE as usize];
    for op in ops.chunks(12).take(64) {
        let kind = op[0] % 3;
        let off = offset(u64_at(op, 1) & !(0xff << 56) | (u64::from(op[0] & 0x80) << 56));
        let len_raw = u64_at(op, 8) & 0xff_ffff;
        let len = if op[0] & 0x40 != 0 { u64::MAX - (len_raw & 0xff) } else { len_raw % (SIZE + 1) };
        let fill = op.get(11).copied().unwrap_or(1);
        let in_range = off.checked_add(len).is_some_and(|e| e <= SIZE);
        match kind {
            0 => {
                if len > SIZE + 1 {
                    continue; // cannot allocate such a buffer; the range check is exercised by discard
                }
                let buf: Vec<u8> = (0..len).map(|i| fill.wrapping_add(i as u8)).collect();
                match d.write(off, &buf) {
                    Ok(()) => {
                        assert!(in_range, "write accepted out of range: {off}+{len}");
                        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                    }
                    Err(DeviceError::OutOfRange { .. }) => assert!(!in_range, "write refused in range: {off}+{len}"),
                    Err(e) => panic!("write {off}+{len}: {e}"),
                }
            }
            1 => {
                let n = len.min(SIZE + 1) as usize;
                let mut buf = vec![0xa5u8; n];
                let got = d.read(off, &mut buf).expect("reads never fail on memory");
                let want = if off >= SIZE { 0 } else { (n as u64).min(SIZE - off) as usize };
                assert_eq!(got, want, "read {off}+{n}");
                if want > 0 {
                    assert_eq!(&buf[..got], &model[off as usize..off as usize + got], "read {off}+{n}");
                }
            }
            _ => match d.discard(off, len) {
                Ok(()) => {
                    assert!(in_range, "discard accepted out of range: {off}+{len}");
                    model[off as usize..(off + len) as usize].fill(0);
                }
                Err(DeviceError::OutOfRange { .. }) => assert!(!in_range, "discard refused in range: {off}+{len}"),
                Err(e) => panic!("discard {off}+{len}: {e}"),
            },
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    assert_eq!(d.read(0, &mut all).expect("read all"), SIZE as usize);
    assert!(all == model, "final contents differ from the model");
});
