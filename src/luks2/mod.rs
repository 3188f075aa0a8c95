//! LUKS2 header: parse, validate, and write both copies (DESIGN §4).
//!
//! This module owns the on-disk metadata of a volume: two copies of the header (a
//! 4096-byte binary header followed by a JSON area, at offset 0 and at `hdr_size`), the
//! one `crypt` data segment (`aes-xts-plain64`, data at 16 MiB), the `pbkdf2` digest that
//! tells the right volume key from a wrong one, and the `sealvol-kms` token that carries
//! the KMS-wrapped data key. There are no passphrase keyslots: the volume key comes from
//! KMS, or from a key file on the break-glass path, and `cryptsetup luksAddKey
//! --volume-key-file` can add a passphrase to a sealvol volume on a host with dm-crypt.
//!
//! Headers written by `cryptsetup luksFormat` are read too; keyslots and tokens of types
//! sealvol does not use are kept verbatim and written back unchanged.
//!
//! Crash safety: [`Header::write`] bumps `seqid`, writes the copy that is not the newest
//! first, flushes, then writes the other and flushes, so a crash at any point leaves at
//! least one valid copy, and [`Header::read`] takes the valid copy with the higher
//! `seqid`.

#![forbid(unsafe_code)]

mod binary;
mod checkpoint;
mod digest;
mod error;
pub(crate) mod json;
mod validate;

use std::collections::BTreeMap;

use binary::{BINARY_SIZE, BinaryHeader, CSUM_ALG_SHA256, VALID_HDR_SIZES};
pub use checkpoint::{
    JournalRecord, Progress, REKEY_TOKEN_TYPE, RekeyPlan, RekeyState, Resilience, STATE_VERSION,
};
pub use error::Luks2Error;
use json::{Config, Keyslot, Metadata, Segment, SegmentKind, SegmentSize, Token};
use validate::{check_supported, validate_params, validate_structure};

use crate::backing::{Backing, BackingError};
use crate::secret::VolumeKey;

/// Size of each header copy (binary header + JSON area) that sealvol writes.
pub const DEFAULT_HDR_SIZE: u64 = 16 * 1024;
/// Offset of the data segment in volumes that sealvol writes.
pub const DEFAULT_DATA_OFFSET: u64 = 16 * 1024 * 1024;
/// The only cipher sealvol serves.
pub const CIPHER: &str = "aes-xts-plain64";
/// Mandatory requirement set while an online rekey is in progress: cryptsetup refuses to
/// activate or modify a volume whose header names a requirement it does not know.
pub const REKEY_REQUIREMENT: &str = "sealvol-rekey-v1";
/// Mandatory requirements this module accepts when reading; any other is
/// [`Luks2Error::Unsupported`] (e.g. cryptsetup's `online-reencrypt-v2`).
const KNOWN_REQUIREMENTS: [&str; 1] = [REKEY_REQUIREMENT];
/// Sector sizes sealvol serves.
const SECTOR_SIZES: [u32; 2] = [512, 4096];
/// LUKS2 allows keyslot and token ids 0..32.
const MAX_SLOTS: u32 = 32;
/// Alignment of the keyslots area.
const KEYSLOTS_ALIGN: u64 = 4096;

/// The byte range free for the rekey journal: the keyslots area
/// `[2 * hdr_size, data_offset)`, minus any area that passphrase keyslots occupy (a
/// break-glass `cryptsetup luksAddKey` puts one at its start), rounded up to 4 KiB.
#[must_use]
pub fn journal_area(h: &Header) -> std::ops::Range<u64> {
    let mut start = h.hdr_size.saturating_mul(2);
    for slot in h.meta.keyslots.values() {
        if let Some((offset, size)) = keyslot_area(slot) {
            start = start.max(offset.saturating_add(size));
        }
    }
    let start = start
        .div_ceil(KEYSLOTS_ALIGN)
        .saturating_mul(KEYSLOTS_ALIGN);
    let end = h.data_offset();
    start.min(end)..end
}

