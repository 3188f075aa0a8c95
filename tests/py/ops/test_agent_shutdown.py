"""SIGTERM to an agent: an orderly, bounded shutdown (issue #16, part 2).

* Nothing busy: SIGTERM syncs the ext4 on the loop over the served file, unmounts it,
  detaches the loop, unmounts FUSE and exits; data written WITHOUT fsync is on the volume
  afterwards (the agent synced the filesystem before it let go).
* A program keeps the filesystem busy: the agent still exits within its stop timeout
  (SEALVOL_STOP_TIMEOUT) plus the loop-release deadline, forcing the unmount; data synced
  before the signal is intact, and no mount or loop device of ours is left behind.
"""

import json
import os
import signal
import subprocess
import time

import pytest

from sealvol_testing.ci import require
from sealvol_testing.host import is_mounted, loop_devices_under, run
from sealvol_testing.paths import SEALVOL_BIN



def pid_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def volume(tmp_path):
    require(root=True, fuse=True, tools=("losetup", "mkfs.ext4"), files=(SEALVOL_BIN,))
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    key.chmod(0o600)
    vol = tmp_path / "vol.img"
    run(SEALVOL_BIN, "create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(tmp_path / "run"), SEALVOL_STOP_TIMEOUT="2")
    mnt, fs = tmp_path / "mnt", tmp_path / "fs"
    mnt.mkdir()
    fs.mkdir()
    state = {"vol": vol, "key": key, "env": env, "mnt": mnt, "fs": fs, "tmp": tmp_path}
    yield state
    for p in (fs, mnt):
        if is_mounted(p):
            run("umount", "-l", p, check=False)
    for dev in loop_devices_under(mnt):
        run("losetup", "-d", dev, check=False)


def attach_and_mount(v, mkfs):
    run(SEALVOL_BIN, "attach", "--path", v["vol"], "--mountpoint", v["mnt"],
        "--volume-key-file", v["key"], "--log-file", v["tmp"] / "agent.log", env=v["env"])
    dev = run("losetup", "-f", "--show", "--direct-io=on", v["mnt"] / "disk").stdout.strip()
    if mkfs:
        run("mkfs.ext4", "-q", "-F", dev)
    run("mount", "-t", "ext4", dev, v["fs"])
    records = list((v["tmp"] / "run").glob("*.json"))
    assert len(records) == 1, records
    return json.loads(records[0].read_text())["pid"]


def sigterm_and_wait(pid, limit):
    started = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    while pid_exists(pid):
        # A child of this test's attach? No: the agent is re-parented; poll until gone.
        assert time.monotonic() - started < limit, f"agent {pid} still running {limit} s after SIGTERM"
        time.sleep(0.05)
    return time.monotonic() - started


def test_sigterm_syncs_unmounts_and_keeps_unsynced_writes(volume):
    v = volume
    pid = attach_and_mount(v, mkfs=True)
    data = os.urandom(3 * 1024 * 1024 + 123)
    # Written through the page cache and never fsynced by the writer.
    (v["fs"] / "unsynced.bin").write_bytes(data)
    took = sigterm_and_wait(pid, limit=30)
    assert not is_mounted(v["fs"]) and not is_mounted(v["mnt"]), "SIGTERM left a mount behind"
    assert not loop_devices_under(v["mnt"]), "SIGTERM left a loop device behind"
    print(f"orderly shutdown took {took:.2f} s")

    attach_and_mount(v, mkfs=False)
    assert (v["fs"] / "unsynced.bin").read_bytes() == data, "the unsynced file did not survive SIGTERM"
    run("umount", v["fs"])
    run(SEALVOL_BIN, "detach", "--mountpoint", v["mnt"], env=v["env"])


def test_sigterm_is_bounded_when_a_program_keeps_the_filesystem_busy(volume):
    v = volume
    pid = attach_and_mount(v, mkfs=True)
    data = os.urandom(1024 * 1024)
    with open(v["fs"] / "synced.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    holder = subprocess.Popen(["sleep", "600"], cwd=v["fs"])
    try:
        # Stop timeout 2 s, plus up to 10 s for a loop device to let go: well under 30.
        took = sigterm_and_wait(pid, limit=30)
        assert took >= 1.5, f"the agent did not wait for the busy filesystem ({took:.2f} s)"
        assert not is_mounted(v["fs"]) and not is_mounted(v["mnt"]), "a forced shutdown left a mount"
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 20
    while loop_devices_under(v["mnt"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not loop_devices_under(v["mnt"]), "a forced shutdown left a loop device behind"
    log = (v["tmp"] / "agent.log").read_text()
    assert "forcing the unmount" in log, log

    attach_and_mount(v, mkfs=False)
    assert (v["fs"] / "synced.bin").read_bytes() == data, "fsynced data was lost in a forced shutdown"
    run("umount", v["fs"])
    run(SEALVOL_BIN, "detach", "--mountpoint", v["mnt"], env=v["env"])
