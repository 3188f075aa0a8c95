//! Key domain types: specs, states, key records, grants, and the root key that seals
//! key material at rest.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::blob::{BlobError, SymmetricKey};
use crate::context::EncryptionContext;

/// Errors loading or creating the root key.
#[derive(Debug, thiserror::Error)]
pub enum RootKeyError {
    /// I/O on the root key file.
    #[error("root key {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Group or other can read it.
    #[error("root key {0} is readable by group or other (mode {1:o}); chmod 600 it")]
    Permissions(String, u32),
    /// Not 32 bytes.
    #[error("root key {0} must hold exactly 32 bytes")]
    Length(String),
}

/// The root key sealing every key's material.
#[derive(Debug)]
pub struct RootKey(SymmetricKey);

impl RootKey {
    /// Loads `path`, creating it (0600, 32 random bytes) if absent. Refuses a file that
    /// group or other can read.
    pub fn load_or_create(path: &Path) -> Result<Self, RootKeyError> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let p = path.display().to_string();
        let io = |source| RootKeyError::Io {
            path: p.clone(),
            source,
        };
        if !path.exists() {
            let key = SymmetricKey::generate();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io)?;
            f.write_all(key.expose()).map_err(io)?;
            f.sync_all().map_err(io)?;
            if let Some(dir) = path.parent() {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
            }
        }
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(RootKeyError::Permissions(p, mode));
        }
        let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(io)?);
        SymmetricKey::from_slice(&bytes)
            .map(Self)
            .ok_or(RootKeyError::Length(p))
    }

    /// A root key from bytes (tests).
    pub fn from_key(key: SymmetricKey) -> Self {
        Self(key)
    }

    fn aad(key_id: &str, version: u32) -> Vec<u8> {
        format!("sealvol-kms-material\0{key_id}\0{version}").into_bytes()
    }

    /// Seals one version of a key's material.
    pub fn seal_material(&self, key_id: &str, version: u32, material: &SymmetricKey) -> Vec<u8> {
        self.0.seal(material.expose(), &Self::aad(key_id, version))
    }

    /// Unseals material sealed by [`RootKey::seal_material`].
    pub fn unseal_material(
        &self,
        key_id: &str,
        version: u32,
        sealed: &[u8],
    ) -> Result<SymmetricKey, BlobError> {
        let raw = self.0.open(sealed, &Self::aad(key_id, version))?;
        SymmetricKey::from_slice(&raw).ok_or(BlobError::Length)
    }
}

/// Key states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Usable.
    Enabled,
    /// Not usable until enabled.
    Disabled,
    /// Scheduled for deletion.
    PendingDeletion,
}

impl KeyState {
    /// AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enabled => "Enabled",
            Self::Disabled => "Disabled",
            Self::PendingDeletion => "PendingDeletion",
        }
    }

    /// From the AWS name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "Enabled" => Self::Enabled,
            "Disabled" => Self::Disabled,
            "PendingDeletion" => Self::PendingDeletion,
            _ => return None,
        })
    }
}

/// Key specs AWS KMS offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySpec {
    /// AES-256-GCM.
    SymmetricDefault,
    /// RSA key pairs.
    Rsa(u16),
    /// NIST curves.
    EccNist(u16),
    /// secp256k1.
    EccSecgP256k1,
    /// HMAC keys.
    Hmac(u16),
}