/// True if the backing starts with a LUKS magic (`LUKS\xba\xbe`), or, when the primary
/// magic is gone, holds a valid secondary LUKS2 header copy (checksum and all) at one of
/// the LUKS2 header offsets: `cryptsetup isLuks` also finds a volume by its secondary
/// copy. A stray `SKUL\xba\xbe` in the data of a plain volume does not count. LUKS1
/// shares the primary magic, so this is also true for LUKS1 volumes, which
/// [`Header::read`] then refuses as unsupported. Use it to refuse overwriting a volume or
/// serving one as plain data.
#[must_use]
pub fn is_luks(backing: &dyn Backing) -> bool {
    let mut magic = [0u8; 6];
    let primary =
        backing.read_at(&mut magic, 0).is_ok() && binary::magic_copy(&magic) == Some(Copy::Primary);
    primary
        || backing
            .size()
            .is_ok_and(|size| read_secondary(backing, size).is_ok())
}

/// The `sealvol-kms` token: the data key wrapped by KMS, and what it is bound to.
///
/// Stored in the header as a LUKS2 token `{"type": "sealvol-kms", "keyslots": [], ...}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KmsToken {
    /// ARN of the KMS key that wraps the data key.
    pub key_arn: String,
    /// The KMS ciphertext blob of the data key (base64 in JSON).
    #[serde(with = "json::b64")]
    pub ciphertext_blob: Vec<u8>,
    /// The encryption context the blob is bound to.
    pub encryption_context: BTreeMap<String, String>,
    /// `root`, `user`, or empty for low-level volumes.
    pub volume_kind: String,
    /// The volume id (`vol-...`), or empty.
    pub volume_id: String,
    /// The workspace id (`ws-...`), or empty.
    pub workspace_id: String,
}

/// What [`Header::format`] creates.
#[derive(Debug, Clone)]
pub struct FormatParams {
    /// Size of the data segment in bytes (a positive multiple of `sector_size`).
    pub data_size: u64,
    /// Encryption sector size: 512 or 4096.
    pub sector_size: u32,
    /// Header label (at most 47 bytes, no NUL).
    pub label: String,
    /// The KMS token, if the data key is KMS-wrapped.
    pub token: Option<KmsToken>,
}

/// One of the two header copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// The copy at offset 0 (magic `LUKS\xba\xbe`).
    Primary,
    /// The copy at offset `hdr_size` (magic `SKUL\xba\xbe`).
    Secondary,
}

impl Copy {
    fn other(self) -> Self {
        match self {
            Self::Primary => Self::Secondary,
            Self::Secondary => Self::Primary,
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Primary => 0,
            Self::Secondary => 1,
        }
    }
}

/// A parsed, validated LUKS2 header.
#[derive(Debug, Clone)]
pub struct Header {
    hdr_size: u64,
    seqid: u64,
    label: String,
    subsystem: String,
    uuid: String,
    /// Binary-header salts of the primary and secondary copy.
    salts: [[u8; 64]; 2],
    meta: Metadata,
    copy_used: Copy,
}

/// One header copy that passed every per-copy check.
struct ValidCopy {
    bin: BinaryHeader,
    meta: Metadata,
}

fn map_read(e: BackingError) -> Luks2Error {
    match e {
        BackingError::Truncated { .. } => Luks2Error::Truncated,
        other => Luks2Error::Backing(other),
    }
}

fn bad_json(msg: impl Into<String>) -> Luks2Error {
    Luks2Error::BadJson(msg.into())
}

fn unsupported(what: impl Into<String>) -> Luks2Error {
    Luks2Error::Unsupported { what: what.into() }
}

fn random_salt() -> [u8; 64] {
    let mut s = [0u8; 64];
    rand::fill(&mut s[..]);
    s
}

/// `(offset, size)` of a keyslot's area, for typed and raw keyslots alike.
fn keyslot_area(slot: &Keyslot) -> Option<(u64, u64)> {
    match slot {
        Keyslot::Luks2(k) => Some((k.area.offset, k.area.size)),
        Keyslot::Other(v) => {
            let num = |name: &str| {
                v.get("area")?
                    .get(name)?
                    .as_str()
                    .and_then(|s| json::parse_decimal(s).ok())
            };
            Some((num("offset")?, num("size")?))
        }
    }
}

