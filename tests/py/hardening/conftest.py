"""Shared helpers of the hardening suite: the kms-daemon harness (tests/py/kms), binary
paths, and the CI rule (a test that needs root, /dev/fuse or loop devices may skip only
when CI != "true", and says why)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
KMS_DIR = str(HERE.parent / "kms")
if KMS_DIR not in sys.path:
    sys.path.insert(0, KMS_DIR)

SEALVOL_BIN = Path(os.environ.get("SEALVOL_BIN", REPO / "target" / "debug" / "sealvol"))
KMS_DAEMON_BIN = Path(os.environ.get("KMS_DAEMON_BIN", REPO / "target" / "debug" / "kms-daemon"))
IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason):
    """Outside CI: skip with the reason printed. Under CI=true a missing prerequisite fails."""
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def env_int(name, default):
    return int(os.environ.get(name, default))


def env_float(name, default):
    return float(os.environ.get(name, default))


def run_sealvol(env, *args, timeout=120):
    """Runs the sealvol CLI with `env`; a non-zero exit fails the test with its stderr."""
    p = subprocess.run([str(SEALVOL_BIN), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p
