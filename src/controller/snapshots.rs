//! Snapshots of a WorkSpace's volumes in the snapshot store (DESIGN §11), and images.
//!
//! A running WorkSpace is snapshotted crash-consistently without stopping its I/O for
//! longer than a barrier: both filesystems are frozen, each agent opens a snapshot view
//! (copy-before-write of the chunks still to be read), the filesystems are thawed, and the
//! upload then reads the view while the WorkSpace runs. A stopped (or unhealthy) WorkSpace
//! is read from its files. Only chunks the agent saw change since the parent are read;
//! when that is unknown (a crash lost the map) every chunk is hashed and compared.

use std::path::{Path, PathBuf};

use nix::fcntl::Flock;

use crate::agent::{Begun, SnapshotSession};
use crate::snapshot::CHUNK_BYTES;
use crate::snapshot::dirty::{Changes, DirtyMap};
use crate::snapshot::download::{self, DownloadError};
use crate::snapshot::manifest::{self, FORMAT, Manifest, ManifestError, WorkspaceMeta};
use crate::snapshot::retention;
use crate::snapshot::store::{self, SnapshotStore, StoreError};
use crate::snapshot::upload::{self, ChunkSource, FileSource, Plan, UploadError};
use crate::volume;

use super::agent::{self, AgentPaths};
use super::api::SnapshotView;
use super::error::{ApiError, ApiErrorCode, ControllerError, api};
use super::ids;
use super::kind::VolumeKind;
use super::registry::{Registry, Snapshot, User, Volume, Workspace};
use super::state::WorkspaceState;
use super::workspaces::{Controller, copy_sparse, lock_file};

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match e {
            StoreError::NotFound { .. } => ApiErrorCode::SnapshotCorrupted,
            _ => ApiErrorCode::SnapshotStoreUnavailable,
        };
        Self::new(code, e.to_string())
    }
}

impl From<ManifestError> for ApiError {
    fn from(e: ManifestError) -> Self {
        Self::new(ApiErrorCode::SnapshotCorrupted, e.to_string())
    }
}

impl From<DownloadError> for ApiError {
    fn from(e: DownloadError) -> Self {
        match e {
            DownloadError::Store(s) => s.into(),
            DownloadError::Io { .. } => Self::internal(e),
            DownloadError::Corrupted { .. } | DownloadError::Missing { .. } => {
                Self::new(ApiErrorCode::SnapshotCorrupted, e.to_string())
            }
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> Self {
        match e {
            UploadError::Store(s) => s.into(),
            UploadError::Read { .. } => Self::internal(e),
        }
    }
}

/// Chunks served by the WorkSpace's agent through its snapshot view.
struct AgentSource {
    session: SnapshotSession,
    begun: Begun,
}

impl ChunkSource for AgentSource {
    fn file_size(&self) -> u64 {
        self.begun.file_size
    }

    fn read(&mut self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        self.session.read(chunk, buf).map_err(|e| e.to_string())
    }
}

/// Where one volume's chunks come from, and how its change map is committed.
enum Source {
    Agent(AgentSource),
    File {
        file: FileSource,
        path: PathBuf,
        changed: Option<Vec<u64>>,
    },
}

impl Source {
    fn changed(&self) -> Option<&[u64]> {
        match self {
            Self::Agent(a) => a.begun.changed.as_deref(),
            Self::File { changed, .. } => changed.as_deref(),
        }
    }

    fn chunks(&mut self) -> &mut dyn ChunkSource {
        match self {
            Self::Agent(a) => a,
            Self::File { file, .. } => file,
        }
    }

    /// The snapshot `key` is complete: changes are now counted from it.
    fn commit(self, key: &str) -> Result<(), ApiError> {
        match self {
            Self::Agent(a) => a.session.end(Some(key)).map_err(ApiError::internal),
            Self::File { file, path, .. } => {
                let chunks = file.file_size().div_ceil(CHUNK_BYTES);
                DirtyMap::reset(&path, chunks, key).map_err(ApiError::internal)
            }
        }
    }
}

/// Freezes filesystems; thaws them when dropped, whatever happens in between.
struct Frozen(Vec<PathBuf>);

impl Frozen {
    fn freeze(mounts: Vec<PathBuf>) -> Result<Self, ControllerError> {
        let mut done = Self(Vec::new());
        for m in mounts {
            crate::host::run("fsfreeze", &["-f", &m.display().to_string()])?;
            done.0.push(m);
        }
        Ok(done)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = crate::host::run("fsfreeze", &["-u", &m.display().to_string()]);
        }
    }
}

impl Controller {
    /// The snapshot store this controller is configured with.
    pub(super) fn snapshot_store(&self) -> Result<Box<dyn SnapshotStore>, ApiError> {
        let s = &self.cfg.snapshots;
        Ok(store::open(&s.store, Some(&s.store_profile))?)
    }

