"""Key lifecycle, aliases, key policies, asymmetric specs, authorization of management."""

import json

import pytest
from botocore.exceptions import ClientError

from sealvol_testing.kms import ACCOUNT, ALICE, DAEMON_BIN, error_code, REGION
from sealvol_testing.paths import REPO

REPO_POLICIES = REPO / "kms-daemon" / "policies"


def test_create_describe_list(admin):
    md = admin.create_key(Description="volume keys")["KeyMetadata"]
    assert md["KeyState"] == "Enabled" and md["Enabled"] is True
    assert md["KeyManager"] == "CUSTOMER" and md["KeySpec"] == "SYMMETRIC_DEFAULT"
    assert md["KeyUsage"] == "ENCRYPT_DECRYPT" and md["EncryptionAlgorithms"] == ["SYMMETRIC_DEFAULT"]
    assert md["Arn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{md['KeyId']}"
    for ref in (md["KeyId"], md["Arn"]):
        assert admin.describe_key(KeyId=ref)["KeyMetadata"]["KeyId"] == md["KeyId"]
    ids = [k["KeyId"] for k in admin.get_paginator("list_keys").paginate().build_full_result()["Keys"]]
    assert md["KeyId"] in ids


def test_list_keys_paginates(admin):
    for _ in range(3):
        admin.create_key()
    first = admin.list_keys(Limit=2)
    assert len(first["Keys"]) == 2 and first["Truncated"] is True
    second = admin.list_keys(Limit=2, Marker=first["NextMarker"])
    assert {k["KeyId"] for k in first["Keys"]}.isdisjoint(k["KeyId"] for k in second["Keys"])
    with pytest.raises(ClientError) as e:
        admin.list_keys(Marker="not-a-marker")
    assert error_code(e) == "InvalidMarkerException"


def test_default_key_policy_is_account_root(admin, key):
    p = json.loads(admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    assert p["Statement"][0]["Principal"] == {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
    assert p["Statement"][0]["Action"] == "kms:*"


def test_unknown_and_invalid_key_ids(admin):
    for bad in ("00000000-0000-0000-0000-000000000000", "nonsense", "alias/nope",
                f"arn:aws:kms:{REGION}:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000",
                f"arn:aws:kms:eu-west-1:{ACCOUNT}:key/00000000-0000-0000-0000-000000000000"):
        with pytest.raises(ClientError) as e:
            admin.describe_key(KeyId=bad)
        assert error_code(e) == "NotFoundException", bad


def test_aliases(admin, key):
    admin.create_alias(AliasName="alias/vol-keys", TargetKeyId=key)
    assert admin.describe_key(KeyId="alias/vol-keys")["KeyMetadata"]["KeyId"] == key
    assert admin.describe_key(KeyId=f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/vol-keys")["KeyMetadata"]["KeyId"] == key
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="alias/vol-keys", TargetKeyId=key)
    assert error_code(e) == "AlreadyExistsException"
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="alias/aws/mine", TargetKeyId=key)
    assert error_code(e) == "InvalidAliasNameException"
    with pytest.raises(ClientError) as e:
        admin.create_alias(AliasName="no-prefix", TargetKeyId=key)
    assert error_code(e) == "ValidationException"
    listed = admin.list_aliases(KeyId=key)["Aliases"]
    assert [a["AliasName"] for a in listed] == ["alias/vol-keys"]
    assert listed[0]["AliasArn"] == f"arn:aws:kms:{REGION}:{ACCOUNT}:alias/vol-keys"
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.update_alias(AliasName="alias/vol-keys", TargetKeyId=other)
    assert admin.describe_key(KeyId="alias/vol-keys")["KeyMetadata"]["KeyId"] == other
    admin.delete_alias(AliasName="alias/vol-keys")
    with pytest.raises(ClientError) as e:
        admin.describe_key(KeyId="alias/vol-keys")
    assert error_code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        admin.delete_alias(AliasName="alias/vol-keys")
    assert error_code(e) == "NotFoundException"


def test_enable_disable(admin, key):
    admin.disable_key(KeyId=key)
    md = admin.describe_key(KeyId=key)["KeyMetadata"]
    assert md["KeyState"] == "Disabled" and md["Enabled"] is False
    admin.enable_key(KeyId=key)
    assert admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"


def test_schedule_and_cancel_deletion(admin, key):
    for bad in (6, 31):
        with pytest.raises(ClientError) as e:
            admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=bad)
        assert error_code(e) == "ValidationException"
    r = admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert r["KeyState"] == "PendingDeletion" and r["PendingWindowInDays"] == 7
    md = admin.describe_key(KeyId=key)["KeyMetadata"]
    assert md["KeyState"] == "PendingDeletion" and "DeletionDate" in md
    with pytest.raises(ClientError) as e:
        admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    assert error_code(e) == "KMSInvalidStateException"
    for op in (admin.enable_key, admin.disable_key):
        with pytest.raises(ClientError) as e:
            op(KeyId=key)
        assert error_code(e) == "KMSInvalidStateException"
    admin.cancel_key_deletion(KeyId=key)
    assert admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Disabled"
    with pytest.raises(ClientError) as e:
        admin.cancel_key_deletion(KeyId=key)
    assert error_code(e) == "KMSInvalidStateException"


def test_deletion_completes_after_window(fresh_daemon):
    admin = fresh_daemon.client("admin")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    fresh_daemon.advance_clock(6 * 86400)
    assert admin.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    fresh_daemon.advance_clock(86400 + 1)
    with pytest.raises(ClientError) as e:
        admin.describe_key(KeyId=key)
    assert error_code(e) == "NotFoundException"


def test_key_policy_put_get_malformed(admin, key):
    doc = (REPO_POLICIES / "workspaces-key-policy.json").read_text()
    admin.put_key_policy(KeyId=key, PolicyName="default", Policy=doc)
    assert json.loads(admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"]) == json.loads(doc)
    for bad in ("not json", '{"Statement": []}', '{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"kms:*","Resource":"*"}}',
                '{"Version":"2012-10-17","Statement":{"Effect":"Allow","Principal":"*","Action":"kms:*","Condition":{"Bogus":{"a":"b"}}}}'):
        with pytest.raises(ClientError) as e:
            admin.put_key_policy(KeyId=key, PolicyName="default", Policy=bad)
        assert error_code(e) == "MalformedPolicyDocumentException", bad
    with pytest.raises(ClientError) as e:
        admin.create_key(Policy="{}")
    assert error_code(e) == "MalformedPolicyDocumentException"
    with pytest.raises(ClientError) as e:
        admin.get_key_policy(KeyId=key, PolicyName="other")
    assert error_code(e) == "NotFoundException"


def test_policy_without_root_locks_out_admin(admin):
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": "kms:*", "Resource": "*"}]})
    key = admin.create_key(Policy=policy, BypassPolicyLockoutSafetyCheck=True)["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        admin.describe_key(KeyId=key)
    assert error_code(e) == "AccessDeniedException"


def test_explicit_deny_wins(admin, daemon):
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Principal": "*", "Action": "kms:Encrypt", "Resource": "*"}]})
    key = admin.create_key(Policy=policy)["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key, Plaintext=b"x")
    assert error_code(e) == "AccessDeniedException"
    admin.generate_data_key(KeyId=key, KeySpec="AES_256")


def test_alice_iam_policy_describe_list_only(admin, alice, key):
    assert alice.describe_key(KeyId=key)["KeyMetadata"]["KeyId"] == key
    alice.list_keys()
    alice.list_aliases()
    alice.list_grants(KeyId=key)
    for call in (lambda: alice.create_key(), lambda: alice.disable_key(KeyId=key),
                 lambda: alice.encrypt(KeyId=key, Plaintext=b"x"),
                 lambda: alice.generate_data_key(KeyId=key, NumberOfBytes=64)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "AccessDeniedException"


def test_put_principal_policy_subcommand(daemon, admin, key, tmp_path):
    import subprocess
    bob = f"arn:aws:iam::{ACCOUNT}:user/Bob"
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "kms:Encrypt", "Resource": "*"}]}))
    subprocess.run([str(DAEMON_BIN), "put-principal-policy", "--state-dir", str(daemon.state_dir), "--principal", bob,
                    "--policy-file", str(f)], check=True, timeout=30)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    p = subprocess.run([str(DAEMON_BIN), "put-principal-policy", "--state-dir", str(daemon.state_dir), "--principal", bob,
                        "--policy-file", str(bad)], capture_output=True, timeout=30)
    assert p.returncode != 0


