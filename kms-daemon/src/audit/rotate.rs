//! The audit file and its rotation by size: `audit.log` is renamed `audit.log.1` (older
//! ones shift to `.2`, `.3`, …; the oldest beyond the kept count is deleted) and a new
//! `audit.log` begins. The writer thread rotates only between synced batches, so a
//! record is never split across files or lost.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Rotation settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate once the current file reaches this many bytes (0: never).
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` … `audit.log.N`); at least 1.
    pub keep: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_bytes: 64 * 1024 * 1024,
            keep: 10,
        }
    }
}

/// The path of rotated file `n` (`audit.log.n`).
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Every file of the log, oldest first (rotated ones, then the current one).
pub fn all_files(path: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = (1..)
        .map(|n| rotated(path, n))
        .take_while(|p| p.exists())
        .collect();
    out.reverse();
    out.push(path.to_owned());
    out
}

/// Opens `path` for appending, creating it 0600.
pub fn open_append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .mode(0o600)
        .open(path)
}

/// Makes renames and creations in the log's directory durable.
pub fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The current file, its size, and where it rotates.
#[derive(Debug)]
pub struct LogFile {
    file: File,
    path: Option<PathBuf>,
    size: u64,
    rotation: Rotation,
}

impl LogFile {
    /// Wraps an open file at `path` (`None`: never rotated, as in tests).
    pub fn new(file: File, path: Option<PathBuf>, rotation: Rotation) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(Self {
            file,
            path,
            size,
            rotation,
        })
    }

    /// Appends one batch and syncs it; then rotates if the file is due.
    pub fn write_batch(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.file.write_all(buf)?;
        self.file.sync_data()?;
        self.size += buf.len() as u64;
        if self.rotation.max_bytes > 0 && self.size >= self.rotation.max_bytes {
            // The batch is durable already; a failed rotation only means the current
            // file keeps growing until the next attempt.
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, "audit log rotation failed; still appending");
            }
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let keep = self.rotation.keep.max(1);
        match std::fs::remove_file(rotated(&path, keep)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        for n in (1..keep).rev() {
            match std::fs::rename(rotated(&path, n), rotated(&path, n + 1)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        std::fs::rename(&path, rotated(&path, 1))?;
        // From here the open handle names audit.log.1; records written through it
        // stay in the log until the new file is open.
        let fresh = open_append(&path)?;
        sync_dir(&path)?;
        self.file = fresh;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_shifts_files_and_keeps_n() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let rotation = Rotation {
            max_bytes: 10,
            keep: 2,
        };
        let mut log = LogFile::new(
            open_append(&path).expect("open"),
            Some(path.clone()),
            rotation,
        )
        .expect("wrap");
        for i in 0..5 {
            log.write_batch(format!("record-{i:03}\n").as_bytes())
                .expect("write");
        }
        let files = all_files(&path);
        assert_eq!(files.len(), 3, "{files:?}");
        let text: Vec<String> = files
            .iter()
            .map(|f| std::fs::read_to_string(f).expect("read"))
            .collect();
        assert_eq!(text, ["record-003\n", "record-004\n", ""]);
    }
}
