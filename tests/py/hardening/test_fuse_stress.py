"""FUSE and filesystem stress on a real attached volume.

* fsx-style: random pwrite / pread / fallocate(PUNCH_HOLE) / fsync / close-reopen on the
  FUSE file of an attached encrypted volume, every read checked against an in-memory
  model; then detach, re-attach and check the whole model again (fsync'ed data persists).
* ext4 over a loop device over the FUSE file: fio with crc32c verification (and
  fsstress when xfstests is installed), then `e2fsck -fn` must find the filesystem clean.
* After every detach: no mount under the test directory and no loop device on the file.

CI sizes are small (HARDENING_FSX_OPS=2000, HARDENING_FIO_SIZE=64M); the long run in
docs/hardening.md used HARDENING_FSX_OPS=100000 HARDENING_FIO_SIZE=1G HARDENING_FIO_LOOPS=4.
"""

import ctypes
import ctypes.util
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from sealvol_testing.ci import env_int, skip_or_fail
from sealvol_testing.host import loops_under, mounts_under, run, wait_until
from sealvol_testing.paths import SEALVOL_BIN

FSX_OPS = env_int("HARDENING_FSX_OPS", 2000)
FSX_SEED = env_int("HARDENING_FSX_SEED", 20261128)
FIO_SIZE = os.environ.get("HARDENING_FIO_SIZE", "64M")
FIO_LOOPS = env_int("HARDENING_FIO_LOOPS", 1)
FSSTRESS_OPS = env_int("HARDENING_FSSTRESS_OPS", 2000)
GIB = 1 << 30
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def punch_hole(fd, offset, length):
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def require_privileges():
    if os.geteuid() != 0:
        skip_or_fail("needs root for FUSE mounts and loop devices")
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}; build it or set SEALVOL_BIN")


