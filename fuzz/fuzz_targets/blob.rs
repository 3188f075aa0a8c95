//! Ciphertext-blob parser. Oracle: never a panic; a parsed blob names a canonical
//! hyphenated UUID; arbitrary bytes never authenticate under a key they were not sealed
//! with; and sealing the input as plaintext round-trips.
#![no_main]

use kms_daemon::EncryptionContext;
use kms_daemon::blob::{CiphertextBlob, SymmetricKey, seal};
use libfuzzer_sys::fuzz_target;

const ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

fuzz_target!(|data: &[u8]| {
    let key = SymmetricKey::from_bytes([7u8; 32]);
    let ctx = EncryptionContext::from_pairs([("aws:ebs:id", "vol-1")]);
    if let Ok(p) = CiphertextBlob::parse(data) {
        assert_eq!(p.key_id.len(), 36);
        assert!(p.key_id.bytes().all(|c| c == b'-' || c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert!(p.open(&key, &ctx).is_err(), "forged blob authenticated");
    }
    if data.len() <= 4096 {
        let v = data.first().copied().map_or(0, u32::from);
        let b = seal(ID, v, &key, &ctx, data);
        let p = CiphertextBlob::parse(&b).expect("own blobs parse");
        assert_eq!(p.key_id, ID);
        assert_eq!(p.material_version, v);
        assert_eq!(p.open(&key, &ctx).expect("opens").as_slice(), data);
        assert!(p.open(&key, &EncryptionContext::new()).is_err());
    }
});
