//! One function per KMS operation, over a [`KeyStore`], the root key and a [`Clock`].
//!
//! Everything here is synchronous; the server runs it on a blocking thread.

use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::authz::{Ask, Verdict, grantee_names};
use crate::blob::{self, CiphertextBlob, SymmetricKey, fill_random};
use crate::clock::Clock;
use crate::context::EncryptionContext;
use crate::error::OpError;
use crate::keys::{
    GRANT_OPERATIONS, GrantConstraints, GrantRecord, KeyManager, KeyRecord, KeySpec, KeyState,
    RootKey, is_cryptographic_operation,
};
use crate::policy::PolicyDocument;
use crate::principal::{Caller, Principal, is_service_principal};
use crate::store::{AliasRecord, KeyStore, SealedMaterial};
use crate::wire::*;

const DAY: i64 = 86_400;
/// Alias of the AWS managed key for WorkSpaces.
pub const WORKSPACES_ALIAS: &str = "alias/aws/workspaces";
/// The WorkSpaces service principal.
pub const WORKSPACES_SERVICE: &str = "workspaces.amazonaws.com";
/// Grants one key may carry (AWS's quota).
pub const MAX_GRANTS_PER_KEY: usize = 50_000;
/// Rotation period of AWS managed keys.
pub const AWS_MANAGED_ROTATION_DAYS: i64 = 3 * 365;

/// The key service: state, root key, clock, identity.
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
    /// Parsed policy documents by their text (parsing is costlier than a lookup).
    policy_cache: std::sync::Mutex<std::collections::HashMap<String, Arc<PolicyDocument>>>,
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

/// A blob to open and what the caller says about it.
struct Unwrap<'a> {
    blob: &'a [u8],
    context: &'a EncryptionContext,
    key_id: Option<&'a str>,
    operation: &'a str,
    tokens: &'a [String],
}

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

fn ctx_of(c: Option<EncryptionContext>) -> Result<EncryptionContext, OpError> {
    let c = c.unwrap_or_default();
    if c.byte_size() > 8192 {
        return Err(OpError::Validation(
            "EncryptionContext is larger than 8192 bytes".into(),
        ));
    }
    Ok(c)
}

fn check_algorithm(a: Option<&str>) -> Result<(), OpError> {
    match a {
        None | Some("SYMMETRIC_DEFAULT") => Ok(()),
        Some("RSAES_OAEP_SHA_1" | "RSAES_OAEP_SHA_256" | "SM2PKE") => {
            Err(OpError::InvalidKeyUsage(
                "The requested encryption algorithm is not supported by the key".into(),
            ))
        }
        Some(_) => Err(OpError::Validation(
            "EncryptionAlgorithm must be SYMMETRIC_DEFAULT".into(),
        )),
    }
}

fn page<T>(
    items: Vec<T>,
    limit: Option<i64>,
    marker: Option<&str>,
) -> Result<(Vec<T>, Option<String>), OpError> {
    let limit = match limit {
        None => 100,
        Some(l) if (1..=1000).contains(&l) => usize::try_from(l).unwrap_or(100),
        Some(_) => {
            return Err(OpError::Validation(
                "Limit must be between 1 and 1000".into(),
            ));
        }
    };
    let start = match marker {
        None => 0,
        Some(m) => m
            .parse::<usize>()
            .map_err(|_| OpError::InvalidMarker("The marker is not valid.".into()))?,
    };
    let total = items.len();
    let end = start.saturating_add(limit).min(total);
    let next = (end < total).then(|| end.to_string());
    Ok((
        items
            .into_iter()
            .skip(start)
            .take(end.saturating_sub(start))
            .collect(),
        next,
    ))
}

fn paged(mut out: Value, field: &str, items: Vec<Value>, next: Option<String>) -> Value {
    out[field] = Value::Array(items);
    out["Truncated"] = json!(next.is_some());
    if let Some(n) = next {
        out["NextMarker"] = json!(n);
    }
    out
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    hex::encode(b)
}

fn state_error(key: &KeyRecord) -> OpError {
    match key.state {
        KeyState::Disabled => OpError::Disabled(format!("{} is disabled.", key.arn)),
        _ => OpError::InvalidState(format!("{} is pending deletion.", key.arn)),
    }
}

fn require_enabled(key: &KeyRecord) -> Result<(), OpError> {
    if key.state == KeyState::Enabled {
        Ok(())
    } else {
        Err(state_error(key))
    }
}

fn require_not_pending(key: &KeyRecord) -> Result<(), OpError> {
    if key.state == KeyState::PendingDeletion {
        Err(state_error(key))
    } else {
        Ok(())
    }
}

fn require_symmetric(key: &KeyRecord) -> Result<(), OpError> {
    if key.spec == KeySpec::SymmetricDefault {
        Ok(())
    } else {
        Err(OpError::InvalidKeyUsage(format!(
            "{} key usage is {} with key spec {}; this operation needs a SYMMETRIC_DEFAULT ENCRYPT_DECRYPT key",
            key.arn,
            key.usage,
            key.spec.as_str()
        )))
    }
}

fn require_customer_managed(key: &KeyRecord, caller: &Caller, action: &str) -> Result<(), OpError> {
    if key.manager == KeyManager::Aws {
        return Err(OpError::AccessDenied(format!(
            "User: {} is not authorized to perform: kms:{action} on resource: {} because it is an AWS managed key",
            caller.effective().arn(),
            key.arn
        )));
    }
    Ok(())
}

