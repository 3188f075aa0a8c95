//! sealvol: userspace encrypted volumes.
//!
//! Each volume is a LUKS2 file whose data area is XTS-AES-256 (`aes-xts-plain64`,
//! dm-crypt compatible). The [`volume`] module opens one into a [`device::Device`] that
//! reads and writes plaintext byte ranges; [`fuse`] serves a device as a regular file
//! that Linux attaches with a loop device.

pub mod agent;
pub mod backing;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod crashsim;
pub mod device;
pub mod fuse;
pub mod fuse_uring;
pub mod host;
pub mod kms;
pub mod luks2;
pub mod metrics;
pub mod private_file;
pub mod rekey;
pub mod secret;
pub mod snapshot;
pub mod volume;
pub mod xts;
