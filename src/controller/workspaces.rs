//! WorkSpace operations: the verbs of the WorkSpaces API over the registry, the KMS and
//! the agents. Batch verbs return per-item `FailedRequests`; a refused item changes
//! nothing.

use std::path::{Path, PathBuf};

use crate::kms::{FORWARDING_SERVICE, ForwardAccessToken, KeyInfo, KmsClient, KmsTarget};
use crate::volume;

use super::agent::{self, AgentPaths};
use super::api::{VolumeView, WorkspaceProperties, WorkspaceView};
use super::error::{ApiErrorCode, ControllerError, api};
use super::registry::{Registry, Workspace};
use super::schedule::SnapshotConfig;
use super::state::{Event, WorkspaceState};

/// Where state lives and which profiles sign.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// State directory.
    pub state_dir: PathBuf,
    /// The administrator's profile (`--profile`).
    pub admin_profile: String,
    /// The WorkSpaces service's profile.
    pub service_profile: String,
    /// The EBS service's profile.
    pub ebs_profile: String,
    /// Region and endpoint overrides (`--region`, `--endpoint-url`) for every KMS client
    /// the controller builds and every agent it starts.
    pub kms: KmsTarget,
    /// The snapshot store and schedule.
    pub snapshots: SnapshotConfig,
}

/// The controller.
pub struct Controller {
    pub(super) cfg: ControllerConfig,
    pub(super) reg: Registry,
    /// Told (bytes done, total) while a root volume is filled from its bundle.
    pub(super) fill_progress: Option<FillProgress>,
    /// Told (bytes done, total) while a snapshot is read and uploaded, or fetched.
    pub(super) snapshot_progress: Option<FillProgress>,
}

/// A callback told (bytes done, total bytes) while a root volume is filled from its
/// bundle image; the caller draws (or not), the controller never does.
pub type FillProgress = Box<dyn Fn(u64, u64) + Send + Sync>;

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("cfg", &self.cfg)
            .field("reg", &self.reg)
            .finish_non_exhaustive()
    }
}

/// Takes an exclusive `flock` on the (private, created if missing) file at `path`,
/// waiting for it when `wait`; `None` when it is held elsewhere and `wait` is false.
pub(super) fn lock_file(
    path: &Path,
    wait: bool,
) -> Result<Option<nix::fcntl::Flock<std::fs::File>>, ControllerError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ControllerError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let how = if wait {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockExclusiveNonblock
    };
    match Flock::lock(file, how) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) if !wait => Ok(None),
        Err((_, e)) => Err(io(e.into())),
    }
}

pub(super) fn copy_sparse(from: &Path, to: &Path) -> Result<(), ControllerError> {
    crate::host::run(
        "cp",
        &[
            "--sparse=always",
            "--reflink=auto",
            &from.display().to_string(),
            &to.display().to_string(),
        ],
    )
    .map(|_| ())
    .map_err(ControllerError::from)
}

impl Controller {
    /// Opens the controller over `cfg.state_dir`; it and its subdirectories are made
    /// private (0700, ours) whether or not they existed.
    ///
    /// # Errors
    /// State directory (e.g. owned by another user) or database failure.
    pub fn open(cfg: ControllerConfig) -> Result<Self, ControllerError> {
        for sub in [
            "",
            "volumes",
            "bundles",
            "snapshots",
            "images",
            "agents",
            "fuse",
            "mnt",
        ] {
            crate::private_file::ensure_dir(&cfg.state_dir.join(sub))
                .map_err(ControllerError::from)?;
        }
        let reg = Registry::open(&cfg.state_dir)?;
        Ok(Self {
            cfg,
            reg,
            fill_progress: None,
            snapshot_progress: None,
        })
    }

    /// Reports the progress of filling root volumes from bundles (launch, rebuild) to `f`.
    pub fn on_fill_progress(&mut self, f: FillProgress) {
        self.fill_progress = Some(f);
    }

    /// Reports the progress of snapshot uploads and fetches (bytes of chunks) to `f`.
    pub fn on_snapshot_progress(&mut self, f: FillProgress) {
        self.snapshot_progress = Some(f);
    }

    /// The registry.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.reg
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> &ControllerConfig {
        &self.cfg
    }

