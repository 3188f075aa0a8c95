//! Global options: the ones every verb takes, before or after the verb, as the AWS CLI
//! takes `--profile`, `--output`, `--region` and `--endpoint-url`. Each is defined here
//! once; `sealvol --help` lists them under "Global options".

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{CliError, Output};
use crate::controller::{Controller, ControllerConfig, SnapshotConfig};
use crate::kms::KmsTarget;
use crate::snapshot::store::StoreUrl;

/// Options accepted anywhere on the command line (clap `global = true`). Given both
/// before and after the verb, the one after wins (clap's rule for global options).
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub struct GlobalOptions {
    /// The administrator's AWS profile (as `aws --profile`).
    #[arg(long, global = true, env = "AWS_PROFILE", default_value = "default")]
    pub profile: String,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value_t)]
    pub output: Output,
    /// AWS region to sign for (without it: AWS_REGION, else AWS_DEFAULT_REGION, else the
    /// profile's region).
    #[arg(long, global = true, value_name = "REGION")]
    pub region: Option<String>,
    /// KMS endpoint, e.g. http://127.0.0.1:4599 (without it: AWS_ENDPOINT_URL_KMS, else
    /// the profile's endpoint_url, else AWS KMS in the region).
    #[arg(long, global = true, value_name = "URL", value_parser = crate::kms::parse_endpoint_url)]
    pub endpoint_url: Option<String>,
    /// Controller state directory (controller.db, volumes, snapshots, agents, mounts).
    #[arg(
        long,
        global = true,
        env = "SEALVOL_STATE_DIR",
        default_value = "/var/lib/sealvol"
    )]
    pub state_dir: PathBuf,
    /// AWS profile of the WorkSpaces service principal.
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SERVICE_PROFILE",
        default_value = "workspaces"
    )]
    pub service_profile: String,
    /// AWS profile of the EBS service principal (the attach agent).
    #[arg(
        long,
        global = true,
        env = "SEALVOL_EBS_PROFILE",
        default_value = "ebs"
    )]
    pub ebs_profile: String,
    /// Where snapshots go: file://DIR or s3://BUCKET/PREFIX (DESIGN §11). Default:
    /// file://<state-dir>/snapshots.
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SNAPSHOT_STORE",
        value_name = "URL"
    )]
    pub snapshot_store: Option<StoreUrl>,
    /// AWS profile whose credentials reach an s3:// snapshot store (default: the service
    /// profile); the endpoint comes from AWS_ENDPOINT_URL_S3 or that profile's config.
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SNAPSHOT_STORE_PROFILE",
        value_name = "PROFILE"
    )]
    pub snapshot_store_profile: Option<String>,
    /// Automatic snapshots of running WorkSpaces: the first soon after launch or start,
    /// then this often (e.g. 12h, 30m, 45s; 0 turns them off).
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SNAPSHOT_INTERVAL",
        default_value = "12h",
        value_parser = parse_duration
    )]
    pub snapshot_interval: Duration,
    /// Snapshots kept per volume; older ones are deleted and their unreferenced chunks
    /// collected.
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SNAPSHOT_RETENTION",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    pub snapshot_retention: u32,
    /// Unreferenced chunks younger than this are kept (they may belong to a snapshot
    /// still uploading, whose manifest is written last).
    #[arg(
        long,
        global = true,
        env = "SEALVOL_SNAPSHOT_GC_GRACE",
        default_value = "1h",
        value_parser = parse_duration
    )]
    pub snapshot_gc_grace: Duration,
}

/// Parses `45s`, `30m`, `12h`, `2d` or plain seconds.
///
/// # Errors
/// Anything else, with the accepted forms.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 45s, 30m, 12h, 2d)"))?;
    let secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use s, m, h or d)")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

impl GlobalOptions {
    /// Where KMS requests go: `--region` and `--endpoint-url` where given, else the
    /// environment and the profile decide.
    #[must_use]
    pub fn kms_target(&self) -> KmsTarget {
        KmsTarget {
            region: self.region.clone(),
            endpoint_url: self.endpoint_url.clone(),
        }
    }

    /// The controller's configuration from these options.
    #[must_use]
    pub fn controller_config(&self) -> ControllerConfig {
        ControllerConfig {
            state_dir: self.state_dir.clone(),
            admin_profile: self.profile.clone(),
            service_profile: self.service_profile.clone(),
            ebs_profile: self.ebs_profile.clone(),
            kms: self.kms_target(),
            snapshots: SnapshotConfig {
                store: self
                    .snapshot_store
                    .clone()
                    .unwrap_or_else(|| StoreUrl::File(self.state_dir.join("snapshots"))),
                store_profile: self
                    .snapshot_store_profile
                    .clone()
                    .unwrap_or_else(|| self.service_profile.clone()),
                interval: self.snapshot_interval,
                keep: self.snapshot_retention as usize,
                gc_grace: self.snapshot_gc_grace,
            },
        }
    }

    /// Opens the controller these options configure.
    ///
    /// # Errors
    /// State directory or database failure.
    pub fn controller(&self) -> Result<Controller, CliError> {
        Ok(Controller::open(self.controller_config())?)
    }
}
