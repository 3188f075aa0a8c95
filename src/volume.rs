//! Volumes: create and open a volume file, turning header + data key into a [`Device`].
//!
//! Two forms (DESIGN §4):
//! - **encrypted**: a LUKS2 container (header, keyslots area, data at 16 MiB) whose data
//!   area is `aes-xts-plain64`;
//! - **plain** (unencrypted WorkSpaces volumes and the benchmark baseline): the bare data
//!   area, no header, sector 0 at byte 0 — the same layout a loop device would see. It is
//!   served by the same device code path with [`Crypt::Plain`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::backing::{Backing, BackingError, FileBacking};
use crate::device::{Crypt, Device, Geometry};
use crate::luks2::{self, FormatParams, Header, KmsToken, Luks2Error};
use crate::secret::VolumeKey;
use crate::xts::{SectorCipher, SectorSize, XtsError};

/// Bytes in a GiB.
pub const GIB: u64 = 1024 * 1024 * 1024;

/// Errors from creating or opening volumes.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The target exists and `--force` was not given.
    #[error("{0} already exists; refusing to overwrite it (pass --force to replace it)")]
    Exists(PathBuf),
    /// The volume file does not exist.
    #[error("{0} does not exist")]
    Missing(PathBuf),
    /// A size that is zero or not a multiple of the sector size.
    #[error(
        "invalid volume size {size} bytes: must be a positive multiple of the {sector_size}-byte sector size"
    )]
    BadSize {
        /// Requested size.
        size: u64,
        /// Sector size.
        sector_size: usize,
    },
    /// The key does not match the volume's digest.
    #[error(
        "the volume key does not match {path} (LUKS2 digest mismatch): wrong key file, or the volume belongs to another key"
    )]
    WrongKey {
        /// Volume path.
        path: PathBuf,
    },
    /// An encrypted volume was opened as plain, or the other way round.
    #[error(
        "{path} is a LUKS2 volume; it needs its volume key (or its KMS token), not --unencrypted"
    )]
    IsEncrypted {
        /// Volume path.
        path: PathBuf,
    },
    /// Not a LUKS2 file.
    #[error(
        "{path} is not a LUKS2 volume ({reason}); if it is an unencrypted sealvol volume, pass --unencrypted"
    )]
    NotEncrypted {
        /// Volume path.
        path: PathBuf,
        /// What the header parser said.
        reason: String,
    },
    /// Header problem.
    #[error("{path}: {source}")]
    Header {
        /// Volume path.
        path: PathBuf,
        /// The parser's error.
        source: Luks2Error,
    },
    /// Storage problem.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// Cipher parameters refused.
    #[error(transparent)]
    Cipher(#[from] XtsError),
    /// A rekey of the volume is in progress (interrupted) and only one key was given.
    #[error(
        "a rekey of {path} is in progress (it was interrupted); resume it with `sealvol rekey-volume --path {path} --volume-key-file OLD --new-volume-key-file NEW`, or attach with both `--volume-key-file OLD --new-volume-key-file NEW` to resume it online"
    )]
    RekeyInProgress {
        /// Volume path.
        path: PathBuf,
    },
}

/// What to create.
#[derive(Debug)]
pub struct CreateParams<'a> {
    /// The volume file.
    pub path: &'a Path,
    /// Data size in bytes.
    pub size: u64,
    /// Sector size.
    pub sector_size: SectorSize,
    /// Replace an existing file.
    pub force: bool,
    /// `Some` for an encrypted volume, `None` for the plain form.
    pub encryption: Option<Encryption<'a>>,
}

/// Key and metadata of a new encrypted volume.
#[derive(Debug)]
pub struct Encryption<'a> {
    /// The data key.
    pub key: &'a VolumeKey,
    /// The KMS token (wrapped key + context), if the key came from a KMS.
    pub token: Option<KmsToken>,
    /// Header label.
    pub label: String,
}