/// Reads and checks the copy at `offset`, which must carry `expected`'s magic.
fn read_copy(
    backing: &dyn Backing,
    offset: u64,
    size: u64,
    expected: Copy,
) -> Result<ValidCopy, Luks2Error> {
    let avail = size.saturating_sub(offset);
    let n = usize::try_from(avail.min(BINARY_SIZE as u64)).unwrap_or(BINARY_SIZE);
    let mut first = [0u8; BINARY_SIZE];
    backing.read_at(&mut first[..n], offset).map_err(map_read)?;
    if binary::magic_copy(&first[..n]) != Some(expected) {
        return Err(Luks2Error::NotLuks);
    }
    if n < BINARY_SIZE {
        return Err(Luks2Error::Truncated);
    }
    let bin = BinaryHeader::parse(&first)?;
    if bin.hdr_offset != offset {
        return Err(Luks2Error::BadBinary(format!(
            "the copy at offset {offset} says it belongs at offset {}",
            bin.hdr_offset
        )));
    }
    if expected == Copy::Secondary && bin.hdr_size != offset {
        return Err(Luks2Error::BadBinary(format!(
            "the secondary copy at offset {offset} declares a header size of {}",
            bin.hdr_size
        )));
    }
    if avail < bin.hdr_size {
        return Err(Luks2Error::Truncated);
    }
    // hdr_size is one of VALID_HDR_SIZES (at most 4 MiB).
    let len =
        usize::try_from(bin.hdr_size).map_err(|_| Luks2Error::BadBinary("header size".into()))?;
    let mut copy = vec![0u8; len];
    backing.read_at(&mut copy, offset).map_err(map_read)?;
    binary::verify_checksum(&copy, &bin.csum_alg)?;
    // Parse the checksummed bytes, not the first read.
    let mut bin_bytes = [0u8; BINARY_SIZE];
    bin_bytes.copy_from_slice(&copy[..BINARY_SIZE]);
    if BinaryHeader::parse(&bin_bytes)? != bin {
        return Err(Luks2Error::BadBinary(format!(
            "the copy at offset {offset} changed while it was being read"
        )));
    }
    let area = &copy[BINARY_SIZE..];
    let end = area
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad_json("the JSON area has no terminating NUL"))?;
    let meta: Metadata =
        serde_json::from_slice(&area[..end]).map_err(|e| bad_json(e.to_string()))?;
    validate_structure(&meta, bin.hdr_size)?;
    Ok(ValidCopy { bin, meta })
}

/// Offsets where the secondary copy may be: after the primary's declared size first, then
/// every LUKS2 header size (as cryptsetup scans when the primary is unreadable).
fn secondary_offsets(backing: &dyn Backing) -> Vec<u64> {
    let mut offsets = Vec::with_capacity(VALID_HDR_SIZES.len() + 1);
    let mut size = [0u8; 8];
    if backing.read_at(&mut size, 8).is_ok() {
        let declared = u64::from_be_bytes(size);
        if VALID_HDR_SIZES.contains(&declared) {
            offsets.push(declared);
        }
    }
    for s in VALID_HDR_SIZES {
        if !offsets.contains(&s) {
            offsets.push(s);
        }
    }
    offsets
}

fn read_secondary(backing: &dyn Backing, size: u64) -> Result<ValidCopy, Luks2Error> {
    for offset in secondary_offsets(backing) {
        let mut magic = [0u8; 6];
        if backing.read_at(&mut magic, offset).is_ok()
            && binary::magic_copy(&magic) == Some(Copy::Secondary)
        {
            return read_copy(backing, offset, size, Copy::Secondary);
        }
    }
    Err(Luks2Error::NotLuks)
}

/// A short reason for one copy, for [`Luks2Error::BothCopiesInvalid`].
fn copy_reason(e: &Luks2Error) -> String {
    match e {
        Luks2Error::NotLuks => "no LUKS2 header magic".into(),
        Luks2Error::Truncated => "the file ends inside this copy".into(),
        other => other.to_string(),
    }
}

