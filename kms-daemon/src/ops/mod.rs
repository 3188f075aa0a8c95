//! One function per KMS operation, over a [`KeyStore`], the root key and a [`Clock`];
//! who may do what is the [`Authorizer`]'s to say.
//!
//! [`operations!`] below is the one table of operations: the wire name (`TrentService.<Op>`),
//! the handler, and how the server runs it. [`Operation`], its parsing from the target
//! header and the dispatch in [`Kms::execute`] all follow from it. Handlers live by
//! resource: [`keys`], [`aliases`], [`rotation`], [`crypto`], [`grants`], [`policies`].
//!
//! Everything here is synchronous; the server runs it on a blocking thread.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::authz::{Ask, Authorizer};
use crate::blob::{self, SymmetricKey};
use crate::clock::Clock;
use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::{KeyManager, KeyRecord, KeySpec, KeyState, RootKey};
use crate::principal::{Caller, Principal};
use crate::store::{KeyStore, SealedMaterial};

mod aliases;
mod checks;
mod crypto;
mod grants;
mod keys;
mod policies;
mod responses;
mod rotation;

const DAY: i64 = 86_400;
/// Alias of the AWS managed key for WorkSpaces.
pub const WORKSPACES_ALIAS: &str = "alias/aws/workspaces";
/// The WorkSpaces service principal.
pub const WORKSPACES_SERVICE: &str = "workspaces.amazonaws.com";
/// Grants one key may carry (AWS's quota).
pub const MAX_GRANTS_PER_KEY: usize = 50_000;
/// Rotation period of AWS managed keys.
pub const AWS_MANAGED_ROTATION_DAYS: i64 = 3 * 365;

/// Declares the operations: `Name => handler, runs_inline, read_only;`. The handler is
/// a `Kms` method taking the caller, the parsed request and the touched keys.
macro_rules! operations {
    ($($name:ident => $handler:ident, $inline:literal, $read_only:literal;)*) => {
        /// The operations the daemon implements.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Operation { $(
            #[doc = concat!("`TrentService.", stringify!($name), "`")]
            $name,
        )* }

        impl Operation {
            /// Every operation, in table order.
            pub const ALL: &'static [Self] = &[$(Self::$name,)*];

            /// Parses `TrentService.<Op>`.
            pub fn from_target(target: &str) -> Option<Self> {
                match target.strip_prefix("TrentService.")? {
                    $(stringify!($name) => Some(Self::$name),)*
                    _ => None,
                }
            }

            /// The AWS operation name.
            pub fn name(self) -> &'static str {
                match self { $(Self::$name => stringify!($name),)* }
            }

            /// Operations that never write (barring a due rotation) and take
            /// microseconds: the server runs them on the I/O thread instead of handing
            /// them to the blocking pool.
            pub fn runs_inline(self) -> bool {
                match self { $(Self::$name => $inline,)* }
            }

            /// Whether CloudTrail marks the operation read-only.
            pub fn read_only(self) -> bool {
                match self { $(Self::$name => $read_only,)* }
            }
        }

        impl Kms {
            /// Runs one operation. `body` is the raw JSON request.
            pub fn execute(
                &self,
                caller: &Caller,
                op: Operation,
                body: &[u8],
                touched: &mut Touched,
            ) -> Result<Value, OpError> {
                match op {
                    $(Operation::$name => self.$handler(caller, parse(body)?, touched),)*
                }
            }
        }
    };
}

operations! {
//  wire name                       => handler,                            inline, read-only;
    CreateKey                       => create_key,                         false, false;
    DescribeKey                     => describe_key,                       true,  true;
    ListKeys                        => list_keys,                          false, true;
    CreateAlias                     => create_alias,                       false, false;
    ListAliases                     => list_aliases,                       false, true;
    DeleteAlias                     => delete_alias,                       false, false;
    UpdateAlias                     => update_alias,                       false, false;
    EnableKey                       => enable_key,                         false, false;
    DisableKey                      => disable_key,                        false, false;
    ScheduleKeyDeletion             => schedule_deletion,                  false, false;
    CancelKeyDeletion               => cancel_deletion,                    false, false;
    EnableKeyRotation               => enable_rotation,                    false, false;
    DisableKeyRotation              => disable_rotation,                   false, false;
    GetKeyRotationStatus            => rotation_status,                    true,  true;
    RotateKeyOnDemand               => rotate_on_demand,                   false, false;
    ListKeyRotations                => list_rotations,                     false, true;
    GenerateDataKey                 => generate_data_key,                  true,  false;
    GenerateDataKeyWithoutPlaintext => generate_data_key_without_plaintext, true, false;
    Encrypt                         => encrypt,                            true,  false;
    Decrypt                         => decrypt,                            true,  false;
    ReEncrypt                       => re_encrypt,                         true,  false;
    CreateGrant                     => create_grant,                       false, false;
    ListGrants                      => list_grants,                        true,  true;
    ListRetirableGrants             => list_retirable,                     false, true;
    RetireGrant                     => retire_grant,                       false, false;
    RevokeGrant                     => revoke_grant,                       false, false;
    GetKeyPolicy                    => get_key_policy,                     true,  true;
    PutKeyPolicy                    => put_key_policy,                     false, false;
    ListKeyPolicies                 => list_key_policies,                  false, true;
}

