//! Incremental encrypted snapshots in a snapshot store (DESIGN §11).
//!
//! A snapshot of a volume is a manifest plus ciphertext chunks exactly as they sit in the
//! volume file: the store sees no plaintext and no unwrapped key. Chunks are
//! content-addressed (`chunks/<blake3>`), so a chunk that did not change since the parent
//! snapshot is never uploaded again, and holes are never uploaded at all. The manifest is
//! written last: a snapshot exists only once complete.

pub mod dirty;
pub mod download;
pub mod manifest;
pub mod retention;
pub mod store;
pub mod upload;

/// Chunk size: EBS snapshots track 512 KiB blocks. A multiple of every sector size and of
/// the device's lock stripes, and LUKS2 data offsets are multiples of it.
pub const CHUNK_BYTES: u64 = 512 * 1024;
