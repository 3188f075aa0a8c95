//! CLI verbs of the lifecycle controller, mirroring the AWS CLI (`aws workspaces ...`):
//! kebab-case flags of the API field names. The state directory, the profiles and
//! `--output` are [`GlobalOptions`].

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, Subcommand};

use super::output::{emit, print_json};
use super::progress::ByteBar;
use super::{CliError, GlobalOptions, Output};
use crate::backing::CacheMode;
use crate::controller::Controller;
use crate::controller::api::{
    BatchResult, CreateResult, WorkspaceProperties, WorkspaceRequest, WorkspaceView,
};
use crate::controller::recovery::RecoveryAction;

/// A controller whose bundle fills (launch, rebuild) draw a bar on a terminal; finish
/// the bar when the verb returns.
fn with_fill_bar(mut c: Controller) -> (Controller, Arc<ByteBar>) {
    let bar = Arc::new(ByteBar::new(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    ));
    bar.message("filling root volume from bundle");
    let drawn = Arc::clone(&bar);
    c.on_fill_progress(Box::new(move |done, total| drawn.update(done, total)));
    (c, bar)
}

/// A controller whose snapshot uploads and fetches draw a bar on a terminal.
fn with_snapshot_bar(mut c: Controller, what: &str) -> (Controller, Arc<ByteBar>) {
    let bar = Arc::new(ByteBar::new(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}",
    ));
    bar.message(what);
    let drawn = Arc::clone(&bar);
    c.on_snapshot_progress(Box::new(move |done, total| drawn.update(done, total)));
    (c, bar)
}

