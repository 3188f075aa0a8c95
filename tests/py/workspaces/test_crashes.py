"""Real crashes around the KMS path: kill -9 the WorkSpace agent in the middle of an
online KMS rekey (the next attach unwraps both keys and resumes), and kill -9 the
kms-daemon mid-rekey and between launches (acknowledged keys and grants survive; the
WorkSpace reboots once the daemon is back)."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from conftest import DIRECTORY, KEY_POLICY, SEALVOL, Daemon, Sealvol, require_env, wait_for


def fill(path, mib):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(mib):
            block = hashlib.sha256(str(i).encode()).digest() * (1024 * 1024 // 32)
            f.write(block)
            h.update(block)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rekey_state(sv, path):
    return json.loads(sv.run("describe-volume", "--path", path, "--output", "json").stdout).get("RekeyInProgress")


def own_world():
    require_env()
    root = Path(tempfile.mkdtemp(prefix="sealvol-crash-"))
    (root / "kms").mkdir()
    daemon = Daemon(root / "kms").start()
    sv = Sealvol(root / "state", daemon)
    sv.run("register-directory", "--directory-id", DIRECTORY)
    (root / "b" / "etc").mkdir(parents=True)
    (root / "b" / "etc" / "hostname").write_text("crash\n")
    sv.run("create-bundle", "--bundle-id", "wsb-crash1", "--from-dir", str(root / "b"), "--size-gib", "1")
    key = daemon.client("admin").create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    return root, daemon, sv, key


def launch(sv, user, key):
    sv.run("create-user", "--directory-id", DIRECTORY, "--user-name", user)
    out = sv.json("create-workspaces", "--directory-id", DIRECTORY, "--user-name", user, "--bundle-id", "wsb-crash1",
                  "--volume-encryption-key", key, "--root-volume-encryption-enabled", "--user-volume-encryption-enabled",
                  "--user-volume-size-gib", "2")
    assert out["FailedRequests"] == [], out
    return out["PendingRequests"][0]["WorkspaceId"]


def test_agent_and_daemon_killed_mid_kms_rekey():
    root, daemon, sv, key = own_world()
    try:
        ws = launch(sv, "kate", key)
        home = sv.mnt(ws) / "home"
        want = fill(home / "big.bin", 320)
        user_vol = next(v for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"] if v["Kind"] == "user")

        # 1. kill -9 the agent once the rekey has checkpointed progress.
        rk = subprocess.Popen([SEALVOL, "rekey-volume", "--workspace-id", ws,
                               "--volume-id", user_vol["VolumeId"], "--hotzone-mib", "1"], env=sv.env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        def progressing():
            if rk.poll() is not None:
                raise AssertionError(f"rekey-volume ended early ({rk.returncode}): {rk.stderr.read().decode()}")
            # Read the header's JSON area directly: cheap enough to catch a fast rekey.
            with open(user_vol["Path"], "rb") as f:
                return b'"sealvol-rekey"' in f.read(16384)
        wait_for(progressing, timeout=60, what="rekey progress")
        os.kill(sv.agent_pid(ws), signal.SIGKILL)
        rk.wait(timeout=60)
        assert rk.returncode != 0, "the client saw its agent die"
        assert rekey_state(sv, user_vol["Path"]) is not None, "interrupted mid-rekey"

        # 2. kill -9 the kms-daemon too, restart it on the same state: nothing acknowledged is lost.
        daemon.stop(signal.SIGKILL)
        daemon.start()
        assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
        # The agent unwrapped both keys and resumes in the background.
        wait_for(lambda: rekey_state(sv, user_vol["Path"]) is None, timeout=180, what="resumed rekey to finish")
        assert digest(home / "big.bin") == want
        # And after another reboot (new key only) the data is still there.
        assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
        assert digest(home / "big.bin") == want
        sv.run("terminate-workspaces", "--workspace-ids", ws)
    finally:
        sv.terminate_all()
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)