impl KeySpec {
    /// From the AWS name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "SYMMETRIC_DEFAULT" => Self::SymmetricDefault,
            "RSA_2048" => Self::Rsa(2048),
            "RSA_3072" => Self::Rsa(3072),
            "RSA_4096" => Self::Rsa(4096),
            "ECC_NIST_P256" => Self::EccNist(256),
            "ECC_NIST_P384" => Self::EccNist(384),
            "ECC_NIST_P521" => Self::EccNist(521),
            "ECC_SECG_P256K1" => Self::EccSecgP256k1,
            "HMAC_224" => Self::Hmac(224),
            "HMAC_256" => Self::Hmac(256),
            "HMAC_384" => Self::Hmac(384),
            "HMAC_512" => Self::Hmac(512),
            _ => return None,
        })
    }

    /// AWS name.
    pub fn as_str(self) -> String {
        match self {
            Self::SymmetricDefault => "SYMMETRIC_DEFAULT".into(),
            Self::Rsa(n) => format!("RSA_{n}"),
            Self::EccNist(n) => format!("ECC_NIST_P{n}"),
            Self::EccSecgP256k1 => "ECC_SECG_P256K1".into(),
            Self::Hmac(n) => format!("HMAC_{n}"),
        }
    }

    /// Key usages valid for this spec; the first is the default.
    pub fn usages(self) -> &'static [&'static str] {
        match self {
            Self::SymmetricDefault => &["ENCRYPT_DECRYPT"],
            Self::Rsa(_) => &["ENCRYPT_DECRYPT", "SIGN_VERIFY"],
            Self::EccNist(_) | Self::EccSecgP256k1 => &["SIGN_VERIFY", "KEY_AGREEMENT"],
            Self::Hmac(_) => &["GENERATE_VERIFY_MAC"],
        }
    }

    /// Encryption algorithms listed in key metadata for a usage.
    pub fn encryption_algorithms(self, usage: &str) -> Vec<&'static str> {
        match (self, usage) {
            (Self::SymmetricDefault, _) => vec!["SYMMETRIC_DEFAULT"],
            (Self::Rsa(_), "ENCRYPT_DECRYPT") => vec!["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"],
            _ => vec![],
        }
    }

    /// Signing algorithms listed in key metadata for a usage.
    pub fn signing_algorithms(self, usage: &str) -> Vec<&'static str> {
        match (self, usage) {
            (Self::Rsa(_), "SIGN_VERIFY") => vec![
                "RSASSA_PSS_SHA_256",
                "RSASSA_PSS_SHA_384",
                "RSASSA_PSS_SHA_512",
                "RSASSA_PKCS1_V1_5_SHA_256",
                "RSASSA_PKCS1_V1_5_SHA_384",
                "RSASSA_PKCS1_V1_5_SHA_512",
            ],
            (Self::EccNist(256) | Self::EccSecgP256k1, "SIGN_VERIFY") => vec!["ECDSA_SHA_256"],
            (Self::EccNist(384), "SIGN_VERIFY") => vec!["ECDSA_SHA_384"],
            (Self::EccNist(_), "SIGN_VERIFY") => vec!["ECDSA_SHA_512"],
            _ => vec![],
        }
    }
}

/// Who manages a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyManager {
    /// A customer managed key.
    Customer,
    /// An AWS managed key (`aws/<service>`).
    Aws,
}

impl KeyManager {
    /// AWS name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Customer => "CUSTOMER",
            Self::Aws => "AWS",
        }
    }
}

/// A KMS key's metadata and policy (material is stored separately, sealed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// UUID.
    pub id: String,
    /// Full ARN.
    pub arn: String,
    /// Free text.
    pub description: String,
    /// Key spec.
    pub spec: KeySpec,
    /// Key usage.
    pub usage: String,
    /// State.
    pub state: KeyState,
    /// Epoch seconds.
    pub created: i64,
    /// When a pending deletion completes.
    pub deletion_date: Option<i64>,
    /// The pending window given.
    pub pending_window_days: Option<i64>,
    /// Customer or AWS managed.
    pub manager: KeyManager,
    /// Rotation period in days when automatic rotation is on.
    pub rotation_period_days: Option<i64>,
    /// When the next automatic rotation is due.
    pub next_rotation: Option<i64>,
    /// Start of the last on-demand rotation.
    pub on_demand_rotation: Option<i64>,
    /// Key policy JSON.
    pub policy: String,
    /// Newest material version (1-based).
    pub current_version: u32,
}

/// Grant constraints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantConstraints {
    /// Request context must contain these pairs.
    #[serde(
        rename = "EncryptionContextSubset",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub subset: Option<EncryptionContext>,
    /// Request context must equal this.
    #[serde(
        rename = "EncryptionContextEquals",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub equals: Option<EncryptionContext>,
}

impl GrantConstraints {
    /// Whether a request context satisfies the constraints.
    pub fn allows(&self, ctx: &EncryptionContext) -> bool {
        self.subset.as_ref().is_none_or(|s| ctx.contains_all(s))
            && self
                .equals
                .as_ref()
                .is_none_or(|e| ctx.equals_ignoring_key_case(e))
    }

    /// Whether `child` is at least as strict as `self` (every context the child allows,
    /// self allows too).
    pub fn is_narrowed_by(&self, child: &GrantConstraints) -> bool {
        if let Some(eq) = &self.equals {
            return child
                .equals
                .as_ref()
                .is_some_and(|c| c.equals_ignoring_key_case(eq));
        }
        if let Some(sub) = &self.subset {
            let child_sub_ok = child.subset.as_ref().is_some_and(|c| c.contains_all(sub));
            let child_eq_ok = child.equals.as_ref().is_some_and(|c| c.contains_all(sub));
            return child_sub_ok || child_eq_ok;
        }
        true
    }

