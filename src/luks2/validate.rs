//! Header validation: per-copy structure (sizes, ids, cross references), what sealvol
//! can serve, and the parameters of a new header.

use serde_json::Value;

use super::binary::MAX_LABEL_LEN;
use super::json::{self, Keyslot, Metadata, SegmentKind, SegmentSize, Token};
use super::{
    BINARY_SIZE, CIPHER, DEFAULT_DATA_OFFSET, FormatParams, KEYSLOTS_ALIGN, KNOWN_REQUIREMENTS,
    Luks2Error, MAX_SLOTS, SECTOR_SIZES, bad_json, digest, keyslot_area, unsupported,
};
use crate::secret::VOLUME_KEY_LEN;

/// Per-copy consistency: sizes, ids and cross references. Failing this makes a copy
/// invalid ([`Luks2Error::BadJson`]).
pub(super) fn validate_structure(meta: &Metadata, hdr_size: u64) -> Result<(), Luks2Error> {
    let cfg = &meta.config;
    let json_size = hdr_size.saturating_sub(BINARY_SIZE as u64);
    if cfg.json_size != json_size {
        return Err(bad_json(format!(
            "config.json_size is {} but the binary header implies {json_size}",
            cfg.json_size
        )));
    }
    if !cfg.keyslots_size.is_multiple_of(KEYSLOTS_ALIGN) {
        return Err(bad_json(format!(
            "config.keyslots_size {} is not 4096-aligned",
            cfg.keyslots_size
        )));
    }
    let area_start = hdr_size.saturating_mul(2);
    let area_end = area_start
        .checked_add(cfg.keyslots_size)
        .ok_or_else(|| bad_json("config.keyslots_size is out of range"))?;
    if let Some(id) = meta
        .keyslots
        .keys()
        .chain(meta.tokens.keys())
        .find(|&&id| id >= MAX_SLOTS)
    {
        return Err(bad_json(format!(
            "keyslot or token id {id} is not below {MAX_SLOTS}"
        )));
    }
    for (id, slot) in &meta.keyslots {
        if let Some((offset, size)) = keyslot_area(slot) {
            let inside =
                offset >= area_start && offset.checked_add(size).is_some_and(|end| end <= area_end);
            if !inside {
                return Err(bad_json(format!(
                    "keyslot {id} area lies outside the keyslots area"
                )));
            }
        }
    }
    if !meta.segments.values().any(|s| s.kind == SegmentKind::Crypt) {
        return Err(bad_json("there is no crypt segment"));
    }
    for (id, seg) in &meta.segments {
        if seg.offset < area_end {
            return Err(bad_json(format!(
                "segment {id} at offset {} overlaps the header and keyslots area (ends at {area_end})",
                seg.offset
            )));
        }
        if matches!(seg.size, SegmentSize::Bytes(n) if seg.offset.checked_add(n).is_none()) {
            return Err(bad_json(format!("segment {id} size is out of range")));
        }
        if seg.kind == SegmentKind::Crypt
            && (seg.encryption.is_none() || seg.sector_size.is_none() || seg.iv_tweak.is_none())
        {
            return Err(bad_json(format!(
                "crypt segment {id} lacks encryption, sector_size or iv_tweak"
            )));
        }
        let digests = meta
            .digests
            .values()
            .filter(|d| d.segments.contains(id))
            .count();
        if seg.kind == SegmentKind::Crypt && digests != 1 {
            return Err(bad_json(format!(
                "crypt segment {id} has {digests} digests (must have one)"
            )));
        }
    }
    for (id, d) in &meta.digests {
        if let Some(s) = d.segments.iter().find(|s| !meta.segments.contains_key(s)) {
            return Err(bad_json(format!("digest {id} names missing segment {s}")));
        }
        if let Some(k) = d.keyslots.iter().find(|k| !meta.keyslots.contains_key(k)) {
            return Err(bad_json(format!("digest {id} names missing keyslot {k}")));
        }
    }
    let mut kms_tokens = 0;
    for (id, token) in &meta.tokens {
        match token {
            Token::Kms(_) => kms_tokens += 1,
            Token::Other(v) => {
                let slots = v
                    .get("keyslots")
                    .and_then(Value::as_array)
                    .map_or(&[][..], Vec::as_slice);
                let missing = slots.iter().find(|s| {
                    let id = s.as_str().and_then(|s| json::parse_decimal(s).ok());
                    !id.and_then(|n| u32::try_from(n).ok())
                        .is_some_and(|n| meta.keyslots.contains_key(&n))
                });
                if let Some(s) = missing {
                    return Err(bad_json(format!("token {id} names missing keyslot {s}")));
                }
            }
        }
    }
    if kms_tokens > 1 {
        return Err(bad_json("there is more than one sealvol-kms token"));
    }
    Ok(())
}

