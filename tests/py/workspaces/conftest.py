"""Fixtures for the WorkSpaces lifecycle suite: a real kms-daemon, the real sealvol CLI
(controller + agents with real FUSE mounts, loop devices and ext4), boto3 clients per
profile. Needs root and /dev/fuse; under CI=true a missing prerequisite fails."""

import shutil
import tempfile
from pathlib import Path

import pytest

from sealvol_testing.kms import Daemon
from sealvol_testing.sealvol import DIRECTORY, KEY_POLICY, Sealvol, require_workspace_host


@pytest.fixture(scope="session")
def daemon():
    require_workspace_host()
    d = Path(tempfile.mkdtemp(prefix="sealvol-ws-kms-"))
    (d / "state").mkdir()
    dm = Daemon(d / "state").start()
    yield dm
    dm.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def admin(daemon):
    return daemon.client("admin")


@pytest.fixture(scope="session")
def ebs(daemon):
    return daemon.client("ebs")


@pytest.fixture(scope="session")
def sv(daemon):
    state = Path(tempfile.mkdtemp(prefix="sealvol-ws-state-"))
    s = Sealvol(state, daemon)
    s.run("register-directory", "--directory-id", DIRECTORY)
    root_src = state / "bundle-src"
    (root_src / "etc").mkdir(parents=True)
    (root_src / "etc" / "hostname").write_text("workspace\n")
    (root_src / "home").mkdir()
    s.run("create-bundle", "--bundle-id", "wsb-test1", "--from-dir", str(root_src), "--size-gib", "1")
    yield s
    s.terminate_all()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def cmk(admin):
    """A customer managed key with the seed's sample key policy (Alice via WorkSpaces)."""
    return admin.create_key(Policy=KEY_POLICY, Description="sealvol test CMK")["KeyMetadata"]["Arn"]