/// The error when no copy is valid.
fn combine(primary: Luks2Error, secondary: Luks2Error) -> Luks2Error {
    use Luks2Error::{Backing, NotLuks, Truncated, Unsupported};
    match (&primary, &secondary) {
        (NotLuks, NotLuks) => NotLuks,
        (Truncated, NotLuks | Truncated) | (NotLuks, Truncated) => Truncated,
        (Unsupported { .. }, NotLuks) | (Backing(_), _) => primary,
        (_, Backing(_)) => secondary,
        _ => Luks2Error::BothCopiesInvalid {
            primary: copy_reason(&primary),
            secondary: copy_reason(&secondary),
        },
    }
}

impl Header {
    /// Writes a fresh header (both copies) for `key`, flushes, and sets the backing size
    /// to `data_offset + data_size`. Whatever the backing held before is discarded (it is
    /// truncated to zero first), so the data area starts as holes that read as zeros.
    ///
    /// # Errors
    /// [`Luks2Error::InvalidParams`] for bad parameters, [`Luks2Error::JsonTooLarge`] if
    /// the token does not fit, or a backing failure.
    pub fn format(
        backing: &dyn Backing,
        key: &VolumeKey,
        params: &FormatParams,
    ) -> Result<Header, Luks2Error> {
        let total = validate_params(params)?;
        let segment = Segment {
            kind: SegmentKind::Crypt,
            offset: DEFAULT_DATA_OFFSET,
            size: SegmentSize::Bytes(params.data_size),
            iv_tweak: Some(0),
            encryption: Some(CIPHER.into()),
            sector_size: Some(params.sector_size),
            integrity: None,
            flags: Vec::new(),
        };
        let meta = Metadata {
            keyslots: BTreeMap::new(),
            tokens: params
                .token
                .iter()
                .map(|t| (0, Token::Kms(t.clone())))
                .collect(),
            segments: BTreeMap::from([(0, segment)]),
            digests: BTreeMap::from([(0, digest::new_digest(key, vec![0]))]),
            config: Config {
                json_size: DEFAULT_HDR_SIZE - BINARY_SIZE as u64,
                keyslots_size: DEFAULT_DATA_OFFSET - 2 * DEFAULT_HDR_SIZE,
                flags: Vec::new(),
                requirements: None,
            },
        };
        let header = Header {
            hdr_size: DEFAULT_HDR_SIZE,
            seqid: 1,
            label: params.label.clone(),
            subsystem: String::new(),
            uuid: uuid::Uuid::new_v4().hyphenated().to_string(),
            salts: [random_salt(), random_salt()],
            meta,
            copy_used: Copy::Primary,
        };
        header.validate()?;
        let json = header.json_bytes()?;
        backing.set_size(0)?;
        backing.set_size(total)?;
        header.write_copy(backing, Copy::Secondary, &json)?;
        header.write_copy(backing, Copy::Primary, &json)?;
        backing.flush()?;
        Ok(header)
    }

    /// Reads and validates; falls back to the secondary copy if the primary is damaged
    /// (and the newer valid `seqid` wins when both are valid).
    ///
    /// # Errors
    /// [`Luks2Error::NotLuks`], [`Luks2Error::Truncated`],
    /// [`Luks2Error::BothCopiesInvalid`] (with each copy's reason),
    /// [`Luks2Error::Unsupported`] for a valid header sealvol cannot serve, or a backing
    /// failure.
    pub fn read(backing: &dyn Backing) -> Result<Header, Luks2Error> {
        let size = backing.size()?;
        let primary = read_copy(backing, 0, size, Copy::Primary);
        let secondary = read_secondary(backing, size);
        let (chosen, copy_used, other) = match (primary, secondary) {
            (Ok(p), Ok(s)) if s.bin.seqid > p.bin.seqid && s.bin.uuid == p.bin.uuid => {
                (s, Copy::Secondary, Some(p))
            }
            (Ok(p), Ok(s)) => (p, Copy::Primary, Some(s)),
            (Ok(p), Err(_)) => (p, Copy::Primary, None),
            (Err(_), Ok(s)) => (s, Copy::Secondary, None),
            (Err(p), Err(s)) => return Err(combine(p, s)),
        };
        let mut salts = [random_salt(), random_salt()];
        salts[copy_used.index()] = chosen.bin.salt;
        if let Some(o) = &other {
            salts[copy_used.other().index()] = o.bin.salt;
        }
        let header = Header {
            hdr_size: chosen.bin.hdr_size,
            seqid: chosen.bin.seqid,
            label: chosen.bin.label,
            subsystem: chosen.bin.subsystem,
            uuid: chosen.bin.uuid,
            salts,
            meta: chosen.meta,
            copy_used,
        };
        check_supported(&header.meta)?;
        let needed = header.meta.segments.values().map(|s| match s.size {
            SegmentSize::Bytes(n) => s.offset.saturating_add(n),
            SegmentSize::Dynamic => s.offset,
        });
        if needed.max().is_some_and(|end| size < end) {
            return Err(Luks2Error::Truncated);
        }
        Ok(header)
    }

