//! The `sealvol-kms` token: arbitrary JSON as the typed `KmsToken` and as token 0 of an
//! otherwise valid, checksummed LUKS2 header. Oracle: never a panic; a token the header
//! parser accepts is exactly what `KmsToken` deserialization gives for the same object
//! (minus `type`/`keyslots`), and typed tokens round-trip through JSON.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use sealvol::luks2::{FormatParams, Header, KmsToken};
use sealvol::secret::VolumeKey;
use sealvol_fuzz::{SparseBacking, reseal};
use serde_json::Value;

const HDR: usize = 16 * 1024;

/// A formatted header image (both copies) and its JSON metadata.
fn template() -> &'static (Vec<u8>, Value, u64) {
    static T: OnceLock<(Vec<u8>, Value, u64)> = OnceLock::new();
    T.get_or_init(|| {
        let b = SparseBacking::new(Vec::new(), 0);
        let token = KmsToken {
            key_arn: "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab".into(),
            ciphertext_blob: vec![1, 2, 3],
            encryption_context: [("aws:ebs:id".to_owned(), "vol-1".to_owned())].into(),
            volume_kind: "user".into(),
            volume_id: "vol-1".into(),
            workspace_id: "ws-1".into(),
        };
        let params = FormatParams { data_size: 1 << 20, sector_size: 4096, label: "fuzz".into(), token: Some(token) };
        Header::format(&b, &VolumeKey::generate(), &params).expect("format");
        let size = b.size_hint();
        let mut image = b.bytes();
        image.truncate(2 * HDR);
        let end = image[4096..HDR].iter().position(|&c| c == 0).expect("NUL");
        let meta: Value = serde_json::from_slice(&image[4096..4096 + end]).expect("json");
        (image, meta, size)
    })
}

trait SizeHint {
    fn size_hint(&self) -> u64;
}
impl SizeHint for SparseBacking {
    fn size_hint(&self) -> u64 {
        sealvol::backing::Backing::size(self).expect("size")
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = serde_json::from_slice::<KmsToken>(data) {
        let v = serde_json::to_value(&t).expect("serializes");
        let back: KmsToken = serde_json::from_value(v).expect("round-trips");
        assert_eq!(back, t);
    }
    let Ok(fuzzed) = serde_json::from_slice::<Value>(data) else { return };
    let (image, meta, size) = template();
    let mut meta = meta.clone();
    meta["tokens"]["0"] = fuzzed.clone();
    let json = serde_json::to_vec(&meta).expect("serializes");
    if json.len() >= HDR - 4096 {
        return;
    }
    let mut image = image.clone();
    for copy in 0..2 {
        let area = &mut image[copy * HDR + 4096..(copy + 1) * HDR];
        area.fill(0);
        area[..json.len()].copy_from_slice(&json);
    }
    // Reseal both copies (the secondary sits at hdr_size).
    reseal(&mut image);
    let backing = SparseBacking::new(image, *size);
    let Ok(h) = Header::read(&backing) else { return };
    if let Some(tok) = h.kms_token() {
        let mut obj = fuzzed.as_object().expect("an accepted token is an object").clone();
        obj.remove("type");
        obj.remove("keyslots");
        let typed: KmsToken = serde_json::from_value(Value::Object(obj)).expect("the header accepted it");
        assert_eq!(&typed, tok);
    }
});
