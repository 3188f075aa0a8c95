//! The snapshot manifest: what a snapshot is once complete. Written last, so a snapshot
//! exists only when every chunk it names is in the store; carries its own BLAKE3 digest so
//! a corrupted manifest is refused rather than restored from.

use serde::{Deserialize, Serialize};

use crate::luks2::KmsToken;

/// Manifest format version.
pub const FORMAT: u32 = 1;

/// Manifest errors.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not JSON, or not a manifest.
    #[error("snapshot manifest {key} is unreadable: {detail}")]
    Unreadable {
        /// Store key.
        key: String,
        /// Parser message.
        detail: String,
    },
    /// The digest does not match the contents.
    #[error(
        "snapshot manifest {key} is corrupted (BLAKE3 digest mismatch); it cannot be restored from — use an older snapshot"
    )]
    Corrupted {
        /// Store key.
        key: String,
    },
    /// A newer or unknown format.
    #[error("snapshot manifest {key} has format {format}; this sealvol reads format {FORMAT}")]
    Format {
        /// Store key.
        key: String,
        /// The format found.
        format: u32,
    },
}

/// The WorkSpace a snapshot belongs to, enough for another host to import it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct WorkspaceMeta {
    /// `ws-...`.
    pub workspace_id: String,
    /// `d-...`.
    pub directory_id: String,
    /// The user's name in the directory.
    pub user_name: String,
    /// The user's SID (part of the volumes' encryption context).
    pub user_sid: String,
    /// `wsb-...`.
    pub bundle_id: String,
    /// The KMS key of the encrypted volumes.
    pub key_arn: Option<String>,
    /// Whether the root volume is encrypted.
    pub root_encrypted: bool,
    /// Whether the user volume is encrypted.
    pub user_encrypted: bool,
    /// Root volume size.
    pub root_size_gib: u64,
    /// User volume size.
    pub user_size_gib: u64,
}

/// One snapshot of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: u32,
    /// `snap-...`.
    pub snapshot_id: String,
    /// RFC 3339 UTC with milliseconds; also the manifest's key name.
    pub snapshot_time: String,
    /// `root` or `user`.
    pub volume_kind: String,
    /// The volume snapshotted.
    pub volume_id: String,
    /// Whether its data area is encrypted.
    pub encrypted: bool,
    /// The header's `sealvol-kms` token (the wrapped data key and its context): the data
    /// key itself never leaves KMS wrapping.
    pub kms: Option<KmsToken>,
    /// The parent snapshot's manifest key (chunks not listed as changed come from it).
    pub parent: Option<String>,
    /// Taken by the schedule rather than by hand.
    pub automatic: bool,
    /// Volume file size in bytes.
    pub file_size: u64,
    /// Chunk size in bytes.
    pub chunk_bytes: u64,
    /// Per chunk of the file: its BLAKE3 (hex, also its store key under `chunks/`), or
    /// `None` for a hole (all zeros, never uploaded).
    pub chunks: Vec<Option<String>>,
    /// The WorkSpace.
    pub workspace: WorkspaceMeta,
    /// BLAKE3 of the manifest serialized with this field empty.
    pub digest: String,
}

impl Manifest {
    /// The store key of a manifest.
    #[must_use]
    pub fn key(workspace_id: &str, kind: &str, snapshot_time: &str) -> String {
        format!("{}{snapshot_time}.json", Self::prefix(workspace_id, kind))
    }

    /// The store prefix of a volume kind's manifests.
    #[must_use]
    pub fn prefix(workspace_id: &str, kind: &str) -> String {
        format!("workspaces/{workspace_id}/{kind}/")
    }

    /// This manifest's store key.
    #[must_use]
    pub fn own_key(&self) -> String {
        Self::key(
            &self.workspace.workspace_id,
            &self.volume_kind,
            &self.snapshot_time,
        )
    }

    /// The store key of a chunk.
    #[must_use]
    pub fn chunk_key(hash: &str) -> String {
        format!("chunks/{hash}")
    }

    /// Bytes of chunk `i` (the last may be short).
    #[must_use]
    pub fn chunk_len(&self, i: u64) -> u64 {
        self.chunk_bytes
            .min(self.file_size.saturating_sub(i * self.chunk_bytes))
    }

    /// Serializes with the digest filled in.
    #[must_use]
    pub fn seal(mut self) -> Vec<u8> {
        self.digest = String::new();
        let body = serde_json::to_vec(&self).expect("manifests serialize");
        self.digest = blake3::hash(&body).to_hex().to_string();
        serde_json::to_vec(&self).expect("manifests serialize")
    }

