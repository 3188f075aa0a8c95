//! Attach and detach: the process that serves volumes through FUSE, and its lifecycle.
//!
//! `attach` without `--foreground` re-executes the binary as a background agent and
//! returns once the agent reports (one line on its stdout) that the mount is ready or why
//! it failed. The agent records itself in a small JSON file in the runtime directory so
//! that `detach` can find it. Detach order (DESIGN §5): unmount filesystems on loop
//! devices over the served files, detach those loops, unmount FUSE, then wait for the
//! agent to flush, wipe its keys and exit.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};

use crate::fuse::{Export, VolumeFs, mount_config};
use crate::host::{is_mountpoint, mounts, poll_until, release_loops};

/// The line an agent prints when its mount is ready.
pub const READY_LINE: &str = "SEALVOL-READY";
/// Prefix of the line an agent prints when it failed before becoming ready.
pub const ERROR_PREFIX: &str = "SEALVOL-ERROR ";
/// How long detach waits for an agent to exit after unmounting.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

/// Errors from attaching or detaching.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The mountpoint is unusable.
    #[error("mountpoint {path}: {why}")]
    Mountpoint {
        /// The mountpoint.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Opening a volume failed in the agent.
    #[error("{0}")]
    Agent(String),
    /// The FUSE mount failed.
    #[error("cannot mount FUSE at {path}: {source} (is /dev/fuse available and fuse3 installed?)")]
    Mount {
        /// The mountpoint.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Nothing is attached there.
    #[error("nothing is attached at {0} (no sealvol agent record and no sealvol FUSE mount)")]
    NotAttached(PathBuf),
    /// Unmounting failed.
    #[error("cannot unmount {path}: {why}")]
    Unmount {
        /// What was being unmounted.
        path: String,
        /// Why.
        why: String,
    },
    /// A helper command failed.
    #[error("{cmd} failed: {why}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or spawn error.
        why: String,
    },
    /// A host command or mount operation failed.
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    /// The runtime directory or a record in it cannot be kept private.
    #[error("runtime state: {0}")]
    Private(#[from] crate::private_file::PrivateFileError),
    /// Runtime state I/O.
    #[error("runtime state {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// A running agent's record, stored in the runtime directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's process id.
    pub pid: i32,
    /// Canonical mountpoint.
    pub mountpoint: PathBuf,
    /// Served files and their volume paths.
    pub files: Vec<(String, PathBuf)>,
}

/// Directory for agent records and control sockets (`$SEALVOL_RUNTIME_DIR`, default
/// `/run/sealvol`); made private (0700, ours) before the first record is written.
#[must_use]
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("SEALVOL_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/run/sealvol"), PathBuf::from)
}

fn record_path(mountpoint: &Path) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    runtime_dir().join(format!("agent-{}.json", &hex::encode(digest)[..16]))
}

/// The control socket of the agent serving `mountpoint` (next to its record).
///
/// # Errors
/// The mountpoint does not exist.
pub fn control_path(mountpoint: &Path) -> Result<PathBuf, AttachError> {
    Ok(record_path(&canonical_mountpoint(mountpoint)?).with_extension("sock"))
}

/// The mountpoint of a running agent that serves the volume file `volume`, if any.
#[must_use]
pub fn attached_at(volume: &Path) -> Option<PathBuf> {
    let want = volume.canonicalize().ok()?;
    std::fs::read_dir(runtime_dir())
        .ok()?
        .flatten()
        .find_map(|entry| {
            let name = entry.file_name();
            let name = name.to_str()?;
            if !(name.starts_with("agent-") && name.ends_with(".json")) {
                return None;
            }
            let rec: AgentRecord =
                serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok()?;
            let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(rec.pid), None).is_ok();
            let serves = rec
                .files
                .iter()
                .any(|(_, f)| f.canonicalize().is_ok_and(|f| f == want));
            (alive && serves).then_some(rec.mountpoint)
        })
}

fn canonical_mountpoint(path: &Path) -> Result<PathBuf, AttachError> {
    let canon = path.canonicalize().map_err(|e| AttachError::Mountpoint {
        path: path.into(),
        why: e.to_string(),
    })?;
    if !canon.is_dir() {
        return Err(AttachError::Mountpoint {
            path: path.into(),
            why: "not a directory".into(),
        });
    }
    Ok(canon)
}

