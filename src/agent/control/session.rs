//! The snapshot session on the control socket: the agent serves a
//! [`ChunkTracker`]'s view to the controller, and [`SnapshotSession`] is the client.
//!
//! Protocol, on one control-socket connection: the client sends
//! [`ControlRequest::SnapshotBegin`] and gets [`ControlReply::SnapshotBegun`] (a
//! [`Begun`]); then any number of [`ControlRequest::SnapshotRead`] lines, each answered by
//! a [`ControlReply::SnapshotChunk`] line followed by exactly `len` raw bytes (the
//! chunk's ciphertext as it sits in the file); finally [`ControlRequest::SnapshotEnd`],
//! answered by [`ControlReply::SnapshotEnded`]. The client sends each request only once
//! the previous answer has arrived. A connection that closes before the end aborts the
//! view: no change is lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use super::{ControlReply, ControlRequest};
use crate::agent::snapshot::{Begun, ChunkTracker};

/// Longest reply or request line of a snapshot session (a `changed` list of every chunk
/// of a large volume is the longest).
const MAX_LINE: u64 = 64 * 1024 * 1024;

/// Errors of a snapshot session, client side.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// No agent answers at the mountpoint.
    #[error("cannot reach the agent at {path}: {source} (is a sealvol agent serving it?)")]
    Connect {
        /// The control socket (or the mountpoint).
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The connection failed mid-session (the view is aborted by the agent).
    #[error(
        "snapshot session with {path}: {source} (did the agent stop? the snapshot was aborted)"
    )]
    Io {
        /// The control socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The agent refused (a view already running, a rekey, a bad chunk, ...).
    #[error("the agent refused: {0}")]
    Agent(String),
    /// The agent answered something this client does not expect.
    #[error("unexpected answer from the agent at {path}: {why}")]
    Protocol {
        /// The control socket.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
}

/// Serves one snapshot session on `conn` for `tracker`, after the `SnapshotBegin`
/// request: begins the view, answers reads, ends it; aborts it if the connection drops.
pub(in crate::agent) fn serve_session(
    conn: &UnixStream,
    tracker: &ChunkTracker,
    base: Option<&str>,
) {
    let mut out = conn;
    let send = |out: &mut &UnixStream, r: &ControlReply| -> bool {
        let mut line = serde_json::to_vec(r).expect("replies serialize");
        line.push(b'\n');
        out.write_all(&line).is_ok()
    };
    let begun = match tracker.begin(base) {
        Ok(b) => b,
        Err(e) => {
            send(&mut out, &ControlReply::Error(e.to_string()));
            return;
        }
    };
    let mut view = OpenView {
        tracker,
        ended: false,
    };
    if !send(&mut out, &ControlReply::SnapshotBegun(begun)) {
        return;
    }
    // The view is open (the barrier is behind us): reading chunks for the upload yields
    // the CPU to the volume's foreground I/O. This connection's thread ends with it.
    crate::host::lower_priority_of_thread(10);
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    let mut buf = Vec::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        match serde_json::from_str::<ControlRequest>(line.trim_end()) {
            Ok(ControlRequest::SnapshotRead { chunk }) => match tracker.read(chunk, &mut buf) {
                Ok(()) => {
                    let head = ControlReply::SnapshotChunk {
                        chunk,
                        len: buf.len() as u64,
                    };
                    if !send(&mut out, &head) || out.write_all(&buf).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    if !send(&mut out, &ControlReply::Error(e.to_string())) {
                        return;
                    }
                }
            },
            Ok(ControlRequest::SnapshotEnd { committed }) => {
                view.ended = true;
                let reply = match tracker.end(committed.as_deref()) {
                    Ok(()) => ControlReply::SnapshotEnded,
                    Err(e) => ControlReply::Error(e.to_string()),
                };
                send(&mut out, &reply);
                return;
            }
            Ok(_) => {
                send(
                    &mut out,
                    &ControlReply::Error(
                        "a snapshot session takes snapshot-read and snapshot-end only; the snapshot was aborted".into(),
                    ),
                );
                return;
            }
            Err(e) => {
                send(
                    &mut out,
                    &ControlReply::Error(format!("bad request: {e}; the snapshot was aborted")),
                );
                return;
            }
        }
    }
}

/// A view served on a connection: aborted when the session ends without `SnapshotEnd`.
struct OpenView<'a> {
    tracker: &'a ChunkTracker,
    ended: bool,
}

impl Drop for OpenView<'_> {
    fn drop(&mut self) {
        if !self.ended && self.tracker.end(None).is_ok() {
            tracing::warn!(
                "snapshot of {}: the client went away before ending it; aborted",
                self.tracker.export()
            );
        }
    }
}

