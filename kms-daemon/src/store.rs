//! Durable state behind the [`KeyStore`] trait; [`SqliteStore`] keeps it in SQLite
//! (WAL, `synchronous=FULL`, so every committed write survives kill -9).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use crate::keys::{GrantConstraints, GrantRecord, KeyManager, KeyRecord, KeySpec, KeyState};

/// Storage failures. Reported to clients as an internal error without detail.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored row does not decode.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Unique constraint hit (alias exists etc.).
    #[error("already exists")]
    AlreadyExists,
}

/// An alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AliasRecord {
    /// `alias/...`.
    pub name: String,
    /// Target key UUID.
    pub key_id: String,
    /// Epoch seconds.
    pub created: i64,
}

/// An access key the daemon accepts. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessKeyRecord {
    /// Access key id.
    pub access_key_id: String,
    /// Secret.
    pub secret: String,
    /// Principal ARN or service name.
    pub principal: String,
    /// Shared-credentials profile name.
    pub profile: String,
}

impl std::fmt::Debug for AccessKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeyRecord")
            .field("access_key_id", &self.access_key_id)
            .field("principal", &self.principal)
            .field("profile", &self.profile)
            .finish_non_exhaustive()
    }
}

/// One stored version of a key's material (sealed under the root key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedMaterial {
    /// Version number.
    pub version: u32,
    /// Sealed bytes.
    pub sealed: Vec<u8>,
    /// Epoch seconds.
    pub created: i64,
}

