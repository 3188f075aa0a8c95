//! Unit tests of `xts`.

use super::*;
use proptest::prelude::*;
use xts_mode::Xts128;

fn key_from_hex(h: &str) -> VolumeKey {
    let mut raw = hex::decode(h).expect("hex key");
    VolumeKey::from_slice(&mut raw).expect("valid key")
}

fn reference(key: &VolumeKey, ss: SectorSize, buf: &mut [u8], first: u64, enc: bool) {
    let k = key.expose();
    let c1 = Aes256::new_from_slice(&k[..32]).expect("32 bytes");
    let c2 = Aes256::new_from_slice(&k[32..]).expect("32 bytes");
    let xts = Xts128::<Aes256>::new(c1, c2);
    let units = ss.units_512();
    let tweak = |i: u128| Array::from((i * u128::from(units)).to_le_bytes());
    if enc {
        xts.encrypt_area(buf, ss.bytes(), u128::from(first), tweak);
    } else {
        xts.decrypt_area(buf, ss.bytes(), u128::from(first), tweak);
    }
}

/// IEEE 1619 Annex B vector 10, from the shared known-answer file.
#[test]
fn ieee1619_vector10() {
    let text = include_str!("../../tests/vectors/xts-aes-256-ieee1619-vector10.txt");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("vector file lacks {name}"))
            .to_string()
    };
    let key = key_from_hex(&field("key"));
    let sector = u64::from_str_radix(&field("sector"), 16).expect("hex sector");
    let pt = hex::decode(field("pt")).expect("hex pt");
    let ct = hex::decode(field("ct")).expect("hex ct");
    for cipher in [
        SectorCipher::new(&key, SectorSize::S512),
        SectorCipher::portable(&key, SectorSize::S512),
    ] {
        let mut buf = pt.clone();
        cipher.encrypt_sectors(&mut buf, sector).expect("aligned");
        assert_eq!(hex::encode(&buf), hex::encode(&ct), "{}", cipher.backend());
        cipher.decrypt_sectors(&mut buf, sector).expect("aligned");
        assert_eq!(buf, pt, "{}", cipher.backend());
    }
}

#[test]
fn plain64_tweak_counts_512_byte_units() {
    // 4096-byte sector n is one XTS data unit with tweak 8n (dm-crypt plain64 with
    // sector_size 4096), not n.
    let key = VolumeKey::generate();
    let c = SectorCipher::new(&key, SectorSize::S4096);
    let mut ours = vec![0x5Au8; 4096];
    c.encrypt_sectors(&mut ours, 3).expect("aligned");
    let mut refd = vec![0x5Au8; 4096];
    reference(&key, SectorSize::S4096, &mut refd, 3, true);
    assert_eq!(ours, refd);
    let k = key.expose();
    let xts = Xts128::<Aes256>::new(
        Aes256::new_from_slice(&k[..32]).expect("32"),
        Aes256::new_from_slice(&k[32..]).expect("32"),
    );
    let mut naive = vec![0x5Au8; 4096];
    xts.encrypt_sector(&mut naive, Array::from(3u128.to_le_bytes()));
    assert_ne!(ours, naive, "tweak must be 8n, not n");
}

/// Buffers past `PARALLEL_MIN` (with a ragged last chunk) go across the rayon pool and
/// must match the serial path and the reference.
#[test]
fn parallel_split_matches_serial_and_reference() {
    let key = VolumeKey::generate();
    for ss in [SectorSize::S4096, SectorSize::S512] {
        let c = SectorCipher::new(&key, ss);
        let len = PARALLEL_MIN + PARALLEL_CHUNK + 3 * ss.bytes();
        let pt: Vec<u8> = (0..len).map(|i| i.to_le_bytes()[0] ^ 0xA5).collect();
        let (mut par, mut serial, mut refd) = (pt.clone(), pt.clone(), pt.clone());
        c.par_encrypt_sectors(&mut par, 77).expect("aligned");
        c.encrypt_sectors(&mut serial, 77).expect("aligned");
        reference(&key, ss, &mut refd, 77, true);
        assert_eq!(par, refd);
        assert_eq!(serial, refd);
        c.par_decrypt_sectors(&mut par, 77).expect("aligned");
        assert_eq!(par, pt);
    }
}

