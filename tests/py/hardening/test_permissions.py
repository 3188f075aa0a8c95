"""Permissions of every file sealvol and kms-daemon write (docs/threat-model.md §4):
keys, databases, credentials, audit log and volume files are 0600 (no group/other bits);
state directories 0700; FUSE mounts are private (no allow_other; nosuid, nodev, noexec;
root 0700, volume files 0600) and mountpoints are not world-writable; the attach agent
cannot dump core."""

import functools
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.paths import SEALVOL_BIN
from sealvol_testing.sealvol import run_sealvol
from sealvol_testing.kms import Daemon


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def private_tree(root: Path):
    """Every file under `root` without group/other bits; every directory 0700."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if mode(d) & 0o077:
            bad.append(f"{d} {oct(mode(d))}")
        for name in filenames:
            p = d / name
            if p.is_socket():
                continue
            if mode(p) & 0o077:
                bad.append(f"{p} {oct(mode(p))}")
    return bad


def test_kms_daemon_state_is_private(tmp_path):
    os.umask(0o022)  # the usual umask: the daemon must not depend on a strict one
    d = Daemon(tmp_path / "state").start()
    try:
        status, body = d.raw("TrentService.CreateKey", {"Description": "perm"})
        assert status == 200, body
        state = d.state_dir
        names = {p.name for p in state.iterdir()}
        for must in ("kms.db", "root.key", "credentials", "config", "audit.log"):
            assert must in names, must
        assert mode(state) == 0o700, oct(mode(state))
        for name in ("kms.db", "root.key", "credentials", "audit.log"):
            assert mode(state / name) == 0o600, f"{name} is {oct(mode(state / name))}"
        assert private_tree(state) == []
        ready = tmp_path / "state.ready"
        assert mode(ready) & 0o077 == 0, f"ready file {oct(mode(ready))}"
        # Key material never reaches a core file.
        limits = Path(f"/proc/{d.proc.pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core
    finally:
        assert d.stop() == 0


def test_sealvol_volume_mount_and_agent_are_private(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root for a FUSE mount")
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}")
    os.umask(0o022)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(tmp_path / "run"))
    vol, key, mnt = tmp_path / "vol.luks", tmp_path / "key", tmp_path / "mnt"
    raw = bytearray(os.urandom(64))
    raw[32:] = bytes(b ^ 0xA5 for b in raw[:32])
    key.write_bytes(bytes(raw))
    key.chmod(0o600)
    mnt.mkdir(mode=0o755)

    sv = functools.partial(run_sealvol, env)

    sv("create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    assert mode(vol) == 0o600, f"volume file {oct(mode(vol))}"
    sv("attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", key)
    try:
        with open("/proc/self/mounts") as f:
            entry = next(l.split() for l in f if l.split()[1] == str(mnt))
        opts = entry[3].split(",")
        assert entry[2].startswith("fuse"), entry
        for o in ("nosuid", "nodev", "noexec"):
            assert o in opts, f"FUSE mount lacks {o}: {opts}"
        assert "allow_other" not in opts, f"FUSE mount allows other users: {opts}"
        assert mode(mnt) & 0o002 == 0, f"mountpoint world-writable: {oct(mode(mnt))}"
        assert mode(mnt) & 0o077 == 0, f"FUSE root {oct(mode(mnt))}"
        assert mode(mnt / "disk") == 0o600, f"volume file in the mount {oct(mode(mnt / 'disk'))}"
        # The agent's record names volume paths only; it must not be writable by others,
        # and the agent must not dump core (it holds the data key).
        run = tmp_path / "run"
        assert mode(run) & 0o022 == 0, f"runtime dir {oct(mode(run))}"
        records = list(run.rglob("*"))
        assert records, "attach wrote no agent record"
        pid = None
        for r in records:
            if r.is_file():
                assert mode(r) & 0o022 == 0, f"{r} {oct(mode(r))}"
                text = r.read_text()
                assert key.read_bytes().hex() not in text
                pid = json.loads(text).get("pid", pid)
        assert pid, "agent record without a pid"
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(l for l in limits.splitlines() if l.startswith("Max core file size"))
        assert core.split()[4] == "0", f"agent may dump core: {core}"
    finally:
        sv("detach", "--mountpoint", mnt)
    assert mode(vol) == 0o600


def test_controller_state_is_private(tmp_path):
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}")
    os.umask(0o022)
    state = tmp_path / "sealvol-state"
    p = subprocess.run([str(SEALVOL_BIN), "register-directory", "--directory-id", "d-906734f0a1", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert mode(state / "controller.db") == 0o600
    assert private_tree(state) == []


# A state directory that existed before start (made by an installer, a careless
# `mkdir -p`, or another user) must not keep its 0755: each program makes its own 0700,
# and refuses one that belongs to somebody else.


def test_kms_daemon_state_dir_that_existed_is_made_private(tmp_path):
    os.umask(0o022)
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    d = Daemon(state).start()
    try:
        assert mode(state) == 0o700, f"pre-existing state dir kept {oct(mode(state))}"
        assert private_tree(state) == []
    finally:
        assert d.stop() == 0


def test_kms_daemon_refuses_a_state_dir_of_another_user(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root to chown the state dir to another user")
    from sealvol_testing.kms import DAEMON_BIN

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chown(state, 65534, 65534)
    p = subprocess.Popen([str(DAEMON_BIN), "--state-dir", str(state), "--listen", "127.0.0.1:0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail("the daemon started (and kept running) in a directory owned by uid 65534")
    assert p.returncode != 0, "the daemon started in a directory owned by uid 65534"
    assert "owned by uid 65534" in err, err
    assert list(state.iterdir()) == [], "the daemon wrote into a foreign directory"
    assert mode(state) == 0o755


def test_controller_state_dirs_that_existed_are_made_private(tmp_path):
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}")
    os.umask(0o022)
    state = tmp_path / "sealvol-state"
    for sub in ("", "volumes", "bundles", "snapshots", "images", "agents", "fuse", "mnt"):
        (state / sub).mkdir(mode=0o755, exist_ok=True)
        (state / sub).chmod(0o755)
    p = subprocess.run([str(SEALVOL_BIN), "register-directory", "--directory-id", "d-906734f0a1", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert mode(state) == 0o700
    assert private_tree(state) == []


def test_controller_refuses_a_state_dir_of_another_user(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root to chown the state dir to another user")
    state = tmp_path / "sealvol-state"
    state.mkdir(mode=0o755)
    os.chown(state, 65534, 65534)
    p = subprocess.run([str(SEALVOL_BIN), "register-directory", "--directory-id", "d-906734f0a1", "--state-dir", str(state)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0, "the controller used a directory owned by uid 65534"
    assert "owned by uid 65534" in p.stderr, p.stderr
    assert not (state / "controller.db").exists()


def test_agent_runtime_dir_that_existed_is_made_private(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root for a FUSE mount")
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    os.umask(0o022)
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    run.chmod(0o755)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(run))
    vol, key, mnt = tmp_path / "vol.luks", tmp_path / "key", tmp_path / "mnt"
    raw = bytearray(os.urandom(64))
    raw[32:] = bytes(b ^ 0xA5 for b in raw[:32])
    key.write_bytes(bytes(raw))
    mnt.mkdir()

    sv = functools.partial(run_sealvol, env)

    sv("create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    sv("attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", key)
    try:
        assert mode(run) == 0o700, f"pre-existing runtime dir kept {oct(mode(run))}"
    finally:
        sv("detach", "--mountpoint", mnt)
