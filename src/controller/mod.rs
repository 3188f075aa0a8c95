//! The WorkSpaces lifecycle controller (DESIGN §6): directories, users, bundles,
//! workspaces and their volumes, snapshots; launch, reboot, rebuild, restore, stop, start,
//! terminate. State lives in `<state-dir>/controller.db` (SQLite); each running WorkSpace is
//! served by an [`agent`] process.
//!
//! KMS roles (DESIGN §2): the controller signs as the `workspaces` service principal,
//! acting on behalf of the calling administrator (`--profile`) for the key check and the
//! WorkSpaces grant; the EBS side (data-key generation, unwrap at attach) signs as `ebs`
//! under one grant per volume, constrained to that volume's full encryption context.

pub mod agent;
pub mod api;
pub mod binding;
mod directory;
pub mod error;
pub mod ids;
mod import;
pub mod kind;
mod launch;
mod lifecycle;
pub mod recovery;
pub mod registry;
mod rewrap;
pub mod schedule;
mod snapshots;
pub mod state;
pub mod workspaces;

pub use error::ControllerError;
pub use schedule::SnapshotConfig;
pub use workspaces::{Controller, ControllerConfig};
