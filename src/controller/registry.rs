//! The controller's durable registry: `<state-dir>/controller.db` (SQLite, WAL,
//! synchronous=FULL). Directories, users, bundles, workspaces, volumes, snapshots, images.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};

use super::kind::VolumeKind;
use super::state::WorkspaceState;
use crate::backing::CacheMode;

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// SQLite failed.
    #[error("controller database {path}: {source}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// The error.
        source: rusqlite::Error,
    },
    /// The database file cannot be created private.
    #[error("controller database {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A stored value is unreadable.
    #[error("controller database holds a bad value: {0}")]
    Corrupt(String),
}

/// A registered user.
#[derive(Debug, Clone)]
pub struct User {
    /// Directory id (`d-...`).
    pub directory_id: String,
    /// User name.
    pub user_name: String,
    /// Windows-style SID.
    pub sid: String,
}

/// A bundle: an ext4 root image.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Bundle id (`wsb-...`).
    pub bundle_id: String,
    /// Image file.
    pub image_path: PathBuf,
    /// Image size in GiB.
    pub size_gib: u64,
}

/// A workspace row.
#[derive(Debug, Clone)]
pub struct Workspace {
    /// `ws-...`.
    pub workspace_id: String,
    /// `d-...`.
    pub directory_id: String,
    /// User name.
    pub user_name: String,
    /// `wsb-...`.
    pub bundle_id: String,
    /// Lifecycle state.
    pub state: WorkspaceState,
    /// KMS key ARN (`None` when nothing is encrypted).
    pub key_arn: Option<String>,
    /// Root volume encrypted.
    pub root_encrypted: bool,
    /// User volume encrypted.
    pub user_encrypted: bool,
    /// Root size.
    pub root_size_gib: u64,
    /// User size.
    pub user_size_gib: u64,
    /// The WorkSpaces service grant on the key, if it has one.
    pub ws_grant_id: Option<String>,
    /// Last error message, if any.
    pub error: Option<String>,
    /// How the agent caches the volume files on the host (from the next start).
    pub cache_mode: CacheMode,
}

/// A volume row.
#[derive(Debug, Clone)]
pub struct Volume {
    /// `vol-...`.
    pub volume_id: String,
    /// Owning workspace.
    pub workspace_id: String,
    /// Root or user volume.
    pub kind: VolumeKind,
    /// Volume file.
    pub path: PathBuf,
    /// Encrypted.
    pub encrypted: bool,
    /// KMS key ARN (`None` when the volume is not encrypted).
    pub key_arn: Option<String>,
    /// The EBS grant for this volume's context, if it has one.
    pub grant_id: Option<String>,
    /// Size.
    pub size_gib: u64,
    /// Whether the user volume already holds a filesystem.
    pub formatted: bool,
}

/// A snapshot row.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// `snap-...`.
    pub snapshot_id: String,
    /// Source volume.
    pub volume_id: String,
    /// Source workspace.
    pub workspace_id: String,
    /// Which volume it copies.
    pub kind: VolumeKind,
    /// Snapshot file (ciphertext + header).
    pub path: PathBuf,
    /// Unix seconds.
    pub created: i64,
}

