//! Secret key material: the 64-byte XTS volume key.
//!
//! A [`VolumeKey`] lives in a heap buffer that is locked into RAM (`mlock`, so it is never
//! written to swap), wiped on drop, compared in constant time, and never printed: its
//! `Debug` is `VolumeKey { .. }`. Core dumps are excluded process-wide by
//! [`harden_process`].

use std::fmt;
use std::path::Path;

use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Length of an XTS-AES-256 key: Key1 (data) || Key2 (tweak), 32 bytes each.
pub const VOLUME_KEY_LEN: usize = 64;

/// Errors from loading or validating key material.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The key file could not be read.
    #[error("cannot read volume key file {path}: {source}")]
    Read {
        /// The key file.
        path: String,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The key has the wrong length.
    #[error(
        "volume key must be exactly {VOLUME_KEY_LEN} raw bytes, got {got} (make one with `head -c 64 /dev/urandom > KEY`)"
    )]
    Length {
        /// Bytes found.
        got: usize,
    },
    /// Key1 == Key2, which FIPS 140 forbids for XTS.
    #[error("invalid XTS key: the data key and tweak key halves are identical")]
    WeakKey,
}

/// A 64-byte XTS-AES-256 volume key (Key1 || Key2).
pub struct VolumeKey {
    bytes: Box<[u8; VOLUME_KEY_LEN]>,
    locked: bool,
}

impl VolumeKey {
    /// Takes ownership of raw key bytes, wiping the caller's copy.
    ///
    /// # Errors
    /// [`SecretError::Length`] unless exactly 64 bytes; [`SecretError::WeakKey`] if the two
    /// halves are equal.
    pub fn from_slice(raw: &mut [u8]) -> Result<Self, SecretError> {
        if raw.len() != VOLUME_KEY_LEN {
            let got = raw.len();
            raw.zeroize();
            return Err(SecretError::Length { got });
        }
        let mut bytes = Box::new([0u8; VOLUME_KEY_LEN]);
        bytes.copy_from_slice(raw);
        raw.zeroize();
        let key = Self::lock(bytes);
        if bool::from(key.bytes[..32].ct_eq(&key.bytes[32..])) {
            return Err(SecretError::WeakKey);
        }
        Ok(key)
    }

    /// Generates a fresh random key from the operating system's CSPRNG.
    #[must_use]
    pub fn generate() -> Self {
        loop {
            let mut bytes = Box::new([0u8; VOLUME_KEY_LEN]);
            rand::fill(&mut bytes[..]);
            let key = Self::lock(bytes);
            if !bool::from(key.bytes[..32].ct_eq(&key.bytes[32..])) {
                return key;
            }
        }
    }

    /// Reads a raw 64-byte key file (the break-glass / test path).
    ///
    /// # Errors
    /// Unreadable file, wrong length or weak key.
    pub fn from_file(path: &Path) -> Result<Self, SecretError> {
        let mut raw = std::fs::read(path).map_err(|source| SecretError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_slice(&mut raw)
    }

    fn lock(bytes: Box<[u8; VOLUME_KEY_LEN]>) -> Self {
        let ptr = std::ptr::NonNull::from(&*bytes).cast::<std::ffi::c_void>();
        // SAFETY: `ptr` points to a live heap allocation of VOLUME_KEY_LEN bytes that this
        // value owns until drop, where it is unlocked before being freed.
        let locked = unsafe { nix::sys::mman::mlock(ptr, VOLUME_KEY_LEN) }.is_ok();
        Self { bytes, locked }
    }

    /// The key bytes, for the cipher and the digest only.
    #[must_use]
    pub fn expose(&self) -> &[u8; VOLUME_KEY_LEN] {
        &self.bytes
    }

    /// Whether the buffer is locked into RAM (false when RLIMIT_MEMLOCK is exhausted).
    #[must_use]
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Clone for VolumeKey {
    fn clone(&self) -> Self {
        Self::lock(Box::new(*self.bytes))
    }
}

impl PartialEq for VolumeKey {
    fn eq(&self, other: &Self) -> bool {
        self.bytes[..].ct_eq(&other.bytes[..]).into()
    }
}

impl Eq for VolumeKey {}

impl Drop for VolumeKey {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if self.locked {
            let ptr = std::ptr::NonNull::from(&*self.bytes).cast::<std::ffi::c_void>();
            // SAFETY: the same region that `lock` locked; still allocated here.
            let _ = unsafe { nix::sys::mman::munlock(ptr, VOLUME_KEY_LEN) };
        }
    }
}

impl fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("VolumeKey { .. }")
    }
}

/// Other key-derived material (expanded AES round keys): a heap value locked into RAM
/// (best effort, like [`VolumeKey`]) and wiped on drop.
pub struct Locked<T: Zeroize> {
    inner: Box<T>,
    locked: bool,
}

