//! Shared helpers for integration tests that need root, /dev/fuse and loop devices.
#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The sealvol binary built for this test run.
pub fn sealvol_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_sealvol"))
}

/// Returns false (after saying why) when the environment cannot run mount tests.
/// Under CI=true a missing prerequisite is a failure, never a skip.
pub fn privileged_env(test: &str) -> bool {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root".to_string());
    }
    if !Path::new("/dev/fuse").exists() {
        missing.push("/dev/fuse".to_string());
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount"] {
        if which(tool).is_none() {
            missing.push(tool.to_string());
        }
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!("{test}: needs {}", missing.join(", "));
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true: skipping is a failure)");
    }
    eprintln!("SKIPPED {msg} (not in CI, so skipping)");
    false
}

/// Finds a tool on PATH or in the sbin directories.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Runs a command; panics with its output if it fails.
pub fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its output.
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let exe = if cmd == "sealvol" {
        sealvol_bin()
    } else {
        which(cmd).unwrap_or_else(|| PathBuf::from(cmd))
    };
    Command::new(&exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"))
}

/// Polls `cond` until true or the deadline passes.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether something is mounted at `path`.
/// `sealvol detach --mountpoint MNT`, then waits for the FUSE mount to go.
pub fn detach(mnt: &Path) {
    run_ok(
        "sealvol",
        &["detach", "--mountpoint", mnt.to_str().expect("utf8")],
    );
    wait_until("FUSE unmounted", Duration::from_secs(10), || {
        !is_mounted(mnt)
    });
}

pub fn is_mounted(path: &Path) -> bool {
    let canon = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(canon.to_str().unwrap_or("")))
}

/// Writes a random 64-byte key file and returns its path.
pub fn key_file(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let mut k = [0u8; 64];
    loop {
        rand::fill(&mut k[..]);
        if k[..32] != k[32..] {
            break;
        }
    }
    std::fs::write(&p, k).expect("write key");
    p
}

/// Detaches (best effort) when dropped, so a failing test leaves no mounts behind.
pub struct AttachGuard {
    pub mountpoint: PathBuf,
}

impl Drop for AttachGuard {
    fn drop(&mut self) {
        if is_mounted(&self.mountpoint) {
            let _ = run(
                "sealvol",
                &[
                    "detach",
                    "--mountpoint",
                    self.mountpoint.to_str().unwrap_or(""),
                ],
            );
        }
    }
}

/// A loop device with an ext4 filesystem mounted on it; torn down on drop.
pub struct LoopMount {
    pub dev: String,
    pub dir: PathBuf,
}

impl LoopMount {
    pub fn new(file: &Path, dir: &Path, mkfs: bool) -> Self {
        // As the WorkSpaces agent attaches volumes (src/controller/agent.rs).
        let dev = run_ok(
            "losetup",
            &[
                "-f",
                "--show",
                "--direct-io=on",
                file.to_str().expect("utf8"),
            ],
        )
        .trim()
        .to_string();
        let lm = Self {
            dev,
            dir: dir.to_path_buf(),
        };
        if mkfs {
            run_ok("mkfs.ext4", &["-q", "-F", &lm.dev]);
        }
        std::fs::create_dir_all(dir).expect("mkdir");
        run_ok("mount", &[&lm.dev, dir.to_str().expect("utf8")]);
        lm
    }

    pub fn unmount(self) {
        run_ok("umount", &[self.dir.to_str().expect("utf8")]);
        run_ok("losetup", &["-d", &self.dev]);
        std::mem::forget(self);
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = run("umount", &[self.dir.to_str().unwrap_or("")]);
        let _ = run("losetup", &["-d", &self.dev]);
    }
}

/// `sealvol create-volume` at `vol` of `gib` GiB: under the key in `key`, or unencrypted.
pub fn create_volume(vol: &Path, key: Option<&Path>, gib: &str) {
    create_volume_with(vol, key, gib, &[]);
}

/// `create_volume` with `extra` arguments (e.g. `--sector-size 512`).
pub fn create_volume_with(vol: &Path, key: Option<&Path>, gib: &str, extra: &[&str]) {
    let mut args = vec![
        "create-volume",
        "--path",
        vol.to_str().expect("utf8"),
        "--size-gib",
        gib,
    ];
    match key {
        Some(k) => args.extend(["--volume-key-file", k.to_str().expect("utf8")]),
        None => args.push("--unencrypted"),
    }
    args.extend_from_slice(extra);
    run_ok("sealvol", &args);
}

/// fio with crc32c verification (`--verify_fatal`), 64 MiB, libaio, O_DIRECT, on `file`.
pub fn fio_verify(file: &Path, name: &str, rw: &str, bs: &str, iodepth: &str) {
    let out = run(
        "fio",
        &[
            &format!("--name={name}"),
            &format!("--filename={}", file.display()),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            &format!("--iodepth={iodepth}"),
            "--ioengine=libaio",
            "--direct=1",
            "--size=64M",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--output-format=json",
        ],
    );
    assert!(
        out.status.success(),
        "fio {name}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let job = &json["jobs"][0];
    assert_eq!(job["error"], 0, "fio {name} error");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 64 << 20,
        "fio {name} wrote everything"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 64 << 20,
        "fio {name} verified everything"
    );
}

/// The `sealvol attach` command for the encrypted volume `vol` under `key` at `mnt`, with
/// `extra` arguments, for a caller to add its environment and run.
pub fn attach_command(vol: &Path, mnt: &Path, key: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(sealvol_bin());
    cmd.args([
        "attach",
        "--path",
        vol.to_str().expect("utf8"),
        "--mountpoint",
        mnt.to_str().expect("utf8"),
        "--volume-key-file",
        key.to_str().expect("utf8"),
    ])
    .args(extra);
    cmd
}

/// `sealvol attach` of the encrypted volume `vol` under `key` at `mnt`, with `extra`
/// arguments; panics when it fails.
pub fn attach_encrypted(vol: &Path, mnt: &Path, key: &Path, extra: &[&str]) {
    let out = attach_command(vol, mnt, key, extra)
        .output()
        .expect("spawn sealvol attach");
    assert!(
        out.status.success(),
        "sealvol attach {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `tool` is installed; outside CI a missing tool skips `test` (after saying
/// so), under CI=true it is a failure.
pub fn tool_or_skip(test: &str, tool: &str) -> bool {
    if which(tool).is_some() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: {tool} missing in CI"
    );
    eprintln!("SKIPPED {test}: {tool} not installed (not in CI)");
    false
}
