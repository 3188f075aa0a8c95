//! Typed serde model of the LUKS2 JSON area.
//!
//! The model follows the layout cryptsetup writes (see `docs/on-disk-format-luks2.pdf` in
//! the cryptsetup sources): numbers that may exceed 2^53 (offsets, sizes, `iv_tweak`,
//! `json_size`, `keyslots_size`) are decimal strings, object keys are decimal ids, binary
//! values are standard base64 with padding.
//!
//! Parsing is strict where sealvol relies on a value (segments, digests, config, the
//! `sealvol-kms` token: unknown fields are errors, so nothing is silently dropped on
//! rewrite) and preserving where it does not: keyslots and tokens of other types, or
//! `luks2` keyslots with fields this model does not know, are kept as raw
//! [`serde_json::Value`] and written back unchanged.

use std::collections::BTreeMap;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::KmsToken;

/// The whole JSON area.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Metadata {
    /// Passphrase (or other) keyslots by id (0..32).
    pub(crate) keyslots: BTreeMap<u32, Keyslot>,
    /// Tokens by id (0..32).
    pub(crate) tokens: BTreeMap<u32, Token>,
    /// Data segments by id.
    pub(crate) segments: BTreeMap<u32, Segment>,
    /// Volume-key digests by id.
    pub(crate) digests: BTreeMap<u32, Digest>,
    /// Area sizes, flags and requirements.
    pub(crate) config: Config,
}

/// A keyslot: typed when it is a plain `luks2` keyslot this model fully understands,
/// otherwise kept verbatim.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Keyslot {
    /// A `luks2` keyslot (passphrase-protected copy of the volume key).
    Luks2(Luks2Keyslot),
    /// Any other keyslot (`reencrypt`, future types, unknown fields), preserved as is.
    Other(Value),
}

/// The `type` tag of a `luks2` keyslot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Luks2Tag {
    /// `"luks2"`.
    #[serde(rename = "luks2")]
    Luks2,
}

/// A `luks2` keyslot as cryptsetup writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Luks2Keyslot {
    #[serde(rename = "type")]
    pub(crate) kind: Luks2Tag,
    /// Size of the volume key this slot stores, in bytes.
    pub(crate) key_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) priority: Option<i32>,
    pub(crate) af: AntiForensic,
    pub(crate) area: KeyslotArea,
    pub(crate) kdf: Kdf,
}

/// Anti-forensic splitter parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AntiForensic {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    pub(crate) stripes: u32,
    pub(crate) hash: String,
}

/// Where a keyslot's encrypted key material lives in the keyslots area.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct KeyslotArea {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    #[serde(with = "u64_str")]
    pub(crate) offset: u64,
    #[serde(with = "u64_str")]
    pub(crate) size: u64,
    pub(crate) encryption: String,
    pub(crate) key_size: u32,
}

/// Passphrase key-derivation function of a keyslot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Kdf {
    /// PBKDF2.
    Pbkdf2 {
        hash: String,
        iterations: u32,
        salt: String,
    },
    /// Argon2i.
    Argon2i {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: String,
    },
    /// Argon2id.
    Argon2id {
        time: u32,
        memory: u32,
        cpus: u32,
        salt: String,
    },
}

/// The `type` of the token sealvol stores its wrapped data key in.
pub(crate) const KMS_TOKEN_TYPE: &str = "sealvol-kms";

/// A token: the `sealvol-kms` token typed, every other type kept verbatim.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token {
    /// `"type": "sealvol-kms"`.
    Kms(KmsToken),
    /// Any other token (`sealvol-rekey`, `systemd-tpm2`, ...), preserved as is.
    Other(Value),
}

impl Token {
    /// The token's `type` string.
    pub(crate) fn kind(&self) -> &str {
        match self {
            Self::Kms(_) => KMS_TOKEN_TYPE,
            Self::Other(v) => v.get("type").and_then(Value::as_str).unwrap_or(""),
        }
    }
}

impl Serialize for Token {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Other(v) => v.serialize(s),
            Self::Kms(t) => {
                let mut obj = match serde_json::to_value(t).map_err(serde::ser::Error::custom)? {
                    Value::Object(m) => m,
                    _ => {
                        return Err(serde::ser::Error::custom(
                            "KmsToken must serialize to an object",
                        ));
                    }
                };
                obj.insert("type".into(), Value::String(KMS_TOKEN_TYPE.into()));
                obj.insert("keyslots".into(), Value::Array(Vec::new()));
                Value::Object(obj).serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for Token {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        let Value::Object(mut obj) = value else {
            return Err(D::Error::custom("a token must be a JSON object"));
        };
        let kind = match obj.get("type") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(D::Error::custom("a token needs a string \"type\"")),
        };
        match obj.get("keyslots") {
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => {}
            _ => {
                return Err(D::Error::custom(format!(
                    "token of type {kind:?} needs a \"keyslots\" array of strings"
                )));
            }
        }
        if kind != KMS_TOKEN_TYPE {
            return Ok(Self::Other(Value::Object(obj)));
        }
        if obj
            .get("keyslots")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty())
        {
            return Err(D::Error::custom(
                "the sealvol-kms token must not be bound to keyslots",
            ));
        }
        obj.remove("type");
        obj.remove("keyslots");
        serde_json::from_value(Value::Object(obj))
            .map(Self::Kms)
            .map_err(|e| D::Error::custom(format!("sealvol-kms token: {e}")))
    }
}

