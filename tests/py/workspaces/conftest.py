"""Fixtures for the WorkSpaces lifecycle suite: a real kms-daemon, the real sealvol CLI
(controller + agents with real FUSE mounts, loop devices and ext4), boto3 clients per
profile. Needs root and /dev/fuse; under CI=true a missing prerequisite fails."""

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SEALVOL = os.environ.get("SEALVOL_BIN", str(REPO / "target" / "debug" / "sealvol"))
_spec = importlib.util.spec_from_file_location("kms_fixtures", REPO / "tests" / "py" / "kms" / "conftest.py")
kms_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kms_fixtures)
Daemon = kms_fixtures.Daemon
wait_for = kms_fixtures.wait_for
KEY_POLICY = (REPO / "kms-daemon" / "policies" / "workspaces-key-policy.json").read_text()
DIRECTORY = "d-906734f0a1"


def require_env():
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    for tool in ("losetup", "mkfs.ext4", "fsfreeze"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}") and not os.path.exists(f"/sbin/{tool}"):
            missing.append(tool)
    if missing:
        msg = "needs " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: skipping is a failure)")
        pytest.skip(msg + " (not in CI)")


class Sealvol:
    """Runs the sealvol CLI against one state dir and one daemon."""

    def __init__(self, state_dir, daemon):
        self.state_dir = Path(state_dir)
        self.env = dict(os.environ)
        self.env.update({
            "SEALVOL_STATE_DIR": str(self.state_dir),
            "AWS_CONFIG_FILE": str(daemon.state_dir / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(daemon.state_dir / "credentials"),
            "AWS_PROFILE": "alice",
            "AWS_EC2_METADATA_DISABLED": "true",
        })

    def run(self, *args, check=True):
        r = subprocess.run([SEALVOL, *args], env=self.env, capture_output=True, text=True, timeout=300)
        if check and r.returncode != 0:
            raise AssertionError(f"sealvol {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def json(self, *args, check=True):
        r = self.run(*args, "--output", "json", check=check)
        return json.loads(r.stdout) if r.stdout.strip() else {}

    def describe(self, ws_id):
        return self.json("describe-workspaces", "--workspace-ids", ws_id)["Workspaces"][0]

    def mnt(self, ws_id):
        return self.state_dir / "mnt" / ws_id

    def agent_pid(self, ws_id):
        return int((self.state_dir / "agents" / f"{ws_id}.pid").read_text())

    def launch(self, user, key=None, root=True, userv=True, user_gib="1"):
        self.run("create-user", "--directory-id", DIRECTORY, "--user-name", user)
        args = ["create-workspaces", "--directory-id", DIRECTORY, "--user-name", user, "--bundle-id", "wsb-test1",
                "--user-volume-size-gib", user_gib]
        if key:
            args += ["--volume-encryption-key", key]
        if root:
            args.append("--root-volume-encryption-enabled")
        if userv:
            args.append("--user-volume-encryption-enabled")
        out = self.json(*args)
        assert out["FailedRequests"] == [], out
        return out["PendingRequests"][0]["WorkspaceId"]

    def terminate_all(self):
        try:
            ids = [w["WorkspaceId"] for w in self.json("describe-workspaces")["Workspaces"]]
        except Exception:  # noqa: BLE001 - best-effort cleanup
            return
        if ids:
            self.run("terminate-workspaces", "--workspace-ids", *ids, check=False)


@pytest.fixture(scope="session")
def daemon():
    require_env()
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