/// A snapshot session with the agent serving a volume: owns the connection, over which
/// the agent keeps the view open until [`SnapshotSession::end`] (dropping the session
/// aborts it).
#[derive(Debug)]
pub struct SnapshotSession {
    path: PathBuf,
    conn: BufReader<UnixStream>,
}

impl SnapshotSession {
    /// Begins a snapshot of `export` (`root`, `user`, `disk`) served by the agent at
    /// `mountpoint` (its FUSE mountpoint), relative to the parent snapshot `base` (its
    /// manifest key; `None` for a first snapshot).
    ///
    /// # Errors
    /// No agent there, or it refused (a snapshot already running, a rekey, ...).
    pub fn begin(
        mountpoint: &Path,
        export: &str,
        base: Option<&str>,
    ) -> Result<(Self, Begun), SnapshotError> {
        let path = crate::agent::registry::control_path(mountpoint).map_err(|e| {
            SnapshotError::Connect {
                path: mountpoint.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
        Self::begin_at(&path, export, base)
    }

    /// [`SnapshotSession::begin`] on the control socket at `socket`.
    ///
    /// # Errors
    /// As [`SnapshotSession::begin`].
    pub fn begin_at(
        socket: &Path,
        export: &str,
        base: Option<&str>,
    ) -> Result<(Self, Begun), SnapshotError> {
        let conn = UnixStream::connect(socket).map_err(|source| SnapshotError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
        let mut s = Self {
            path: socket.to_path_buf(),
            conn: BufReader::new(conn),
        };
        s.send(&ControlRequest::SnapshotBegin {
            export: Some(export.to_string()),
            base: base.map(str::to_string),
        })?;
        match s.reply()? {
            ControlReply::SnapshotBegun(b) => Ok((s, b)),
            other => Err(s.unexpected(other)),
        }
    }

    /// Reads `chunk` as it was when the session began into `buf` (resized to the chunk's
    /// length). Read each chunk once.
    ///
    /// # Errors
    /// The agent refused (a chunk past the end or read twice, a failed copy), or the
    /// connection failed.
    pub fn read(&mut self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), SnapshotError> {
        self.send(&ControlRequest::SnapshotRead { chunk })?;
        match self.reply()? {
            ControlReply::SnapshotChunk { chunk: c, len } if c == chunk => {
                let len = usize::try_from(len)
                    .ok()
                    .filter(|&l| l as u64 <= crate::snapshot::CHUNK_BYTES)
                    .ok_or_else(|| SnapshotError::Protocol {
                        path: self.path.clone(),
                        why: format!("chunk {chunk} of {len} bytes"),
                    })?;
                buf.clear();
                buf.resize(len, 0);
                self.conn
                    .read_exact(buf)
                    .map_err(|source| SnapshotError::Io {
                        path: self.path.clone(),
                        source,
                    })
            }
            other => Err(self.unexpected(other)),
        }
    }

    /// Ends the session: `Some(manifest key)` once the snapshot is committed (the agent
    /// then tracks changes relative to it), `None` to abort (nothing is lost).
    ///
    /// # Errors
    /// The agent refused (a copy-before-write failed: the snapshot is not consistent and
    /// was aborted), or the connection failed.
    pub fn end(mut self, committed: Option<&str>) -> Result<(), SnapshotError> {
        self.send(&ControlRequest::SnapshotEnd {
            committed: committed.map(str::to_string),
        })?;
        match self.reply()? {
            ControlReply::SnapshotEnded => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }

    fn send(&mut self, req: &ControlRequest) -> Result<(), SnapshotError> {
        let mut line = serde_json::to_vec(req).expect("requests serialize");
        line.push(b'\n');
        self.conn
            .get_mut()
            .write_all(&line)
            .map_err(|source| SnapshotError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn reply(&mut self) -> Result<ControlReply, SnapshotError> {
        let mut line = String::new();
        let n = (&mut self.conn)
            .take(MAX_LINE)
            .read_line(&mut line)
            .map_err(|source| SnapshotError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(SnapshotError::Io {
                path: self.path.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        serde_json::from_str(line.trim_end()).map_err(|e| SnapshotError::Protocol {
            path: self.path.clone(),
            why: format!("bad reply: {e}"),
        })
    }

    fn unexpected(&self, reply: ControlReply) -> SnapshotError {
        match reply {
            ControlReply::Error(e) => SnapshotError::Agent(e),
            other => SnapshotError::Protocol {
                path: self.path.clone(),
                why: format!("{other:?}"),
            },
        }
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
