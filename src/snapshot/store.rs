//! Snapshot stores: where snapshot chunks and manifests live (DESIGN §11).
//!
//! A store is a flat namespace of whole objects under a prefix, addressed by relative
//! '/'-separated keys (`chunks/<hex>`, `workspaces/<ws-id>/<kind>/<time>.json`). Two
//! backends: a directory ([`FileStore`], `file:///DIR`, atomic and durable puts) and an
//! S3 bucket ([`S3Store`], `s3://BUCKET/PREFIX`, through `aws-sdk-s3` with the standard AWS
//! sources for credentials, region and endpoint). [`open`] parses nothing: it takes a
//! [`StoreUrl`] and hands back the backend behind the [`SnapshotStore`] trait, after
//! checking the store is usable (the S3 bucket is probed), so a wrong bucket, bad
//! credentials or an unreachable endpoint fail at open with a clear [`StoreError`].
//!
//! The API is blocking and `Sync`: the snapshot engine calls one store from many threads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::SystemTime;

mod file;
mod s3;

pub use file::FileStore;
pub use s3::S3Store;

/// Where a snapshot store is: `file:///abs/dir`, `s3://bucket` or `s3://bucket/prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A local (or mounted) directory, absolute.
    File(PathBuf),
    /// An S3 bucket and a key prefix inside it (empty: the whole bucket). The prefix has
    /// no leading or trailing '/'.
    S3 {
        /// The bucket name.
        bucket: String,
        /// The key prefix, '/'-separated, without leading or trailing '/'.
        prefix: String,
    },
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |why: &'static str| StoreError::BadUrl {
            url: url.to_owned(),
            why,
        };
        if let Some(path) = url.strip_prefix("file://") {
            if path.is_empty() {
                return Err(bad("names no directory"));
            }
            if !path.starts_with('/') {
                return Err(bad(
                    "is not an absolute path (file:// then /, as in file:///srv/snapshots)",
                ));
            }
            if path.contains('\0') {
                return Err(bad("contains a NUL byte"));
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            check_bucket(bucket).map_err(bad)?;
            let prefix = prefix.strip_suffix('/').unwrap_or(prefix);
            if !prefix.is_empty() {
                check_segments(prefix).map_err(bad)?;
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        Err(bad("is neither a file:// nor an s3:// URL"))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File(dir) => write!(f, "file://{}", dir.display()),
            Self::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Self::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// S3 bucket naming rules (3-63 of `a-z0-9.-`, starting and ending with a letter or digit).
fn check_bucket(bucket: &str) -> Result<(), &'static str> {
    if bucket.is_empty() {
        return Err("names no bucket");
    }
    if !(3..=63).contains(&bucket.len()) {
        return Err("has a bucket name that is not 3 to 63 characters long");
    }
    if !bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
    {
        return Err("has a bucket name with characters other than a-z, 0-9, '.' and '-'");
    }
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric());
    if !edge_ok(bucket.bytes().next()) || !edge_ok(bucket.bytes().last()) {
        return Err("has a bucket name that does not start and end with a letter or digit");
    }
    Ok(())
}

/// The rules every key (and the S3 prefix) follows: relative, '/'-separated, no empty
/// segments, no segment starting with '.' (so no `.` or `..`, and never a name the file
/// store uses for its temporary files), no NUL.
fn check_segments(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("is empty");
    }
    if key.starts_with('/') {
        return Err("starts with '/'");
    }
    if key.contains('\0') {
        return Err("contains a NUL byte");
    }
    for segment in key.split('/') {
        if segment.is_empty() {
            return Err("has an empty segment");
        }
        if segment.starts_with('.') {
            return Err("has a segment starting with '.'");
        }
    }
    Ok(())
}

/// `key` if it is a valid object key.
///
/// # Errors
/// [`StoreError::BadKey`] saying what is wrong with it.
pub fn check_key(key: &str) -> Result<&str, StoreError> {
    check_segments(key).map_err(|why| StoreError::BadKey {
        key: key.to_owned(),
        why,
    })?;
    Ok(key)
}

/// `prefix` if it is a valid listing prefix: empty, or a key, or a key followed by '/'.
fn check_list_prefix(prefix: &str) -> Result<&str, StoreError> {
    let trimmed = prefix.strip_suffix('/').unwrap_or(prefix);
    if !prefix.is_empty() {
        check_key(trimmed)?;
    }
    Ok(prefix)
}

/// One object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key, relative to the store's prefix.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// Last modification time.
    pub modified: SystemTime,
}

