//! A write-through cache in front of a [`KeyStore`]: keys, material versions and each
//! key's grants are served from memory on the hot path (Decrypt,
//! GenerateDataKeyWithoutPlaintext) instead of three SQLite round trips.
//!
//! Every call holds the cache lock across the inner store call, so a read that misses
//! and a concurrent write cannot interleave into a stale entry. The inner SQLite store
//! serializes on one connection anyway, so this costs no concurrency. Identity
//! policies and access keys are not cached: `kms-daemon put-principal-policy` writes
//! them from another process.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::keys::{GrantRecord, KeyRecord};
use crate::store::{AccessKeyRecord, AliasRecord, KeyStore, SealedMaterial, StoreError};

#[derive(Default)]
struct Entries {
    keys: HashMap<String, Option<KeyRecord>>,
    materials: HashMap<(String, u32), SealedMaterial>,
    grants: HashMap<String, Vec<GrantRecord>>,
}

const MAX_ENTRIES: usize = 65_536;

/// Caching decorator over any [`KeyStore`].
pub struct CachedStore<S> {
    inner: S,
    entries: Mutex<Entries>,
}

impl<S> std::fmt::Debug for CachedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CachedStore { .. }")
    }
}

impl<S: KeyStore> CachedStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            entries: Mutex::new(Entries::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Entries> {
        let mut g = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if g.keys.len() + g.materials.len() + g.grants.len() > MAX_ENTRIES {
            *g = Entries::default();
        }
        g
    }

    fn forget_key(e: &mut Entries, id: &str) {
        e.keys.remove(id);
        e.grants.remove(id);
        e.materials.retain(|(k, _), _| k != id);
    }
}

impl<S: KeyStore> KeyStore for CachedStore<S> {
    fn create_key(
        &self,
        key: &KeyRecord,
        material: &SealedMaterial,
        alias: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut e = self.lock();
        let r = self.inner.create_key(key, material, alias);
        Self::forget_key(&mut e, &key.id);
        r
    }

    fn key(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut e = self.lock();
        if let Some(k) = e.keys.get(id) {
            return Ok(k.clone());
        }
        let k = self.inner.key(id)?;
        e.keys.insert(id.to_owned(), k.clone());
        Ok(k)
    }

    fn update_key(&self, key: &KeyRecord) -> Result<(), StoreError> {
        let mut e = self.lock();
        let r = self.inner.update_key(key);
        e.keys.remove(&key.id);
        r
    }

    fn rotate(&self, key: &KeyRecord, material: &SealedMaterial) -> Result<(), StoreError> {
        let mut e = self.lock();
        let r = self.inner.rotate(key, material);
        e.keys.remove(&key.id);
        r
    }

    fn delete_key(&self, id: &str) -> Result<(), StoreError> {
        let mut e = self.lock();
        let r = self.inner.delete_key(id);
        Self::forget_key(&mut e, id);
        r
    }

    fn list_keys(&self) -> Result<Vec<(String, String)>, StoreError> {
        self.inner.list_keys()
    }

    fn material(&self, key_id: &str, version: u32) -> Result<Option<SealedMaterial>, StoreError> {
        let mut e = self.lock();
        if let Some(m) = e.materials.get(&(key_id.to_owned(), version)) {
            return Ok(Some(m.clone()));
        }
        let m = self.inner.material(key_id, version)?;
        if let Some(m) = &m {
            e.materials.insert((key_id.to_owned(), version), m.clone());
        }
        Ok(m)
    }

    fn materials(&self, key_id: &str) -> Result<Vec<SealedMaterial>, StoreError> {
        self.inner.materials(key_id)
    }

    fn create_alias(&self, alias: &AliasRecord) -> Result<(), StoreError> {
        self.inner.create_alias(alias)
    }

    fn alias(&self, name: &str) -> Result<Option<AliasRecord>, StoreError> {
        self.inner.alias(name)
    }

    fn delete_alias(&self, name: &str) -> Result<bool, StoreError> {
        self.inner.delete_alias(name)
    }

    fn list_aliases(&self, key_id: Option<&str>) -> Result<Vec<AliasRecord>, StoreError> {
        self.inner.list_aliases(key_id)
    }

    fn insert_grant(&self, grant: &GrantRecord) -> Result<(), StoreError> {
        let mut e = self.lock();
        let r = self.inner.insert_grant(grant);
        e.grants.remove(&grant.key_id);
        r
    }