/// The key service: state, root key, clock, identity; the [`Authorizer`] decides.
pub struct Kms {
    /// Durable state.
    pub store: Arc<dyn KeyStore>,
    pub(crate) root: RootKey,
    /// Lifecycle clock.
    pub clock: Arc<dyn Clock>,
    /// Account id.
    pub account: String,
    /// Region.
    pub region: String,
    /// Policies, grants and the parsed-policy cache.
    pub(crate) authz: Authorizer,
}

impl std::fmt::Debug for Kms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kms")
            .field("account", &self.account)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// What an operation touched, for the audit record.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    /// Key ARNs.
    pub keys: Vec<String>,
}

/// Parses a request body (empty means `{}`) into the operation's request shape.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, OpError> {
    let body = if body.is_empty() { &b"{}"[..] } else { body };
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with(crate::context::AMBIGUOUS_KEYS) {
            return OpError::Validation(msg);
        }
        // serde's messages name fields and types, never values.
        OpError::Serialization(format!("Could not parse request: {msg}"))
    })
}

/// An [`Ask`] for `operation` with no context, tokens or extra condition keys.
fn simple_ask(operation: &str) -> Ask<'_> {
    Ask {
        operation,
        ..Ask::default()
    }
}

impl Kms {
    /// Builds the service.
    pub fn new(
        store: Arc<dyn KeyStore>,
        root: RootKey,
        clock: Arc<dyn Clock>,
        account: &str,
        region: &str,
    ) -> Self {
        Self {
            store: store.clone(),
            root,
            clock,
            account: account.to_owned(),
            region: region.to_owned(),
            authz: Authorizer::new(store.clone(), account, region),
        }
    }

    /// The ARN of key `id`.
    fn key_arn(&self, id: &str) -> String {
        format!("arn:aws:kms:{}:{}:key/{id}", self.region, self.account)
    }

    /// The ARN of alias `name`.
    fn alias_arn(&self, name: &str) -> String {
        format!("arn:aws:kms:{}:{}:{name}", self.region, self.account)
    }

    /// A new enabled key record (not yet stored).
    fn new_key_record(
        &self,
        spec: KeySpec,
        usage: &str,
        description: &str,
        policy: String,
        manager: KeyManager,
    ) -> KeyRecord {
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        let now = self.clock.now();
        let (rotation, next) = if manager == KeyManager::Aws {
            (
                Some(AWS_MANAGED_ROTATION_DAYS),
                Some(now + AWS_MANAGED_ROTATION_DAYS * DAY),
            )
        } else {
            (None, None)
        };
        KeyRecord {
            arn: self.key_arn(&id),
            id,
            description: description.to_owned(),
            spec,
            usage: usage.to_owned(),
            state: KeyState::Enabled,
            created: now,
            deletion_date: None,
            pending_window_days: None,
            manager,
            rotation_period_days: rotation,
            next_rotation: next,
            on_demand_rotation: None,
            policy,
            current_version: 1,
        }
    }

    /// New key material `version` for `key_id`, sealed under the root key.
    fn new_material(&self, key_id: &str, version: u32) -> SealedMaterial {
        let m = SymmetricKey::generate();
        SealedMaterial {
            version,
            sealed: self.root.seal_material(key_id, version, &m),
            created: self.clock.now(),
        }
    }

