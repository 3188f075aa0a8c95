//! Snapshot sessions through a real control socket, over tracked devices on volume files.

use std::sync::Arc;

use super::*;
use crate::agent::control::ControlServer;
use crate::agent::snapshot::tracker::tests::{CHUNKS, DATA_OFFSET, SIZE, tracked, volume};
use crate::secret::VolumeKey;
use crate::snapshot::CHUNK_BYTES;
use crate::snapshot::dirty::DirtyMap;

struct Agent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    path: PathBuf,
    device: Arc<crate::device::Device>,
    tracker: Arc<ChunkTracker>,
    server: ControlServer,
}

fn agent() -> Agent {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = VolumeKey::generate();
    let path = volume(dir.path(), &key, 0x42);
    DirtyMap::reset(&path, CHUNKS, "s0").expect("reset");
    let (device, tracker) = tracked(&path, &key);
    let socket = dir.path().join("agent.sock");
    let server = ControlServer::spawn(
        &socket,
        vec![("disk".into(), device.clone())],
        vec![tracker.clone()],
    )
    .expect("control server");
    Agent {
        _dir: dir,
        socket,
        path,
        device,
        tracker,
        server,
    }
}

fn chunk_at(file: &[u8], chunk: u64) -> &[u8] {
    let start = usize::try_from(chunk * CHUNK_BYTES).expect("small");
    let end = (start + usize::try_from(CHUNK_BYTES).expect("small")).min(file.len());
    &file[start..end]
}

#[test]
fn session_reads_the_changed_chunks_as_at_begin_and_commits() {
    let a = agent();
    a.device.write(100, &[1; 5000]).expect("write"); // file chunk 1
    let (mut s, begun) = SnapshotSession::begin_at(&a.socket, "disk", Some("s0")).expect("begin");
    assert_eq!(
        begun,
        Begun {
            chunk_bytes: CHUNK_BYTES,
            chunks: CHUNKS,
            file_size: DATA_OFFSET + SIZE,
            changed: Some(vec![0, 1]),
        }
    );
    let at_begin = std::fs::read(&a.path).expect("copy at begin");
    a.device.write(0, &[2; 4096]).expect("write after begin");
    let mut buf = Vec::new();
    for &chunk in begun.changed.as_ref().expect("changed") {
        s.read(chunk, &mut buf).expect("read");
        assert!(
            buf == chunk_at(&at_begin, chunk),
            "chunk {chunk} as at begin"
        );
    }
    // A second session is refused while this one runs.
    let err = SnapshotSession::begin_at(&a.socket, "disk", None).expect_err("second");
    assert_eq!(
        err.to_string(),
        "the agent refused: a snapshot of disk is already running; wait for it to finish"
    );
    // A refused read keeps the session going.
    assert!(matches!(s.read(1, &mut buf), Err(SnapshotError::Agent(_))));
    s.end(Some("s1")).expect("end");
    assert_eq!(a.tracker.base().as_deref(), Some("s1"));
    assert_eq!(a.tracker.dirty_chunks(), vec![1]);
    a.server.shutdown();
    a.tracker.close().expect("close");
    assert_eq!(
        DirtyMap::load_changes(&a.path).expect("changes"),
        crate::snapshot::dirty::Changes::Since {
            base: "s1".into(),
            chunks: vec![1]
        }
    );
}

#[test]
fn dropped_connection_aborts_the_view() {
    let a = agent();
    a.device.write(2 * CHUNK_BYTES, &[1; 4096]).expect("write"); // file chunk 3
    let (mut s, begun) = SnapshotSession::begin_at(&a.socket, "disk", Some("s0")).expect("begin");
    assert_eq!(begun.changed, Some(vec![0, 3]));
    let mut buf = Vec::new();
    s.read(3, &mut buf).expect("read");
    drop(s); // the controller dies mid-snapshot
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while a.tracker.snapshot_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not abort the view"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(a.tracker.base().as_deref(), Some("s0"));
    assert_eq!(a.tracker.dirty_chunks(), vec![0, 3], "nothing lost");
    let (s, begun) = SnapshotSession::begin_at(&a.socket, "disk", Some("s0")).expect("again");
    assert_eq!(begun.changed, Some(vec![0, 3]));
    s.end(None).expect("abort");
    a.server.shutdown();
}

#[test]
fn requests_out_of_a_session_and_unknown_exports_are_refused() {
    let a = agent();
    let err = SnapshotSession::begin_at(&a.socket, "root", None).expect_err("no such export");
    assert!(
        err.to_string().contains("serves no file named \"root\""),
        "{err}"
    );
    let mut conn = UnixStream::connect(&a.socket).expect("connect");
    conn.write_all(b"{\"op\":\"snapshot-read\",\"chunk\":0}\n")
        .expect("send");
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).expect("reply");
    assert!(line.contains("send snapshot-begin first"), "{line}");
    a.server.shutdown();
}