    /// Crash-safe update: `seqid += 1`; writes the copy that is NOT the newest first,
    /// flushes, then the other, flushes. The header is validated first: a header this
    /// module could not read back is never written.
    ///
    /// # Errors
    /// Invalid metadata ([`Luks2Error::BadJson`], [`Luks2Error::Unsupported`],
    /// [`Luks2Error::JsonTooLarge`]) or a backing failure; after a failure at least one
    /// valid copy remains on disk.
    pub fn write(&mut self, backing: &dyn Backing) -> Result<(), Luks2Error> {
        self.validate()?;
        let json = self.json_bytes()?;
        self.seqid = self
            .seqid
            .checked_add(1)
            .ok_or_else(|| Luks2Error::BadBinary("seqid would overflow".into()))?;
        let first = self.copy_used.other();
        self.write_copy(backing, first, &json)?;
        backing.flush()?;
        // From here on `first` is the newest valid copy.
        self.copy_used = first;
        self.write_copy(backing, first.other(), &json)?;
        backing.flush()?;
        Ok(())
    }

    /// pbkdf2 digest check of the volume key (constant-time compare) against the digest
    /// of the first data segment.
    ///
    /// # Errors
    /// [`Luks2Error::DigestMismatch`] if `key` is wrong.
    pub fn verify_key(&self, key: &VolumeKey) -> Result<(), Luks2Error> {
        let seg_id = self.data_segment_id();
        let (id, d) = self
            .meta
            .digests
            .iter()
            .find(|(_, d)| d.segments.contains(&seg_id))
            .ok_or_else(|| bad_json(format!("segment {seg_id} has no digest")))?;
        digest::verify(*id, d, key)
    }

    /// The volume UUID.
    #[must_use]
    pub fn uuid(&self) -> &str {
        &self.uuid
    }

    /// The header label (may be empty).
    #[must_use]
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The sequence id, bumped on every update.
    #[must_use]
    pub fn seqid(&self) -> u64 {
        self.seqid
    }

    /// The dm-crypt cipher spec of the data segment (`aes-xts-plain64`).
    #[must_use]
    pub fn cipher(&self) -> &str {
        self.data_segment().encryption.as_deref().unwrap_or("")
    }

    /// The encryption sector size in bytes (512 or 4096).
    #[must_use]
    pub fn sector_size(&self) -> u32 {
        self.data_segment().sector_size.unwrap_or(0)
    }

    /// Byte offset of the data area (the lowest segment offset).
    #[must_use]
    pub fn data_offset(&self) -> u64 {
        self.meta
            .segments
            .values()
            .map(|s| s.offset)
            .min()
            .unwrap_or(0)
    }

    /// Data bytes given the backing size: from the data offset to the end of the last
    /// segment; a `"dynamic"` segment (as cryptsetup writes) extends to the end of the
    /// backing, rounded down to whole sectors.
    #[must_use]
    pub fn data_size(&self, backing_size: u64) -> u64 {
        let sector = u64::from(self.sector_size().max(1));
        let end = self
            .meta
            .segments
            .values()
            .map(|s| match s.size {
                SegmentSize::Bytes(n) => s.offset.saturating_add(n),
                SegmentSize::Dynamic => {
                    let len = backing_size.saturating_sub(s.offset);
                    s.offset.saturating_add(len - len % sector)
                }
            })
            .max()
            .unwrap_or(0);
        end.saturating_sub(self.data_offset())
    }

