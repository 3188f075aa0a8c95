//! The attach agent's control socket: a local Unix socket next to the agent's record over
//! which `sealvol rekey` (and the controller) ask a running agent to rekey one of the
//! files it serves, and follow the job's progress, and over which the controller takes
//! snapshots of them ([`super::snapshot`]). One JSON request line per connection, JSON
//! reply lines until the job ends (a snapshot session goes on with reads on the same
//! connection); only root or the agent's own user may connect.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::snapshot::{Begun, ChunkTracker};

pub mod session;
use crate::device::Device;
use crate::luks2::{Header, KmsToken};
use crate::rekey::*;
use crate::secret::VolumeKey;

/// A request to the attach agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
#[allow(
    clippy::large_enum_variant,
    reason = "one short-lived request per connection"
)]
pub enum ControlRequest {
    /// Start (or follow) a rekey of one served file to the key carried in the request
    /// (the client read it; it never passes through a file the agent opens).
    Rekey {
        /// Served file name (`disk`); `None` when the agent serves exactly one.
        export: Option<String>,
        /// The new 64-byte key, hex on the wire (both ends wipe their copy of the line).
        #[serde(with = "crate::secret::volume_key_hex")]
        new_volume_key: VolumeKey,
        /// Hotzone size in bytes.
        hotzone_bytes: Option<u64>,
        /// For a KMS-backed volume: the new key's token (blob + context), stored in the
        /// checkpoint so a crash can resume and installed in the header at the end.
        #[serde(default)]
        new_kms_token: Option<KmsToken>,
        /// What each hotzone's journal holds (absent: a full copy).
        #[serde(default, skip_serializing_if = "Resilience::is_journal")]
        resilience: Resilience,
    },
    /// Report rekey progress of every served file.
    Status,
    /// Begin a snapshot view of one served file relative to the parent snapshot `base`
    /// (its manifest key); answered by [`ControlReply::SnapshotBegun`], then the session
    /// goes on on the same connection (see [`super::snapshot`]).
    SnapshotBegin {
        /// Served file name; `None` when the agent serves exactly one.
        export: Option<String>,
        /// The parent snapshot; `None` for a first snapshot.
        base: Option<String>,
    },
    /// Within a snapshot session: read one chunk as of the session's beginning.
    SnapshotRead {
        /// Chunk index in the volume file.
        chunk: u64,
    },
    /// Within a snapshot session: end it, committed (`Some(manifest key)`) or aborted.
    SnapshotEnd {
        /// The new snapshot's manifest key once it is committed; `None` aborts.
        committed: Option<String>,
    },
}

/// One line the agent sends back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlReply {
    /// Progress of the rekey.
    Progress(Progress),
    /// The rekey finished.
    Done(RekeyReport),
    /// Status: per served file, the rekey progress if one is in progress.
    Status(Vec<(String, Option<Progress>)>),
    /// Failure.
    Error(String),
    /// A snapshot view began.
    SnapshotBegun(Begun),
    /// A chunk follows: exactly `len` raw bytes after this line.
    SnapshotChunk {
        /// Chunk index.
        chunk: u64,
        /// Bytes that follow.
        len: u64,
    },
    /// The snapshot view ended.
    SnapshotEnded,
}

#[derive(Debug, Default)]
struct JobState {
    progress: Option<Progress>,
    result: Option<Result<RekeyReport, String>>,
}

#[derive(Debug, Default)]
struct Job {
    state: Mutex<JobState>,
    changed: Condvar,
    cancel: AtomicBool,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Job {
    fn update(&self, f: impl FnOnce(&mut JobState)) {
        f(&mut self.state.lock().expect("job lock"));
        self.changed.notify_all();
    }
}

/// The agent side of the control socket: serves rekey requests for its devices and runs
/// them as background jobs while FUSE keeps serving I/O.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    inner: Arc<ServerInner>,
}

#[derive(Debug)]
struct ServerInner {
    devices: Vec<(String, Arc<Device>)>,
    trackers: Vec<Arc<ChunkTracker>>,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    stopping: AtomicBool,
}

