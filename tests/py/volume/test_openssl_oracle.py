"""External oracle: OpenSSL (via `cryptography`) reads and writes sealvol sectors.

A sector written through the FUSE file decrypts with OpenSSL's AES-XTS using the
dm-crypt plain64 tweak 8*n (4096-byte sectors in 512-byte units), and ciphertext made by
OpenSSL reads back as plaintext through sealvol. Needs root and /dev/fuse; under CI=true a
missing prerequisite fails instead of skipping.
"""
import os
import shutil
import subprocess
import tempfile

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sealvol_testing.ci import require
from sealvol_testing.paths import SEALVOL_BIN

SEALVOL = str(SEALVOL_BIN)
DATA_OFFSET = 16 * 1024 * 1024
SECTOR = 4096


def _require_env():
    require(root=True, fuse=True, files=(SEALVOL,))


def _xts_raw(key, tweak_int, data, encrypt):
    c = Cipher(algorithms.AES(key), modes.XTS(tweak_int.to_bytes(16, "little")))
    op = c.encryptor() if encrypt else c.decryptor()
    return op.update(data) + op.finalize()


def _xts(key, sector, data, encrypt):
    """dm-crypt plain64: the tweak counts 512-byte units, so 4096-byte sector n uses 8n."""
    return _xts_raw(key, sector * (SECTOR // 512), data, encrypt)


@pytest.fixture
def volume():
    _require_env()
    d = tempfile.mkdtemp()
    key = os.urandom(64)
    while key[:32] == key[32:]:
        key = os.urandom(64)
    kf = os.path.join(d, "key")
    with open(kf, "wb") as f:
        f.write(key)
    vol = os.path.join(d, "vol.luks")
    mnt = os.path.join(d, "mnt")
    os.mkdir(mnt)
    subprocess.run([SEALVOL, "create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", kf], check=True, capture_output=True)
    yield key, kf, vol, mnt
    subprocess.run([SEALVOL, "detach", "--mountpoint", mnt], capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _attach(vol, mnt, kf):
    r = subprocess.run([SEALVOL, "attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", kf], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _detach(mnt):
    r = subprocess.run([SEALVOL, "detach", "--mountpoint", mnt], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_sector_written_through_fuse_decrypts_with_openssl(volume):
    key, kf, vol, mnt = volume
    _attach(vol, mnt, kf)
    sectors = [0, 1, 12345, (1 << 30) // SECTOR - 1]
    plain = {n: os.urandom(SECTOR) for n in sectors}
    fd = os.open(os.path.join(mnt, "disk"), os.O_RDWR)
    try:
        for n, p in plain.items():
            os.pwrite(fd, p, n * SECTOR)
        os.fsync(fd)
    finally:
        os.close(fd)
    _detach(mnt)
    with open(vol, "rb") as f:
        for n, p in plain.items():
            f.seek(DATA_OFFSET + n * SECTOR)
            ct = f.read(SECTOR)
            assert ct != p
            assert _xts(key, n, ct, encrypt=False) == p, f"sector {n}"
            if n:
                assert _xts_raw(key, n, ct, encrypt=False) != p, "tweak must be 8n, not n"


def test_openssl_ciphertext_reads_back_through_fuse(volume):
    key, kf, vol, mnt = volume
    n = 777
    p = os.urandom(SECTOR)
    with open(vol, "r+b") as f:
        f.seek(DATA_OFFSET + n * SECTOR)
        f.write(_xts(key, n, p, encrypt=True))
    _attach(vol, mnt, kf)
    fd = os.open(os.path.join(mnt, "disk"), os.O_RDONLY)
    try:
        got = os.pread(fd, SECTOR, n * SECTOR)
        # Unwritten sectors read as zeros.
        assert os.pread(fd, SECTOR, (n + 1) * SECTOR) == bytes(SECTOR)
    finally:
        os.close(fd)
    _detach(mnt)
    assert got == p