    /// The `sealvol-kms` token, if there is one.
    #[must_use]
    pub fn kms_token(&self) -> Option<&KmsToken> {
        self.meta.tokens.values().find_map(|t| match t {
            Token::Kms(k) => Some(k),
            Token::Other(_) => None,
        })
    }

    /// Sets (replaces or adds) the `sealvol-kms` token; takes effect on [`Header::write`].
    pub fn set_kms_token(&mut self, t: KmsToken) {
        let id = self
            .meta
            .tokens
            .iter()
            .find(|(_, t)| matches!(t, Token::Kms(_)))
            .map(|(id, _)| *id)
            .unwrap_or_else(|| self.free_token_id());
        self.meta.tokens.insert(id, Token::Kms(t));
    }

    /// Which copy this header was read from (after [`Header::write`]: the copy written
    /// first; both are then current).
    #[must_use]
    pub fn which_copy_used(&self) -> Copy {
        self.copy_used
    }

    /// Size of each header copy in bytes.
    #[must_use]
    pub fn hdr_size(&self) -> u64 {
        self.hdr_size
    }

    /// Number of keyslots (passphrase keyslots added with cryptsetup; sealvol adds none).
    #[must_use]
    pub fn keyslot_count(&self) -> usize {
        self.meta.keyslots.len()
    }

    /// The mandatory requirements (e.g. [`REKEY_REQUIREMENT`] during a rekey).
    #[must_use]
    pub fn mandatory_requirements(&self) -> &[String] {
        self.meta
            .config
            .requirements
            .as_ref()
            .map_or(&[], |r| r.mandatory.as_slice())
    }

    fn data_segment_id(&self) -> u32 {
        self.meta
            .segments
            .iter()
            .find(|(_, s)| s.kind == SegmentKind::Crypt)
            .map_or(0, |(id, _)| *id)
    }

    fn data_segment(&self) -> &Segment {
        self.meta.segments.get(&self.data_segment_id()).expect(
            "validated headers always have a crypt segment (read, format and write check it)",
        )
    }

    fn free_token_id(&self) -> u32 {
        (0..)
            .find(|id| !self.meta.tokens.contains_key(id))
            .unwrap_or(0)
    }

    fn validate(&self) -> Result<(), Luks2Error> {
        validate_structure(&self.meta, self.hdr_size)?;
        check_supported(&self.meta)
    }

    /// The JSON text; errors if it (plus its NUL) does not fit the JSON area.
    fn json_bytes(&self) -> Result<Vec<u8>, Luks2Error> {
        let json = serde_json::to_vec(&self.meta)
            .map_err(|e| bad_json(format!("cannot serialize: {e}")))?;
        let max = usize::try_from(self.hdr_size)
            .unwrap_or(usize::MAX)
            .saturating_sub(BINARY_SIZE);
        if json.len() >= max {
            return Err(Luks2Error::JsonTooLarge {
                size: json.len() + 1,
                max,
            });
        }
        Ok(json)
    }

    fn write_copy(&self, backing: &dyn Backing, copy: Copy, json: &[u8]) -> Result<(), Luks2Error> {
        let offset = match copy {
            Copy::Primary => 0,
            Copy::Secondary => self.hdr_size,
        };
        let bin = BinaryHeader {
            copy,
            hdr_size: self.hdr_size,
            seqid: self.seqid,
            label: self.label.clone(),
            csum_alg: CSUM_ALG_SHA256.into(),
            salt: self.salts[copy.index()],
            uuid: self.uuid.clone(),
            subsystem: self.subsystem.clone(),
            hdr_offset: offset,
        };
        let len = usize::try_from(self.hdr_size)
            .map_err(|_| Luks2Error::BadBinary("header size".into()))?;
        let mut buf = vec![0u8; len];
        buf[..BINARY_SIZE].copy_from_slice(&bin.encode());
        buf[BINARY_SIZE..BINARY_SIZE + json.len()].copy_from_slice(json);
        binary::seal_checksum(&mut buf);
        backing.write_at(&buf, offset)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
