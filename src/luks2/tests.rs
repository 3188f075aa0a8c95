//! Unit tests of the LUKS2 header module (the cryptsetup oracle lives in
//! `tests/luks2_cryptsetup.rs`).

use std::sync::Mutex;

use proptest::prelude::*;
use serde_json::Value;

use super::*;
use crate::backing::{FileBacking, MemBacking};

const DATA: u64 = 64 * 1024;
const HDR: usize = 16 * 1024;

fn key(seed: u8) -> VolumeKey {
    let mut raw: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(seed | 1).wrapping_add(seed))
        .collect();
    VolumeKey::from_slice(&mut raw).expect("distinct halves")
}

fn token(blob: &[u8]) -> KmsToken {
    KmsToken {
        key_arn: "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
            .into(),
        ciphertext_blob: blob.to_vec(),
        encryption_context: BTreeMap::from([
            (
                "aws:workspaces:sid-directoryid".into(),
                "S-1-5-21-1@d-1234567890".into(),
            ),
            ("aws:ebs:id".into(), "vol-0123456789abcdef0".into()),
        ]),
        volume_kind: "user".into(),
        volume_id: "vol-0123456789abcdef0".into(),
        workspace_id: "ws-abc123".into(),
    }
}

fn params() -> FormatParams {
    FormatParams {
        data_size: DATA,
        sector_size: 4096,
        label: "home".into(),
        token: Some(token(b"blob")),
    }
}

fn formatted() -> (MemBacking, Header) {
    let b = MemBacking::new(0);
    let h = Header::format(&b, &key(1), &params()).expect("format");
    (b, h)
}

fn flip(b: &MemBacking, offset: u64) {
    let mut byte = [0u8];
    b.read_at(&mut byte, offset).expect("in range");
    byte[0] ^= 0x40;
    b.write_at(&byte, offset).expect("in range");
}

/// Writes `h` (possibly invalid) into one copy, bypassing validation, with a good checksum.
fn force_copy(b: &MemBacking, h: &Header, copy: Copy, json: &[u8]) {
    h.write_copy(b, copy, json).expect("memory write");
}

fn force_both(b: &MemBacking, h: &Header) {
    let json = serde_json::to_vec(&h.meta).expect("serializes");
    force_copy(b, h, Copy::Primary, &json);
    force_copy(b, h, Copy::Secondary, &json);
}

#[test]
fn format_then_read_round_trips() {
    let (b, h) = formatted();
    assert_eq!(b.size().expect("size"), DEFAULT_DATA_OFFSET + DATA);
    let r = Header::read(&b).expect("read");
    assert_eq!(r.uuid(), h.uuid());
    assert_eq!(r.uuid().len(), 36);
    assert_eq!(r.label(), "home");
    assert_eq!(r.seqid(), 1);
    assert_eq!(r.cipher(), "aes-xts-plain64");
    assert_eq!(r.sector_size(), 4096);
    assert_eq!(r.data_offset(), DEFAULT_DATA_OFFSET);
    assert_eq!(r.data_size(b.size().expect("size")), DATA);
    assert_eq!(r.hdr_size(), DEFAULT_HDR_SIZE);
    assert_eq!(r.kms_token(), Some(&token(b"blob")));
    assert_eq!(r.which_copy_used(), Copy::Primary);
    assert_eq!(r.keyslot_count(), 0);
    assert!(r.mandatory_requirements().is_empty());
    assert_eq!(r.meta, h.meta);
    r.verify_key(&key(1)).expect("right key");
    let bytes = b.snapshot();
    assert_eq!(&bytes[..6], b"LUKS\xba\xbe");
    assert_eq!(&bytes[HDR..HDR + 6], b"SKUL\xba\xbe");
    assert_ne!(
        &bytes[104..168],
        &bytes[HDR + 104..HDR + 168],
        "each copy has its own salt"
    );
    assert!(is_luks(&b));
}

