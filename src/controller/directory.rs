//! Directories, users and bundles: what a WorkSpace is launched for and from.

use std::path::Path;

use super::error::{ApiErrorCode, ControllerError, api};
use super::ids;
use super::registry::{Bundle, User};
use super::workspaces::Controller;

impl Controller {
    /// `register-directory`.
    ///
    /// # Errors
    /// Bad id or database failure.
    pub fn register_directory(&self, id: &str) -> Result<bool, ControllerError> {
        if !ids::is_directory_id(id) {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("{id:?} is not a directory id (d- followed by 10 hex digits)"),
            ));
        }
        Ok(self.reg.add_directory(id)?)
    }

    /// `create-user`: assigns a stable SID (or takes `sid`).
    ///
    /// # Errors
    /// Unknown directory, bad name or SID.
    pub fn create_user(
        &self,
        directory_id: &str,
        user_name: &str,
        sid: Option<&str>,
    ) -> Result<User, ControllerError> {
        if !self.reg.has_directory(directory_id)? {
            return Err(api(
                ApiErrorCode::ResourceNotFound,
                format!(
                    "directory {directory_id} is not registered (sealvol register-directory --directory-id {directory_id})"
                ),
            ));
        }
        if !ids::is_user_name(user_name) {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("{user_name:?} is not a valid user name"),
            ));
        }
        if let Some(existing) = self.reg.user(directory_id, user_name)? {
            return Ok(existing);
        }
        let sid = match sid {
            Some(s) if ids::is_sid(s) => s.to_string(),
            Some(s) => {
                return Err(api(
                    ApiErrorCode::InvalidParameterValues,
                    format!("{s:?} is not a SID of the form S-1-5-21-a-b-c-RID"),
                ));
            }
            None => ids::user_sid(directory_id, user_name),
        };
        Ok(self.reg.add_user(&User {
            directory_id: directory_id.into(),
            user_name: user_name.into(),
            sid,
        })?)
    }

    /// `create-bundle`: an ext4 root image made with `mkfs.ext4 -d DIR`.
    ///
    /// # Errors
    /// Bad id, missing directory, mkfs failure.
    pub fn create_bundle(
        &self,
        bundle_id: &str,
        from_dir: &Path,
        size_gib: u64,
    ) -> Result<Bundle, ControllerError> {
        if !ids::is_bundle_id(bundle_id) {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("{bundle_id:?} is not a bundle id (wsb- followed by letters and digits)"),
            ));
        }
        if !from_dir.is_dir() {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                format!("{} is not a directory", from_dir.display()),
            ));
        }
        if size_gib == 0 || size_gib > 2000 {
            return Err(api(
                ApiErrorCode::InvalidParameterValues,
                "--size-gib must be between 1 and 2000",
            ));
        }
        let image = self
            .cfg
            .state_dir
            .join("bundles")
            .join(format!("{bundle_id}.img"));
        let tmp =
            crate::private_file::PrivateTemp::beside(&image).map_err(ControllerError::from)?;
        crate::host::run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-d",
                &from_dir.display().to_string(),
                "-L",
                "root",
                &tmp.path().display().to_string(),
                &format!("{size_gib}G"),
            ],
        )
        .map_err(ControllerError::from)?;
        tmp.persist(&image).map_err(ControllerError::from)?;
        let b = Bundle {
            bundle_id: bundle_id.into(),
            image_path: image,
            size_gib,
        };
        self.reg.put_bundle(&b)?;
        Ok(b)
    }
}
