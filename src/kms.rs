//! KMS client: `aws-sdk-kms` configured from the standard AWS sources.
//!
//! Profiles, credentials and endpoint come from where the AWS CLI finds them
//! (`AWS_PROFILE`/`--profile`, `AWS_SHARED_CREDENTIALS_FILE`, `AWS_CONFIG_FILE` with
//! `endpoint_url`, `AWS_ENDPOINT_URL_KMS`), so the same binary talks to `kms-daemon` or to
//! AWS KMS. A service acts for a user only with the user's proof (DESIGN §2, AWS's forward
//! access sessions): [`ForwardAccessToken::presign`] signs a short-lived SigV4 presigned
//! request with the *user's* credentials, naming the delegate and a fresh nonce, and
//! [`KmsClient::connect_forwarding`] sends it in the signed header
//! `x-sealvol-forward-access` on the service's own requests. The daemon checks the
//! user's signature; nothing here ever names a user by ARN.
//!
//! A [`KmsTarget`] carries the command line's `--region` and `--endpoint-url`, which win
//! over both (flag > environment > profile, as in the AWS CLI).
//!
//! The API is blocking: each client owns a small current-thread Tokio runtime.

use std::collections::BTreeMap;

use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{GrantConstraints, GrantOperation, KeyManagerType, KeySpec, KeyState};

use crate::secret::{SecretError, VolumeKey};

mod forward_access;
mod target;

use forward_access::ForwardAccess;
pub use forward_access::ForwardAccessToken;
pub use target::{KmsTarget, parse_endpoint_url};

/// The signed header that carries a user's forward-access token.
pub const FORWARD_ACCESS_HEADER: &str = "x-sealvol-forward-access";
/// The only service that may act for users.
pub const FORWARDING_SERVICE: &str = "workspaces.amazonaws.com";
/// Lifetime of a forward-access token (the daemon accepts at most 900 s).
pub const FORWARD_ACCESS_TTL: std::time::Duration = std::time::Duration::from_secs(300);

/// An encryption context: sorted key/value pairs.
pub type EncryptionContext = BTreeMap<String, String>;

/// Errors from KMS calls.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// The service answered with an error code (e.g. `DisabledException`).
    #[error("KMS {op} refused: {code}: {message}")]
    Service {
        /// The operation.
        op: &'static str,
        /// AWS error code.
        code: String,
        /// AWS error message.
        message: String,
    },
    /// The request did not reach the service or the answer was unreadable.
    #[error(
        "KMS {op} failed: {detail} (is kms-daemon running there? The endpoint comes from --endpoint-url, else AWS_ENDPOINT_URL_KMS, else the profile's endpoint_url in AWS_CONFIG_FILE)"
    )]
    Transport {
        /// The operation.
        op: &'static str,
        /// What went wrong, naming the endpoint the request went to.
        detail: String,
    },
    /// The answer lacked a field or held a bad key.
    #[error("KMS {op} returned an unusable answer: {detail}")]
    BadAnswer {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Local set-up failed.
    #[error("cannot set up the KMS client: {0}")]
    Setup(String),
    /// The user's profile has no usable credentials, so nobody can act for the user.
    #[error(
        "profile {profile:?} has no usable AWS credentials ({detail}); the WorkSpaces service acts for a user only with a token the user signs with their own credentials: set AWS_PROFILE/--profile to a profile with credentials (or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
    )]
    NoCredentials {
        /// The profile.
        profile: String,
        /// What the credential chain said.
        detail: String,
    },
}