    /// No constraint given.
    pub fn is_empty(&self) -> bool {
        self.subset.is_none() && self.equals.is_none()
    }
}

/// A grant on a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// Grant id (64 hex chars).
    pub id: String,
    /// Key UUID.
    pub key_id: String,
    /// Optional name.
    pub name: String,
    /// Grantee: IAM ARN or service principal.
    pub grantee: String,
    /// Retiring principal.
    pub retiring: Option<String>,
    /// Allowed operations.
    pub operations: Vec<GrantOperation>,
    /// Constraints.
    pub constraints: GrantConstraints,
    /// Account that created the grant.
    pub issuing_account: String,
    /// Epoch seconds.
    pub created: i64,
    /// The grant token handed out on creation.
    pub token: String,
}

impl GrantRecord {
    /// Whether this grant lets `principal` run `operation` with `ctx`.
    pub fn authorizes(
        &self,
        principal: &str,
        operation: GrantOperation,
        ctx: Option<&EncryptionContext>,
    ) -> bool {
        if self.grantee != principal || !self.operations.contains(&operation) {
            return false;
        }
        match ctx {
            Some(c) => self.constraints.allows(c),
            None => true,
        }
    }
}

/// Declares [`GrantOperation`]: each variant's name is its AWS name, on the wire and in
/// the store (serde writes the variant name).
macro_rules! grant_operations {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// An operation a grant may name: exactly the set AWS accepts in CreateGrant.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum GrantOperation { $($(#[$doc])* $name,)* }

        impl GrantOperation {
            /// Every grant operation, in AWS's documentation order.
            pub const ALL: &[GrantOperation] = &[$(GrantOperation::$name,)*];

            /// The AWS operation name (as stored and sent).
            pub fn as_str(self) -> &'static str {
                match self { $(GrantOperation::$name => stringify!($name),)* }
            }

            /// Parses an AWS operation name; `None` for anything a grant may not name.
            pub fn from_name(name: &str) -> Option<Self> {
                match name { $(stringify!($name) => Some(GrantOperation::$name),)* _ => None }
            }
        }
    };
}

grant_operations! {
    /// kms:Decrypt.
    Decrypt,
    /// kms:Encrypt.
    Encrypt,
    /// kms:GenerateDataKey.
    GenerateDataKey,
    /// kms:GenerateDataKeyWithoutPlaintext.
    GenerateDataKeyWithoutPlaintext,
    /// The source side of kms:ReEncrypt.
    ReEncryptFrom,
    /// The destination side of kms:ReEncrypt.
    ReEncryptTo,
    /// kms:Sign (accepted in grants; the daemon has no asymmetric keys).
    Sign,
    /// kms:Verify (accepted in grants).
    Verify,
    /// kms:GetPublicKey (accepted in grants).
    GetPublicKey,
    /// kms:CreateGrant: the grantee may create narrower grants.
    CreateGrant,
    /// kms:RetireGrant: the grantee may retire this grant.
    RetireGrant,
    /// kms:DescribeKey.
    DescribeKey,
    /// kms:GenerateDataKeyPair (accepted in grants).
    GenerateDataKeyPair,
    /// kms:GenerateDataKeyPairWithoutPlaintext (accepted in grants).
    GenerateDataKeyPairWithoutPlaintext,
    /// kms:GenerateMac (accepted in grants).
    GenerateMac,
    /// kms:VerifyMac (accepted in grants).
    VerifyMac,
    /// kms:DeriveSharedSecret (accepted in grants).
    DeriveSharedSecret,
}

impl GrantOperation {
    /// Whether the operation takes an encryption context (constraints apply to it).
    pub fn is_cryptographic(self) -> bool {
        matches!(
            self,
            Self::Decrypt
                | Self::Encrypt
                | Self::GenerateDataKey
                | Self::GenerateDataKeyWithoutPlaintext
                | Self::ReEncryptFrom
                | Self::ReEncryptTo
                | Self::GenerateDataKeyPair
                | Self::GenerateDataKeyPairWithoutPlaintext
        )
    }
}