#[test]
fn file_backing_round_trip_and_512_byte_sectors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol");
    let p = FormatParams {
        sector_size: 512,
        data_size: 512 * 3,
        label: String::new(),
        token: None,
    };
    let h = Header::format(
        &FileBacking::create(&path, false).expect("create"),
        &key(2),
        &p,
    )
    .expect("format");
    let b = FileBacking::open(&path).expect("open");
    let r = Header::read(&b).expect("read");
    assert_eq!(r.uuid(), h.uuid());
    assert_eq!(r.sector_size(), 512);
    assert_eq!(r.data_size(b.size().expect("size")), 1536);
    assert_eq!(r.kms_token(), None);
    r.verify_key(&key(2)).expect("right key");
}

#[test]
fn format_discards_previous_contents() {
    let b = MemBacking::from_bytes(vec![0xEE; 40 * 1024 * 1024]);
    Header::format(&b, &key(1), &params()).expect("format");
    let bytes = b.snapshot();
    assert_eq!(bytes.len() as u64, DEFAULT_DATA_OFFSET + DATA);
    assert!(
        bytes[2 * HDR..].iter().all(|&x| x == 0),
        "keyslots and data areas read as zeros"
    );
}

#[test]
fn wrong_key_is_a_digest_mismatch() {
    let (b, _) = formatted();
    let r = Header::read(&b).expect("read");
    let err = r.verify_key(&key(9)).expect_err("wrong key");
    assert!(matches!(err, Luks2Error::DigestMismatch), "{err}");
    assert!(err.to_string().contains("wrong volume key"));
}

#[test]
fn write_bumps_seqid_and_updates_both_copies() {
    let (b, mut h) = formatted();
    h.set_kms_token(token(b"rewrapped"));
    h.write(&b).expect("write");
    assert_eq!(h.seqid(), 2);
    h.write(&b).expect("write");
    let r = Header::read(&b).expect("read");
    assert_eq!(r.seqid(), 3);
    assert_eq!(r.kms_token(), Some(&token(b"rewrapped")));
    assert_eq!(r.meta.tokens.len(), 1, "the token was replaced, not added");
    flip(&b, 4096 + 20);
    let s = Header::read(&b).expect("secondary");
    assert_eq!(s.which_copy_used(), Copy::Secondary);
    assert_eq!(s.seqid(), 3);
    assert_eq!(s.meta, r.meta);
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Write(u64),
    Flush,
}

/// A memory backing that records writes and flushes.
struct Recorder {
    inner: MemBacking,
    ops: Mutex<Vec<Op>>,
}

impl Recorder {
    fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().expect("not poisoned"))
    }
}

impl Backing for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), BackingError> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), BackingError> {
        self.ops
            .lock()
            .expect("not poisoned")
            .push(Op::Write(offset));
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> Result<(), BackingError> {
        self.ops.lock().expect("not poisoned").push(Op::Flush);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.inner.punch_hole(offset, len)
    }
    fn size(&self) -> Result<u64, BackingError> {
        self.inner.size()
    }
    fn set_size(&self, size: u64) -> Result<(), BackingError> {
        self.inner.set_size(size)
    }
    fn name(&self) -> String {
        "recorder".into()
    }
}

#[test]
fn write_puts_the_older_copy_first_with_a_flush_between() {
    let (b, _) = formatted();
    let rec = Recorder {
        inner: b,
        ops: Mutex::new(Vec::new()),
    };
    let mut h = Header::read(&rec).expect("read");
    h.write(&rec).expect("write");
    let s = DEFAULT_HDR_SIZE;
    assert_eq!(
        rec.take(),
        [Op::Write(s), Op::Flush, Op::Write(0), Op::Flush]
    );
    h.write(&rec).expect("write");
    assert_eq!(
        rec.take(),
        [Op::Write(0), Op::Flush, Op::Write(s), Op::Flush]
    );

    // Primary damaged: the secondary is the newest valid copy, so the primary goes first.
    flip(&rec.inner, 4096 + 3);
    let mut h = Header::read(&rec).expect("read");
    assert_eq!(h.which_copy_used(), Copy::Secondary);
    h.write(&rec).expect("write");
    assert_eq!(
        rec.take(),
        [Op::Write(0), Op::Flush, Op::Write(s), Op::Flush]
    );
    assert_eq!(
        Header::read(&rec).expect("repaired").which_copy_used(),
        Copy::Primary
    );
}

