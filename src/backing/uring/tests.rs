//! The engine against real files and pipes: a read on an empty pipe stays in flight until
//! the test writes to it, which makes "many in flight", back-pressure and drop-drains
//! observable without timing.

use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;

use super::*;

fn engine(depth: usize) -> IoEngine {
    IoEngine::new(depth).expect("io_uring (kernel.io_uring_disabled must be 0)")
}

fn pipe() -> (Arc<File>, File) {
    let (r, w) = nix::unistd::pipe().expect("pipe");
    (Arc::new(File::from(r)), File::from(w))
}

fn pattern(seed: u8, len: usize) -> AlignedBuf {
    let mut b = AlignedBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        // Wraps on purpose: a pattern.
        #[allow(clippy::cast_possible_truncation)]
        let v = (i as u8).wrapping_mul(31).wrapping_add(seed);
        *x = v;
    }
    b
}

type Outcome = (AlignedBuf, io::Result<()>);

fn read(file: &Arc<File>, offset: u64, len: usize) -> IoRequest {
    IoRequest {
        kind: IoKind::Read,
        file: Arc::clone(file),
        offset,
        buf: AlignedBuf::zeroed(len),
    }
}

fn submit_to(e: &IoEngine, req: IoRequest, tx: &mpsc::Sender<Outcome>) {
    let tx = tx.clone();
    e.submit(req, move |buf, r| {
        tx.send((buf, r)).expect("receiver alive")
    });
}

#[test]
fn advance_resubmits_short_transfers_and_reports_errors() {
    let mut moved = 0;
    assert!(matches!(
        advance(IoKind::Read, 8192, &mut moved, 4096),
        Step::Again
    ));
    assert_eq!(moved, 4096);
    assert!(matches!(
        advance(IoKind::Read, 8192, &mut moved, -libc::EINTR),
        Step::Again
    ));
    assert!(matches!(
        advance(IoKind::Read, 8192, &mut moved, 4096),
        Step::Done(Ok(()))
    ));
    let mut moved = 512;
    match advance(IoKind::Write, 4096, &mut moved, 0) {
        Step::Done(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::WriteZero),
        other => panic!("a write moving nothing is an error, got {other:?}"),
    }
    match advance(IoKind::Read, 4096, &mut moved, -libc::EIO) {
        Step::Done(Err(e)) => assert_eq!(e.raw_os_error(), Some(libc::EIO)),
        other => panic!("EIO is reported, got {other:?}"),
    }
}

#[test]
fn many_requests_in_flight_at_once() {
    let e = engine(32);
    let (tx, rx) = mpsc::channel();
    let pipes: Vec<_> = (0..16).map(|_| pipe()).collect();
    for (r, _) in &pipes {
        submit_to(&e, read(r, 0, 4096), &tx);
    }
    assert_eq!(
        e.in_flight(),
        16,
        "sixteen reads wait on empty pipes together"
    );
    for (i, (_, w)) in pipes.iter().enumerate() {
        let mut w = w;
        w.write_all(&pattern(u8::try_from(i).expect("< 16"), 4096))
            .expect("write pipe");
    }
    let mut seen: Vec<u8> = (0..16)
        .map(|_| {
            let (buf, r) = rx.recv().expect("every callback runs");
            r.expect("read");
            buf[0]
        })
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<u8>>());
    e.drain();
    assert_eq!(e.in_flight(), 0);
}

#[test]
fn file_round_trip_from_many_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = Arc::new(
        File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.path().join("f"))
            .expect("create"),
    );
    let e = Arc::new(engine(8));
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for t in 0..4u8 {
            let (e, file, tx) = (Arc::clone(&e), Arc::clone(&file), tx.clone());
            s.spawn(move || {
                for i in 0..32u8 {
                    let n = u64::from(t) * 32 + u64::from(i);
                    let req = IoRequest {
                        kind: IoKind::Write,
                        file: Arc::clone(&file),
                        offset: n * 8192,
                        buf: pattern(t ^ i, 8192),
                    };
                    submit_to(&e, req, &tx);
                }
            });
        }
    });
    for _ in 0..128 {
        rx.recv().expect("callback").1.expect("write");
    }
    for t in 0..4u8 {
        for i in 0..32u8 {
            let n = u64::from(t) * 32 + u64::from(i);
            submit_to(&e, read(&file, n * 8192, 8192), &tx);
            let (buf, r) = rx.recv().expect("callback");
            r.expect("read");
            assert_eq!(&buf[..], &pattern(t ^ i, 8192)[..], "block {n}");
        }
    }
}

