//! Snapshot stores: `file://` and `s3://` (filled in by the store work).