/// A snapshot store: whole objects under relative keys.
///
/// Keys are relative to the store's prefix, '/'-separated, e.g. `chunks/<hex>` or
/// `workspaces/ws-1/user/2026-12-02T10:00:00Z.json`; a key with a leading '/', an empty
/// segment or a segment starting with '.' is refused with [`StoreError::BadKey`].
/// Every method takes `&self` and may be called from many threads at once (not from
/// inside an async runtime: the S3 store blocks on its own).
pub trait SnapshotStore: Send + Sync {
    /// The store's URL, for messages.
    fn describe(&self) -> String;

    /// Writes the whole object `key` (replacing any), atomically: a reader sees the old
    /// object, or no object, or all of `body`.
    ///
    /// # Errors
    /// A bad key; the store's failure.
    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError>;

    /// Reads the whole object `key`.
    ///
    /// # Errors
    /// [`StoreError::NotFound`] when there is none; a bad key; the store's failure.
    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError>;

    /// Whether the object `key` exists.
    ///
    /// # Errors
    /// A bad key; the store's failure.
    fn exists(&self, key: &str) -> Result<bool, StoreError>;

    /// Every object whose key starts with `prefix` (empty: every object), sorted by key.
    ///
    /// # Errors
    /// A bad prefix; the store's failure.
    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError>;

    /// Deletes the object `key`; deleting a missing object succeeds.
    ///
    /// # Errors
    /// A bad key; the store's failure.
    fn delete(&self, key: &str) -> Result<(), StoreError>;
}

/// Where S3 credentials, region and endpoint come from.
///
/// The default is the standard AWS chain: `AWS_PROFILE` (else `default`), the files named
/// by `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` (else `~/.aws/`), the
/// environment's keys, region and `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// The profile to use (None: the default chain's).
    pub profile: Option<String>,
    /// An AWS config file to read instead of `AWS_CONFIG_FILE` / `~/.aws/config`.
    pub config_file: Option<PathBuf>,
    /// An AWS credentials file to read instead of `AWS_SHARED_CREDENTIALS_FILE` /
    /// `~/.aws/credentials`.
    pub credentials_file: Option<PathBuf>,
}

/// Opens a store. `profile`: AWS profile for S3 credentials (None: default chain).
///
/// S3: region from the profile or environment (`us-east-1` if none), endpoint from
/// `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL` or the profile's `endpoint_url`, path-style
/// addressing when an endpoint is configured; the bucket is probed (HeadBucket). File: the
/// directory is created if missing.
///
/// # Errors
/// [`StoreError::NoSuchBucket`], [`StoreError::AccessDenied`] (bad credentials too),
/// [`StoreError::Unreachable`], [`StoreError::Io`] for a directory that cannot be made.
pub fn open(url: &StoreUrl, profile: Option<&str>) -> Result<Box<dyn SnapshotStore>, StoreError> {
    open_with(
        url,
        &S3Settings {
            profile: profile.map(str::to_owned),
            ..S3Settings::default()
        },
    )
}

/// [`open`] with S3 settings that can also name the AWS config and credentials files.
///
/// # Errors
/// As [`open`].
pub fn open_with(
    url: &StoreUrl,
    settings: &S3Settings,
) -> Result<Box<dyn SnapshotStore>, StoreError> {
    Ok(match url {
        StoreUrl::File(dir) => Box::new(FileStore::open(dir)?),
        StoreUrl::S3 { bucket, prefix } => Box::new(S3Store::connect(bucket, prefix, settings)?),
    })
}

