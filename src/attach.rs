//! Temporary facade: the attach agent now lives in [`crate::agent`]. These names keep
//! callers outside the serving core building until they use `crate::agent` directly.

pub use crate::agent::{
    AgentRecord, AttachError, ERROR_PREFIX, READY_LINE, attached_at, control_path, detach,
    runtime_dir, serve, serve_with, spawn_agent, wait_for_exit,
};