/// Segment types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SegmentKind {
    /// Encrypted data.
    Crypt,
    /// Plain data (used by reencryption).
    Linear,
}

/// Length of a segment: a byte count, or up to the end of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SegmentSize {
    /// `"dynamic"`: the segment extends to the end of the device.
    Dynamic,
    /// A fixed number of bytes.
    Bytes(u64),
}

impl Serialize for SegmentSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Dynamic => s.serialize_str("dynamic"),
            Self::Bytes(n) => s.serialize_str(&n.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for SegmentSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "dynamic" {
            Ok(Self::Dynamic)
        } else {
            parse_decimal(&s).map(Self::Bytes).map_err(D::Error::custom)
        }
    }
}

/// A data segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Segment {
    #[serde(rename = "type")]
    pub(crate) kind: SegmentKind,
    /// Byte offset of the segment on the device.
    #[serde(with = "u64_str")]
    pub(crate) offset: u64,
    pub(crate) size: SegmentSize,
    /// IV offset in 512-byte units (crypt only).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_u64_str")]
    pub(crate) iv_tweak: Option<u64>,
    /// dm-crypt cipher spec (crypt only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) encryption: Option<String>,
    /// Encryption sector size in bytes (crypt only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) sector_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) integrity: Option<Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) flags: Vec<String>,
}

/// A volume-key digest (LUKS2 knows only `pbkdf2`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Digest {
    #[serde(rename = "type")]
    pub(crate) kind: String,
    /// Keyslots holding the key this digest checks.
    #[serde(with = "id_list")]
    pub(crate) keyslots: Vec<u32>,
    /// Segments encrypted with the key this digest checks.
    #[serde(with = "id_list")]
    pub(crate) segments: Vec<u32>,
    pub(crate) hash: String,
    pub(crate) iterations: u32,
    #[serde(with = "b64")]
    pub(crate) salt: Vec<u8>,
    #[serde(with = "b64")]
    pub(crate) digest: Vec<u8>,
}

/// The `config` object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Size of the JSON area (`hdr_size - 4096`).
    #[serde(with = "u64_str")]
    pub(crate) json_size: u64,
    /// Size of the keyslots area that follows the two header copies.
    #[serde(with = "u64_str")]
    pub(crate) keyslots_size: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) flags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) requirements: Option<Requirements>,
}

/// `config.requirements`: features a reader must implement to use the volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Requirements {
    #[serde(default)]
    pub(crate) mandatory: Vec<String>,
}

/// Parses a decimal string of digits only (no sign, no spaces), as cryptsetup does.
pub(crate) fn parse_decimal(s: &str) -> Result<u64, String> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("expected a decimal number as a string, got {s:?}"));
    }
    s.parse::<u64>()
        .map_err(|_| format!("number {s:?} is out of range"))
}

/// `u64` as a decimal JSON string.
pub(crate) mod u64_str {
    use serde::de::Error as _;

    use super::{Deserialize, Deserializer, Serializer, parse_decimal};

    pub(crate) fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = String::deserialize(d)?;
        parse_decimal(&s).map_err(D::Error::custom)
    }
}

/// `Option<u64>` as an optional decimal JSON string.
pub(crate) mod opt_u64_str {
    use serde::de::Error as _;

    use super::{Deserialize, Deserializer, Serializer, parse_decimal};

    // serde's `with` passes `&Option<u64>`; the signature is fixed by serde.
    #[allow(clippy::ref_option)]
    pub(crate) fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_str(&n.to_string()),
            None => s.serialize_none(),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        let s = String::deserialize(d)?;
        parse_decimal(&s).map(Some).map_err(D::Error::custom)
    }
}

/// A list of ids as JSON strings: `["0", "1"]`.
pub(crate) mod id_list {
    use serde::de::Error as _;

    use super::{Deserialize, Deserializer, Serializer, parse_decimal};

    pub(crate) fn serialize<S: Serializer>(ids: &[u32], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(ids.iter().map(u32::to_string))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| {
                let n = parse_decimal(s).map_err(D::Error::custom)?;
                u32::try_from(n).map_err(|_| D::Error::custom(format!("id {s:?} is out of range")))
            })
            .collect()
    }
}