/// A crash at any point of an update, including a torn write of either copy, leaves a
/// header that reads back as either the old or the new version.
#[test]
fn torn_updates_leave_old_or_new_header() {
    let (b, h) = formatted();
    let before = b.snapshot();
    let mut new = h.clone();
    new.set_kms_token(token(b"new"));
    new.write(&b).expect("write");
    let after = b.snapshot();
    // The update wrote the secondary first, then the primary.
    let writes = [(HDR, 2 * HDR), (0, HDR)];
    for (i, &(start, end)) in writes.iter().enumerate() {
        for torn in (0..=HDR).step_by(512) {
            let mut image = before.clone();
            for &(s, e) in &writes[..i] {
                image[s..e].copy_from_slice(&after[s..e]);
            }
            image[start..start + torn].copy_from_slice(&after[start..start + torn]);
            assert_eq!(end - start, HDR);
            let r = Header::read(&MemBacking::from_bytes(image)).expect("a valid copy survives");
            let t = r.kms_token().expect("token").ciphertext_blob.clone();
            match r.seqid() {
                1 => assert_eq!(t, b"blob"),
                2 => assert_eq!(t, b"new"),
                other => panic!("seqid {other}"),
            }
            if i == 1 {
                assert_eq!(
                    r.seqid(),
                    2,
                    "once the first copy is flushed the update is durable"
                );
            }
        }
    }
}

#[test]
fn damaged_primary_falls_back_to_secondary() {
    // JSON area byte, checksum field byte, label byte, magic byte.
    for offset in [4096 + 10, 448, 30, 0] {
        let (b, h) = formatted();
        flip(&b, offset);
        let r = Header::read(&b).expect("secondary copy");
        assert_eq!(r.which_copy_used(), Copy::Secondary, "offset {offset}");
        assert_eq!(r.uuid(), h.uuid());
        r.verify_key(&key(1)).expect("right key");
    }
}

#[test]
fn newer_valid_secondary_wins() {
    let (b, mut h) = formatted();
    h.seqid = 5;
    h.set_kms_token(token(b"newer"));
    let json = serde_json::to_vec(&h.meta).expect("json");
    force_copy(&b, &h, Copy::Secondary, &json);
    let r = Header::read(&b).expect("read");
    assert_eq!((r.which_copy_used(), r.seqid()), (Copy::Secondary, 5));
    assert_eq!(r.kms_token().expect("token").ciphertext_blob, b"newer");
}

#[test]
fn both_damaged_names_both_reasons() {
    let (b, _) = formatted();
    flip(&b, 4096 + 10);
    flip(&b, HDR as u64 + 4096 + 10);
    match Header::read(&b) {
        Err(Luks2Error::BothCopiesInvalid { primary, secondary }) => {
            assert!(primary.contains("checksum"), "{primary}");
            assert!(secondary.contains("checksum"), "{secondary}");
        }
        other => panic!("{other:?}"),
    }
    // Primary checksum bad, secondary magic gone.
    flip(&b, HDR as u64);
    let err = Header::read(&b).expect_err("both bad");
    let msg = err.to_string();
    assert!(msg.contains("primary: header checksum mismatch"), "{msg}");
    assert!(msg.contains("secondary: no LUKS2 header magic"), "{msg}");
}

#[test]
fn bad_json_in_both_copies() {
    let (b, h) = formatted();
    force_copy(&b, &h, Copy::Primary, b"{\"keyslots\": [");
    force_copy(&b, &h, Copy::Secondary, b"{}");
    match Header::read(&b) {
        Err(Luks2Error::BothCopiesInvalid { primary, secondary }) => {
            assert!(primary.contains("malformed LUKS2 JSON"), "{primary}");
            assert!(secondary.contains("missing field"), "{secondary}");
        }
        other => panic!("{other:?}"),
    }
    // Structurally inconsistent: the digest names a segment that does not exist.
    let mut bad = h.clone();
    bad.meta.digests.get_mut(&0).expect("digest 0").segments = vec![7];
    force_both(&b, &bad);
    let msg = Header::read(&b).expect_err("dangling").to_string();
    assert!(
        msg.contains("missing segment 7") || msg.contains("has 0 digests"),
        "{msg}"
    );
}