#[test]
fn a_short_read_is_resubmitted_until_the_end_of_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    std::fs::write(&path, &pattern(7, 6144)[..]).expect("write");
    let file = Arc::new(File::open(&path).expect("open"));
    let e = engine(4);
    let (tx, rx) = mpsc::channel();
    // The first read returns 6144 of 8192 bytes; the resubmitted one meets the end.
    submit_to(&e, read(&file, 0, 8192), &tx);
    let (buf, r) = rx.recv().expect("callback");
    let err = r.expect_err("past the end of the file");
    assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    assert!(err.to_string().contains("6144 of 8192"), "{err}");
    assert_eq!(&buf[..6144], &pattern(7, 6144)[..]);
    // A read within the file is whole.
    submit_to(&e, read(&file, 2048, 4096), &tx);
    let (buf, r) = rx.recv().expect("callback");
    r.expect("read");
    assert_eq!(&buf[..], &pattern(7, 6144)[2048..]);
}

#[test]
fn errors_reach_the_callback() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    std::fs::write(&path, [1u8; 4096]).expect("write");
    let read_only = Arc::new(File::open(&path).expect("open"));
    let e = engine(4);
    let (tx, rx) = mpsc::channel();
    let req = IoRequest {
        kind: IoKind::Write,
        file: Arc::clone(&read_only),
        offset: 0,
        buf: pattern(1, 4096),
    };
    submit_to(&e, req, &tx);
    let (_, r) = rx.recv().expect("callback");
    assert_eq!(
        r.expect_err("a read-only descriptor").raw_os_error(),
        Some(libc::EBADF)
    );
    let mut back = [0u8; 4096];
    read_only.read_exact_at(&mut back, 0).expect("read");
    assert_eq!(back, [1u8; 4096], "nothing was written");
}

#[test]
fn submitters_wait_beyond_the_depth() {
    let e = Arc::new(engine(2));
    let (tx, rx) = mpsc::channel();
    let (r1, mut w1) = pipe();
    let (r2, w2) = pipe();
    let (r3, mut w3) = pipe();
    submit_to(&e, read(&r1, 0, 16), &tx);
    submit_to(&e, read(&r2, 0, 16), &tx);
    let admitted = Arc::new(AtomicUsize::new(0));
    let third = {
        let (e, tx, admitted) = (Arc::clone(&e), tx.clone(), Arc::clone(&admitted));
        std::thread::spawn(move || {
            submit_to(&e, read(&r3, 0, 16), &tx);
            admitted.store(1, Ordering::SeqCst);
        })
    };
    // Nothing can complete, so the third submitter must still be waiting.
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(admitted.load(Ordering::SeqCst), 0, "depth 2 admits two");
    assert_eq!(e.in_flight(), 2);
    w1.write_all(&[1; 16]).expect("write");
    third.join().expect("third submitter");
    assert_eq!(admitted.load(Ordering::SeqCst), 1);
    w3.write_all(&[3; 16]).expect("write");
    let mut firsts = [rx.recv().expect("cb").0[0], rx.recv().expect("cb").0[0]];
    firsts.sort_unstable();
    assert_eq!(firsts, [1, 3]);
    drop(w2); // the pipe's last writer: the second read ends (EOF: 0 bytes)
    let (_, r) = rx.recv().expect("callback");
    assert_eq!(r.expect_err("0 bytes").kind(), io::ErrorKind::UnexpectedEof);
}

#[test]
fn drop_waits_for_every_request_and_calls_each_back_once() {
    let e = engine(16);
    let calls = Arc::new(AtomicUsize::new(0));
    let pipes: Vec<_> = (0..8).map(|_| pipe()).collect();
    for (r, _) in &pipes {
        let calls = Arc::clone(&calls);
        e.submit(read(r, 0, 64), move |_, r| {
            r.expect("read");
            calls.fetch_add(1, Ordering::SeqCst);
        });
    }
    let dropper = std::thread::spawn(move || drop(e));
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(!dropper.is_finished(), "drop waits for reads in flight");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    for (_, w) in &pipes {
        let mut w = w;
        w.write_all(&[9; 64]).expect("write");
    }
    dropper.join().expect("drop returns once drained");
    assert_eq!(calls.load(Ordering::SeqCst), 8, "each callback ran once");
}

#[test]
fn backing_io_names() {
    assert_eq!("sync".parse::<BackingIo>().expect("sync"), BackingIo::Sync);
    assert_eq!(
        "uring".parse::<BackingIo>().expect("uring"),
        BackingIo::Uring
    );
    assert_eq!("auto".parse::<BackingIo>().expect("auto"), BackingIo::Auto);
    let err = "aio".parse::<BackingIo>().expect_err("unknown");
    assert!(err.to_string().contains(BACKING_IO_ENV), "{err}");
    assert!(IoEngine::available());
}