    /// `create-snapshot`: snapshots both volumes (only the user volume while the WorkSpace
    /// is UNHEALTHY) into the store, incrementally; then applies retention.
    ///
    /// # Errors
    /// Unknown WorkSpace, bad state, store or agent failure. A failed snapshot leaves no
    /// manifest, and its change map is kept, so the next one uploads what this one did
    /// not.
    pub fn create_snapshot(
        &self,
        workspace_id: &str,
        automatic: bool,
    ) -> Result<Vec<SnapshotView>, ControllerError> {
        let mut w = self.existing_workspace(workspace_id)?;
        // One snapshot of a WorkSpace at a time: one asked for by hand waits for a running
        // one; an automatic one is skipped while another runs.
        let _one_at_a_time = self.snapshot_lock(workspace_id, !automatic)?;
        self.refresh(&mut w);
        let kinds: &[VolumeKind] = match w.state {
            WorkspaceState::Available | WorkspaceState::Stopped | WorkspaceState::Impaired => {
                &[VolumeKind::Root, VolumeKind::User]
            }
            WorkspaceState::Unhealthy => &[VolumeKind::User],
            _ => {
                return Err(api(
                    ApiErrorCode::InvalidResourceState,
                    format!(
                        "cannot snapshot WorkSpace {workspace_id} while it is {}",
                        w.state
                    ),
                ));
            }
        };
        let user = self
            .reg
            .user(&w.directory_id, &w.user_name)?
            .ok_or_else(|| ControllerError::UserVanished(w.user_name.clone()))?;
        let store = self.snapshot_store()?;
        let vols: Vec<Volume> = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .filter(|v| kinds.contains(&v.kind))
            .collect();
        let mut parents = Vec::new();
        for v in &vols {
            parents.push(self.parent(store.as_ref(), workspace_id, v.kind)?);
        }
        let paths = AgentPaths::new(&self.cfg.state_dir, workspace_id);
        let live = matches!(
            w.state,
            WorkspaceState::Available | WorkspaceState::Impaired
        ) && agent::live_pid(&paths).is_some();
        let sources = if live {
            self.views(&paths, &vols, &parents)?
        } else {
            vols.iter()
                .zip(&parents)
                .map(|(v, p)| file_source(v, p.as_ref().map(|(k, _)| k.as_str())))
                .collect::<Result<Vec<_>, _>>()?
        };
        // Past the barrier (filesystems thawed): the upload is background work.
        crate::host::lower_priority_of_process(10);
        let time = manifest::snapshot_time(std::time::SystemTime::now());
        let meta = workspace_meta(&w, &user);
        // Every volume's chunks first, then the manifests: an interrupted snapshot leaves
        // none, so a point in time has snapshots of both volumes or of neither.
        let mut taken = Vec::new();
        for ((v, parent), mut source) in vols.iter().zip(&parents).zip(sources) {
            let (m, stats) = self.snapshot_volume(
                store.as_ref(),
                v,
                parent.as_ref().map(|(k, m)| (k.as_str(), m)),
                &mut source,
                &time,
                &meta,
                automatic,
            )?;
            taken.push((v, m, stats, source));
        }
        let mut views = Vec::new();
        for (v, m, stats, source) in taken {
            let key = m.own_key();
            store.put(&key, &m.clone().seal()).map_err(ApiError::from)?;
            source.commit(&key)?;
            self.reg.add_snapshot(&Snapshot {
                snapshot_id: m.snapshot_id.clone(),
                volume_id: v.volume_id.clone(),
                workspace_id: workspace_id.into(),
                kind: v.kind,
                path: PathBuf::from(&key),
                created: Registry::now(),
            })?;
            views.push(SnapshotView {
                snapshot_id: m.snapshot_id,
                volume_id: v.volume_id.clone(),
                kind: v.kind,
                encrypted: v.encrypted,
                snapshot_time: time.clone(),
                manifest: key,
                automatic,
                upload: stats,
            });
        }
        for v in &vols {
            if let Err(e) = retention::prune(
                store.as_ref(),
                workspace_id,
                &v.kind.to_string(),
                self.cfg.snapshots.keep,
                self.cfg.snapshots.gc_grace,
            ) {
                tracing::warn!("snapshot retention for {workspace_id}: {e}");
            }
        }
        Ok(views)
    }

