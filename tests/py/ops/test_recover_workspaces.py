"""`sealvol recover-workspaces` after a simulated power loss (issue #16, part 1).

Five WorkSpaces on one host, one of them stopped. The power goes: kill -9 every agent and
the kms-daemon, lazily unmount every filesystem and FUSE mount, detach the loop devices.
The daemon comes back; meanwhile the administrator disabled the second WorkSpace's key,
revoked the EBS grants of the fourth, and the fifth lost its user volume file. Recovery
must bring the first back to AVAILABLE with every fsync-acknowledged byte, record the
second, fourth and fifth UNHEALTHY with the reason and leave them down, leave the stopped
one stopped, and change nothing when run again; once the key is enabled again, the next
run brings the second back too.
"""

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from sealvol_testing.host import loop_devices_under, wait_until
from sealvol_testing.sealvol import KEY_POLICY, SEALVOL, own_world


def fsync_write(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def recover(sv):
    r = subprocess.run([SEALVOL, "recover-workspaces", "--output", "json"], env=sv.env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode in (0, 3), f"recover-workspaces failed ({r.returncode}): {r.stderr}"
    return r.returncode, {w["WorkspaceId"]: w for w in json.loads(r.stdout)["Workspaces"]}


def power_loss(sv, daemon, ws_ids):
    """kill -9 every agent and the daemon, then lazily unmount and detach everything.
    The loops are listed first: once their FUSE mount is gone, their backing paths no
    longer name the state dir, and they would be left attached after the test."""
    loops = loop_devices_under(sv.state_dir)
    assert loops, "the running WorkSpaces' volumes are on loop devices"
    for ws in ws_ids:
        pid_file = sv.state_dir / "agents" / f"{ws}.pid"
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
    daemon.stop(signal.SIGKILL)
    for ws in ws_ids:
        for m in (sv.mnt(ws) / "home", sv.mnt(ws), sv.state_dir / "fuse" / ws):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
    for dev in loops:
        subprocess.run(["losetup", "-d", dev], capture_output=True)
    wait_until("the dead WorkSpaces' loop devices are detached",
               lambda: not any(Path(f"/sys/block/{Path(d).name}/loop/backing_file").exists() for d in loops))


@pytest.fixture
def world():
    with own_world(prefix="sealvol-recover-") as (daemon, sv, _key):
        yield daemon, sv


def test_power_loss_then_recover(world):
    daemon, sv = world
    admin = daemon.client("admin")
    k1 = admin.create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    k2 = admin.create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    k4 = admin.create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    ws1 = sv.launch("ursula", key=k1)
    ws2 = sv.launch("viktor", key=k2)
    ws3 = sv.launch("wanda", key=k1)
    ws4 = sv.launch("xaver", key=k4)
    ws5 = sv.launch("yvonne", key=k1)
    assert sv.json("stop-workspaces", "--workspace-ids", ws3)["FailedRequests"] == []

    data = {ws: os.urandom(2 * 1024 * 1024 + 77) for ws in (ws1, ws2)}
    for ws, d in data.items():
        fsync_write(sv.mnt(ws) / "home" / "acked.bin", d)
    old_pid = sv.agent_pid(ws1)

    power_loss(sv, daemon, [ws1, ws2, ws3, ws4, ws5])
    daemon.start()
    admin = daemon.client("admin")
    admin.disable_key(KeyId=k2)
    # ws4: the EBS grants on its volumes are revoked; ws5: its user volume file is gone.
    ebs_grants = [g for g in admin.list_grants(KeyId=k4)["Grants"] if "ebs" in g["GranteePrincipal"].lower()]
    assert len(ebs_grants) == 2, ebs_grants
    for g in ebs_grants:
        admin.revoke_grant(KeyId=k4, GrantId=g["GrantId"])
    user_vol = next(v for v in sv.json("describe-volumes", "--workspace-id", ws5)["Volumes"] if v["Kind"] == "user")
    os.unlink(user_vol["Path"])

    code, got = recover(sv)
    assert code == 3, f"one WorkSpace was left down: exit status 3: {got}"
    assert got[ws1]["Action"] == "RECOVERED" and got[ws1]["State"] == "AVAILABLE", got[ws1]
    assert got[ws2]["Action"] == "LEFT_DOWN" and got[ws2]["State"] == "UNHEALTHY", got[ws2]
    assert "Disabled" in got[ws2]["Reason"], got[ws2]["Reason"]
    assert got[ws3]["Action"] == "UNCHANGED" and got[ws3]["State"] == "STOPPED", got[ws3]
    assert got[ws4]["Action"] == "LEFT_DOWN" and got[ws4]["State"] == "UNHEALTHY", got[ws4]
    assert "AccessDenied" in got[ws4]["Reason"], got[ws4]["Reason"]
    assert got[ws5]["Action"] == "LEFT_DOWN" and got[ws5]["State"] == "UNHEALTHY", got[ws5]
    assert "missing" in got[ws5]["Reason"] and user_vol["VolumeId"] in got[ws5]["Reason"], got[ws5]["Reason"]
    for ws in (ws4, ws5):
        assert not (sv.mnt(ws) / "home").is_mount(), f"{ws} was left down but is mounted"

    assert sha(sv.mnt(ws1) / "home" / "acked.bin") == hashlib.sha256(data[ws1]).hexdigest()
    assert sv.agent_pid(ws1) != old_pid
    d2 = sv.describe(ws2)
    assert d2["State"] == "UNHEALTHY" and "Disabled" in d2["ErrorMessage"], d2
    assert not (sv.mnt(ws2) / "home" / "acked.bin").exists(), "a WorkSpace left down is not mounted"
    assert sv.describe(ws3)["State"] == "STOPPED"

    # Idempotent: nothing that is up is touched.
    pid1 = sv.agent_pid(ws1)
    code, again = recover(sv)
    assert code == 3
    assert again[ws1]["Action"] == "ALREADY_RUNNING" and again[ws1]["State"] == "AVAILABLE", again[ws1]
    assert sv.agent_pid(ws1) == pid1, "recovery restarted a running WorkSpace"
    assert again[ws2]["State"] == "UNHEALTHY" and again[ws3]["State"] == "STOPPED"

    # The key is back: the next run recovers the second one, with its data; the two whose
    # grant or volume is gone stay down.
    admin.enable_key(KeyId=k2)
    code, last = recover(sv)
    assert code == 3, last
    assert last[ws4]["State"] == "UNHEALTHY" and last[ws5]["State"] == "UNHEALTHY", last
    assert last[ws2]["Action"] == "RECOVERED" and last[ws2]["State"] == "AVAILABLE", last[ws2]
    assert sha(sv.mnt(ws2) / "home" / "acked.bin") == hashlib.sha256(data[ws2]).hexdigest()
    assert last[ws1]["Action"] == "ALREADY_RUNNING"


def test_two_recoveries_at_once_start_one_agent(world):
    """The boot unit and an operator run recovery together: the second waits for the
    first, then finds the WorkSpace up (it must not clean up the fresh agent's mounts)."""
    daemon, sv = world
    key = daemon.client("admin").create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    ws = sv.launch("zora", key=key)
    data = os.urandom(1024 * 1024)
    fsync_write(sv.mnt(ws) / "home" / "acked.bin", data)
    os.kill(sv.agent_pid(ws), signal.SIGKILL)
    procs = [subprocess.Popen([SEALVOL, "recover-workspaces", "--output", "json"], env=sv.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    actions = sorted(json.loads(o)["Workspaces"][0]["Action"] for o, _ in outs)
    assert actions == ["ALREADY_RUNNING", "RECOVERED"], actions
    assert sv.describe(ws)["State"] == "AVAILABLE"
    assert sha(sv.mnt(ws) / "home" / "acked.bin") == hashlib.sha256(data).hexdigest()