#[test]
fn truncated_files() {
    let (b, _) = formatted();
    let full = b.snapshot();
    for len in [10_000, HDR + 100, 2 * HDR, 16 * 1024 * 1024 + 4096] {
        let t = MemBacking::from_bytes(full[..len].to_vec());
        let err = Header::read(&t).expect_err("truncated");
        assert!(matches!(err, Luks2Error::Truncated), "len {len}: {err}");
        assert!(err.to_string().contains("truncated"));
    }
    assert!(matches!(
        Header::read(&MemBacking::new(0)),
        Err(Luks2Error::NotLuks)
    ));
    assert!(matches!(
        Header::read(&MemBacking::from_bytes(full[..3].to_vec())),
        Err(Luks2Error::NotLuks)
    ));
}

#[test]
fn wrong_magic_is_not_luks() {
    assert!(matches!(
        Header::read(&MemBacking::new(20 << 20)),
        Err(Luks2Error::NotLuks)
    ));
    let (b, _) = formatted();
    b.write_at(b"NOPE", 0).expect("write");
    b.write_at(b"NOPE", HDR as u64).expect("write");
    let err = Header::read(&b).expect_err("no magic");
    assert!(matches!(err, Luks2Error::NotLuks), "{err}");
    assert!(!is_luks(&b));
    assert!(!is_luks(&MemBacking::new(0)));
    // Only the primary magic gone: still a LUKS2 volume, as for cryptsetup.
    let (b, _) = formatted();
    b.write_at(b"NOPE", 0).expect("write");
    assert!(is_luks(&b));
    // A stray secondary magic in plain data is not a LUKS2 volume.
    let plain = MemBacking::new(1 << 20);
    plain.write_at(b"SKUL\xba\xbe", 0x4000).expect("write");
    assert!(!is_luks(&plain));
    assert_eq!(
        Header::read(&b).expect("secondary").which_copy_used(),
        Copy::Secondary
    );
}

#[test]
fn luks1_is_unsupported() {
    let (b, _) = formatted();
    b.write_at(&[0, 1], 6).expect("write");
    b.write_at(b"NOPE", HDR as u64).expect("write");
    let err = Header::read(&b).expect_err("luks1");
    assert!(err.to_string().contains("LUKS version 1"), "{err}");
}

#[test]
fn unsupported_cipher_sector_size_and_requirement() {
    let (b, h) = formatted();
    type Change = fn(&mut Header);
    let cases: [(&str, Change); 4] = [
        ("aes-cbc-essiv:sha256", |h| {
            h.meta.segments.get_mut(&0).expect("seg").encryption =
                Some("aes-cbc-essiv:sha256".into())
        }),
        ("sector size 1024", |h| {
            h.meta.segments.get_mut(&0).expect("seg").sector_size = Some(1024)
        }),
        ("online-reencrypt-v2", |h| {
            h.set_mandatory_requirement("online-reencrypt-v2")
        }),
        ("iv_tweak", |h| {
            h.meta.segments.get_mut(&0).expect("seg").iv_tweak = Some(8)
        }),
    ];
    for (needle, change) in cases {
        let mut bad = h.clone();
        change(&mut bad);
        force_both(&b, &bad);
        let err = Header::read(&b).expect_err(needle);
        assert!(
            matches!(err, Luks2Error::Unsupported { .. }),
            "{needle}: {err}"
        );
        assert!(err.to_string().contains(needle), "{err}");
        // And write refuses to put such a header on disk.
        assert!(bad.write(&b).is_err());
    }
}

