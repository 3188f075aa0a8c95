//! The FUSE suite over both transports (`SEALVOL_FUSE_TRANSPORT=dev|uring`): fio verify
//! in both cache modes, ext4 on a loop device, detach while fio is busy, SIGTERM, kill -9
//! of the agent then re-attach. The uring run turns the kernel switch
//! (`/sys/module/fuse/parameters/enable_uring`) on for its duration, proves the ring is
//! in use (agent record, ring worker threads, io_uring descriptors, requests answered),
//! and checks that `uring` with the switch off fails the attach with a clear error.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{
    AttachGuard, LoopMount, attach_command, create_volume, detach, fio_verify, is_mounted,
    key_file, privileged_env, run, run_ok, tool_or_skip, wait_until,
};

const SWITCH: &str = "/sys/module/fuse/parameters/enable_uring";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// `sealvol attach` of `vol` at `mnt` under `key` with `SEALVOL_FUSE_TRANSPORT=transport`
/// and an info-level agent log in `log`.
fn attach(
    vol: &Path,
    mnt: &Path,
    key: &Path,
    transport: &str,
    log: &Path,
    extra: &[&str],
) -> Output {
    let mut args = vec!["--log-file", s(log)];
    args.extend_from_slice(extra);
    attach_command(vol, mnt, key, &args)
        .env("SEALVOL_FUSE_TRANSPORT", transport)
        .env("SEALVOL_LOG", "info")
        .output()
        .expect("spawn sealvol attach")
}

fn attach_ok(
    vol: &Path,
    mnt: &Path,
    key: &Path,
    transport: &str,
    log: &Path,
    extra: &[&str],
) -> AttachGuard {
    let out = attach(vol, mnt, key, transport, log, extra);
    assert!(
        out.status.success(),
        "attach ({transport}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    AttachGuard {
        mountpoint: mnt.to_path_buf(),
    }
}

/// The transport is the one asked for, by the agent's record and by its threads and
/// descriptors.
fn assert_transport(mnt: &Path, transport: &str) -> i32 {
    let rec = sealvol::agent::live_at(mnt).expect("agent record");
    assert_eq!(
        rec.fuse_transport.as_deref(),
        Some(transport),
        "agent record"
    );
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", rec.pid))
        .expect("agent tasks")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .collect();
    let ring_threads = threads
        .iter()
        .filter(|c| c.starts_with("fuse-ring-q"))
        .count();
    let rings = std::fs::read_dir(format!("/proc/{}/fd", rec.pid))
        .expect("agent fds")
        .flatten()
        .filter_map(|f| std::fs::read_link(f.path()).ok())
        .filter(|l| l.to_string_lossy().contains("io_uring"))
        .count();
    if transport == "uring" {
        assert!(
            ring_threads >= 2,
            "ring workers for every queue: {threads:?}"
        );
        assert!(
            rings >= ring_threads,
            "an io_uring per ring worker: {rings} < {ring_threads}"
        );
    } else {
        assert_eq!(
            ring_threads, 0,
            "no ring workers with /dev/fuse: {threads:?}"
        );
    }
    rec.pid
}

/// After detach: the agent's log says which transport served, and the ring answered
/// requests when it was the ring.
fn assert_log(log: &Path, transport: &str) {
    let text = std::fs::read_to_string(log).expect("agent log");
    if transport == "uring" {
        let answered = text
            .lines()
            .find_map(|l| l.split("io_uring answered ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no ring count in the log:\n{text}"));
        assert!(answered > 0, "the ring answered requests:\n{text}");
    } else {
        assert!(text.contains("FUSE transport: /dev/fuse"), "{text}");
    }
}

