//! Forward access: the proof a user hands a service so it may act for them (DESIGN §2).
//!
//! The user's client presigns a SigV4 request (service `kms`, query-string signature,
//! `X-Amz-Expires` at most [`MAX_EXPIRES_SECS`]) with the user's own secret:
//!
//! ```text
//! http://HOST/?Action=ForwardAccess&X-Sealvol-Delegate=workspaces.amazonaws.com
//!     &X-Sealvol-Nonce=<hex>&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK/...
//!     &X-Amz-Date=...&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=...
//! ```
//!
//! The service sends that URL in the signed header [`FORWARD_ACCESS`] of its own signed
//! request. [`verify_token`] checks everything a forged, stolen or stale token would get
//! wrong: the signature under the named user's secret, the expiry and clock skew, the
//! delegate (only `workspaces.amazonaws.com` forwards, and only its own tokens), the
//! audience (the token's host is the host the service called), and that the user is not
//! itself a service. Nothing else names a user: there is no header that carries an ARN.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use percent_encoding::percent_decode_str;
use subtle::ConstantTimeEq;

use crate::principal::{Forwarded, Principal};

/// The signed header that carries a forward-access token.
pub const FORWARD_ACCESS: &str = "x-sealvol-forward-access";
/// The only service principal that may act for users.
pub const FORWARDING_SERVICE: &str = "workspaces.amazonaws.com";
/// Longest validity a token may ask for (AWS's presigned-URL style cap for this use).
pub const MAX_EXPIRES_SECS: i64 = 900;
/// The `Action` a token must name.
pub const ACTION: &str = "ForwardAccess";
/// Query parameter naming the delegate.
pub const DELEGATE_PARAM: &str = "X-Sealvol-Delegate";
/// Query parameter holding the nonce.
pub const NONCE_PARAM: &str = "X-Sealvol-Nonce";
/// Longest token accepted (a real one is about 500 bytes).
pub const MAX_TOKEN_LEN: usize = 2048;

/// Why a token was refused. Every variant becomes AccessDeniedException.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// The header is not a presigned URL of the expected shape.
    #[error("the forward access token is malformed: {0}")]
    Malformed(String),
    /// The signer of the outer request may not forward.
    #[error("only {FORWARDING_SERVICE} may present a forward access token; {0} may not")]
    NotForwarder(String),
    /// The token names another delegate than the one presenting it.
    #[error("the forward access token was issued to {named}, not to {presenter}")]
    WrongDelegate {
        /// Delegate named in the token.
        named: String,
        /// Who presented it.
        presenter: String,
    },
    /// The token was made for another endpoint.
    #[error("the forward access token was issued for host {0}, not this endpoint")]
    WrongAudience(String),
    /// Unknown access key.
    #[error("the forward access token is signed with an unknown access key")]
    UnknownSigner,
    /// Services cannot forward their own identity.
    #[error("a forward access token must be signed by a user, not by {0}")]
    SignerIsService(String),
    /// The signer belongs to another account.
    #[error("a forward access token must be signed by a user of account {0}")]
    ForeignAccount(String),
    /// Signature mismatch: tampered or signed by someone else.
    #[error("the forward access token's signature does not match its signer's secret")]
    BadSignature,
    /// Too old.
    #[error("the forward access token expired at {0}")]
    Expired(String),
    /// Dated in the future beyond the allowed skew.
    #[error("the forward access token is not valid yet (dated {0})")]
    NotYetValid(String),
}

impl ForwardError {
    /// Why the token was refused, as one of a fixed set of snake_case words prefixed
    /// `forward_token_` (the `reason` label of `kms_auth_failures_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "forward_token_malformed",
            Self::NotForwarder(_) => "forward_token_not_forwarder",
            Self::WrongDelegate { .. } => "forward_token_wrong_delegate",
            Self::WrongAudience(_) => "forward_token_wrong_audience",
            Self::UnknownSigner => "forward_token_unknown_signer",
            Self::SignerIsService(_) => "forward_token_signer_is_service",
            Self::ForeignAccount(_) => "forward_token_foreign_account",
            Self::BadSignature => "forward_token_signature_mismatch",
            Self::Expired(_) => "forward_token_expired",
            Self::NotYetValid(_) => "forward_token_not_yet_valid",
        }
    }
}

