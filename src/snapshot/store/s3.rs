//! [`S3Store`]: a snapshot store in an S3 bucket (`s3://BUCKET/PREFIX`), through
//! `aws-sdk-s3`.
//!
//! Credentials, region and endpoint come from the standard AWS sources, as for the KMS
//! client (`crate::kms`): the profile (`--snapshot-store-profile`, else the default chain),
//! `AWS_CONFIG_FILE` / `AWS_SHARED_CREDENTIALS_FILE`, `AWS_ENDPOINT_URL_S3`,
//! `AWS_ENDPOINT_URL` or the profile's `endpoint_url`. With an endpoint configured (Garage,
//! MinIO, ...) requests use path-style addressing; without a region, `us-east-1`.
//!
//! The store owns a two-worker Tokio runtime and blocks the calling thread on it, so many
//! std threads can upload at once. Connect timeout 3 s, 60 s per operation, the SDK's
//! standard retries: an unreachable store fails within seconds.

use std::time::{Duration, SystemTime};

use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;

use super::{ObjectInfo, S3Settings, SnapshotStore, StoreError, check_key, check_list_prefix};

/// Connect timeout: a store that does not answer a TCP connect in 3 s is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Timeout of one attempt of an operation (a 512 KiB chunk on a slow link fits).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of a whole operation, retries included.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Region used when neither the profile nor the environment names one.
const DEFAULT_REGION: &str = "us-east-1";

/// A snapshot store in an S3 bucket, under a key prefix.
#[derive(Debug)]
pub struct S3Store {
    rt: tokio::runtime::Runtime,
    client: aws_sdk_s3::Client,
    bucket: String,
    /// The key prefix followed by '/', or empty.
    prefix: String,
    /// The store's URL, `s3://bucket/prefix`.
    url: String,
    /// The URL and the endpoint requests go to, for error messages.
    target: String,
}

impl S3Store {
    /// Connects to `bucket` (keys under `prefix`, which may be empty) with `settings`,
    /// and probes the bucket (HeadBucket).
    ///
    /// # Errors
    /// [`StoreError::NoSuchBucket`], [`StoreError::AccessDenied`] (no or bad credentials),
    /// [`StoreError::Unreachable`], [`StoreError::Setup`].
    pub fn connect(bucket: &str, prefix: &str, settings: &S3Settings) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapshot-store")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Setup(format!("cannot start the S3 runtime: {e}")))?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .operation_timeout(OPERATION_TIMEOUT)
                    .build(),
            );
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(files) = profile_files(settings) {
            loader = loader.profile_files(files);
        }
        let sdk = rt.block_on(loader.load());
        // The S3 builder takes AWS_ENDPOINT_URL_S3 over the loader's endpoint (which is
        // AWS_ENDPOINT_URL or the profile's endpoint_url), as the AWS CLI does.
        let endpoint = std::env::var("AWS_ENDPOINT_URL_S3")
            .ok()
            .filter(|u| !u.is_empty())
            .or_else(|| sdk.endpoint_url().map(str::to_owned));
        let mut conf = aws_sdk_s3::config::Builder::from(&sdk);
        if sdk.region().is_none() {
            conf = conf.region(aws_sdk_s3::config::Region::new(DEFAULT_REGION));
        }
        if let Some(url) = &endpoint {
            check_endpoint(url)?;
            conf = conf.force_path_style(true);
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        let prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", check_key(prefix)?)
        };
        let url = super::StoreUrl::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.trim_end_matches('/').to_owned(),
        };
        let target = match &endpoint {
            Some(e) => format!("{url} (endpoint {e})"),
            None => url.to_string(),
        };
        let store = Self {
            rt,
            client,
            bucket: bucket.to_owned(),
            prefix,
            url: url.to_string(),
            target,
        };
        store.probe()?;
        Ok(store)
    }

    /// HeadBucket: the bucket exists and these credentials may use it.
    fn probe(&self) -> Result<(), StoreError> {
        self.rt
            .block_on(self.client.head_bucket().bucket(&self.bucket).send())
            .map(|_| ())
            .map_err(|e| self.sdk_err("HeadBucket", None, e))
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        Ok(format!("{}{}", self.prefix, check_key(key)?))
    }

    /// Maps an SDK error of `op` (on `key`, if any) to a [`StoreError`].
    fn sdk_err<E, R>(&self, op: &'static str, key: Option<&str>, e: SdkError<E, R>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug + Send + Sync + 'static,
    {
        let status = match &e {
            SdkError::ServiceError(ctx) => Some(raw_status(ctx.raw())),
            _ => None,
        };
        if let Some(se) = e.as_service_error() {
            let code = se.code().unwrap_or("").to_owned();
            let message = se.message().unwrap_or_default().to_owned();
            let status = status.flatten();
            return match (code.as_str(), status) {
                ("NoSuchBucket", _) => StoreError::NoSuchBucket {
                    bucket: self.bucket.clone(),
                },
                ("NoSuchKey", _) => match key {
                    Some(key) => StoreError::NotFound {
                        key: key.to_owned(),
                    },
                    None => StoreError::Service { op, code, message },
                },
                // HEAD answers carry no body, hence no code: the status says it.
                (_, Some(404)) | ("NotFound", _) => match key {
                    Some(key) => StoreError::NotFound {
                        key: key.to_owned(),
                    },
                    None => StoreError::NoSuchBucket {
                        bucket: self.bucket.clone(),
                    },
                },
                (
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "Forbidden"
                    | "InvalidToken"
                    | "ExpiredToken",
                    _,
                )
                | (_, Some(401 | 403)) => StoreError::AccessDenied {
                    store: self.target.clone(),
                    detail: if code.is_empty() {
                        format!("{op}: HTTP 403")
                    } else {
                        format!("{op}: {code}: {message}")
                    },
                },
                _ => StoreError::Service {
                    op,
                    code: if code.is_empty() {
                        status.map_or_else(|| "Unknown".to_owned(), |s| format!("HTTP {s}"))
                    } else {
                        code
                    },
                    message,
                },
            };
        }
        if has_credentials_error(&e) {
            return StoreError::AccessDenied {
                store: self.target.clone(),
                detail: format!("no usable credentials: {}", DisplayErrorContext(&e)),
            };
        }
        match e {
            SdkError::ConstructionFailure(_) => {
                StoreError::Setup(format!("{op}: {}", DisplayErrorContext(&e)))
            }
            _ => StoreError::Unreachable {
                store: self.target.clone(),
                detail: format!("{op}: {}", DisplayErrorContext(&e)),
            },
        }
    }
}