    fn snapshot_lock(
        &self,
        workspace_id: &str,
        wait: bool,
    ) -> Result<Flock<std::fs::File>, ControllerError> {
        let path = self
            .cfg
            .state_dir
            .join("agents")
            .join(format!("{workspace_id}.snapshot.lock"));
        lock_file(&path, wait)?.ok_or_else(|| {
            api(
                ApiErrorCode::InvalidResourceState,
                format!("a snapshot of WorkSpace {workspace_id} is already running"),
            )
        })
    }

    /// Opens a consistent view of each volume in its agent: filesystems frozen only for
    /// the barrier.
    fn views(
        &self,
        paths: &AgentPaths,
        vols: &[Volume],
        parents: &[Option<(String, Manifest)>],
    ) -> Result<Vec<Source>, ControllerError> {
        let mounts = vols
            .iter()
            .rev()
            .map(|v| match v.kind {
                VolumeKind::User => paths.mnt_dir.join("home"),
                VolumeKind::Root => paths.mnt_dir.clone(),
            })
            .collect();
        let frozen = Frozen::freeze(mounts)?;
        let mut sources = Vec::new();
        for (v, parent) in vols.iter().zip(parents) {
            let (session, begun) =
                agent::begin_snapshot(paths, v.kind, parent.as_ref().map(|(k, _)| k.as_str()))
                    .map_err(|e| {
                        api(
                            ApiErrorCode::InvalidResourceState,
                            format!("cannot snapshot the {} volume: {e}", v.kind),
                        )
                    })?;
            sources.push(Source::Agent(AgentSource { session, begun }));
        }
        drop(frozen);
        Ok(sources)
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "one volume's snapshot, spelled out"
    )]
    fn snapshot_volume(
        &self,
        store: &dyn SnapshotStore,
        v: &Volume,
        parent: Option<(&str, &Manifest)>,
        source: &mut Source,
        time: &str,
        meta: &WorkspaceMeta,
        automatic: bool,
    ) -> Result<(Manifest, upload::UploadStats), ApiError> {
        let header = if v.encrypted {
            let h = volume::read_header(&v.path).map_err(ApiError::internal)?;
            if crate::rekey::in_progress(&h) {
                return Err(ApiError::new(
                    ApiErrorCode::InvalidResourceState,
                    format!(
                        "volume {} is being rekeyed; snapshot it once the rekey finishes",
                        v.volume_id
                    ),
                ));
            }
            Some(h)
        } else {
            None
        };
        let always = header
            .as_ref()
            .map_or(0, |h| h.data_offset().div_ceil(CHUNK_BYTES));
        let changed = source.changed().map(<[u64]>::to_vec);
        let plan = Plan {
            parent: parent.map(|(_, m)| m),
            changed: changed.as_deref(),
            always,
        };
        let progress = self.snapshot_progress.as_deref();
        let report = move |done: u64, total: u64| {
            if let Some(p) = progress {
                p(done * CHUNK_BYTES, total * CHUNK_BYTES);
            }
        };
        let (chunks, stats) =
            upload::upload(store, source.chunks(), &plan, &report).map_err(ApiError::from)?;
        let file_size = source.chunks().file_size();
        Ok((
            Manifest {
                format: FORMAT,
                snapshot_id: ids::snapshot_id(),
                snapshot_time: time.into(),
                volume_kind: v.kind.to_string(),
                volume_id: v.volume_id.clone(),
                encrypted: v.encrypted,
                kms: header.and_then(|h| h.kms_token().cloned()),
                parent: parent.map(|(k, _)| k.to_string()),
                automatic,
                file_size,
                chunk_bytes: CHUNK_BYTES,
                chunks,
                workspace: meta.clone(),
                digest: String::new(),
            },
            stats,
        ))
    }

