//! fuse (being written).