impl ControlServer {
    /// Binds `path` (mode 0600, replacing a stale socket) and serves it on a thread:
    /// rekeys of `devices`, snapshots of the exports `trackers` track.
    ///
    /// # Errors
    /// The socket cannot be bound.
    pub fn spawn(
        path: &Path,
        devices: Vec<(String, Arc<Device>)>,
        trackers: Vec<Arc<ChunkTracker>>,
    ) -> Result<Self, RekeyError> {
        let err = |why: String| RekeyError::Control {
            path: path.to_path_buf(),
            why,
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(|e| err(e.to_string()))?;
        let inner = Arc::new(ServerInner {
            devices,
            trackers,
            jobs: Mutex::new(HashMap::new()),
            stopping: AtomicBool::new(false),
        });
        let srv = inner.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if srv.stopping.load(Ordering::Relaxed) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let srv = srv.clone();
                    let _ = std::thread::Builder::new()
                        .name("control-conn".into())
                        .spawn(move || srv.handle(conn));
                }
            })
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }

    /// Resumes the rekey of a served device opened in rekey mode (attach with both keys).
    ///
    /// # Errors
    /// No such export, or the device has no rekey in progress.
    pub fn resume(&self, export: &str) -> Result<(), RekeyError> {
        let device = self
            .inner
            .device(Some(export))
            .map_err(RekeyError::Agent)?
            .1;
        let rekeyer = Rekeyer::resume(device)?;
        self.inner
            .start_job(export, rekeyer, true)
            .map(|_| ())
            .map_err(RekeyError::Agent)
    }

    /// Stops every job at its next hotzone boundary and waits for it; removes the socket.
    pub fn shutdown(&self) {
        self.inner.stopping.store(true, Ordering::Relaxed);
        let _ = std::fs::remove_file(&self.path);
        let jobs: Vec<Arc<Job>> = self
            .inner
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .cloned()
            .collect();
        for job in jobs {
            job.cancel.store(true, Ordering::Relaxed);
            if let Some(h) = job.handle.lock().expect("job handle lock").take() {
                let _ = h.join();
            }
        }
    }
}

