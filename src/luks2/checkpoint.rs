//! The rekey checkpoint (DESIGN §7) as part of the header format: the `sealvol-rekey`
//! token, its JSON codec and version, and the typed steps that change a header into a
//! rekey header, move its checkpoint, and turn it back into a plain header.
//!
//! While a rekey is in progress the header carries, besides the one crypt segment and
//! its digest of the **old** key: a second `pbkdf2` digest, of the **new** key, bound to
//! no segment; the mandatory requirement [`REKEY_REQUIREMENT`], so `cryptsetup` refuses
//! to activate or modify the half-converted volume; and a token of type
//! [`REKEY_TOKEN_TYPE`] holding [`RekeyState`]. The rekey engine (`crate::rekey`) changes
//! the header only through [`Header::begin_rekey`], [`Header::checkpoint_rekey`] and
//! [`Header::finish_rekey`].

use serde::{Deserialize, Serialize};
use serde_json::Value;

use std::collections::BTreeMap;

#[cfg(test)]
use super::json::Segment;
use super::json::{Digest, Requirements, Token};
use super::{Header, KmsToken, Luks2Error, REKEY_REQUIREMENT, digest};
use crate::backing::Backing;
use crate::secret::VolumeKey;

/// LUKS2 token type holding the rekey checkpoint.
pub const REKEY_TOKEN_TYPE: &str = "sealvol-rekey";
/// Version of the [`RekeyState`] format.
pub const STATE_VERSION: u32 = 1;

/// How a hotzone's old ciphertext is protected while it is rewritten in place; the
/// choice and the names follow `cryptsetup reencrypt --resilience`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resilience {
    /// A full copy of the zone's old ciphertext (DESIGN §7): any torn write, at any
    /// granularity, is repaired from it. Writes every byte twice.
    #[default]
    Journal,
    /// The first 16 bytes of every 512-byte piece of the zone's old ciphertext, 1/32 of
    /// the zone. After a crash each piece is either old or new ciphertext (disks write
    /// 512 bytes atomically) and its fingerprint tells which; XTS blocks decrypt
    /// independently, so a torn sector is put back together under the old key. The
    /// zone's BLAKE3 then proves the repair; a tear below 512 bytes fails it with
    /// `RekeyError::JournalCorrupt` instead of returning wrong data.
    Checksum,
}

impl Resilience {
    /// Whether this is the default, [`Resilience::Journal`] (which the token omits).
    pub(crate) fn is_journal(&self) -> bool {
        *self == Self::Journal
    }
}

/// The journal record of the hotzone being rewritten.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalRecord {
    /// Data-relative offset of the zone (equals the boundary).
    pub zone_start: u64,
    /// Zone length in bytes.
    pub len: u64,
    /// Absolute backing offset of the journal copy (inside the keyslots area).
    pub offset: u64,
    /// Checksum of the zone's old ciphertext (what recovery must restore): BLAKE3, hex.
    pub blake3: String,
}

/// The checkpoint stored in the `sealvol-rekey` token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RekeyState {
    /// Format version ([`STATE_VERSION`]).
    pub version: u32,
    /// Digest id of the old key (bound to the segment until the end).
    pub old_digest: u32,
    /// Digest id of the new key (bound to nothing until the end).
    pub new_digest: u32,
    /// Hotzone size in bytes.
    pub hotzone_bytes: u64,
    /// Data-relative byte offset: below it the new key, from it on the old key.
    pub boundary: u64,
    /// The zone being rewritten, when its old ciphertext is journaled.
    pub journal: Option<JournalRecord>,
    /// The new key's KMS token, installed when the rekey finishes.
    pub new_kms_token: Option<KmsToken>,
    /// What the journal holds. Absent means a full copy, so journal-mode checkpoints read
    /// as before; a `checksum` checkpoint is refused by binaries that predate it.
    #[serde(default, skip_serializing_if = "Resilience::is_journal")]
    pub resilience: Resilience,
}

impl RekeyState {
    /// Progress of this checkpoint on a volume of `total` data bytes.
    #[must_use]
    pub fn progress(&self, total: u64) -> Progress {
        Progress {
            done: self.boundary,
            total,
        }
    }
}

/// Progress of a rekey, in data bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Progress {
    /// Bytes under the new key (the boundary).
    pub done: u64,
    /// Data size.
    pub total: u64,
}

