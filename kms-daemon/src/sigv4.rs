//! SigV4 request verification. The expected signature is computed by the `aws-sigv4`
//! crate over exactly the headers the client says it signed, then compared in constant
//! time.

use std::collections::HashMap;
use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use subtle::ConstantTimeEq;

use crate::forward::{self, FORWARD_ACCESS, ForwardError};
use crate::principal::{Caller, Principal};

/// Allowed clock skew.
pub const MAX_SKEW_SECS: i64 = 300;

/// Authentication failures, each mapped to the code AWS sends.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No Authorization header.
    #[error("Missing Authentication Token")]
    Missing,
    /// Authorization header malformed or lacking required parts.
    #[error("{0}")]
    Incomplete(String),
    /// Access key id unknown.
    #[error("The security token included in the request is invalid.")]
    UnknownAccessKey,
    /// Signature mismatch.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    BadSignature,
    /// Timestamp more than five minutes off.
    #[error("Signature expired: {0} is now earlier than {1} ({2} - 5 min.)")]
    Expired(String, String, String),
    /// Credential scope names another region or service.
    #[error("Credential should be scoped to a valid region or service")]
    Scope,
    /// The request is signed correctly, but the forward-access token it carries is
    /// refused: the signer is known, the user is not.
    #[error("User: {} is not authorized to act for another principal: {reason}", signer.signer)]
    ForwardAccess {
        /// The authenticated signer of the outer request.
        signer: Box<Caller>,
        /// Why the token was refused.
        reason: ForwardError,
    },
}

impl AuthError {
    /// AWS `__type` code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Missing => "MissingAuthenticationTokenException",
            Self::Incomplete(_) => "IncompleteSignatureException",
            Self::UnknownAccessKey => "UnrecognizedClientException",
            Self::BadSignature | Self::Expired(..) | Self::Scope => "InvalidSignatureException",
            Self::ForwardAccess { .. } => "AccessDeniedException",
        }
    }

    /// Why authentication failed, as one of a fixed set of snake_case words (the
    /// `reason` label of `kms_auth_failures_total`): finer than [`Self::code`], which
    /// folds several causes into one AWS code.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_auth",
            Self::Incomplete(_) => "malformed_auth",
            Self::UnknownAccessKey => "unknown_access_key",
            Self::BadSignature => "signature_mismatch",
            Self::Expired(..) => "expired_or_skewed_date",
            Self::Scope => "wrong_scope",
            Self::ForwardAccess { reason, .. } => reason.reason(),
        }
    }

    /// The signer, when the request's own signature verified (only a refused
    /// forward-access token fails after that): such refusals are audited under it.
    pub fn authenticated_signer(&self) -> Option<&Caller> {
        match self {
            Self::ForwardAccess { signer, .. } => Some(signer),
            _ => None,
        }
    }
}

/// The access keys the daemon accepts.
#[derive(Default, Clone)]
pub struct Verifier {
    keys: HashMap<String, (String, Principal)>,
    region: String,
    account: String,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets: access key ids and principals only.
        let keys: Vec<_> = self
            .keys
            .iter()
            .map(|(ak, (_, p))| (ak.as_str(), p.arn()))
            .collect();
        f.debug_struct("Verifier")
            .field("keys", &keys)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

struct AuthHeader<'a> {
    access_key: &'a str,
    scope_date: &'a str,
    scope_region: &'a str,
    scope_service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(v: &str) -> Result<AuthHeader<'_>, AuthError> {
    let rest = v.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| {
        AuthError::Incomplete("Authorization header must use AWS4-HMAC-SHA256".into())
    })?;
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(x) = part.strip_prefix("Credential=") {
            cred = Some(x);
        } else if let Some(x) = part.strip_prefix("SignedHeaders=") {
            signed = Some(x);
        } else if let Some(x) = part.strip_prefix("Signature=") {
            sig = Some(x);
        }
    }
    let missing = |what: &str| {
        AuthError::Incomplete(format!(
            "Authorization header requires '{what}' parameter. Authorization={v}"
        ))
    };
    let cred = cred.ok_or_else(|| missing("Credential"))?;
    let signed = signed.ok_or_else(|| missing("SignedHeaders"))?;
    let sig = sig.ok_or_else(|| missing("Signature"))?;
    let parts: Vec<&str> = cred.split('/').collect();
    let [
        access_key,
        scope_date,
        scope_region,
        scope_service,
        "aws4_request",
    ] = parts[..]
    else {
        return Err(AuthError::Incomplete(format!(
            "Credential should be scoped to a valid region and service. Credential={cred}"
        )));
    };
    if sig.len() != 64 || !sig.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(AuthError::BadSignature);
    }
    Ok(AuthHeader {
        access_key,
        scope_date,
        scope_region,
        scope_service,
        signed_headers: signed.split(';').collect(),
        signature: sig,
    })
}

impl Verifier {
    /// A verifier for `region`/`account` accepting the given (access key, secret, principal).
    pub fn new(
        region: &str,
        account: &str,
        keys: impl IntoIterator<Item = (String, String, Principal)>,
    ) -> Self {
        Self {
            keys: keys.into_iter().map(|(ak, sk, p)| (ak, (sk, p))).collect(),
            region: region.to_owned(),
            account: account.to_owned(),
        }
    }