impl<T: Zeroize> Locked<T> {
    /// Moves `value` to the heap and locks its pages.
    pub fn new(value: T) -> Self {
        let inner = Box::new(value);
        let ptr = std::ptr::NonNull::from(&*inner).cast::<std::ffi::c_void>();
        // SAFETY: `ptr` points to a live heap allocation of `size_of::<T>()` bytes that
        // this value owns until drop, where it is unlocked before being freed.
        let locked = unsafe { nix::sys::mman::mlock(ptr, std::mem::size_of::<T>()) }.is_ok();
        Self { inner, locked }
    }
}

impl<T: Zeroize> std::ops::Deref for Locked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: Zeroize> std::ops::DerefMut for Locked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.inner
    }
}

impl<T: Zeroize> Drop for Locked<T> {
    fn drop(&mut self) {
        self.inner.zeroize();
        if self.locked {
            let ptr = std::ptr::NonNull::from(&*self.inner).cast::<std::ffi::c_void>();
            // SAFETY: the same region that `new` locked; still allocated here.
            let _ = unsafe { nix::sys::mman::munlock(ptr, std::mem::size_of::<T>()) };
        }
    }
}

impl<T: Zeroize> fmt::Debug for Locked<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Locked { .. }")
    }
}

/// A [`VolumeKey`] on the attach agent's control socket, as 128 hex digits: use with
/// `#[serde(with = "crate::secret::volume_key_hex")]`. Every intermediate copy (the hex
/// text here, the decoded bytes) is wiped; the caller wipes the serialized request.
pub mod volume_key_hex {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};
    use zeroize::{Zeroize, Zeroizing};

    use super::{VOLUME_KEY_LEN, VolumeKey};

    /// Serializes the key as lowercase hex.
    ///
    /// # Errors
    /// Whatever the serializer fails with.
    pub fn serialize<S: Serializer>(key: &VolumeKey, s: S) -> Result<S::Ok, S::Error> {
        let mut text = Zeroizing::new([0u8; 2 * VOLUME_KEY_LEN]);
        hex::encode_to_slice(key.expose(), &mut text[..])
            .expect("the buffer holds exactly two hex digits per key byte");
        s.serialize_str(std::str::from_utf8(&text[..]).expect("hex digits are ASCII"))
    }

    /// Deserializes 128 hex digits into a locked key.
    ///
    /// # Errors
    /// Not 128 hex digits, or a weak key. The message never contains the input.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VolumeKey, D::Error> {
        d.deserialize_str(KeyVisitor)
    }

    struct KeyVisitor;

    impl Visitor<'_> for KeyVisitor {
        type Value = VolumeKey;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a 64-byte volume key as 128 hex digits")
        }

        fn visit_str<E: Error>(self, v: &str) -> Result<VolumeKey, E> {
            let mut raw = Zeroizing::new([0u8; VOLUME_KEY_LEN]);
            hex::decode_to_slice(v, &mut raw[..])
                .map_err(|_| E::custom("the new volume key must be 128 hex digits (64 bytes)"))?;
            VolumeKey::from_slice(&mut raw[..]).map_err(E::custom)
        }

        fn visit_string<E: Error>(self, mut v: String) -> Result<VolumeKey, E> {
            let key = self.visit_str(&v);
            v.zeroize();
            key
        }
    }
}

/// Makes the process undumpable (no core dumps, no ptrace by other users) so that key
/// material in memory cannot end up in a core file.
pub fn harden_process() {
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    // SAFETY: PR_SET_DUMPABLE takes an integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_wrong_length_and_weak_keys() {
        assert!(matches!(
            VolumeKey::from_slice(&mut [1u8; 32]),
            Err(SecretError::Length { got: 32 })
        ));
        assert!(matches!(
            VolumeKey::from_slice(&mut [7u8; 64]),
            Err(SecretError::WeakKey)
        ));
    }

    #[derive(serde::Serialize, serde::Deserialize)]
    struct OnTheWire {
        #[serde(with = "volume_key_hex")]
        key: VolumeKey,
    }

    #[test]
    fn a_key_crosses_the_wire_as_hex_and_bad_text_is_not_echoed() {
        let key = VolumeKey::generate();
        let json = serde_json::to_string(&OnTheWire { key: key.clone() }).expect("serialize");
        assert!(json.contains(&hex::encode(key.expose())));
        let back: OnTheWire = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.key, key);
        let bad = format!(r#"{{"key":"{}zz"}}"#, "ab".repeat(63));
        let e = serde_json::from_str::<OnTheWire>(&bad)
            .err()
            .expect("not hex")
            .to_string();
        assert!(!e.contains("abab"), "{e}");
        let weak = format!(r#"{{"key":"{}"}}"#, "07".repeat(64));
        assert!(serde_json::from_str::<OnTheWire>(&weak).is_err());
    }

    #[test]
    fn debug_hides_bytes_and_input_is_wiped() {
        let mut raw: Vec<u8> = (0u8..64).collect();
        let key = VolumeKey::from_slice(&mut raw).expect("distinct halves");
        assert!(raw.iter().all(|&b| b == 0), "caller copy wiped");
        assert_eq!(format!("{key:?}"), "VolumeKey { .. }");
        assert_eq!(key.expose()[63], 63);
        assert_eq!(key.clone(), key);
        assert_ne!(VolumeKey::generate(), key);
    }
}