#[test]
fn unsupported_key_size_in_a_cryptsetup_keyslot() {
    let (b, h) = formatted();
    let mut bad = h.clone();
    let slot: Keyslot = serde_json::from_value(serde_json::json!({
        "type": "luks2", "key_size": 32,
        "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
        "area": {"type": "raw", "offset": "32768", "size": "131072", "encryption": "aes-xts-plain64", "key_size": 64},
        "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "AAAA"}
    }))
    .expect("keyslot");
    bad.meta.keyslots.insert(0, slot);
    bad.meta.digests.get_mut(&0).expect("digest").keyslots = vec![0];
    force_both(&b, &bad);
    let err = Header::read(&b).expect_err("256-bit key");
    assert!(err.to_string().contains("256 bits"), "{err}");
}

#[test]
fn invalid_format_params() {
    let b = MemBacking::new(0);
    let bad = [
        FormatParams {
            sector_size: 1024,
            ..params()
        },
        FormatParams {
            data_size: 4097,
            ..params()
        },
        FormatParams {
            data_size: 0,
            ..params()
        },
        FormatParams {
            data_size: u64::MAX - 4095,
            ..params()
        },
        FormatParams {
            label: "x".repeat(48),
            ..params()
        },
    ];
    for p in bad {
        assert!(
            matches!(
                Header::format(&b, &key(1), &p),
                Err(Luks2Error::InvalidParams(_))
            ),
            "{p:?}"
        );
    }
    let huge = FormatParams {
        token: Some(token(&[7; 12 * 1024])),
        ..params()
    };
    assert!(matches!(
        Header::format(&b, &key(1), &huge),
        Err(Luks2Error::JsonTooLarge { .. })
    ));
}

#[test]
fn journal_area_is_the_free_keyslots_area() {
    let (_, mut h) = formatted();
    assert_eq!(journal_area(&h), 2 * DEFAULT_HDR_SIZE..DEFAULT_DATA_OFFSET);
    // A break-glass passphrase keyslot (as cryptsetup luksAddKey places it).
    let slot: Keyslot = serde_json::from_value(serde_json::json!({
        "type": "luks2", "key_size": 64,
        "af": {"type": "luks1", "stripes": 4000, "hash": "sha256"},
        "area": {"type": "raw", "offset": "32768", "size": "258048", "encryption": "aes-xts-plain64", "key_size": 64},
        "kdf": {"type": "pbkdf2", "hash": "sha256", "iterations": 1000, "salt": "AAAA"}
    }))
    .expect("keyslot");
    h.meta.keyslots.insert(0, slot);
    assert_eq!(journal_area(&h), 32768 + 258_048..DEFAULT_DATA_OFFSET);
}

/// What the rekey code will do: the first 4 KiB under the new key (digest returned),
/// the rest under the old one, a state token and the mandatory requirement.
fn start_rekey(h: &mut Header, new: &VolumeKey) -> u32 {
    let new_id = h.add_digest_for(new);
    let whole = h.segments()[&0].clone();
    let data = match whole.size {
        SegmentSize::Bytes(n) => n,
        SegmentSize::Dynamic => panic!("sealvol formats fixed sizes"),
    };
    let mut first = whole.clone();
    first.size = SegmentSize::Bytes(4096);
    let mut rest = whole;
    rest.offset += 4096;
    rest.size = SegmentSize::Bytes(data - 4096);
    h.segments_mut().insert(0, first);
    h.segments_mut().insert(1, rest);
    h.digests_mut().get_mut(&0).expect("old").segments = vec![1];
    h.digests_mut().get_mut(&new_id).expect("new").segments = vec![0];
    h.set_mandatory_requirement(REKEY_REQUIREMENT);
    h.set_mandatory_requirement(REKEY_REQUIREMENT);
    let mut state = serde_json::Map::new();
    state.insert("offset".into(), Value::String("4096".into()));
    h.set_token("sealvol-rekey", state);
    new_id
}

/// And how it finishes: one segment under the new key, the old digest gone.
fn finish_rekey(h: &mut Header, new_id: u32, data: u64) {
    let mut whole = h.segments()[&0].clone();
    whole.size = SegmentSize::Bytes(data);
    h.segments_mut().clear();
    h.segments_mut().insert(0, whole);
    h.digests_mut().remove(&0);
    h.clear_mandatory_requirement(REKEY_REQUIREMENT);
    assert!(h.remove_token("sealvol-rekey"));
    assert_eq!(h.digests().len(), 1);
    assert!(h.digests().contains_key(&new_id));
}

