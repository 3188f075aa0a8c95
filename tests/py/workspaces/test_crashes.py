"""Real crashes around the KMS path: kill -9 the WorkSpace agent in the middle of an
online KMS rekey (the next attach unwraps both keys and resumes), and kill -9 the
kms-daemon mid-rekey and between launches (acknowledged keys and grants survive; the
WorkSpace reboots once the daemon is back)."""

import hashlib
import json
import os
import signal
import subprocess

from sealvol_testing.kms import wait_for
from sealvol_testing.sealvol import DIRECTORY, SEALVOL, own_world as _own_world


def own_world():
    """The crash tests' world: its own daemon (they kill it) and bundle wsb-crash1."""
    return _own_world(prefix="sealvol-crash-", bundle_id="wsb-crash1")


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


def launch(sv, user, key):
    sv.run("create-user", "--directory-id", DIRECTORY, "--user-name", user)
    out = sv.json("create-workspaces", "--directory-id", DIRECTORY, "--user-name", user, "--bundle-id", "wsb-crash1",
                  "--volume-encryption-key", key, "--root-volume-encryption-enabled", "--user-volume-encryption-enabled",
                  "--user-volume-size-gib", "2")
    assert out["FailedRequests"] == [], out
    return out["PendingRequests"][0]["WorkspaceId"]


def test_agent_and_daemon_killed_mid_kms_rekey():
    with own_world() as (daemon, sv, key):
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



def test_daemon_killed_at_random_moments_during_kms_rekey():
    """kill -9 the kms-daemon at a random moment of `rekey-volume --workspace-id` (while it
    asks for the new data key, while the agent starts, or mid re-encryption), restart it on
    the same state, run the same command again: the rekey finishes (resumed or restarted)
    and the data is intact. The kill moments are spread over the time one undisturbed
    rekey takes. SEALVOL_KMS_CRASH_ITERATIONS iterations (default 2; raised by
    `scripts/crash-test --kms-iterations N`); the seed is printed for replay."""
    import random
    import time

    iterations = int(os.environ.get("SEALVOL_KMS_CRASH_ITERATIONS", "2"))
    seed = int(os.environ.get("SEALVOL_CRASH_SEED", str(random.randrange(1 << 32))))
    print(f"SEALVOL_CRASH_SEED={seed}")
    rng = random.Random(seed)
    with own_world() as (daemon, sv, key):
        ws = launch(sv, "lena", key)
        home = sv.mnt(ws) / "home"
        want = fill(home / "data.bin", 192)
        user_vol = next(v for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"] if v["Kind"] == "user")
        args = [SEALVOL, "rekey-volume", "--workspace-id", ws, "--volume-id", user_vol["VolumeId"], "--hotzone-mib", "1"]
        # One undisturbed rekey measures the window the kills are spread over.
        t0 = time.monotonic()
        subprocess.run(args, env=sv.env, check=True, capture_output=True, timeout=300)
        window = time.monotonic() - t0
        assert digest(home / "data.bin") == want
        print(f"an undisturbed rekey takes {window:.2f} s")
        for i in range(iterations):
            # Even iterations aim at the KMS calls at the start (GenerateDataKey, the
            # agent's Decrypt), odd ones anywhere in the re-encryption.
            delay = rng.uniform(0.0, min(0.5, window) if i % 2 == 0 else window)
            rk = subprocess.Popen(args, env=sv.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(delay)
            daemon.stop(signal.SIGKILL)
            rk.wait(timeout=180)
            daemon.start()
            # Whatever the first run got to, the same command again finishes the job.
            again = subprocess.run(args, env=sv.env, capture_output=True, text=True, timeout=300)
            assert again.returncode == 0, f"iteration {i} (kill after {delay:.2f} s, seed {seed}): {again.stderr}"
            assert rekey_state(sv, user_vol["Path"]) is None, f"iteration {i}: rekey left pending"
            assert digest(home / "data.bin") == want, f"iteration {i} (seed {seed}): data changed"
            print(f"iteration {i}: kms-daemon killed {delay:.2f} s into the rekey "
                  f"(first run {'failed: interrupted' if rk.returncode else 'succeeded: it no longer needed the daemon'}); "
                  "rerun finished, data intact")
        # The volume still opens after a reboot (the final key is the one in the header).
        assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
        assert digest(home / "data.bin") == want
        sv.run("terminate-workspaces", "--workspace-ids", ws)
