//! Encryption context: the typed map and its canonical, unambiguous byte encoding.
//!
//! The encoding is the AAD of every ciphertext blob: a big-endian u32 pair count, then
//! for each pair in byte-wise sorted key order the key and then the value, each as a
//! big-endian u32 length followed by its bytes. Because every field is length-prefixed,
//! `{"ab":"c"}` and `{"a":"bc"}` encode differently.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Start of the parse error for a context whose keys collide; the request layer turns it
/// into ValidationException.
pub const AMBIGUOUS_KEYS: &str = "EncryptionContext keys must differ in more than case";

/// An encryption context: string keys to string values, sorted by key bytes.
///
/// Keys are unique even when case is ignored: grant constraints and policy conditions
/// compare keys without case, the AAD with case, so a context holding `Vol` and `vol`
/// would mean different things to each. Such contexts (and repeated keys) are refused
/// when parsed, so every reader sees the same map.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct EncryptionContext(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for EncryptionContext {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = EncryptionContext;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of strings to strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                let mut folded = std::collections::HashSet::new();
                while let Some((k, v)) = m.next_entry::<String, String>()? {
                    if !folded.insert(k.to_lowercase()) {
                        return Err(serde::de::Error::custom(format!(
                            "{AMBIGUOUS_KEYS} (key {k:?} repeats another)"
                        )));
                    }
                    out.insert(k, v);
                }
                Ok(EncryptionContext(out))
            }
        }
        d.deserialize_map(Pairs)
    }
}

impl EncryptionContext {
    /// An empty context.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a context from pairs (later duplicates win).
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        )
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The pairs in canonical order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The canonical encoding used as AAD.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(
            4 + self
                .0
                .iter()
                .map(|(k, v)| 8 + k.len() + v.len())
                .sum::<usize>(),
        );
        push_len(&mut out, self.0.len());
        for (k, v) in &self.0 {
            push_len(&mut out, k.len());
            out.extend_from_slice(k.as_bytes());
            push_len(&mut out, v.len());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    /// Whether two keys of this context are equal when case is ignored (only contexts
    /// built in code can be; parsed ones are refused).
    pub fn has_ambiguous_keys(&self) -> bool {
        let mut seen = std::collections::HashSet::new();
        !self.0.keys().all(|k| seen.insert(k.to_lowercase()))
    }

    /// Looks a key up case-insensitively (grant constraints and condition keys compare
    /// keys without case).
    pub fn get_ignore_case(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }

    /// Whether every pair of `constraint` is in `self` (keys case-insensitive, values exact).
    pub fn contains_all(&self, constraint: &EncryptionContext) -> bool {
        constraint
            .iter()
            .all(|(k, v)| self.get_ignore_case(k) == Some(v))
    }

    /// Equality with keys compared case-insensitively and values exactly.
    pub fn equals_ignoring_key_case(&self, other: &EncryptionContext) -> bool {
        self.0.len() == other.0.len() && self.contains_all(other) && other.contains_all(self)
    }

    /// Total size of keys and values in bytes (AWS caps this at 8192).
    pub fn byte_size(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

fn push_len(out: &mut Vec<u8>, len: usize) {
    // Lengths are bounded by the request body cap, far below u32::MAX.
    let len = u32::try_from(len).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_colliding_without_case_are_refused_when_parsed() {
        for body in [
            r#"{"vol":"a","VOL":"b"}"#,
            r#"{"Vol":"a","vol":"a"}"#,
            r#"{"k":"a","k":"b"}"#,
        ] {
            let e = serde_json::from_str::<EncryptionContext>(body).expect_err(body);
            assert!(e.to_string().contains(AMBIGUOUS_KEYS), "{e}");
        }
        let ok: EncryptionContext =
            serde_json::from_str(r#"{"vol":"a","volume":"b"}"#).expect("distinct keys parse");
        assert!(!ok.has_ambiguous_keys());
        assert!(EncryptionContext::from_pairs([("a", "1"), ("A", "2")]).has_ambiguous_keys());
    }

    #[test]
    fn ambiguous_concatenations_encode_differently() {
        let a = EncryptionContext::from_pairs([("ab", "c")]);
        let b = EncryptionContext::from_pairs([("a", "bc")]);
        assert_ne!(a.canonical_bytes(), b.canonical_bytes());
        let c = EncryptionContext::from_pairs([("a", ""), ("b", "c")]);
        assert_ne!(a.canonical_bytes(), c.canonical_bytes());
    }

    #[test]
    fn encoding_is_order_independent_and_exact() {
        let a = EncryptionContext::from_pairs([("b", "2"), ("a", "1")]);
        let b = EncryptionContext::from_pairs([("a", "1"), ("b", "2")]);
        assert_eq!(a.canonical_bytes(), b.canonical_bytes());
        assert_eq!(
            a.canonical_bytes(),
            [
                &[0, 0, 0, 2, 0, 0, 0, 1][..],
                b"a",
                &[0, 0, 0, 1],
                b"1",
                &[0, 0, 0, 1],
                b"b",
                &[0, 0, 0, 1],
                b"2"
            ]
            .concat()
        );
        assert_eq!(EncryptionContext::new().canonical_bytes(), vec![0, 0, 0, 0]);
    }

    /// Test-side decoder: if every encoding decodes back to its context, the encoding
    /// is injective (no two contexts share bytes).
    fn decode(mut b: &[u8]) -> Option<EncryptionContext> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (h, t) = b.split_at(n);
            *b = t;
            Some(h)
        }
        fn len(b: &mut &[u8]) -> Option<usize> {
            let raw: [u8; 4] = take(b, 4)?.try_into().ok()?;
            usize::try_from(u32::from_be_bytes(raw)).ok()
        }
        let n = len(&mut b)?;
        let mut pairs = Vec::new();
        for _ in 0..n {
            let kl = len(&mut b)?;
            let k = String::from_utf8(take(&mut b, kl)?.to_vec()).ok()?;
            let vl = len(&mut b)?;
            let v = String::from_utf8(take(&mut b, vl)?.to_vec()).ok()?;
            pairs.push((k, v));
        }
        b.is_empty().then(|| EncryptionContext::from_pairs(pairs))
    }

    proptest::proptest! {
        #[test]
        fn canonical_encoding_is_injective(pairs in proptest::collection::btree_map(".{0,12}", ".{0,12}", 0..6)) {
            let ctx = EncryptionContext::from_pairs(pairs);
            proptest::prop_assert_eq!(decode(&ctx.canonical_bytes()), Some(ctx));
        }
    }

    #[test]
    fn constraint_matching_ignores_key_case_only() {
        let req = EncryptionContext::from_pairs([("Vol", "v-1"), ("sid", "S")]);
        assert!(req.contains_all(&EncryptionContext::from_pairs([("vol", "v-1")])));
        assert!(!req.contains_all(&EncryptionContext::from_pairs([("vol", "V-1")])));
        assert!(
            req.equals_ignoring_key_case(&EncryptionContext::from_pairs([
                ("VOL", "v-1"),
                ("SID", "S")
            ]))
        );
        assert!(!req.equals_ignoring_key_case(&EncryptionContext::from_pairs([("vol", "v-1")])));
    }
}