/// Whether any process has `path` open.
fn held_open(path: &Path) -> bool {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .any(|p| {
            std::fs::read_dir(p.path().join("fd"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| std::fs::read_link(f.path()).is_ok_and(|l| l == path))
        })
}

struct Volume {
    _dir: tempfile::TempDir,
    root: PathBuf,
    vol: PathBuf,
    key: PathBuf,
    mnt: PathBuf,
}

fn volume() -> Volume {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let vol = root.join("vol.luks");
    let key = key_file(&root, "key");
    let mnt = root.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    create_volume(&vol, Some(&key), "1");
    Volume {
        _dir: dir,
        root,
        vol,
        key,
        mnt,
    }
}

/// An agent serving a [`Volume`] over one transport, checked to run it.
struct Served {
    guard: AttachGuard,
    log: PathBuf,
    transport: String,
    pid: i32,
}

impl Volume {
    /// Attaches over `transport` with `extra` arguments, the agent's log in
    /// `<name>.log`, and checks that the transport is the one asked for.
    fn serve(&self, transport: &str, name: &str, extra: &[&str]) -> Served {
        let log = self.root.join(format!("{name}.log"));
        let guard = attach_ok(&self.vol, &self.mnt, &self.key, transport, &log, extra);
        let pid = assert_transport(&self.mnt, transport);
        Served {
            guard,
            log,
            transport: transport.to_string(),
            pid,
        }
    }
}

impl Served {
    /// Once the agent has stopped: its log says which transport served.
    fn ended(self) {
        drop(self.guard);
        assert_log(&self.log, &self.transport);
    }
}

fn fio_in_both_cache_modes(v: &Volume, transport: &str) {
    for cache in ["none", "writeback"] {
        let served = v.serve(transport, &format!("fio-{cache}"), &["--cache", cache]);
        let disk = v.mnt.join("disk");
        fio_verify(
            &disk,
            &format!("{transport}-{cache}-4k"),
            "randwrite",
            "4k",
            "16",
        );
        fio_verify(
            &disk,
            &format!("{transport}-{cache}-1m"),
            "write",
            "1M",
            "4",
        );
        detach(&v.mnt);
        served.ended();
    }
}

fn ext4_on_loop(v: &Volume, transport: &str) {
    let served = v.serve(transport, "ext4", &[]);
    let disk = v.mnt.join("disk");
    let fsdir = v.root.join("fs");
    let blob: Vec<u8> = (0..(8u32 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
        .collect();
    let lm = LoopMount::new(&disk, &fsdir, true);
    std::fs::write(fsdir.join("blob"), &blob).expect("write blob");
    run_ok("sync", &[]);
    lm.unmount();
    let fsck = run("e2fsck", &["-fn", s(&disk)]);
    assert!(
        fsck.status.success(),
        "e2fsck -fn ({transport}): {}\n{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let lm = LoopMount::new(&disk, &fsdir, false);
    assert!(
        std::fs::read(fsdir.join("blob")).expect("read blob") == blob,
        "blob intact"
    );
    lm.unmount();
    detach(&v.mnt);
    served.ended();
}

/// fio keeps a loop device over the served file busy while detach runs: detach waits
/// for the loop to be let go, fio's I/O keeps being answered meanwhile, then the agent
/// (and its ring workers) stop.
fn detach_while_busy(v: &Volume, transport: &str) {
    let served = v.serve(transport, "busy", &[]);
    let pid = served.pid;
    let disk = v.mnt.join("disk");
    let dev = run_ok("losetup", &["-f", "--show", "--direct-io=on", s(&disk)])
        .trim()
        .to_string();
    let fio = Command::new(common::which("fio").expect("fio"))
        .args([
            "--name=busy",
            &format!("--filename={dev}"),
            "--rw=randrw",
            "--bs=4k",
            "--iodepth=16",
            "--ioengine=libaio",
            "--direct=1",
            "--size=256M",
            "--time_based",
            "--runtime=4",
            "--thread",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    let dev_path = PathBuf::from(&dev);
    wait_until("fio opens the loop device", Duration::from_secs(20), || {
        held_open(&dev_path)
    });
    let detached = run("sealvol", &["detach", "--mountpoint", s(&v.mnt)]);
    let fio = fio.wait_with_output().expect("fio");
    assert!(
        fio.status.success(),
        "fio while detaching ({transport}): {}",
        String::from_utf8_lossy(&fio.stderr)
    );
    assert!(
        detached.status.success(),
        "detach waits for the busy loop ({transport}): {}",
        String::from_utf8_lossy(&detached.stderr)
    );
    wait_until("the agent exits", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    assert!(!is_mounted(&v.mnt));
    served.ended();
}

fn kill_9_then_reattach(v: &Volume, transport: &str) {
    let served = v.serve(transport, "kill", &[]);
    let pid = served.pid;
    let disk = v.mnt.join("disk");
    let blob: Vec<u8> = (0..(4u32 << 20))
        .map(|i| (i.wrapping_mul(40_503) >> 7).to_le_bytes()[0])
        .collect();
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .expect("open disk");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.write_all(&blob).expect("write");
        f.sync_all().expect("fsync");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the agent");
    wait_until("the agent is gone", Duration::from_secs(20), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    // The dead mount is cleaned up by detach.
    let _ = run("sealvol", &["detach", "--mountpoint", s(&v.mnt)]);
    wait_until("dead FUSE mount gone", Duration::from_secs(10), || {
        !is_mounted(&v.mnt)
    });
    drop(served);

    let served = v.serve(transport, "reattach", &[]);
    let mut back = vec![0u8; blob.len()];
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&disk).expect("open disk");
        f.seek(SeekFrom::Start(3 << 20)).expect("seek");
        f.read_exact(&mut back).expect("read");
    }
    assert!(
        back == blob,
        "data written and fsynced before kill -9 is intact"
    );
    detach(&v.mnt);
    served.ended();
}

/// SIGTERM: the agent's bounded teardown unmounts, the ring workers see the aborted
/// connection and the agent exits.
fn sigterm_stops(v: &Volume, transport: &str) {
    let served = v.serve(transport, "term", &[]);
    let pid = served.pid;
    std::fs::metadata(v.mnt.join("disk")).expect("stat disk");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the agent");
    wait_until(
        "the agent exits on SIGTERM",
        Duration::from_secs(30),
        || !Path::new(&format!("/proc/{pid}")).exists(),
    );
    assert!(!is_mounted(&v.mnt), "SIGTERM unmounts");
    served.ended();
}

fn suite(transport: &str) {
    let v = volume();
    fio_in_both_cache_modes(&v, transport);
    ext4_on_loop(&v, transport);
    detach_while_busy(&v, transport);
    sigterm_stops(&v, transport);
    kill_9_then_reattach(&v, transport);
}

fn prerequisites(test: &str) -> bool {
    privileged_env(test) && tool_or_skip(test, "fio") && tool_or_skip(test, "e2fsck")
}

#[test]
fn dev_transport_serves_the_fuse_suite() {
    if !prerequisites("dev_transport_serves_the_fuse_suite") {
        return;
    }
    suite("dev");
}

/// Sets the kernel switch for FUSE over io_uring; puts the old value back when dropped.
struct UringSwitch {
    previous: String,
}

impl UringSwitch {
    /// `None` (after saying why) when the kernel has no switch; under CI that fails.
    fn take(test: &str) -> Option<Self> {
        match std::fs::read_to_string(SWITCH) {
            Ok(previous) => Some(Self {
                previous: previous.trim().to_string(),
            }),
            Err(e) => {
                assert!(
                    std::env::var("CI").as_deref() != Ok("true"),
                    "{test}: {SWITCH}: {e} (CI=true: the kernel must have CONFIG_FUSE_IO_URING)"
                );
                eprintln!(
                    "SKIPPED {test}: {SWITCH}: {e} (kernel without FUSE over io_uring; not in CI)"
                );
                None
            }
        }
    }

    fn set(&self, on: bool) {
        std::fs::write(SWITCH, if on { "Y" } else { "N" }).expect("write the enable_uring switch");
    }
}

impl Drop for UringSwitch {
    fn drop(&mut self) {
        let _ = std::fs::write(SWITCH, &self.previous);
    }
}

#[test]
fn uring_transport_serves_the_fuse_suite() {
    let test = "uring_transport_serves_the_fuse_suite";
    if !prerequisites(test) {
        return;
    }
    let Some(switch) = UringSwitch::take(test) else {
        return;
    };

    // Switch off: `uring` refuses to attach and says which switch to turn; `auto` falls
    // back to /dev/fuse.
    switch.set(false);
    let v = volume();
    let log = v.root.join("off.log");
    let out = attach(&v.vol, &v.mnt, &v.key, "uring", &log, &[]);
    assert!(!out.status.success(), "uring with the switch off must fail");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(SWITCH), "the error names the switch: {err}");
    assert!(!is_mounted(&v.mnt));
    let guard = attach_ok(&v.vol, &v.mnt, &v.key, "auto", &log, &[]);
    assert_transport(&v.mnt, "dev");
    detach(&v.mnt);
    drop(guard);
    let bad = attach(&v.vol, &v.mnt, &v.key, "fast", &log, &[]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("dev, uring or auto"));

    switch.set(true);
    let guard = attach_ok(&v.vol, &v.mnt, &v.key, "auto", &log, &[]);
    assert_transport(&v.mnt, "uring");
    detach(&v.mnt);
    drop(guard);
    suite("uring");
}
