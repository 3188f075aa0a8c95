//! Fused XTS-AES-256 on VAES-512: the tweak whitening, the 14 AES rounds and the second
//! whitening happen on the same registers, eight 512-bit registers (32 blocks, 512 bytes)
//! in flight at a time, with no tweak buffer and no second pass over memory.
//!
//! Used when the CPU has AES-NI, VAES and AVX-512F/BW (runtime detection; the portable
//! path in the parent module stays for everything else and cross-checks this one in the
//! tests). The round keys are expanded here with AES-NI (`aeskeygenassist`, `aesimc`);
//! they live in an mlock'ed, zeroize-on-drop buffer like the volume key itself.

use std::arch::x86_64::{
    __m128i, __m512i, _mm_aesenc_si128, _mm_aesenclast_si128, _mm_aesimc_si128,
    _mm_aeskeygenassist_si128, _mm_loadu_si128, _mm_shuffle_epi32, _mm_slli_si128,
    _mm_storeu_si128, _mm_xor_si128, _mm512_aesdec_epi128, _mm512_aesdeclast_epi128,
    _mm512_aesenc_epi128, _mm512_aesenclast_epi128, _mm512_broadcast_i32x4, _mm512_bslli_epi128,
    _mm512_bsrli_epi128, _mm512_loadu_si512, _mm512_setzero_si512, _mm512_slli_epi64,
    _mm512_srli_epi64, _mm512_storeu_si512, _mm512_ternarylogic_epi64, _mm512_xor_si512,
};

use zeroize::{Zeroize, ZeroizeOnDrop};

use super::{Direction, mul_x};
use crate::secret::Locked;

/// AES-256 has 14 rounds, so 15 round keys.
const ROUND_KEYS: usize = 15;
/// 512-bit registers in flight per step: 8 × 64 bytes = 512 bytes = 32 AES blocks.
const LANES: usize = 8;
/// Bytes per step.
const STEP: usize = LANES * 64;

/// Expanded key schedules: data-key encryption and decryption (the equivalent inverse
/// cipher's keys), and the tweak key's encryption schedule.
#[derive(Default, Zeroize, ZeroizeOnDrop)]
pub(super) struct RoundKeys {
    enc: [[u8; 16]; ROUND_KEYS],
    dec: [[u8; 16]; ROUND_KEYS],
    tweak: [[u8; 16]; ROUND_KEYS],
}

/// Whether this CPU runs the fused path (and `SEALVOL_NO_VAES` is not set).
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("SEALVOL_NO_VAES").is_none()
            && std::env::var_os("SEALVOL_NO_AVX512").is_none()
            && std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// Expands Key1 (data) and Key2 (tweak) of a 64-byte XTS key.
///
/// # Panics
/// If the CPU lacks AES-NI; callers check [`available`] first.
pub(super) fn expand(key: &[u8; 64]) -> Locked<RoundKeys> {
    assert!(available(), "VAES path used on a CPU without VAES/AVX-512");
    let mut keys = Locked::new(RoundKeys::default());
    let (k1, k2) = key.split_at(32);
    // SAFETY: AES-NI was detected at run time (`available`).
    unsafe {
        let mut enc = expand256(k1);
        store(&enc, &mut keys.enc);
        let mut dec = [enc[ROUND_KEYS - 1]; ROUND_KEYS];
        for i in 1..ROUND_KEYS - 1 {
            dec[i] = _mm_aesimc_si128(enc[ROUND_KEYS - 1 - i]);
        }
        dec[ROUND_KEYS - 1] = enc[0];
        store(&dec, &mut keys.dec);
        let mut tweak = expand256(k2);
        store(&tweak, &mut keys.tweak);
        // The register copies on the stack are wiped too.
        for r in enc.iter_mut().chain(dec.iter_mut()).chain(tweak.iter_mut()) {
            // SAFETY: a valid, aligned, exclusive reference.
            std::ptr::write_volatile(r, std::mem::zeroed());
        }
    }
    keys
}

/// Stores a schedule held in registers into byte arrays.
#[target_feature(enable = "sse2")]
fn store(from: &[__m128i; ROUND_KEYS], to: &mut [[u8; 16]; ROUND_KEYS]) {
    for (f, t) in from.iter().zip(to.iter_mut()) {
        // SAFETY: `t` is 16 writable bytes; unaligned stores are allowed.
        unsafe { _mm_storeu_si128(t.as_mut_ptr().cast::<__m128i>(), *f) };
    }
}

/// One half-step of the AES-256 key schedule: the prefix XOR of the four words of
/// `prev`, XORed with the broadcast word `t` from `aeskeygenassist`.
#[target_feature(enable = "sse2")]
fn mix(prev: __m128i, t: __m128i) -> __m128i {
    let mut a = prev;
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    a = _mm_xor_si128(a, _mm_slli_si128::<4>(a));
    _mm_xor_si128(a, t)
}

/// The AES-256 encryption key schedule of a 32-byte key.
#[target_feature(enable = "aes,sse2")]
fn expand256(key: &[u8]) -> [__m128i; ROUND_KEYS] {
    assert_eq!(key.len(), 32);
    // SAFETY: `key` is 32 readable bytes; unaligned loads are allowed.
    let (k0, k1) = unsafe {
        (
            _mm_loadu_si128(key.as_ptr().cast::<__m128i>()),
            _mm_loadu_si128(key.as_ptr().add(16).cast::<__m128i>()),
        )
    };
    let mut k = [k0; ROUND_KEYS];
    k[1] = k1;
    // Round key 2i from 2i-2 and 2i-1 (with the round constant), and 2i+1 from 2i-1
    // and 2i; `aeskeygenassist` takes the constant as an immediate, hence the macros.
    macro_rules! even {
        ($i:literal, $rcon:literal) => {
            let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(k[$i - 1]));
            k[$i] = mix(k[$i - 2], t);
        };
    }
    macro_rules! odd {
        ($i:literal) => {
            let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(k[$i - 1]));
            k[$i] = mix(k[$i - 2], t);
        };
    }
    even!(2, 0x01);
    odd!(3);
    even!(4, 0x02);
    odd!(5);
    even!(6, 0x04);
    odd!(7);
    even!(8, 0x08);
    odd!(9);
    even!(10, 0x10);
    odd!(11);
    even!(12, 0x20);
    odd!(13);
    even!(14, 0x40);
    k
}