/// The daemon's facts a token is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// Region of the daemon (the token's credential scope must name it).
    pub region: &'a str,
    /// Account of the daemon: only its users may forward their permissions.
    pub account: &'a str,
    /// The `host` the outer request was sent to.
    pub host: &'a str,
    /// Who signed the outer request.
    pub presenter: &'a Principal,
    /// Wall-clock epoch seconds.
    pub now: i64,
    /// Allowed clock skew in seconds.
    pub max_skew: i64,
}

struct Parsed<'a> {
    host: &'a str,
    params: BTreeMap<String, String>,
}

fn parse(token: &str) -> Result<Parsed<'_>, ForwardError> {
    let bad = |m: &str| ForwardError::Malformed(m.to_owned());
    if token.len() > MAX_TOKEN_LEN {
        return Err(bad("longer than 2048 bytes"));
    }
    let rest = token
        .strip_prefix("http://")
        .or_else(|| token.strip_prefix("https://"))
        .ok_or_else(|| bad("not an http(s) URL"))?;
    let (host, query) = rest
        .split_once("/?")
        .ok_or_else(|| bad("expected http://HOST/?QUERY"))?;
    if host.is_empty() || host.contains(['/', '@', '#']) {
        return Err(bad("bad host"));
    }
    let mut params = BTreeMap::new();
    for pair in query.split('&') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| bad("query pair without '='"))?;
        let dec = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| bad("query is not UTF-8"))
        };
        if params.insert(dec(k)?, dec(v)?).is_some() {
            return Err(bad("a query parameter appears twice"));
        }
    }
    Ok(Parsed { host, params })
}

fn take(params: &mut BTreeMap<String, String>, name: &str) -> Result<String, ForwardError> {
    params
        .remove(name)
        .ok_or_else(|| ForwardError::Malformed(format!("{name} is missing")))
}

/// Verifies `token` presented by `exp.presenter`; `secret_of` looks an access key up.
///
/// # Errors
/// Any [`ForwardError`]; the caller answers AccessDeniedException.
pub fn verify_token<'k>(
    token: &str,
    exp: &Expectations<'_>,
    secret_of: impl Fn(&str) -> Option<(&'k str, &'k Principal)>,
) -> Result<Forwarded, ForwardError> {
    let presenter = exp.presenter.arn();
    if presenter != FORWARDING_SERVICE {
        return Err(ForwardError::NotForwarder(presenter));
    }
    let Parsed { host, mut params } = parse(token)?;
    let malformed = |m: &str| ForwardError::Malformed(m.to_owned());
    if take(&mut params, "Action")? != ACTION {
        return Err(malformed("Action must be ForwardAccess"));
    }
    let delegate = take(&mut params, DELEGATE_PARAM)?;
    if delegate != presenter {
        return Err(ForwardError::WrongDelegate {
            named: delegate,
            presenter,
        });
    }
    let nonce = take(&mut params, NONCE_PARAM)?;
    if !(16..=128).contains(&nonce.len()) || !nonce.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return Err(malformed("the nonce must be 16-128 letters or digits"));
    }
    if !host.eq_ignore_ascii_case(exp.host) {
        return Err(ForwardError::WrongAudience(host.to_owned()));
    }
    if take(&mut params, "X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err(malformed("X-Amz-Algorithm must be AWS4-HMAC-SHA256"));
    }
    if take(&mut params, "X-Amz-SignedHeaders")? != "host" {
        return Err(malformed("X-Amz-SignedHeaders must be host"));
    }
    let credential = take(&mut params, "X-Amz-Credential")?;
    let date = take(&mut params, "X-Amz-Date")?;
    let expires = take(&mut params, "X-Amz-Expires")?;
    let signature = take(&mut params, "X-Amz-Signature")?;
    if let Some(extra) = params.keys().next() {
        return Err(ForwardError::Malformed(format!(
            "unexpected query parameter {extra}"
        )));
    }
    let [access_key, scope_date, region, "kms", "aws4_request"] =
        credential.split('/').collect::<Vec<_>>()[..]
    else {
        return Err(malformed(
            "X-Amz-Credential must be AK/DATE/REGION/kms/aws4_request",
        ));
    };
    if region != exp.region || !date.starts_with(scope_date) || scope_date.len() != 8 {
        return Err(malformed(
            "the credential scope names another region or date",
        ));
    }
    let t = crate::clock::parse_amz_date(&date)
        .ok_or_else(|| malformed("X-Amz-Date is not an ISO-8601 basic date"))?;
    let expires: i64 = expires
        .parse()
        .ok()
        .filter(|e| (1..=MAX_EXPIRES_SECS).contains(e))
        .ok_or_else(|| malformed("X-Amz-Expires must be 1..=900 seconds"))?;
    if signature.len() != 64 || !signature.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ForwardError::BadSignature);
    }
    let (secret, user) = secret_of(access_key).ok_or(ForwardError::UnknownSigner)?;
    if user.is_service() {
        return Err(ForwardError::SignerIsService(user.arn()));
    }
    if user.account() != Some(exp.account) {
        return Err(ForwardError::ForeignAccount(exp.account.to_owned()));
    }
    let expected = presign_signature(&PresignInput {
        host,
        delegate: &delegate,
        nonce: &nonce,
        access_key,
        secret,
        region,
        time: t,
        expires,
    })
    .ok_or(ForwardError::BadSignature)?;
    if !bool::from(
        expected
            .as_bytes()
            .ct_eq(signature.to_ascii_lowercase().as_bytes()),
    ) {
        return Err(ForwardError::BadSignature);
    }
    if t - exp.now > exp.max_skew {
        return Err(ForwardError::NotYetValid(date));
    }
    if exp.now > t + expires {
        return Err(ForwardError::Expired(crate::clock::iso8601(t + expires)));
    }
    Ok(Forwarded {
        user: user.clone(),
        access_key_id: access_key.to_owned(),
        expires_at: t + expires,
    })
}