    /// Parses and checks the digest.
    ///
    /// # Errors
    /// Unreadable, wrong format, digest mismatch.
    pub fn open(key: &str, bytes: &[u8]) -> Result<Self, ManifestError> {
        let m: Self = serde_json::from_slice(bytes).map_err(|e| ManifestError::Unreadable {
            key: key.into(),
            detail: e.to_string(),
        })?;
        if m.format != FORMAT {
            return Err(ManifestError::Format {
                key: key.into(),
                format: m.format,
            });
        }
        let mut blank = m.clone();
        blank.digest = String::new();
        let body = serde_json::to_vec(&blank).expect("manifests serialize");
        let want = blake3::hash(&body).to_hex().to_string();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            want.as_bytes(),
            m.digest.as_bytes(),
        )) {
            return Err(ManifestError::Corrupted { key: key.into() });
        }
        let expected = m.file_size.div_ceil(m.chunk_bytes.max(1));
        if m.chunk_bytes == 0 || m.chunks.len() as u64 != expected {
            return Err(ManifestError::Unreadable {
                key: key.into(),
                detail: format!(
                    "{} chunks listed for a {}-byte file in {}-byte chunks",
                    m.chunks.len(),
                    m.file_size,
                    m.chunk_bytes
                ),
            });
        }
        Ok(m)
    }
}

/// RFC 3339 UTC with milliseconds (`2026-12-02T10:00:00.123Z`): sorts as it orders in time.
#[must_use]
pub fn snapshot_time(at: std::time::SystemTime) -> String {
    let t = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// Parses [`snapshot_time`]'s form back (for ages and intervals).
#[must_use]
pub fn parse_snapshot_time(s: &str) -> Option<std::time::SystemTime> {
    let fmt = time::format_description::well_known::Rfc3339;
    let t = time::OffsetDateTime::parse(s, &fmt).ok()?;
    Some(t.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT,
            snapshot_id: "snap-1".into(),
            snapshot_time: "2026-12-02T10:00:00.123Z".into(),
            volume_kind: "user".into(),
            volume_id: "vol-1".into(),
            encrypted: false,
            kms: None,
            parent: None,
            automatic: false,
            file_size: 3 * 512 * 1024 + 5,
            chunk_bytes: 512 * 1024,
            chunks: vec![Some("ab".into()), None, None, Some("cd".into())],
            workspace: WorkspaceMeta {
                workspace_id: "ws-1".into(),
                directory_id: "d-1".into(),
                user_name: "alice".into(),
                user_sid: "S-1".into(),
                bundle_id: "wsb-1".into(),
                key_arn: None,
                root_encrypted: false,
                user_encrypted: false,
                root_size_gib: 1,
                user_size_gib: 1,
            },
            digest: String::new(),
        }
    }

    #[test]
    fn a_sealed_manifest_opens_and_a_flipped_byte_is_refused() {
        let bytes = sample().seal();
        let m = Manifest::open("k", &bytes).expect("a sealed manifest opens");
        assert_eq!(m.chunks, sample().chunks);
        assert_eq!(m.chunk_len(3), 5);
        let text = String::from_utf8(bytes)
            .expect("JSON is UTF-8")
            .replace("alice", "mallory");
        assert!(matches!(
            Manifest::open("k", text.as_bytes()),
            Err(ManifestError::Corrupted { .. })
        ));
        assert!(matches!(
            Manifest::open("k", b"{not json"),
            Err(ManifestError::Unreadable { .. })
        ));
    }

    #[test]
    fn a_chunk_list_that_does_not_cover_the_file_is_refused() {
        let mut m = sample();
        m.chunks.pop();
        assert!(matches!(
            Manifest::open("k", &m.seal()),
            Err(ManifestError::Unreadable { .. })
        ));
    }

    #[test]
    fn snapshot_times_round_trip_and_sort_in_time_order() {
        let a = std::time::UNIX_EPOCH + std::time::Duration::from_millis(1_795_000_000_123);
        let b = a + std::time::Duration::from_millis(900);
        let (sa, sb) = (snapshot_time(a), snapshot_time(b));
        assert!(sa < sb, "{sa} < {sb}");
        assert_eq!(parse_snapshot_time(&sa), Some(a));
        assert_eq!(
            Manifest::key("ws-1", "user", &sa),
            format!("workspaces/ws-1/user/{sa}.json")
        );
    }
}