/// Serves `exports` at `mountpoint` in this process until unmounted or signalled.
///
/// `on_ready` runs once the mount is live (the background parent is told through it).
/// On return, every export has been flushed and the devices (and their keys) dropped.
///
/// # Errors
/// Mountpoint problems, mount failure.
pub fn serve(
    mountpoint: &Path,
    exports: Vec<Export>,
    threads: usize,
    on_ready: impl FnOnce(),
) -> Result<(), AttachError> {
    serve_with(mountpoint, exports, threads, &[], on_ready)
}

/// [`serve`], then resumes the interrupted rekeys of the exports named in `resume_rekeys`
/// (opened in rekey mode) in the background once the mount is live. Every agent listens
/// on its control socket ([`control_path`]) for online `rekey-volume` requests; pending
/// rekeys stop at a hotzone boundary on unmount and resume on the next attach.
///
/// # Errors
/// Mountpoint problems, mount failure.
pub fn serve_with(
    mountpoint: &Path,
    exports: Vec<Export>,
    threads: usize,
    resume_rekeys: &[String],
    on_ready: impl FnOnce(),
) -> Result<(), AttachError> {
    let mountpoint = canonical_mountpoint(mountpoint)?;
    if is_mountpoint(&mountpoint) {
        return Err(AttachError::Mountpoint {
            path: mountpoint,
            why: "something is already mounted there".into(),
        });
    }
    // Block the termination signals in every thread; one thread waits for them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGHUP);
    let _ = signals.thread_block();

    let files: Vec<(String, PathBuf)> = exports
        .iter()
        .map(|e| (e.name.clone(), PathBuf::from(e.device.backing().name())))
        .collect();
    let devices: Vec<Arc<crate::device::Device>> =
        exports.iter().map(|e| e.device.clone()).collect();
    let exports_named: Vec<(String, Arc<crate::device::Device>)> = exports
        .iter()
        .map(|e| (e.name.clone(), e.device.clone()))
        .collect();
    let fs = VolumeFs::new(exports);
    let mut session =
        fuser::Session::new(fs, &mountpoint, &mount_config(threads)).map_err(|source| {
            AttachError::Mount {
                path: mountpoint.clone(),
                source,
            }
        })?;

    let record = AgentRecord {
        pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
        mountpoint: mountpoint.clone(),
        files,
    };
    let rec_path = record_path(&mountpoint);
    write_record(&rec_path, &record)?;

    let mut unmounter = session.unmount_callable();
    let mp = mountpoint.clone();
    let served = record.files.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let Ok(sig) = signals.wait() else { return };
                tracing::info!("{sig:?}: unmounting {}", mp.display());
                // Filesystems and loop devices over our files go first (DESIGN §5 order);
                // later exports may be mounted inside earlier ones, so go in reverse.
                for (name, _) in served.iter().rev() {
                    if let Err(e) = release_loops(&mp.join(name)) {
                        tracing::error!("{e}");
                    }
                }
                match unmounter.unmount() {
                    Ok(()) => return,
                    Err(e) => tracing::error!(
                        "cannot unmount {} on {sig:?}: {e} (still in use?)",
                        mp.display()
                    ),
                }
            }
        })
        .map_err(|e| AttachError::State {
            path: rec_path.clone(),
            source: e,
        })?;

    let ctl_path = rec_path.with_extension("sock");
    let control = crate::control::ControlServer::spawn(&ctl_path, exports_named).map_err(|e| {
        AttachError::State {
            path: ctl_path.clone(),
            source: std::io::Error::other(e.to_string()),
        }
    })?;
    on_ready();
    for name in resume_rekeys {
        if let Err(e) = control.resume(name) {
            tracing::error!("cannot resume the rekey of {name}: {e}");
        }
    }
    let result = session.run();
    control.shutdown();
    let _ = std::fs::remove_file(&rec_path);
    for d in &devices {
        if let Err(e) = d.flush() {
            tracing::error!("final flush failed: {e}");
        }
    }
    drop(devices);
    result.map_err(|source| AttachError::Mount {
        path: mountpoint,
        source,
    })
}

