"""Incremental encrypted snapshots in the embedded file:// store (DESIGN §11): only changed
chunks are read and uploaded, the store holds no plaintext, a crash makes the next snapshot
compare hashes instead of missing a change, corrupted or missing objects are refused with
nothing restored, an UNHEALTHY WorkSpace snapshots only its user volume, automatic
snapshots and retention. The S3 store, the three-node cluster and the second host are in
test_snapshot_s3.py."""

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from sealvol_testing.kms import wait_for
from sealvol_testing.sealvol import Sealvol

MARKER = b"sealvol-plaintext-marker-7f3a9c"


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def snapshot(sv, ws):
    snaps = sv.json("create-snapshot", "--workspace-id", ws)["Snapshots"]
    return {s["Kind"]: s for s in snaps}


def store_dir(sv):
    return sv.state_dir / "snapshots"


def test_second_snapshot_uploads_only_what_changed_and_the_store_sees_no_plaintext(sv, cmk):
    ws = sv.launch("snap-inc", key=cmk, user_gib="2")
    home = sv.mnt(ws) / "home"
    write_file(home / "big.bin", (MARKER + os.urandom(4096 - len(MARKER))) * 2048)  # 8 MiB
    first = snapshot(sv, ws)
    user = first["user"]["Upload"]
    assert user["ChunksRead"] == user["Chunks"], "the first snapshot reads the whole volume"
    assert user["Holes"] > user["Chunks"] // 2, "an almost empty 2 GiB volume is mostly holes"
    assert user["BytesUploaded"] >= 8 << 20
    write_file(home / "more.bin", os.urandom(2 << 20))
    second = snapshot(sv, ws)
    u2 = second["user"]["Upload"]
    assert u2["ChunksRead"] < user["Chunks"] // 20, f"only changed chunks are read: {u2}"
    assert 2 << 20 <= u2["BytesUploaded"] <= 12 << 20, f"about the 2 MiB written: {u2}"
    r2 = second["root"]["Upload"]
    assert r2["BytesUploaded"] < 4 << 20, f"the root volume barely changed: {r2}"
    # The store holds ciphertext only: the marker written 2048 times is nowhere in it.
    for obj in store_dir(sv).rglob("*"):
        if obj.is_file():
            assert MARKER not in obj.read_bytes(), f"plaintext in {obj}"
    manifest = json.loads((store_dir(sv) / second["user"]["Manifest"]).read_text())
    assert manifest["parent"] == first["user"]["Manifest"]
    assert manifest["kms"]["volume_id"] == second["user"]["VolumeId"]
    assert "ciphertext_blob" in manifest["kms"], "only the wrapped data key is in the manifest"
    d = sv.json("describe-workspace-snapshots", "--workspace-id", ws)
    assert [s["SnapshotTime"] for s in d["RebuildSnapshots"]] == [second["user"]["SnapshotTime"], first["user"]["SnapshotTime"]]
    assert d["RestoreSnapshots"] == d["RebuildSnapshots"], "both volumes were taken together each time"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_after_an_agent_crash_the_next_snapshot_compares_every_chunk(sv, cmk):
    ws = sv.launch("snap-crash", key=cmk)
    home = sv.mnt(ws) / "home"
    write_file(home / "a.bin", os.urandom(1 << 20))
    snapshot(sv, ws)
    write_file(home / "b.bin", os.urandom(1 << 20))  # changed after the snapshot ...
    os.kill(sv.agent_pid(ws), signal.SIGKILL)  # ... and the map in memory is lost
    wait_for(lambda: sv.describe(ws)["State"] == "UNHEALTHY", what="UNHEALTHY after kill -9")
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    u = snapshot(sv, ws)["user"]["Upload"]
    assert u["ChunksRead"] == u["Chunks"], f"an untrusted map means every chunk is compared: {u}"
    assert u["BytesUploaded"] >= 1 << 20, "the change made before the crash is in the snapshot"
    assert u["BytesUploaded"] < 16 << 20, f"unchanged chunks are recognised by hash: {u}"
    assert sv.json("restore-workspace", "--workspace-id", ws)["FailedRequests"] == []
    assert (sv.mnt(ws) / "home" / "b.bin").stat().st_size == 1 << 20
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_unhealthy_workspace_snapshots_only_its_user_volume(sv, cmk):
    ws = sv.launch("snap-unhealthy", key=cmk)
    os.kill(sv.agent_pid(ws), signal.SIGKILL)
    wait_for(lambda: sv.describe(ws)["State"] == "UNHEALTHY", what="UNHEALTHY after kill -9")
    kinds = set(snapshot(sv, ws))
    assert kinds == {"user"}
    d = sv.json("describe-workspace-snapshots", "--workspace-id", ws)
    assert len(d["RebuildSnapshots"]) == 1 and d["RestoreSnapshots"] == []
    r = sv.run("restore-workspace", "--workspace-id", ws, "--output", "json", check=False)
    assert "no snapshot of both volumes" in r.stdout + r.stderr
    sv.run("terminate-workspaces", "--workspace-ids", ws)