    /// The principal an access key belongs to (without checking any signature).
    pub fn principal_of(&self, access_key: &str) -> Option<&Principal> {
        self.keys.get(access_key).map(|(_, p)| p)
    }

    /// Verifies a request; `now` is real wall-clock epoch seconds.
    pub fn verify(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        now: i64,
    ) -> Result<Caller, AuthError> {
        let headers = &parts.headers;
        let auth = headers
            .get(http::header::AUTHORIZATION)
            .ok_or(AuthError::Missing)?
            .to_str()
            .map_err(|_| AuthError::Incomplete("Authorization header is not ASCII".into()))?;
        let a = parse_authorization(auth)?;
        for required in ["host", "x-amz-date"] {
            if !a.signed_headers.contains(&required) {
                return Err(AuthError::Incomplete(format!(
                    "SignedHeaders must include {required}"
                )));
            }
        }
        if headers.contains_key("x-amz-target") && !a.signed_headers.contains(&"x-amz-target") {
            return Err(AuthError::Incomplete(
                "SignedHeaders must include x-amz-target".into(),
            ));
        }
        if headers.contains_key(FORWARD_ACCESS) && !a.signed_headers.contains(&FORWARD_ACCESS) {
            return Err(AuthError::Incomplete(format!(
                "SignedHeaders must include {FORWARD_ACCESS}"
            )));
        }
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AuthError::Incomplete("Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.".into()))?;
        let t = crate::clock::parse_amz_date(amz_date).ok_or_else(|| {
            AuthError::Incomplete(format!(
                "Date must be in ISO-8601 'basic format'. Got '{amz_date}'."
            ))
        })?;
        let (secret, principal) = self
            .keys
            .get(a.access_key)
            .ok_or(AuthError::UnknownAccessKey)?;
        if a.scope_service != "kms"
            || a.scope_region != self.region
            || !amz_date.starts_with(a.scope_date)
        {
            return Err(AuthError::Scope);
        }
        if (now - t).abs() > MAX_SKEW_SECS {
            let basic = |s: i64| crate::clock::iso8601(s).replace(['-', ':'], "");
            return Err(if t < now {
                AuthError::Expired(amz_date.to_owned(), basic(now - MAX_SKEW_SECS), basic(now))
            } else {
                AuthError::Incomplete(format!(
                    "Signature not yet current: {amz_date} is still later than {} ({} + 5 min.)",
                    basic(now + MAX_SKEW_SECS),
                    basic(now)
                ))
            });
        }
        let expected = self.expected_signature(parts, body, &a, secret, t)?;
        if !bool::from(
            expected
                .as_bytes()
                .ct_eq(a.signature.to_ascii_lowercase().as_bytes()),
        ) {
            return Err(AuthError::BadSignature);
        }
        let caller = Caller::direct(principal.clone(), a.access_key);
        let Some(token) = headers.get(FORWARD_ACCESS) else {
            return Ok(caller);
        };
        let host = headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let exp = forward::Expectations {
            region: &self.region,
            account: &self.account,
            host,
            presenter: principal,
            now,
            max_skew: MAX_SKEW_SECS,
        };
        let verified = token
            .to_str()
            .map_err(|_| ForwardError::Malformed("not ASCII".into()))
            .and_then(|t| {
                forward::verify_token(t, &exp, |ak| {
                    self.keys.get(ak).map(|(s, p)| (s.as_str(), p))
                })
            });
        match verified {
            Ok(f) => Ok(Caller {
                forwarded: Some(f),
                ..caller
            }),
            Err(reason) => Err(AuthError::ForwardAccess {
                signer: Box::new(caller),
                reason,
            }),
        }
    }

    fn expected_signature(
        &self,
        parts: &http::request::Parts,
        body: &[u8],
        a: &AuthHeader<'_>,
        secret: &str,
        t: i64,
    ) -> Result<String, AuthError> {
        let mut owned: Vec<(&str, String)> = Vec::with_capacity(a.signed_headers.len());
        for name in &a.signed_headers {
            let values: Vec<&str> = parts
                .headers
                .get_all(*name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            if values.is_empty() {
                return Err(AuthError::BadSignature);
            }
            owned.push((name, values.join(",")));
        }
        let host = owned
            .iter()
            .find(|(n, _)| *n == "host")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri = format!("http://{host}{path}");
        let signable = SignableRequest::new(
            parts.method.as_str(),
            uri,
            owned.iter().map(|(n, v)| (*n, v.as_str())),
            SignableBody::Bytes(body),
        )
        .map_err(|_| AuthError::BadSignature)?;
        let identity: Identity =
            Credentials::new(a.access_key, secret, None, None, "kms-daemon").into();
        let mut settings = SigningSettings::default();
        settings.excluded_headers = Some(Vec::new());
        let time = UNIX_EPOCH
            + Duration::from_secs(u64::try_from(t).map_err(|_| AuthError::BadSignature)?);
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("kms")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|_| AuthError::BadSignature)?
            .into();
        let out = sign(signable, &params).map_err(|_| AuthError::BadSignature)?;
        Ok(out.signature().to_owned())
    }
}

/// The access key id named in an Authorization header, if any (for audit records).
pub fn presented_access_key(headers: &http::HeaderMap) -> Option<String> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let cred = v.split("Credential=").nth(1)?;
    let ak = cred.split('/').next()?;
    (ak.len() <= 128 && ak.bytes().all(|c| c.is_ascii_alphanumeric())).then(|| ak.to_owned())
}