impl std::fmt::Display for GrantOperation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(pairs: &[(&str, &str)]) -> EncryptionContext {
        EncryptionContext::from_pairs(pairs.iter().copied())
    }

    fn grant(constraints: GrantConstraints) -> GrantRecord {
        GrantRecord {
            id: "g".into(),
            key_id: "k".into(),
            name: String::new(),
            grantee: "ebs.amazonaws.com".into(),
            retiring: None,
            operations: vec![
                GrantOperation::Decrypt,
                GrantOperation::GenerateDataKeyWithoutPlaintext,
            ],
            constraints,
            issuing_account: "111122223333".into(),
            created: 0,
            token: "t".into(),
        }
    }

    #[test]
    fn grant_enforces_principal_operation_and_equals_constraint() {
        let g = grant(GrantConstraints {
            equals: Some(ctx(&[("aws:ebs:id", "vol-1"), ("sid", "S@d-1")])),
            subset: None,
        });
        let good = ctx(&[("AWS:EBS:ID", "vol-1"), ("sid", "S@d-1")]);
        assert!(g.authorizes("ebs.amazonaws.com", GrantOperation::Decrypt, Some(&good)));
        assert!(!g.authorizes(
            "workspaces.amazonaws.com",
            GrantOperation::Decrypt,
            Some(&good)
        ));
        assert!(!g.authorizes("ebs.amazonaws.com", GrantOperation::Encrypt, Some(&good)));
        assert!(!g.authorizes(
            "ebs.amazonaws.com",
            GrantOperation::Decrypt,
            Some(&ctx(&[("aws:ebs:id", "vol-1")]))
        ));
        assert!(!g.authorizes(
            "ebs.amazonaws.com",
            GrantOperation::Decrypt,
            Some(&ctx(&[("aws:ebs:id", "VOL-1"), ("sid", "S@d-1")]))
        ));
        let extra = ctx(&[("aws:ebs:id", "vol-1"), ("sid", "S@d-1"), ("x", "y")]);
        assert!(!g.authorizes("ebs.amazonaws.com", GrantOperation::Decrypt, Some(&extra)));
    }

    #[test]
    fn grant_operations_round_trip_as_their_aws_names() {
        for &op in GrantOperation::ALL {
            assert_eq!(GrantOperation::from_name(op.as_str()), Some(op));
            assert_eq!(
                serde_json::to_string(&op).expect("serializes"),
                format!("\"{op}\"")
            );
        }
        assert_eq!(GrantOperation::ALL.len(), 17);
        assert_eq!(GrantOperation::from_name("decrypt"), None);
        assert_eq!(GrantOperation::from_name("ListGrants"), None);
        let stored: Vec<GrantOperation> =
            serde_json::from_str(r#"["Decrypt","ReEncryptTo"]"#).expect("parses");
        assert_eq!(
            stored,
            [GrantOperation::Decrypt, GrantOperation::ReEncryptTo]
        );
    }

    #[test]
    fn subset_constraint_and_narrowing() {
        let parent = GrantConstraints {
            subset: Some(ctx(&[("sid", "S@d-1")])),
            equals: None,
        };
        assert!(parent.allows(&ctx(&[("sid", "S@d-1"), ("aws:ebs:id", "vol-9")])));
        assert!(!parent.allows(&ctx(&[("sid", "S@d-2")])));
        assert!(parent.is_narrowed_by(&GrantConstraints {
            subset: None,
            equals: Some(ctx(&[("sid", "S@d-1"), ("aws:ebs:id", "v")]))
        }));
        assert!(parent.is_narrowed_by(&GrantConstraints {
            subset: Some(ctx(&[("sid", "S@d-1"), ("a", "b")])),
            equals: None
        }));
        assert!(!parent.is_narrowed_by(&GrantConstraints::default()));
        assert!(!parent.is_narrowed_by(&GrantConstraints {
            subset: Some(ctx(&[("sid", "other")])),
            equals: None
        }));
        let open = GrantConstraints::default();
        assert!(open.is_narrowed_by(&parent));
    }

    #[test]
    fn root_key_seals_material_bound_to_key_and_version() {
        let root = RootKey::from_key(SymmetricKey::generate());
        let m = SymmetricKey::generate();
        let sealed = root.seal_material("k1", 1, &m);
        assert_eq!(
            root.unseal_material("k1", 1, &sealed)
                .expect("opens")
                .expose(),
            m.expose()
        );
        assert!(root.unseal_material("k1", 2, &sealed).is_err());
        assert!(root.unseal_material("k2", 1, &sealed).is_err());
    }

    #[test]
    fn root_key_file_permissions_are_enforced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("root.key");
        RootKey::load_or_create(&p).expect("creates");
        assert_eq!(
            std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        RootKey::load_or_create(&p).expect("reloads");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            RootKey::load_or_create(&p),
            Err(RootKeyError::Permissions(..))
        ));
    }
}