    /// The WorkSpaces service acting for the administrator, carrying a forward-access
    /// token the administrator's own credentials signed (no credentials, no client).
    pub(super) fn service_for_admin(&self) -> Result<KmsClient, ControllerError> {
        let token = ForwardAccessToken::presign(
            &self.cfg.admin_profile,
            FORWARDING_SERVICE,
            &self.cfg.kms,
        )?;
        Ok(KmsClient::connect_forwarding(
            &self.cfg.service_profile,
            &token,
            &self.cfg.kms,
        )?)
    }

    /// Proves the caller is who `--profile` says before a verb changes anything: the
    /// KMS verifies the forward-access token the caller's credentials signed.
    pub(super) fn authenticate_caller(&self) -> Result<(), ControllerError> {
        self.service_for_admin()?.verify_forward_access()?;
        Ok(())
    }

    pub(super) fn service(&self) -> Result<KmsClient, ControllerError> {
        Ok(KmsClient::connect_to(
            &self.cfg.service_profile,
            &self.cfg.kms,
        )?)
    }

    pub(super) fn ebs(&self) -> Result<KmsClient, ControllerError> {
        Ok(KmsClient::connect_to(&self.cfg.ebs_profile, &self.cfg.kms)?)
    }

    pub(super) fn view(&self, w: &Workspace, key: Option<&KeyInfo>) -> WorkspaceView {
        let paths = AgentPaths::new(&self.cfg.state_dir, &w.workspace_id);
        WorkspaceView {
            workspace_id: w.workspace_id.clone(),
            directory_id: w.directory_id.clone(),
            user_name: w.user_name.clone(),
            state: w.state,
            bundle_id: w.bundle_id.clone(),
            volume_encryption_key: w.key_arn.clone(),
            root_volume_encryption_enabled: w.root_encrypted,
            user_volume_encryption_enabled: w.user_encrypted,
            workspace_properties: WorkspaceProperties {
                root_volume_size_gib: w.root_size_gib,
                user_volume_size_gib: w.user_size_gib,
                cache_mode: Some(w.cache_mode),
            },
            error_message: w.error.clone(),
            mount_point: w
                .state
                .is_running()
                .then(|| paths.mnt_dir.display().to_string()),
            key_warning: key.and_then(|k| {
                (k.state != "Enabled").then(|| {
                    format!(
                        "KMS key {} is {}: reboot, rebuild, start and restore will be refused",
                        k.arn, k.state
                    )
                })
            }),
        }
    }

    /// The WorkSpace `workspace_id`, or the API's ResourceNotFound refusal.
    pub(super) fn existing_workspace(
        &self,
        workspace_id: &str,
    ) -> Result<Workspace, ControllerError> {
        self.reg.workspace(workspace_id)?.ok_or_else(|| {
            api(
                ApiErrorCode::ResourceNotFound,
                format!("WorkSpace {workspace_id} does not exist"),
            )
        })
    }

    /// Where the file of volume `volume_id` lives.
    pub(super) fn volume_path(&self, volume_id: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join("volumes")
            .join(format!("{volume_id}.img"))
    }

