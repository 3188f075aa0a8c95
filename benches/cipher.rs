//! Criterion micro-benchmarks of the sector cipher (XTS-AES-256, `plain64` tweaks):
//! both sector sizes, one thread (`encrypt_sectors` on a cache-resident 64 KiB buffer, as
//! `sealvol bench` and `openssl speed` measure) and all threads (`par_encrypt_sectors` on
//! 1 MiB, split across the rayon pool as the device does for large requests).
#![allow(missing_docs, reason = "criterion_group! generates undocumented items")]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sealvol::secret::VolumeKey;
use sealvol::xts::{SectorCipher, SectorSize};

const ONE_THREAD_BUF: usize = 64 * 1024;
const PAR_BUF: usize = 1024 * 1024;

fn cipher(c: &mut Criterion) {
    let key = VolumeKey::generate();
    let threads = rayon::current_num_threads();
    for ss in [SectorSize::S512, SectorSize::S4096] {
        let cipher = SectorCipher::new(&key, ss);
        let mut g = c.benchmark_group(format!("xts-{}", ss.bytes()));

        g.throughput(Throughput::Bytes(ONE_THREAD_BUF as u64));
        let mut buf = vec![0xA5u8; ONE_THREAD_BUF];
        g.bench_function(BenchmarkId::new("encrypt", "1-thread"), |b| {
            b.iter(|| {
                cipher
                    .encrypt_sectors(black_box(&mut buf), 7)
                    .expect("whole sectors")
            });
        });
        g.bench_function(BenchmarkId::new("decrypt", "1-thread"), |b| {
            b.iter(|| {
                cipher
                    .decrypt_sectors(black_box(&mut buf), 7)
                    .expect("whole sectors")
            });
        });

        g.throughput(Throughput::Bytes(PAR_BUF as u64));
        let mut big = vec![0xA5u8; PAR_BUF];
        g.bench_function(
            BenchmarkId::new("encrypt", format!("{threads}-threads")),
            |b| {
                b.iter(|| {
                    cipher
                        .par_encrypt_sectors(black_box(&mut big), 7)
                        .expect("whole sectors")
                });
            },
        );
        g.bench_function(
            BenchmarkId::new("decrypt", format!("{threads}-threads")),
            |b| {
                b.iter(|| {
                    cipher
                        .par_decrypt_sectors(black_box(&mut big), 7)
                        .expect("whole sectors")
                });
            },
        );
        g.finish();
    }
}

criterion_group!(benches, cipher);
criterion_main!(benches);