/// Persistent KMS state. Every mutating call is durable when it returns.
pub trait KeyStore: Send + Sync {
    /// Inserts a key with its first material version and optional alias, atomically.
    fn create_key(
        &self,
        key: &KeyRecord,
        material: &SealedMaterial,
        alias: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Loads a key.
    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Replaces a key's metadata.
    fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError>;
    /// Adds a material version and updates the key (rotation), atomically.
    fn rotate(&self, key: &KeyRecord, material: &SealedMaterial) -> Result<(), StoreError>;
    /// Removes a key with its material, aliases and grants.
    fn delete_key(&self, id: &str) -> Result<(), StoreError>;
    /// All keys (id, arn), by creation.
    fn list_keys(&self) -> Result<Vec<(String, String)>, StoreError>;
    /// One material version.
    fn material(&self, key_id: &str, version: u32) -> Result<Option<SealedMaterial>, StoreError>;
    /// Every material version (oldest first).
    fn materials(&self, key_id: &str) -> Result<Vec<SealedMaterial>, StoreError>;
    /// Creates an alias (AlreadyExists if taken).
    fn create_alias(&self, alias: &AliasRecord) -> Result<(), StoreError>;
    /// Looks an alias up.
    fn alias(&self, name: &str) -> Result<Option<AliasRecord>, StoreError>;
    /// Deletes an alias; false if absent.
    fn delete_alias(&self, name: &str) -> Result<bool, StoreError>;
    /// All aliases, optionally of one key.
    fn list_aliases(&self, key_id: Option<&str>) -> Result<Vec<AliasRecord>, StoreError>;
    /// Stores a grant.
    fn insert_grant(&self, grant: &GrantRecord) -> Result<(), StoreError>;
    /// Grants of a key.
    fn grants_for_key(&self, key_id: &str) -> Result<Vec<GrantRecord>, StoreError>;
    /// One grant.
    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError>;
    /// The grant a token was issued for (if still live).
    fn grant_by_token(&self, token: &str) -> Result<Option<GrantRecord>, StoreError>;
    /// Whether a token was ever issued.
    fn token_issued(&self, token: &str) -> Result<bool, StoreError>;
    /// Grants whose retiring principal is `principal`.
    fn retirable_grants(&self, principal: &str) -> Result<Vec<GrantRecord>, StoreError>;
    /// Deletes a grant; false if absent.
    fn delete_grant(&self, grant_id: &str) -> Result<bool, StoreError>;
    /// Identity policies attached to a principal.
    fn principal_policies(&self, principal: &str) -> Result<Vec<String>, StoreError>;
    /// Attaches (or replaces) a named identity policy.
    fn put_principal_policy(
        &self,
        principal: &str,
        name: &str,
        document: &str,
    ) -> Result<(), StoreError>;
    /// All access keys.
    fn access_keys(&self) -> Result<Vec<AccessKeyRecord>, StoreError>;
    /// Adds an access key.
    fn insert_access_key(&self, key: &AccessKeyRecord) -> Result<(), StoreError>;
}

/// SQLite implementation.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY, arn TEXT NOT NULL, description TEXT NOT NULL, spec TEXT NOT NULL, usage TEXT NOT NULL,
  state TEXT NOT NULL, created INTEGER NOT NULL, deletion_date INTEGER, pending_window_days INTEGER,
  manager TEXT NOT NULL, rotation_period_days INTEGER, next_rotation INTEGER, on_demand_rotation INTEGER,
  policy TEXT NOT NULL, current_version INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS materials (
  key_id TEXT NOT NULL, version INTEGER NOT NULL, sealed BLOB NOT NULL, created INTEGER NOT NULL,
  PRIMARY KEY (key_id, version));
CREATE TABLE IF NOT EXISTS aliases (name TEXT PRIMARY KEY, key_id TEXT NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS grants (
  id TEXT PRIMARY KEY, key_id TEXT NOT NULL, name TEXT NOT NULL, grantee TEXT NOT NULL, retiring TEXT,
  operations TEXT NOT NULL, constraints TEXT NOT NULL, issuing_account TEXT NOT NULL, created INTEGER NOT NULL,
  token TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS grants_key ON grants(key_id);
CREATE TABLE IF NOT EXISTS grant_tokens (token TEXT PRIMARY KEY, grant_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS principal_policies (
  principal TEXT NOT NULL, name TEXT NOT NULL, document TEXT NOT NULL, PRIMARY KEY (principal, name));
CREATE TABLE IF NOT EXISTS access_keys (
  access_key_id TEXT PRIMARY KEY, secret TEXT NOT NULL, principal TEXT NOT NULL, profile TEXT NOT NULL);
";

fn key_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(KeyRecord, String, String, String)> {
    let spec: String = r.get(3)?;
    let state: String = r.get(5)?;
    let manager: String = r.get(9)?;
    Ok((
        KeyRecord {
            id: r.get(0)?,
            arn: r.get(1)?,
            description: r.get(2)?,
            spec: KeySpec::SymmetricDefault,
            usage: r.get(4)?,
            state: KeyState::Enabled,
            created: r.get(6)?,
            deletion_date: r.get(7)?,
            pending_window_days: r.get(8)?,
            manager: KeyManager::Customer,
            rotation_period_days: r.get(10)?,
            next_rotation: r.get(11)?,
            on_demand_rotation: r.get(12)?,
            policy: r.get(13)?,
            current_version: r.get(14)?,
        },
        spec,
        state,
        manager,
    ))
}

fn finish_key(
    (mut k, spec, state, manager): (KeyRecord, String, String, String),
) -> Result<KeyRecord, StoreError> {
    k.spec =
        KeySpec::parse(&spec).ok_or_else(|| StoreError::Corrupt(format!("key spec {spec}")))?;
    k.state =
        KeyState::parse(&state).ok_or_else(|| StoreError::Corrupt(format!("key state {state}")))?;
    k.manager = match manager.as_str() {
        "AWS" => KeyManager::Aws,
        "CUSTOMER" => KeyManager::Customer,
        m => return Err(StoreError::Corrupt(format!("key manager {m}"))),
    };
    Ok(k)
}

const GRANT_COLS: &str =
    "id, key_id, name, grantee, retiring, operations, constraints, issuing_account, created, token";

fn grant_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(GrantRecord, String, String)> {
    Ok((
        GrantRecord {
            id: r.get(0)?,
            key_id: r.get(1)?,
            name: r.get(2)?,
            grantee: r.get(3)?,
            retiring: r.get(4)?,
            operations: Vec::new(),
            constraints: GrantConstraints::default(),
            issuing_account: r.get(7)?,
            created: r.get(8)?,
            token: r.get(9)?,
        },
        r.get(5)?,
        r.get(6)?,
    ))
}

fn finish_grant(
    (mut g, ops, cons): (GrantRecord, String, String),
) -> Result<GrantRecord, StoreError> {
    g.operations = serde_json::from_str(&ops).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    g.constraints = serde_json::from_str(&cons).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    Ok(g)
}

fn is_unique_violation(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::ConstraintViolation)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        // Access-key secrets live here: create it 0600 (SQLite gives -wal/-shm the same mode).
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", path.display())))?;
        }
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut guard)
    }