/// Bytes as standard base64 with padding (what cryptsetup writes).
pub(crate) mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;

    use super::{Deserialize, Deserializer, Serializer};
    use serde::de::Error as _;

    /// Serializes bytes as a base64 string.
    pub(crate) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    /// Deserializes a base64 string.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| D::Error::custom(format!("bad base64: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_reserializes_cryptsetup_metadata_exactly() {
        // As written by `cryptsetup luksFormat --type luks2 --sector-size 4096 --pbkdf pbkdf2`.
        let text = r#"{"keyslots":{"0":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"32768","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"pbkdf2","hash":"sha256","iterations":1000,"salt":"kTs2xsQKlPfloyiAEPKvQ0t+2S1cmq2rYXS1PlHeY2c="}},"1":{"type":"luks2","key_size":64,"af":{"type":"luks1","stripes":4000,"hash":"sha256"},"area":{"type":"raw","offset":"290816","size":"258048","encryption":"aes-xts-plain64","key_size":64},"kdf":{"type":"argon2id","time":4,"memory":1048576,"cpus":4,"salt":"kTs2xsQKlPfloyiAEPKvQ0t+2S1cmq2rYXS1PlHeY2c="},"future":1}},"tokens":{"0":{"type":"systemd-tpm2","keyslots":["0"],"tpm2-pcrs":[7]}},"segments":{"0":{"type":"crypt","offset":"16777216","size":"dynamic","iv_tweak":"0","encryption":"aes-xts-plain64","sector_size":4096}},"digests":{"0":{"type":"pbkdf2","keyslots":["0","1"],"segments":["0"],"hash":"sha256","iterations":1000,"salt":"eVpRzRtk2VQnODnS5OTvKF70ylsVGyGBCtDUA8HTgnE=","digest":"4Hd+n+6hVk0qT+qHSSuLfcBWf8fi4Z33IJDT9LZtZ7M="}},"config":{"json_size":"12288","keyslots_size":"16744448","requirements":{"mandatory":["sealvol-rekey-v1"]}}}"#;
        let m: Metadata = serde_json::from_str(text).expect("cryptsetup metadata parses");
        assert!(matches!(m.keyslots.get(&0), Some(Keyslot::Luks2(_))));
        assert!(
            matches!(m.keyslots.get(&1), Some(Keyslot::Other(_))),
            "unknown field kept raw"
        );
        assert!(matches!(m.tokens.get(&0), Some(Token::Other(_))));
        assert_eq!(m.segments[&0].size, SegmentSize::Dynamic);
        assert_eq!(m.digests[&0].keyslots, vec![0, 1]);
        assert_eq!(m.digests[&0].salt.len(), 32);
        let again = serde_json::to_string(&m).expect("serializes");
        let a: Value = serde_json::from_str(text).expect("valid");
        let b: Value = serde_json::from_str(&again).expect("valid");
        assert_eq!(a, b, "round trip preserves every field");
    }

    #[test]
    fn rejects_malformed_numbers_and_ids() {
        for bad in ["\"-1\"", "\" 1\"", "\"\"", "\"99999999999999999999\"", "1"] {
            let text = format!(r#"{{"json_size":{bad},"keyslots_size":"0"}}"#);
            assert!(
                serde_json::from_str::<Config>(&text).is_err(),
                "{bad} accepted"
            );
        }
        let text = r#"{"keyslots":{"x":{}},"tokens":{},"segments":{},"digests":{},"config":{"json_size":"1","keyslots_size":"0"}}"#;
        assert!(serde_json::from_str::<Metadata>(text).is_err());
    }

    #[test]
    fn kms_token_round_trip_and_strictness() {
        let t = KmsToken {
            key_arn: "arn:aws:kms:us-east-1:111122223333:key/1".into(),
            ciphertext_blob: vec![1, 2, 3, 255],
            encryption_context: BTreeMap::from([("aws:ebs:id".into(), "vol-1".into())]),
            volume_kind: "user".into(),
            volume_id: "vol-1".into(),
            workspace_id: "ws-1".into(),
        };
        let v = serde_json::to_value(Token::Kms(t.clone())).expect("serializes");
        assert_eq!(v["type"], "sealvol-kms");
        assert_eq!(v["keyslots"], Value::Array(vec![]));
        assert_eq!(v["ciphertext_blob"], "AQID/w==");
        assert_eq!(
            serde_json::from_value::<Token>(v.clone()).expect("parses"),
            Token::Kms(t)
        );
        let mut extra = v.clone();
        extra["surprise"] = Value::Bool(true);
        assert!(
            serde_json::from_value::<Token>(extra).is_err(),
            "unknown field in our token"
        );
        let mut bound = v;
        bound["keyslots"] = serde_json::json!(["0"]);
        assert!(serde_json::from_value::<Token>(bound).is_err());
        assert!(
            serde_json::from_value::<Token>(serde_json::json!({"type": 3, "keyslots": []}))
                .is_err()
        );
    }
}
