"""State files, crash safety (kill -9), restart, clean SIGTERM shutdown, audit log."""

import json
import os
import stat
import subprocess

import pytest

from sealvol_testing.kms import Daemon, DAEMON_BIN
from sealvol_testing.paths import REPO

CTX = {"aws:ebs:id": "vol-durable"}


def test_state_files_and_modes(daemon):
    d = daemon.state_dir
    for name in ("kms.db", "root.key", "credentials", "config", "audit.log"):
        assert (d / name).exists(), name
    for name in ("root.key", "credentials"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    assert (d / "root.key").stat().st_size == 32
    creds = (d / "credentials").read_text()
    for profile in ("admin", "alice", "workspaces", "ebs"):
        assert f"[{profile}]" in creds
    config = (d / "config").read_text()
    assert "region = us-east-1" in config and f"endpoint_url = {daemon.endpoint}" in config


def test_refuses_readable_root_key(tmp_path):
    d = Daemon(tmp_path / "state").start()
    d.stop()
    os.chmod(tmp_path / "state" / "root.key", 0o640)
    p = subprocess.run([str(DAEMON_BIN), "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "root.key" in p.stderr


def test_help_documents_everything():
    out = subprocess.run([str(DAEMON_BIN), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--state-dir", "--listen", "--account", "--region", "--ready-file", "audit", "put-principal-policy"):
        assert flag in out, flag


def test_kill9_then_restart_decrypts(fresh_daemon):
    admin = fresh_daemon.client("admin")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.create_alias(AliasName="alias/durable", TargetKeyId=key)
    admin.enable_key_rotation(KeyId=key)
    blob = admin.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)["CiphertextBlob"]
    grant = admin.create_grant(KeyId=key, GranteePrincipal="ebs.amazonaws.com", Operations=["Decrypt"],
                               Constraints={"EncryptionContextEquals": CTX})
    admin.rotate_key_on_demand(KeyId=key)
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.disable_key(KeyId=other)
    fresh_daemon.kill9()
    fresh_daemon.start()
    admin = fresh_daemon.client("admin")
    ebs = fresh_daemon.client("ebs")
    assert len(ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"]) == 64
    assert admin.describe_key(KeyId="alias/durable")["KeyMetadata"]["KeyId"] == key
    assert admin.describe_key(KeyId=other)["KeyMetadata"]["KeyState"] == "Disabled"
    assert admin.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is True
    assert [g["GrantId"] for g in admin.list_grants(KeyId=key)["Grants"]] == [grant["GrantId"]]
    # Every acknowledged request left an audit record.
    names = [r["eventName"] for r in fresh_daemon.audit(key)]
    for n in ("CreateKey", "CreateAlias", "EnableKeyRotation", "GenerateDataKeyWithoutPlaintext", "CreateGrant", "RotateKeyOnDemand", "Decrypt"):
        assert n in names, n


def test_sigterm_exits_cleanly(fresh_daemon):
    fresh_daemon.client("admin").list_keys()
    assert fresh_daemon.stop() == 0


def test_audit_records_with_context(daemon, admin, ebs, key):
    ctx = {"aws:workspaces:sid-directoryid": "S-1@d-1", "aws:ebs:id": "vol-audit"}
    blob = admin.encrypt(KeyId=key, Plaintext=b"top secret plaintext", EncryptionContext=ctx)["CiphertextBlob"]
    admin.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    try:
        ebs.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)
    except Exception:
        pass
    records = daemon.audit(key, "Decrypt")
    assert len(records) == 2
    ok, denied = records
    assert ok["eventSource"] == "kms.amazonaws.com" and ok["eventName"] == "Decrypt"
    assert ok["requestParameters"]["encryptionContext"] == ctx
    assert ok["userIdentity"]["arn"] == "arn:aws:iam::111122223333:root"
    assert ok["resources"][0]["ARN"].endswith(key) and "errorCode" not in ok
    assert denied["errorCode"] == "AccessDeniedException" and denied["userIdentity"]["arn"] == "ebs.amazonaws.com"
    log = (daemon.state_dir / "audit.log").read_text()
    import base64
    assert "top secret plaintext" not in log and base64.b64encode(b"top secret plaintext").decode() not in log
    # Failed authentication is audited too.
    daemon.raw("TrentService.ListKeys", {}, access_key="AKIAUNKNOWNAUDIT0000")
    assert "AKIAUNKNOWNAUDIT0000" in (daemon.state_dir / "audit.log").read_text()


def test_refuses_to_start_without_root_key_for_existing_db(tmp_path):
    d = Daemon(tmp_path / "state").start()
    d.stop()
    os.remove(tmp_path / "state" / "root.key")
    p = subprocess.run([str(DAEMON_BIN), "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "root.key" in p.stderr
    assert not (tmp_path / "state" / "root.key").exists()


def test_oversized_request_is_audited(daemon):
    before = (daemon.state_dir / "audit.log").read_text().count("\n")
    status, _ = daemon.raw("TrentService.Encrypt", b"{" + b" " * (300 * 1024) + b"}", sign=False)
    assert status == 413
    lines = (daemon.state_dir / "audit.log").read_text().splitlines()
    assert len(lines) == before + 1
    assert json.loads(lines[-1])["errorCode"] == "ValidationException"


def test_kill9_under_load_loses_nothing_acknowledged(fresh_daemon):
    """Clients create keys, encrypt and grant concurrently; kill -9 lands mid-flight.
    Every acknowledged key, blob and grant, and the audit record of every acknowledged
    request, must survive the restart."""
    import threading
    from sealvol_testing.kms import wait_for

    acked = {"keys": [], "blobs": [], "grants": []}
    lock = threading.Lock()
    stop = threading.Event()

    def worker(n):
        c = fresh_daemon.client("admin")
        i = 0
        while not stop.is_set():
            try:
                key = c.create_key(Description=f"w{n}-{i}")["KeyMetadata"]["KeyId"]
                with lock:
                    acked["keys"].append(key)
                ctx = {"aws:ebs:id": f"vol-{n}-{i}"}
                blob = c.encrypt(KeyId=key, Plaintext=b"payload-%d-%d" % (n, i), EncryptionContext=ctx)["CiphertextBlob"]
                with lock:
                    acked["blobs"].append((key, blob, ctx, b"payload-%d-%d" % (n, i)))
                g = c.create_grant(KeyId=key, GranteePrincipal="ebs.amazonaws.com", Operations=["Decrypt"])["GrantId"]
                with lock:
                    acked["grants"].append((key, g))
            except Exception:
                return
            i += 1

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(acked["grants"]) >= 12, timeout=60, what="acknowledged writes")
    fresh_daemon.kill9()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    with lock:
        keys, blobs, grants = list(acked["keys"]), list(acked["blobs"]), list(acked["grants"])
    fresh_daemon.start()
    admin = fresh_daemon.client("admin")
    for key in keys:
        assert admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    for key, blob, ctx, plaintext in blobs:
        assert admin.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"] == plaintext
    for key, gid in grants:
        assert gid in [g["GrantId"] for g in admin.list_grants(KeyId=key)["Grants"]]
    log = [json.loads(l) for l in (fresh_daemon.state_dir / "audit.log").read_text().splitlines()]
    created = {r["resources"][0]["ARN"].rsplit("/", 1)[1] for r in log if r["eventName"] == "CreateKey" and "errorCode" not in r}
    assert set(keys) <= created
    encrypted = [r for r in log if r["eventName"] == "Encrypt" and "errorCode" not in r]
    assert len(encrypted) >= len(blobs)


def test_audit_identity_for_forward_access(daemon, admin, workspaces_for_alice):
    key = admin.create_key(Policy=(REPO / "kms-daemon" / "policies" / "workspaces-key-policy.json").read_text())["KeyMetadata"]["KeyId"]
    workspaces_for_alice.describe_key(KeyId=key)
    rec = daemon.audit(key, "DescribeKey")[-1]
    assert rec["userIdentity"]["arn"] == "arn:aws:iam::111122223333:user/Alice"
    assert rec["userIdentity"]["type"] == "IAMUser"
    assert rec["userIdentity"]["invokedBy"] == "workspaces.amazonaws.com"
    assert rec["userIdentity"]["accessKeyId"] == daemon.credentials("alice")[0], "the user's key signed the token"
    assert rec["readOnly"] is True and "errorCode" not in rec