impl KmsError {
    /// The AWS error code, if the service answered with one.
    #[must_use]
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Service { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn sdk_err<E, R>(op: &'static str, endpoint: &str, e: SdkError<E, R>) -> KmsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    match e.as_service_error() {
        Some(se) => KmsError::Service {
            op,
            code: se.code().unwrap_or("Unknown").to_string(),
            message: se.message().unwrap_or_default().to_string(),
        },
        None => KmsError::Transport {
            op,
            detail: format!("cannot use {endpoint}: {}", DisplayErrorContext(&e)),
        },
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, KmsError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| KmsError::Setup(e.to_string()))
}

/// Facts about a key from DescribeKey.
#[derive(Debug, Clone)]
pub struct KeyInfo {
    /// Key ARN.
    pub arn: String,
    /// Key id.
    pub key_id: String,
    /// `Enabled`, `Disabled`, `PendingDeletion`, ...
    pub state: String,
    /// `SYMMETRIC_DEFAULT`, ...
    pub spec: String,
    /// `AWS` or `CUSTOMER`.
    pub manager: String,
}

impl KeyInfo {
    /// Whether the key can wrap data keys now.
    #[must_use]
    pub fn is_usable(&self) -> bool {
        self.state == KeyState::Enabled.as_str() && self.spec == KeySpec::SymmetricDefault.as_str()
    }
}

/// A grant to create.
#[derive(Debug, Clone)]
pub struct GrantSpec {
    /// Key id or ARN.
    pub key_id: String,
    /// Grantee (IAM ARN or service principal such as `ebs.amazonaws.com`).
    pub grantee: String,
    /// Retiring principal.
    pub retiring: Option<String>,
    /// Allowed operations (`Decrypt`, `GenerateDataKeyWithoutPlaintext`, ...).
    pub operations: Vec<&'static str>,
    /// `EncryptionContextEquals` constraint.
    pub context_equals: Option<EncryptionContext>,
    /// `EncryptionContextSubset` constraint.
    pub context_subset: Option<EncryptionContext>,
    /// Grant name.
    pub name: Option<String>,
}

/// A created grant.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Grant id.
    pub grant_id: String,
    /// Grant token (usable before the grant is eventually consistent).
    pub grant_token: String,
}

/// A blocking KMS client for one profile.
#[derive(Debug)]
pub struct KmsClient {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_kms::Client,
    profile: String,
    /// The endpoint URL requests go to (named in transport errors).
    endpoint: String,
}

impl KmsClient {
    /// A client that signs as `profile` and acts for itself, sending to `target`'s region
    /// and endpoint where set.
    ///
    /// # Errors
    /// Runtime creation failure; an unusable endpoint URL.
    pub fn connect_to(profile: &str, target: &KmsTarget) -> Result<Self, KmsError> {
        Self::build(profile, target, None)
    }

    /// A client that signs as the service `profile` and acts for the user whose
    /// `token` it carries; the daemon evaluates the user's permissions via the service.
    ///
    /// # Errors
    /// Runtime creation failure; an unusable endpoint URL.
    pub fn connect_forwarding(
        profile: &str,
        token: &ForwardAccessToken,
        target: &KmsTarget,
    ) -> Result<Self, KmsError> {
        Self::build(profile, target, Some(token.0.as_str()))
    }

    fn build(profile: &str, target: &KmsTarget, token: Option<&str>) -> Result<Self, KmsError> {
        let rt = runtime()?;
        let sdk = target.load(&rt, profile);
        let endpoint = target.endpoint(&sdk)?;
        let mut conf = aws_sdk_kms::config::Builder::from(&sdk);
        if let Some(u) = &target.endpoint_url {
            // The service builder prefers AWS_ENDPOINT_URL_KMS over the loader's endpoint;
            // the flag must win over both.
            conf = conf.endpoint_url(u);
        }
        if let Some(t) = token {
            conf = conf.interceptor(ForwardAccess(zeroize::Zeroizing::new(t.to_owned())));
        }
        let client = aws_sdk_kms::Client::from_conf(conf.build());
        Ok(Self {
            rt,
            client,
            profile: profile.to_string(),
            endpoint,
        })
    }

    /// The profile this client signs as.
    #[must_use]
    pub fn profile(&self) -> &str {
        &self.profile
    }

    /// One cheap forwarded call (ListAliases, one entry) so the KMS checks the
    /// forward-access token this client carries before anything is changed.
    ///
    /// # Errors
    /// The service's refusal (AccessDeniedException for a bad token) or transport failure.
    pub fn verify_forward_access(&self) -> Result<(), KmsError> {
        self.rt
            .block_on(self.client.list_aliases().limit(1).send())
            .map(|_| ())
            .map_err(|e| sdk_err("ListAliases", &self.endpoint, e))
    }

    /// DescribeKey.
    ///
    /// # Errors
    /// The service's refusal (e.g. NotFoundException) or transport failure.
    pub fn describe_key(&self, key_id: &str) -> Result<KeyInfo, KmsError> {
        let out = self
            .rt
            .block_on(self.client.describe_key().key_id(key_id).send())
            .map_err(|e| sdk_err("DescribeKey", &self.endpoint, e))?;
        let md = out.key_metadata.ok_or_else(|| KmsError::BadAnswer {
            op: "DescribeKey",
            detail: "no KeyMetadata".into(),
        })?;
        Ok(KeyInfo {
            arn: md.arn.clone().unwrap_or_default(),
            key_id: md.key_id.clone(),
            state: md
                .key_state
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            spec: md
                .key_spec
                .as_ref()
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            manager: md.key_manager.as_ref().map_or_else(
                || KeyManagerType::Customer.as_str().to_string(),
                |m| m.as_str().to_string(),
            ),
        })
    }

