"""Every sealvol process that may hold a plaintext data key is hardened before it touches
one (src/secret.rs harden_process): not dumpable (no core file, /proc/PID/mem and ptrace
closed to its own user) and RLIMIT_CORE 0. Before the fix only the attach agent and the
offline rekey were; create-volume, the online rekey client and the WorkSpace verbs
(create/reboot/rebuild/start/restore-workspace(s), rekey-volume, rewrap-volume) that
unwrap data keys were not.

Observed from outside on a real process: each verb runs as uid 65534 and is held at the
point where it would read a key (a key file that is a FIFO nobody writes yet) or open
its state (controller.db is a FIFO). Linux shows the files in a non-dumpable process's
/proc/PID (not the directory itself) as owned by root; a dumpable one's as its user's."""

import os
import resource
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.paths import SEALVOL_BIN

NOBODY = 65534


def as_nobody():
    # Make a core limit of 0 something the verb itself must set.
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def hardened(pid):
    """(not dumpable, core limit 0) as seen in /proc, or None once the process is gone."""
    try:
        owner = os.stat(f"/proc/{pid}/status").st_uid
        limits = Path(f"/proc/{pid}/limits").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    core = next(l for l in limits.splitlines() if l.startswith("Max core file size")).split()[4:6]
    return owner == 0, core == ["0", "0"]


def wait_hardened(proc, timeout=20.0):
    """Polls until the process shows both marks; returns the last observation."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return seen, proc
        now = hardened(proc.pid)
        if now is not None:
            seen = now
            if now == (True, True):
                return seen, proc
        time.sleep(0.02)
    return seen, proc


@pytest.fixture
def nobody_dir():
    """A directory of uid 65534 it can reach (pytest's tmp_path is under a 0700 dir)."""
    if os.geteuid() != 0:
        skip_or_fail("needs root to run the verb as another user (uid 65534)")
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}")
    with tempfile.TemporaryDirectory(prefix="sealvol-nobody-") as top:
        Path(top).chmod(0o755)
        d = Path(top) / "nobody"
        d.mkdir()
        os.chown(d, NOBODY, NOBODY)
        yield d


def spawn(args, env=None):
    return subprocess.Popen([str(SEALVOL_BIN), *map(str, args)], preexec_fn=as_nobody,
                            env=dict(os.environ, **(env or {})), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def fifo(path: Path):
    os.mkfifo(path, 0o600)
    os.chown(path, NOBODY, NOBODY)
    return path


def key_bytes():
    raw = bytearray(os.urandom(64))
    raw[32:] = bytes(b ^ 0x3C for b in raw[:32])
    return bytes(raw)


def check(proc, what):
    try:
        seen, _ = wait_hardened(proc)
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"{what}: exited ({proc.returncode}) before it was seen hardened "
                        f"(last seen {seen}): {err.decode(errors='replace')}")
        assert seen == (True, True), f"{what}: (not dumpable, core limit 0) = {seen}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_create_volume_is_hardened_before_it_reads_the_key(nobody_dir):
    key = fifo(nobody_dir / "key")
    proc = spawn(["create-volume", "--path", nobody_dir / "vol", "--size-gib", "1",
                  "--volume-key-file", key])
    try:
        seen, _ = wait_hardened(proc)
        assert proc.poll() is None and seen == (True, True), f"create-volume: {seen}"
        with open(key, "wb") as f:  # now hand it the key: it goes on and succeeds
            f.write(key_bytes())
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert stat.S_IMODE((nobody_dir / "vol").stat().st_mode) == 0o600
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_online_rekey_client_is_hardened_before_it_reads_the_new_key(nobody_dir):
    mnt = nobody_dir / "mnt"
    mnt.mkdir()
    os.chown(mnt, NOBODY, NOBODY)
    key = fifo(nobody_dir / "new.key")
    proc = spawn(["rekey-volume", "--mountpoint", mnt, "--new-volume-key-file", key],
                 env={"SEALVOL_RUNTIME_DIR": str(nobody_dir / "run")})
    check(proc, "rekey-volume --mountpoint")


WORKSPACE_VERBS = {
    "create-workspaces": ["--directory-id", "d-906734f0a1", "--user-name", "alice", "--bundle-id", "wsb-x",
                          "--user-volume-encryption-enabled"],
    "start-workspaces": ["--workspace-ids", "ws-0123456789"],
    "reboot-workspaces": ["--workspace-ids", "ws-0123456789"],
    "rebuild-workspaces": ["--workspace-ids", "ws-0123456789"],
    "restore-workspace": ["--workspace-id", "ws-0123456789"],
    "rekey-volume": ["--workspace-id", "ws-0123456789"],
    "rewrap-volume": ["--workspace-id", "ws-0123456789", "--volume-encryption-key", "alias/other"],
}


@pytest.mark.parametrize("verb", sorted(WORKSPACE_VERBS))
def test_workspace_verbs_that_unwrap_keys_are_hardened(nobody_dir, verb):
    state = nobody_dir / "state"
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    fifo(state / "controller.db")  # holds the verb where it opens its state
    proc = spawn([verb, *WORKSPACE_VERBS[verb], "--state-dir", state])
    check(proc, verb)
