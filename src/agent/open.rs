//! Opening a volume for serving: under its key, or, when its header records an
//! interrupted rekey, under both keys in rekey mode so that the agent resumes the rekey
//! once serving. Also the offline rekey, which refuses a volume an agent is serving.

use std::borrow::Borrow;
use std::path::Path;

use crate::luks2::Header;
use crate::rekey::{Progress, RekeyError, RekeyOptions, RekeyReport};
use crate::secret::VolumeKey;
use crate::volume::{self, OpenVolume, VolumeError};

/// A volume opened for serving.
#[derive(Debug)]
pub struct Opened {
    /// The opened volume.
    pub volume: OpenVolume,
    /// Its header records an interrupted rekey: resume it once the volume is served
    /// (see [`super::serve_with`]).
    pub resume_rekey: bool,
}

/// Opens the encrypted volume at `path` for serving.
///
/// `key` gives the key the volume's data is under (the old key while a rekey is
/// pending), given the header (e.g. by unwrapping its KMS token). Only when the header
/// records an interrupted rekey is `new_key` asked for the rekey's new key (e.g. from the
/// new KMS token in the rekey state); the volume then opens in rekey mode.
///
/// # Errors
/// The header is unreadable, a key callback failed, or a key is wrong.
pub fn open_for_serving<K, E>(
    path: &Path,
    key: impl FnOnce(&Header) -> Result<K, E>,
    new_key: impl FnOnce(&Header) -> Result<K, E>,
) -> Result<Opened, E>
where
    K: Borrow<VolumeKey>,
    E: From<VolumeError> + From<RekeyError>,
{
    let header = volume::read_header(path)?;
    let key = key(&header)?;
    if crate::rekey::in_progress(&header) {
        let new = new_key(&header)?;
        let volume = crate::rekey::open_resuming(path, key.borrow(), new.borrow())?;
        return Ok(Opened {
            volume,
            resume_rekey: true,
        });
    }
    Ok(Opened {
        volume: volume::open_encrypted(path, key.borrow())?,
        resume_rekey: false,
    })
}

/// Rekeys the volume file at `path` offline (no agent serving it), resuming an
/// interrupted rekey; see [`crate::rekey::rekey_detached`].
///
/// # Errors
/// [`RekeyError::Attached`] when an agent serves the file (rekey through its mountpoint
/// instead), or the rekey failed.
pub fn rekey_offline(
    path: &Path,
    old: &VolumeKey,
    new: &VolumeKey,
    opts: &RekeyOptions,
    progress: impl FnMut(Progress),
) -> Result<RekeyReport, RekeyError> {
    if let Some(mountpoint) = super::attached_at(path) {
        return Err(RekeyError::Attached(path.to_path_buf(), mountpoint));
    }
    // Every chunk is rewritten: what changed since the last snapshot is no longer known.
    let _ = std::fs::remove_file(crate::snapshot::dirty::DirtyMap::path_for(path));
    crate::rekey::rekey_detached(path, old, new, opts, progress)
}
