//! The one error type of the LUKS2 module.

use crate::backing::BackingError;

/// Why a LUKS2 header could not be read, written or used.
///
/// Every message says what is wrong and what to do about it. Per-copy problems
/// ([`Luks2Error::BadChecksum`], [`Luks2Error::BadJson`], ...) reach the caller only inside
/// [`Luks2Error::BothCopiesInvalid`], since one good copy is enough to open a volume.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Luks2Error {
    /// Neither header copy starts with a LUKS2 magic.
    #[error(
        "not a LUKS2 volume: no LUKS2 header magic at the start of the file or at the \
         secondary header offset (is this the right file? `cryptsetup isLuks` would refuse it too)"
    )]
    NotLuks,
    /// The file ends inside the header area or before the end of the data segment.
    #[error(
        "the LUKS2 volume is truncated: the file is shorter than its header or its data \
         segment needs (an interrupted copy?); restore it from a complete copy or a snapshot"
    )]
    Truncated,
    /// Both header copies are damaged; the fields say why, copy by copy.
    #[error(
        "both LUKS2 header copies are invalid (primary: {primary}; secondary: {secondary}); \
         restore the header from a backup (`cryptsetup luksHeaderRestore`) or a snapshot"
    )]
    BothCopiesInvalid {
        /// Why the primary copy (offset 0) was rejected.
        primary: String,
        /// Why the secondary copy (offset `hdr_size`) was rejected.
        secondary: String,
    },
    /// The SHA-256 checksum of a header copy does not match its contents.
    #[error("header checksum mismatch: the header copy was damaged (torn write or corruption)")]
    BadChecksum,
    /// The binary part of a header copy is inconsistent (size, offset, field encoding).
    #[error("malformed LUKS2 binary header: {0}")]
    BadBinary(String),
    /// The JSON area does not parse or is inconsistent (dangling references, sizes).
    #[error("malformed LUKS2 JSON metadata: {0}")]
    BadJson(String),
    /// A valid LUKS2 header that sealvol cannot serve.
    #[error(
        "unsupported LUKS2 volume: {what} (sealvol serves aes-xts-plain64 with a 512-bit key \
         and 512- or 4096-byte sectors; use cryptsetup for anything else)"
    )]
    Unsupported {
        /// What exactly is not supported.
        what: String,
    },
    /// The volume key does not match the header's key digest.
    #[error(
        "wrong volume key: it does not match the key digest in the LUKS2 header; \
         use the key this volume was created with"
    )]
    DigestMismatch,
    /// A digest id that the header does not have.
    #[error("the LUKS2 header has no digest {0}")]
    NoSuchDigest(u32),
    /// The `sealvol-rekey` checkpoint token does not parse (or has an unknown version).
    #[error("the sealvol-rekey token in the header is malformed: {0}")]
    BadRekeyToken(String),
    /// Parameters given to [`crate::luks2::Header::format`] are invalid.
    #[error("invalid LUKS2 format parameters: {0}")]
    InvalidParams(String),
    /// The JSON metadata no longer fits into the header's JSON area.
    #[error(
        "LUKS2 metadata too large: {size} bytes of JSON but the header's JSON area holds at \
         most {max}; remove tokens or recreate the volume"
    )]
    JsonTooLarge {
        /// Serialized JSON length including the terminating NUL.
        size: usize,
        /// Capacity of the JSON area.
        max: usize,
    },
    /// The backing store failed.
    #[error("volume backing: {0}")]
    Backing(#[from] BackingError),
}
