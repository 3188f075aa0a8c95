//! The `pbkdf2` volume-key digest: how LUKS2 recognises the right volume key.
//!
//! `digest = PBKDF2-HMAC-<hash>(password = volume key, salt, iterations, len = |digest|)`,
//! compared in constant time, exactly as cryptsetup's `luks2_digest_pbkdf2.c` does; so
//! `cryptsetup luksAddKey --volume-key-file` accepts the key a sealvol header was made for.

use subtle::ConstantTimeEq;

use super::Luks2Error;
use super::json::Digest;
use crate::secret::VolumeKey;

/// Iterations for new digests: cryptsetup's minimum. The volume key is 512 random bits,
/// so stretching adds nothing against guessing; the digest only tells a right key from a
/// wrong one, and every open pays for it.
pub(crate) const NEW_DIGEST_ITERATIONS: u32 = 1000;
/// Salt length of new digests (cryptsetup's `LUKS_SALTSIZE`).
pub(crate) const NEW_DIGEST_SALT_LEN: usize = 32;
/// Length of new digests: the SHA-256 output size, as cryptsetup writes.
pub(crate) const NEW_DIGEST_LEN: usize = 32;
/// Digests that would take more than a few seconds to check are refused, so a damaged or
/// hostile header cannot hang an open.
pub(crate) const MAX_DIGEST_ITERATIONS: u32 = 1 << 24;
/// Shortest digest cryptsetup accepts (`LUKS_DIGESTSIZE`) and longest it can compute.
pub(crate) const DIGEST_LEN_RANGE: std::ops::RangeInclusive<usize> = 20..=64;

/// Checks that sealvol can evaluate this digest.
pub(crate) fn check_supported(id: u32, d: &Digest) -> Result<(), Luks2Error> {
    let what = if d.kind != "pbkdf2" {
        format!(
            "digest {id} has type {:?} (only pbkdf2 exists in LUKS2)",
            d.kind
        )
    } else if !matches!(d.hash.as_str(), "sha256" | "sha512") {
        format!(
            "digest {id} uses hash {:?} (sha256 and sha512 are supported)",
            d.hash
        )
    } else if d.iterations == 0 || d.iterations > MAX_DIGEST_ITERATIONS {
        format!(
            "digest {id} has {} iterations (1..={MAX_DIGEST_ITERATIONS} supported)",
            d.iterations
        )
    } else if d.salt.is_empty() || !DIGEST_LEN_RANGE.contains(&d.digest.len()) {
        format!(
            "digest {id} has a {}-byte salt and a {}-byte value",
            d.salt.len(),
            d.digest.len()
        )
    } else {
        return Ok(());
    };
    Err(Luks2Error::Unsupported { what })
}

fn derive(
    hash: &str,
    key: &VolumeKey,
    salt: &[u8],
    iterations: u32,
    out: &mut [u8],
) -> Result<(), Luks2Error> {
    match hash {
        "sha256" => pbkdf2::pbkdf2_hmac::<sha2::Sha256>(key.expose(), salt, iterations, out),
        "sha512" => pbkdf2::pbkdf2_hmac::<sha2::Sha512>(key.expose(), salt, iterations, out),
        other => {
            return Err(Luks2Error::Unsupported {
                what: format!("digest hash {other:?}"),
            });
        }
    }
    Ok(())
}

/// A new pbkdf2-sha256 digest of `key` bound to `segments`.
pub(crate) fn new_digest(key: &VolumeKey, segments: Vec<u32>) -> Digest {
    let mut salt = vec![0u8; NEW_DIGEST_SALT_LEN];
    rand::fill(&mut salt[..]);
    let mut digest = vec![0u8; NEW_DIGEST_LEN];
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(key.expose(), &salt, NEW_DIGEST_ITERATIONS, &mut digest);
    Digest {
        kind: "pbkdf2".into(),
        keyslots: Vec::new(),
        segments,
        hash: "sha256".into(),
        iterations: NEW_DIGEST_ITERATIONS,
        salt,
        digest,
    }
}

/// `Ok` if `key` is the key `d` was made from.
pub(crate) fn verify(id: u32, d: &Digest, key: &VolumeKey) -> Result<(), Luks2Error> {
    check_supported(id, d)?;
    let mut computed = vec![0u8; d.digest.len()];
    derive(&d.hash, key, &d.salt, d.iterations, &mut computed)?;
    if bool::from(computed.ct_eq(&d.digest)) {
        Ok(())
    } else {
        Err(Luks2Error::DigestMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> VolumeKey {
        let mut raw: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(seed).wrapping_add(i))
            .collect();
        VolumeKey::from_slice(&mut raw).expect("distinct halves")
    }

    #[test]
    fn right_key_verifies_wrong_key_does_not() {
        let d = new_digest(&key(3), vec![0]);
        assert_eq!(d.salt.len(), 32);
        assert_eq!(d.digest.len(), 32);
        verify(0, &d, &key(3)).expect("right key");
        assert!(matches!(
            verify(0, &d, &key(5)),
            Err(Luks2Error::DigestMismatch)
        ));
    }

    #[test]
    fn matches_an_independent_pbkdf2_computation() {
        // Digest value computed with Python: hashlib.pbkdf2_hmac("sha256", bytes(range(64)),
        // bytes(32), 1000, 32).hex()
        let mut raw: Vec<u8> = (0..64u8).collect();
        let k = VolumeKey::from_slice(&mut raw).expect("distinct halves");
        let d = Digest {
            kind: "pbkdf2".into(),
            keyslots: vec![],
            segments: vec![0],
            hash: "sha256".into(),
            iterations: 1000,
            salt: vec![0; 32],
            digest: hex::decode(EXPECTED).expect("hex"),
        };
        verify(0, &d, &k).expect("matches Python's pbkdf2_hmac");
    }

    const EXPECTED: &str = include_str!("testdata/pbkdf2_sha256_range64_zero32_1000.hex");

    #[test]
    fn refuses_what_it_cannot_evaluate() {
        let good = new_digest(&key(3), vec![0]);
        for d in [
            Digest {
                iterations: u32::MAX,
                ..good.clone()
            },
            Digest {
                hash: "whirlpool".into(),
                ..good.clone()
            },
            Digest {
                kind: "argon2".into(),
                ..good.clone()
            },
            Digest {
                digest: vec![0; 8],
                ..good
            },
        ] {
            assert!(matches!(
                verify(0, &d, &key(3)),
                Err(Luks2Error::Unsupported { .. })
            ));
        }
    }
}
