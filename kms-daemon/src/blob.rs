//! Ciphertext blob format and the AES-256-GCM sealing behind it.
//!
//! Layout (version 1):
//!
//! ```text
//! 0      1 byte   format version (0x01)
//! 1     36 bytes  key id (lower-case hyphenated UUID, ASCII)
//! 37     4 bytes  key material version (big-endian u32)
//! 41    12 bytes  GCM nonce
//! 53     n bytes  ciphertext || 16-byte tag
//! ```
//!
//! The AAD is the 41-byte header followed by the canonical encryption context, so a
//! blob is bound to its key, its material version and its context.

use aes_gcm::Aes256Gcm;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use zeroize::Zeroizing;

use crate::context::EncryptionContext;

/// Current blob format version.
pub const FORMAT_V1: u8 = 1;
const KEY_ID_LEN: usize = 36;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + 4;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Largest blob accepted (AWS's CiphertextBlob limit).
pub const MAX_BLOB_LEN: usize = 6144;

/// Errors from parsing or opening a blob. All map to InvalidCiphertextException.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlobError {
    /// Shorter than header + nonce + tag, or longer than the limit.
    #[error("ciphertext blob has an invalid length")]
    Length,
    /// Unknown format version byte.
    #[error("unsupported ciphertext blob version {0}")]
    Version(u8),
    /// The key id field is not a UUID.
    #[error("ciphertext blob names a malformed key id")]
    KeyId,
    /// Authentication failed (wrong key, context or tampered bytes).
    #[error("ciphertext does not authenticate")]
    Authentication,
}

/// A 256-bit symmetric key: zeroized on drop, never printed.
#[derive(Clone)]
pub struct SymmetricKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SymmetricKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SymmetricKey { .. }")
    }
}

impl SymmetricKey {
    /// Wraps 32 bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Builds a key from a slice, if it is exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; 32] = bytes.try_into().ok()?;
        Some(Self::from_bytes(arr))
    }

    /// A fresh random key.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        fill_random(k.as_mut());
        Self(k)
    }

    /// The raw bytes (for sealing under the root key only).
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new_from_slice(self.0.as_ref()).expect("a 32-byte key is valid for AES-256-GCM")
    }

    /// Seals `msg` with a fresh random nonce; returns nonce || ciphertext || tag.
    pub fn seal(&self, msg: &[u8], aad: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce);
        let ct = self
            .cipher()
            .encrypt(&nonce.into(), Payload { msg, aad })
            .expect("AES-GCM encryption of a bounded message cannot fail");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Opens nonce || ciphertext || tag produced by [`SymmetricKey::seal`].
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(BlobError::Length);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().map_err(|_| BlobError::Length)?;
        self.cipher()
            .decrypt(&nonce.into(), Payload { msg: ct, aad })
            .map(Zeroizing::new)
            .map_err(|_| BlobError::Authentication)
    }
}

/// Fills `buf` from the OS random source.
pub fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the OS random source is available");
}

/// A parsed (not yet authenticated) ciphertext blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiphertextBlob<'a> {
    /// The key id the blob names.
    pub key_id: String,
    /// The key material version it was sealed under.
    pub material_version: u32,
    header: &'a [u8],
    sealed: &'a [u8],
}

impl<'a> CiphertextBlob<'a> {
    /// Parses blob bytes from the network. Never panics.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, BlobError> {
        if bytes.len() < HEADER_LEN + NONCE_LEN + TAG_LEN || bytes.len() > MAX_BLOB_LEN {
            return Err(BlobError::Length);
        }
        let (header, sealed) = bytes.split_at(HEADER_LEN);
        if header[0] != FORMAT_V1 {
            return Err(BlobError::Version(header[0]));
        }
        let id_bytes = &header[1..1 + KEY_ID_LEN];
        let key_id = std::str::from_utf8(id_bytes).map_err(|_| BlobError::KeyId)?;
        let parsed = uuid::Uuid::try_parse(key_id).map_err(|_| BlobError::KeyId)?;
        if parsed.hyphenated().to_string() != key_id {
            return Err(BlobError::KeyId);
        }
        let mut v = [0u8; 4];
        v.copy_from_slice(&header[1 + KEY_ID_LEN..HEADER_LEN]);
        Ok(Self {
            key_id: key_id.to_owned(),
            material_version: u32::from_be_bytes(v),
            header,
            sealed,
        })
    }

    /// Authenticates and decrypts with the named material and context.
    pub fn open(
        &self,
        material: &SymmetricKey,
        ctx: &EncryptionContext,
    ) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        material.open(self.sealed, &aad(self.header, ctx))
    }
}

