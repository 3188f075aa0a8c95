"""The WorkSpaces story end to end: encrypted launch, I/O in /home, reboot, the key
disabled (refusals, the running WorkSpace keeps working), grants, terminate, snapshots,
rebuild, restore, dead agents, and the context binding that keeps volumes in their
WorkSpace."""

import base64
import json
import os
import signal
import subprocess

import pytest
from botocore.exceptions import ClientError

from sealvol_testing.kms import wait_for
from sealvol_testing.sealvol import DIRECTORY, KEY_POLICY


def write_synced(path, data):
    with open(path, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def test_encrypted_launch_reboot_and_key_disabled(sv, admin, cmk, daemon):
    ws = sv.launch("alice1", key=cmk)
    d = sv.describe(ws)
    assert d["State"] == "AVAILABLE"
    assert d["VolumeEncryptionKey"] == cmk
    assert d["RootVolumeEncryptionEnabled"] and d["UserVolumeEncryptionEnabled"]
    home = sv.mnt(ws) / "home"
    assert (sv.mnt(ws) / "etc" / "hostname").read_text() == "workspace\n", "root volume came from the bundle"
    write_synced(home / "notes.txt", "before reboot\n")
    # Both volumes sit on direct-I/O loop devices (the filesystem's queue depth reaches the agent).
    loops = subprocess.run(["losetup", "-l", "-n", "-O", "DIO,BACK-FILE"], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    ours = [line.split() for line in loops if ws in line]
    assert len(ours) == 2 and all(dio == "1" for dio, *_ in ours), loops

    # Grants: one for WorkSpaces (user subset), one per encrypted volume for EBS (full context).
    grants = admin.list_grants(KeyId=cmk)["Grants"]
    ebs_grants = [g for g in grants if g["GranteePrincipal"] == "ebs.amazonaws.com"]
    ws_grants = [g for g in grants if g["GranteePrincipal"] == "workspaces.amazonaws.com"]
    assert len(ebs_grants) == 2 and len(ws_grants) == 1, grants
    vols = sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]
    assert {v["Kind"] for v in vols} == {"root", "user"} and all(v["Encrypted"] for v in vols)
    vol_ids = {v["VolumeId"] for v in vols}
    assert {g["Constraints"]["EncryptionContextEquals"]["aws:ebs:id"] for g in ebs_grants} == vol_ids

    out = sv.json("reboot-workspaces", "--workspace-ids", ws)
    assert out["FailedRequests"] == []
    assert sv.describe(ws)["State"] == "AVAILABLE"
    assert (home / "notes.txt").read_text() == "before reboot\n"

    # Key disabled: reboot, rebuild, start-like operations refused, nothing changes, I/O goes on.
    admin.disable_key(KeyId=cmk)
    pid = sv.agent_pid(ws)
    for verb in ("reboot-workspaces", "rebuild-workspaces"):
        r = sv.run(verb, "--workspace-ids", ws, "--output", "json", check=False)
        assert r.returncode != 0
        failed = json.loads(r.stdout)["FailedRequests"]
        assert failed[0]["ErrorCode"] == "KMS.DisabledException", failed
        assert "Disabled" in failed[0]["ErrorMessage"]
    r = sv.run("restore-workspace", "--workspace-id", ws, "--output", "json", check=False)
    assert json.loads(r.stdout)["FailedRequests"][0]["ErrorCode"] == "KMS.DisabledException"
    d = sv.describe(ws)
    assert d["State"] == "AVAILABLE" and "Disabled" in d.get("KeyWarning", "")
    assert sv.agent_pid(ws) == pid, "agent untouched"
    write_synced(home / "while-disabled.txt", "still working\n")
    assert (home / "while-disabled.txt").read_text() == "still working\n"
    table = sv.run("describe-workspaces", "--workspace-ids", ws).stdout
    assert "Volume Encryption" in table and "Encrypted Volumes:   Root, User" in table and "WARNING" in table

    admin.enable_key(KeyId=cmk)
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "while-disabled.txt").read_text() == "still working\n"

    # Audit: every GenerateDataKeyWithoutPlaintext and Decrypt with its context.
    records = [json.loads(l) for l in (daemon.state_dir / "audit.log").read_text().splitlines() if l.strip()]
    for vid in vol_ids:
        gens = [r for r in records if r["eventName"] == "GenerateDataKeyWithoutPlaintext"
                and (r.get("requestParameters") or {}).get("encryptionContext", {}).get("aws:ebs:id") == vid]
        decs = [r for r in records if r["eventName"] == "Decrypt" and not r.get("errorCode")
                and (r.get("requestParameters") or {}).get("encryptionContext", {}).get("aws:ebs:id") == vid]
        assert len(gens) == 1, vid
        assert len(decs) >= 3, f"launch + 2 reboots unwrap {vid}"
        assert decs[0]["requestParameters"]["encryptionContext"]["aws:workspaces:sid-directoryid"].endswith("@" + DIRECTORY)

    # Terminate: grants retired, volumes gone, EBS can no longer unwrap the old blob.
    header_vol = next(v for v in vols if v["Kind"] == "user")
    vol_json = json.loads(sv.run("describe-volume", "--path", header_vol["Path"], "--output", "json").stdout)
    blob = base64.b64decode(vol_json["KmsToken"]["ciphertext_blob"])
    ctx = vol_json["KmsToken"]["encryption_context"]
    assert sv.json("terminate-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert sv.describe(ws)["State"] == "TERMINATED"
    left = [g for g in admin.list_grants(KeyId=cmk)["Grants"] if g["GranteePrincipal"] in ("ebs.amazonaws.com", "workspaces.amazonaws.com")]
    assert left == [], left
    assert not os.path.exists(header_vol["Path"])
    with pytest.raises(ClientError) as e:
        daemon.client("ebs").decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    assert e.value.response["Error"]["Code"] == "AccessDeniedException"


def test_refusals_image_and_encryption_changes(sv, cmk):
    ws = sv.launch("alice2", key=cmk, root=False, userv=True)
    r = sv.run("create-workspace-image", "--workspace-id", ws, "--name", "img", check=False)
    assert r.returncode != 0 and "OperationNotSupportedException" in r.stderr
    r = sv.run("modify-workspace-properties", "--workspace-id", ws, "--root-volume-encryption-enabled", "true", check=False)
    assert r.returncode != 0 and "cannot encrypt existing WorkSpace" in r.stderr
    r = sv.run("modify-workspace-properties", "--workspace-id", ws, "--user-volume-encryption-enabled", "false", check=False)
    assert r.returncode != 0 and "cannot disable encryption" in r.stderr
    # A second WorkSpace for the same user is refused.
    r = sv.run("create-workspaces", "--directory-id", DIRECTORY, "--user-name", "alice2", "--bundle-id", "wsb-test1", "--output", "json", check=False)
    assert json.loads(r.stdout)["FailedRequests"][0]["ErrorCode"] == "ResourceExists.Workspace"
    assert sv.describe(ws)["State"] == "AVAILABLE"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_unencrypted_workspace_and_image(sv):
    ws = sv.launch("bob", root=False, userv=False)
    d = sv.describe(ws)
    assert not d["RootVolumeEncryptionEnabled"] and not d["UserVolumeEncryptionEnabled"] and "VolumeEncryptionKey" not in d
    write_synced(sv.mnt(ws) / "home" / "plain.txt", "x")
    img = sv.json("create-workspace-image", "--workspace-id", ws, "--name", "golden")
    assert img["ImageId"].startswith("wsi-")
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_default_key_is_aws_managed(sv, admin):
    ws = sv.launch("carol", key=None, root=True, userv=True)
    d = sv.describe(ws)
    meta = admin.describe_key(KeyId="alias/aws/workspaces")["KeyMetadata"]
    assert meta["KeyManager"] == "AWS"
    assert d["VolumeEncryptionKey"] == meta["Arn"]
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_stop_start_and_dead_agent(sv, cmk):
    ws = sv.launch("dave", key=cmk)
    home = sv.mnt(ws) / "home"
    write_synced(home / "acked.txt", "fsync acknowledged\n")
    os.kill(sv.agent_pid(ws), signal.SIGKILL)
    wait_for(lambda: sv.describe(ws)["State"] == "UNHEALTHY", what="UNHEALTHY after kill -9")
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert sv.describe(ws)["State"] == "AVAILABLE"
    assert (home / "acked.txt").read_text() == "fsync acknowledged\n"
    assert sv.json("stop-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert sv.describe(ws)["State"] == "STOPPED"
    assert not os.path.ismount(sv.mnt(ws))
    r = sv.run("reboot-workspaces", "--workspace-ids", ws, "--output", "json", check=False)
    assert json.loads(r.stdout)["FailedRequests"][0]["ErrorCode"] == "InvalidResourceStateException"
    assert sv.json("start-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "acked.txt").read_text() == "fsync acknowledged\n"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_snapshot_rebuild_restore(sv, admin, cmk):
    ws = sv.launch("erin", key=cmk)
    home = sv.mnt(ws) / "home"
    write_synced(home / "kept.txt", "in the snapshot\n")
    snaps = sv.json("create-snapshot", "--workspace-id", ws)["Snapshots"]
    assert {s["Kind"] for s in snaps} == {"root", "user"} and all(s["Encrypted"] for s in snaps)
    write_synced(home / "later.txt", "after the snapshot\n")
    write_synced(sv.mnt(ws) / "etc" / "junk", "root change\n")
    assert sv.json("rebuild-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "kept.txt").read_text() == "in the snapshot\n"
    assert not (home / "later.txt").exists(), "user volume came from the latest snapshot"
    assert not (sv.mnt(ws) / "etc" / "junk").exists(), "root came from the bundle"
    before = {v["Kind"]: v["VolumeId"] for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]}
    assert sv.json("restore-workspace", "--workspace-id", ws)["FailedRequests"] == []
    after = sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]
    assert all(v["VolumeId"] != before[v["Kind"]] for v in after), "restored volumes are new volumes"
    for v in after:
        assert v["EncryptionContext"]["aws:ebs:id"] == v["VolumeId"], "blob re-encrypted to the new context"
    assert (home / "kept.txt").read_text() == "in the snapshot\n"
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_volume_copied_to_another_workspace_is_unreadable(sv, cmk, admin):
    a = sv.launch("frank", key=cmk)
    b = sv.launch("grace", key=cmk)
    write_synced(sv.mnt(a) / "home" / "secret.txt", "frank's data\n")
    va = {v["Kind"]: v for v in sv.json("describe-volumes", "--workspace-id", a)["Volumes"]}
    vb = {v["Kind"]: v for v in sv.json("describe-volumes", "--workspace-id", b)["Volumes"]}
    assert sv.json("stop-workspaces", "--workspace-ids", a, b)["FailedRequests"] == []
    # Grace's user volume file replaced by a copy of Frank's: same key, other context.
    subprocess.run(["cp", "--sparse=always", va["user"]["Path"], vb["user"]["Path"]], check=True)
    r = sv.run("start-workspaces", "--workspace-ids", b, "--output", "json", check=False)
    assert r.returncode != 0
    failed = json.loads(r.stdout)["FailedRequests"][0]
    assert failed["ErrorCode"] == "AttachFailed"
    assert "InvalidCiphertextException" in failed["ErrorMessage"] or "AccessDenied" in failed["ErrorMessage"], failed
    assert sv.describe(b)["State"] == "UNHEALTHY"
    assert not (sv.mnt(b) / "home" / "secret.txt").exists()
    # Frank's WorkSpace is unaffected.
    assert sv.json("start-workspaces", "--workspace-ids", a)["FailedRequests"] == []
    assert (sv.mnt(a) / "home" / "secret.txt").read_text() == "frank's data\n"
    sv.run("terminate-workspaces", "--workspace-ids", a, b)


def test_revoked_ebs_grant_fails_attach_clearly(sv, admin, cmk):
    ws = sv.launch("heidi", key=cmk)
    user_vol = next(v for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"] if v["Kind"] == "user")
    grant = next(g for g in admin.list_grants(KeyId=cmk)["Grants"]
                 if g["GranteePrincipal"] == "ebs.amazonaws.com"
                 and g["Constraints"]["EncryptionContextEquals"]["aws:ebs:id"] == user_vol["VolumeId"])
    admin.revoke_grant(KeyId=cmk, GrantId=grant["GrantId"])
    r = sv.run("reboot-workspaces", "--workspace-ids", ws, "--output", "json", check=False)
    failed = json.loads(r.stdout)["FailedRequests"][0]
    assert failed["ErrorCode"] == "AttachFailed"
    assert user_vol["VolumeId"] in failed["ErrorMessage"] and "AccessDeniedException" in failed["ErrorMessage"], failed
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_rewrap_to_another_key_then_retire_the_old_one(sv, admin, cmk, daemon):
    ws = sv.launch("ivan", key=cmk)
    home = sv.mnt(ws) / "home"
    write_synced(home / "data.txt", "survives rewrap\n")
    before = {v["VolumeId"]: os.path.getsize(v["Path"]) for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]}
    k2 = admin.create_key(Policy=KEY_POLICY, Description="rewrap target")["KeyMetadata"]["Arn"]
    vols = sv.json("rewrap-volume", "--workspace-id", ws, "--volume-encryption-key", k2)["Volumes"]
    assert all(v["KmsKeyId"] == k2 for v in vols)
    assert {v["VolumeId"] for v in vols} == set(before), "same volumes: no data rewritten"
    assert sv.describe(ws)["VolumeEncryptionKey"] == k2
    old = [g for g in admin.list_grants(KeyId=cmk)["Grants"] if g["GranteePrincipal"] in ("ebs.amazonaws.com", "workspaces.amazonaws.com")]
    assert old == [], "grants on the old key retired"
    admin.disable_key(KeyId=cmk)
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "data.txt").read_text() == "survives rewrap\n"
    admin.enable_key(KeyId=cmk)
    sv.run("terminate-workspaces", "--workspace-ids", ws)


def test_online_kms_rekey_while_writing(sv, admin, cmk, daemon):
    ws = sv.launch("judy", key=cmk)
    home = sv.mnt(ws) / "home"
    write_synced(home / "before.bin", "x" * 100000)
    vols = {v["Kind"]: v for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]}
    old_blob = json.loads(sv.run("describe-volume", "--path", vols["user"]["Path"], "--output", "json").stdout)["KmsToken"]["ciphertext_blob"]
    # Online: the agent keeps serving while the user volume is re-encrypted.
    writer = subprocess.Popen(["sh", "-c", f"for i in $(seq 1 200); do echo line-$i >> {home}/during.txt; done; sync"])
    out = sv.json("rekey-volume", "--workspace-id", ws, "--volume-id", vols["user"]["VolumeId"], "--hotzone-mib", "4")
    assert writer.wait(timeout=120) == 0
    assert [v for v, r in out["Volumes"]] == [vols["user"]["VolumeId"]]
    info = json.loads(sv.run("describe-volume", "--path", vols["user"]["Path"], "--output", "json").stdout)
    assert info["KmsToken"]["ciphertext_blob"] != old_blob, "header now holds the new data key's blob"
    assert "RekeyInProgress" not in info
    assert (home / "during.txt").read_text().splitlines()[-1] == "line-200"
    # Reboot unwraps the new key under the same grant and context.
    assert sv.json("reboot-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "before.bin").read_text() == "x" * 100000
    assert len((home / "during.txt").read_text().splitlines()) == 200
    # Stopped: offline rekey of every encrypted volume.
    assert sv.json("stop-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    out = sv.json("rekey-volume", "--workspace-id", ws)
    assert len(out["Volumes"]) == 2
    assert sv.json("start-workspaces", "--workspace-ids", ws)["FailedRequests"] == []
    assert (home / "before.bin").read_text() == "x" * 100000
    sv.run("terminate-workspaces", "--workspace-ids", ws)
