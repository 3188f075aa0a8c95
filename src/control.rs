//! Temporary facade: the control socket now lives in [`crate::agent::control`].

pub use crate::agent::control::*;
