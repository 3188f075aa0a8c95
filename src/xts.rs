//! The sector cipher: XTS-AES-256 with dm-crypt `plain64` tweaks. Pure computation, no I/O.
//!
//! Compatibility contract (DESIGN §4): the tweak of a sector is the little-endian 128-bit
//! integer of its number **in 512-byte units**, so the 4096-byte sector `n` uses tweak
//! `8·n`, exactly as `aes-xts-plain64` in dm-crypt with `sector_size: 4096`. Anything
//! written here decrypts with OpenSSL's or the kernel's XTS given the 64-byte key.
//!
//! Fast path (`vaes`, CPUs with VAES + AVX-512): whitening and AES rounds fused in
//! registers, 32 blocks in flight (see that module). Portable path (everything else): the
//! data blocks of a group of sectors (≥ 256 blocks for 4096-byte sectors, 8 sectors at a
//! time for 512-byte ones) go through the `aes` crate in one `encrypt_blocks` call, with
//! the per-block tweaks `T·αⁱ` computed in independent chains (AVX-512 when present).
//! The reference implementation (`xts-mode`) cross-checks both in the tests.

use aes::cipher::consts::U16;
use aes::cipher::{Array, BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc};
use rayon::prelude::*;

use crate::secret::VolumeKey;

/// Multiplies each of the four 128-bit tweaks in the AVX-512 register `t` by `x^K`
/// in GF(2¹²⁸) (K ≤ 56): a shift of both 64-bit halves, the bits carried from the low
/// half into the high half, and the bits shifted out of the top folded back as a
/// carry-less product with 0x87 (`b ^ b<<1 ^ b<<2 ^ b<<7`). The caller imports the
/// `_mm512_*` intrinsics it names.
#[cfg(target_arch = "x86_64")]
macro_rules! mul_xk {
    ($t:expr, $k:literal) => {{
        let t = $t;
        let carry = _mm512_srli_epi64::<{ 64 - $k }>(t);
        let shifted = _mm512_slli_epi64::<$k>(t);
        let into_high = _mm512_bslli_epi128::<8>(carry);
        let top = _mm512_bsrli_epi128::<8>(carry);
        let fold = _mm512_ternarylogic_epi64::<0x96>(
            top,
            _mm512_slli_epi64::<1>(top),
            _mm512_slli_epi64::<2>(top),
        );
        let fold = _mm512_xor_si512(fold, _mm512_slli_epi64::<7>(top));
        _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, fold)
    }};
}

#[cfg(target_arch = "x86_64")]
mod vaes;

/// AES block size.
const BLOCK: usize = 16;
/// Bytes per crypto group: one `encrypt_blocks` call covers this much data.
const GROUP: usize = 16 * 1024;
/// Requests at least this large are split across the rayon pool. At ~10 GB/s per core a
/// 1 MiB FUSE request takes ~0.1 ms on its own thread, less than waking pool threads
/// costs when the FUSE threads already keep the cores busy (scripts/bench: at 64 KiB,
/// with a 64 KiB threshold, encrypted random reads ran at a third of unencrypted), so
/// only rekey hotzones and other multi-MiB buffers go parallel.
const PARALLEL_MIN: usize = 2 * 1024 * 1024;
/// Chunk handed to one rayon task.
const PARALLEL_CHUNK: usize = 256 * 1024;

/// Errors from building or using the sector cipher.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XtsError {
    /// Only 512 and 4096-byte sectors are supported.
    #[error("unsupported sector size {0}: use 512 or 4096")]
    SectorSize(u32),
    /// A buffer that is not a whole number of sectors.
    #[error("buffer of {len} bytes is not a multiple of the {sector_size}-byte sector size")]
    Misaligned {
        /// Buffer length.
        len: usize,
        /// Sector size.
        sector_size: u32,
    },
    /// Re-encryption between ciphers of different sector sizes (a bug: one volume has one).
    #[error("cannot re-encrypt from {from}-byte to {to}-byte sectors")]
    SectorSizeMismatch {
        /// This cipher's sector size.
        from: u32,
        /// The target cipher's sector size.
        to: u32,
    },
}

/// Sector sizes the cipher supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectorSize {
    /// 512 bytes (dm-crypt's default).
    S512,
    /// 4096 bytes (sealvol's default).
    S4096,
}

impl SectorSize {
    /// Size in bytes.
    #[must_use]
    pub const fn bytes(self) -> usize {
        match self {
            Self::S512 => 512,
            Self::S4096 => 4096,
        }
    }

