//! Concurrent writers at random offsets and lengths against a model: each thread owns
//! a random set of disjoint byte ranges that share sectors with other threads' ranges,
//! so every partial-sector write is a read-modify-write racing its neighbours. Each
//! thread reads its own range back after every write or discard (no lost update may
//! show), and the final contents equal the model.

use super::*;
use crate::backing::MemBacking;
use crate::secret::VolumeKey;
use proptest::prelude::*;

const SIZE: u64 = 128 * 1024;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn concurrent_writers_match_model(
        encrypted in any::<bool>(),
        s4096 in any::<bool>(),
        cuts in proptest::collection::btree_set(1u64..SIZE, 8..64),
        owners in proptest::collection::vec(0usize..4, 64),
        rounds in proptest::collection::vec((any::<u8>(), 0u8..5), 1..6),
    ) {
        let ss = if s4096 { SectorSize::S4096 } else { SectorSize::S512 };
        let backing = Arc::new(MemBacking::new(usize::try_from(SIZE + 4096).expect("small")));
        let crypt = if encrypted { Crypt::Xts(SectorCipher::new(&VolumeKey::generate(), ss)) } else { Crypt::Plain };
        let d = Arc::new(Device::new(backing, Geometry { data_offset: 4096, size: SIZE, sector_size: ss }, crypt));
        // Disjoint pieces [cut_i, cut_i+1), each owned by one of 4 threads.
        let mut bounds: Vec<u64> = std::iter::once(0).chain(cuts).chain(std::iter::once(SIZE)).collect();
        bounds.dedup();
        let pieces: Vec<(u64, u64, usize)> = bounds.windows(2).enumerate().map(|(i, w)| (w[0], w[1], owners[i % owners.len()])).collect();
        let handles: Vec<_> = (0..4usize).map(|t| {
            let d = d.clone();
            let mine: Vec<(u64, u64)> = pieces.iter().filter(|p| p.2 == t).map(|p| (p.0, p.1)).collect();
            let rounds = rounds.clone();
            std::thread::spawn(move || -> Result<Vec<(u64, Vec<u8>)>, String> {
                let mut last = Vec::new();
                for (val, kind) in &rounds {
                    for &(start, end) in &mine {
                        let len = usize::try_from(end - start).expect("small");
                        let want: Vec<u8> = if *kind == 0 {
                            d.discard(start, end - start).map_err(|e| e.to_string())?;
                            vec![0; len]
                        } else {
                            let data: Vec<u8> = (0..len).map(|i| val.wrapping_add(u8::try_from(i % 251).expect("small")).wrapping_add(u8::try_from(t).expect("small")) | 1).collect();
                            d.write(start, &data).map_err(|e| e.to_string())?;
                            data
                        };
                        let mut back = vec![0xEEu8; len];
                        d.read(start, &mut back).map_err(|e| e.to_string())?;
                        if back != want {
                            return Err(format!("thread {t}: range {start}..{end} lost an update"));
                        }
                    }
                }
                for &(start, end) in &mine {
                    let mut back = vec![0u8; usize::try_from(end - start).expect("small")];
                    d.read(start, &mut back).map_err(|e| e.to_string())?;
                    last.push((start, back));
                }
                Ok(last)
            })
        }).collect();
        let mut model = vec![0u8; usize::try_from(SIZE).expect("small")];
        for h in handles {
            for (start, bytes) in h.join().expect("writer thread").map_err(TestCaseError::fail)? {
                let s = usize::try_from(start).expect("small");
                model[s..s + bytes.len()].copy_from_slice(&bytes);
            }
        }
        let mut all = vec![0u8; model.len()];
        d.read(0, &mut all).expect("read all");
        prop_assert!(all == model, "final contents differ from the model");
    }
}
