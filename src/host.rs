//! The host's block and mount plumbing: loop devices, the mount table and the external
//! commands (`losetup`, `mkfs.ext4`, `fsfreeze`, ...) that sealvol drives but does not
//! implement. Everything here is a thin, synchronous wrapper with an error that names the
//! command and says what to do; nothing here knows about volumes or keys.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long a detached loop device may keep its backing file (the kernel lets go of it
/// when the device's last opener closes it, e.g. udev's probe after the detach).
const LOOP_RELEASE_DEADLINE: Duration = Duration::from_secs(10);

/// Errors from host commands and mounts.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A helper command failed.
    #[error("{cmd} failed: {why}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or spawn error.
        why: String,
    },
    /// Unmounting failed.
    #[error("cannot unmount {path}: {why}")]
    Unmount {
        /// What was being unmounted.
        path: String,
        /// Why.
        why: String,
    },
}

/// Whether `path` is currently a mountpoint (per /proc/self/mountinfo).
#[must_use]
pub fn is_mountpoint(path: &Path) -> bool {
    mounts().iter().any(|m| m.target == path)
}

/// One line of /proc/self/mountinfo.
#[derive(Debug)]
pub struct MountEntry {
    /// Where it is mounted.
    pub target: PathBuf,
    /// Filesystem type (`fuse`, `ext4`, ...).
    pub fstype: String,
    /// What is mounted (a device, or the FUSE source name).
    pub source: String,
    /// The mount's device number as the kernel writes it (`major:minor`); a FUSE
    /// connection's directory under `/sys/fs/fuse/connections` is named after it.
    pub dev: String,
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The mount table of this process's namespace, in mount order.
#[must_use]
pub fn mounts() -> Vec<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut l = left.split(' ');
            let dev = l.nth(2)?;
            let target = l.nth(1)?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                target: PathBuf::from(unescape_mount(target)),
                fstype: fstype.into(),
                source: unescape_mount(source),
                dev: dev.into(),
            })
        })
        .collect()
}

/// Unmounts filesystems on, then detaches, every loop device backed by `file`.
///
/// # Errors
/// A filesystem or loop device that cannot be released.
pub fn release_loops(file: &Path) -> Result<(), HostError> {
    for dev in loops_backed_by(file)? {
        for m in mounts().iter().filter(|m| m.source == dev) {
            nix::mount::umount(&m.target).map_err(|e| HostError::Unmount {
                path: m.target.display().to_string(),
                why: format!("{e} (it is the filesystem on {dev}; close programs using it)"),
            })?;
        }
        if let Err(e) = run("losetup", &["-d", &dev]) {
            // Gone in the meantime (a detach already on its way out) is fine.
            if loops_backed_by(file)?.contains(&dev) {
                return Err(e);
            }
        }
    }
    // `losetup -d` on a device someone still has open only marks it for release; the
    // file stays busy (and the FUSE unmount would fail with EBUSY) until it is let go.
    let mut left = Ok(Vec::new());
    poll_until(LOOP_RELEASE_DEADLINE, || {
        left = loops_backed_by(file);
        !matches!(&left, Ok(devs) if !devs.is_empty())
    });
    let left = left?;
    if left.is_empty() {
        return Ok(());
    }
    Err(HostError::Unmount {
        path: file.display().to_string(),
        why: format!(
            "loop device {} still holds it {LOOP_RELEASE_DEADLINE:?} after `losetup -d` (close programs using it: `fuser -v {}`)",
            left.join(", "),
            left.join(" ")
        ),
    })
}

/// The filesystems mounted on loop devices backed by `file`.
///
/// # Errors
/// `losetup` failed.
pub fn filesystems_on(file: &Path) -> Result<Vec<PathBuf>, HostError> {
    let devs = loops_backed_by(file)?;
    Ok(mounts()
        .into_iter()
        .filter(|m| devs.contains(&m.source))
        .map(|m| m.target)
        .collect())
}

/// The last resort of a bounded shutdown: lazily unmounts (`MNT_DETACH`) the filesystems
/// on loop devices backed by `file` and marks those loops for release, whoever still
/// uses them. Their later I/O fails; call it only after the filesystems were synced.
pub fn force_release_loops(file: &Path) {
    for dev in loops_backed_by(file).unwrap_or_default() {
        for m in mounts().iter().filter(|m| m.source == dev) {
            if let Err(e) = nix::mount::umount2(&m.target, nix::mount::MntFlags::MNT_DETACH) {
                tracing::error!("lazy unmount of {}: {e}", m.target.display());
            }
        }
        if let Err(e) = run("losetup", &["-d", &dev]) {
            tracing::error!("{e}");
        }
    }
}

fn loops_backed_by(file: &Path) -> Result<Vec<String>, HostError> {
    let out = run(
        "losetup",
        &["-n", "-O", "NAME", "-j", &file.display().to_string()],
    )?;
    Ok(out
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Runs a system command, returning stdout or an error carrying stderr.
///
/// # Errors
/// Spawn failure or a non-zero exit.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, HostError> {
    let line = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .map_err(|e| HostError::Command {
            cmd: line.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(HostError::Command {
            cmd: line,
            why: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Checks `done` every 20 ms until it holds (true) or `limit` has passed (false).
pub fn poll_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Background work (a snapshot's reads and uploads) yields the CPU to a WorkSpace's
/// foreground I/O: every thread of this process gets nice `nice` (on Linux the nice value
/// is per thread; threads created later inherit it from their creator). Best effort.
pub fn lower_priority_of_process(nice: i32) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return;
    };
    for t in tasks.flatten() {
        if let Some(tid) = t
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<libc::id_t>().ok())
        {
            // SAFETY: setpriority takes integers only; a failure keeps the default.
            let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) };
        }
    }
}

/// The calling thread alone gets nice `nice` (Linux: PRIO_PROCESS with 0 is the calling
/// thread). Best effort.
pub fn lower_priority_of_thread(nice: i32) {
    // SAFETY: setpriority takes integers only; a failure keeps the default.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}