#[test]
fn rekey_helpers_two_keys_requirement_and_state_token() {
    let (b, mut h) = formatted();
    let new_id = start_rekey(&mut h, &key(7));
    assert_eq!(new_id, 1);
    h.write(&b).expect("write");

    let r = Header::read(&b).expect("read");
    assert_eq!(r.mandatory_requirements(), [REKEY_REQUIREMENT.to_string()]);
    assert_eq!(r.data_offset(), DEFAULT_DATA_OFFSET);
    assert_eq!(r.data_size(b.size().expect("size")), DATA);
    r.verify_key_against(new_id, &key(7)).expect("new key");
    r.verify_key_against(0, &key(1)).expect("old key");
    r.verify_key(&key(7)).expect("segment 0 uses the new key");
    assert!(matches!(
        r.verify_key_against(0, &key(7)),
        Err(Luks2Error::DigestMismatch)
    ));
    assert!(matches!(
        r.verify_key_against(9, &key(7)),
        Err(Luks2Error::NoSuchDigest(9))
    ));
    assert_eq!(r.token("sealvol-rekey").expect("state")["offset"], "4096");
    assert_eq!(
        r.token("sealvol-rekey").expect("state")["keyslots"],
        Value::Array(vec![])
    );
    assert_eq!(r.kms_token(), Some(&token(b"blob")));

    let mut done = r.clone();
    done.clear_mandatory_requirement(REKEY_REQUIREMENT);
    assert!(done.remove_token("sealvol-rekey"));
    assert!(!done.remove_token("sealvol-rekey"));
    done.write(&b).expect("write");
    let r = Header::read(&b).expect("read");
    assert!(r.mandatory_requirements().is_empty());
    assert!(r.meta.config.requirements.is_none());
    assert!(r.token("sealvol-rekey").is_none());

    // A header with a crypt segment and no digest for it is never written.
    let mut broken = r.clone();
    broken.digests_mut().clear();
    assert!(matches!(broken.write(&b), Err(Luks2Error::BadJson(_))));
    Header::read(&b).expect("still valid");
}

/// The typed checkpoint steps: `begin_rekey` adds the new digest, the requirement and
/// the token; `checkpoint_rekey` replaces the token; `finish_rekey` leaves a plain header
/// under the new key with the new KMS token. A token that does not parse is an error.
#[test]
fn rekey_checkpoint_begin_step_finish() {
    let (b, mut h) = formatted();
    assert!(!h.rekey_in_progress());
    assert_eq!(h.rekey_state().expect("no token"), None);
    let plan = RekeyPlan {
        hotzone_bytes: 65536,
        new_kms_token: Some(token(b"new")),
        resilience: Resilience::Checksum,
    };
    let mut st = h.begin_rekey(&b, &key(7), plan).expect("begin");
    let r = Header::read(&b).expect("read");
    assert!(r.rekey_in_progress());
    assert_eq!(r.rekey_state().expect("parses"), Some(st.clone()));
    assert_eq!(r.mandatory_requirements(), [REKEY_REQUIREMENT.to_string()]);
    r.verify_key(&key(1))
        .expect("the segment stays under the old key");
    r.verify_key_against(st.new_digest, &key(7))
        .expect("new digest");
    st.boundary = 65536;
    st.journal = Some(JournalRecord {
        zone_start: 65536,
        len: 65536,
        offset: journal_area(&h).start,
        blake3: "00".into(),
    });
    h.checkpoint_rekey(&b, &st).expect("checkpoint");
    let r = Header::read(&b).expect("read");
    assert_eq!(r.rekey_state().expect("parses"), Some(st.clone()));
    assert_eq!(
        st.progress(DATA),
        Progress {
            done: 65536,
            total: DATA
        }
    );
    h.finish_rekey(&b, &st).expect("finish");
    let r = Header::read(&b).expect("read");
    assert!(!r.rekey_in_progress());
    assert_eq!(r.rekey_state().expect("no token"), None);
    assert!(r.mandatory_requirements().is_empty());
    r.verify_key(&key(7)).expect("new key");
    assert!(matches!(
        r.verify_key(&key(1)),
        Err(Luks2Error::DigestMismatch)
    ));
    assert_eq!(r.kms_token(), Some(&token(b"new")));

    let mut bad = r.clone();
    bad.set_token(REKEY_TOKEN_TYPE, serde_json::Map::new());
    assert!(bad.rekey_in_progress());
    assert!(matches!(
        bad.rekey_state(),
        Err(Luks2Error::BadRekeyToken(_))
    ));
}

