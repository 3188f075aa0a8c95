//! [`KmsTarget`]: the region and endpoint the command line names (`--region`,
//! `--endpoint-url`), and how they win over the environment and the profile.

use super::KmsError;

/// Where a process's KMS requests go when its command line says so: `--region` and
/// `--endpoint-url`. A set field wins over the environment (`AWS_REGION`,
/// `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL_KMS`, `AWS_ENDPOINT_URL`) and over the profile
/// (`region`, `endpoint_url`), as in the AWS CLI; an unset field leaves those sources to
/// decide. The default target overrides nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KmsTarget {
    /// The region to sign for (`--region`).
    pub region: Option<String>,
    /// The KMS endpoint, e.g. `http://127.0.0.1:4599` (`--endpoint-url`).
    pub endpoint_url: Option<String>,
}

impl KmsTarget {
    /// Loads the SDK configuration of `profile` with this target's overrides applied.
    pub(super) fn load(
        &self,
        rt: &tokio::runtime::Runtime,
        profile: &str,
    ) -> aws_config::SdkConfig {
        let mut loader =
            aws_config::defaults(aws_config::BehaviorVersion::latest()).profile_name(profile);
        if let Some(r) = &self.region {
            loader = loader.region(aws_config::Region::new(r.clone()));
        }
        rt.block_on(loader.load())
    }

    /// The KMS endpoint URL requests of `sdk` go to: `--endpoint-url`, else
    /// `AWS_ENDPOINT_URL_KMS`, else the profile's or environment's `endpoint_url`, else AWS
    /// KMS in the region. Checked to be an absolute http(s) URL naming a host.
    pub(super) fn endpoint(&self, sdk: &aws_config::SdkConfig) -> Result<String, KmsError> {
        let url = self
            .endpoint_url
            .clone()
            .or_else(|| std::env::var("AWS_ENDPOINT_URL_KMS").ok())
            .or_else(|| sdk.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| {
                let region = sdk.region().map_or("us-east-1", |r| r.as_ref());
                format!("https://kms.{region}.amazonaws.com")
            });
        parse_endpoint_url(&url)
    }
}

/// `url` if it is an absolute http(s) URL naming a host, as `--endpoint-url` (and the
/// environment's and profile's endpoint) must be; otherwise an error naming it.
///
/// # Errors
/// [`KmsError::Setup`] naming the URL and what is wrong with it.
pub fn parse_endpoint_url(url: &str) -> Result<String, KmsError> {
    let bad = |why: &str| {
        KmsError::Setup(format!(
            "endpoint URL {url:?} {why}; give an absolute URL such as http://127.0.0.1:4599 (--endpoint-url, AWS_ENDPOINT_URL_KMS or the profile's endpoint_url)"
        ))
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad("does not start with http:// or https://"));
    }
    if uri.authority().is_none() {
        return Err(bad("names no host"));
    }
    Ok(url.to_owned())
}

/// The host (and port) of an endpoint URL that [`KmsTarget::endpoint`] accepted.
pub(super) fn host_of(url: &str) -> Result<String, KmsError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| KmsError::Setup(format!("endpoint URL {url:?}: {e}")))?;
    uri.authority()
        .map(|a| a.as_str().to_owned())
        .ok_or_else(|| KmsError::Setup(format!("endpoint URL {url:?} names no host")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdk_with_endpoint(url: &str) -> aws_config::SdkConfig {
        aws_config::SdkConfig::builder().endpoint_url(url).build()
    }

    #[test]
    fn the_flag_wins_over_the_profile_endpoint() {
        let target = KmsTarget {
            region: None,
            endpoint_url: Some("http://127.0.0.1:4599".into()),
        };
        let sdk = sdk_with_endpoint("http://profile.example:1");
        assert_eq!(
            target.endpoint(&sdk).expect("usable"),
            "http://127.0.0.1:4599"
        );
        assert_eq!(
            host_of(&target.endpoint(&sdk).expect("usable")).expect("host"),
            "127.0.0.1:4599"
        );
    }

    #[test]
    fn an_unusable_endpoint_url_is_refused_naming_it() {
        let sdk = sdk_with_endpoint("http://profile.example:1");
        for bad in ["ftp://h:1", "127.0.0.1:4599", "not a url", "/path/only"] {
            let target = KmsTarget {
                region: None,
                endpoint_url: Some(bad.into()),
            };
            let e = target.endpoint(&sdk).expect_err(bad).to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
            assert!(e.contains("--endpoint-url"), "{e}");
        }
    }

    #[test]
    fn the_default_target_overrides_nothing() {
        assert_eq!(
            KmsTarget::default(),
            KmsTarget {
                region: None,
                endpoint_url: None
            }
        );
    }
}