/// Encrypts one 16-byte tweak block with the tweak key (AES-NI, one block).
#[target_feature(enable = "aes,sse2")]
fn encrypt_tweak(keys: &RoundKeys, unit: u128) -> u128 {
    let bytes = unit.to_le_bytes();
    // SAFETY: 16 readable bytes each; unaligned loads are allowed.
    let load = |b: &[u8; 16]| unsafe { _mm_loadu_si128(b.as_ptr().cast::<__m128i>()) };
    let mut t = _mm_xor_si128(load(&bytes), load(&keys.tweak[0]));
    for rk in &keys.tweak[1..ROUND_KEYS - 1] {
        t = _mm_aesenc_si128(t, load(rk));
    }
    t = _mm_aesenclast_si128(t, load(&keys.tweak[ROUND_KEYS - 1]));
    let mut out = [0u8; 16];
    // SAFETY: 16 writable bytes.
    unsafe { _mm_storeu_si128(out.as_mut_ptr().cast::<__m128i>(), t) };
    u128::from_le_bytes(out)
}

/// Encrypts or decrypts whole sectors of `sector_bytes` (512 or 4096) in place; the
/// first sector's `plain64` tweak is `first_unit`, and each sector advances it by
/// `sector_bytes / 512`.
///
/// # Panics
/// If `buf` is not a whole number of sectors (the caller checked).
pub(super) fn crypt(
    keys: &RoundKeys,
    buf: &mut [u8],
    first_unit: u64,
    sector_bytes: usize,
    dir: Direction,
) {
    assert!(available(), "VAES path used on a CPU without VAES/AVX-512");
    assert!(sector_bytes.is_multiple_of(STEP) && buf.len().is_multiple_of(sector_bytes));
    let units = (sector_bytes / 512) as u64;
    let mut unit = first_unit;
    for sector in buf.chunks_exact_mut(sector_bytes) {
        // SAFETY: AES-NI, VAES and AVX-512F/BW were detected at run time.
        unsafe {
            let t0 = encrypt_tweak(keys, u128::from(unit));
            match dir {
                Direction::Encrypt => crypt_sector::<true>(&keys.enc, t0, sector),
                Direction::Decrypt => crypt_sector::<false>(&keys.dec, t0, sector),
            }
        }
        unit += units;
    }
}

/// XTS over one sector (a multiple of 512 bytes) whose first block's tweak is `t0`.
#[target_feature(enable = "aes,vaes,avx512f,avx512bw")]
fn crypt_sector<const ENCRYPT: bool>(
    schedule: &[[u8; 16]; ROUND_KEYS],
    t0: u128,
    sector: &mut [u8],
) {
    // Round keys broadcast to all four 128-bit lanes.
    let mut rk = [_mm512_setzero_si512(); ROUND_KEYS];
    for (r, k) in rk.iter_mut().zip(schedule) {
        // SAFETY: 16 readable bytes; unaligned loads are allowed.
        *r = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(k.as_ptr().cast::<__m128i>()) });
    }
    // Tweaks of blocks 0..32: register j holds blocks 4j..4j+4.
    let mut first = [0u128; 4 * LANES];
    let mut t = t0;
    for f in &mut first {
        *f = t.to_le();
        t = mul_x(t);
    }
    let mut tw = [rk[0]; LANES];
    for (j, r) in tw.iter_mut().enumerate() {
        // SAFETY: `first[4j..4j+4]` is 64 readable bytes.
        *r = unsafe { _mm512_loadu_si512(first[4 * j..].as_ptr().cast::<__m512i>()) };
    }
    let mut steps = sector.chunks_exact_mut(STEP).peekable();
    while let Some(step) = steps.next() {
        let p = step.as_mut_ptr().cast::<__m512i>();
        let mut d = [rk[0]; LANES];
        for j in 0..LANES {
            // SAFETY: `step` is STEP = LANES × 64 bytes; register j reads bytes 64j..64j+64.
            let v = unsafe { _mm512_loadu_si512(p.add(j)) };
            d[j] = _mm512_ternarylogic_epi64::<0x96>(v, tw[j], rk[0]);
        }
        for r in &rk[1..ROUND_KEYS - 1] {
            for x in &mut d {
                *x = if ENCRYPT {
                    _mm512_aesenc_epi128(*x, *r)
                } else {
                    _mm512_aesdec_epi128(*x, *r)
                };
            }
        }
        for j in 0..LANES {
            let last = rk[ROUND_KEYS - 1];
            let x = if ENCRYPT {
                _mm512_aesenclast_epi128(d[j], last)
            } else {
                _mm512_aesdeclast_epi128(d[j], last)
            };
            // SAFETY: as for the load above.
            unsafe { _mm512_storeu_si512(p.add(j), _mm512_xor_si512(x, tw[j])) };
        }
        if steps.peek().is_some() {
            for x in &mut tw {
                *x = mul_xk!(*x, 32);
            }
        }
    }
}