    /// Size in bytes as `u32`.
    #[must_use]
    pub const fn bytes_u32(self) -> u32 {
        match self {
            Self::S512 => 512,
            Self::S4096 => 4096,
        }
    }

    /// Size in bytes as `u64`.
    #[must_use]
    pub const fn bytes_u64(self) -> u64 {
        self.bytes() as u64
    }

    /// How many 512-byte units one sector spans (the `plain64` tweak multiplier).
    #[must_use]
    pub const fn units_512(self) -> u64 {
        self.bytes_u64() / 512
    }
}

impl TryFrom<u32> for SectorSize {
    type Error = XtsError;
    fn try_from(v: u32) -> Result<Self, XtsError> {
        match v {
            512 => Ok(Self::S512),
            4096 => Ok(Self::S4096),
            other => Err(XtsError::SectorSize(other)),
        }
    }
}

/// `x⁸` reduction table (test reference for [`fold8`]): `REDUCE8[b]` is the carry-less product `b · 0x87`, i.e. what the
/// byte `b` shifted out of the top of a 128-bit tweak folds back into the bottom.
#[cfg(test)]
const REDUCE8: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut b = 0;
    while b < 256 {
        let mut acc = 0u16;
        let mut bit = 0;
        while bit < 8 {
            if (b >> bit) & 1 == 1 {
                acc ^= 0x87 << bit;
            }
            bit += 1;
        }
        t[b] = acc;
        b += 1;
    }
    t
};

/// Multiplies a tweak by α (x) in GF(2¹²⁸) with the XTS polynomial.
#[inline(always)]
const fn mul_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Multiplies a tweak by x⁸ (reference for the vectorized lanes in [`whiten_first`]).
#[cfg(test)]
fn mul_x8(t: u128) -> u128 {
    (t << 8) ^ u128::from(REDUCE8[(t >> 120) as usize])
}

#[cfg(target_arch = "x86_64")]
fn avx512_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var_os("SEALVOL_NO_AVX512").is_none()
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
    })
}

/// Carry-less product `b · 0x87` for a byte `b` (what x⁸ folds back), branch-free so
/// that eight lanes vectorize.
#[inline(always)]
const fn fold8(b: u64) -> u64 {
    b ^ (b << 1) ^ (b << 2) ^ (b << 7)
}

/// Generates `t0·αⁱ` for every block of `data` (held as little-endian u64 pairs) with 8
/// independent `×x⁸` chains kept as separate low/high u64 lanes (two vector registers),
/// XORs each tweak into its block and keeps it in `out` for the second pass.
#[inline(always)]
fn whiten_first(t0: u128, data: &mut [u64], out: &mut [u64]) {
    let mut lo = [0u64; 8];
    let mut hi = [0u64; 8];
    let mut t = t0;
    for i in 0..8 {
        // Truncations split the u128 into its halves on purpose.
        #[allow(clippy::cast_possible_truncation)]
        {
            lo[i] = t as u64;
            hi[i] = (t >> 64) as u64;
        }
        t = mul_x(t);
    }
    let mut d = data.chunks_exact_mut(16);
    let mut o = out.chunks_exact_mut(16);
    for (dc, oc) in (&mut d).zip(&mut o) {
        for i in 0..8 {
            dc[2 * i] ^= lo[i].to_le();
            dc[2 * i + 1] ^= hi[i].to_le();
            oc[2 * i] = lo[i].to_le();
            oc[2 * i + 1] = hi[i].to_le();
        }
        for i in 0..8 {
            let top = hi[i] >> 56;
            hi[i] = (hi[i] << 8) | (lo[i] >> 56);
            lo[i] = (lo[i] << 8) ^ fold8(top);
        }
    }
    let (dr, or) = (d.into_remainder(), o.into_remainder());
    for (i, (dp, op)) in dr
        .chunks_exact_mut(2)
        .zip(or.chunks_exact_mut(2))
        .enumerate()
    {
        dp[0] ^= lo[i].to_le();
        dp[1] ^= hi[i].to_le();
        op[0] = lo[i].to_le();
        op[1] = hi[i].to_le();
    }
}

/// The second XOR pass: `data ^= tweaks`.
#[inline(always)]
fn whiten_second(data: &mut [u64], tweaks: &[u64]) {
    for (d, t) in data.iter_mut().zip(tweaks) {
        *d ^= *t;
    }
}

