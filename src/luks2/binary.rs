//! The 4096-byte binary part of a LUKS2 header copy, and the copy checksum.
//!
//! Layout (all integers big-endian), as `struct luks2_hdr_disk` in cryptsetup:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic `LUKS\xba\xbe` (primary) or `SKUL\xba\xbe` (secondary) |
//! | 6 | 2 | version (2) |
//! | 8 | 8 | `hdr_size`: binary header + JSON area |
//! | 16 | 8 | `seqid` |
//! | 24 | 48 | label (NUL-terminated) |
//! | 72 | 32 | checksum algorithm (`sha256`) |
//! | 104 | 64 | salt (unique per copy) |
//! | 168 | 40 | uuid |
//! | 208 | 48 | subsystem |
//! | 256 | 8 | `hdr_offset`: where this copy starts |
//! | 264 | 184 | padding |
//! | 448 | 64 | checksum |
//! | 512 | 3584 | padding |
//!
//! The checksum is SHA-256 over the whole copy (`hdr_size` bytes: binary header with the
//! checksum field zeroed, then the JSON area), stored in the first 32 bytes of the field.

use sha2::{Digest as _, Sha256};

use super::{Copy, Luks2Error};

/// Size of the binary part of each header copy.
pub(crate) const BINARY_SIZE: usize = 4096;
/// Magic of the primary copy.
pub(crate) const MAGIC_PRIMARY: [u8; 6] = *b"LUKS\xba\xbe";
/// Magic of the secondary copy.
pub(crate) const MAGIC_SECONDARY: [u8; 6] = *b"SKUL\xba\xbe";
/// The header sizes LUKS2 allows (16 KiB .. 4 MiB); also the offsets where a secondary
/// copy may be found when the primary is unreadable.
pub(crate) const VALID_HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x1_0000, 0x2_0000, 0x4_0000, 0x8_0000, 0x10_0000, 0x20_0000, 0x40_0000,
];

const LABEL: std::ops::Range<usize> = 24..72;
const CSUM_ALG: std::ops::Range<usize> = 72..104;
const SALT: std::ops::Range<usize> = 104..168;
const UUID: std::ops::Range<usize> = 168..208;
const SUBSYSTEM: std::ops::Range<usize> = 208..256;
const CSUM: std::ops::Range<usize> = 448..512;
/// Length of a SHA-256 checksum.
const SHA256_LEN: usize = 32;
/// The only checksum algorithm sealvol writes and verifies.
pub(crate) const CSUM_ALG_SHA256: &str = "sha256";
/// Longest label or subsystem (one byte is kept for the terminating NUL).
pub(crate) const MAX_LABEL_LEN: usize = LABEL.end - LABEL.start - 1;

/// The fields of a binary header copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BinaryHeader {
    /// Which copy the magic says this is.
    pub(crate) copy: Copy,
    pub(crate) hdr_size: u64,
    pub(crate) seqid: u64,
    pub(crate) label: String,
    pub(crate) csum_alg: String,
    pub(crate) salt: [u8; 64],
    pub(crate) uuid: String,
    pub(crate) subsystem: String,
    pub(crate) hdr_offset: u64,
}

/// Which copy a magic belongs to, if any.
pub(crate) fn magic_copy(bytes: &[u8]) -> Option<Copy> {
    match bytes.get(..6) {
        Some(m) if m == MAGIC_PRIMARY => Some(Copy::Primary),
        Some(m) if m == MAGIC_SECONDARY => Some(Copy::Secondary),
        _ => None,
    }
}

