//! Principals: who signed a request and on whose behalf it acts.

use std::fmt;

/// An authenticated identity, or the user a service acts for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// The account root (`arn:aws:iam::<account>:root`).
    Root {
        /// 12-digit account id.
        account: String,
    },
    /// An IAM user or role ARN in some account.
    Iam {
        /// The full ARN.
        arn: String,
        /// 12-digit account id taken from the ARN.
        account: String,
    },
    /// An AWS service principal such as `ebs.amazonaws.com`.
    Service(String),
}

impl Principal {
    /// Parses an IAM ARN (`arn:aws:iam::<acct>:root|user/..|role/..`), a bare account
    /// id, or a service principal (`*.amazonaws.com`).
    pub fn parse(s: &str) -> Option<Self> {
        if is_service_principal(s) {
            return Some(Self::Service(s.to_owned()));
        }
        if s.len() == 12 && s.bytes().all(|c| c.is_ascii_digit()) {
            return Some(Self::Root {
                account: s.to_owned(),
            });
        }
        let rest = s
            .strip_prefix("arn:aws:iam::")
            .or_else(|| s.strip_prefix("arn:aws:sts::"))?;
        let (account, resource) = rest.split_once(':')?;
        if account.len() != 12
            || !account.bytes().all(|c| c.is_ascii_digit())
            || resource.is_empty()
        {
            return None;
        }
        if resource == "root" {
            return Some(Self::Root {
                account: account.to_owned(),
            });
        }
        let kind = resource.split('/').next().unwrap_or("");
        if !matches!(kind, "user" | "role" | "assumed-role" | "federated-user")
            || !resource.contains('/')
        {
            return None;
        }
        Some(Self::Iam {
            arn: s.to_owned(),
            account: account.to_owned(),
        })
    }

    /// The ARN (or service name) that identifies this principal in policies and grants.
    pub fn arn(&self) -> String {
        match self {
            Self::Root { account } => format!("arn:aws:iam::{account}:root"),
            Self::Iam { arn, .. } => arn.clone(),
            Self::Service(s) => s.clone(),
        }
    }

    /// The account, for IAM principals; `None` for service principals.
    pub fn account(&self) -> Option<&str> {
        match self {
            Self::Root { account } | Self::Iam { account, .. } => Some(account),
            Self::Service(_) => None,
        }
    }

    /// Whether this is an AWS service principal.
    pub fn is_service(&self) -> bool {
        matches!(self, Self::Service(_))
    }

    /// CloudTrail `userIdentity.type`.
    pub fn identity_type(&self) -> &'static str {
        match self {
            Self::Root { .. } => "Root",
            Self::Iam { arn, .. } if arn.contains(":assumed-role/") => "AssumedRole",
            Self::Iam { .. } => "IAMUser",
            Self::Service(_) => "AWSService",
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.arn())
    }
}

/// Whether `s` looks like a service principal name.
pub fn is_service_principal(s: &str) -> bool {
    s.ends_with(".amazonaws.com")
        && !s.contains(':')
        && !s.contains('/')
        && s.len() > ".amazonaws.com".len()
}

/// A user's permissions forwarded to a service: proven by a presigned token that the
/// user signed with their own secret (DESIGN §2, forward access sessions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The user who signed the token.
    pub user: Principal,
    /// The access key id the user signed the token with.
    pub access_key_id: String,
    /// Epoch seconds after which the token is refused.
    pub expires_at: i64,
}

/// The identity a request was signed with, plus the user a service acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Who signed the request.
    pub signer: Principal,
    /// Access key id used.
    pub access_key_id: String,
    /// The user whose forward-access token the signer presented; only ever set for
    /// `workspaces.amazonaws.com` and only after the token's signature was verified.
    pub forwarded: Option<Forwarded>,
}

impl Caller {
    /// A caller acting for itself.
    pub fn direct(signer: Principal, access_key_id: impl Into<String>) -> Self {
        Self {
            signer,
            access_key_id: access_key_id.into(),
            forwarded: None,
        }
    }

    /// The principal whose permissions are evaluated: the user for forwarded
    /// requests, else the signer.
    pub fn effective(&self) -> &Principal {
        self.forwarded.as_ref().map_or(&self.signer, |f| &f.user)
    }

    /// The access key id of the effective principal (the user's, for forwarded calls).
    pub fn effective_access_key_id(&self) -> &str {
        self.forwarded
            .as_ref()
            .map_or(&self.access_key_id, |f| &f.access_key_id)
    }

    /// The service the request came through: the forwarding service, or the signer
    /// itself when a service calls for its own account.
    pub fn invoked_by(&self) -> Option<&str> {
        match &self.signer {
            Principal::Service(s) => Some(s),
            _ => None,
        }
    }

    /// The service the request came through, if a service acts for a user.
    pub fn via_service(&self) -> Option<&str> {
        match (&self.signer, &self.forwarded) {
            (Principal::Service(s), Some(_)) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_principal_forms() {
        assert_eq!(
            Principal::parse("arn:aws:iam::111122223333:root"),
            Some(Principal::Root {
                account: "111122223333".into()
            })
        );
        assert_eq!(
            Principal::parse("111122223333"),
            Some(Principal::Root {
                account: "111122223333".into()
            })
        );
        assert!(matches!(
            Principal::parse("arn:aws:iam::111122223333:user/Alice"),
            Some(Principal::Iam { .. })
        ));
        assert_eq!(
            Principal::parse("ebs.amazonaws.com"),
            Some(Principal::Service("ebs.amazonaws.com".into()))
        );
        assert_eq!(Principal::parse("arn:aws:iam::1111:user/x"), None);
        assert_eq!(Principal::parse("nonsense"), None);
        assert_eq!(Principal::parse("arn:aws:iam::111122223333:group/x"), None);
    }
}