/// The registry.
#[derive(Debug)]
pub struct Registry {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS directories (directory_id TEXT PRIMARY KEY, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS users (directory_id TEXT NOT NULL, user_name TEXT NOT NULL, sid TEXT NOT NULL,
  PRIMARY KEY (directory_id, user_name));
CREATE TABLE IF NOT EXISTS bundles (bundle_id TEXT PRIMARY KEY, image_path TEXT NOT NULL, size_gib INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS workspaces (workspace_id TEXT PRIMARY KEY, directory_id TEXT NOT NULL,
  user_name TEXT NOT NULL, bundle_id TEXT NOT NULL, state TEXT NOT NULL, key_arn TEXT NOT NULL,
  root_encrypted INTEGER NOT NULL, user_encrypted INTEGER NOT NULL, root_size_gib INTEGER NOT NULL,
  user_size_gib INTEGER NOT NULL, ws_grant_id TEXT NOT NULL, error TEXT NOT NULL DEFAULT '',
  created INTEGER NOT NULL, cache_mode TEXT NOT NULL DEFAULT 'writeback');
CREATE TABLE IF NOT EXISTS volumes (volume_id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, kind TEXT NOT NULL,
  path TEXT NOT NULL, encrypted INTEGER NOT NULL, key_arn TEXT NOT NULL, grant_id TEXT NOT NULL,
  size_gib INTEGER NOT NULL, formatted INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS snapshots (snapshot_id TEXT PRIMARY KEY, volume_id TEXT NOT NULL,
  workspace_id TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS images (image_id TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL,
  workspace_id TEXT NOT NULL, path TEXT NOT NULL, created INTEGER NOT NULL);
";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// An optional text column as stored: the columns are `NOT NULL` and hold "" for "none"
/// (the on-disk format predates the `Option` fields), so `None` is written as "".
fn to_column(v: Option<&str>) -> &str {
    v.unwrap_or("")
}

/// An optional text column as read: "" is `None`.
fn from_column(v: String) -> Option<String> {
    (!v.is_empty()).then_some(v)
}

/// Creates the database file 0600 before SQLite opens it (SQLite would create it with the
/// umask's mode, readable by others until a chmod), never through a symlink; an existing
/// file is made 0600.
fn create_private(path: &Path) -> Result<(), RegistryError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |e: std::io::Error| RegistryError::Io {
        path: path.to_path_buf(),
        source: e,
    };
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)
}

/// Columns added after a table was first created: a database from an older sealvol gets
/// them with their default (`cache_mode`: `writeback`, how its WorkSpaces ran).
fn add_missing_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has_cache_mode = conn
        .prepare("SELECT 1 FROM pragma_table_info('workspaces') WHERE name = 'cache_mode'")?
        .exists([])?;
    if !has_cache_mode {
        conn.execute_batch(
            "ALTER TABLE workspaces ADD COLUMN cache_mode TEXT NOT NULL DEFAULT 'writeback'",
        )?;
    }
    Ok(())
}

impl Registry {
    /// Opens (creating if needed) `<state_dir>/controller.db`, mode 0600.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn open(state_dir: &Path) -> Result<Self, RegistryError> {
        let path = state_dir.join("controller.db");
        let err = |source| RegistryError::Sqlite {
            path: path.clone(),
            source,
        };
        create_private(&path)?;
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        add_missing_columns(&conn).map_err(err)?;
        Ok(Self { conn, path })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> RegistryError + '_ {
        move |source| RegistryError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    /// Registers a directory (idempotent). Returns false if it already existed.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn add_directory(&self, id: &str) -> Result<bool, RegistryError> {
        let n = self
            .conn
            .execute(
                "INSERT OR IGNORE INTO directories (directory_id, created) VALUES (?1, ?2)",
                params![id, now()],
            )
            .map_err(self.err())?;
        Ok(n == 1)
    }

    /// Whether a directory is registered.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn has_directory(&self, id: &str) -> Result<bool, RegistryError> {
        self.conn
            .query_row(
                "SELECT 1 FROM directories WHERE directory_id = ?1",
                [id],
                |_| Ok(()),
            )
            .optional()
            .map(|o| o.is_some())
            .map_err(self.err())
    }