@pytest.mark.parametrize("damage", ["chunk-flipped", "chunk-missing", "manifest-flipped"])
def test_a_damaged_snapshot_is_refused_and_the_running_workspace_is_untouched(sv, cmk, damage):
    ws = sv.launch(f"snap-{damage}", key=cmk)
    home = sv.mnt(ws) / "home"
    write_file(home / "data.bin", os.urandom(1 << 20))
    snap = snapshot(sv, ws)
    write_file(home / "after.txt", b"written after the snapshot\n")
    manifest_path = store_dir(sv) / snap["user"]["Manifest"]
    manifest = json.loads(manifest_path.read_text())
    chunk = store_dir(sv) / "chunks" / next(h for h in reversed(manifest["chunks"]) if h)
    if damage == "chunk-flipped":
        b = bytearray(chunk.read_bytes())
        b[100] ^= 1
        chunk.write_bytes(bytes(b))
    elif damage == "chunk-missing":
        chunk.unlink()
    else:
        manifest_path.write_text(manifest_path.read_text().replace('"automatic":false', '"automatic":true'))
    before = sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]
    files_before = sorted(p.name for p in (sv.state_dir / "volumes").iterdir())
    r = sv.run("restore-workspace", "--workspace-id", ws, "--output", "json", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert "SnapshotStore.Corrupted" in out, out
    assert ("BLAKE3" in out) or ("missing" in out), out
    assert sv.describe(ws)["State"] == "AVAILABLE"
    assert sv.json("describe-volumes", "--workspace-id", ws)["Volumes"] == before
    assert sorted(p.name for p in (sv.state_dir / "volumes").iterdir()) == files_before, "nothing half-restored"
    assert (home / "after.txt").read_text() == "written after the snapshot\n"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_snapshot_of_a_busy_unencrypted_workspace_restores_to_a_clean_ext4(sv):
    ws = sv.launch("snap-busy", root=False, userv=False)
    home = sv.mnt(ws) / "home"
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            write_file(home / f"f{i % 64}.bin", os.urandom(256 << 10))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        snapshot(sv, ws)
        snapshot(sv, ws)
    finally:
        stop.set()
        t.join()
    assert sv.json("stop-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert sv.json("restore-workspace", "--workspace-id", ws)["FailedRequests"] == []
    assert sv.json("stop-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    user = next(v for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"] if v["Kind"] == "user")
    fsck = subprocess.run(["e2fsck", "-fn", user["Path"]], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_automatic_snapshots_and_retention(daemon, cmk, tmp_path):
    sv2 = Sealvol(tmp_path / "state", daemon)
    sv2.env.update({
        "SEALVOL_SNAPSHOT_INTERVAL": "3s",
        "SEALVOL_SNAPSHOT_RETENTION": "2",
        "SEALVOL_SNAPSHOT_GC_GRACE": "0",
    })
    sv2.run("register-directory", "--directory-id", "d-906734f0a1")
    (tmp_path / "b" / "etc").mkdir(parents=True)
    sv2.run("create-bundle", "--bundle-id", "wsb-test1", "--from-dir", str(tmp_path / "b"), "--size-gib", "1")
    try:
        ws = sv2.launch("snap-auto", key=cmk)

        def times():
            return [s["SnapshotTime"] for s in
                    sv2.json("describe-workspace-snapshots", "--workspace-id", ws)["RestoreSnapshots"]]

        wait_for(lambda: len(times()) >= 1, timeout=60, what="the first automatic snapshot")
        first = times()[0]
        write_file(sv2.mnt(ws) / "home" / "x.bin", os.urandom(1 << 20))
        wait_for(lambda: first not in times(), timeout=60, what="retention dropping the first snapshot")
        assert 1 <= len(times()) <= 2, "retention keeps 2"
        snaps = sv2.state_dir / "snapshots"
        manifests = [json.loads(p.read_text()) for p in (snaps / "workspaces" / ws).rglob("*.json")]
        assert manifests and all(m["automatic"] for m in manifests)
        # A snapshot uploading right now may hold chunks no manifest names yet: compare
        # once the schedule is stopped, after one last snapshot has run the collection.
        sv2.run("stop-workspaces", "--workspace-ids", ws)
        sv2.json("create-snapshot", "--workspace-id", ws)
        manifests = [json.loads(p.read_text()) for p in (snaps / "workspaces" / ws).rglob("*.json")]
        referenced = {h for m in manifests for h in m["chunks"] if h}
        stored = {p.name for p in (snaps / "chunks").iterdir()}
        assert stored == referenced, f"{len(stored - referenced)} unreferenced chunks left"
    finally:
        sv2.terminate_all()


def test_an_interrupted_snapshot_leaves_no_manifest_and_the_retry_resumes(sv, cmk):
    ws = sv.launch("snap-resume", key=cmk, user_gib="2")
    write_file(sv.mnt(ws) / "home" / "big.bin", os.urandom(384 << 20))
    chunks = store_dir(sv) / "chunks"

    def stored_chunks():
        return {c.name for c in chunks.iterdir() if not c.name.startswith(".")} if chunks.exists() else set()

    before = stored_chunks()
    p = subprocess.Popen([*sv_cmd(), "create-snapshot", "--workspace-id", ws], env=sv.env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: len(stored_chunks() - before) >= 40, timeout=120, what="the upload under way")
    p.kill()
    p.wait()
    assert not list((store_dir(sv) / "workspaces").rglob(f"{ws}/*/*.json")), "no manifest: no snapshot"
    already = len(stored_chunks() - before)
    snaps = snapshot(sv, ws)  # the agent aborted the view when the connection dropped
    up = snaps["root"]["Upload"]["ChunksUploaded"] + snaps["user"]["Upload"]["ChunksUploaded"]
    stored = len(stored_chunks() - before)
    assert up <= stored - already, f"chunks uploaded before the kill are not sent again ({up}, {stored}, {already})"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_a_snapshot_of_another_users_workspace_is_refused(sv, cmk):
    a = sv.launch("snap-owner-a", key=cmk)
    b = sv.launch("snap-owner-b", key=cmk)
    write_file(sv.mnt(a) / "home" / "a.txt", b"a's data\n")
    snapshot(sv, a)
    snapshot(sv, b)
    # Plant A's newest manifests under B's prefix, later than B's own.
    for kind in ("root", "user"):
        src = sorted((store_dir(sv) / "workspaces" / a / kind).glob("*.json"))[-1]
        dst = store_dir(sv) / "workspaces" / b / kind / "2999-01-01T00:00:00.000Z.json"
        dst.write_bytes(src.read_bytes())
    r = sv.run("restore-workspace", "--workspace-id", b, "--output", "json", check=False)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and f"belongs to WorkSpace {a}" in out, out
    assert sv.describe(b)["State"] == "AVAILABLE"
    assert not (sv.mnt(b) / "home" / "a.txt").exists()
    sv.run("terminate-workspaces", "--workspace-ids", a, b)


def sv_cmd():
    from sealvol_testing.sealvol import SEALVOL

    return [SEALVOL]


def test_snapshots_asked_for_at_once_run_one_after_the_other(sv, cmk):
    ws = sv.launch("snap-twice", key=cmk)
    write_file(sv.mnt(ws) / "home" / "x.bin", os.urandom(64 << 20))
    procs = [subprocess.Popen([*sv_cmd(), "create-snapshot", "--workspace-id", ws, "--output", "json"],
                              env=sv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    times = {json.loads(o)["Snapshots"][0]["SnapshotTime"] for o, _ in outs}
    assert len(times) == 2
    d = sv.json("describe-workspace-snapshots", "--workspace-id", ws)
    assert len(d["RestoreSnapshots"]) == 2
    sv.run("terminate-workspaces", "--workspace-ids", ws)
