//! volume (being written).