    /// Adds a user; returns the existing row if the name is taken.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn add_user(&self, user: &User) -> Result<User, RegistryError> {
        if let Some(existing) = self.user(&user.directory_id, &user.user_name)? {
            return Ok(existing);
        }
        self.conn
            .execute(
                "INSERT INTO users (directory_id, user_name, sid) VALUES (?1, ?2, ?3)",
                params![user.directory_id, user.user_name, user.sid],
            )
            .map_err(self.err())?;
        Ok(user.clone())
    }

    /// Looks up a user.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn user(&self, directory_id: &str, user_name: &str) -> Result<Option<User>, RegistryError> {
        self.conn
            .query_row(
                "SELECT sid FROM users WHERE directory_id = ?1 AND user_name = ?2",
                params![directory_id, user_name],
                |r| {
                    Ok(User {
                        directory_id: directory_id.into(),
                        user_name: user_name.into(),
                        sid: r.get(0)?,
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Adds or replaces a bundle.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn put_bundle(&self, b: &Bundle) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO bundles (bundle_id, image_path, size_gib) VALUES (?1, ?2, ?3)",
                params![b.bundle_id, b.image_path.display().to_string(), to_i64(b.size_gib)],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Looks up a bundle.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn bundle(&self, id: &str) -> Result<Option<Bundle>, RegistryError> {
        self.conn
            .query_row(
                "SELECT image_path, size_gib FROM bundles WHERE bundle_id = ?1",
                [id],
                |r| {
                    Ok(Bundle {
                        bundle_id: id.into(),
                        image_path: PathBuf::from(r.get::<_, String>(0)?),
                        size_gib: to_u64(r.get(1)?),
                    })
                },
            )
            .optional()
            .map_err(self.err())
    }

    /// Inserts a workspace.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn insert_workspace(&self, w: &Workspace) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO workspaces (workspace_id, directory_id, user_name, bundle_id, state, key_arn,
                 root_encrypted, user_encrypted, root_size_gib, user_size_gib, ws_grant_id, error, created,
                 cache_mode)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    w.workspace_id,
                    w.directory_id,
                    w.user_name,
                    w.bundle_id,
                    w.state.as_str(),
                    to_column(w.key_arn.as_deref()),
                    w.root_encrypted,
                    w.user_encrypted,
                    to_i64(w.root_size_gib),
                    to_i64(w.user_size_gib),
                    to_column(w.ws_grant_id.as_deref()),
                    to_column(w.error.as_deref()),
                    now(),
                    w.cache_mode.as_str()
                ],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Updates a workspace's mutable fields (state, key, grant, error, cache mode).
    ///
    /// # Errors
    /// SQLite failure.
    pub fn update_workspace(&self, w: &Workspace) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "UPDATE workspaces SET state = ?2, key_arn = ?3, ws_grant_id = ?4, error = ?5,
                 cache_mode = ?6 WHERE workspace_id = ?1",
                params![
                    w.workspace_id,
                    w.state.as_str(),
                    to_column(w.key_arn.as_deref()),
                    to_column(w.ws_grant_id.as_deref()),
                    to_column(w.error.as_deref()),
                    w.cache_mode.as_str()
                ],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Sets a workspace's state and its last error (`None` clears it).
    ///
    /// # Errors
    /// SQLite failure.
    pub fn set_state(
        &self,
        id: &str,
        state: WorkspaceState,
        error: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "UPDATE workspaces SET state = ?2, error = ?3 WHERE workspace_id = ?1",
                params![id, state.as_str(), to_column(error)],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    fn row_to_workspace(r: &rusqlite::Row<'_>) -> rusqlite::Result<(Workspace, String, String)> {
        let state: String = r.get(4)?;
        Ok((
            Workspace {
                workspace_id: r.get(0)?,
                directory_id: r.get(1)?,
                user_name: r.get(2)?,
                bundle_id: r.get(3)?,
                state: WorkspaceState::Error,
                key_arn: from_column(r.get(5)?),
                root_encrypted: r.get(6)?,
                user_encrypted: r.get(7)?,
                root_size_gib: to_u64(r.get(8)?),
                user_size_gib: to_u64(r.get(9)?),
                ws_grant_id: from_column(r.get(10)?),
                error: from_column(r.get(11)?),
                cache_mode: CacheMode::Writeback,
            },
            state,
            r.get(12)?,
        ))
    }

    /// All workspaces (optionally one id), oldest first.
    ///
    /// # Errors
    /// SQLite failure or a corrupt state value.
    pub fn workspaces(&self) -> Result<Vec<Workspace>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT workspace_id, directory_id, user_name, bundle_id, state, key_arn, root_encrypted,
                 user_encrypted, root_size_gib, user_size_gib, ws_grant_id, error, cache_mode
                 FROM workspaces ORDER BY created, workspace_id",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([], Self::row_to_workspace)
            .map_err(self.err())?;
        let mut out = Vec::new();
        for row in rows {
            let (mut w, state, cache) = row.map_err(self.err())?;
            w.state = state.parse().map_err(RegistryError::Corrupt)?;
            w.cache_mode = cache
                .parse()
                .map_err(|e: crate::backing::UnknownCacheMode| {
                    RegistryError::Corrupt(e.to_string())
                })?;
            out.push(w);
        }
        Ok(out)
    }

    /// One workspace.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn workspace(&self, id: &str) -> Result<Option<Workspace>, RegistryError> {
        Ok(self
            .workspaces()?
            .into_iter()
            .find(|w| w.workspace_id == id))
    }

    /// Inserts or replaces a volume.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn put_volume(&self, v: &Volume) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO volumes (volume_id, workspace_id, kind, path, encrypted, key_arn, grant_id, size_gib, formatted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    v.volume_id,
                    v.workspace_id,
                    v.kind,
                    v.path.display().to_string(),
                    v.encrypted,
                    to_column(v.key_arn.as_deref()),
                    to_column(v.grant_id.as_deref()),
                    to_i64(v.size_gib),
                    v.formatted
                ],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Deletes a volume row.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn delete_volume(&self, id: &str) -> Result<(), RegistryError> {
        self.conn
            .execute("DELETE FROM volumes WHERE volume_id = ?1", [id])
            .map(|_| ())
            .map_err(self.err())
    }

    /// Volumes of a workspace (root first), or all volumes if `workspace_id` is `None`.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn volumes(&self, workspace_id: Option<&str>) -> Result<Vec<Volume>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT volume_id, workspace_id, kind, path, encrypted, key_arn, grant_id, size_gib, formatted FROM volumes
                 WHERE ?1 IS NULL OR workspace_id = ?1 ORDER BY workspace_id, kind",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([workspace_id], |r| {
                Ok(Volume {
                    volume_id: r.get(0)?,
                    workspace_id: r.get(1)?,
                    kind: r.get(2)?,
                    path: PathBuf::from(r.get::<_, String>(3)?),
                    encrypted: r.get(4)?,
                    key_arn: from_column(r.get(5)?),
                    grant_id: from_column(r.get(6)?),
                    size_gib: to_u64(r.get(7)?),
                    formatted: r.get(8)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Records a snapshot.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn add_snapshot(&self, s: &Snapshot) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO snapshots (snapshot_id, volume_id, workspace_id, kind, path, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![s.snapshot_id, s.volume_id, s.workspace_id, s.kind, s.path.display().to_string(), s.created],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Snapshots of a workspace, newest first.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn snapshots(&self, workspace_id: &str) -> Result<Vec<Snapshot>, RegistryError> {
        let mut stmt = self
            .conn
            .prepare(
                "SELECT snapshot_id, volume_id, workspace_id, kind, path, created FROM snapshots
                 WHERE workspace_id = ?1 ORDER BY created DESC, rowid DESC",
            )
            .map_err(self.err())?;
        let rows = stmt
            .query_map([workspace_id], |r| {
                Ok(Snapshot {
                    snapshot_id: r.get(0)?,
                    volume_id: r.get(1)?,
                    workspace_id: r.get(2)?,
                    kind: r.get(3)?,
                    path: PathBuf::from(r.get::<_, String>(4)?),
                    created: r.get(5)?,
                })
            })
            .map_err(self.err())?;
        rows.collect::<Result<Vec<_>, _>>().map_err(self.err())
    }

    /// Deletes a workspace's snapshot rows.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn delete_snapshots(&self, workspace_id: &str) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "DELETE FROM snapshots WHERE workspace_id = ?1",
                [workspace_id],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Records an image.
    ///
    /// # Errors
    /// SQLite failure.
    pub fn add_image(
        &self,
        image_id: &str,
        name: &str,
        description: &str,
        workspace_id: &str,
        path: &Path,
    ) -> Result<(), RegistryError> {
        self.conn
            .execute(
                "INSERT INTO images (image_id, name, description, workspace_id, path, created) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![image_id, name, description, workspace_id, path.display().to_string(), now()],
            )
            .map(|_| ())
            .map_err(self.err())
    }

    /// Unix time now (for snapshot rows).
    #[must_use]
    pub fn now() -> i64 {
        now()
    }
}

#[cfg(test)]
mod tests;
