//! Forward access: a user's short-lived SigV4-presigned permission for the WorkSpaces
//! service to act for them ([`ForwardAccessToken`]), and the interceptor that sends it in
//! the signed header [`FORWARD_ACCESS_HEADER`] on the service's own requests.

use aws_sdk_kms::config::interceptors::BeforeTransmitInterceptorContextMut;
use aws_sdk_kms::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_kms::error::DisplayErrorContext;

use super::target::host_of;
use super::{FORWARD_ACCESS_HEADER, FORWARD_ACCESS_TTL, KmsError, KmsTarget, runtime};

/// A user's short-lived, signed permission for [`super::FORWARDING_SERVICE`] to act for them:
/// a SigV4 presigned URL (query-string signature by the user's own secret). It is a
/// bearer credential until it expires, so it is wiped on drop and never printed.
pub struct ForwardAccessToken(pub(super) zeroize::Zeroizing<String>);

impl std::fmt::Debug for ForwardAccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ForwardAccessToken { .. }")
    }
}

impl ForwardAccessToken {
    /// Signs a token with the credentials of `user_profile` (from the standard AWS
    /// sources: profile files, environment, credential process), naming `delegate`, for
    /// the KMS endpoint and region that profile talks to under `target`.
    ///
    /// # Errors
    /// [`KmsError::NoCredentials`] when the profile has none; set-up failures.
    pub fn presign(
        user_profile: &str,
        delegate: &str,
        target: &KmsTarget,
    ) -> Result<Self, KmsError> {
        use aws_credential_types::provider::ProvideCredentials;
        let rt = runtime()?;
        let sdk = target.load(&rt, user_profile);
        let no_creds = |detail: String| KmsError::NoCredentials {
            profile: user_profile.to_owned(),
            detail,
        };
        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| no_creds("no credential provider".into()))?;
        let creds = rt
            .block_on(provider.provide_credentials())
            .map_err(|e| no_creds(DisplayErrorContext(&e).to_string()))?;
        let region = sdk
            .region()
            .map(|r| r.as_ref().to_owned())
            .ok_or_else(|| {
                KmsError::Setup(format!(
                    "profile {user_profile:?} names no region; give --region, set AWS_REGION or add region to the profile"
                ))
            })?;
        let host = host_of(&target.endpoint(&sdk)?)?;
        Self::sign(
            &creds,
            &region,
            &host,
            delegate,
            std::time::SystemTime::now(),
        )
    }

    fn sign(
        creds: &aws_credential_types::Credentials,
        region: &str,
        host: &str,
        delegate: &str,
        time: std::time::SystemTime,
    ) -> Result<Self, KmsError> {
        use aws_sigv4::http_request::{
            SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
        };
        let mut nonce = [0u8; 16];
        rand::fill(&mut nonce);
        let url = format!(
            "http://{host}/?Action=ForwardAccess&X-Sealvol-Delegate={delegate}&X-Sealvol-Nonce={}",
            hex::encode(nonce)
        );
        let setup = |e: &dyn std::fmt::Display| KmsError::Setup(format!("presigning: {e}"));
        let signable = SignableRequest::new(
            "GET",
            &url,
            std::iter::once(("host", host)),
            SignableBody::Bytes(&[]),
        )
        .map_err(|e| setup(&e))?;
        let identity: aws_smithy_runtime_api::client::identity::Identity = creds.clone().into();
        let mut settings = SigningSettings::default();
        settings.signature_location = SignatureLocation::QueryParams;
        settings.expires_in = Some(FORWARD_ACCESS_TTL);
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(region)
            .name("kms")
            .time(time)
            .settings(settings)
            .build()
            .map_err(|e| setup(&e))?
            .into();
        let (instructions, _) = sign(signable, &params).map_err(|e| setup(&e))?.into_parts();
        let mut token = url;
        for (k, v) in instructions.params() {
            token.push('&');
            token.push_str(k);
            token.push('=');
            token.extend(percent_encoding::utf8_percent_encode(
                v,
                percent_encoding::NON_ALPHANUMERIC,
            ));
        }
        Ok(Self(zeroize::Zeroizing::new(token)))
    }
}

#[derive(Debug)]
pub(super) struct ForwardAccess(pub(super) zeroize::Zeroizing<String>);

impl Intercept for ForwardAccess {
    fn name(&self) -> &'static str {
        "SealvolForwardAccess"
    }

    fn modify_before_signing(
        &self,
        context: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kms::error::BoxError> {
        context
            .request_mut()
            .headers_mut()
            .insert(FORWARD_ACCESS_HEADER, self.0.as_str().to_owned());
        Ok(())
    }
}