/// Creates a volume file (sparse). Never overwrites without `force`.
///
/// # Errors
/// Existing file, bad size, I/O failure.
pub fn create(p: &CreateParams<'_>) -> Result<(), VolumeError> {
    let ss = p.sector_size.bytes_u64();
    if p.size == 0 || !p.size.is_multiple_of(ss) {
        return Err(VolumeError::BadSize {
            size: p.size,
            sector_size: p.sector_size.bytes(),
        });
    }
    if p.path.exists() && !p.force {
        return Err(VolumeError::Exists(p.path.to_path_buf()));
    }
    let backing = FileBacking::create(p.path, p.force)?;
    match &p.encryption {
        None => backing.set_size(p.size)?,
        Some(enc) => {
            let params = FormatParams {
                data_size: p.size,
                // `SectorSize` is 512 or 4096.
                sector_size: u32::try_from(p.sector_size.bytes()).expect("512 or 4096"),
                label: enc.label.clone(),
                token: enc.token.clone(),
            };
            Header::format(&backing, enc.key, &params).map_err(|source| VolumeError::Header {
                path: p.path.to_path_buf(),
                source,
            })?;
        }
    }
    backing.flush()?;
    Ok(())
}

/// An open volume: its device and (for encrypted volumes) header.
#[derive(Debug)]
pub struct OpenVolume {
    /// The plaintext device.
    pub device: Arc<Device>,
    /// The LUKS2 header (`None` for plain volumes).
    pub header: Option<Header>,
    /// The file.
    pub path: PathBuf,
}

impl OpenVolume {
    /// Serves the volume file in `mode` from now on: `none` adds an `O_DIRECT`
    /// descriptor (see [`crate::backing::CacheMode`]).
    ///
    /// # Errors
    /// The host filesystem refuses `O_DIRECT`.
    pub fn set_cache(&self, mode: crate::backing::CacheMode) -> Result<(), VolumeError> {
        Ok(self.device.backing().set_cache(mode)?)
    }
}

fn open_backing(path: &Path) -> Result<FileBacking, VolumeError> {
    if !path.exists() {
        return Err(VolumeError::Missing(path.to_path_buf()));
    }
    Ok(FileBacking::open(path)?)
}

/// Reads a volume's header (no key needed).
///
/// # Errors
/// Missing file, not LUKS2, damaged header.
pub fn read_header(path: &Path) -> Result<Header, VolumeError> {
    let backing = open_backing(path)?;
    read_header_from(&backing, path)
}