impl ServerInner {
    fn device(&self, export: Option<&str>) -> Result<(String, Arc<Device>), String> {
        match export {
            Some(name) => self
                .devices
                .iter()
                .find(|(n, _)| n == name)
                .cloned()
                .ok_or_else(|| format!("this agent serves no file named {name:?}")),
            None if self.devices.len() == 1 => Ok(self.devices[0].clone()),
            None => Err(format!(
                "this agent serves {} files; name one ({})",
                self.devices.len(),
                self.devices
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    fn tracker(&self, export: Option<&str>) -> Result<Arc<ChunkTracker>, String> {
        let (name, _) = self.device(export)?;
        self.trackers
            .iter()
            .find(|t| t.export() == name)
            .cloned()
            .ok_or_else(|| {
                format!(
                    "this agent does not track changes of {name:?} (not served from a volume file)"
                )
            })
    }

    fn start_job(
        &self,
        name: &str,
        mut rekeyer: Rekeyer,
        resumed: bool,
    ) -> Result<Arc<Job>, String> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        if let Some(j) = jobs.get(name)
            && j.state.lock().expect("job lock").result.is_none()
        {
            return Ok(j.clone());
        }
        let job = Arc::new(Job::default());
        let j = job.clone();
        let handle = std::thread::Builder::new()
            .name(format!("rekey-{name}"))
            .spawn(move || {
                let start = Instant::now();
                let from = rekeyer.progress().done;
                let total = rekeyer.progress().total;
                let r = in_background(|| {
                    rekeyer.run(&j.cancel, |p| j.update(|s| s.progress = Some(p)))
                });
                if let Err(e) = &r {
                    tracing::error!("rekey: {e}");
                }
                let r = r
                    .map(|()| report(start, from, total, resumed))
                    .map_err(|e| e.to_string());
                j.update(|s| s.result = Some(r));
            })
            .map_err(|e| e.to_string())?;
        *job.handle.lock().expect("job handle lock") = Some(handle);
        jobs.insert(name.to_string(), job.clone());
        Ok(job)
    }

    fn handle(&self, conn: UnixStream) {
        let Ok(mut out) = conn.try_clone() else {
            return;
        };
        let mut send = |r: &ControlReply| -> bool {
            let mut line = serde_json::to_vec(r).expect("replies serialize");
            line.push(b'\n');
            out.write_all(&line).is_ok()
        };
        if !peer_may_control(&conn) {
            send(&ControlReply::Error(
                "permission denied: only root or the agent's user may control it".into(),
            ));
            return;
        }
        let req = match read_request(&conn) {
            Ok(r) => r,
            Err(e) => {
                send(&ControlReply::Error(e));
                return;
            }
        };
        let (export, new_key, opts) = match req {
            ControlRequest::Status => {
                send(&ControlReply::Status(self.status()));
                return;
            }
            ControlRequest::SnapshotBegin { export, base } => {
                match self.tracker(export.as_deref()) {
                    Ok(t) => session::serve_session(&conn, &t, base.as_deref()),
                    Err(e) => {
                        send(&ControlReply::Error(e));
                    }
                }
                return;
            }
            ControlRequest::SnapshotRead { .. } | ControlRequest::SnapshotEnd { .. } => {
                send(&ControlReply::Error(
                    "no snapshot on this connection: send snapshot-begin first, then reads and the end on the same connection".into(),
                ));
                return;
            }
            ControlRequest::Rekey {
                export,
                new_volume_key,
                hotzone_bytes,
                new_kms_token,
                resilience,
            } => (
                export,
                new_volume_key,
                RekeyOptions {
                    hotzone_bytes,
                    new_kms_token,
                    resilience,
                },
            ),
        };
        let job = match self.begin(export.as_deref(), &new_key, &opts) {
            Ok(j) => j,
            Err(e) => {
                send(&ControlReply::Error(e));
                return;
            }
        };
        drop(new_key);
        follow_job(&job, send);
    }

    fn status(&self) -> Vec<(String, Option<Progress>)> {
        self.devices
            .iter()
            .map(|(n, d)| {
                (
                    n.clone(),
                    d.rekey_boundary().map(|b| Progress {
                        done: b,
                        total: d.size(),
                    }),
                )
            })
            .collect()
    }

    fn begin(
        &self,
        export: Option<&str>,
        new: &VolumeKey,
        opts: &RekeyOptions,
    ) -> Result<Arc<Job>, String> {
        let (name, device) = self.device(export)?;
        if let Some(job) = self.jobs.lock().expect("jobs lock").get(&name).cloned()
            && job.state.lock().expect("job lock").result.is_none()
        {
            // A rekey is running: follow it if it is to the same key.
            let header = Header::read(&**device.backing()).map_err(|e| e.to_string())?;
            let st = state(&header)
                .map_err(|e| e.to_string())?
                .ok_or("no rekey in the header")?;
            header.verify_key_against(st.new_digest, new).map_err(|_| {
                    "a rekey to a different new key is already running on this volume; wait for it to finish".to_string()
                })?;
            return Ok(job);
        }
        let rekeyer = if device.rekey_boundary().is_some() {
            // Resumed at attach, finished or failed job: continue with the same new key.
            let header = Header::read(&**device.backing()).map_err(|e| e.to_string())?;
            let st = state(&header)
                .map_err(|e| e.to_string())?
                .ok_or("no rekey in the header")?;
            header
                .verify_key_against(st.new_digest, new)
                .map_err(|_| RekeyError::WrongNewKey.to_string())?;
            Rekeyer::resume(device).map_err(|e| e.to_string())?
        } else {
            let header = Header::read(&**device.backing()).map_err(|e| e.to_string())?;
            if header.verify_key(new).is_ok() {
                // Already under the new key (a rekey that finished before a crash).
                let job = Job::default();
                let total = device.size();
                job.update(|s| {
                    s.result = Some(Ok(RekeyReport::already_done(total)));
                });
                return Ok(Arc::new(job));
            }
            if let Ok(t) = self.tracker(Some(&name))
                && t.snapshot_running()
            {
                // (The device refuses too, but only after the header records the rekey.)
                return Err(crate::device::CryptStateError::SnapshotRunning.to_string());
            }
            Rekeyer::start(device, new, opts).map_err(|e| e.to_string())?
        };
        self.start_job(&name, rekeyer, false)
    }
}

/// Longest request line the agent reads.
const MAX_REQUEST: usize = 64 * 1024;

/// Whether the peer of `conn` (per SO_PEERCRED) is root or the agent's own user.
fn peer_may_control(conn: &UnixStream) -> bool {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .is_ok_and(|c| c.uid() == 0 || c.uid() == nix::unistd::geteuid().as_raw())
}

/// Reads and parses one request line. The line may carry a key: it is read straight
/// into one preallocated buffer (no `BufReader`, no reallocation that would leave copies
/// behind), and that buffer is wiped once parsed.
fn read_request(conn: &UnixStream) -> Result<ControlRequest, String> {
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_REQUEST]);
    let mut len = 0;
    let end = loop {
        if let Some(i) = buf[..len].iter().position(|&b| b == b'\n') {
            break i;
        }
        if len == buf.len() {
            return Err(format!("bad request: longer than {MAX_REQUEST} bytes"));
        }
        match (&*conn).read(&mut buf[len..]) {
            Ok(0) => break len,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("bad request: {e}")),
        }
    };
    serde_json::from_slice(&buf[..end]).map_err(|e| format!("bad request: {e}"))
}