    /// CreateGrant.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn create_grant(&self, spec: &GrantSpec) -> Result<Grant, KmsError> {
        let mut req = self
            .client
            .create_grant()
            .key_id(&spec.key_id)
            .grantee_principal(&spec.grantee);
        if let Some(r) = &spec.retiring {
            req = req.retiring_principal(r);
        }
        for op in &spec.operations {
            req = req.operations(GrantOperation::from(*op));
        }
        if spec.context_equals.is_some() || spec.context_subset.is_some() {
            let c = GrantConstraints::builder()
                .set_encryption_context_equals(
                    spec.context_equals.clone().map(|m| m.into_iter().collect()),
                )
                .set_encryption_context_subset(
                    spec.context_subset.clone().map(|m| m.into_iter().collect()),
                )
                .build();
            req = req.constraints(c);
        }
        if let Some(n) = &spec.name {
            req = req.name(n);
        }
        let out = self
            .rt
            .block_on(req.send())
            .map_err(|e| sdk_err("CreateGrant", &self.endpoint, e))?;
        Ok(Grant {
            grant_id: out.grant_id.unwrap_or_default(),
            grant_token: out.grant_token.unwrap_or_default(),
        })
    }

    /// RetireGrant by key and grant id.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn retire_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        self.rt
            .block_on(
                self.client
                    .retire_grant()
                    .key_id(key_id)
                    .grant_id(grant_id)
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| sdk_err("RetireGrant", &self.endpoint, e))
    }

    /// RevokeGrant by key and grant id.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn revoke_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        self.rt
            .block_on(
                self.client
                    .revoke_grant()
                    .key_id(key_id)
                    .grant_id(grant_id)
                    .send(),
            )
            .map(|_| ())
            .map_err(|e| sdk_err("RevokeGrant", &self.endpoint, e))
    }

    /// Grant ids on a key.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn list_grant_ids(&self, key_id: &str) -> Result<Vec<String>, KmsError> {
        Ok(self
            .list_named_grants(key_id)?
            .into_iter()
            .map(|(id, _)| id)
            .collect())
    }

    /// Grants on a key as (grant id, grant name) pairs.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn list_named_grants(&self, key_id: &str) -> Result<Vec<(String, String)>, KmsError> {
        let out = self
            .rt
            .block_on(self.client.list_grants().key_id(key_id).send())
            .map_err(|e| sdk_err("ListGrants", &self.endpoint, e))?;
        Ok(out
            .grants
            .unwrap_or_default()
            .into_iter()
            .filter_map(|g| Some((g.grant_id?, g.name.unwrap_or_default())))
            .collect())
    }

    /// GenerateDataKeyWithoutPlaintext, 64 bytes (XTS-AES-256). Returns (blob, key ARN).
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn generate_data_key_without_plaintext(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        let out = self
            .rt
            .block_on(
                self.client
                    .generate_data_key_without_plaintext()
                    .key_id(key_id)
                    .number_of_bytes(64)
                    .set_encryption_context(Some(context.clone().into_iter().collect()))
                    .set_grant_tokens(Some(grant_tokens.to_vec()).filter(|t| !t.is_empty()))
                    .send(),
            )
            .map_err(|e| sdk_err("GenerateDataKeyWithoutPlaintext", &self.endpoint, e))?;
        let blob = out.ciphertext_blob.ok_or_else(|| KmsError::BadAnswer {
            op: "GenerateDataKeyWithoutPlaintext",
            detail: "no CiphertextBlob".into(),
        })?;
        Ok((blob.into_inner(), out.key_id.unwrap_or_default()))
    }

    /// Decrypt a data-key blob into a [`VolumeKey`] (wiping the SDK's copy).
    ///
    /// # Errors
    /// The service's refusal (wrong context, no grant, disabled key) or a bad key.
    pub fn decrypt_volume_key(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        key_id: Option<&str>,
        grant_tokens: &[String],
    ) -> Result<VolumeKey, KmsError> {
        let out = self
            .rt
            .block_on(
                self.client
                    .decrypt()
                    .ciphertext_blob(Blob::new(blob.to_vec()))
                    .set_key_id(key_id.map(str::to_string))
                    .set_encryption_context(Some(context.clone().into_iter().collect()))
                    .set_grant_tokens(Some(grant_tokens.to_vec()).filter(|t| !t.is_empty()))
                    .send(),
            )
            .map_err(|e| sdk_err("Decrypt", &self.endpoint, e))?;
        let mut plain = out
            .plaintext
            .ok_or_else(|| KmsError::BadAnswer {
                op: "Decrypt",
                detail: "no Plaintext".into(),
            })?
            .into_inner();
        VolumeKey::from_slice(&mut plain).map_err(|e: SecretError| KmsError::BadAnswer {
            op: "Decrypt",
            detail: e.to_string(),
        })
    }

    /// ReEncrypt a blob to another key and/or context. Returns (blob, destination key ARN).
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    pub fn re_encrypt(
        &self,
        blob: &[u8],
        source_context: &EncryptionContext,
        destination_key: &str,
        destination_context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        let out = self
            .rt
            .block_on(
                self.client
                    .re_encrypt()
                    .ciphertext_blob(Blob::new(blob.to_vec()))
                    .set_source_encryption_context(Some(
                        source_context.clone().into_iter().collect(),
                    ))
                    .destination_key_id(destination_key)
                    .set_destination_encryption_context(Some(
                        destination_context.clone().into_iter().collect(),
                    ))
                    .set_grant_tokens(Some(grant_tokens.to_vec()).filter(|t| !t.is_empty()))
                    .send(),
            )
            .map_err(|e| sdk_err("ReEncrypt", &self.endpoint, e))?;
        let blob = out.ciphertext_blob.ok_or_else(|| KmsError::BadAnswer {
            op: "ReEncrypt",
            detail: "no CiphertextBlob".into(),
        })?;
        Ok((blob.into_inner(), out.key_id.unwrap_or_default()))
    }
}