fn dry_run(flag: Option<bool>) -> Result<(), OpError> {
    if flag == Some(true) {
        Err(OpError::DryRun)
    } else {
        Ok(())
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
            store,
            root,
            clock,
            account: account.to_owned(),
            region: region.to_owned(),
            policy_cache: Default::default(),
        }
    }

    /// Parses a stored policy document, memoized by its text.
    pub(crate) fn parsed_policy(
        &self,
        text: &str,
    ) -> Result<Arc<PolicyDocument>, crate::policy::PolicyError> {
        let mut cache = self
            .policy_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(p) = cache.get(text) {
            return Ok(p.clone());
        }
        let parsed = Arc::new(PolicyDocument::parse(text)?);
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(text.to_owned(), parsed.clone());
        Ok(parsed)
    }

    fn key_arn(&self, id: &str) -> String {
        format!("arn:aws:kms:{}:{}:key/{id}", self.region, self.account)
    }

    fn alias_arn(&self, name: &str) -> String {
        format!("arn:aws:kms:{}:{}:{name}", self.region, self.account)
    }

    /// AWS's default key policy: the account root may do everything (delegates to IAM).
    pub fn default_key_policy(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "Version": "2012-10-17",
            "Id": "key-default-1",
            "Statement": [{
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": format!("arn:aws:iam::{}:root", self.account)},
                "Action": "kms:*",
                "Resource": "*"
            }]
        }))
        .expect("a JSON literal serializes")
    }

    /// The fixed policy of the AWS managed key for WorkSpaces.
    pub fn workspaces_managed_policy(&self) -> String {
        serde_json::to_string_pretty(&json!({
            "Version": "2012-10-17",
            "Id": "auto-workspaces-2",
            "Statement": [
                {
                    "Sid": "Allow access through WorkSpaces for all principals in the account that are authorized to use WorkSpaces",
                    "Effect": "Allow",
                    "Principal": {"AWS": "*"},
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:DescribeKey"],
                    "Resource": "*",
                    "Condition": {"StringEquals": {
                        "kms:ViaService": format!("workspaces.{}.amazonaws.com", self.region),
                        "kms:CallerAccount": self.account,
                    }}
                },
                {
                    "Sid": "Allow direct access to key metadata to the account",
                    "Effect": "Allow",
                    "Principal": {"AWS": format!("arn:aws:iam::{}:root", self.account)},
                    "Action": ["kms:Describe*", "kms:Get*", "kms:List*"],
                    "Resource": "*"
                },
                {
                    "Sid": "Allow the WorkSpaces service to use the key",
                    "Effect": "Allow",
                    "Principal": {"Service": WORKSPACES_SERVICE},
                    "Action": ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:CreateGrant", "kms:DescribeKey", "kms:ListGrants", "kms:RetireGrant"],
                    "Resource": "*"
                }
            ]
        }))
        .expect("a JSON literal serializes")
    }

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

    fn not_found(key_id: &str) -> OpError {
        OpError::NotFound(format!("Key '{key_id}' does not exist"))
    }

    /// Resolves a KeyId (id, key ARN, alias name or alias ARN) to a live key.
    pub(crate) fn resolve(
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

    fn create_workspaces_managed_key(&self) -> Result<String, OpError> {
        let key = self.new_key_record(
            KeySpec::SymmetricDefault,
            "ENCRYPT_DECRYPT",
            "Default key that protects my WorkSpaces when no other key is defined",
            self.workspaces_managed_policy(),
            KeyManager::Aws,
        );
        let m = self.new_material(&key.id, 1);
        match self.store.create_key(&key, &m, Some(WORKSPACES_ALIAS)) {
            Ok(()) => Ok(key.id),
            // Lost a race with another creator: use theirs.
            Err(crate::store::StoreError::AlreadyExists) => self
                .store
                .alias(WORKSPACES_ALIAS)?
                .map(|a| a.key_id)
                .ok_or_else(|| OpError::Internal("aws/workspaces alias vanished".into())),
            Err(e) => Err(e.into()),
        }
    }

    fn metadata(&self, k: &KeyRecord) -> Value {
        let mut m = json!({
            "AWSAccountId": self.account,
            "KeyId": k.id,
            "Arn": k.arn,
            "CreationDate": k.created,
            "Enabled": k.state == KeyState::Enabled,
            "Description": k.description,
            "KeyUsage": k.usage,
            "KeyState": k.state.as_str(),
            "Origin": "AWS_KMS",
            "KeyManager": k.manager.as_str(),
            "CustomerMasterKeySpec": k.spec.as_str(),
            "KeySpec": k.spec.as_str(),
            "MultiRegion": false,
        });
        let enc = k.spec.encryption_algorithms(&k.usage);
        if !enc.is_empty() {
            m["EncryptionAlgorithms"] = json!(enc);
        }
        let sig = k.spec.signing_algorithms(&k.usage);
        if !sig.is_empty() {
            m["SigningAlgorithms"] = json!(sig);
        }
        if let Some(d) = k.deletion_date {
            m["DeletionDate"] = json!(d);
        }
        if let Some(w) = k.pending_window_days {
            m["PendingDeletionWindowInDays"] = json!(w);
        }
        m
    }

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

    /// Runs one operation. `body` is the raw JSON request.
    pub fn execute(
        &self,
        caller: &Caller,
        op: Operation,
        body: &[u8],
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        use Operation as O;
        match op {
            O::CreateKey => self.create_key(caller, parse(body)?, touched),
            O::DescribeKey => self.describe_key(caller, parse(body)?, touched),
            O::ListKeys => self.list_keys(caller, parse(body)?),
            O::CreateAlias => self.create_alias(caller, parse(body)?, touched),
            O::UpdateAlias => self.update_alias(caller, parse(body)?, touched),
            O::ListAliases => self.list_aliases(caller, parse(body)?, touched),
            O::DeleteAlias => self.delete_alias(caller, parse(body)?, touched),
            O::EnableKey => self.set_enabled(caller, parse(body)?, true, touched),
            O::DisableKey => self.set_enabled(caller, parse(body)?, false, touched),
            O::ScheduleKeyDeletion => self.schedule_deletion(caller, parse(body)?, touched),
            O::CancelKeyDeletion => self.cancel_deletion(caller, parse(body)?, touched),
            O::EnableKeyRotation => self.enable_rotation(caller, parse(body)?, touched),
            O::DisableKeyRotation => self.disable_rotation(caller, parse(body)?, touched),
            O::GetKeyRotationStatus => self.rotation_status(caller, parse(body)?, touched),
            O::RotateKeyOnDemand => self.rotate_on_demand(caller, parse(body)?, touched),
            O::ListKeyRotations => self.list_rotations(caller, parse(body)?, touched),
            O::GenerateDataKey => self.generate_data_key(caller, parse(body)?, true, touched),
            O::GenerateDataKeyWithoutPlaintext => {
                self.generate_data_key(caller, parse(body)?, false, touched)
            }
            O::Encrypt => self.encrypt(caller, parse(body)?, touched),
            O::Decrypt => self.decrypt(caller, parse(body)?, touched),
            O::ReEncrypt => self.re_encrypt(caller, parse(body)?, touched),
            O::CreateGrant => self.create_grant(caller, parse(body)?, touched),
            O::ListGrants => self.list_grants(caller, parse(body)?, touched),
            O::ListRetirableGrants => self.list_retirable(caller, parse(body)?),
            O::RetireGrant => self.retire_grant(caller, parse(body)?, touched),
            O::RevokeGrant => self.revoke_grant(caller, parse(body)?, touched),
            O::GetKeyPolicy => self.get_key_policy(caller, parse(body)?, touched),
            O::PutKeyPolicy => self.put_key_policy(caller, parse(body)?, touched),
            O::ListKeyPolicies => self.list_key_policies(caller, parse(body)?, touched),
        }
    }

    fn simple_ask(operation: &str) -> Ask<'_> {
        Ask {
            operation,
            ..Ask::default()
        }
    }

    fn create_key(
        &self,
        caller: &Caller,
        r: CreateKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        self.authorize_account_action(caller, "CreateKey")?;
        let spec_name = match (&r.key_spec, &r.customer_master_key_spec) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(
                    "Specify KeySpec or CustomerMasterKeySpec, not both".into(),
                ));
            }
            (Some(s), None) | (None, Some(s)) => s.as_str(),
            (None, None) => "SYMMETRIC_DEFAULT",
        };
        let spec = KeySpec::parse(spec_name).ok_or_else(|| OpError::Validation(format!("1 validation error detected: Value '{spec_name}' at 'keySpec' failed to satisfy constraint")))?;
        let usage = match &r.key_usage {
            // AWS: KeyUsage may be omitted only for symmetric encryption keys.
            None if spec_name != "SYMMETRIC_DEFAULT" => {
                return Err(OpError::Validation(format!(
                    "KeyUsage is required when KeySpec is {spec_name}"
                )));
            }
            None => spec.usages()[0].to_owned(),
            Some(u) if spec.usages().contains(&u.as_str()) => u.clone(),
            Some(u) => {
                return Err(OpError::Validation(format!(
                    "KeyUsage {u} is not compatible with KeySpec {spec_name}"
                )));
            }
        };
        if let Some(o) = r.origin.as_deref().filter(|o| *o != "AWS_KMS") {
            return Err(OpError::UnsupportedOperation(format!(
                "Origin {o} is not supported"
            )));
        }
        if r.custom_key_store_id.is_some() || r.xks_key_id.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Custom key stores are not supported".into(),
            ));
        }
        if r.multi_region == Some(true) {
            return Err(OpError::UnsupportedOperation(
                "Multi-Region keys are not supported".into(),
            ));
        }
        let description = r.description.unwrap_or_default();
        if description.len() > 8192 {
            return Err(OpError::Validation(
                "Description is longer than 8192 characters".into(),
            ));
        }
        let policy = match r.policy {
            Some(p) => {
                if p.len() > 32_768 {
                    return Err(OpError::LimitExceeded(
                        "The key policy is larger than 32 KB".into(),
                    ));
                }
                PolicyDocument::parse(&p)?.require_principals()?;
                p
            }
            None => self.default_key_policy(),
        };
        let key = self.new_key_record(spec, &usage, &description, policy, KeyManager::Customer);
        let m = self.new_material(&key.id, 1);
        self.store.create_key(&key, &m, None)?;
        touched.keys.push(key.arn.clone());
        Ok(json!({ "KeyMetadata": self.metadata(&key) }))
    }

    fn describe_key(
        &self,
        caller: &Caller,
        r: DescribeKeyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.resolve(caller, &r.key_id, touched)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        self.authorize(
            caller,
            &key,
            &Ask {
                operation: "DescribeKey",
                grant_tokens: &tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        Ok(json!({ "KeyMetadata": self.metadata(&key) }))
    }

    fn list_keys(&self, caller: &Caller, r: ListKeysRequest) -> Result<Value, OpError> {
        self.authorize_account_action(caller, "ListKeys")?;
        let now = self.clock.now();
        let mut items = Vec::new();
        for (id, arn) in self.store.list_keys()? {
            if let Some(k) = self.store.key(&id)?
                && k.state == KeyState::PendingDeletion
                && k.deletion_date.is_some_and(|d| d <= now)
            {
                continue;
            }
            items.push(json!({"KeyId": id, "KeyArn": arn}));
        }
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        Ok(paged(json!({}), "Keys", items, next))
    }

    fn validate_alias_name(name: &str) -> Result<(), OpError> {
        let rest = name.strip_prefix("alias/").ok_or_else(|| {
            OpError::Validation("Alias must start with the prefix \"alias/\"".into())
        })?;
        if rest.is_empty()
            || name.len() > 256
            || !rest
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c))
        {
            return Err(OpError::Validation(format!(
                "Alias name {name} is not valid"
            )));
        }
        if rest.starts_with("aws/") {
            return Err(OpError::InvalidAliasName(
                "Alias names starting with alias/aws/ are reserved for AWS managed keys".into(),
            ));
        }
        Ok(())
    }

    fn create_alias(
        &self,
        caller: &Caller,
        r: AliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        Self::validate_alias_name(&r.alias_name)?;
        if r.target_key_id.starts_with("alias/") || r.target_key_id.contains(":alias/") {
            return Err(OpError::Validation(
                "TargetKeyId must be a key id or key ARN".into(),
            ));
        }
        let key = self.resolve(caller, &r.target_key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("CreateAlias"))?;
        self.authorize_account_action_alias(caller, &r.alias_name, "CreateAlias")?;
        require_customer_managed(&key, caller, "CreateAlias")?;
        require_not_pending(&key)?;
        self.store
            .create_alias(&AliasRecord {
                name: r.alias_name.clone(),
                key_id: key.id.clone(),
                created: self.clock.now(),
            })
            .map_err(|e| match e {
                crate::store::StoreError::AlreadyExists => OpError::AlreadyExists(format!(
                    "An alias with the name {} already exists",
                    self.alias_arn(&r.alias_name)
                )),
                other => other.into(),
            })?;
        Ok(json!({}))
    }

    /// Aliases are resources of their own; the caller needs the action on them too
    /// (root and IAM-delegated principals). Alias ARNs are covered by `Resource: *`.
    fn authorize_account_action_alias(
        &self,
        caller: &Caller,
        alias: &str,
        op: &str,
    ) -> Result<(), OpError> {
        let action = format!("kms:{op}");
        let conditions = self.base_conditions(caller, &Ask::default());
        let arn = self.alias_arn(alias);
        let req = crate::policy::Request {
            principal: caller.effective(),
            action: &action,
            resource: &arn,
            conditions: &conditions,
        };
        match self.identity_decision(caller.effective(), &req)? {
            crate::policy::Decision::Allow => Ok(()),
            _ => Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to perform: {action} on resource: {arn}",
                caller.effective().arn()
            ))),
        }
    }

    fn update_alias(
        &self,
        caller: &Caller,
        r: AliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        Self::validate_alias_name(&r.alias_name)?;
        let existing = self.store.alias(&r.alias_name)?.ok_or_else(|| {
            OpError::NotFound(format!(
                "Alias {} is not found.",
                self.alias_arn(&r.alias_name)
            ))
        })?;
        let key = self.resolve(caller, &r.target_key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("UpdateAlias"))?;
        self.authorize_account_action_alias(caller, &r.alias_name, "UpdateAlias")?;
        require_not_pending(&key)?;
        self.store.delete_alias(&existing.name)?;
        self.store.create_alias(&AliasRecord {
            name: existing.name,
            key_id: key.id,
            created: existing.created,
        })?;
        Ok(json!({}))
    }

    fn list_aliases(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_filter = match &r.key_id {
            Some(k) => {
                let key = self.resolve(caller, k, touched)?;
                self.authorize(caller, &key, &Self::simple_ask("ListAliases"))?;
                Some(key.id)
            }
            None => {
                self.authorize_account_action(caller, "ListAliases")?;
                None
            }
        };
        let items: Vec<Value> = self
            .store
            .list_aliases(key_filter.as_deref())?
            .into_iter()
            .map(|a| json!({"AliasName": a.name, "AliasArn": self.alias_arn(&a.name), "TargetKeyId": a.key_id, "CreationDate": a.created, "LastUpdatedDate": a.created}))
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        Ok(paged(json!({}), "Aliases", items, next))
    }

    fn delete_alias(
        &self,
        caller: &Caller,
        r: DeleteAliasRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        if r.alias_name.starts_with("alias/aws/") {
            return Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to perform: kms:DeleteAlias on resource: {} (AWS managed aliases cannot be deleted)",
                caller.effective().arn(),
                self.alias_arn(&r.alias_name)
            )));
        }
        let a = self.store.alias(&r.alias_name)?.ok_or_else(|| {
            OpError::NotFound(format!(
                "Alias {} is not found.",
                self.alias_arn(&r.alias_name)
            ))
        })?;
        let key = self.resolve(caller, &a.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("DeleteAlias"))?;
        self.authorize_account_action_alias(caller, &r.alias_name, "DeleteAlias")?;
        self.store.delete_alias(&r.alias_name)?;
        Ok(json!({}))
    }

    fn set_enabled(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        enable: bool,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let op = if enable { "EnableKey" } else { "DisableKey" };
        let mut key = self.resolve(caller, &r.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask(op))?;
        require_customer_managed(&key, caller, op)?;
        require_not_pending(&key)?;
        key.state = if enable {
            KeyState::Enabled
        } else {
            KeyState::Disabled
        };
        self.store.update_key(&key)?;
        if enable {
            // A rotation that fell due while disabled happens now.
            self.refresh(key)?;
        }
        Ok(json!({}))
    }

    fn schedule_deletion(
        &self,
        caller: &Caller,
        r: ScheduleKeyDeletionRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.resolve(caller, &r.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("ScheduleKeyDeletion"))?;
        require_customer_managed(&key, caller, "ScheduleKeyDeletion")?;
        let days = r.pending_window_in_days.unwrap_or(30);
        if !(7..=30).contains(&days) {
            return Err(OpError::Validation(
                "PendingWindowInDays must be between 7 and 30".into(),
            ));
        }
        require_not_pending(&key)?;
        let when = self.clock.now() + days * DAY;
        key.state = KeyState::PendingDeletion;
        key.deletion_date = Some(when);
        key.pending_window_days = Some(days);
        self.store.update_key(&key)?;
        Ok(
            json!({"KeyId": key.arn, "DeletionDate": when, "KeyState": "PendingDeletion", "PendingWindowInDays": days}),
        )
    }

    fn cancel_deletion(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.resolve(caller, &r.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("CancelKeyDeletion"))?;
        require_customer_managed(&key, caller, "CancelKeyDeletion")?;
        if key.state != KeyState::PendingDeletion {
            return Err(OpError::InvalidState(format!(
                "{} is not pending deletion.",
                key.arn
            )));
        }
        key.state = KeyState::Disabled;
        key.deletion_date = None;
        key.pending_window_days = None;
        self.store.update_key(&key)?;
        Ok(json!({"KeyId": key.arn}))
    }

    fn rotation_target(
        &self,
        caller: &Caller,
        key_id: &str,
        op: &str,
        touched: &mut Touched,
    ) -> Result<KeyRecord, OpError> {
        let key = self.resolve(caller, key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask(op))?;
        if key.spec != KeySpec::SymmetricDefault {
            return Err(OpError::UnsupportedOperation(format!(
                "{} is not a symmetric encryption key; rotation is not supported",
                key.arn
            )));
        }
        Ok(key)
    }

    fn enable_rotation(
        &self,
        caller: &Caller,
        r: EnableKeyRotationRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "EnableKeyRotation", touched)?;
        require_customer_managed(&key, caller, "EnableKeyRotation")?;
        let days = r.rotation_period_in_days.unwrap_or(365);
        if !(90..=2560).contains(&days) {
            return Err(OpError::Validation(
                "RotationPeriodInDays must be between 90 and 2560".into(),
            ));
        }
        require_enabled(&key)?;
        key.rotation_period_days = Some(days);
        key.next_rotation = Some(self.clock.now() + days * DAY);
        self.store.update_key(&key)?;
        Ok(json!({}))
    }

    fn disable_rotation(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "DisableKeyRotation", touched)?;
        require_customer_managed(&key, caller, "DisableKeyRotation")?;
        require_enabled(&key)?;
        key.rotation_period_days = None;
        key.next_rotation = None;
        self.store.update_key(&key)?;
        Ok(json!({}))
    }

    fn rotation_status(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.rotation_target(caller, &r.key_id, "GetKeyRotationStatus", touched)?;
        require_not_pending(&key)?;
        let mut out =
            json!({"KeyId": key.arn, "KeyRotationEnabled": key.rotation_period_days.is_some()});
        if let (Some(p), Some(n)) = (key.rotation_period_days, key.next_rotation) {
            out["RotationPeriodInDays"] = json!(p);
            out["NextRotationDate"] = json!(n);
        }
        if let Some(d) = key.on_demand_rotation {
            out["OnDemandRotationStartDate"] = json!(d);
        }
        Ok(out)
    }

    fn rotate_on_demand(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "RotateKeyOnDemand", touched)?;
        require_customer_managed(&key, caller, "RotateKeyOnDemand")?;
        require_enabled(&key)?;
        let version = key.current_version + 1;
        let m = self.new_material(&key.id, version);
        key.current_version = version;
        key.on_demand_rotation = Some(self.clock.now());
        self.store.rotate(&key, &m)?;
        Ok(json!({"KeyId": key.arn}))
    }

    fn list_rotations(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_id = r
            .key_id
            .clone()
            .ok_or_else(|| OpError::Validation("KeyId is required".into()))?;
        let key = self.rotation_target(caller, &key_id, "ListKeyRotations", touched)?;
        let items: Vec<Value> = self
            .store
            .materials(&key.id)?
            .into_iter()
            .filter(|m| m.version > 1)
            .map(|m| {
                let kind = if key.on_demand_rotation == Some(m.created) {
                    "ON_DEMAND"
                } else {
                    "AUTOMATIC"
                };
                json!({"KeyId": key.arn, "RotationDate": m.created, "RotationType": kind})
            })
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        Ok(paged(json!({}), "Rotations", items, next))
    }

    fn generate_data_key(
        &self,
        caller: &Caller,
        r: GenerateDataKeyRequest,
        with_plaintext: bool,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let op = if with_plaintext {
            "GenerateDataKey"
        } else {
            "GenerateDataKeyWithoutPlaintext"
        };
        let n = match (r.number_of_bytes, r.key_spec.as_deref()) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(
                    "Specify NumberOfBytes or KeySpec, not both".into(),
                ));
            }
            (Some(n), None) if (1..=1024).contains(&n) => usize::try_from(n).unwrap_or(32),
            (Some(_), None) => {
                return Err(OpError::Validation(
                    "NumberOfBytes must be between 1 and 1024".into(),
                ));
            }
            (None, Some("AES_256")) => 32,
            (None, Some("AES_128")) => 16,
            (None, Some(s)) => {
                return Err(OpError::Validation(format!(
                    "KeySpec {s} is not AES_256 or AES_128"
                )));
            }
            (None, None) => {
                return Err(OpError::Validation(
                    "Please specify either number of bytes or key spec.".into(),
                ));
            }
        };
        if r.recipient.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let ctx = ctx_of(r.encryption_context)?;
        let key = self.resolve(caller, &r.key_id, touched)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        self.authorize(
            caller,
            &key,
            &Ask {
                operation: op,
                context: Some(&ctx),
                grant_tokens: &tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        require_enabled(&key)?;
        require_symmetric(&key)?;
        dry_run(r.dry_run)?;
        let mut plaintext = zeroize::Zeroizing::new(vec![0u8; n]);
        fill_random(&mut plaintext);
        let blob = self.seal_for(&key, &ctx, &plaintext)?;
        let mut out = json!({"CiphertextBlob": b64(&blob), "KeyId": key.arn});
        if with_plaintext {
            // Moved into the Value (not copied by `json!`), so the server's wipe of the
            // response's strings reaches the only copy.
            out["Plaintext"] = Value::String(b64(&plaintext));
        }
        Ok(out)
    }

    fn encrypt(
        &self,
        caller: &Caller,
        r: EncryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        if r.plaintext.0.is_empty() || r.plaintext.0.len() > 4096 {
            return Err(OpError::Validation(
                "Plaintext must be between 1 and 4096 bytes".into(),
            ));
        }
        check_algorithm(r.encryption_algorithm.as_deref())?;
        let ctx = ctx_of(r.encryption_context)?;
        let key = self.resolve(caller, &r.key_id, touched)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        self.authorize(
            caller,
            &key,
            &Ask {
                operation: "Encrypt",
                context: Some(&ctx),
                grant_tokens: &tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        require_enabled(&key)?;
        require_symmetric(&key)?;
        dry_run(r.dry_run)?;
        let blob = self.seal_for(&key, &ctx, &r.plaintext.0)?;
        Ok(
            json!({"CiphertextBlob": b64(&blob), "KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"}),
        )
    }

    /// Opens a blob for `operation` (Decrypt or ReEncryptFrom) in DESIGN §3's order.
    fn open_blob(
        &self,
        caller: &Caller,
        u: Unwrap<'_>,
        touched: &mut Touched,
    ) -> Result<(KeyRecord, zeroize::Zeroizing<Vec<u8>>), OpError> {
        let Unwrap {
            blob: blob_bytes,
            context: ctx,
            key_id,
            operation,
            tokens,
        } = u;
        // 1. The blob parses.
        let parsed = CiphertextBlob::parse(blob_bytes)?;
        // 2. KeyId, if given, names the blob's key.
        if let Some(k) = key_id {
            let named = self.resolve(caller, k, &mut Touched::default())?;
            if named.id != parsed.key_id {
                return Err(OpError::IncorrectKey("The key ID in the request does not identify a KMS key that can perform this operation.".into()));
            }
        }
        let key = match self.store.key(&parsed.key_id)? {
            Some(k) => self.refresh(k)?,
            None => None,
        }
        .ok_or_else(|| OpError::InvalidCiphertext(String::new()))?;
        touched.keys.push(key.arn.clone());
        // 3. The caller is authorized.
        self.authorize(
            caller,
            &key,
            &Ask {
                operation,
                context: Some(ctx),
                grant_tokens: tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        // 4. Key state.
        require_enabled(&key)?;
        require_symmetric(&key)?;
        // 5. The context authenticates.
        let material = self
            .material_for(&key, parsed.material_version)?
            .ok_or_else(|| OpError::InvalidCiphertext(String::new()))?;
        let plaintext = parsed.open(&material, ctx)?;
        Ok((key, plaintext))
    }

    fn decrypt(
        &self,
        caller: &Caller,
        r: DecryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        check_algorithm(r.encryption_algorithm.as_deref())?;
        if r.recipient.is_some() {
            return Err(OpError::UnsupportedOperation(
                "Recipient (Nitro Enclaves attestation) is not supported".into(),
            ));
        }
        let ctx = ctx_of(r.encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let (key, plaintext) = self.open_blob(
            caller,
            Unwrap {
                blob: &r.ciphertext_blob.0,
                context: &ctx,
                key_id: r.key_id.as_deref(),
                operation: "Decrypt",
                tokens: &tokens,
            },
            touched,
        )?;
        dry_run(r.dry_run)?;
        let mut out = json!({"KeyId": key.arn, "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"});
        // Moved, not copied: the server wipes the response Value's strings.
        out["Plaintext"] = Value::String(b64(&plaintext));
        Ok(out)
    }

    fn re_encrypt(
        &self,
        caller: &Caller,
        r: ReEncryptRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        check_algorithm(r.source_encryption_algorithm.as_deref())?;
        check_algorithm(r.destination_encryption_algorithm.as_deref())?;
        let src_ctx = ctx_of(r.source_encryption_context)?;
        let dst_ctx = ctx_of(r.destination_encryption_context)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let (src, plaintext) = self.open_blob(
            caller,
            Unwrap {
                blob: &r.ciphertext_blob.0,
                context: &src_ctx,
                key_id: r.source_key_id.as_deref(),
                operation: "ReEncryptFrom",
                tokens: &tokens,
            },
            touched,
        )?;
        let dst = self.resolve(caller, &r.destination_key_id, touched)?;
        self.authorize(
            caller,
            &dst,
            &Ask {
                operation: "ReEncryptTo",
                context: Some(&dst_ctx),
                grant_tokens: &tokens,
                grants_apply: true,
                ..Ask::default()
            },
        )?;
        require_enabled(&dst)?;
        require_symmetric(&dst)?;
        dry_run(r.dry_run)?;
        let blob = self.seal_for(&dst, &dst_ctx, &plaintext)?;
        Ok(json!({
            "CiphertextBlob": b64(&blob), "SourceKeyId": src.arn, "KeyId": dst.arn,
            "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT", "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"
        }))
    }

    fn principal_field(
        arn: Option<String>,
        service: Option<String>,
        what: &str,
        required: bool,
    ) -> Result<Option<String>, OpError> {
        let v = match (arn, service) {
            (Some(_), Some(_)) => {
                return Err(OpError::Validation(format!(
                    "Specify {what}Principal or {what}ServicePrincipal, not both"
                )));
            }
            (Some(a), None) => {
                if Principal::parse(&a).is_none() {
                    return Err(OpError::Validation(format!("Invalid {what}Principal {a}")));
                }
                Some(Principal::parse(&a).map(|p| p.arn()).unwrap_or(a))
            }
            (None, Some(s)) => {
                if !is_service_principal(&s) {
                    return Err(OpError::Validation(format!(
                        "Invalid {what}ServicePrincipal {s}"
                    )));
                }
                Some(s)
            }
            (None, None) if required => {
                return Err(OpError::Validation(format!("{what}Principal is required")));
            }
            (None, None) => None,
        };
        Ok(v)
    }

    fn create_grant(
        &self,
        caller: &Caller,
        r: CreateGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let grantee = Self::principal_field(
            r.grantee_principal,
            r.grantee_service_principal,
            "Grantee",
            true,
        )?
        .ok_or_else(|| OpError::Validation("GranteePrincipal is required".into()))?;
        let retiring = Self::principal_field(
            r.retiring_principal,
            r.retiring_service_principal,
            "Retiring",
            false,
        )?;
        if r.operations.is_empty() {
            return Err(OpError::Validation(
                "Operations must name at least one operation".into(),
            ));
        }
        for op in &r.operations {
            if !GRANT_OPERATIONS.contains(&op.as_str()) {
                return Err(OpError::Validation(format!(
                    "Value '{op}' at 'operations' failed to satisfy constraint"
                )));
            }
        }
        let constraints = r.constraints.unwrap_or_default();
        if constraints.subset.is_some() && constraints.equals.is_some() {
            return Err(OpError::Validation(
                "Specify EncryptionContextSubset or EncryptionContextEquals, not both".into(),
            ));
        }
        if !constraints.is_empty()
            && r.operations
                .iter()
                .any(|o| !is_cryptographic_operation(o) && o != "CreateGrant" && o != "RetireGrant")
        {
            return Err(OpError::Validation(
                "Grant constraints are not supported for the non-cryptographic operations listed"
                    .into(),
            ));
        }
        if let Some(n) = &r.name
            && (n.is_empty()
                || n.len() > 256
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ":/_-".contains(c)))
        {
            return Err(OpError::Validation("Grant name is not valid".into()));
        }
        let key = self.resolve(caller, &r.key_id, touched)?;
        let tokens = r.grant_tokens.unwrap_or_default();
        let mut extra = vec![("kms:GranteePrincipal", grantee.clone())];
        if let Some(rp) = &retiring {
            extra.push(("kms:RetiringPrincipal", rp.clone()));
        }
        if caller.via_service().is_some() {
            extra.push(("kms:GrantIsForAWSResource", "true".into()));
        }
        let ask = Ask {
            operation: "CreateGrant",
            context: None,
            grant_tokens: &tokens,
            extra,
            extra_multi: vec![("kms:GrantOperations", r.operations.clone())],
            grants_apply: false,
        };
        let verdict = match self.evaluate(caller, &key, &ask)? {
            // A grantee holding CreateGrant may create narrower grants only, and only
            // when no explicit Deny applies (evaluate() answers that first).
            Verdict::NotAllowed
                if self.parent_grant_allows(caller, &key, &r.operations, &constraints)? =>
            {
                Verdict::Allowed
            }
            v => v,
        };
        verdict.into_result(caller.effective(), "CreateGrant", &key.arn)?;
        require_not_pending(&key)?;
        if self.store.grants_for_key(&key.id)?.len() >= MAX_GRANTS_PER_KEY {
            return Err(OpError::LimitExceeded(format!(
                "{} already has {MAX_GRANTS_PER_KEY} grants",
                key.arn
            )));
        }
        dry_run(r.dry_run)?;
        let mut token_bytes = [0u8; 48];
        fill_random(&mut token_bytes);
        let grant = GrantRecord {
            id: random_hex(32),
            key_id: key.id.clone(),
            name: r.name.unwrap_or_default(),
            grantee,
            retiring,
            operations: r.operations,
            constraints,
            issuing_account: format!("arn:aws:iam::{}:root", self.account),
            created: self.clock.now(),
            token: {
                use base64::Engine;
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token_bytes)
            },
        };
        self.store.insert_grant(&grant)?;
        Ok(json!({"GrantToken": grant.token, "GrantId": grant.id}))
    }

    /// Whether a live grant to the caller holding CreateGrant covers a new grant of
    /// `operations` under `constraints` (same or narrower).
    fn parent_grant_allows(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        operations: &[String],
        constraints: &GrantConstraints,
    ) -> Result<bool, OpError> {
        let names = grantee_names(caller);
        Ok(self.store.grants_for_key(&key.id)?.iter().any(|g| {
            names.contains(&g.grantee)
                && g.operations.iter().any(|o| o == "CreateGrant")
                && operations.iter().all(|o| g.operations.contains(o))
                && g.constraints.is_narrowed_by(constraints)
        }))
    }

    fn grant_json(g: &GrantRecord, key_arn: &str) -> Value {
        let mut v = json!({
            "KeyId": key_arn, "GrantId": g.id, "Name": g.name, "CreationDate": g.created,
            "GranteePrincipal": g.grantee, "IssuingAccount": g.issuing_account, "Operations": g.operations,
        });
        if let Some(r) = &g.retiring {
            v["RetiringPrincipal"] = json!(r);
        }
        if !g.constraints.is_empty() {
            v["Constraints"] = serde_json::to_value(&g.constraints).unwrap_or(Value::Null);
        }
        v
    }

    fn list_grants(
        &self,
        caller: &Caller,
        r: ListGrantsRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.resolve(caller, &r.key_id, touched)?;
        let mut extra = Vec::new();
        if caller.via_service().is_some() {
            extra.push(("kms:GrantIsForAWSResource", "true".to_owned()));
        }
        self.authorize(
            caller,
            &key,
            &Ask {
                operation: "ListGrants",
                extra,
                ..Ask::default()
            },
        )?;
        let items: Vec<Value> = self
            .store
            .grants_for_key(&key.id)?
            .iter()
            .filter(|g| r.grant_id.as_ref().is_none_or(|id| *id == g.id))
            .filter(|g| r.grantee_principal.as_ref().is_none_or(|p| *p == g.grantee))
            .map(|g| Self::grant_json(g, &key.arn))
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        Ok(paged(json!({}), "Grants", items, next))
    }

    fn list_retirable(
        &self,
        caller: &Caller,
        r: ListRetirableGrantsRequest,
    ) -> Result<Value, OpError> {
        let is_self = grantee_names(caller).contains(&r.retiring_principal);
        if !is_self {
            self.authorize_account_action(caller, "ListRetirableGrants")?;
        }
        let items: Vec<Value> = self
            .store
            .retirable_grants(&r.retiring_principal)?
            .iter()
            .map(|g| Self::grant_json(g, &self.key_arn(&g.key_id)))
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        Ok(paged(json!({}), "Grants", items, next))
    }

    fn retire_grant(
        &self,
        caller: &Caller,
        r: RetireGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let grant = match (&r.grant_token, &r.key_id, &r.grant_id) {
            (Some(t), _, _) => match self.store.grant_by_token(t)? {
                Some(g) => g,
                None if self.store.token_issued(t)? => {
                    return Err(OpError::NotFound(
                        "The grant has already been retired or revoked.".into(),
                    ));
                }
                None => {
                    return Err(OpError::InvalidGrantToken(
                        "The grant token is not valid.".into(),
                    ));
                }
            },
            (None, Some(k), Some(id)) => {
                let key = self.resolve(caller, k, touched)?;
                let g = self.store.grant(id)?.filter(|g| g.key_id == key.id);
                g.ok_or_else(|| OpError::NotFound(format!("Grant ID {id} not found")))?
            }
            (None, None, Some(_)) | (None, Some(_), None) => {
                return Err(OpError::Validation(
                    "RetireGrant needs GrantToken, or KeyId and GrantId".into(),
                ));
            }
            (None, None, None) => {
                return Err(OpError::Validation(
                    "RetireGrant needs GrantToken, or KeyId and GrantId".into(),
                ));
            }
        };
        touched.keys.push(self.key_arn(&grant.key_id));
        let names = grantee_names(caller);
        let account_root = format!("arn:aws:iam::{}:root", self.account);
        let allowed = grant.retiring.as_ref().is_some_and(|rp| names.contains(rp))
            || (names.contains(&grant.grantee)
                && grant.operations.iter().any(|o| o == "RetireGrant"))
            || names.contains(&account_root);
        if !allowed {
            return Err(OpError::AccessDenied(format!(
                "User: {} is not authorized to retire grant {}",
                caller.effective().arn(),
                grant.id
            )));
        }
        dry_run(r.dry_run)?;
        self.store.delete_grant(&grant.id)?;
        Ok(json!({}))
    }

    fn revoke_grant(
        &self,
        caller: &Caller,
        r: RevokeGrantRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.resolve(caller, &r.key_id, touched)?;
        let mut extra = Vec::new();
        if caller.via_service().is_some() {
            extra.push(("kms:GrantIsForAWSResource", "true".to_owned()));
        }
        self.authorize(
            caller,
            &key,
            &Ask {
                operation: "RevokeGrant",
                extra,
                ..Ask::default()
            },
        )?;
        if r.grant_id.len() != 64 || !r.grant_id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(OpError::InvalidGrantId(format!(
                "Invalid grant ID {}",
                r.grant_id
            )));
        }
        let g = self
            .store
            .grant(&r.grant_id)?
            .filter(|g| g.key_id == key.id);
        if g.is_none() {
            return Err(OpError::NotFound(format!(
                "Grant ID {} not found",
                r.grant_id
            )));
        }
        dry_run(r.dry_run)?;
        self.store.delete_grant(&r.grant_id)?;
        Ok(json!({}))
    }

    fn policy_name(name: Option<&str>) -> Result<(), OpError> {
        match name {
            None | Some("default") => Ok(()),
            Some(other) => Err(OpError::NotFound(format!("No such policy exists: {other}"))),
        }
    }

    fn get_key_policy(
        &self,
        caller: &Caller,
        r: GetKeyPolicyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.resolve(caller, &r.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("GetKeyPolicy"))?;
        Self::policy_name(r.policy_name.as_deref())?;
        Ok(json!({"Policy": key.policy, "PolicyName": "default"}))
    }

    fn list_key_policies(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_id = r
            .key_id
            .clone()
            .ok_or_else(|| OpError::Validation("KeyId is required".into()))?;
        let key = self.resolve(caller, &key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("ListKeyPolicies"))?;
        Ok(json!({"PolicyNames": ["default"], "Truncated": false}))
    }

    fn put_key_policy(
        &self,
        caller: &Caller,
        r: PutKeyPolicyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.resolve(caller, &r.key_id, touched)?;
        self.authorize(caller, &key, &Self::simple_ask("PutKeyPolicy"))?;
        require_customer_managed(&key, caller, "PutKeyPolicy")?;
        Self::policy_name(r.policy_name.as_deref())?;
        if r.policy.len() > 32_768 {
            return Err(OpError::LimitExceeded(
                "The key policy is larger than 32 KB".into(),
            ));
        }
        PolicyDocument::parse(&r.policy)?.require_principals()?;
        require_not_pending(&key)?;
        key.policy = r.policy;
        self.store.update_key(&key)?;
        Ok(json!({}))
    }
}