/// `rekey-volume --workspace-id`: new data keys from the KMS for a WorkSpace's volumes.
///
/// # Errors
/// Controller or rekey failure.
pub fn rekey(
    global: &GlobalOptions,
    workspace_id: &str,
    volume_id: Option<&str>,
    hotzone_bytes: Option<u64>,
    output: Output,
) -> Result<(), CliError> {
    let bar = ByteBar::new("rekey {msg} {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let reports =
        global
            .controller()?
            .rekey(workspace_id, volume_id, hotzone_bytes, |vol, p| {
                bar.message(vol);
                bar.update(p.done, p.total);
            })?;
    bar.finish();
    emit(output, &serde_json::json!({ "Volumes": reports }), || {
        for (vol, r) in &reports {
            println!(
                "{vol}: rekeyed {} bytes{} in {:.1} s ({:.1} MB/s)",
                r.bytes_this_run,
                if r.resumed { " (resumed)" } else { "" },
                r.seconds,
                r.mb_per_s
            );
        }
    });
    Ok(())
}

/// Ids for a batch verb.
#[derive(Debug, Clone, Args)]
pub struct Ids {
    /// WorkSpace ids (1 to 25).
    #[arg(long, num_args = 1.., required = true)]
    pub workspace_ids: Vec<String>,
}

/// Lifecycle verbs.
#[derive(Debug, Subcommand)]
pub enum WorkspaceCmd {
    /// Register a directory (d-xxxxxxxxxx) that WorkSpaces users belong to.
    RegisterDirectory {
        /// Directory id.
        #[arg(long)]
        directory_id: String,
    },
    /// Create a directory user with a stable SID.
    CreateUser {
        /// Directory id.
        #[arg(long)]
        directory_id: String,
        /// User name.
        #[arg(long)]
        user_name: String,
        /// Use this SID instead of assigning one (S-1-5-21-a-b-c-RID).
        #[arg(long)]
        sid: Option<String>,
    },
    /// Create a bundle: an ext4 root image built from a directory (mkfs.ext4 -d).
    CreateBundle {
        /// Bundle id (wsb-...).
        #[arg(long)]
        bundle_id: String,
        /// Directory whose contents become the root filesystem.
        #[arg(long)]
        from_dir: PathBuf,
        /// Image size in GiB.
        #[arg(long, default_value_t = 1)]
        size_gib: u64,
    },
    /// Launch a WorkSpace (root volume from the bundle, empty user volume), optionally encrypted.
    CreateWorkspaces {
        /// Directory id.
        #[arg(long)]
        directory_id: String,
        /// User name.
        #[arg(long)]
        user_name: String,
        /// Bundle id.
        #[arg(long)]
        bundle_id: String,
        /// KMS key (id, ARN or alias); default alias/aws/workspaces when encrypting.
        #[arg(long)]
        volume_encryption_key: Option<String>,
        /// Encrypt the root volume.
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
        root_volume_encryption_enabled: bool,
        /// Encrypt the user volume.
        #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false")]
        user_volume_encryption_enabled: bool,
        /// Root volume size (default: the bundle's size).
        #[arg(long)]
        root_volume_size_gib: Option<u64>,
        /// User volume size.
        #[arg(long, default_value_t = 10)]
        user_volume_size_gib: u64,
        /// Host caching of the volume files: `none` (O_DIRECT, the default) or
        /// `writeback` (through the host page cache). Shown by describe as CacheMode.
        #[arg(long, value_parser = crate::cli::parse_cache_mode)]
        cache: Option<CacheMode>,
    },
    /// Describe WorkSpaces (all, or the given ids).
    DescribeWorkspaces {
        /// Only these WorkSpaces.
        #[arg(long, num_args = 1..)]
        workspace_ids: Vec<String>,
    },
    /// Describe the volumes behind WorkSpaces.
    DescribeVolumes {
        /// Only this WorkSpace's volumes.
        #[arg(long)]
        workspace_id: Option<String>,
    },
    /// Reboot WorkSpaces (refused while an encrypted WorkSpace's key is not Enabled).
    RebootWorkspaces(Ids),
    /// Rebuild WorkSpaces: root from the bundle, user volume from its latest snapshot.
    RebuildWorkspaces(Ids),
    /// Stop WorkSpaces (volumes detached, keys wiped).
    StopWorkspaces(Ids),
    /// Start stopped WorkSpaces.
    StartWorkspaces(Ids),
    /// Terminate WorkSpaces: grants retired, volumes deleted (their snapshots stay in the
    /// snapshot store, where another host can import the WorkSpace from).
    TerminateWorkspaces(Ids),
    /// Restore a WorkSpace's volumes from their latest snapshots (as new volumes).
    RestoreWorkspace {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
    },
    /// Snapshot both volumes of a WorkSpace into the snapshot store (only the user volume
    /// while it is UNHEALTHY): incremental, still encrypted, crash-consistent while it runs.
    CreateSnapshot {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
        /// Mark the snapshot as taken by the schedule (the agent's automatic snapshots).
        #[arg(long)]
        automatic: bool,
    },
    /// The snapshots a rebuild (user volume) and a restore (both volumes) can use, newest
    /// first.
    DescribeWorkspaceSnapshots {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
    },
    /// Take a WorkSpace from its latest snapshots in the shared snapshot store and serve it
    /// on this host (new volume ids, data keys re-bound through grants). Refused while
    /// another host holds it.
    ImportWorkspace {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
    },
    /// Create an image from an unencrypted WorkSpace (refused for encrypted ones).
    CreateWorkspaceImage {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
        /// Image name.
        #[arg(long)]
        name: String,
        /// Image description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Change WorkSpace properties; changing volume encryption is refused.
    ModifyWorkspaceProperties {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
        /// Requested root volume encryption.
        #[arg(long)]
        root_volume_encryption_enabled: Option<bool>,
        /// Requested user volume encryption.
        #[arg(long)]
        user_volume_encryption_enabled: Option<bool>,
        /// Host caching of the volume files, `none` or `writeback`: from the next
        /// start, reboot, rebuild or restore.
        #[arg(long, value_parser = crate::cli::parse_cache_mode)]
        cache: Option<CacheMode>,
    },
    /// Re-encrypt a WorkSpace's data-key blobs under another KMS key (no data rewritten).
    RewrapVolume {
        /// WorkSpace id (every encrypted volume of it is rewrapped).
        #[arg(long)]
        workspace_id: String,
        /// The new KMS key (id, ARN or alias).
        #[arg(long)]
        volume_encryption_key: String,
    },
    /// Bring every WorkSpace that should be running back after a host reboot (agents,
    /// volumes, interrupted rekeys, loop devices, mounts); those that cannot come back are
    /// recorded UNHEALTHY or ERROR with the reason. Idempotent. Exit status 3 when some
    /// are left down.
    RecoverWorkspaces,
    /// (internal) The per-WorkSpace agent the controller starts (with the global
    /// --state-dir, --ebs-profile, --region and --endpoint-url).
    #[command(hide = true)]
    Agent {
        /// WorkSpace id.
        #[arg(long)]
        workspace_id: String,
    },
}

fn encryption_label(root: bool, user: bool) -> (&'static str, String) {
    let list: Vec<&str> = [("Root", root), ("User", user)]
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect();
    (
        if list.is_empty() {
            "Disabled"
        } else {
            "Enabled"
        },
        if list.is_empty() {
            "None".into()
        } else {
            list.join(", ")
        },
    )
}

fn print_workspaces(views: &[WorkspaceView]) {
    println!(
        "{:<13} {:<14} {:<14} {:<16} {:<12} {:<18} {:<12}",
        "WorkspaceId", "DirectoryId", "UserName", "BundleId", "State", "Volume Encryption", "Key"
    );
    for v in views {
        let (enc, _) = encryption_label(
            v.root_volume_encryption_enabled,
            v.user_volume_encryption_enabled,
        );
        let key = v
            .volume_encryption_key
            .as_deref()
            .map_or("-", |k| k.rsplit('/').next().unwrap_or(k));
        println!(
            "{:<13} {:<14} {:<14} {:<16} {:<12} {:<18} {}",
            v.workspace_id,
            v.directory_id,
            v.user_name,
            v.bundle_id,
            v.state.as_str(),
            enc,
            key
        );
    }
    for v in views {
        let (_, list) = encryption_label(
            v.root_volume_encryption_enabled,
            v.user_volume_encryption_enabled,
        );
        println!();
        println!("{}:", v.workspace_id);
        println!("  Encrypted Volumes:   {list}");
        if let Some(k) = &v.volume_encryption_key {
            println!("  Encryption Key:      {k}");
        }
        if let Some(m) = &v.mount_point {
            println!("  Mounted at:          {m} (user volume at {m}/home)");
        }
        if let Some(w) = &v.key_warning {
            println!("  WARNING:             {w}");
        }
        if let Some(e) = &v.error_message {
            println!("  Error:               {e}");
        }
    }
}

fn print_batch(verb: &str, r: &BatchResult, output: Output) -> Result<(), CliError> {
    emit(output, r, || {
        if r.failed_requests.is_empty() {
            println!("{verb}: all requests accepted");
        }
        for f in &r.failed_requests {
            println!(
                "FAILED {} {}: {}",
                f.workspace_id.as_deref().unwrap_or("-"),
                f.error_code,
                f.error_message
            );
        }
    });
    if r.failed_requests.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(r.failed_requests.len()))
    }
}

