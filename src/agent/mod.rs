//! The agent: the process that serves volumes through FUSE, for `sealvol attach` and for
//! each WorkSpace alike.
//!
//! - [`registry`]: the record each running agent keeps in the runtime directory, and the
//!   one liveness check (pid and process start time);
//! - [`control`]: the control socket protocol (online rekey requests and progress,
//!   snapshot sessions);
//! - [`snapshot`]: changed-chunk tracking of served volumes and consistent snapshot views
//!   (copy-before-write), with the client the controller uses;
//! - [`process`]: spawning an agent in the background, its ready/error line, waiting for
//!   it to exit or stopping it;
//! - [`serve`]: the serve loop (FUSE session, signals, ordered teardown) and `detach`;
//! - [`shutdown`]: the orderly, bounded teardown on SIGTERM (sync, release, unmount; forced
//!   after a timeout);
//! - [`open`]: opening a volume for serving, resuming an interrupted rekey, and the
//!   offline rekey that refuses a volume an agent is serving.
//!
//! `attach` without `--foreground` re-executes the binary as a background agent and
//! returns once the agent reports (one line on its stdout) that the mount is ready or why
//! it failed. The agent records itself in a small JSON file in the runtime directory so
//! that `detach` can find it.

use std::path::PathBuf;

pub mod control;
pub mod open;
pub mod process;
pub mod registry;
pub mod serve;
pub mod shutdown;
pub mod snapshot;

pub use control::session::{SnapshotError, SnapshotSession};
pub use control::{ControlReply, ControlRequest, ControlServer, request_online};
pub use open::{Opened, open_for_serving, rekey_offline};
pub use process::{
    ERROR_PREFIX, READY_LINE, report_error, report_ready, spawn_agent, terminate, wait_for_exit,
};
pub use registry::{AgentRecord, attached_at, control_path, live_at, runtime_dir};
pub use serve::{detach, serve, serve_with};
pub use snapshot::{Begun, ChunkTracker};

/// Errors from attaching or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The mountpoint is unusable.
    #[error("mountpoint {path}: {why}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Opening a volume failed in the agent.
    #[error("{0}")]
    Agent(String),
    /// The FUSE mount failed.
    #[error("cannot mount FUSE at {path}: {source} (is /dev/fuse available and fuse3 installed?)")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Nothing is attached there.
    #[error("nothing is attached at {0} (no sealvol agent record and no sealvol FUSE mount)")]
    NotAttached(PathBuf),
    /// Unmounting failed.
    #[error("cannot unmount {path}: {why}")]
    Unmount {
        /// What was being unmounted.
        path: String,
        /// Why.
        why: String,
    },
    /// A helper command failed.
    #[error("{cmd} failed: {why}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or spawn error.
        why: String,
    },
    /// A host command or mount operation failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The runtime directory or a record in it cannot be kept private.
    #[error("runtime state: {0}")]
    Private(#[from] crate::private_file::PrivateFileError),
    /// The metrics endpoint cannot be set up.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// Changed-chunk tracking cannot start for a served volume.
    #[error("cannot track changes of {export} for snapshots: {source}")]
    Tracking {
        /// The export.
        export: String,
        /// Why.
        source: snapshot::ViewError,
    },
    /// Runtime state I/O.
    #[error("runtime state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}