    fn query_grants(&self, sql: &str, arg: &str) -> Result<Vec<GrantRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(sql)?;
            let rows = st
                .query_map(params![arg], grant_from_row)?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(finish_grant).collect()
        })
    }
}

fn write_key(tx: &Connection, k: &KeyRecord, insert: bool) -> Result<(), StoreError> {
    let sql = if insert {
        "INSERT INTO keys (id, arn, description, spec, usage, state, created, deletion_date, pending_window_days, manager,
          rotation_period_days, next_rotation, on_demand_rotation, policy, current_version, seq)
          VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15,(SELECT COALESCE(MAX(seq),0)+1 FROM keys))"
    } else {
        "UPDATE keys SET arn=?2, description=?3, spec=?4, usage=?5, state=?6, created=?7, deletion_date=?8,
          pending_window_days=?9, manager=?10, rotation_period_days=?11, next_rotation=?12, on_demand_rotation=?13,
          policy=?14, current_version=?15 WHERE id=?1"
    };
    tx.prepare_cached(sql)?.execute(params![
        k.id,
        k.arn,
        k.description,
        k.spec.as_str(),
        k.usage,
        k.state.as_str(),
        k.created,
        k.deletion_date,
        k.pending_window_days,
        k.manager.as_str(),
        k.rotation_period_days,
        k.next_rotation,
        k.on_demand_rotation,
        k.policy,
        k.current_version,
    ])?;
    Ok(())
}

fn write_material(tx: &Connection, key_id: &str, m: &SealedMaterial) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO materials (key_id, version, sealed, created) VALUES (?1,?2,?3,?4)",
    )?
    .execute(params![key_id, m.version, m.sealed, m.created])?;
    Ok(())
}

impl KeyStore for SqliteStore {
    fn create_key(
        &self,
        key: &KeyRecord,
        material: &SealedMaterial,
        alias: Option<&str>,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            write_key(&tx, key, true)?;
            write_material(&tx, &key.id, material)?;
            if let Some(a) = alias {
                tx.execute(
                    "INSERT INTO aliases (name, key_id, created) VALUES (?1,?2,?3)",
                    params![a, key.id, key.created],
                )
                .map_err(|e| {
                    if is_unique_violation(&e) {
                        StoreError::AlreadyExists
                    } else {
                        e.into()
                    }
                })?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.with(|c| {
            let row = c
                .prepare_cached(
                    "SELECT id, arn, description, spec, usage, state, created, deletion_date, pending_window_days, manager,
                     rotation_period_days, next_rotation, on_demand_rotation, policy, current_version FROM keys WHERE id=?1",
                )?
                .query_row(params![id], key_from_row)
                .optional()?;
            row.map(finish_key).transpose()
        })
    }

    fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        self.with(|c| write_key(c, key, false))
    }

