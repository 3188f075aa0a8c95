//! The state directory: first-start initialization (root key, database, access keys,
//! Alice's sample IAM policy) and the AWS shared credentials/config files.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::blob::fill_random;
use crate::keys::{RootKey, RootKeyError};
use crate::principal::Principal;
use crate::store::{AccessKeyRecord, KeyStore, SqliteStore, StoreError};

/// State-directory failures.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Root key problem.
    #[error(transparent)]
    RootKey(#[from] RootKeyError),
    /// Database problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The database exists but its root key does not.
    #[error(
        "{0} is missing but kms.db exists: restore the root key (refusing to create a new one)"
    )]
    MissingRootKey(PathBuf),
    /// File I/O.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Alice's IAM policy as published for encrypted WorkSpaces.
pub const ALICE_IAM_POLICY: &str = include_str!("../policies/alice-workspaces-iam-policy.json");
/// The sample key policy for a customer managed key used by WorkSpaces.
pub const WORKSPACES_KEY_POLICY: &str = include_str!("../policies/workspaces-key-policy.json");

/// Substitutes account and region into a sample written for 111122223333/us-east-1.
pub fn localize(sample: &str, account: &str, region: &str) -> String {
    sample
        .replace("111122223333", account)
        .replace("us-east-1", region)
}

/// The principals with access keys, by profile name.
pub fn profiles(account: &str) -> Vec<(&'static str, String)> {
    vec![
        ("admin", format!("arn:aws:iam::{account}:root")),
        ("alice", format!("arn:aws:iam::{account}:user/Alice")),
        ("workspaces", "workspaces.amazonaws.com".to_owned()),
        ("ebs", "ebs.amazonaws.com".to_owned()),
    ]
}

fn random_chars(n: usize, alphabet: &[u8]) -> String {
    let mut b = vec![0u8; n];
    fill_random(&mut b);
    b.iter()
        .map(|x| alphabet[usize::from(*x) % alphabet.len()] as char)
        .collect()
}

/// An opened state directory.
#[derive(Debug)]
pub struct StateDir {
    /// The directory.
    pub dir: PathBuf,
    /// The store.
    pub store: SqliteStore,
    /// The root key.
    pub root: RootKey,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_owned(),
        source,
    }
}

impl StateDir {
    /// Opens `dir`, creating every file on first start.
    pub fn open(dir: &Path, account: &str, region: &str) -> Result<Self, StateError> {
        use std::os::unix::fs::DirBuilderExt;
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let root_path = dir.join("root.key");
        if !root_path.exists() && dir.join("kms.db").exists() {
            // A new root key could not unseal any existing key material.
            return Err(StateError::MissingRootKey(root_path));
        }
        let root = RootKey::load_or_create(&root_path)?;
        let store = SqliteStore::open(&dir.join("kms.db"))?;
        sync_parent(&dir.join("kms.db"))?;
        if store.access_keys()?.is_empty() {
            const UPPER: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
            const SECRET: &[u8] =
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            for (profile, principal) in profiles(account) {
                store.insert_access_key(&AccessKeyRecord {
                    access_key_id: format!("AKIA{}", random_chars(16, UPPER)),
                    secret: random_chars(40, SECRET),
                    principal,
                    profile: profile.to_owned(),
                })?;
            }
            let alice = format!("arn:aws:iam::{account}:user/Alice");
            store.put_principal_policy(
                &alice,
                "WorkSpacesEncryptedVolumes",
                &localize(ALICE_IAM_POLICY, account, region),
            )?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            store,
            root,
        })
    }

    /// Writes `credentials` and `config` (0600) for `endpoint`.
    pub fn write_client_files(&self, region: &str, endpoint: &str) -> Result<(), StateError> {
        let keys = self.store.access_keys()?;
        let mut creds = String::from("# Written by kms-daemon: one profile per principal.\n");
        let mut config = String::from("# Written by kms-daemon.\n");
        for k in &keys {
            creds.push_str(&format!(
                "[{}]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n",
                k.profile, k.access_key_id, k.secret
            ));
            config.push_str(&format!(
                "[profile {}]\nregion = {region}\nendpoint_url = {endpoint}\noutput = json\n\n",
                k.profile
            ));
        }
        write_private(&self.dir.join("credentials"), &creds)?;
        write_private(&self.dir.join("config"), &config)?;
        Ok(())
    }

    /// Access keys as (id, secret, principal) for the verifier.
    pub fn verifier_keys(&self) -> Result<Vec<(String, String, Principal)>, StateError> {
        Ok(self
            .store
            .access_keys()?
            .into_iter()
            .filter_map(|k| Principal::parse(&k.principal).map(|p| (k.access_key_id, k.secret, p)))
            .collect())
    }
}

/// Syncs the directory holding `path` so a new or renamed entry survives a crash.
fn sync_parent(path: &Path) -> Result<(), StateError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))?;
    }
    Ok(())
}

/// Atomically replaces `path` with `content`, mode 0600, durably.
pub fn write_private(path: &Path, content: &str) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(content.as_bytes()).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_parent(path)?;
    Ok(())
}

/// Errors of the `put-principal-policy` subcommand.
#[derive(Debug, thiserror::Error)]
pub enum PutPolicyError {
    /// Bad principal.
    #[error("{0} is not an IAM principal ARN")]
    Principal(String),
    /// Bad document.
    #[error("policy document: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// Reading the file.
    #[error("{0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// Store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `kms-daemon put-principal-policy`: validates and stores an identity policy. Works
/// while the daemon runs (SQLite WAL; the daemon reads policies per request).
pub fn put_principal_policy_cli(
    dir: &Path,
    principal: &str,
    file: &Path,
    name: &str,
) -> Result<(), PutPolicyError> {
    let p = Principal::parse(principal)
        .filter(|p| !p.is_service())
        .ok_or_else(|| PutPolicyError::Principal(principal.to_owned()))?;
    let doc =
        std::fs::read_to_string(file).map_err(|e| PutPolicyError::Read(file.to_owned(), e))?;
    crate::policy::PolicyDocument::parse(&doc)?;
    let store = SqliteStore::open(&dir.join("kms.db"))?;
    store.put_principal_policy(&p.arn(), name, &doc)?;
    Ok(())
}
