//! Key policies: GetKeyPolicy, PutKeyPolicy, ListKeyPolicies.

use serde_json::Value;

use super::checks::*;
use super::responses::{Empty, KeyPolicyNamesResponse, KeyPolicyResponse, to_value};
use super::{Kms, Touched, simple_ask};
use crate::error::OpError;
use crate::policy::PolicyDocument;
use crate::principal::Caller;
use crate::wire::*;

impl Kms {
    fn policy_name(name: Option<&str>) -> Result<(), OpError> {
        match name {
            None | Some("default") => Ok(()),
            Some(other) => Err(OpError::NotFound(format!("No such policy exists: {other}"))),
        }
    }

    pub(super) fn get_key_policy(
        &self,
        caller: &Caller,
        r: GetKeyPolicyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.authorized_key(caller, &r.key_id, &simple_ask("GetKeyPolicy"), touched)?;
        Self::policy_name(r.policy_name.as_deref())?;
        to_value(KeyPolicyResponse {
            policy: &key.policy,
            policy_name: "default",
        })
    }

    pub(super) fn list_key_policies(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_id = r.required_key_id()?;
        self.authorized_key(caller, &key_id, &simple_ask("ListKeyPolicies"), touched)?;
        to_value(KeyPolicyNamesResponse {
            policy_names: ["default"],
            truncated: false,
        })
    }

    pub(super) fn put_key_policy(
        &self,
        caller: &Caller,
        r: PutKeyPolicyRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key =
            self.authorized_key(caller, &r.key_id, &simple_ask("PutKeyPolicy"), touched)?;
        require_customer_managed(&key, caller, "PutKeyPolicy")?;
        Self::policy_name(r.policy_name.as_deref())?;
        if r.policy.len() > 32_768 {
            return Err(OpError::LimitExceeded(
                "The key policy is larger than 32 KB".into(),
            ));
        }
        PolicyDocument::parse(&r.policy)?.require_principals()?;
        require_not_pending(&key)?;
        key.policy = r.policy;
        self.store.update_key(&key)?;
        to_value(Empty {})
    }
}