/// The KMS calls the controller makes, in front of [`KmsClient`] so that the controller's
/// decisions (key checks, grant specs, contexts, what a refusal becomes) can be tested
/// with an in-memory fake instead of a daemon.
pub trait Kms {
    /// DescribeKey.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    fn describe_key(&self, key_id: &str) -> Result<KeyInfo, KmsError>;
    /// CreateGrant.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    fn create_grant(&self, spec: &GrantSpec) -> Result<Grant, KmsError>;
    /// RetireGrant.
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    fn retire_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError>;
    /// GenerateDataKeyWithoutPlaintext (64 bytes); returns (blob, key ARN).
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    fn generate_data_key_without_plaintext(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError>;
    /// Decrypt of a data-key blob into a [`VolumeKey`].
    ///
    /// # Errors
    /// The service's refusal (wrong context, no grant, disabled key) or a bad key.
    fn decrypt_volume_key(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        key_id: Option<&str>,
        grant_tokens: &[String],
    ) -> Result<VolumeKey, KmsError>;
    /// ReEncrypt of a blob to another key and/or context; returns (blob, key ARN).
    ///
    /// # Errors
    /// The service's refusal or transport failure.
    fn re_encrypt(
        &self,
        blob: &[u8],
        source_context: &EncryptionContext,
        destination_key: &str,
        destination_context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError>;
}

impl Kms for KmsClient {
    fn describe_key(&self, key_id: &str) -> Result<KeyInfo, KmsError> {
        KmsClient::describe_key(self, key_id)
    }
    fn create_grant(&self, spec: &GrantSpec) -> Result<Grant, KmsError> {
        KmsClient::create_grant(self, spec)
    }
    fn retire_grant(&self, key_id: &str, grant_id: &str) -> Result<(), KmsError> {
        KmsClient::retire_grant(self, key_id, grant_id)
    }
    fn generate_data_key_without_plaintext(
        &self,
        key_id: &str,
        context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        KmsClient::generate_data_key_without_plaintext(self, key_id, context, grant_tokens)
    }
    fn decrypt_volume_key(
        &self,
        blob: &[u8],
        context: &EncryptionContext,
        key_id: Option<&str>,
        grant_tokens: &[String],
    ) -> Result<VolumeKey, KmsError> {
        KmsClient::decrypt_volume_key(self, blob, context, key_id, grant_tokens)
    }
    fn re_encrypt(
        &self,
        blob: &[u8],
        source_context: &EncryptionContext,
        destination_key: &str,
        destination_context: &EncryptionContext,
        grant_tokens: &[String],
    ) -> Result<(Vec<u8>, String), KmsError> {
        KmsClient::re_encrypt(
            self,
            blob,
            source_context,
            destination_key,
            destination_context,
            grant_tokens,
        )
    }
}
