//! Key rotation: Enable/DisableKeyRotation, GetKeyRotationStatus, RotateKeyOnDemand,
//! ListKeyRotations.

use serde_json::Value;

use super::DAY;
use super::checks::*;
use super::responses::{Empty, KeyIdResponse, RotationListEntry, RotationStatusResponse, to_value};
use super::{Kms, Touched, simple_ask};
use crate::error::OpError;
use crate::keys::{KeyRecord, KeySpec};
use crate::principal::Caller;
use crate::wire::*;

impl Kms {
    fn rotation_target(
        &self,
        caller: &Caller,
        key_id: &str,
        op: &str,
        touched: &mut Touched,
    ) -> Result<KeyRecord, OpError> {
        let key = self.authorized_key(caller, key_id, &simple_ask(op), touched)?;
        if key.spec != KeySpec::SymmetricDefault {
            return Err(OpError::UnsupportedOperation(format!(
                "{} is not a symmetric encryption key; rotation is not supported",
                key.arn
            )));
        }
        Ok(key)
    }

    pub(super) fn enable_rotation(
        &self,
        caller: &Caller,
        r: EnableKeyRotationRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "EnableKeyRotation", touched)?;
        require_customer_managed(&key, caller, "EnableKeyRotation")?;
        let days = r.rotation_period_in_days.unwrap_or(365);
        if !(90..=2560).contains(&days) {
            return Err(OpError::Validation(
                "RotationPeriodInDays must be between 90 and 2560".into(),
            ));
        }
        require_enabled(&key)?;
        key.rotation_period_days = Some(days);
        key.next_rotation = Some(self.clock.now() + days * DAY);
        self.store.update_key(&key)?;
        to_value(Empty {})
    }

    pub(super) fn disable_rotation(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "DisableKeyRotation", touched)?;
        require_customer_managed(&key, caller, "DisableKeyRotation")?;
        require_enabled(&key)?;
        key.rotation_period_days = None;
        key.next_rotation = None;
        self.store.update_key(&key)?;
        to_value(Empty {})
    }

    pub(super) fn rotation_status(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key = self.rotation_target(caller, &r.key_id, "GetKeyRotationStatus", touched)?;
        require_not_pending(&key)?;
        let scheduled = key.rotation_period_days.zip(key.next_rotation);
        to_value(RotationStatusResponse {
            key_id: &key.arn,
            key_rotation_enabled: key.rotation_period_days.is_some(),
            rotation_period_in_days: scheduled.map(|(p, _)| p),
            next_rotation_date: scheduled.map(|(_, n)| n),
            on_demand_rotation_start_date: key.on_demand_rotation,
        })
    }

    pub(super) fn rotate_on_demand(
        &self,
        caller: &Caller,
        r: KeyIdRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let mut key = self.rotation_target(caller, &r.key_id, "RotateKeyOnDemand", touched)?;
        require_customer_managed(&key, caller, "RotateKeyOnDemand")?;
        require_enabled(&key)?;
        let version = key.current_version + 1;
        let m = self.new_material(&key.id, version);
        key.current_version = version;
        key.on_demand_rotation = Some(self.clock.now());
        self.store.rotate(&key, &m)?;
        to_value(KeyIdResponse { key_id: &key.arn })
    }

    pub(super) fn list_rotations(
        &self,
        caller: &Caller,
        r: PageRequest,
        touched: &mut Touched,
    ) -> Result<Value, OpError> {
        let key_id = r.required_key_id()?;
        let key = self.rotation_target(caller, &key_id, "ListKeyRotations", touched)?;
        let items: Vec<RotationListEntry<'_>> = self
            .store
            .materials(&key.id)?
            .into_iter()
            .filter(|m| m.version > 1)
            .map(|m| {
                let kind = if key.on_demand_rotation == Some(m.created) {
                    "ON_DEMAND"
                } else {
                    "AUTOMATIC"
                };
                RotationListEntry {
                    key_id: &key.arn,
                    rotation_date: m.created,
                    rotation_type: kind,
                }
            })
            .collect();
        let (items, next) = page(items, r.limit, r.marker.as_deref())?;
        paged("Rotations", items, next)
    }
}