    /// The newest readable manifest of a volume kind, to diff against. An unreadable
    /// newest manifest is passed over (the new snapshot then uploads in full).
    fn parent(
        &self,
        store: &dyn SnapshotStore,
        workspace_id: &str,
        kind: VolumeKind,
    ) -> Result<Option<(String, Manifest)>, ApiError> {
        let keys = retention::manifests(store, workspace_id, &kind.to_string())?;
        let Some(key) = keys.last() else {
            return Ok(None);
        };
        match Manifest::open(key, &store.get(key)?) {
            Ok(m) => Ok(Some((key.clone(), m))),
            Err(e) => {
                tracing::warn!("{e}; this snapshot is taken in full");
                Ok(None)
            }
        }
    }

    /// The newest snapshot of `kind`, checked (digest, owner).
    pub(super) fn latest_snapshot(
        &self,
        store: &dyn SnapshotStore,
        w: &Workspace,
        user: &User,
        kind: VolumeKind,
    ) -> Result<Option<Manifest>, ApiError> {
        let keys = retention::manifests(store, &w.workspace_id, &kind.to_string())?;
        let Some(key) = keys.last() else {
            return Ok(None);
        };
        let m = Manifest::open(key, &store.get(key)?)?;
        check_owner(&m, w, user)?;
        Ok(Some(m))
    }

    /// The newest point in time with snapshots of both volumes (a restore snapshot).
    pub(super) fn latest_restore_point(
        &self,
        store: &dyn SnapshotStore,
        workspace_id: &str,
    ) -> Result<Option<(Manifest, Manifest)>, ApiError> {
        let users = retention::snapshot_times(store, workspace_id, "user")?;
        let Some(time) = retention::snapshot_times(store, workspace_id, "root")?
            .into_iter()
            .rev()
            .find(|t| users.contains(t))
        else {
            return Ok(None);
        };
        let root_key = &Manifest::key(workspace_id, "root", &time);
        let user_key = Manifest::key(workspace_id, "user", &time);
        let root = Manifest::open(root_key, &store.get(root_key)?)?;
        let user = Manifest::open(&user_key, &store.get(&user_key)?)?;
        Ok(Some((root, user)))
    }

    /// Writes the volume file a snapshot describes at `dest`; nothing is left there on
    /// failure. (The caller resets its change map once the file is final.)
    pub(super) fn fetch_volume(
        &self,
        store: &dyn SnapshotStore,
        m: &Manifest,
        dest: &Path,
    ) -> Result<(), ApiError> {
        let progress = self.snapshot_progress.as_deref();
        let chunk = m.chunk_bytes;
        let report = move |done: u64, total: u64| {
            if let Some(p) = progress {
                p(done * chunk, total * chunk);
            }
        };
        download::download(store, m, dest, &report)?;
        Ok(())
    }

    /// `describe-workspace-snapshots`: the snapshots rebuild (user volume) and restore
    /// (both volumes, taken together) can use, newest first, as the AWS CLI prints them.
    ///
    /// # Errors
    /// Store failure; an unknown WorkSpace with no snapshots.
    pub fn describe_snapshots(
        &self,
        workspace_id: &str,
    ) -> Result<serde_json::Value, ControllerError> {
        let store = self.snapshot_store()?;
        let users = retention::snapshot_times(store.as_ref(), workspace_id, "user")
            .map_err(ApiError::from)?;
        let roots = retention::snapshot_times(store.as_ref(), workspace_id, "root")
            .map_err(ApiError::from)?;
        if users.is_empty() && roots.is_empty() && self.reg.workspace(workspace_id)?.is_none() {
            return Err(api(
                ApiErrorCode::ResourceNotFound,
                format!(
                    "WorkSpace {workspace_id} does not exist here and has no snapshots in {}",
                    store.describe()
                ),
            ));
        }
        let entry = |t: &String| serde_json::json!({ "SnapshotTime": t });
        let rebuild: Vec<_> = users.iter().rev().map(entry).collect();
        let restore: Vec<_> = users
            .iter()
            .rev()
            .filter(|t| roots.contains(t))
            .map(entry)
            .collect();
        Ok(serde_json::json!({ "RebuildSnapshots": rebuild, "RestoreSnapshots": restore }))
    }