    fn grants_for_key(&self, key_id: &str) -> Result<Vec<GrantRecord>, StoreError> {
        let mut e = self.lock();
        if let Some(g) = e.grants.get(key_id) {
            return Ok(g.clone());
        }
        let g = self.inner.grants_for_key(key_id)?;
        e.grants.insert(key_id.to_owned(), g.clone());
        Ok(g)
    }

    fn grant(&self, grant_id: &str) -> Result<Option<GrantRecord>, StoreError> {
        self.inner.grant(grant_id)
    }

    fn grant_by_token(&self, token: &str) -> Result<Option<GrantRecord>, StoreError> {
        self.inner.grant_by_token(token)
    }

    fn token_issued(&self, token: &str) -> Result<bool, StoreError> {
        self.inner.token_issued(token)
    }

    fn retirable_grants(&self, principal: &str) -> Result<Vec<GrantRecord>, StoreError> {
        self.inner.retirable_grants(principal)
    }

    fn delete_grant(&self, grant_id: &str) -> Result<bool, StoreError> {
        let mut e = self.lock();
        let r = self.inner.delete_grant(grant_id);
        // The grant's key is not known here without a lookup; grants are few and
        // deletions rare, so drop every key's grant list.
        e.grants.clear();
        r
    }

    fn principal_policies(&self, principal: &str) -> Result<Vec<String>, StoreError> {
        self.inner.principal_policies(principal)
    }

    fn put_principal_policy(
        &self,
        principal: &str,
        name: &str,
        document: &str,
    ) -> Result<(), StoreError> {
        self.inner.put_principal_policy(principal, name, document)
    }

    fn access_keys(&self) -> Result<Vec<AccessKeyRecord>, StoreError> {
        self.inner.access_keys()
    }

    fn insert_access_key(&self, key: &AccessKeyRecord) -> Result<(), StoreError> {
        self.inner.insert_access_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{GrantConstraints, KeyManager, KeySpec, KeyState};
    use crate::store::SqliteStore;

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            arn: format!("arn:aws:kms:us-east-1:111122223333:key/{id}"),
            description: String::new(),
            spec: KeySpec::SymmetricDefault,
            usage: "ENCRYPT_DECRYPT".into(),
            state: KeyState::Enabled,
            created: 0,
            deletion_date: None,
            pending_window_days: None,
            manager: KeyManager::Customer,
            rotation_period_days: None,
            next_rotation: None,
            on_demand_rotation: None,
            policy: "{}".into(),
            current_version: 1,
        }
    }

    fn grant(id: &str, key_id: &str) -> GrantRecord {
        GrantRecord {
            id: id.into(),
            key_id: key_id.into(),
            name: String::new(),
            grantee: "ebs.amazonaws.com".into(),
            retiring: None,
            operations: vec![crate::keys::GrantOperation::Decrypt],
            constraints: GrantConstraints::default(),
            issuing_account: "111122223333".into(),
            created: 0,
            token: format!("t-{id}"),
        }
    }

    #[test]
    fn cache_never_serves_stale_keys_or_grants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = CachedStore::new(SqliteStore::open(&dir.path().join("kms.db")).expect("opens"));
        assert_eq!(s.key("k").expect("reads"), None);
        let m = SealedMaterial {
            version: 1,
            sealed: vec![1, 2, 3],
            created: 0,
        };
        s.create_key(&key("k"), &m, None).expect("creates");
        assert_eq!(
            s.key("k").expect("reads").map(|k| k.state),
            Some(KeyState::Enabled)
        );
        let mut k = key("k");
        k.state = KeyState::Disabled;
        s.update_key(&k).expect("updates");
        assert_eq!(
            s.key("k").expect("reads").map(|k| k.state),
            Some(KeyState::Disabled)
        );
        assert!(s.grants_for_key("k").expect("reads").is_empty());
        s.insert_grant(&grant("g1", "k")).expect("inserts");
        assert_eq!(s.grants_for_key("k").expect("reads").len(), 1);
        assert!(s.delete_grant("g1").expect("deletes"));
        assert!(s.grants_for_key("k").expect("reads").is_empty());
        assert!(s.material("k", 1).expect("reads").is_some());
        s.delete_key("k").expect("deletes");
        assert_eq!(s.key("k").expect("reads"), None);
        assert_eq!(s.material("k", 1).expect("reads"), None);
    }
}