    /// Applies due lifecycle events: completes expired deletions, runs due rotations.
    fn refresh(&self, mut key: KeyRecord) -> Result<Option<KeyRecord>, OpError> {
        let now = self.clock.now();
        if key.state == KeyState::PendingDeletion && key.deletion_date.is_some_and(|d| d <= now) {
            self.store.delete_key(&key.id)?;
            return Ok(None);
        }
        if key.spec == KeySpec::SymmetricDefault
            && key.state == KeyState::Enabled
            && let (Some(period), Some(next)) = (key.rotation_period_days, key.next_rotation)
            && next <= now
        {
            let version = key.current_version + 1;
            let m = self.new_material(&key.id, version);
            key.current_version = version;
            key.next_rotation = Some(now + period * DAY);
            self.store.rotate(&key, &m)?;
        }
        Ok(Some(key))
    }

    /// Applies due lifecycle events to every key: completes deletions whose window has
    /// passed (purging their material) and runs due automatic rotations, also for keys
    /// nobody uses. Returns how many keys were deleted.
    pub fn sweep(&self) -> Result<usize, OpError> {
        let mut deleted = 0;
        for (id, _) in self.store.list_keys()? {
            if let Some(k) = self.store.key(&id)?
                && self.refresh(k)?.is_none()
            {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// NotFoundException for `key_id`.
    fn not_found(key_id: &str) -> OpError {
        OpError::NotFound(format!("Key '{key_id}' does not exist"))
    }

    /// Resolves a KeyId (id, key ARN, alias name or alias ARN) to a live key.
    fn resolve(
        &self,
        caller: &Caller,
        key_id: &str,
        touched: &mut Touched,
    ) -> Result<KeyRecord, OpError> {
        let arn_prefix = format!("arn:aws:kms:{}:{}:", self.region, self.account);
        let local = match key_id.strip_prefix("arn:aws:kms:") {
            Some(_) => key_id
                .strip_prefix(&arn_prefix)
                .ok_or_else(|| Self::not_found(key_id))?,
            None => key_id,
        };
        let id = if let Some(alias) = local.strip_prefix("alias/") {
            let name = format!("alias/{alias}");
            match self.store.alias(&name)? {
                Some(a) => a.key_id,
                None if name == WORKSPACES_ALIAS
                    && caller.signer == Principal::Service(WORKSPACES_SERVICE.into()) =>
                {
                    self.create_workspaces_managed_key()?
                }
                None => {
                    return Err(OpError::NotFound(format!(
                        "Alias {} is not found.",
                        self.alias_arn(&name)
                    )));
                }
            }
        } else if let Some(id) = local.strip_prefix("key/") {
            id.to_owned()
        } else if local.contains(':') || local.contains('/') {
            return Err(Self::not_found(key_id));
        } else {
            local.to_owned()
        };
        if uuid::Uuid::try_parse(&id).is_err() {
            return Err(OpError::NotFound(format!("Invalid keyId '{key_id}'")));
        }
        let key = self
            .store
            .key(&id)?
            .ok_or_else(|| Self::not_found(key_id))?;
        let key = self.refresh(key)?.ok_or_else(|| Self::not_found(key_id))?;
        touched.keys.push(key.arn.clone());
        Ok(key)
    }

    /// Key material `version` of `key`, unsealed (None if purged).
    fn material_for(&self, key: &KeyRecord, version: u32) -> Result<Option<SymmetricKey>, OpError> {
        match self.store.material(&key.id, version)? {
            None => Ok(None),
            Some(m) => self
                .root
                .unseal_material(&key.id, version, &m.sealed)
                .map(Some)
                .map_err(|_| {
                    OpError::Internal(format!("material {} v{version} does not unseal", key.id))
                }),
        }
    }

    /// Seals `plaintext` under the current material of `key`.
    fn seal_for(
        &self,
        key: &KeyRecord,
        ctx: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, OpError> {
        let m = self
            .material_for(key, key.current_version)?
            .ok_or_else(|| OpError::Internal(format!("current material of {} missing", key.id)))?;
        Ok(blob::seal(&key.id, key.current_version, &m, ctx, plaintext))
    }

    /// Resolves `key_id` to a live key and authorizes `ask` on it: the first step of
    /// every operation on a key.
    fn authorized_key(
        &self,
        caller: &Caller,
        key_id: &str,
        ask: &Ask<'_>,
        touched: &mut Touched,
    ) -> Result<KeyRecord, OpError> {
        let key = self.resolve(caller, key_id, touched)?;
        self.authz.authorize(caller, &key, ask)?;
        Ok(key)
    }
}

#[cfg(test)]
mod tests;