    fn rotate(&self, key: &KeyRecord, material: &SealedMaterial) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            write_material(&tx, &key.id, material)?;
            write_key(&tx, key, false)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute("DELETE FROM materials WHERE key_id=?1", params![id])?;
            tx.execute("DELETE FROM aliases WHERE key_id=?1", params![id])?;
            tx.execute("DELETE FROM grants WHERE key_id=?1", params![id])?;
            tx.execute("DELETE FROM keys WHERE id=?1", params![id])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn list_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT id, arn FROM keys ORDER BY seq")?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn material(&self, key_id: &str, version: u32) -> Result<Option<SealedMaterial>, StoreError> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT version, sealed, created FROM materials WHERE key_id=?1 AND version=?2",
            )?
            .query_row(params![key_id, version], |r| {
                Ok(SealedMaterial {
                    version: r.get(0)?,
                    sealed: r.get(1)?,
                    created: r.get(2)?,
                })
            })
            .optional()?)
        })
    }

    fn materials(&self, key_id: &str) -> Result<Vec<SealedMaterial>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT version, sealed, created FROM materials WHERE key_id=?1 ORDER BY version",
            )?;
            let rows = st
                .query_map(params![key_id], |r| {
                    Ok(SealedMaterial {
                        version: r.get(0)?,
                        sealed: r.get(1)?,
                        created: r.get(2)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn create_alias(&self, alias: &AliasRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO aliases (name, key_id, created) VALUES (?1,?2,?3)",
                params![alias.name, alias.key_id, alias.created],
            )
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::AlreadyExists
                } else {
                    e.into()
                }
            })?;
            Ok(())
        })
    }

    fn alias(&self, name: &str) -> Result<Option<AliasRecord>, StoreError> {
        self.with(|c| {
            Ok(
                c.prepare_cached("SELECT name, key_id, created FROM aliases WHERE name=?1")?
                    .query_row(params![name], |r| {
                        Ok(AliasRecord {
                            name: r.get(0)?,
                            key_id: r.get(1)?,
                            created: r.get(2)?,
                        })
                    })
                    .optional()?,
            )
        })
    }

    fn delete_alias(&self, name: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM aliases WHERE name=?1", params![name])? > 0))
    }

    fn list_aliases(&self, key_id: Option<&str>) -> Result<Vec<AliasRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT name, key_id, created FROM aliases WHERE ?1 IS NULL OR key_id=?1 ORDER BY name",
            )?;
            let rows = st
                .query_map(params![key_id], |r| Ok(AliasRecord { name: r.get(0)?, key_id: r.get(1)?, created: r.get(2)? }))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_grant(&self, g: &GrantRecord) -> Result<(), StoreError> {
        let ops =
            serde_json::to_string(&g.operations).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let cons = serde_json::to_string(&g.constraints)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                &format!(
                    "INSERT INTO grants ({GRANT_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)"
                ),
                params![
                    g.id,
                    g.key_id,
                    g.name,
                    g.grantee,
                    g.retiring,
                    ops,
                    cons,
                    g.issuing_account,
                    g.created,
                    g.token
                ],
            )?;
            tx.execute(
                "INSERT INTO grant_tokens (token, grant_id) VALUES (?1,?2)",
                params![g.token, g.id],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn grants_for_key(&self, key_id: &str) -> Result<Vec<GrantRecord>, StoreError> {
        self.query_grants(
            &format!("SELECT {GRANT_COLS} FROM grants WHERE key_id=?1 ORDER BY created, id"),
            key_id,
        )
    }

    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        Ok(self
            .query_grants(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE id=?1"),
                grant_id,
            )?
            .pop())
    }

    fn grant_by_token(&self, token: &str) -> Result<Option<GrantRecord>, StoreError> {
        Ok(self
            .query_grants(
                &format!("SELECT {GRANT_COLS} FROM grants WHERE token=?1"),
                token,
            )?
            .pop())
    }

    fn token_issued(&self, token: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(
                c.prepare_cached("SELECT 1 FROM grant_tokens WHERE token=?1")?
                    .query_row(params![token], |_| Ok(()))
                    .optional()?
                    .is_some(),
            )
        })
    }

    fn retirable_grants(&self, principal: &str) -> Result<Vec<GrantRecord>, StoreError> {
        self.query_grants(
            &format!("SELECT {GRANT_COLS} FROM grants WHERE retiring=?1 ORDER BY created, id"),
            principal,
        )
    }

    fn delete_grant(&self, grant_id: &str) -> Result<bool, StoreError> {
        self.with(|c| Ok(c.execute("DELETE FROM grants WHERE id=?1", params![grant_id])? > 0))
    }

    fn principal_policies(&self, principal: &str) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached(
                "SELECT document FROM principal_policies WHERE principal=?1 ORDER BY name",
            )?;
            let rows = st
                .query_map(params![principal], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn put_principal_policy(
        &self,
        principal: &str,
        name: &str,
        document: &str,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO principal_policies (principal, name, document) VALUES (?1,?2,?3)
                 ON CONFLICT(principal, name) DO UPDATE SET document=excluded.document",
                params![principal, name, document],
            )?;
            Ok(())
        })
    }

    fn access_keys(&self) -> Result<Vec<AccessKeyRecord>, StoreError> {
        self.with(|c| {
            let mut st = c.prepare_cached("SELECT access_key_id, secret, principal, profile FROM access_keys ORDER BY profile")?;
            let rows = st
                .query_map([], |r| Ok(AccessKeyRecord { access_key_id: r.get(0)?, secret: r.get(1)?, principal: r.get(2)?, profile: r.get(3)? }))?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn insert_access_key(&self, k: &AccessKeyRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO access_keys (access_key_id, secret, principal, profile) VALUES (?1,?2,?3,?4)",
                params![k.access_key_id, k.secret, k.principal, k.profile],
            )?;
            Ok(())
        })
    }
}