fn be_u64(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// A NUL-terminated string field; like cryptsetup, the last byte is treated as NUL.
fn c_string(field: &[u8], name: &str) -> Result<String, Luks2Error> {
    let body = &field[..field.len() - 1];
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    String::from_utf8(body[..end].to_vec())
        .map_err(|_| Luks2Error::BadBinary(format!("the {name} field is not UTF-8")))
}

fn put_c_string(field: &mut [u8], value: &str) {
    let n = value.len().min(field.len() - 1);
    field[..n].copy_from_slice(&value.as_bytes()[..n]);
}

impl BinaryHeader {
    /// Parses and checks the fixed fields of one copy (not the checksum: that needs the
    /// JSON area too, see [`verify_checksum`]).
    pub(crate) fn parse(bytes: &[u8; BINARY_SIZE]) -> Result<Self, Luks2Error> {
        let copy = magic_copy(bytes).ok_or(Luks2Error::NotLuks)?;
        let version = u16::from_be_bytes([bytes[6], bytes[7]]);
        if version != 2 {
            return Err(Luks2Error::Unsupported {
                what: format!(
                    "LUKS version {version} (only LUKS2 is supported; a LUKS1 volume can be \
                     converted with `cryptsetup convert --type luks2`)"
                ),
            });
        }
        let hdr_size = be_u64(bytes, 8);
        if !VALID_HDR_SIZES.contains(&hdr_size) {
            return Err(Luks2Error::BadBinary(format!(
                "header size {hdr_size} is not one of the LUKS2 sizes (16 KiB to 4 MiB, powers of two)"
            )));
        }
        let mut salt = [0u8; 64];
        salt.copy_from_slice(&bytes[SALT]);
        Ok(Self {
            copy,
            hdr_size,
            seqid: be_u64(bytes, 16),
            label: c_string(&bytes[LABEL], "label")?,
            csum_alg: c_string(&bytes[CSUM_ALG], "checksum algorithm")?,
            salt,
            uuid: c_string(&bytes[UUID], "uuid")?,
            subsystem: c_string(&bytes[SUBSYSTEM], "subsystem")?,
            hdr_offset: be_u64(bytes, 256),
        })
    }

    /// Encodes the binary header with a zeroed checksum field.
    pub(crate) fn encode(&self) -> [u8; BINARY_SIZE] {
        let mut b = [0u8; BINARY_SIZE];
        b[..6].copy_from_slice(match self.copy {
            Copy::Primary => &MAGIC_PRIMARY,
            Copy::Secondary => &MAGIC_SECONDARY,
        });
        b[6..8].copy_from_slice(&2u16.to_be_bytes());
        b[8..16].copy_from_slice(&self.hdr_size.to_be_bytes());
        b[16..24].copy_from_slice(&self.seqid.to_be_bytes());
        put_c_string(&mut b[LABEL], &self.label);
        put_c_string(&mut b[CSUM_ALG], &self.csum_alg);
        b[SALT].copy_from_slice(&self.salt);
        put_c_string(&mut b[UUID], &self.uuid);
        put_c_string(&mut b[SUBSYSTEM], &self.subsystem);
        b[256..264].copy_from_slice(&self.hdr_offset.to_be_bytes());
        b
    }
}

fn checksum(copy: &[u8]) -> [u8; SHA256_LEN] {
    let mut h = Sha256::new();
    h.update(&copy[..CSUM.start]);
    h.update([0u8; CSUM.end - CSUM.start]);
    h.update(&copy[CSUM.end..]);
    h.finalize().into()
}

/// Checks the checksum of a whole copy (`hdr_size` bytes) whose algorithm is `alg`.
pub(crate) fn verify_checksum(copy: &[u8], alg: &str) -> Result<(), Luks2Error> {
    if alg != CSUM_ALG_SHA256 {
        return Err(Luks2Error::Unsupported {
            what: format!("header checksum algorithm {alg:?}"),
        });
    }
    if copy.len() < BINARY_SIZE {
        return Err(Luks2Error::Truncated);
    }
    let stored = &copy[CSUM];
    let ok = subtle::ConstantTimeEq::ct_eq(&checksum(copy)[..], &stored[..SHA256_LEN]);
    if bool::from(ok) && stored[SHA256_LEN..].iter().all(|&b| b == 0) {
        Ok(())
    } else {
        Err(Luks2Error::BadChecksum)
    }
}

/// Fills in the checksum of a whole copy (`hdr_size` bytes, checksum field zero).
pub(crate) fn seal_checksum(copy: &mut [u8]) {
    let sum = checksum(copy);
    copy[CSUM.start..CSUM.start + SHA256_LEN].copy_from_slice(&sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BinaryHeader {
        BinaryHeader {
            copy: Copy::Secondary,
            hdr_size: 0x4000,
            seqid: 7,
            label: "data".into(),
            csum_alg: CSUM_ALG_SHA256.into(),
            salt: [9; 64],
            uuid: "0eb9c5d6-dcbc-4950-b7e7-ba457319e334".into(),
            subsystem: String::new(),
            hdr_offset: 0x4000,
        }
    }

    #[test]
    fn encode_parse_round_trip_and_layout() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[..6], b"SKUL\xba\xbe");
        assert_eq!(&b[6..8], &[0, 2]);
        assert_eq!(&b[8..16], &0x4000u64.to_be_bytes());
        assert_eq!(&b[168..172], b"0eb9");
        assert_eq!(BinaryHeader::parse(&b).expect("parses"), h);
    }

    #[test]
    fn checksum_covers_json_area_and_ignores_its_own_field() {
        let mut copy = vec![0u8; 0x4000];
        copy[..BINARY_SIZE].copy_from_slice(&sample().encode());
        copy[BINARY_SIZE] = b'{';
        seal_checksum(&mut copy);
        verify_checksum(&copy, "sha256").expect("valid");
        copy[0x3fff] ^= 1;
        assert!(matches!(
            verify_checksum(&copy, "sha256"),
            Err(Luks2Error::BadChecksum)
        ));
        copy[0x3fff] ^= 1;
        copy[CSUM.start + 40] = 1;
        assert!(matches!(
            verify_checksum(&copy, "sha256"),
            Err(Luks2Error::BadChecksum)
        ));
        assert!(matches!(
            verify_checksum(&copy, "sha1"),
            Err(Luks2Error::Unsupported { .. })
        ));
    }

    #[test]
    fn rejects_bad_version_size_and_magic() {
        let mut b = sample().encode();
        b[7] = 1;
        assert!(matches!(
            BinaryHeader::parse(&b),
            Err(Luks2Error::Unsupported { .. })
        ));
        let mut b = sample().encode();
        b[8..16].copy_from_slice(&5000u64.to_be_bytes());
        assert!(matches!(
            BinaryHeader::parse(&b),
            Err(Luks2Error::BadBinary(_))
        ));
        let mut b = sample().encode();
        b[0] = b'X';
        assert!(matches!(BinaryHeader::parse(&b), Err(Luks2Error::NotLuks)));
    }
}