/// Streams a job's progress, then its outcome, to the client; a client that goes away
/// does not stop the job.
fn follow_job(job: &Job, mut send: impl FnMut(&ControlReply) -> bool) {
    let mut last = None;
    let mut st = job.state.lock().expect("job lock");
    loop {
        if let Some(r) = &st.result {
            let reply = match r {
                Ok(rep) => ControlReply::Done(rep.clone()),
                Err(e) => ControlReply::Error(e.clone()),
            };
            drop(st);
            send(&reply);
            return;
        }
        if st.progress != last {
            last = st.progress;
            let p = st.progress;
            drop(st);
            if let Some(p) = p
                && !send(&ControlReply::Progress(p))
            {
                return;
            }
            st = job.state.lock().expect("job lock");
            continue;
        }
        st = job.changed.wait(st).expect("job lock");
    }
}

/// The client side: asks the agent serving `mountpoint` to rekey (or continue rekeying)
/// a served file, calling `progress` for each update, and returns the agent's report.
///
/// # Errors
/// No agent there, the agent refused or the rekey failed.
pub fn request_online(
    mountpoint: &Path,
    req: &ControlRequest,
    mut progress: impl FnMut(Progress),
) -> Result<RekeyReport, RekeyError> {
    let path = super::registry::control_path(mountpoint).map_err(|e| RekeyError::Control {
        path: mountpoint.to_path_buf(),
        why: e.to_string(),
    })?;
    let err = |why: String| RekeyError::Control {
        path: path.clone(),
        why,
    };
    let mut conn = UnixStream::connect(&path).map_err(|e| {
        err(format!(
            "{e} (is a sealvol agent serving {}?)",
            mountpoint.display()
        ))
    })?;
    // The request may carry a key: serialize into one preallocated buffer (no
    // reallocation leaves a copy behind) that is wiped when sent.
    let mut line = zeroize::Zeroizing::new(Vec::with_capacity(MAX_REQUEST));
    serde_json::to_writer(&mut *line, req).expect("requests serialize");
    line.push(b'\n');
    conn.write_all(&line).map_err(|e| err(e.to_string()))?;
    drop(line);
    for line in BufReader::new(&conn).lines() {
        let line = line.map_err(|e| err(e.to_string()))?;
        match serde_json::from_str::<ControlReply>(&line)
            .map_err(|e| err(format!("bad reply: {e}")))?
        {
            ControlReply::Progress(p) => progress(p),
            ControlReply::Done(r) => return Ok(r),
            ControlReply::Error(e) => return Err(RekeyError::Agent(e)),
            other => return Err(err(format!("unexpected reply {other:?}"))),
        }
    }
    Err(err("the agent closed the connection before the rekey finished (did it crash? attach again with both keys to resume)".into()))
}