/// What a new rekey starts with ([`Header::begin_rekey`]).
#[derive(Debug, Clone)]
pub struct RekeyPlan {
    /// Hotzone size in bytes (already checked by the caller).
    pub hotzone_bytes: u64,
    /// The new key's KMS token, installed when the rekey finishes.
    pub new_kms_token: Option<KmsToken>,
    /// What each hotzone's journal holds.
    pub resilience: Resilience,
}

fn bad_token(why: impl Into<String>) -> Luks2Error {
    Luks2Error::BadRekeyToken(why.into())
}

impl Header {
    /// The rekey checkpoint, if a rekey is in progress.
    ///
    /// # Errors
    /// [`Luks2Error::BadRekeyToken`] for a token that does not parse or has another
    /// version.
    pub fn rekey_state(&self) -> Result<Option<RekeyState>, Luks2Error> {
        let Some(v) = self.token(REKEY_TOKEN_TYPE) else {
            return Ok(None);
        };
        let mut obj = v
            .as_object()
            .cloned()
            .ok_or_else(|| bad_token("not an object"))?;
        obj.remove("type");
        obj.remove("keyslots");
        let st: RekeyState =
            serde_json::from_value(Value::Object(obj)).map_err(|e| bad_token(e.to_string()))?;
        if st.version != STATE_VERSION {
            return Err(bad_token(format!(
                "version {} (this sealvol knows {STATE_VERSION})",
                st.version
            )));
        }
        Ok(Some(st))
    }

    /// Whether a rekey is in progress (the token or the requirement is there).
    #[must_use]
    pub fn rekey_in_progress(&self) -> bool {
        self.token(REKEY_TOKEN_TYPE).is_some()
            || self
                .mandatory_requirements()
                .iter()
                .any(|r| r == REKEY_REQUIREMENT)
    }

    /// Starts a rekey to `new` at boundary 0: adds the new key's digest (bound to no
    /// segment), the mandatory requirement and the checkpoint token, and writes the
    /// header. The caller has checked that no rekey is in progress and that `new` is not
    /// the current key. Returns the checkpoint as written.
    ///
    /// # Errors
    /// [`Luks2Error::BadRekeyToken`] if the segment has no digest, or a write failure.
    pub fn begin_rekey(
        &mut self,
        backing: &dyn Backing,
        new: &VolumeKey,
        plan: RekeyPlan,
    ) -> Result<RekeyState, Luks2Error> {
        let old_digest = self
            .digests()
            .iter()
            .find(|(_, d)| !d.segments.is_empty())
            .map(|(id, _)| *id)
            .ok_or_else(|| bad_token("the segment has no digest"))?;
        let new_digest = self.add_digest_for(new);
        self.set_mandatory_requirement(REKEY_REQUIREMENT);
        let st = RekeyState {
            version: STATE_VERSION,
            old_digest,
            new_digest,
            hotzone_bytes: plan.hotzone_bytes,
            boundary: 0,
            journal: None,
            new_kms_token: plan.new_kms_token,
            resilience: plan.resilience,
        };
        self.checkpoint_rekey(backing, &st)?;
        Ok(st)
    }

    /// Records a progress step: replaces the checkpoint token with `st` and writes the
    /// header (both copies, flushed).
    ///
    /// # Errors
    /// [`Luks2Error::BadRekeyToken`] if the state does not serialize, or a write failure.
    pub fn checkpoint_rekey(
        &mut self,
        backing: &dyn Backing,
        st: &RekeyState,
    ) -> Result<(), Luks2Error> {
        let Value::Object(fields) =
            serde_json::to_value(st).map_err(|e| bad_token(e.to_string()))?
        else {
            return Err(bad_token("state is not an object"));
        };
        self.set_token(REKEY_TOKEN_TYPE, fields);
        self.write(backing)
    }

    /// Ends the rekey recorded in `st`: the new digest takes over the old one's segments,
    /// the old digest, the token and the requirement go, the new KMS token (if any) is
    /// installed, and the header is written: a plain sealvol header under the new key.
    ///
    /// # Errors
    /// [`Luks2Error::NoSuchDigest`] if the new digest is gone, or a write failure.
    pub fn finish_rekey(
        &mut self,
        backing: &dyn Backing,
        st: &RekeyState,
    ) -> Result<(), Luks2Error> {
        let digests = self.digests_mut();
        let segments = digests
            .get(&st.old_digest)
            .map(|d| d.segments.clone())
            .unwrap_or_default();
        let new = digests
            .get_mut(&st.new_digest)
            .ok_or(Luks2Error::NoSuchDigest(st.new_digest))?;
        new.segments = segments;
        digests.remove(&st.old_digest);
        self.remove_token(REKEY_TOKEN_TYPE);
        self.clear_mandatory_requirement(REKEY_REQUIREMENT);
        if let Some(t) = st.new_kms_token.clone() {
            self.set_kms_token(t);
        }
        self.write(backing)
    }
}

