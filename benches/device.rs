//! Criterion micro-benchmarks of the device read/write path (`Device::read` /
//! `Device::write`: range locks, read-modify-write, cipher, backing copy) on the memory
//! backing, encrypted and plain, at 4 KiB and 1 MiB requests. The backing is filled with
//! non-zero data first: all-zero sectors are holes the cipher skips.
#![allow(missing_docs, reason = "criterion_group! generates undocumented items")]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sealvol::backing::MemBacking;
use sealvol::device::{Crypt, Device, Geometry};
use sealvol::secret::VolumeKey;
use sealvol::xts::{SectorCipher, SectorSize};

const SIZE: u64 = 64 << 20;

fn device(encrypted: bool) -> Device {
    let ss = SectorSize::S4096;
    let crypt = if encrypted {
        Crypt::Xts(SectorCipher::new(&VolumeKey::generate(), ss))
    } else {
        Crypt::Plain
    };
    let len = usize::try_from(SIZE).expect("64 MiB fits in usize");
    let dev = Device::new(
        Arc::new(MemBacking::new(len)),
        Geometry {
            data_offset: 0,
            size: SIZE,
            sector_size: ss,
        },
        crypt,
    );
    let fill = vec![0x5Au8; 1 << 20];
    for off in (0..SIZE).step_by(fill.len()) {
        dev.write(off, &fill).expect("in range");
    }
    dev
}

fn device_path(c: &mut Criterion) {
    for (name, encrypted) in [("plain", false), ("encrypted", true)] {
        let dev = device(encrypted);
        let mut g = c.benchmark_group(format!("device-{name}"));
        for len in [4096usize, 1 << 20] {
            g.throughput(Throughput::Bytes(len as u64));
            let label = if len == 4096 { "4KiB" } else { "1MiB" };
            let mut buf = vec![0u8; len];
            let data = vec![0xC3u8; len];
            // Walk the device so successive iterations touch different sectors.
            let mut at = 0u64;
            let step = |at: &mut u64| {
                *at = (*at + len as u64 * 7) % (SIZE - len as u64) / 4096 * 4096;
                *at
            };
            g.bench_function(BenchmarkId::new("read", label), |b| {
                b.iter(|| {
                    dev.read(black_box(step(&mut at)), black_box(&mut buf))
                        .expect("in range")
                });
            });
            g.bench_function(BenchmarkId::new("write", label), |b| {
                b.iter(|| {
                    dev.write(black_box(step(&mut at)), black_box(&data))
                        .expect("in range")
                });
            });
            if len == 4096 {
                // Unaligned (read-modify-write of two sectors).
                g.bench_function(BenchmarkId::new("write-unaligned", label), |b| {
                    b.iter(|| {
                        dev.write(black_box(step(&mut at) + 512), black_box(&data))
                            .expect("in range")
                    });
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, device_path);
criterion_main!(benches);
