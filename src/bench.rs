//! `sealvol bench`: sector-cipher throughput, like `cryptsetup benchmark`.
//!
//! Each worker thread encrypts (or decrypts) its own cache-resident buffer over and over,
//! as `openssl speed -evp aes-256-xts -bytes 4096` does, so the figure is the cipher's,
//! not the memory system's. MB = 10⁶ bytes, as `openssl speed` counts.

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::secret::VolumeKey;
use crate::xts::{SectorCipher, SectorSize};

/// Bytes each worker cycles through (fits in L2).
const BUF: usize = 64 * 1024;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct CipherFigure {
    /// Always `aes-xts-plain64`.
    pub cipher: &'static str,
    /// Key size in bits (512 for XTS-AES-256).
    pub key_bits: u32,
    /// Sector size in bytes.
    pub sector_size: usize,
    /// Worker threads.
    pub threads: usize,
    /// `encrypt` or `decrypt`.
    pub op: &'static str,
    /// Throughput in 10⁶ bytes per second.
    pub mb_per_s: f64,
}

fn run_one(cipher: &SectorCipher, encrypt: bool, duration: Duration) -> u64 {
    let mut buf = vec![0xA5u8; BUF];
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut sector = 0u64;
    while start.elapsed() < duration {
        for _ in 0..16 {
            let r = if encrypt {
                cipher.encrypt_sectors(&mut buf, sector)
            } else {
                cipher.decrypt_sectors(&mut buf, sector)
            };
            r.expect("BUF is a whole number of sectors");
            sector += 1;
            bytes += BUF as u64;
        }
    }
    std::hint::black_box(&buf);
    bytes
}

fn measure(cipher: &SectorCipher, encrypt: bool, threads: usize, duration: Duration) -> f64 {
    let start = Instant::now();
    let bytes: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| s.spawn(|| run_one(cipher, encrypt, duration)))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("bench worker"))
            .sum()
    });
    #[allow(clippy::cast_precision_loss)]
    let mb = bytes as f64 / 1e6;
    mb / start.elapsed().as_secs_f64()
}

/// Measures every combination of sector size, direction and thread count (1 and all).
#[must_use]
pub fn cipher_figures(duration: Duration) -> Vec<CipherFigure> {
    let key = VolumeKey::generate();
    let all = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let mut thread_counts = vec![1];
    if all > 1 {
        thread_counts.push(all);
    }
    let mut out = Vec::new();
    for ss in [SectorSize::S512, SectorSize::S4096] {
        let cipher = SectorCipher::new(&key, ss);
        for &threads in &thread_counts {
            for (op, encrypt) in [("encrypt", true), ("decrypt", false)] {
                let mb_per_s = measure(&cipher, encrypt, threads, duration);
                out.push(CipherFigure {
                    cipher: "aes-xts-plain64",
                    key_bits: 512,
                    sector_size: ss.bytes(),
                    threads,
                    op,
                    mb_per_s,
                });
            }
        }
    }
    out
}