/// What a presigned forward-access URL is computed from.
#[derive(Debug, Clone, Copy)]
pub struct PresignInput<'a> {
    /// Host (and port) of the KMS endpoint.
    pub host: &'a str,
    /// The delegate the user forwards to.
    pub delegate: &'a str,
    /// A fresh random nonce.
    pub nonce: &'a str,
    /// The user's access key id.
    pub access_key: &'a str,
    /// The user's secret.
    pub secret: &'a str,
    /// Region of the credential scope.
    pub region: &'a str,
    /// Signing time, epoch seconds.
    pub time: i64,
    /// Validity in seconds.
    pub expires: i64,
}

fn unsigned_url(i: &PresignInput<'_>) -> String {
    format!(
        "http://{}/?Action={ACTION}&{DELEGATE_PARAM}={}&{NONCE_PARAM}={}",
        i.host, i.delegate, i.nonce
    )
}

fn presign_signature(i: &PresignInput<'_>) -> Option<String> {
    let url = unsigned_url(i);
    let signable = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", i.host)),
        SignableBody::Bytes(&[]),
    )
    .ok()?;
    let identity: Identity = Credentials::new(i.access_key, i.secret, None, None, "forward").into();
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(Duration::from_secs(u64::try_from(i.expires).ok()?));
    settings.excluded_headers = Some(Vec::new());
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(i.region)
        .name("kms")
        .time(UNIX_EPOCH + Duration::from_secs(u64::try_from(i.time).ok()?))
        .settings(settings)
        .build()
        .ok()?
        .into();
    let out = sign(signable, &params).ok()?;
    Some(out.signature().to_owned())
}

