"""A WorkSpace's cache mode (`none`: O_DIRECT, the default; `writeback`: the host page
cache): chosen at launch, shown by describe, changed by modify-workspace-properties and
applied at the next reboot. What the agent really does is read from its open files
(/proc/PID/fdinfo flags), not from what the controller says."""

import os

from sealvol_testing.sealvol import DIRECTORY

O_DIRECT = 0o40000


def volume_fd_flags(pid, path):
    """The open flags of every descriptor of process `pid` on the file `path`."""
    flags = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target == path:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                line = next(l for l in f if l.startswith("flags:"))
            flags.append(int(line.split()[1], 8))
    return flags


def agent_direct(sv, ws):
    """{kind: whether the agent holds an O_DIRECT descriptor on that volume file}."""
    pid = sv.agent_pid(ws)
    vols = sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]
    out = {}
    for v in vols:
        flags = volume_fd_flags(pid, os.path.realpath(v["Path"]))
        assert flags, f"the agent has {v['Path']} open"
        out[v["Kind"]] = any(f & O_DIRECT for f in flags)
    return out


def test_default_is_none_and_modify_applies_at_reboot(sv, cmk):
    ws = sv.launch("cache1", key=cmk)
    d = sv.describe(ws)
    assert d["WorkspaceProperties"]["CacheMode"] == "none", d
    assert agent_direct(sv, ws) == {"root": True, "user": True}
    home = sv.mnt(ws) / "home"
    with open(home / "kept.txt", "w") as f:
        f.write("written under cache none\n")
        f.flush()
        os.fsync(f.fileno())

    out = sv.run("modify-workspace-properties", "--workspace-id", ws, "--cache", "writeback").stdout
    assert "next start, reboot" in out, out
    assert sv.describe(ws)["WorkspaceProperties"]["CacheMode"] == "writeback"
    assert agent_direct(sv, ws) == {"root": True, "user": True}, "a running agent keeps its mode"
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert agent_direct(sv, ws) == {"root": False, "user": False}
    assert (home / "kept.txt").read_text() == "written under cache none\n"

    again = sv.run("modify-workspace-properties", "--workspace-id", ws, "--cache", "writeback").stdout
    assert "already writeback" in again, again
    sv.run("terminate-workspaces", "--workspace-ids", ws)
    r = sv.run("modify-workspace-properties", "--workspace-id", ws, "--cache", "none", check=False)
    assert r.returncode != 0 and "terminated" in r.stderr, r.stderr


def test_launch_with_writeback_and_bad_mode_is_refused(sv, cmk):
    sv.run("create-user", "--directory-id", DIRECTORY, "--user-name", "cache2")
    base = ["create-workspaces", "--directory-id", DIRECTORY, "--user-name", "cache2", "--bundle-id", "wsb-test1",
            "--user-volume-size-gib", "1", "--volume-encryption-key", cmk, "--root-volume-encryption-enabled",
            "--user-volume-encryption-enabled"]
    before = sv.json("describe-workspaces")["Workspaces"]
    bad = sv.run(*base, "--cache", "unsafe", check=False)
    assert bad.returncode != 0 and "writeback" in bad.stderr and "none" in bad.stderr, bad.stderr
    assert sv.json("describe-workspaces")["Workspaces"] == before, "a refused request creates nothing"

    out = sv.json(*base, "--cache", "writeback")
    assert out["FailedRequests"] == [], out
    ws = out["PendingRequests"][0]["WorkspaceId"]
    assert sv.describe(ws)["WorkspaceProperties"]["CacheMode"] == "writeback"
    assert agent_direct(sv, ws) == {"root": False, "user": False}
    sv.run("terminate-workspaces", "--workspace-ids", ws)