/// AVX-512 whitening: four tweaks per 512-bit register, advanced by `×x⁴` per step
/// (a 64-bit lane shift, the carries moved across the lane halves, and the bits shifted
/// out of the top folded back with `0x87`). `data.len()` is a multiple of 8 words.
///
/// # Safety
/// The CPU must support AVX-512F and AVX-512BW.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn whiten_first_avx512(t0: u128, data: &mut [u64], out: &mut [u64]) {
    use std::arch::x86_64::{
        __m512i, _mm512_bslli_epi128, _mm512_bsrli_epi128, _mm512_loadu_si512, _mm512_slli_epi64,
        _mm512_srli_epi64, _mm512_storeu_si512, _mm512_ternarylogic_epi64, _mm512_xor_si512,
    };
    debug_assert!(data.len().is_multiple_of(8) && out.len() == data.len());
    let t1 = mul_x(t0);
    let t2 = mul_x(t1);
    let t3 = mul_x(t2);
    let start = [t0.to_le(), t1.to_le(), t2.to_le(), t3.to_le()];
    // SAFETY: `start` is 64 readable bytes; unaligned loads are allowed.
    let mut t = unsafe { _mm512_loadu_si512(start.as_ptr().cast::<__m512i>()) };
    for (d, o) in data.chunks_exact_mut(8).zip(out.chunks_exact_mut(8)) {
        // SAFETY: each chunk is exactly 8 u64 = 64 bytes, valid for reads and writes.
        unsafe {
            let v = _mm512_loadu_si512(d.as_ptr().cast::<__m512i>());
            _mm512_storeu_si512(d.as_mut_ptr().cast::<__m512i>(), _mm512_xor_si512(v, t));
            _mm512_storeu_si512(o.as_mut_ptr().cast::<__m512i>(), t);
        }
        t = mul_xk!(t, 4);
    }
}

/// AVX-512 second pass: `data ^= tweaks`, 64 bytes at a time.
///
/// # Safety
/// The CPU must support AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn whiten_second_avx512(data: &mut [u64], tweaks: &[u64]) {
    use std::arch::x86_64::{__m512i, _mm512_loadu_si512, _mm512_storeu_si512, _mm512_xor_si512};
    for (d, t) in data.chunks_exact_mut(8).zip(tweaks.chunks_exact(8)) {
        // SAFETY: both chunks are exactly 64 bytes.
        unsafe {
            let v = _mm512_xor_si512(
                _mm512_loadu_si512(d.as_ptr().cast::<__m512i>()),
                _mm512_loadu_si512(t.as_ptr().cast::<__m512i>()),
            );
            _mm512_storeu_si512(d.as_mut_ptr().cast::<__m512i>(), v);
        }
    }
}

#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// XTS-AES-256 over whole sectors with `plain64` tweaks.
///
/// Key schedules are wiped on drop (the `aes` crate's `zeroize` feature) and `Debug` prints
/// no key material.
#[derive(Clone)]
pub struct SectorCipher {
    data: Aes256,
    tweak: Aes256Enc,
    sector_size: SectorSize,
    /// Round keys for the fused VAES-512 path, when the CPU has it.
    #[cfg(target_arch = "x86_64")]
    fused: Option<std::sync::Arc<crate::secret::Locked<vaes::RoundKeys>>>,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("sector_size", &self.sector_size)
            .field("backend", &self.backend())
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Builds the cipher from a 64-byte key (Key1 = data, Key2 = tweak). `VolumeKey`
    /// already guarantees Key1 != Key2.
    #[must_use]
    pub fn new(key: &VolumeKey, sector_size: SectorSize) -> Self {
        #[allow(unused_mut)]
        let mut cipher = Self::portable(key, sector_size);
        #[cfg(target_arch = "x86_64")]
        if vaes::available() {
            cipher.fused = Some(std::sync::Arc::new(vaes::expand(key.expose())));
        }
        cipher
    }