    pub(super) fn start_agent(&self, workspace_id: &str) -> Result<(), String> {
        let paths = AgentPaths::new(&self.cfg.state_dir, workspace_id);
        agent::force_cleanup(&paths);
        let mut args: Vec<std::ffi::OsString> = vec![
            "agent".into(),
            "--state-dir".into(),
            self.cfg.state_dir.clone().into(),
            "--workspace-id".into(),
            workspace_id.into(),
            "--ebs-profile".into(),
            self.cfg.ebs_profile.clone().into(),
        ];
        // The agent's own KMS client goes where ours do (the rest of its environment,
        // AWS_* included, is inherited).
        if let Some(r) = &self.cfg.kms.region {
            args.extend(["--region".into(), r.into()]);
        }
        if let Some(u) = &self.cfg.kms.endpoint_url {
            args.extend(["--endpoint-url".into(), u.into()]);
        }
        args.extend(self.cfg.snapshots.args());
        crate::agent::spawn_agent(&args, Some(&paths.log))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    pub(super) fn teardown(&self, ws: &Workspace) {
        let paths = AgentPaths::new(&self.cfg.state_dir, &ws.workspace_id);
        agent::stop(&paths);
        let vols = self.reg.volumes(Some(&ws.workspace_id)).unwrap_or_default();
        if let Ok(service) = self.service() {
            for v in &vols {
                if let (Some(key), Some(grant)) = (v.key_arn.as_deref(), v.grant_id.as_deref())
                    && let Err(e) = service.retire_grant(key, grant)
                {
                    tracing::warn!("retiring EBS grant {grant} of {}: {e}", v.volume_id);
                }
            }
            if let (Some(key), Some(grant)) = (ws.key_arn.as_deref(), ws.ws_grant_id.as_deref())
                && let Err(e) = service.retire_grant(key, grant)
            {
                tracing::warn!("retiring WorkSpaces grant {grant}: {e}");
            }
        }
        for v in &vols {
            let _ = std::fs::remove_file(crate::snapshot::dirty::DirtyMap::path_for(&v.path));
            let _ = std::fs::remove_file(&v.path);
            let _ = self.reg.delete_volume(&v.volume_id);
        }
        // The store's snapshots stay: they belong to the service, another host may import
        // the WorkSpace from them, and retention collects them. Only this host's rows go.
        let _ = self.reg.delete_snapshots(&ws.workspace_id);
        let _ = std::fs::remove_file(
            self.cfg
                .state_dir
                .join("agents")
                .join(format!("{}.snapshot.lock", ws.workspace_id)),
        );
        let _ = std::fs::remove_dir(&paths.mnt_dir);
        let _ = std::fs::remove_dir(&paths.fuse_dir);
    }

    /// Marks running WorkSpaces whose agent died as UNHEALTHY.
    pub(super) fn refresh(&self, w: &mut Workspace) {
        if matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Impaired
        ) && agent::live_pid(&AgentPaths::new(&self.cfg.state_dir, &w.workspace_id)).is_none()
            && let Ok(next) = w.state.on(Event::AgentLost)
        {
            w.state = next;
            w.error =
                Some("the WorkSpace's agent is not running; reboot-workspaces (or recover-workspaces, for every WorkSpace after a host restart) brings it back".into());
            let _ = self.reg.update_workspace(w);
        }
    }

    /// `describe-workspaces`.
    ///
    /// # Errors
    /// Database failure.
    pub fn describe_workspaces(
        &self,
        ids: &[String],
        check_keys: bool,
    ) -> Result<Vec<WorkspaceView>, ControllerError> {
        let client = if check_keys {
            self.service_for_admin().ok()
        } else {
            None
        };
        let mut out = Vec::new();
        for mut w in self.reg.workspaces()? {
            if !ids.is_empty() && !ids.contains(&w.workspace_id) {
                continue;
            }
            if ids.is_empty() && w.state == WorkspaceState::Terminated {
                continue;
            }
            self.refresh(&mut w);
            let key = match (&client, w.key_arn.as_deref(), w.state) {
                (Some(c), Some(arn), s) if s != WorkspaceState::Terminated => {
                    c.describe_key(arn).ok()
                }
                _ => None,
            };
            out.push(self.view(&w, key.as_ref()));
        }
        Ok(out)
    }

    /// `describe-volumes`.
    ///
    /// # Errors
    /// Database failure.
    pub fn describe_volumes(
        &self,
        workspace_id: Option<&str>,
    ) -> Result<Vec<VolumeView>, ControllerError> {
        Ok(self
            .reg
            .volumes(workspace_id)?
            .into_iter()
            .map(|v| {
                let ctx = volume::read_header(&v.path)
                    .ok()
                    .and_then(|h| h.kms_token().map(|t| t.encryption_context.clone()));
                let kms_key_id = v.key_arn.clone();
                let kind = v.kind;
                VolumeView {
                    volume_id: v.volume_id,
                    workspace_id: v.workspace_id,
                    kind,
                    encrypted: v.encrypted,
                    kms_key_id,
                    size_gib: v.size_gib,
                    path: v.path.display().to_string(),
                    encryption_context: ctx,
                }
            })
            .collect())
    }

    /// The agent entry point (`sealvol agent`).
    ///
    /// # Errors
    /// Whatever stops the agent from serving.
    pub fn run_agent(
        state_dir: &Path,
        workspace_id: &str,
        ebs_profile: &str,
        kms: &crate::kms::KmsTarget,
        schedule: Option<super::schedule::Schedule>,
        on_ready: impl FnOnce(Result<(), String>) + Send + 'static,
    ) -> Result<(), ControllerError> {
        let ws = workspace_id.to_string();
        let on_ready = move |r: Result<(), String>| {
            if let (Ok(()), Some(s)) = (&r, schedule) {
                s.spawn(ws);
            }
            on_ready(r);
        };
        agent::run(state_dir, workspace_id, ebs_profile, kms, on_ready)
            .map_err(|e| ControllerError::Agent(Box::new(e)))
    }
}