fn write_record(path: &Path, record: &AgentRecord) -> Result<(), AttachError> {
    crate::private_file::ensure_dir(path.parent().expect("record path has a parent"))?;
    let json = serde_json::to_vec_pretty(record).expect("record serializes");
    Ok(crate::private_file::write(path, &json)?)
}

/// Runs the current executable with `args` as a background agent and waits for its ready
/// line. The agent's stderr goes to `log` (or is discarded).
///
/// # Errors
/// The agent failed to start or reported an error (its message is returned).
pub fn spawn_agent(args: &[std::ffi::OsString], log: Option<&Path>) -> Result<u32, AttachError> {
    let exe = std::env::current_exe().map_err(|e| AttachError::Command {
        cmd: "current_exe".into(),
        why: e.to_string(),
    })?;
    let stderr = match log {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|source| AttachError::State {
                    path: p.to_path_buf(),
                    source,
                })?,
        ),
        None => Stdio::null(),
    };
    let mut child = Command::new(&exe)
        .args(args)
        .env("SEALVOL_AGENT", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .process_group(0)
        .spawn()
        .map_err(|e| AttachError::Command {
            cmd: exe.display().to_string(),
            why: e.to_string(),
        })?;
    let stdout = child.stdout.take().expect("stdout was piped");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    let line = line.trim_end();
    if line == READY_LINE {
        return Ok(child.id());
    }
    let status = child.wait().ok();
    if let Some(msg) = line.strip_prefix(ERROR_PREFIX) {
        return Err(AttachError::Agent(msg.to_string()));
    }
    Err(AttachError::Agent(format!(
        "the attach agent exited ({}) before the mount was ready{}",
        status.map_or_else(|| "unknown status".into(), |s| s.to_string()),
        log.map(|p| format!("; see {}", p.display()))
            .unwrap_or_default()
    )))
}

/// Detaches whatever sealvol serves at `mountpoint`: unmounts filesystems on loop devices
/// over its files, detaches those loops, unmounts FUSE, and waits for the agent to exit.
///
/// # Errors
/// Nothing attached, or something could not be unmounted (with what to do).
pub fn detach(mountpoint: &Path) -> Result<(), AttachError> {
    // The FUSE mount of an agent that died (kill -9) cannot even be stat'ed (ENOTCONN):
    // resolve its parent instead so that the dead mount can be cleaned up.
    let mountpoint = canonical_mountpoint(mountpoint).or_else(|e| {
        let parent = mountpoint
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        match (parent.canonicalize(), mountpoint.file_name()) {
            (Ok(p), Some(name)) if is_mountpoint(&p.join(name)) => Ok(p.join(name)),
            _ => Err(e),
        }
    })?;
    let rec_path = record_path(&mountpoint);
    let record: Option<AgentRecord> = std::fs::read(&rec_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let fuse_mounted = mounts()
        .iter()
        .any(|m| m.target == mountpoint && m.fstype.starts_with("fuse"));
    if record.is_none() && !fuse_mounted {
        return Err(AttachError::NotAttached(mountpoint));
    }
    if fuse_mounted {
        for entry in std::fs::read_dir(&mountpoint)
            .into_iter()
            .flatten()
            .flatten()
        {
            release_loops(&entry.path())?;
        }
        nix::mount::umount(&mountpoint).map_err(|e| AttachError::Unmount {
            path: mountpoint.display().to_string(),
            why: format!(
                "{e} (close programs using it: `fuser -vm {}`)",
                mountpoint.display()
            ),
        })?;
    }
    if let Some(rec) = record {
        wait_for_exit(rec.pid);
    }
    let _ = std::fs::remove_file(&rec_path);
    Ok(())
}

/// Polls until process `pid` is gone (or the deadline passes).
pub fn wait_for_exit(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    let gone = poll_until(EXIT_DEADLINE, || {
        // A zombie child of ours still answers kill(0); reap it if it is ours.
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        nix::sys::signal::kill(pid, None).is_err()
    });
    if !gone {
        tracing::warn!("agent {pid} still running after {EXIT_DEADLINE:?}");
    }
}