#[test]
fn dynamic_segment_size_follows_the_backing() {
    let (b, mut h) = formatted();
    h.meta.segments.get_mut(&0).expect("seg").size = SegmentSize::Dynamic;
    h.write(&b).expect("write");
    let r = Header::read(&b).expect("read");
    assert_eq!(r.data_size(DEFAULT_DATA_OFFSET + 3 * 4096 + 100), 3 * 4096);
    assert_eq!(r.data_size(100), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random corruptions and truncations of a valid header never panic; when reading
    /// succeeds, the header is one of the two versions that were written.
    #[test]
    fn corruption_never_panics(
        flips in proptest::collection::vec((0usize..2 * HDR, any::<u8>()), 0..8),
        cut in proptest::option::of(0usize..2 * HDR + 64),
    ) {
        let (b, h) = formatted();
        let mut head = b.snapshot();
        head.truncate(2 * HDR);
        for (at, x) in flips {
            head[at] ^= x;
        }
        let full = MemBacking::from_bytes(head.clone());
        match cut {
            Some(len) => {
                head.truncate(len);
                let t = MemBacking::from_bytes(head);
                let _ = Header::read(&t);
                let _ = is_luks(&t);
            }
            None => {
                full.set_size(DEFAULT_DATA_OFFSET + DATA).expect("grow");
                if let Ok(r) = Header::read(&full) {
                    prop_assert_eq!(r.uuid(), h.uuid());
                    prop_assert_eq!(&r.meta, &h.meta);
                }
            }
        }
    }

    /// Random JSON that parses as the model but is semantically odd never panics.
    #[test]
    fn odd_numbers_never_panic(offset in any::<u64>(), size in any::<u64>(), ks in any::<u64>(), sector in any::<u32>()) {
        let (b, h) = formatted();
        let mut odd = h.clone();
        let seg = odd.meta.segments.get_mut(&0).expect("seg");
        seg.offset = offset;
        seg.size = SegmentSize::Bytes(size);
        seg.sector_size = Some(sector);
        odd.meta.config.keyslots_size = ks;
        force_both(&b, &odd);
        if let Ok(r) = Header::read(&b) {
            let _ = (r.data_size(u64::MAX), r.data_offset(), journal_area(&r));
        }
    }
}

/// The cryptsetup binary, or `None` (skip, with the reason printed) outside `CI=true`.
fn cryptsetup_or_skip() -> Option<std::path::PathBuf> {
    let found = [
        "/usr/sbin/cryptsetup",
        "/sbin/cryptsetup",
        "/usr/bin/cryptsetup",
    ]
    .map(std::path::PathBuf::from)
    .into_iter()
    .find(|p| p.is_file());
    if found.is_none() {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "cryptsetup missing under CI=true"
        );
        eprintln!("SKIP: cryptsetup not found (apt-get install -y cryptsetup-bin)");
    }
    found
}