    /// `create-workspace-image`: refused for encrypted WorkSpaces (as the API does).
    ///
    /// # Errors
    /// Encrypted or unknown WorkSpace, copy failure.
    pub fn create_image(
        &self,
        workspace_id: &str,
        name: &str,
        description: &str,
    ) -> Result<serde_json::Value, ControllerError> {
        let w = self.existing_workspace(workspace_id)?;
        if w.root_encrypted || w.user_encrypted {
            return Err(api(
                ApiErrorCode::OperationNotSupported,
                format!(
                    "WorkSpace {workspace_id} has encrypted volumes; images cannot be created from encrypted WorkSpaces"
                ),
            ));
        }
        if !matches!(w.state, WorkspaceState::Available | WorkspaceState::Stopped) {
            return Err(api(
                ApiErrorCode::InvalidResourceState,
                format!("WorkSpace {workspace_id} is {}", w.state),
            ));
        }
        let root = self
            .reg
            .volumes(Some(workspace_id))?
            .into_iter()
            .find(|v| v.kind == VolumeKind::Root)
            .ok_or_else(|| ControllerError::NoRootVolume)?;
        let image_id = ids::image_id();
        let path = self
            .cfg
            .state_dir
            .join("images")
            .join(format!("{image_id}.img"));
        copy_sparse(&root.path, &path)?;
        self.reg
            .add_image(&image_id, name, description, workspace_id, &path)?;
        Ok(
            serde_json::json!({"ImageId": image_id, "Name": name, "Description": description, "State": "AVAILABLE", "OperatingSystem": {"Type": "LINUX"}}),
        )
    }
}

fn file_source(v: &Volume, parent: Option<&str>) -> Result<Source, ControllerError> {
    let file = FileSource::open(&v.path).map_err(|source| ControllerError::Io {
        path: v.path.clone(),
        source,
    })?;
    let changed = match DirtyMap::load_changes(&v.path) {
        Ok(Changes::Since { base, chunks }) if Some(base.as_str()) == parent => Some(chunks),
        _ => None,
    };
    Ok(Source::File {
        file,
        path: v.path.clone(),
        changed,
    })
}

pub(super) fn workspace_meta(w: &Workspace, user: &User) -> WorkspaceMeta {
    WorkspaceMeta {
        workspace_id: w.workspace_id.clone(),
        directory_id: w.directory_id.clone(),
        user_name: w.user_name.clone(),
        user_sid: user.sid.clone(),
        bundle_id: w.bundle_id.clone(),
        key_arn: w.key_arn.clone(),
        root_encrypted: w.root_encrypted,
        user_encrypted: w.user_encrypted,
        root_size_gib: w.root_size_gib,
        user_size_gib: w.user_size_gib,
    }
}

/// A snapshot restores only into the WorkSpace, user and directory it was taken of.
pub(super) fn check_owner(m: &Manifest, w: &Workspace, user: &User) -> Result<(), ApiError> {
    let o = &m.workspace;
    if o.workspace_id != w.workspace_id
        || o.directory_id != w.directory_id
        || o.user_sid != user.sid
        || o.user_name != w.user_name
    {
        return Err(ApiError::new(
            ApiErrorCode::InvalidResourceState,
            format!(
                "snapshot {} belongs to WorkSpace {} of user {} in {}, not to {} of {} in {}; nothing was restored",
                m.own_key(),
                o.workspace_id,
                o.user_name,
                o.directory_id,
                w.workspace_id,
                w.user_name,
                w.directory_id
            ),
        ));
    }
    Ok(())
}