/// Raw access for the rekey checkpoint (`checkpoint.rs`, DESIGN §7): two digests, a
/// `sealvol-rekey` state token and a mandatory requirement. Private to `luks2`:
/// callers outside it use the typed checkpoint methods above. [`Header::write`] validates
/// whatever these build before it reaches the disk.
impl Header {
    /// Data segments by id.
    #[cfg(test)]
    pub(super) fn segments(&self) -> &BTreeMap<u32, Segment> {
        &self.meta.segments
    }

    /// Data segments by id, for changing.
    #[cfg(test)]
    pub(super) fn segments_mut(&mut self) -> &mut BTreeMap<u32, Segment> {
        &mut self.meta.segments
    }

    /// Digests by id.
    pub(super) fn digests(&self) -> &BTreeMap<u32, Digest> {
        &self.meta.digests
    }

    /// Digests by id, for changing.
    pub(super) fn digests_mut(&mut self) -> &mut BTreeMap<u32, Digest> {
        &mut self.meta.digests
    }

    /// Adds a digest of `key` bound to no segment yet; returns its id. cryptsetup accepts
    /// such an unbound digest as long as every crypt segment keeps one digest.
    pub(super) fn add_digest_for(&mut self, key: &VolumeKey) -> u32 {
        let id = (0..)
            .find(|id| !self.meta.digests.contains_key(id))
            .unwrap_or(u32::MAX);
        self.meta
            .digests
            .insert(id, digest::new_digest(key, Vec::new()));
        id
    }

    /// Checks `key` against digest `digest_id` (e.g. a rekey's old or new digest).
    ///
    /// # Errors
    /// [`Luks2Error::NoSuchDigest`] for an unknown id, [`Luks2Error::DigestMismatch`] for
    /// a wrong key.
    pub(crate) fn verify_key_against(
        &self,
        digest_id: u32,
        key: &VolumeKey,
    ) -> Result<(), Luks2Error> {
        let d = self
            .meta
            .digests
            .get(&digest_id)
            .ok_or(Luks2Error::NoSuchDigest(digest_id))?;
        digest::verify(digest_id, d, key)
    }

    /// Adds a mandatory requirement (idempotent).
    pub(super) fn set_mandatory_requirement(&mut self, req: &str) {
        let r = self
            .meta
            .config
            .requirements
            .get_or_insert_with(|| Requirements {
                mandatory: Vec::new(),
            });
        if !r.mandatory.iter().any(|m| m == req) {
            r.mandatory.push(req.to_owned());
        }
    }

    /// Removes a mandatory requirement (and the `requirements` object when it empties).
    pub(super) fn clear_mandatory_requirement(&mut self, req: &str) {
        if let Some(r) = &mut self.meta.config.requirements {
            r.mandatory.retain(|m| m != req);
            if r.mandatory.is_empty() {
                self.meta.config.requirements = None;
            }
        }
    }

    /// The raw JSON of the first token of type `kind` (not `sealvol-kms`, which is typed).
    pub(super) fn token(&self, kind: &str) -> Option<&Value> {
        self.meta.tokens.values().find_map(|t| match t {
            Token::Other(v) if t.kind() == kind => Some(v),
            _ => None,
        })
    }

    /// Replaces (or adds) the token of type `kind` with the object `fields`; `type` and
    /// an empty `keyslots` are filled in.
    pub(super) fn set_token(&mut self, kind: &str, fields: serde_json::Map<String, Value>) {
        let mut obj = fields;
        obj.insert("type".into(), Value::String(kind.into()));
        obj.entry("keyslots")
            .or_insert_with(|| Value::Array(Vec::new()));
        let id = self
            .meta
            .tokens
            .iter()
            .find(|(_, t)| t.kind() == kind)
            .map(|(id, _)| *id)
            .unwrap_or_else(|| self.free_token_id());
        self.meta
            .tokens
            .insert(id, Token::Other(Value::Object(obj)));
    }

    /// Removes every token of type `kind`; true if there was one.
    pub(super) fn remove_token(&mut self, kind: &str) -> bool {
        let before = self.meta.tokens.len();
        self.meta.tokens.retain(|_, t| t.kind() != kind);
        self.meta.tokens.len() != before
    }
}
