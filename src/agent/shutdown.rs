//! The agent's orderly, bounded shutdown on SIGTERM (also SIGINT, SIGHUP): what systemd,
//! the controller's stop path and `kill` ask for.
//!
//! 1. Sync every filesystem on a loop device over a served file (`syncfs`), so whatever
//!    the programs on it wrote reaches the agent and, through its flush, the disk.
//! 2. Unmount those filesystems and detach their loops (DESIGN §5 order, later exports
//!    first), retrying while programs still use them, until the stop timeout.
//! 3. Unmount FUSE. The serve loop then flushes every device, drops it (wiping its key)
//!    and the process exits.
//!
//! When the timeout passes with something still busy, the agent forces its way out: it
//! lazily unmounts the (already synced) filesystems, detaches their loops and aborts its
//! FUSE connection (`/sys/fs/fuse/connections/N/abort`), so the programs still holding
//! files get I/O errors instead of the host waiting forever on a process that holds keys.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::host::{self, filesystems_on, force_release_loops, release_loops};

/// How long SIGTERM waits for programs to let go before forcing, unless
/// `SEALVOL_STOP_TIMEOUT` (seconds) says otherwise. Below systemd's default
/// `TimeoutStopSec` (90 s) and the controller's stop grace (30 s).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Where the kernel's FUSE control filesystem is mounted.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The stop timeout in effect ([`DEFAULT_STOP_TIMEOUT`] or `SEALVOL_STOP_TIMEOUT`).
#[must_use]
pub fn stop_timeout() -> Duration {
    std::env::var("SEALVOL_STOP_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 3600.0)
        .map_or(DEFAULT_STOP_TIMEOUT, Duration::from_secs_f64)
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was released in order.
    Orderly,
    /// The timeout passed: filesystems were lazily unmounted and FUSE aborted.
    Forced,
}

/// One agent's teardown: its FUSE mountpoint and the files served there.
#[derive(Debug, Clone)]
pub struct Teardown {
    /// The canonical FUSE mountpoint.
    pub mountpoint: PathBuf,
    /// The served file names, in export order.
    pub files: Vec<String>,
    /// How long to wait for programs to let go.
    pub timeout: Duration,
}

impl Teardown {
    /// Runs the teardown; `unmount_fuse` unmounts the FUSE session (fuser's unmounter).
    pub fn run(&self, mut unmount_fuse: impl FnMut() -> std::io::Result<()>) -> Outcome {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let paths: Vec<PathBuf> = self
            .files
            .iter()
            .rev()
            .map(|f| self.mountpoint.join(f))
            .collect();
        for p in &paths {
            sync_filesystems_on(p);
        }
        let mut outcome = Outcome::Orderly;
        let mut last_error = None;
        loop {
            let released = paths.iter().try_for_each(|p| release_loops(p));
            let r = released
                .map_err(|e| e.to_string())
                .and_then(|()| unmount_fuse().map_err(|e| e.to_string()));
            match r {
                Ok(()) => break,
                Err(e) if Instant::now() < deadline => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!("shutdown waits: {e}");
                        last_error = Some(e);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    tracing::error!(
                        "still busy after {:?} ({e}): forcing the unmount; programs still using {} get I/O errors",
                        self.timeout,
                        self.mountpoint.display()
                    );
                    outcome = Outcome::Forced;
                    for p in &paths {
                        force_release_loops(p);
                    }
                    abort_fuse(&self.mountpoint);
                    break;
                }
            }
        }
        tracing::info!(
            "shutdown of {} {:?} in {:?}",
            self.mountpoint.display(),
            outcome,
            started.elapsed()
        );
        outcome
    }
}

/// `syncfs` on every filesystem mounted on a loop device over `file`.
fn sync_filesystems_on(file: &Path) {
    for fs in filesystems_on(file).unwrap_or_default() {
        let synced = std::fs::File::open(&fs)
            .and_then(|dir| nix::unistd::syncfs(&dir).map_err(std::io::Error::from));
        if let Err(e) = synced {
            tracing::error!("syncfs {}: {e}", fs.display());
        }
    }
}

/// Aborts the FUSE connection of the mount at `mountpoint` and lazily unmounts it: the
/// kernel fails every pending and later request, and the serve loop returns.
fn abort_fuse(mountpoint: &Path) {
    let Some(entry) = host::mounts()
        .into_iter()
        .find(|m| m.target == mountpoint && m.fstype.starts_with("fuse"))
    else {
        return;
    };
    if !host::is_mountpoint(Path::new(FUSECTL)) {
        let _ = nix::mount::mount(
            Some("fusectl"),
            FUSECTL,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
    }
    match connection_id(&entry.dev) {
        Some(id) => {
            let abort = Path::new(FUSECTL).join(id.to_string()).join("abort");
            if let Err(e) = std::fs::write(&abort, b"1") {
                tracing::error!(
                    "cannot abort the FUSE connection ({}): {e}",
                    abort.display()
                );
            }
        }
        None => tracing::error!("unreadable device number {:?} of the FUSE mount", entry.dev),
    }
    if let Err(e) = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH) {
        tracing::error!("lazy unmount of {}: {e}", mountpoint.display());
    }
}

/// The kernel's number for a device `major:minor` (as mountinfo shows it), which names
/// the FUSE connection's directory.
fn connection_id(dev: &str) -> Option<u64> {
    let (major, minor) = dev.split_once(':')?;
    let (major, minor): (u64, u64) = (major.parse().ok()?, minor.parse().ok()?);
    Some((major << 20) | minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_follow_the_kernel_encoding() {
        assert_eq!(connection_id("0:52"), Some(52));
        assert_eq!(connection_id("1:3"), Some((1 << 20) | 3));
        assert_eq!(connection_id("x:3"), None);
        assert_eq!(connection_id("52"), None);
    }

    #[test]
    fn stop_timeout_reads_the_environment_and_refuses_nonsense() {
        // One test owns the variable (tests run in threads of one process).
        // SAFETY: no other test reads or writes SEALVOL_STOP_TIMEOUT.
        unsafe { std::env::set_var("SEALVOL_STOP_TIMEOUT", "2.5") };
        assert_eq!(stop_timeout(), Duration::from_millis(2500));
        // SAFETY: as above.
        unsafe { std::env::set_var("SEALVOL_STOP_TIMEOUT", "-1") };
        assert_eq!(stop_timeout(), DEFAULT_STOP_TIMEOUT);
        // SAFETY: as above.
        unsafe { std::env::set_var("SEALVOL_STOP_TIMEOUT", "soon") };
        assert_eq!(stop_timeout(), DEFAULT_STOP_TIMEOUT);
        // SAFETY: as above.
        unsafe { std::env::remove_var("SEALVOL_STOP_TIMEOUT") };
        assert_eq!(stop_timeout(), DEFAULT_STOP_TIMEOUT);
    }
}