fn read_header_from(backing: &dyn Backing, path: &Path) -> Result<Header, VolumeError> {
    Header::read(backing).map_err(|source| match source {
        Luks2Error::NotLuks => VolumeError::NotEncrypted {
            path: path.to_path_buf(),
            reason: source.to_string(),
        },
        source => VolumeError::Header {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Opens an encrypted volume with its data key; the key is checked against the header's
/// digest before any sector is touched.
///
/// # Errors
/// Missing file, damaged header, unsupported parameters, wrong key.
pub fn open_encrypted(path: &Path, key: &VolumeKey) -> Result<OpenVolume, VolumeError> {
    let backing = open_backing(path)?;
    let header = read_header_from(&backing, path)?;
    if header.rekey_in_progress() {
        return Err(VolumeError::RekeyInProgress {
            path: path.to_path_buf(),
        });
    }
    header.verify_key(key).map_err(|e| match e {
        Luks2Error::DigestMismatch => VolumeError::WrongKey {
            path: path.to_path_buf(),
        },
        source => VolumeError::Header {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let sector_size = SectorSize::try_from(header.sector_size())?;
    device_for(
        Arc::new(backing),
        header,
        path,
        Crypt::Xts(SectorCipher::new(key, sector_size)),
    )
}

/// Builds the open volume for a validated header over `backing` with the given transform
/// (the caller checked the key(s)).
///
/// # Errors
/// Unsupported sector size, backing failure.
pub fn device_for(
    backing: Arc<dyn Backing>,
    header: Header,
    path: &Path,
    crypt: Crypt,
) -> Result<OpenVolume, VolumeError> {
    let sector_size = SectorSize::try_from(header.sector_size())?;
    let size = header.data_size(backing.size()?);
    let geo = Geometry {
        data_offset: header.data_offset(),
        size,
        sector_size,
    };
    let device = Device::new(backing, geo, crypt);
    Ok(OpenVolume {
        device: Arc::new(device),
        header: Some(header),
        path: path.to_path_buf(),
    })
}

/// Opens a plain (unencrypted) volume. Refuses a LUKS2 file so that ciphertext is never
/// served as if it were plaintext.
///
/// # Errors
/// Missing file, the file is LUKS2, bad size.
pub fn open_plain(path: &Path) -> Result<OpenVolume, VolumeError> {
    let backing = open_backing(path)?;
    if luks2::is_luks(&backing) {
        return Err(VolumeError::IsEncrypted {
            path: path.to_path_buf(),
        });
    }
    let size = backing.size()?;
    let sector_size = SectorSize::S4096;
    if size == 0 || size % sector_size.bytes_u64() != 0 {
        return Err(VolumeError::BadSize {
            size,
            sector_size: sector_size.bytes(),
        });
    }
    let geo = Geometry {
        data_offset: 0,
        size,
        sector_size,
    };
    let device = Device::new(Arc::new(backing), geo, Crypt::Plain);
    Ok(OpenVolume {
        device: Arc::new(device),
        header: None,
        path: path.to_path_buf(),
    })
}

/// Public facts about a volume file (no secrets), for `describe-volume`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct VolumeInfo {
    /// The file.
    pub path: String,
    /// Whether the data area is encrypted.
    pub encrypted: bool,
    /// `LUKS2` or `plain`.
    pub format: String,
    /// Cipher, e.g. `aes-xts-plain64`.
    pub cipher: Option<String>,
    /// Key size in bits.
    pub key_bits: Option<u32>,
    /// Sector size in bytes.
    pub sector_size: u32,
    /// Data size in bytes.
    pub size_bytes: u64,
    /// Data offset in bytes.
    pub data_offset: u64,
    /// Header UUID.
    pub uuid: Option<String>,
    /// Header label.
    pub label: Option<String>,
    /// Header sequence id.
    pub seqid: Option<u64>,
    /// Which header copy was read (`primary`/`secondary`).
    pub header_copy: Option<String>,
    /// The KMS token, if any (the wrapped key is ciphertext, not a secret).
    pub kms_token: Option<KmsToken>,
    /// Bytes the file occupies on disk (holes excluded).
    pub allocated_bytes: u64,
    /// Progress of an unfinished rekey (`None` when none is in progress).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rekey_in_progress: Option<luks2::Progress>,
}

/// Describes a volume file.
///
/// # Errors
/// Missing file or damaged header.
pub fn describe(path: &Path) -> Result<VolumeInfo, VolumeError> {
    use std::os::unix::fs::MetadataExt;
    let backing = open_backing(path)?;
    let allocated_bytes = std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0);
    let file_size = backing.size()?;
    if !luks2::is_luks(&backing) {
        return Ok(VolumeInfo {
            path: path.display().to_string(),
            encrypted: false,
            format: "plain".into(),
            cipher: None,
            key_bits: None,
            sector_size: 4096,
            size_bytes: file_size,
            data_offset: 0,
            uuid: None,
            label: None,
            seqid: None,
            header_copy: None,
            kms_token: None,
            allocated_bytes,
            rekey_in_progress: None,
        });
    }
    let h = read_header_from(&backing, path)?;
    Ok(VolumeInfo {
        path: path.display().to_string(),
        encrypted: true,
        format: "LUKS2".into(),
        cipher: Some(h.cipher().to_string()),
        key_bits: Some(512),
        sector_size: h.sector_size(),
        size_bytes: h.data_size(file_size),
        data_offset: h.data_offset(),
        uuid: Some(h.uuid().to_string()),
        label: Some(h.label().to_string()),
        seqid: Some(h.seqid()),
        header_copy: Some(format!("{:?}", h.which_copy_used()).to_lowercase()),
        kms_token: h.kms_token().cloned(),
        allocated_bytes,
        rekey_in_progress: h
            .rekey_state()
            .ok()
            .flatten()
            .map(|st| st.progress(h.data_size(file_size))),
    })
}
