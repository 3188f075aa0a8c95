//! xts (being written).