/// The rekey-in-progress header is one cryptsetup reads (isLuks, luksDump) but refuses to
/// use; once the rekey finishes, cryptsetup accepts the new key.
#[test]
fn cryptsetup_reads_but_refuses_a_rekey_in_progress() {
    let Some(cs) = cryptsetup_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vol");
    let b = FileBacking::create(&path, false).expect("create");
    let mut h = Header::format(&b, &key(1), &params()).expect("format");
    let new_id = start_rekey(&mut h, &key(7));
    h.write(&b).expect("write");
    let (new_key, pass) = (dir.path().join("new.key"), dir.path().join("pass"));
    std::fs::write(&new_key, key(7).expose()).expect("write");
    std::fs::write(&pass, "pw").expect("write");
    let run = |args: &[&std::ffi::OsStr]| {
        let out = std::process::Command::new(&cs)
            .args(args)
            .output()
            .expect("cryptsetup runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let add_key = || {
        run(&[
            "luksAddKey".as_ref(),
            "-q".as_ref(),
            "--key-size".as_ref(),
            "512".as_ref(),
            "--volume-key-file".as_ref(),
            new_key.as_os_str(),
            "--pbkdf".as_ref(),
            "pbkdf2".as_ref(),
            "--pbkdf-force-iterations".as_ref(),
            "1000".as_ref(),
            "--new-keyfile".as_ref(),
            pass.as_os_str(),
            path.as_os_str(),
        ])
    };
    assert!(run(&["isLuks".as_ref(), path.as_os_str()]).0);
    let (ok, dump) = run(&["luksDump".as_ref(), path.as_os_str()]);
    assert!(ok, "{dump}");
    assert!(dump.contains("Requirements:\tsealvol-rekey-v1"), "{dump}");
    assert!(
        dump.contains("1: crypt") && dump.contains("sealvol-rekey"),
        "{dump}"
    );
    let (ok, out) = add_key();
    assert!(
        !ok && out.contains("requirements"),
        "cryptsetup must refuse: {out}"
    );

    finish_rekey(&mut h, new_id, DATA);
    h.write(&b).expect("write");
    let (ok, out) = add_key();
    assert!(ok, "the new key is the volume key now: {out}");
    Header::read(&b)
        .expect("read")
        .verify_key(&key(7))
        .expect("new key");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Header update sequences: token replacements, plain rewrites, re-reads and damage
    /// to one copy between updates, in any order. After every step the header read back
    /// is the last one written (seqid, token, uuid), and a write heals a damaged copy.
    #[test]
    fn update_sequences_read_back_the_last_write(
        ops in proptest::collection::vec((0u8..4, any::<u8>(), 0usize..300, 0usize..HDR - 4096), 1..16),
    ) {
        let (b, mut h) = formatted();
        let uuid = h.uuid().to_owned();
        let mut want_token = h.kms_token().cloned();
        let mut want_seq = h.seqid();
        let mut damaged: Option<u64> = None;
        for (kind, seed, n, at) in ops {
            match kind {
                0 => {
                    let t = token(&vec![seed; n]);
                    h.set_kms_token(t.clone());
                    h.write(&b).expect("token update");
                    want_seq += 1;
                    want_token = Some(t);
                    damaged = None;
                }
                1 => {
                    h.write(&b).expect("rewrite");
                    want_seq += 1;
                    damaged = None;
                }
                2 => {
                    // Damage the JSON area of one copy (never both).
                    let copy_base = if seed & 1 == 0 { 0 } else { HDR as u64 };
                    if damaged.is_none_or(|d| d == copy_base) {
                        flip(&b, copy_base + 4096 + at as u64);
                        damaged = Some(copy_base);
                    }
                }
                _ => h = Header::read(&b).expect("re-read"),
            }
            let r = Header::read(&b).expect("one valid copy always remains");
            prop_assert_eq!(r.seqid(), want_seq);
            prop_assert_eq!(r.uuid(), uuid.as_str());
            prop_assert_eq!(r.kms_token().cloned(), want_token.clone());
            if damaged.is_none() {
                // Both copies valid and identical in content.
                let p = read_copy(&b, 0, b.size().expect("size"), Copy::Primary).expect("primary valid");
                let s = read_copy(&b, HDR as u64, b.size().expect("size"), Copy::Secondary).expect("secondary valid");
                prop_assert_eq!(p.bin.seqid, s.bin.seqid);
                prop_assert_eq!(p.meta, s.meta);
            }
        }
    }
}