    /// The cipher without the fused VAES path (`aes` crate rounds, separate whitening):
    /// what runs on CPUs without VAES; tests and benchmarks compare the two.
    #[doc(hidden)]
    #[must_use]
    pub fn portable(key: &VolumeKey, sector_size: SectorSize) -> Self {
        let k = key.expose();
        let k1 = Array::<u8, aes::cipher::consts::U32>::from_fn(|i| k[i]);
        let k2 = Array::<u8, aes::cipher::consts::U32>::from_fn(|i| k[32 + i]);
        let cipher = Self {
            data: Aes256::new(&k1),
            tweak: Aes256Enc::new(&k2),
            sector_size,
            #[cfg(target_arch = "x86_64")]
            fused: None,
        };
        // Arrays are Copy and do not wipe themselves.
        let mut k1 = k1;
        let mut k2 = k2;
        zeroize::Zeroize::zeroize(k1.as_mut_slice());
        zeroize::Zeroize::zeroize(k2.as_mut_slice());
        cipher
    }

    /// The sector size.
    #[must_use]
    pub fn sector_size(&self) -> SectorSize {
        self.sector_size
    }

    /// Which implementation runs: `"vaes-512 fused"` or `"aes crate + avx-512 whitening"` /
    /// `"aes crate"` (for benchmark reports and logs).
    #[must_use]
    pub fn backend(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        {
            if self.fused.is_some() {
                return "vaes-512 fused";
            }
            if avx512_available() {
                return "aes crate + avx-512 whitening";
            }
        }
        "aes crate"
    }

