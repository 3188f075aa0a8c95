//! Crash consistency over the crash simulator (DESIGN §8): header updates, device writes
//! with flush, and every step of a rekey with foreground I/O interleaved. Each crash
//! image must open (a valid header always exists), every flush-acknowledged write must
//! read back, and an interrupted rekey must resume and finish with the right plaintext.
//!
//! Deterministic by seed: a failure prints `SEALVOL_CRASH_SEED=0x...`; run the test again
//! with that variable set to replay the same crash points.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use sealvol::backing::Backing;
use sealvol::crashsim::{CrashConfig, CrashImage, CrashSim, SimRng, seed_from_env};
use sealvol::device::{Crypt, Device};
use sealvol::luks2::{FormatParams, Header, KmsToken};
use sealvol::rekey::{self, RekeyOptions, Rekeyer, Resilience, StepPhase};
use sealvol::secret::VolumeKey;
use sealvol::volume;
use sealvol::xts::{SectorCipher, SectorSize};

fn key(rng: &mut SimRng) -> VolumeKey {
    let mut raw = [0u8; 64];
    rng.fill(&mut raw);
    VolumeKey::from_slice(&mut raw).expect("random halves differ")
}

fn format(sim: &CrashSim, key: &VolumeKey, data_size: u64, ss: u32) -> Header {
    let params = FormatParams {
        data_size,
        sector_size: ss,
        label: "crash".into(),
        token: None,
    };
    let h = Header::format(sim, key, &params).expect("format");
    sim.checkpoint();
    h
}

fn open_device(backing: Arc<dyn Backing>, key: &VolumeKey) -> Result<Arc<Device>, String> {
    let header = Header::read(&*backing).map_err(|e| format!("no valid header: {e}"))?;
    header.verify_key(key).map_err(|e| format!("key: {e}"))?;
    let ss = SectorSize::try_from(header.sector_size()).map_err(|e| e.to_string())?;
    let vol = volume::device_for(
        backing,
        header,
        Path::new("crash-image"),
        Crypt::Xts(SectorCipher::new(key, ss)),
    )
    .map_err(|e| e.to_string())?;
    Ok(vol.device)
}

fn token(n: usize) -> KmsToken {
    KmsToken {
        key_arn: format!("arn:aws:kms:us-east-1:111122223333:key/{n}"),
        ciphertext_blob: vec![u8::try_from(n % 251).expect("small"); 100 + (n * 37) % 900],
        encryption_context: [("aws:ebs:id".to_string(), format!("vol-{n}"))].into(),
        volume_kind: "user".into(),
        volume_id: format!("vol-{n}"),
        workspace_id: "ws-1".into(),
    }
}