/// Errors from snapshot stores.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store URL is not one of the accepted forms.
    #[error(
        "snapshot store URL {url:?} {why}; give file:///ABSOLUTE/DIR, s3://BUCKET or s3://BUCKET/PREFIX (--snapshot-store or SEALVOL_SNAPSHOT_STORE)"
    )]
    BadUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// An object key (or listing prefix) is not a relative '/'-separated path.
    #[error(
        "snapshot store key {key:?} {why}; keys are relative '/'-separated paths such as chunks/<hex>, with no empty segment and no segment starting with '.'"
    )]
    BadKey {
        /// The key as given.
        key: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// There is no object under the key.
    #[error("the snapshot store has no object {key:?}")]
    NotFound {
        /// The key.
        key: String,
    },
    /// The store could not be reached (connection refused, DNS, timeout) or its answer was
    /// cut off.
    #[error(
        "cannot reach the snapshot store {store}: {detail}; check that the server runs and the endpoint (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the profile's endpoint_url) points at it"
    )]
    Unreachable {
        /// The store URL and endpoint.
        store: String,
        /// What went wrong.
        detail: String,
    },
    /// The bucket does not exist (or these credentials cannot see it).
    #[error(
        "the snapshot store's bucket {bucket:?} does not exist; create it, or fix the bucket in the store URL (--snapshot-store)"
    )]
    NoSuchBucket {
        /// The bucket.
        bucket: String,
    },
    /// The store refused the credentials or the request (no credentials, unknown key,
    /// wrong secret, no permission on the bucket).
    #[error(
        "the snapshot store {store} refused access: {detail}; check the profile's access key and secret (--snapshot-store-profile) and that the key may read and write the bucket"
    )]
    AccessDenied {
        /// The store URL and endpoint.
        store: String,
        /// What the store or the credential chain said.
        detail: String,
    },
    /// A file store's file system operation failed.
    #[error("snapshot store: cannot {op} {path}: {source}")]
    Io {
        /// What was being done (`write`, `rename`, ...).
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The S3 service answered with another error code.
    #[error("snapshot store {op} refused: {code}: {message}")]
    Service {
        /// The operation.
        op: &'static str,
        /// The S3 error code.
        code: String,
        /// The S3 error message.
        message: String,
    },
    /// The store answered something unusable (e.g. a listing entry without a key).
    #[error("snapshot store {op} returned an unusable answer: {detail}")]
    BadAnswer {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// Local set-up failed (runtime, endpoint URL).
    #[error("cannot set up the snapshot store client: {0}")]
    Setup(String),
}

impl StoreError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> StoreUrl {
        url.parse().unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn accepted_urls_parse_and_round_trip() {
        assert_eq!(
            parse("file:///srv/snapshots"),
            StoreUrl::File("/srv/snapshots".into())
        );
        assert_eq!(
            parse("s3://snaps"),
            StoreUrl::S3 {
                bucket: "snaps".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse("s3://my.bucket-1/some/prefix"),
            StoreUrl::S3 {
                bucket: "my.bucket-1".into(),
                prefix: "some/prefix".into()
            }
        );
        for url in [
            "file:///srv/snapshots",
            "file:///",
            "s3://snaps",
            "s3://snaps/p",
            "s3://my.bucket-1/some/prefix",
        ] {
            assert_eq!(parse(url).to_string(), url);
            assert_eq!(parse(&parse(url).to_string()), parse(url));
        }
    }

    #[test]
    fn a_trailing_slash_on_the_prefix_is_dropped() {
        assert_eq!(parse("s3://snaps/p/").to_string(), "s3://snaps/p");
        assert_eq!(parse("s3://snaps/").to_string(), "s3://snaps");
    }

    #[test]
    fn other_urls_are_refused_naming_the_accepted_forms() {
        for bad in [
            "",
            "/srv/snapshots",
            "snapshots",
            "http://h/b",
            "S3://snaps",
            "file://",
            "file://relative/dir",
            "s3://",
            "s3:///prefix",
            "s3://ab",
            "s3://Upper",
            "s3://-dash",
            "s3://snaps//p",
            "s3://snaps/a/../b",
            "s3://snaps/.hidden",
        ] {
            let e = bad.parse::<StoreUrl>().expect_err(bad);
            assert!(matches!(e, StoreError::BadUrl { .. }), "{bad}: {e:?}");
            let msg = e.to_string();
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(
                msg.contains("file:///") && msg.contains("s3://BUCKET"),
                "{msg}"
            );
        }
    }

    #[test]
    fn keys_are_checked() {
        for good in [
            "chunks/ab12",
            "workspaces/ws-1/user/2026-12-02T10:00:00Z.json",
            "a",
        ] {
            assert_eq!(check_key(good).expect(good), good);
        }
        for bad in [
            "",
            "/chunks/a",
            "chunks//a",
            "chunks/",
            "../x",
            "a/./b",
            "a/..",
            ".tmp",
            "a\0b",
        ] {
            assert!(
                matches!(check_key(bad), Err(StoreError::BadKey { .. })),
                "{bad:?}"
            );
        }
        for good in ["", "chunks/", "chunks/ab", "workspaces/ws-1/"] {
            assert_eq!(check_list_prefix(good).expect(good), good);
        }
        for bad in ["/", "//", "../", "a//"] {
            assert!(check_list_prefix(bad).is_err(), "{bad:?}");
        }
    }
}