def test_asymmetric_keys_created_but_refused_for_data_keys(admin):
    rsa = admin.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    assert rsa["KeySpec"] == "RSA_2048" and "RSAES_OAEP_SHA_256" in rsa["EncryptionAlgorithms"]
    ecc = admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
    assert ecc["SigningAlgorithms"] == ["ECDSA_SHA_256"]
    assert admin.describe_key(KeyId=ecc["KeyId"])["KeyMetadata"]["KeyUsage"] == "SIGN_VERIFY"
    for k in (rsa["KeyId"], ecc["KeyId"]):
        for call in (lambda: admin.generate_data_key(KeyId=k, NumberOfBytes=64),
                     lambda: admin.generate_data_key_without_plaintext(KeyId=k, NumberOfBytes=64),
                     lambda: admin.encrypt(KeyId=k, Plaintext=b"x")):
            with pytest.raises(ClientError) as e:
                call()
            assert error_code(e) == "InvalidKeyUsageException"
    with pytest.raises(ClientError) as e:
        admin.create_key(KeySpec="ECC_NIST_P256", KeyUsage="ENCRYPT_DECRYPT")
    assert error_code(e) == "ValidationException"


def test_rotation_status_and_on_demand(admin, key):
    assert admin.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False
    admin.enable_key_rotation(KeyId=key)
    st = admin.get_key_rotation_status(KeyId=key)
    assert st["KeyRotationEnabled"] is True and st["RotationPeriodInDays"] == 365
    with pytest.raises(ClientError) as e:
        admin.enable_key_rotation(KeyId=key, RotationPeriodInDays=10)
    assert error_code(e) == "ValidationException"
    blob = admin.encrypt(KeyId=key, Plaintext=b"before")["CiphertextBlob"]
    admin.rotate_key_on_demand(KeyId=key)
    assert "OnDemandRotationStartDate" in admin.get_key_rotation_status(KeyId=key)
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"before"
    admin.disable_key_rotation(KeyId=key)
    assert admin.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is False


def test_list_key_policies_and_policy_size_limit(admin, key):
    assert admin.list_key_policies(KeyId=key)["PolicyNames"] == ["default"]
    big = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "x" * 40000, "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}, "Action": "kms:*", "Resource": "*"}]})
    with pytest.raises(ClientError) as e:
        admin.put_key_policy(KeyId=key, PolicyName="default", Policy=big)
    assert error_code(e) == "LimitExceededException"


def test_list_key_rotations_types(admin, key):
    admin.rotate_key_on_demand(KeyId=key)
    rotations = admin.list_key_rotations(KeyId=key)["Rotations"]
    assert [r["RotationType"] for r in rotations] == ["ON_DEMAND"]