/// Runs a lifecycle verb.
///
/// # Errors
/// Controller errors; batch verbs with failed items exit non-zero after printing them.
pub fn run(cmd: WorkspaceCmd, global: &GlobalOptions) -> Result<(), CliError> {
    let output = global.output;
    match cmd {
        WorkspaceCmd::RegisterDirectory { directory_id } => {
            let new = global.controller()?.register_directory(&directory_id)?;
            let doc = serde_json::json!({"DirectoryId": directory_id, "Created": new});
            emit(output, &doc, || {
                println!(
                    "directory {directory_id} {}",
                    if new {
                        "registered"
                    } else {
                        "was already registered"
                    }
                );
            });
        }
        WorkspaceCmd::CreateUser {
            directory_id,
            user_name,
            sid,
        } => {
            let u = global
                .controller()?
                .create_user(&directory_id, &user_name, sid.as_deref())?;
            let doc = serde_json::json!({"DirectoryId": u.directory_id, "UserName": u.user_name, "Sid": u.sid});
            emit(output, &doc, || {
                println!("user {} in {}: SID {}", u.user_name, u.directory_id, u.sid);
            });
        }
        WorkspaceCmd::CreateBundle {
            bundle_id,
            from_dir,
            size_gib,
        } => {
            let b = global
                .controller()?
                .create_bundle(&bundle_id, &from_dir, size_gib)?;
            let doc = serde_json::json!({"BundleId": b.bundle_id, "ImagePath": b.image_path, "SizeGib": b.size_gib});
            emit(output, &doc, || {
                println!(
                    "bundle {} ({} GiB ext4 image at {})",
                    b.bundle_id,
                    b.size_gib,
                    b.image_path.display()
                );
            });
        }
        WorkspaceCmd::CreateWorkspaces {
            directory_id,
            user_name,
            bundle_id,
            volume_encryption_key,
            root_volume_encryption_enabled,
            user_volume_encryption_enabled,
            root_volume_size_gib,
            user_volume_size_gib,
            cache,
        } => {
            let c = global.controller()?;
            let root_size = match root_volume_size_gib {
                Some(s) => s,
                None => c
                    .registry()
                    .bundle(&bundle_id)
                    .ok()
                    .flatten()
                    .map_or(1, |b| b.size_gib),
            };
            let req = WorkspaceRequest {
                directory_id,
                user_name,
                bundle_id,
                volume_encryption_key,
                user_volume_encryption_enabled,
                root_volume_encryption_enabled,
                workspace_properties: Some(WorkspaceProperties {
                    root_volume_size_gib: root_size,
                    user_volume_size_gib,
                    cache_mode: cache,
                }),
            };
            let (c, bar) = with_fill_bar(c);
            let r = c.create_workspaces(vec![req]);
            bar.finish();
            let r: CreateResult = r?;
            emit(output, &r, || {
                print_workspaces(&r.pending_requests);
                for f in &r.failed_requests {
                    println!("FAILED {}: {}", f.error_code, f.error_message);
                }
            });
            if !r.failed_requests.is_empty() {
                return Err(CliError::Failed(r.failed_requests.len()));
            }
        }
        WorkspaceCmd::DescribeWorkspaces { workspace_ids } => {
            let views = global
                .controller()?
                .describe_workspaces(&workspace_ids, true)?;
            emit(output, &serde_json::json!({ "Workspaces": views }), || {
                print_workspaces(&views)
            });
        }
        WorkspaceCmd::DescribeVolumes { workspace_id } => {
            let vols = global
                .controller()?
                .describe_volumes(workspace_id.as_deref())?;
            emit(output, &serde_json::json!({ "Volumes": vols }), || {
                println!(
                    "{:<22} {:<13} {:<5} {:<10} {:>8}  Key",
                    "VolumeId", "WorkspaceId", "Kind", "Encrypted", "SizeGiB"
                );
                for v in &vols {
                    println!(
                        "{:<22} {:<13} {:<5} {:<10} {:>8}  {}",
                        v.volume_id,
                        v.workspace_id,
                        v.kind,
                        if v.encrypted { "yes" } else { "no" },
                        v.size_gib,
                        v.kms_key_id.as_deref().unwrap_or("-")
                    );
                }
            });
        }
        WorkspaceCmd::RecoverWorkspaces => {
            let results = global.controller()?.recover_workspaces()?;
            emit(
                global.output,
                &serde_json::json!({ "Workspaces": results }),
                || {
                    println!(
                        "{:<13} {:<11} {:<11} {:<16} Reason",
                        "WorkspaceId", "Before", "State", "Action"
                    );
                    for r in &results {
                        println!(
                            "{:<13} {:<11} {:<11} {:<16} {}",
                            r.workspace_id,
                            r.previous_state.as_str(),
                            r.state.as_str(),
                            serde_json::to_value(r.action)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default(),
                            r.reason.as_deref().unwrap_or("")
                        );
                    }
                },
            );
            let down = results
                .iter()
                .filter(|r| r.action == RecoveryAction::LeftDown)
                .count();
            if down > 0 {
                return Err(CliError::LeftDown(down));
            }
        }
        WorkspaceCmd::RebootWorkspaces(ids) => {
            let r = global.controller()?.reboot(&ids.workspace_ids)?;
            print_batch("reboot-workspaces", &r, output)?;
        }
        WorkspaceCmd::RebuildWorkspaces(ids) => {
            let (c, bar) = with_fill_bar(global.controller()?);
            let r = c.rebuild(&ids.workspace_ids);
            bar.finish();
            let r = r?;
            print_batch("rebuild-workspaces", &r, output)?;
        }
        WorkspaceCmd::StopWorkspaces(ids) => {
            let r = global.controller()?.stop(&ids.workspace_ids)?;
            print_batch("stop-workspaces", &r, output)?;
        }
        WorkspaceCmd::StartWorkspaces(ids) => {
            let r = global.controller()?.start(&ids.workspace_ids)?;
            print_batch("start-workspaces", &r, output)?;
        }
        WorkspaceCmd::TerminateWorkspaces(ids) => {
            let r = global.controller()?.terminate(&ids.workspace_ids)?;
            print_batch("terminate-workspaces", &r, output)?;
        }
        WorkspaceCmd::RestoreWorkspace { workspace_id } => {
            let (c, bar) = with_snapshot_bar(global.controller()?, "fetching and verifying chunks");
            let r = c.restore(&workspace_id);
            bar.finish();
            print_batch("restore-workspace", &r?, output)?;
        }
        WorkspaceCmd::CreateSnapshot {
            workspace_id,
            automatic,
        } => {
            let (c, bar) =
                with_snapshot_bar(global.controller()?, "reading and uploading changed chunks");
            let snaps = c.create_snapshot(&workspace_id, automatic);
            bar.finish();
            let snaps = snaps?;
            emit(output, &serde_json::json!({ "Snapshots": snaps }), || {
                for s in &snaps {
                    println!(
                        "{} of {} ({} volume, {}) at {}: {} of {} chunks read, {} uploaded ({} bytes)",
                        s.snapshot_id,
                        s.volume_id,
                        s.kind,
                        if s.encrypted {
                            "encrypted"
                        } else {
                            "unencrypted"
                        },
                        s.snapshot_time,
                        s.upload.chunks_read,
                        s.upload.chunks,
                        s.upload.chunks_uploaded,
                        s.upload.bytes_uploaded
                    );
                }
            });
        }
        WorkspaceCmd::DescribeWorkspaceSnapshots { workspace_id } => {
            let v = global.controller()?.describe_snapshots(&workspace_id)?;
            print_json(&v);
        }
        WorkspaceCmd::ImportWorkspace { workspace_id } => {
            let (c, bar) = with_snapshot_bar(global.controller()?, "fetching and verifying chunks");
            let view = c.import_workspace(&workspace_id);
            bar.finish();
            let view = view?;
            print_json(&serde_json::json!({ "Workspace": view }));
        }
        WorkspaceCmd::CreateWorkspaceImage {
            workspace_id,
            name,
            description,
        } => {
            let img = global
                .controller()?
                .create_image(&workspace_id, &name, &description)?;
            print_json(&img);
        }
        WorkspaceCmd::ModifyWorkspaceProperties {
            workspace_id,
            root_volume_encryption_enabled,
            user_volume_encryption_enabled,
            cache,
        } => {
            let c = global.controller()?;
            c.modify_encryption(
                &workspace_id,
                root_volume_encryption_enabled,
                user_volume_encryption_enabled,
            )?;
            match cache {
                Some(mode) => {
                    let changed = c.set_cache_mode(&workspace_id, mode)?;
                    if changed {
                        println!(
                            "{workspace_id}: cache mode {mode} from the next start, reboot, rebuild or restore"
                        );
                    } else {
                        println!("{workspace_id}: cache mode is already {mode}");
                    }
                }
                None => println!("nothing to change"),
            }
        }
        WorkspaceCmd::RewrapVolume {
            workspace_id,
            volume_encryption_key,
        } => {
            let vols = global
                .controller()?
                .rewrap(&workspace_id, &volume_encryption_key)?;
            emit(output, &serde_json::json!({ "Volumes": vols }), || {
                for v in vols.iter().filter(|v| v.encrypted) {
                    println!(
                        "{} ({}) now wrapped under {}",
                        v.volume_id,
                        v.kind,
                        v.kms_key_id.as_deref().unwrap_or("-")
                    );
                }
            });
        }
        WorkspaceCmd::Agent { workspace_id } => {
            Controller::run_agent(
                &global.state_dir,
                &workspace_id,
                &global.ebs_profile,
                &global.kms_target(),
                crate::controller::schedule::Schedule::new(
                    &global.state_dir,
                    &global.controller_config().snapshots,
                ),
                |r| match r {
                    Ok(()) => crate::agent::report_ready(),
                    Err(e) => crate::agent::report_error(&e),
                },
            )?;
        }
    }
    Ok(())
}
