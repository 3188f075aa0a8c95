//! The snapshot configuration (store, interval, retention) and automatic snapshots (as
//! WorkSpaces takes them every 12 hours): the WorkSpace's agent
//! takes the first soon after the WorkSpace comes up, then one every interval. Each runs
//! as a child `sealvol create-snapshot --automatic`, so a failed snapshot is logged and
//! retried at the next tick, and never takes the agent down.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use crate::snapshot::store::StoreUrl;

/// Where snapshots go and how often they are taken (DESIGN §11).
#[derive(Debug, Clone)]
pub struct SnapshotConfig {
    /// The store.
    pub store: StoreUrl,
    /// AWS profile for an `s3://` store.
    pub store_profile: String,
    /// Automatic snapshot interval (zero: none).
    pub interval: std::time::Duration,
    /// Snapshots kept per volume.
    pub keep: usize,
    /// Unreferenced chunks younger than this survive garbage collection.
    pub gc_grace: std::time::Duration,
}

impl SnapshotConfig {
    /// The command-line options that reproduce this configuration (for the agent and
    /// the automatic snapshots it starts).
    #[must_use]
    pub fn args(&self) -> Vec<std::ffi::OsString> {
        vec![
            "--snapshot-store".into(),
            self.store.to_string().into(),
            "--snapshot-store-profile".into(),
            self.store_profile.clone().into(),
            "--snapshot-interval".into(),
            self.interval.as_secs().to_string().into(),
            "--snapshot-retention".into(),
            self.keep.to_string().into(),
            "--snapshot-gc-grace".into(),
            self.gc_grace.as_secs().to_string().into(),
        ]
    }
}

/// The first automatic snapshot comes at most this long after the WorkSpace is up.
const FIRST_AFTER: Duration = Duration::from_secs(120);

/// When and how to take automatic snapshots of one WorkSpace.
#[derive(Debug, Clone)]
pub struct Schedule {
    interval: Duration,
    args: Vec<OsString>,
}

impl Schedule {
    /// The schedule `cfg` asks for, for WorkSpaces in `state_dir`; `None` when automatic
    /// snapshots are off (interval 0).
    #[must_use]
    pub fn new(state_dir: &Path, cfg: &SnapshotConfig) -> Option<Self> {
        if cfg.interval.is_zero() {
            return None;
        }
        let mut args: Vec<OsString> = vec!["--state-dir".into(), state_dir.into()];
        args.extend(cfg.args());
        Some(Self {
            interval: cfg.interval,
            args,
        })
    }

    /// Starts the schedule for `workspace_id` on a thread that lives as long as the
    /// agent process.
    pub fn spawn(self, workspace_id: String) {
        let name = workspace_id.clone();
        let spawned = std::thread::Builder::new()
            .name("snapshot-schedule".into())
            .spawn(move || {
                std::thread::sleep(self.interval.min(FIRST_AFTER));
                loop {
                    self.take(&workspace_id);
                    std::thread::sleep(self.interval);
                }
            });
        if let Err(e) = spawned {
            tracing::error!("automatic snapshots of {name} are off: {e}");
        }
    }

    fn take(&self, workspace_id: &str) {
        let exe = match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => {
                tracing::warn!("automatic snapshot of {workspace_id}: {e}");
                return;
            }
        };
        let out = std::process::Command::new(exe)
            .args(&self.args)
            .args(["create-snapshot", "--workspace-id", workspace_id])
            .args(["--automatic", "--output", "json"])
            .stdin(std::process::Stdio::null())
            .output();
        match out {
            Ok(o) if o.status.success() => {
                tracing::info!("automatic snapshot of {workspace_id} taken");
            }
            Ok(o) => tracing::warn!(
                "automatic snapshot of {workspace_id} failed ({}): {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => tracing::warn!("automatic snapshot of {workspace_id}: {e}"),
        }
    }
}
