//! Snapshots of served volumes, the agent's side: which chunks changed, and a consistent
//! view of the volume file while I/O keeps flowing.
//!
//! - [`tracker`]: the per-volume [`ChunkTracker`] (changed-chunk bits fed by the device,
//!   persisted as the volume's [`crate::snapshot::dirty`] map) and its snapshot view with
//!   copy-before-write;
//! - [`Begun`]: what a view holds; the control socket serves views to the controller
//!   (`crate::agent::control::session`, whose client is [`crate::agent::SnapshotSession`]).

use serde::{Deserialize, Serialize};

pub mod tracker;

pub use tracker::{ChunkTracker, ViewError};

/// The answer to `SnapshotBegin` request: the volume file's geometry in chunks
/// and which chunks to read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Begun {
    /// Chunk size ([`crate::snapshot::CHUNK_BYTES`]).
    pub chunk_bytes: u64,
    /// Number of chunks in the volume file (the last may be short).
    pub chunks: u64,
    /// Size of the volume file.
    pub file_size: u64,
    /// The chunks that may differ from the requested base, ascending; `None`: every
    /// chunk must be compared (no base asked, another base, or an untrusted map).
    pub changed: Option<Vec<u64>>,
}