    /// Encrypts whole sectors in place; `first_sector` counts in this cipher's sector size.
    ///
    /// # Errors
    /// [`XtsError::Misaligned`] if `buf` is not a whole number of sectors.
    pub fn encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        self.check(buf)?;
        self.crypt(buf, first_sector, Direction::Encrypt);
        Ok(())
    }

    /// Decrypts whole sectors in place.
    ///
    /// # Errors
    /// [`XtsError::Misaligned`] if `buf` is not a whole number of sectors.
    pub fn decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        self.check(buf)?;
        self.crypt(buf, first_sector, Direction::Decrypt);
        Ok(())
    }

    /// Like [`Self::encrypt_sectors`], split across the rayon pool when `buf` is large.
    ///
    /// # Errors
    /// [`XtsError::Misaligned`] if `buf` is not a whole number of sectors.
    pub fn par_encrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        self.check(buf)?;
        self.par_crypt(buf, first_sector, Direction::Encrypt);
        Ok(())
    }

    /// Like [`Self::decrypt_sectors`], split across the rayon pool when `buf` is large.
    ///
    /// # Errors
    /// [`XtsError::Misaligned`] if `buf` is not a whole number of sectors.
    pub fn par_decrypt_sectors(&self, buf: &mut [u8], first_sector: u64) -> Result<(), XtsError> {
        self.check(buf)?;
        self.par_crypt(buf, first_sector, Direction::Decrypt);
        Ok(())
    }

    /// Re-encrypts whole sectors in place from this cipher's key to `to`'s: each chunk is
    /// decrypted and encrypted again while it is still in cache, split across the rayon
    /// pool when `buf` is large (a rekey hotzone).
    ///
    /// # Errors
    /// [`XtsError::Misaligned`] if `buf` is not a whole number of sectors,
    /// [`XtsError::SectorSizeMismatch`] if the two ciphers' sector sizes differ.
    pub fn par_recrypt_sectors(
        &self,
        to: &SectorCipher,
        buf: &mut [u8],
        first_sector: u64,
    ) -> Result<(), XtsError> {
        self.check(buf)?;
        if to.sector_size != self.sector_size {
            return Err(XtsError::SectorSizeMismatch {
                from: self.sector_size.bytes_u32(),
                to: to.sector_size.bytes_u32(),
            });
        }
        let per_chunk = (PARALLEL_CHUNK / self.sector_size.bytes()) as u64;
        let recrypt = |(i, chunk): (usize, &mut [u8])| {
            let first = first_sector + i as u64 * per_chunk;
            self.crypt(chunk, first, Direction::Decrypt);
            to.crypt(chunk, first, Direction::Encrypt);
        };
        if buf.len() < PARALLEL_MIN {
            buf.chunks_mut(PARALLEL_CHUNK).enumerate().for_each(recrypt);
        } else {
            buf.par_chunks_mut(PARALLEL_CHUNK)
                .enumerate()
                .for_each(recrypt);
        }
        Ok(())
    }

    fn check(&self, buf: &[u8]) -> Result<(), XtsError> {
        if buf.len().is_multiple_of(self.sector_size.bytes()) {
            Ok(())
        } else {
            Err(XtsError::Misaligned {
                len: buf.len(),
                sector_size: self.sector_size.bytes_u32(),
            })
        }
    }

    fn par_crypt(&self, buf: &mut [u8], first_sector: u64, dir: Direction) {
        if buf.len() < PARALLEL_MIN {
            self.crypt(buf, first_sector, dir);
            return;
        }
        let per_chunk = (PARALLEL_CHUNK / self.sector_size.bytes()) as u64;
        buf.par_chunks_mut(PARALLEL_CHUNK)
            .enumerate()
            .for_each(|(i, chunk)| {
                self.crypt(chunk, first_sector + i as u64 * per_chunk, dir);
            });
    }

    /// The core: `buf` holds whole sectors (checked by the caller).
    fn crypt(&self, buf: &mut [u8], first_sector: u64, dir: Direction) {
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.fused {
            let first_unit = first_sector * self.sector_size.units_512();
            vaes::crypt(keys, buf, first_unit, self.sector_size.bytes(), dir);
            return;
        }
        // SAFETY: every bit pattern is a valid u128; `align_to_mut` only hands out the
        // correctly aligned middle part.
        let (head, words, _) = unsafe { buf.align_to_mut::<u64>() };
        if !head.is_empty() {
            // An unaligned caller buffer: work on an aligned copy.
            let mut copy = vec![0u64; buf.len() / 8];
            for (w, b) in copy.iter_mut().zip(buf.chunks_exact(8)) {
                *w = u64::from_ne_bytes(b.try_into().expect("8-byte chunk"));
            }
            self.crypt_words(&mut copy, first_sector, dir);
            for (w, b) in copy.iter().zip(buf.chunks_exact_mut(8)) {
                b.copy_from_slice(&w.to_ne_bytes());
            }
            return;
        }
        self.crypt_words(words, first_sector, dir);
    }

    /// XTS over whole sectors held as u64 words (memory order = the blocks' byte order;
    /// tweak halves are converted with `to_le`).
    fn crypt_words(&self, words: &mut [u64], first_sector: u64, dir: Direction) {
        #[cfg(target_arch = "x86_64")]
        let avx512 = avx512_available();
        #[cfg(not(target_arch = "x86_64"))]
        let avx512 = false;
        let ss = self.sector_size.bytes();
        let words_per_sector = ss / 8;
        let sectors_per_group = GROUP / ss;
        let mut tweaks = vec![0u64; GROUP / 8];
        let mut sector = first_sector;
        for group in words.chunks_mut(sectors_per_group * words_per_sector) {
            let n = group.len() / words_per_sector;
            // Initial tweaks of every sector in the group, encrypted in one batch.
            let mut t0 = [Array::<u8, U16>::default(); GROUP / 512];
            for (i, t) in t0.iter_mut().take(n).enumerate() {
                let unit = u128::from(sector + i as u64) * u128::from(self.sector_size.units_512());
                *t = Array::from(unit.to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut t0[..n]);
            for (i, (t, chunk)) in t0
                .iter()
                .zip(group.chunks_mut(words_per_sector))
                .enumerate()
            {
                let mut b = [0u8; BLOCK];
                b.copy_from_slice(t.as_slice());
                let span = i * words_per_sector..(i + 1) * words_per_sector;
                let t0 = u128::from_le_bytes(b);
                #[cfg(target_arch = "x86_64")]
                if avx512 {
                    // SAFETY: AVX-512F/BW were detected at run time.
                    unsafe { whiten_first_avx512(t0, chunk, &mut tweaks[span]) };
                    continue;
                }
                whiten_first(t0, chunk, &mut tweaks[span]);
            }
            let used = &tweaks[..group.len()];
            {
                // SAFETY: the byte view covers exactly the memory of `group` (u64 words),
                // every bit pattern is valid for both, and `group` is not used meanwhile.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(group.as_mut_ptr().cast::<u8>(), group.len() * 8)
                };
                let (blocks, rest) = Array::<u8, U16>::slice_as_chunks_mut(bytes);
                debug_assert!(rest.is_empty(), "sectors are whole blocks");
                match dir {
                    Direction::Encrypt => self.data.encrypt_blocks(blocks),
                    Direction::Decrypt => self.data.decrypt_blocks(blocks),
                }
            }
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: AVX-512F was detected at run time.
                unsafe { whiten_second_avx512(group, used) };
            } else {
                whiten_second(group, used);
            }
            #[cfg(not(target_arch = "x86_64"))]
            whiten_second(group, used);
            sector += n as u64;
        }
    }
}

#[cfg(test)]
mod tests;