/// The AWS config and credentials files `settings` name instead of the standard ones.
// The new names (EnvConfigFiles) live in aws-runtime, which aws-config does not re-export.
#[allow(deprecated)]
fn profile_files(settings: &S3Settings) -> Option<aws_config::profile::profile_file::ProfileFiles> {
    use aws_config::profile::profile_file::{ProfileFileKind, ProfileFiles};
    if settings.config_file.is_none() && settings.credentials_file.is_none() {
        return None;
    }
    let mut files = ProfileFiles::builder();
    if let Some(path) = &settings.config_file {
        files = files.with_file(ProfileFileKind::Config, path);
    }
    if let Some(path) = &settings.credentials_file {
        files = files.with_file(ProfileFileKind::Credentials, path);
    }
    Some(files.build())
}

/// Refuses an endpoint that is not an absolute http(s) URL naming a host.
fn check_endpoint(url: &str) -> Result<(), StoreError> {
    let ok = url
        .parse::<http::Uri>()
        .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.authority().is_some());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Setup(format!(
            "S3 endpoint URL {url:?} is not an absolute http(s) URL such as http://127.0.0.1:3900 (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or the profile's endpoint_url)"
        )))
    }
}

/// The HTTP status of a raw response, when the SDK kept one.
fn raw_status<R: std::fmt::Debug + 'static>(raw: &R) -> Option<u16> {
    let any: &dyn std::any::Any = raw;
    any.downcast_ref::<aws_smithy_runtime_api::http::Response>()
        .map(|r| r.status().as_u16())
}

/// Whether the credential chain, not the store, failed (no profile, no keys).
fn has_credentials_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<aws_credential_types::provider::error::CredentialsError>()
            .is_some()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

impl SnapshotStore for S3Store {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        let req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(body.to_vec()));
        self.rt
            .block_on(req.send())
            .map(|_| ())
            .map_err(|e| self.sdk_err("PutObject", None, e))
    }

    fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let full = self.full_key(key)?;
        let out = self
            .rt
            .block_on(
                self.client
                    .get_object()
                    .bucket(&self.bucket)
                    .key(full)
                    .send(),
            )
            .map_err(|e| self.sdk_err("GetObject", Some(key), e))?;
        let body = self
            .rt
            .block_on(out.body.collect())
            .map_err(|e| StoreError::Unreachable {
                store: self.target.clone(),
                detail: format!(
                    "GetObject {key}: the body was cut off: {}",
                    DisplayErrorContext(&e)
                ),
            })?;
        Ok(body.into_bytes().to_vec())
    }

    fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.full_key(key)?;
        match self.rt.block_on(
            self.client
                .head_object()
                .bucket(&self.bucket)
                .key(full)
                .send(),
        ) {
            Ok(_) => Ok(true),
            Err(e) => match self.sdk_err("HeadObject", Some(key), e) {
                StoreError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, StoreError> {
        check_list_prefix(prefix)?;
        let full_prefix = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .rt
                .block_on(
                    self.client
                        .list_objects_v2()
                        .bucket(&self.bucket)
                        .prefix(&full_prefix)
                        .set_continuation_token(token.take())
                        .send(),
                )
                .map_err(|e| self.sdk_err("ListObjectsV2", None, e))?;
            for object in page.contents() {
                let bad = |detail: String| StoreError::BadAnswer {
                    op: "ListObjectsV2",
                    detail,
                };
                let full = object
                    .key()
                    .ok_or_else(|| bad("an entry without a key".into()))?;
                let key = full.strip_prefix(&self.prefix).ok_or_else(|| {
                    bad(format!("key {full:?} outside the prefix {:?}", self.prefix))
                })?;
                let size = u64::try_from(object.size().unwrap_or(0))
                    .map_err(|_| bad(format!("key {full:?} has a negative size")))?;
                let modified = object
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(ObjectInfo {
                    key: key.to_owned(),
                    size,
                    modified,
                });
            }
            match (page.is_truncated(), page.next_continuation_token()) {
                (Some(true), Some(next)) => token = Some(next.to_owned()),
                (Some(true), None) => {
                    return Err(StoreError::BadAnswer {
                        op: "ListObjectsV2",
                        detail: "a truncated page without a continuation token".into(),
                    });
                }
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        match self.rt.block_on(
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(full)
                .send(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => match self.sdk_err("DeleteObject", Some(key), e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }
}
