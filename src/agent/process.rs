//! The agent as a process: spawning it in the background, the one line it reports on its
//! stdout (ready, or why it failed), and waiting for it or stopping it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::AttachError;
use crate::host::poll_until;

/// The line an agent prints when its mount is ready.
pub const READY_LINE: &str = "SEALVOL-READY";
/// Prefix of the line an agent prints when it failed before becoming ready.
pub const ERROR_PREFIX: &str = "SEALVOL-ERROR ";
/// How long detach waits for an agent to exit after unmounting.
const EXIT_DEADLINE: Duration = Duration::from_secs(60);

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

/// In a background agent: tells the parent waiting in [`spawn_agent`] that the mount is
/// ready, then points stdout at /dev/null so nothing else reaches the closed pipe.
pub fn report_ready() {
    println!("{READY_LINE}");
    if let Ok(null) = std::fs::File::open("/dev/null") {
        let _ = nix::unistd::dup2_stdout(null);
    }
}

/// In a background agent: tells the parent waiting in [`spawn_agent`] why it failed.
pub fn report_error(why: &dyn std::fmt::Display) {
    println!("{ERROR_PREFIX}{why}");
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

/// Stops agent `pid`: SIGTERM (it then unmounts, releases its loops and wipes its keys),
/// and SIGKILL if `still_live` has not turned false within `grace`.
pub fn terminate(pid: i32, grace: Duration, mut still_live: impl FnMut() -> bool) {
    let p = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    if !poll_until(grace, || !still_live()) {
        let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
    }
}