#[test]
fn header_updates_always_leave_a_valid_header() {
    let seed = seed_from_env();
    eprintln!("header_updates_always_leave_a_valid_header: SEALVOL_CRASH_SEED={seed:#x}");
    let mut rng = SimRng::new(seed);
    let sim = CrashSim::empty(0);
    let k = key(&mut rng);
    let mut h = format(&sim, &k, 64 * 1024, 4096);
    // Write i is acknowledged once flush `acked_at[i]` is durable.
    let mut acked_at = Vec::new();
    for i in 1..=40 {
        h.set_kms_token(token(i));
        h.write(&sim).expect("header write");
        acked_at.push(sim.flush_count() - 1);
    }
    let cfg = CrashConfig {
        seed,
        subsets: 8,
        torn: 24,
    };
    let mut rewrites = 0;
    let checked = sim
        .for_each_crash(cfg, |img| {
            let got = Header::read(&img.disk).map_err(|e| format!("no valid header: {e}"))?;
            got.verify_key(&k).map_err(|e| e.to_string())?;
            // Versions 1..=40; 0 = the formatted header without a token.
            let acked = acked_at.iter().filter(|&&f| f < img.epoch).count();
            let version = got.kms_token().map_or(0, |t| {
                t.volume_id
                    .trim_start_matches("vol-")
                    .parse::<usize>()
                    .unwrap_or(usize::MAX)
            });
            if version != acked && version != acked + 1 {
                return Err(format!(
                    "header version {version}, but {acked} was acknowledged"
                ));
            }
            if let Some(t) = got.kms_token()
                && *t != token(version)
            {
                return Err(format!("token {version} is damaged"));
            }
            // The survivor can be updated again (a sample, to keep the test fast).
            if img.epoch % 7 == 0 {
                let mut again = got;
                again.set_kms_token(token(99));
                again
                    .write(&img.disk)
                    .map_err(|e| format!("rewrite after crash: {e}"))?;
                let back = Header::read(&img.disk).map_err(|e| e.to_string())?;
                if back.kms_token() != Some(&token(99)) {
                    return Err("rewrite after crash did not stick".into());
                }
                rewrites += 1;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "header updates: {checked} crash points checked ({rewrites} rewritten after the crash)"
    );
    assert!(checked > 1000, "{checked}");
}

/// Plaintext bookkeeping for "every acknowledged write reads back".
struct Model {
    ss: usize,
    /// Current plaintext.
    data: Vec<u8>,
    /// (flush number, foreground op count, plaintext) at each acknowledged flush; flush
    /// `None` is the durable starting state.
    acks: Vec<(Option<usize>, usize, Vec<u8>)>,
    /// Foreground writes: (first op, end op, byte range, plaintext of the range after it).
    writes: Vec<(usize, usize, std::ops::Range<usize>, Vec<u8>)>,
}

impl Model {
    fn new(size: usize, ss: usize) -> Self {
        Self {
            ss,
            data: vec![0; size],
            acks: vec![(None, 0, vec![0; size])],
            writes: Vec::new(),
        }
    }

    fn write(
        &mut self,
        dev: &Device,
        sim: &CrashSim,
        rng: &mut SimRng,
        avoid: Option<&std::ops::Range<u64>>,
    ) {
        let size = self.data.len() as u64;
        for _ in 0..8 {
            let len = 1 + rng.below(3 * self.ss as u64);
            let off = rng.below(size - len);
            let span = off / self.ss as u64 * self.ss as u64
                ..(off + len).div_ceil(self.ss as u64) * self.ss as u64;
            if avoid.is_some_and(|z| span.start < z.end && z.start < span.end) {
                continue;
            }
            let mut buf = vec![0u8; usize::try_from(len).expect("small")];
            let discard = rng.below(8) == 0 && len >= self.ss as u64;
            if !discard && rng.below(5) != 0 {
                rng.fill(&mut buf);
            }
            let before = sim.op_count();
            if discard {
                dev.discard(off, len).expect("discard");
            } else {
                dev.write(off, &buf).expect("write");
            }
            let o = usize::try_from(off).expect("small");
            self.data[o..o + buf.len()].copy_from_slice(&buf);
            let s = usize::try_from(span.start).expect("small");
            let e = usize::try_from(span.end).expect("small");
            self.writes
                .push((before, sim.op_count(), s..e, self.data[s..e].to_vec()));
            return;
        }
    }

    fn flush(&mut self, dev: &Device, sim: &CrashSim) {
        dev.flush().expect("flush");
        self.acks.push((
            Some(sim.flush_count() - 1),
            sim.op_count(),
            self.data.clone(),
        ));
    }

    /// Checks `got` against what a crash at `img` may leave.
    fn check(&self, img: &CrashImage, got: &[u8]) -> Result<(), String> {
        let (_, ack_op, acked) = self
            .acks
            .iter()
            .rev()
            .find(|(f, _, _)| f.is_none_or(|f| f < img.epoch))
            .expect("the initial state is acknowledged");
        let end_op = img.first_op + img.epoch_ops;
        for (i, (want, have)) in acked.chunks(self.ss).zip(got.chunks(self.ss)).enumerate() {
            if want == have {
                continue;
            }
            let range = i * self.ss..(i + 1) * self.ss;
            let mut ok = false;
            for (first, end, r, after) in &self.writes {
                if *first < *ack_op
                    || *first >= end_op
                    || r.end <= range.start
                    || range.end <= r.start
                {
                    continue;
                }
                if img.torn_op().is_some_and(|t| (*first..*end).contains(&t)) {
                    ok = true; // this very write was torn: the sector may hold anything
                    break;
                }
                if &after[range.start - r.start..range.end - r.start] == have {
                    ok = true;
                    break;
                }
            }
            if !ok {
                return Err(format!(
                    "sector {i} lost an acknowledged write (or holds data never written)"
                ));
            }
        }
        Ok(())
    }
}

fn read_all(dev: &Device) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; usize::try_from(dev.size()).expect("small")];
    dev.read(0, &mut buf).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn device_writes_with_flush(ss: u32) -> usize {
    let base = seed_from_env();
    eprintln!("device_writes_with_flush({ss}): SEALVOL_CRASH_SEED={base:#x}");
    let seed = base ^ u64::from(ss);
    let mut rng = SimRng::new(seed);
    let sim = Arc::new(CrashSim::empty(0));
    let k = key(&mut rng);
    let size = 128 * 1024;
    format(&sim, &k, size, ss);
    let dev = open_device(sim.clone(), &k).expect("open");
    let mut model = Model::new(usize::try_from(size).expect("small"), ss as usize);
    for _ in 0..40 {
        for _ in 0..1 + rng.below(5) {
            model.write(&dev, &sim, &mut rng, None);
        }
        model.flush(&dev, &sim);
    }
    let cfg = CrashConfig {
        seed: base,
        subsets: 12,
        torn: 6,
    };
    sim.for_each_crash(cfg, |img| {
        let dev = open_device(Arc::new(img.disk.fork()), &k)?;
        model.check(img, &read_all(&dev)?)
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn flushed_device_writes_survive_every_crash() {
    let n = device_writes_with_flush(4096) + device_writes_with_flush(512);
    eprintln!("device writes: {n} crash points checked");
    assert!(n > 1000, "{n}");
}

/// Finishes whatever rekey state a crash image holds and checks the plaintext.
fn recover_and_check(
    disk: Arc<dyn Backing>,
    old: &VolumeKey,
    new: &VolumeKey,
    check: &dyn Fn(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let header = Header::read(&*disk).map_err(|e| format!("no valid header: {e}"))?;
    let dev = if rekey::in_progress(&header) {
        // Refused with one key, with a clear error.
        let vol = rekey::open_resuming_backing(disk.clone(), Path::new("img"), old, new)
            .map_err(|e| format!("resume: {e}"))?;
        let before = read_all(&vol.device)?;
        check(&before).map_err(|e| format!("mid-rekey after recovery: {e}"))?;
        let mut r = Rekeyer::resume(vol.device.clone()).map_err(|e| e.to_string())?;
        if before.len() % 3 == 0 || before.first().is_some_and(|b| b % 2 == 0) {
            r = r.exclusive(); // the offline protocol may finish what the online one began
        }
        r.run(&AtomicBool::new(false), |_| {})
            .map_err(|e| format!("resumed rekey: {e}"))?;
        vol.device
    } else if header.verify_key(new).is_ok() {
        open_device(disk.clone(), new)?
    } else {
        // Crashed before the rekey began: start it again.
        let dev = open_device(disk.clone(), old)?;
        check(&read_all(&dev)?).map_err(|e| format!("before rekey: {e}"))?;
        let mut r = Rekeyer::start(
            dev.clone(),
            new,
            &RekeyOptions {
                hotzone_bytes: Some(64 * 1024),
                ..RekeyOptions::default()
            },
        )
        .map_err(|e| e.to_string())?;
        r.run(&AtomicBool::new(false), |_| {})
            .map_err(|e| e.to_string())?;
        dev
    };
    check(&read_all(&dev)?).map_err(|e| format!("after the rekey: {e}"))?;
    // A plain header again: only the new key opens it.
    let h = Header::read(&*disk).map_err(|e| e.to_string())?;
    if rekey::in_progress(&h) || !h.mandatory_requirements().is_empty() {
        return Err("rekey state left in the header".into());
    }
    h.verify_key(new)
        .map_err(|e| format!("new key refused after the rekey: {e}"))?;
    if h.verify_key(old).is_ok() {
        return Err("old key still accepted".into());
    }
    // Reopened from scratch, the content is the same.
    check(&read_all(&*open_device(disk, new)?)?)
}

fn rekey_crash_run(
    ss: u32,
    salt: u64,
    hotzone: u64,
    exclusive: bool,
    resilience: Resilience,
) -> usize {
    let base = seed_from_env();
    eprintln!(
        "rekey_crash_run({ss}, hotzone {hotzone}, {resilience:?}): SEALVOL_CRASH_SEED={base:#x}"
    );
    let mut rng = SimRng::new(base ^ salt);
    let sim = Arc::new(CrashSim::empty(0));
    let old = key(&mut rng);
    let new = key(&mut rng);
    let size: u64 = 448 * 1024; // 7 hotzones of 64 KiB
    format(&sim, &old, size, ss);
    let dev = open_device(sim.clone(), &old).expect("open");
    let mut model = Model::new(usize::try_from(size).expect("small"), ss as usize);
    // Initial content with holes: a run of sectors written, some zones left empty.
    for z in 0..7u64 {
        if z == 3 {
            continue; // an all-hole zone
        }
        for _ in 0..6 {
            let len = 1 + rng.below(16 * 1024);
            let off = z * 65536 + rng.below(65536 - len);
            let mut buf = vec![0u8; usize::try_from(len).expect("small")];
            rng.fill(&mut buf);
            dev.write(off, &buf).expect("write");
            let o = usize::try_from(off).expect("small");
            model.data[o..o + buf.len()].copy_from_slice(&buf);
        }
    }
    dev.flush().expect("flush");
    model.acks = vec![(None, 0, model.data.clone())];
    sim.checkpoint();

    let opts = RekeyOptions {
        hotzone_bytes: Some(hotzone),
        new_kms_token: None,
        resilience,
    };
    let mut r = Rekeyer::start(dev.clone(), &new, &opts).expect("start");
    if exclusive {
        r = r.exclusive();
    }
    let mut wrote = 0;
    loop {
        let mut observe = |phase: StepPhase, zone: std::ops::Range<u64>| {
            // Foreground I/O outside the locked zone, on both sides of the boundary.
            if !exclusive && rng.coin() {
                model.write(&dev, &sim, &mut rng, Some(&zone));
                wrote += 1;
            }
            if phase == StepPhase::Rewritten && rng.coin() {
                model.flush(&dev, &sim);
            }
        };
        let done = r.step_with(&mut observe).expect("step");
        if done {
            break;
        }
        if !exclusive && rng.coin() {
            model.write(&dev, &sim, &mut rng, None);
            model.flush(&dev, &sim);
        }
    }
    // The live device serves the final content.
    model.check_live(&read_all(&dev).expect("read"));
    let cfg = CrashConfig {
        seed: base,
        subsets: 16,
        torn: 12,
    };
    let mut nested = 0;
    let checked = sim
        .for_each_crash(cfg, |img| {
            let disk: Arc<dyn Backing> = Arc::new(img.disk.fork());
            let check = |got: &[u8]| model.check(img, got);
            recover_and_check(disk, &old, &new, &check)?;
            // Crash the recovery itself, now and then.
            if img.epoch % 9 == 4 && img.kind == sealvol::crashsim::CrashKind::WholeEpoch {
                let sim2 = Arc::new(CrashSim::new(img.disk.image()));
                let _ = recover_and_check(sim2.clone(), &old, &new, &check);
                let cfg2 = CrashConfig {
                    seed: base,
                    subsets: 3,
                    torn: 2,
                };
                nested += sim2
                    .for_each_crash(cfg2, |img2| {
                        recover_and_check(Arc::new(img2.disk.fork()), &old, &new, &check)
                            .map_err(|e| format!("crash during recovery: {e}"))
                    })
                    .map_err(|e| format!("nested: {e}"))?;
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "rekey({ss}, hotzone {hotzone}, exclusive {exclusive}, {resilience:?}): {checked} crash points + {nested} crash points inside recovery; {wrote} foreground writes interleaved"
    );
    checked + nested
}

impl Model {
    fn check_live(&self, got: &[u8]) {
        assert!(
            got == self.data.as_slice(),
            "live device content differs from the model"
        );
    }
}

#[test]
fn rekey_survives_a_crash_at_every_step() {
    let n = rekey_crash_run(4096, 1, 64 * 1024, false, Resilience::Journal)
        + rekey_crash_run(512, 2, 64 * 1024, false, Resilience::Journal)
        + rekey_crash_run(4096, 3, 192 * 1024, false, Resilience::Journal)
        + rekey_crash_run(4096, 4, 64 * 1024, true, Resilience::Journal)
        + rekey_crash_run(512, 5, 128 * 1024, true, Resilience::Journal);
    eprintln!("rekey: {n} crash points checked");
    assert!(n > 1000, "{n}");
}

/// The checksum journal (fingerprints): torn sectors are put back together piece by
/// piece, online and offline, at both sector sizes.
#[test]
fn checksum_rekey_survives_a_crash_at_every_step() {
    let n = rekey_crash_run(4096, 11, 64 * 1024, false, Resilience::Checksum)
        + rekey_crash_run(512, 12, 64 * 1024, false, Resilience::Checksum)
        + rekey_crash_run(4096, 13, 64 * 1024, true, Resilience::Checksum)
        + rekey_crash_run(512, 14, 128 * 1024, true, Resilience::Checksum);
    eprintln!("checksum rekey: {n} crash points checked");
    assert!(n > 1000, "{n}");
}

#[test]
fn one_key_is_refused_mid_rekey_with_the_resume_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.luks");
    let mut rng = SimRng::new(7);
    let old = key(&mut rng);
    let new = key(&mut rng);
    volume::create(&volume::CreateParams {
        path: &path,
        size: 1 << 20,
        sector_size: SectorSize::S4096,
        force: false,
        encryption: Some(volume::Encryption {
            key: &old,
            token: None,
            label: String::new(),
        }),
    })
    .expect("create");
    let vol = volume::open_encrypted(&path, &old).expect("open");
    vol.device.write(4096, &[5u8; 300_000]).expect("write");
    let mut r = Rekeyer::start(
        vol.device.clone(),
        &new,
        &RekeyOptions {
            hotzone_bytes: Some(256 * 1024),
            ..RekeyOptions::default()
        },
    )
    .expect("start");
    r.step().expect("one zone");
    drop(r);
    drop(vol);
    for k in [&old, &new] {
        let err = volume::open_encrypted(&path, k)
            .expect_err("refused mid-rekey")
            .to_string();
        assert!(
            err.contains("sealvol rekey-volume --path") && err.contains("--new-volume-key-file"),
            "{err}"
        );
    }
    let err = rekey::open_resuming(&path, &new, &old)
        .expect_err("swapped keys")
        .to_string();
    assert!(err.contains("old volume key does not match"), "{err}");
    let report =
        rekey::rekey_detached(&path, &old, &new, &RekeyOptions::default(), |_| {}).expect("resume");
    assert!(
        report.resumed && report.bytes_this_run == 768 * 1024,
        "{report:?}"
    );
    let again = rekey::rekey_detached(&path, &old, &new, &RekeyOptions::default(), |_| {})
        .expect("idempotent");
    assert!(again.already_done);
    let vol = volume::open_encrypted(&path, &new).expect("new key");
    let mut buf = vec![0u8; 300_000];
    vol.device.read(4096, &mut buf).expect("read");
    assert!(buf.iter().all(|&b| b == 5));
    assert!(matches!(
        volume::open_encrypted(&path, &old),
        Err(volume::VolumeError::WrongKey { .. })
    ));
}