/// Whether sealvol can serve a structurally valid header ([`Luks2Error::Unsupported`]).
pub(super) fn check_supported(meta: &Metadata) -> Result<(), Luks2Error> {
    if let Some(r) = meta.config.requirements.as_ref().and_then(|r| {
        r.mandatory
            .iter()
            .find(|m| !KNOWN_REQUIREMENTS.contains(&m.as_str()))
    }) {
        return Err(unsupported(format!(
            "mandatory requirement {r:?} (e.g. an unfinished `cryptsetup reencrypt`; finish it with cryptsetup first)"
        )));
    }
    for (id, seg) in &meta.segments {
        if seg.kind != SegmentKind::Crypt {
            return Err(unsupported(format!("segment {id} is not a crypt segment")));
        }
        let cipher = seg.encryption.as_deref().unwrap_or("");
        if cipher != CIPHER {
            return Err(unsupported(format!("cipher {cipher:?} in segment {id}")));
        }
        let sector = seg.sector_size.unwrap_or(0);
        if !SECTOR_SIZES.contains(&sector) {
            return Err(unsupported(format!("sector size {sector} in segment {id}")));
        }
        if seg.iv_tweak != Some(0) {
            return Err(unsupported(format!(
                "iv_tweak {:?} in segment {id} (only 0)",
                seg.iv_tweak
            )));
        }
        if seg.integrity.is_some() {
            return Err(unsupported(format!(
                "authenticated encryption (integrity) in segment {id}"
            )));
        }
        if seg.offset % u64::from(sector) != 0 {
            return Err(unsupported(format!(
                "segment {id} offset {} is not sector-aligned",
                seg.offset
            )));
        }
    }
    for (id, d) in meta.digests.iter().filter(|(_, d)| !d.segments.is_empty()) {
        digest::check_supported(*id, d)?;
        for slot in d.keyslots.iter().filter_map(|k| meta.keyslots.get(k)) {
            let key_size = match slot {
                Keyslot::Luks2(k) => Some(u64::from(k.key_size)),
                Keyslot::Other(v) => v.get("key_size").and_then(Value::as_u64),
            };
            if let Some(bytes) = key_size.filter(|&b| b != VOLUME_KEY_LEN as u64) {
                return Err(unsupported(format!(
                    "volume key size {} bits (only 512)",
                    bytes.saturating_mul(8)
                )));
            }
        }
    }
    Ok(())
}

pub(super) fn validate_params(p: &FormatParams) -> Result<u64, Luks2Error> {
    let invalid = |m: String| Err(Luks2Error::InvalidParams(m));
    if !SECTOR_SIZES.contains(&p.sector_size) {
        return invalid(format!("sector size {} (use 512 or 4096)", p.sector_size));
    }
    if p.data_size == 0 || !p.data_size.is_multiple_of(u64::from(p.sector_size)) {
        return invalid(format!(
            "data size {} must be a positive multiple of the sector size {}",
            p.data_size, p.sector_size
        ));
    }
    if p.label.len() > MAX_LABEL_LEN || p.label.contains('\0') {
        return invalid(format!(
            "label {:?} is longer than {MAX_LABEL_LEN} bytes or contains NUL",
            p.label
        ));
    }
    match DEFAULT_DATA_OFFSET.checked_add(p.data_size) {
        Some(total) if i64::try_from(total).is_ok() => Ok(total),
        _ => invalid(format!("data size {} is too large", p.data_size)),
    }
}
