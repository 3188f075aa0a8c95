"""Snapshots in S3 (DESIGN §11) on a real Garage: a second host sharing the KMS and the
store imports a WorkSpace from its latest snapshots (refused while the first host holds
it), a three-node cluster loses a node during a snapshot and still restores every byte, and
an unreachable store, a wrong bucket or wrong credentials fail clearly with the running
WorkSpace untouched."""

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from sealvol_testing.sealvol import DIRECTORY, Sealvol


def write_file(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def add_store_profile(daemon, garage, name="garage"):
    """The store's own credentials, as a profile beside the KMS ones (the store belongs to
    the service, DESIGN §11)."""
    garage.write_aws_profile(daemon.state_dir, name)
    return name


def host(daemon, garage, root, prefix, profile):
    sv = Sealvol(root, daemon)
    sv.env.update({
        "SEALVOL_SNAPSHOT_STORE": f"s3://{garage.bucket}/{prefix}",
        "SEALVOL_SNAPSHOT_STORE_PROFILE": profile,
        "AWS_ENDPOINT_URL_S3": garage.endpoint,
        "SEALVOL_SNAPSHOT_INTERVAL": "0",
    })
    sv.run("register-directory", "--directory-id", DIRECTORY)
    (root / "b" / "etc").mkdir(parents=True)
    sv.run("create-bundle", "--bundle-id", "wsb-test1", "--from-dir", str(root / "b"), "--size-gib", "1")
    return sv


@pytest.fixture(scope="module")
def garage(tmp_path_factory):
    from sealvol_testing.garage import Garage

    with Garage(nodes=1, tmp_dir=tmp_path_factory.mktemp("garage")) as g:
        yield g


def sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_a_second_host_imports_the_workspace_only_once_the_first_lets_go(daemon, garage, cmk, tmp_path):
    profile = add_store_profile(daemon, garage)
    a = host(daemon, garage, tmp_path / "a", "import", profile)
    b = host(daemon, garage, tmp_path / "b", "import", profile)
    try:
        ws = a.launch("mover", key=cmk)
        write_file(a.mnt(ws) / "home" / "hello.txt", b"moved with its WorkSpace\n")
        data = os.urandom(3 << 20)
        write_file(a.mnt(ws) / "home" / "data.bin", data)
        taken = {s["Kind"]: s for s in a.json("create-snapshot", "--workspace-id", ws)["Snapshots"]}
        assert set(taken) == {"root", "user"}

        # B does not know the user yet: told so, with the SID to add.
        r = b.run("import-workspace", "--workspace-id", ws, "--output", "json", check=False)
        assert r.returncode != 0 and "ResourceNotFound.User" in r.stderr, r.stderr
        b.run("create-user", "--directory-id", DIRECTORY, "--user-name", "mover")
        # Host A still holds the WorkSpace: B is refused and keeps nothing.
        r = b.run("import-workspace", "--workspace-id", ws, "--output", "json", check=False)
        assert r.returncode != 0
        assert "ResourceInUseException" in r.stdout + r.stderr, r.stdout + r.stderr
        assert b.json("describe-workspaces")["Workspaces"] == []
        assert list((b.state_dir / "volumes").iterdir()) == []

        a.run("terminate-workspaces", "--workspace-ids", ws)
        out = b.json("import-workspace", "--workspace-id", ws)
        assert out["Workspace"]["WorkspaceId"] == ws
        assert b.describe(ws)["State"] == "AVAILABLE"
        assert (b.mnt(ws) / "home" / "hello.txt").read_text() == "moved with its WorkSpace\n"
        assert (b.mnt(ws) / "home" / "data.bin").read_bytes() == data
        vols = b.json("describe-volumes", "--workspace-id", ws)["Volumes"]
        for v in vols:
            assert v["VolumeId"] != taken[v["Kind"]]["VolumeId"], "imported volumes get their own ids"
            assert v["EncryptionContext"]["aws:ebs:id"] == v["VolumeId"], "blob re-bound to the new volume"

        # B continues the chain incrementally from A's snapshots.
        write_file(b.mnt(ws) / "home" / "on-b.txt", b"written on host B\n")
        again = {s["Kind"]: s for s in b.json("create-snapshot", "--workspace-id", ws)["Snapshots"]}
        u = again["user"]["Upload"]
        assert u["ChunksRead"] < u["Chunks"] // 4, f"incremental across hosts: {u}"
        assert u["BytesUploaded"] < 8 << 20, u
    finally:
        a.terminate_all()
        b.terminate_all()


def test_store_faults_fail_clearly_and_leave_the_workspace_running(daemon, garage, cmk, tmp_path):
    profile = add_store_profile(daemon, garage)
    sv = host(daemon, garage, tmp_path / "h", "faults", profile)
    try:
        ws = sv.launch("faulty", key=cmk)
        write_file(sv.mnt(ws) / "home" / "keep.txt", b"still here\n")
        sv.json("create-snapshot", "--workspace-id", ws)
        cases = {
            "unreachable": ({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}, ("SnapshotStore.Unavailable",)),
            "wrong bucket": ({"SEALVOL_SNAPSHOT_STORE": "s3://no-such-bucket-sealvol/x"}, ("no-such-bucket-sealvol",)),
            "wrong credentials": ({"SEALVOL_SNAPSHOT_STORE_PROFILE": "alice"}, ("SnapshotStore.Unavailable",)),
        }
        for name, (env, words) in cases.items():
            bad = Sealvol(sv.state_dir, daemon)
            bad.env = {**sv.env, **env}
            t0 = time.monotonic()
            r = bad.run("create-snapshot", "--workspace-id", ws, "--output", "json", check=False)
            took = time.monotonic() - t0
            out = r.stdout + r.stderr
            assert r.returncode != 0, name
            for w in words:
                assert w in out, f"{name}: {out}"
            assert took < 60, f"{name} took {took:.0f} s"
            r = bad.run("restore-workspace", "--workspace-id", ws, "--output", "json", check=False)
            assert r.returncode != 0, name
            assert sv.describe(ws)["State"] == "AVAILABLE", name
            assert (sv.mnt(ws) / "home" / "keep.txt").read_text() == "still here\n", name
    finally:
        sv.terminate_all()


def test_three_node_cluster_loses_a_node_during_a_snapshot(daemon, cmk, tmp_path):
    from sealvol_testing.garage import Garage

    with Garage(nodes=3, tmp_dir=tmp_path / "garage3") as g3:
        profile = add_store_profile(daemon, g3, name="garage3")
        sv = host(daemon, g3, tmp_path / "h", "three", profile)
        try:
            ws = sv.launch("replicated", key=cmk, user_gib="2")
            path = sv.mnt(ws) / "home" / "big.bin"
            write_file(path, os.urandom(96 << 20))
            want = sha(path)
            snap = subprocess.Popen(
                [*sv_cmd(sv), "create-snapshot", "--workspace-id", ws, "--output", "json"],
                env=sv.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            g3.kill(2)
            out, err = snap.communicate(timeout=300)
            if snap.returncode != 0:
                assert "SnapshotStore" in out + err, out + err  # a clear error, then a retry
                sv.json("create-snapshot", "--workspace-id", ws)
            write_file(path, b"overwritten after the snapshot")
            assert sv.json("restore-workspace", "--workspace-id", ws)["FailedRequests"] == []
            assert sha(sv.mnt(ws) / "home" / "big.bin") == want, "every byte back from the surviving nodes"
        finally:
            sv.terminate_all()


def sv_cmd(sv):
    from sealvol_testing.sealvol import SEALVOL

    return [SEALVOL]