fn header_bytes(key_id: &str, material_version: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.push(FORMAT_V1);
    h.extend_from_slice(key_id.as_bytes());
    h.extend_from_slice(&material_version.to_be_bytes());
    h
}

fn aad(header: &[u8], ctx: &EncryptionContext) -> Vec<u8> {
    let mut a = header.to_vec();
    a.extend_from_slice(&ctx.canonical_bytes());
    a
}

/// Seals `plaintext` into a new blob naming `key_id` (a hyphenated UUID) and version.
pub fn seal(
    key_id: &str,
    material_version: u32,
    material: &SymmetricKey,
    ctx: &EncryptionContext,
    plaintext: &[u8],
) -> Vec<u8> {
    debug_assert_eq!(key_id.len(), KEY_ID_LEN);
    let mut out = header_bytes(key_id, material_version);
    let sealed = material.seal(plaintext, &aad(&out, ctx));
    out.extend_from_slice(&sealed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";

    fn ctx(k: &str, v: &str) -> EncryptionContext {
        EncryptionContext::from_pairs([(k, v)])
    }

    #[test]
    fn round_trip_and_header_fields() {
        let k = SymmetricKey::generate();
        let blob = seal(ID, 7, &k, &ctx("a", "bc"), b"secret");
        let p = CiphertextBlob::parse(&blob).expect("parses");
        assert_eq!(p.key_id, ID);
        assert_eq!(p.material_version, 7);
        assert_eq!(
            p.open(&k, &ctx("a", "bc")).expect("opens").as_slice(),
            b"secret"
        );
    }

    #[test]
    fn wrong_context_or_key_fails() {
        let k = SymmetricKey::generate();
        let blob = seal(ID, 1, &k, &ctx("a", "bc"), b"x");
        let p = CiphertextBlob::parse(&blob).expect("parses");
        assert_eq!(p.open(&k, &ctx("ab", "c")), Err(BlobError::Authentication));
        assert_eq!(
            p.open(&SymmetricKey::generate(), &ctx("a", "bc")),
            Err(BlobError::Authentication)
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_rejected_without_panic() {
        let k = SymmetricKey::generate();
        let blob = seal(ID, 1, &k, &EncryptionContext::new(), &[9u8; 64]);
        for len in 0..blob.len() {
            let r = CiphertextBlob::parse(&blob[..len])
                .and_then(|p| p.open(&k, &EncryptionContext::new()));
            assert!(r.is_err(), "truncated to {len} must fail");
        }
        for i in 0..blob.len() {
            let mut f = blob.clone();
            f[i] ^= 0x01;
            let r = CiphertextBlob::parse(&f).and_then(|p| {
                // A flipped header byte that still parses names another key or version:
                // opening with the original material must still fail.
                p.open(&k, &EncryptionContext::new())
            });
            assert!(r.is_err(), "flip at {i} must fail");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_or_open(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let k = SymmetricKey::generate();
            let r = CiphertextBlob::parse(&bytes).and_then(|p| p.open(&k, &EncryptionContext::new()));
            proptest::prop_assert!(r.is_err());
        }

        #[test]
        fn random_plaintexts_round_trip(pt in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), v in 0u32..5) {
            let k = SymmetricKey::generate();
            let blob = seal(ID, v, &k, &ctx("k", "v"), &pt);
            let p = CiphertextBlob::parse(&blob).expect("parses");
            proptest::prop_assert_eq!(p.material_version, v);
            let opened = p.open(&k, &ctx("k", "v")).expect("opens");
            proptest::prop_assert_eq!(opened.as_slice(), pt.as_slice());
        }
    }

    #[test]
    fn forged_headers_are_typed_errors() {
        assert_eq!(CiphertextBlob::parse(&[0u8; 10]), Err(BlobError::Length));
        let mut b = vec![2u8; 80];
        assert_eq!(CiphertextBlob::parse(&b), Err(BlobError::Version(2)));
        b[0] = 1;
        assert_eq!(CiphertextBlob::parse(&b), Err(BlobError::KeyId));
        assert_eq!(
            CiphertextBlob::parse(&vec![1u8; MAX_BLOB_LEN + 1]),
            Err(BlobError::Length)
        );
    }
}