#[test]
fn recrypt_equals_decrypt_then_encrypt() {
    let (k1, k2) = (VolumeKey::generate(), VolumeKey::generate());
    for ss in [SectorSize::S4096, SectorSize::S512] {
        let (from, to) = (SectorCipher::new(&k1, ss), SectorCipher::new(&k2, ss));
        for len in [
            3 * ss.bytes(),
            PARALLEL_MIN + PARALLEL_CHUNK + 5 * ss.bytes(),
        ] {
            let pt: Vec<u8> = (0..len).map(|i| i.to_le_bytes()[0] ^ 0x3C).collect();
            let (mut under_old, mut want) = (pt.clone(), pt.clone());
            reference(&k1, ss, &mut under_old, 9, true);
            reference(&k2, ss, &mut want, 9, true);
            from.par_recrypt_sectors(&to, &mut under_old, 9)
                .expect("aligned");
            assert_eq!(under_old, want, "sector size {ss:?}, {len} bytes");
        }
        let other = SectorCipher::new(&k2, SectorSize::S512);
        if ss == SectorSize::S4096 {
            assert!(matches!(
                from.par_recrypt_sectors(&other, &mut vec![0; 4096], 0),
                Err(XtsError::SectorSizeMismatch {
                    from: 4096,
                    to: 512
                })
            ));
        }
    }
}

#[test]
fn misaligned_buffers_are_errors() {
    let c = SectorCipher::new(&VolumeKey::generate(), SectorSize::S4096);
    assert_eq!(
        c.encrypt_sectors(&mut [0u8; 1000], 0),
        Err(XtsError::Misaligned {
            len: 1000,
            sector_size: 4096
        })
    );
    assert_eq!(SectorSize::try_from(1024), Err(XtsError::SectorSize(1024)));
}

#[test]
fn debug_prints_no_key() {
    let c = SectorCipher::new(&VolumeKey::generate(), SectorSize::S512);
    let s = format!("{c:?}");
    assert!(s.starts_with("SectorCipher { sector_size: S512"), "{s}");
}

#[test]
fn fold8_matches_table() {
    for b in 0..256u64 {
        assert_eq!(
            fold8(b),
            u64::from(REDUCE8[usize::try_from(b).expect("byte")])
        );
    }
}

#[test]
fn x8_step_equals_eight_x_steps() {
    let mut t = 0x8000_0000_0000_0000_0000_0000_0000_00F1u128;
    for _ in 0..100 {
        let mut slow = t;
        for _ in 0..8 {
            slow = mul_x(slow);
        }
        assert_eq!(mul_x8(t), slow);
        t = slow ^ (t >> 3);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// The fast path matches the reference byte for byte, both sector sizes, both
    /// directions, serial and parallel.
    #[test]
    fn matches_reference(
        seed in any::<[u8; 64]>(),
        s4096 in any::<bool>(),
        sectors in 1usize..80,
        first in 0u64..(1 << 40),
        fill in any::<u8>(),
    ) {
        let mut raw = seed.to_vec();
        prop_assume!(raw[..32] != raw[32..]);
        let key = VolumeKey::from_slice(&mut raw).expect("valid");
        let ss = if s4096 { SectorSize::S4096 } else { SectorSize::S512 };
        let c = SectorCipher::new(&key, ss);
        let pt: Vec<u8> = (0..sectors * ss.bytes()).map(|i| i.to_le_bytes()[0].wrapping_mul(31) ^ fill).collect();
        let mut ours = pt.clone();
        c.par_encrypt_sectors(&mut ours, first).expect("aligned");
        let mut refd = pt.clone();
        reference(&key, ss, &mut refd, first, true);
        prop_assert_eq!(&ours, &refd);
        let mut serial = pt.clone();
        c.encrypt_sectors(&mut serial, first).expect("aligned");
        prop_assert_eq!(&serial, &refd);
        // The portable path (what CPUs without VAES run) agrees too, both ways.
        let portable = SectorCipher::portable(&key, ss);
        let mut p = pt.clone();
        portable.par_encrypt_sectors(&mut p, first).expect("aligned");
        prop_assert_eq!(&p, &refd);
        portable.decrypt_sectors(&mut p, first).expect("aligned");
        prop_assert_eq!(&p, &pt);
        c.par_decrypt_sectors(&mut ours, first).expect("aligned");
        prop_assert_eq!(&ours, &pt);
        reference(&key, ss, &mut refd, first, false);
        prop_assert_eq!(&refd, &pt);
    }
}
