//! kms-daemon: an AWS-KMS-compatible key service that verifies SigV4, evaluates key
//! policies and IAM policies, enforces grants and their encryption-context
//! constraints, binds the encryption context unambiguously, persists every
//! acknowledged change durably in SQLite and audits every request.
//!
//! Modules own one thing each: [`wire`] (request shapes), [`sigv4`] (authentication), [`forward`] (forward-access tokens),
//! [`policy`] (IAM policy language), [`authz`] (who may do what: policies, grants, their cache), [`keys`] (key and
//! grant types, root key), [`store`] (durable state), [`blob`] (ciphertext format),
//! [`context`] (encryption-context encoding), [`audit`] (CloudTrail-shaped log),
//! [`clock`] (injectable time), [`ops`] (the operation table and one handler per
//! operation, by resource), [`server`]
//! (HTTP), [`limits`] (connection caps, body limits), [`metrics`] (Prometheus metrics and their listener), [`response`] (response bodies), [`state`] (state directory), [`daemon`] (start/stop).

#![forbid(unsafe_code)]

pub mod audit;
pub mod authz;
pub mod blob;
pub mod cache;
pub mod clock;
pub mod context;
pub mod daemon;
pub mod error;
pub mod forward;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod principal;
pub mod response;
pub mod server;
pub mod sigv4;
pub mod state;
pub mod store;
pub mod wire;

pub use context::EncryptionContext;
pub use daemon::{DaemonConfig, run};
pub use error::OpError;