/// Builds a token (the daemon's tests and the load generator use it; clients build
/// theirs with their own SDK's presigner).
pub fn presign(i: &PresignInput<'_>) -> Option<String> {
    let signature = presign_signature(i)?;
    let credential = format!(
        "{}%2F{}%2F{}%2Fkms%2Faws4_request",
        i.access_key,
        &crate::clock::iso8601(i.time).replace('-', "")[..8],
        i.region
    );
    Some(format!(
        "{}&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}&X-Amz-Date={}&X-Amz-Expires={}&X-Amz-SignedHeaders=host&X-Amz-Signature={signature}",
        unsigned_url(i),
        crate::clock::iso8601(i.time).replace(['-', ':'], ""),
        i.expires
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "127.0.0.1:4599";
    const NOW: i64 = 1_790_000_000;

    fn alice() -> Principal {
        Principal::parse("arn:aws:iam::111122223333:user/Alice").expect("arn")
    }
    fn ws() -> Principal {
        Principal::Service(FORWARDING_SERVICE.into())
    }

    fn input<'a>(secret: &'a str) -> PresignInput<'a> {
        PresignInput {
            host: HOST,
            delegate: FORWARDING_SERVICE,
            nonce: "0123456789abcdef0123",
            access_key: "AKIAALICE",
            secret,
            region: "us-east-1",
            time: NOW,
            expires: 300,
        }
    }

    fn check(token: &str, presenter: &Principal, now: i64) -> Result<Forwarded, ForwardError> {
        let users = [
            ("AKIAALICE", "alice-secret", alice()),
            (
                "AKIAEBS",
                "ebs-secret",
                Principal::Service("ebs.amazonaws.com".into()),
            ),
        ];
        let exp = Expectations {
            region: "us-east-1",
            account: "111122223333",
            host: HOST,
            presenter,
            now,
            max_skew: 300,
        };
        verify_token(token, &exp, |ak| {
            users
                .iter()
                .find(|(k, _, _)| *k == ak)
                .map(|(_, s, p)| (*s, p))
        })
    }

    #[test]
    fn a_token_signed_by_the_user_verifies() {
        let t = presign(&input("alice-secret")).expect("presign");
        let f = check(&t, &ws(), NOW + 10).expect("valid");
        assert_eq!(f.user, alice());
        assert_eq!(f.expires_at, NOW + 300);
    }

    /// botocore's `SigV4QueryAuth` (an independent presigner) made this token for the same
    /// inputs: tests/py's `forward_token` uses it, so both must agree byte for byte.
    #[test]
    fn matches_botocore_presigned_url() {
        let mut i = input("alice-secret");
        i.time = 1_789_992_000; // 2026-09-21T12:00:00Z
        assert_eq!(
            presign(&i).expect("presign"),
            "http://127.0.0.1:4599/?Action=ForwardAccess&X-Sealvol-Delegate=workspaces.amazonaws.com&X-Sealvol-Nonce=0123456789abcdef0123&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAALICE%2F20260921%2Fus-east-1%2Fkms%2Faws4_request&X-Amz-Date=20260921T120000Z&X-Amz-Expires=300&X-Amz-SignedHeaders=host&X-Amz-Signature=54c7a82c11dbb44ff02e31d9ccc74f54159c98350d3227ffd70dfbb179637896"
        );
    }

    #[test]
    fn forged_stale_and_misdirected_tokens_are_refused() {
        let good = presign(&input("alice-secret")).expect("presign");
        // Signed with another secret (someone who only knows Alice's access key id).
        let forged = presign(&input("guess")).expect("presign");
        assert_eq!(check(&forged, &ws(), NOW), Err(ForwardError::BadSignature));
        // Tampered: another nonce, another expiry.
        let t = good.replace("0123456789abcdef0123", "0123456789abcdef0124");
        assert_eq!(check(&t, &ws(), NOW), Err(ForwardError::BadSignature));
        let t = good.replace("X-Amz-Expires=300", "X-Amz-Expires=900");
        assert_eq!(check(&t, &ws(), NOW + 600), Err(ForwardError::BadSignature));
        // Expired, and dated in the future.
        assert!(matches!(
            check(&good, &ws(), NOW + 301),
            Err(ForwardError::Expired(_))
        ));
        assert!(matches!(
            check(&good, &ws(), NOW - 301),
            Err(ForwardError::NotYetValid(_))
        ));
        // Presented by someone else than the delegate, or naming another delegate.
        let ebs = Principal::Service("ebs.amazonaws.com".into());
        assert!(matches!(
            check(&good, &ebs, NOW),
            Err(ForwardError::NotForwarder(_))
        ));
        assert!(matches!(
            check(&good, &alice(), NOW),
            Err(ForwardError::NotForwarder(_))
        ));
        let mut i = input("alice-secret");
        i.delegate = "ebs.amazonaws.com";
        let other = presign(&i).expect("presign");
        assert!(matches!(
            check(&other, &ws(), NOW),
            Err(ForwardError::WrongDelegate { .. })
        ));
        // Another audience.
        let mut i = input("alice-secret");
        i.host = "kms.example:443";
        let elsewhere = presign(&i).expect("presign");
        assert!(matches!(
            check(&elsewhere, &ws(), NOW),
            Err(ForwardError::WrongAudience(_))
        ));
        // A service cannot forward itself as a "user".
        let mut i = input("ebs-secret");
        i.access_key = "AKIAEBS";
        let svc = presign(&i).expect("presign");
        assert!(matches!(
            check(&svc, &ws(), NOW),
            Err(ForwardError::SignerIsService(_))
        ));
        // A bare ARN is not a token.
        assert!(matches!(
            check("arn:aws:iam::111122223333:root", &ws(), NOW),
            Err(ForwardError::Malformed(_))
        ));
        // Too long a validity is refused even when correctly signed.
        let mut i = input("alice-secret");
        i.expires = 3600;
        let long = presign(&i).expect("presign");
        assert!(matches!(
            check(&long, &ws(), NOW),
            Err(ForwardError::Malformed(_))
        ));
    }
}
