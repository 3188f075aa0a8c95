//! The registry of running agents: one JSON record per agent in the runtime directory,
//! keyed by its canonical mountpoint, and the one liveness check every caller uses.
//!
//! A record names the agent's pid and the start time of that process (clock ticks since
//! boot, from `/proc/PID/stat`), so that a pid reused by an unrelated process after the
//! agent died is not mistaken for a live agent.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::AttachError;

/// A running agent's record, stored in the runtime directory.
#[derive(Debug, Serialize, Deserialize)]
pub struct AgentRecord {
    /// The agent's process id.
    pub pid: i32,
    /// When that process started (field 22 of `/proc/PID/stat`); absent in records
    /// written by an older sealvol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// Canonical mountpoint.
    pub mountpoint: PathBuf,
    /// Served files and their volume paths.
    pub files: Vec<(String, PathBuf)>,
    /// Where the agent serves its Prometheus metrics, when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
    /// The FUSE transport in effect (`dev` or `uring`, see `SEALVOL_FUSE_TRANSPORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuse_transport: Option<String>,
}

impl AgentRecord {
    /// The record of this process serving `files` at `mountpoint`.
    #[must_use]
    pub fn of_this_process(mountpoint: PathBuf, files: Vec<(String, PathBuf)>) -> Self {
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        Self {
            pid,
            start_time: start_time(pid),
            mountpoint,
            files,
            metrics: None,
            fuse_transport: None,
        }
    }

    /// Whether the agent this record describes is still running: the pid exists and is
    /// the same process (same start time). A record without a start time falls back to
    /// "the process's command line names a sealvol agent".
    #[must_use]
    pub fn is_live(&self) -> bool {
        process_is_agent(self.pid, self.start_time)
    }
}

/// Whether `pid` is alive and is the agent process that started at `started` (see
/// [`AgentRecord::is_live`]).
#[must_use]
pub fn process_is_agent(pid: i32, started: Option<u64>) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    let Some(now) = start_time(pid) else {
        return false;
    };
    match started {
        Some(t) => now == t,
        None => std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
            cmdline
                .split(|&b| b == 0)
                .any(|a| a == b"agent" || a == b"attach")
        }),
    }
}

/// The start time of process `pid` in clock ticks since boot (field 22 of its
/// `/proc/PID/stat`), if it exists and has not exited: a zombie (state `Z`, or `X` while
/// it is reaped) is a dead agent whose parent has not collected it yet, as happens when
/// the reaper of orphans is slow (some container inits never reap).
#[must_use]
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // Fields from 3 on: the state is field 3, the start time field 22.
    if matches!(fields.next()?, "Z" | "X" | "x") {
        return None;
    }
    fields.nth(22 - 4)?.parse().ok()
}

/// Directory for agent records and control sockets (`$SEALVOL_RUNTIME_DIR`, default
/// `/run/sealvol`); made private (0700, ours) before the first record is written.
#[must_use]
pub fn runtime_dir() -> PathBuf {
    std::env::var_os("SEALVOL_RUNTIME_DIR")
        .map_or_else(|| PathBuf::from("/run/sealvol"), PathBuf::from)
}

/// Where the record of the agent serving the canonical `mountpoint` lives.
pub(super) fn record_path(mountpoint: &Path) -> PathBuf {
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

/// Reads the record at `path`, if there is a readable one.
pub(super) fn read_record(path: &Path) -> Option<AgentRecord> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Writes `record` to `path`, making the runtime directory private first.
pub(super) fn write_record(path: &Path, record: &AgentRecord) -> Result<(), AttachError> {
    crate::private_file::ensure_dir(path.parent().expect("record path has a parent"))?;
    let json = serde_json::to_vec_pretty(record).expect("record serializes");
    Ok(crate::private_file::write(path, &json)?)
}

/// The record of a live agent serving at `mountpoint`, if any. The mountpoint's parent
/// is resolved rather than the mountpoint itself: a dead agent's FUSE mount cannot be
/// stat'ed (ENOTCONN), and a dead agent is not live anyway.
#[must_use]
pub fn live_at(mountpoint: &Path) -> Option<AgentRecord> {
    let parent = mountpoint
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let canon = parent.canonicalize().ok()?.join(mountpoint.file_name()?);
    read_record(&record_path(&canon)).filter(AgentRecord::is_live)
}

/// The mountpoint of a live agent that serves the volume file `volume`, if any.
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
            let rec = read_record(&entry.path())?;
            let serves = rec
                .files
                .iter()
                .any(|(_, f)| f.canonicalize().is_ok_and(|f| f == want));
            (serves && rec.is_live()).then_some(rec.mountpoint)
        })
}

/// `path` canonicalized, and checked to be a directory.
pub(super) fn canonical_mountpoint(path: &Path) -> Result<PathBuf, AttachError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_live_and_a_wrong_start_time_is_not() {
        let me = AgentRecord::of_this_process(PathBuf::from("/"), Vec::new());
        assert!(me.start_time.is_some());
        assert!(me.is_live());
        let reused = AgentRecord {
            start_time: me.start_time.map(|t| t + 1),
            ..me
        };
        assert!(!reused.is_live(), "a reused pid is not our agent");
    }

    #[test]
    fn a_zombie_is_not_a_live_agent() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let pid = i32::try_from(child.id()).expect("pid fits");
        let started = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
        // Not reaped yet: the exited child stays a zombie until `wait`.
        let zombie = crate::host::poll_until(std::time::Duration::from_secs(10), || {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                s.rsplit(')')
                    .next()
                    .is_some_and(|f| f.trim_start().starts_with('Z'))
            })
        });
        assert!(zombie, "the child did not become a zombie ({started:?})");
        assert_eq!(start_time(pid), None);
        assert!(!process_is_agent(pid, None));
        let _ = child.wait();
    }

    #[test]
    fn records_without_start_time_still_parse() {
        let rec: AgentRecord =
            serde_json::from_str(r#"{"pid": 1, "mountpoint": "/m", "files": [["disk", "/v"]]}"#)
                .expect("old record parses");
        assert_eq!(rec.start_time, None);
    }
}
