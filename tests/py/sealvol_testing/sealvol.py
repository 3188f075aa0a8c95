"""The real sealvol CLI under test: `run_sealvol` for one-off verbs, and `Sealvol`, a
runner bound to one controller state directory and one kms-daemon (its profiles), used by
the WorkSpaces suites."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from sealvol_testing.ci import require
from sealvol_testing.paths import REPO, SEALVOL_BIN

SEALVOL = str(SEALVOL_BIN)
KEY_POLICY = (REPO / "kms-daemon" / "policies" / "workspaces-key-policy.json").read_text()
DIRECTORY = "d-906734f0a1"


def run_sealvol(env, *args, timeout=120):
    """Runs the sealvol CLI with `env`; a non-zero exit fails the test with its stderr."""
    p = subprocess.run([SEALVOL, *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stderr
    return p


def require_workspace_host():
    """What a WorkSpace needs on this host: root, FUSE and the block tools the agent drives."""
    require(root=True, fuse=True, tools=("losetup", "mkfs.ext4", "fsfreeze"))


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


@contextlib.contextmanager
def own_world(prefix="sealvol-world-", bundle_id="wsb-test1"):
    """A kms-daemon and a sealvol state of the test's own (for tests that kill the daemon
    or the agents), with a registered directory, a bundle and a key; everything is torn
    down on exit. Yields (daemon, sv, key)."""
    from sealvol_testing.kms import Daemon

    require_workspace_host()
    root = Path(tempfile.mkdtemp(prefix=prefix))
    (root / "kms").mkdir()
    daemon = Daemon(root / "kms").start()
    sv = Sealvol(root / "state", daemon)
    try:
        sv.run("register-directory", "--directory-id", DIRECTORY)
        (root / "b" / "etc").mkdir(parents=True)
        (root / "b" / "etc" / "hostname").write_text("workspace\n")
        sv.run("create-bundle", "--bundle-id", bundle_id, "--from-dir", str(root / "b"), "--size-gib", "1")
        key = daemon.client("admin").create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
        yield daemon, sv, key
    finally:
        if daemon.proc is None or daemon.proc.poll() is not None:
            daemon.start()  # the teardown needs the KMS to retire grants
        sv.terminate_all()
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
