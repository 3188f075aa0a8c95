//! Global options: the ones every verb takes, before or after the verb, as the AWS CLI
//! takes `--profile`, `--output`, `--region` and `--endpoint-url`. Each is defined here
//! once; `sealvol --help` lists them under "Global options".

use std::path::PathBuf;

use clap::Args;

use super::{CliError, Output};
use crate::controller::{Controller, ControllerConfig};
use crate::kms::KmsTarget;

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
