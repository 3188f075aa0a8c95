//! Retention: keep the newest N snapshots of each volume, then delete the chunks no
//! manifest references. A chunk younger than the grace period is kept even when nothing
//! references it yet: it may belong to a snapshot still uploading (its manifest is
//! written last).

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use super::manifest::{Manifest, ManifestError};
use super::store::{SnapshotStore, StoreError};

/// Retention errors.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A manifest could not be read, so its chunks are unknown: nothing is collected.
    #[error("garbage collection stopped, nothing deleted: {0}")]
    Manifest(#[from] ManifestError),
}

/// What retention removed.
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct Collected {
    /// Manifests deleted (older than the newest N).
    pub manifests: Vec<String>,
    /// Chunks deleted.
    pub chunks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Manifest keys of one volume kind of a WorkSpace, oldest first.
///
/// # Errors
/// The store failed.
pub fn manifests(
    store: &dyn SnapshotStore,
    workspace_id: &str,
    kind: &str,
) -> Result<Vec<String>, StoreError> {
    let mut keys: Vec<String> = store
        .list(&Manifest::prefix(workspace_id, kind))?
        .into_iter()
        .map(|o| o.key)
        .filter(|k| k.ends_with(".json"))
        .collect();
    keys.sort();
    Ok(keys)
}

/// The snapshot times of one volume kind of a WorkSpace (its manifests' names), oldest
/// first.
///
/// # Errors
/// The store failed.
pub fn snapshot_times(
    store: &dyn SnapshotStore,
    workspace_id: &str,
    kind: &str,
) -> Result<Vec<String>, StoreError> {
    let prefix = Manifest::prefix(workspace_id, kind);
    Ok(manifests(store, workspace_id, kind)?
        .iter()
        .filter_map(|k| k.strip_prefix(&prefix)?.strip_suffix(".json"))
        .map(str::to_string)
        .collect())
}

/// Deletes all but the newest `keep` manifests of a WorkSpace's volume kind, then
/// collects unreferenced chunks older than `grace`.
///
/// # Errors
/// The store failed or a manifest is unreadable (then no chunk is deleted).
pub fn prune(
    store: &dyn SnapshotStore,
    workspace_id: &str,
    kind: &str,
    keep: usize,
    grace: Duration,
) -> Result<Collected, RetentionError> {
    let keys = manifests(store, workspace_id, kind)?;
    let mut out = Collected::default();
    if keys.len() > keep.max(1) {
        for key in &keys[..keys.len() - keep.max(1)] {
            store.delete(key)?;
            out.manifests.push(key.clone());
        }
    }
    if !out.manifests.is_empty() {
        let (chunks, bytes) = collect_garbage(store, grace)?;
        out.chunks = chunks;
        out.bytes = bytes;
    }
    Ok(out)
}

/// Deletes every chunk that no manifest in the store references and that is older than
/// `grace`; returns how many and their bytes.
///
/// # Errors
/// The store failed or a manifest is unreadable (then nothing is deleted).
pub fn collect_garbage(
    store: &dyn SnapshotStore,
    grace: Duration,
) -> Result<(u64, u64), RetentionError> {
    let mut live: HashSet<String> = HashSet::new();
    for o in store.list("workspaces/")? {
        if !o.key.ends_with(".json") {
            continue;
        }
        let m = Manifest::open(&o.key, &store.get(&o.key)?)?;
        live.extend(m.chunks.into_iter().flatten());
    }
    let cutoff = SystemTime::now()
        .checked_sub(grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let (mut n, mut bytes) = (0, 0);
    for o in store.list("chunks/")? {
        let hash = o.key.trim_start_matches("chunks/");
        if live.contains(hash) || o.modified > cutoff {
            continue;
        }
        store.delete(&o.key)?;
        n += 1;
        bytes += o.size;
    }
    Ok((n, bytes))
}