class Volume:
    def __init__(self, tmp: Path):
        self.dir = tmp
        self.vol = tmp / "vol.luks"
        self.key = tmp / "key"
        self.mnt = tmp / "mnt"
        self.mnt.mkdir()
        raw = bytearray(os.urandom(64))
        raw[32:] = bytes(b ^ 0x5A for b in raw[:32])  # Key1 != Key2
        self.key.write_bytes(bytes(raw))
        self.key.chmod(0o600)
        run(SEALVOL_BIN, "create-volume", "--path", self.vol, "--size-gib", "1", "--volume-key-file", self.key)
        self.attached = False

    @property
    def disk(self):
        return self.mnt / "disk"

    def attach(self):
        run(SEALVOL_BIN, "attach", "--path", self.vol, "--mountpoint", self.mnt, "--volume-key-file", self.key)
        self.attached = True
        wait_until("the FUSE file", lambda: self.disk.exists())
        assert self.disk.stat().st_size == GIB

    def detach(self):
        run(SEALVOL_BIN, "detach", "--mountpoint", self.mnt)
        self.attached = False
        wait_until("FUSE unmounted", lambda: not mounts_under(self.mnt))

    def assert_no_leaks(self):
        assert not mounts_under(self.dir), f"leaked mounts: {mounts_under(self.dir)}"
        assert not loops_under(self.dir), f"leaked loop devices: {loops_under(self.dir)}"

    def cleanup(self):
        for m in sorted(mounts_under(self.dir), reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if self.attached:
            subprocess.run([str(SEALVOL_BIN), "detach", "--mountpoint", str(self.mnt)], capture_output=True)


@pytest.fixture
def volume(tmp_path):
    require_privileges()
    v = Volume(tmp_path)
    yield v
    v.cleanup()


# The model covers the first 24 MiB and the last 4 MiB of the 1 GiB volume (both ends of
# the address space, including the final sector) and stays in memory.
WINDOWS = [(0, 24 << 20), (GIB - (4 << 20), 4 << 20)]


class Model:
    def __init__(self):
        self.parts = [(base, bytearray(size)) for base, size in WINDOWS]

    def locate(self, off, n):
        for base, buf in self.parts:
            if base <= off and off + n <= base + len(buf):
                return buf, off - base
        raise AssertionError("range outside the model")

    def write(self, off, data):
        buf, i = self.locate(off, len(data))
        buf[i:i + len(data)] = data

    def zero(self, off, n):
        buf, i = self.locate(off, n)
        buf[i:i + n] = bytes(n)

    def read(self, off, n):
        buf, i = self.locate(off, n)
        return bytes(buf[i:i + n])


def random_range(rnd, max_len):
    base, size = rnd.choice(WINDOWS)
    n = rnd.choice([1, 7, 511, 512, 513, 4095, 4096, 4097, 65536, rnd.randint(1, max_len)])
    n = min(n, size)
    if rnd.random() < 0.1:
        off = base + size - n  # flush against the window's end
    else:
        off = base + rnd.randrange(0, size - n + 1)
    return off, n


def verify_all(fd, model, label):
    for base, buf in model.parts:
        step = 1 << 20
        for o in range(0, len(buf), step):
            got = os.pread(fd, step, base + o)
            if got != bytes(buf[o:o + step]):
                bad = next(i for i in range(len(got)) if got[i] != buf[o + i])
                raise AssertionError(f"{label}: corruption at byte {base + o + bad}")


def test_fsx_random_ops_with_model_and_reattach(volume):
    rnd = random.Random(FSX_SEED)
    model = Model()
    volume.attach()
    counts = {"write": 0, "read": 0, "punch": 0, "fsync": 0, "reopen": 0}
    fd = os.open(volume.disk, os.O_RDWR)
    try:
        for i in range(FSX_OPS):
            x = rnd.random()
            if x < 0.40:
                off, n = random_range(rnd, 256 << 10)
                data = rnd.randbytes(n) if rnd.random() < 0.8 else bytes(n)  # zero writes make holes
                assert os.pwrite(fd, data, off) == n
                model.write(off, data)
                counts["write"] += 1
            elif x < 0.75:
                off, n = random_range(rnd, 256 << 10)
                got = os.pread(fd, n, off)
                if got != model.read(off, n):
                    raise AssertionError(f"op {i} (seed {FSX_SEED}): read {off}+{n} differs from the model")
                counts["read"] += 1
            elif x < 0.87:
                off, n = random_range(rnd, 1 << 20)
                punch_hole(fd, off, n)
                model.zero(off, n)
                counts["punch"] += 1
            elif x < 0.95:
                os.fsync(fd)
                counts["fsync"] += 1
            else:
                os.close(fd)
                fd = os.open(volume.disk, os.O_RDWR)
                counts["reopen"] += 1
        os.fsync(fd)
        verify_all(fd, model, "before detach")
    finally:
        os.close(fd)
    volume.detach()
    volume.assert_no_leaks()
    volume.attach()
    fd = os.open(volume.disk, os.O_RDONLY)
    try:
        verify_all(fd, model, "after re-attach")
    finally:
        os.close(fd)
    volume.detach()
    volume.assert_no_leaks()
    print("fsx report:", json.dumps({"seed": FSX_SEED, "ops": FSX_OPS, **counts, "corruptions": 0}))


def test_ext4_on_loop_fio_verify_and_fsck(volume, tmp_path):
    if not shutil.which("fio"):
        skip_or_fail("fio is not installed")
    volume.attach()
    fsdir = tmp_path / "fs"
    fsdir.mkdir()
    dev = run("losetup", "-f", "--show", "--direct-io=on", volume.disk).stdout.strip()
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", dev, fsdir)
        try:
            p = run("fio", "--name=verify", f"--directory={fsdir}", "--rw=randrw", "--bsrange=4k-256k",
                    "--ioengine=libaio", "--direct=1", "--iodepth=8", "--numjobs=2", f"--size={FIO_SIZE}",
                    f"--loops={FIO_LOOPS}", "--verify=crc32c", "--verify_fatal=1", "--do_verify=1",
                    "--fsync=32", "--output-format=json", timeout=3600)
            job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"]
            assert all(j["error"] == 0 for j in job)
            fio_bytes = sum(j["write"]["io_bytes"] + j["read"]["io_bytes"] for j in job)
            fsstress = shutil.which("fsstress") or next(
                (str(p) for p in (Path("/usr/lib/xfstests/ltp/fsstress"), Path("/usr/lib/xfstests/fsstress")) if p.exists()), None)
            if fsstress:
                (fsdir / "stress").mkdir()
                run(fsstress, "-d", fsdir / "stress", "-n", FSSTRESS_OPS, "-p", "4", "-s", FSX_SEED, timeout=3600)
        finally:
            run("umount", fsdir)
        fsck = run("e2fsck", "-fn", dev, check=False)
        assert fsck.returncode == 0, f"ext4 not clean after the stress:\n{fsck.stdout}{fsck.stderr}"
    finally:
        run("losetup", "-d", dev, check=False)
    volume.detach()
    volume.assert_no_leaks()
    print("ext4 report:", json.dumps({"fio_bytes": fio_bytes, "fsstress": bool(fsstress),
                                      "fsstress_ops": FSSTRESS_OPS * 4 if fsstress else 0, "fsck": "clean"}))
