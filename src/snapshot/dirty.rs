//! The persisted dirty-chunk map (filled in by the dirty-map work).
