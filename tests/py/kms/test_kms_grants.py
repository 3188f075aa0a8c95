"""Grants: enforcement for the EBS principal, constraints, tokens, retire/revoke,
narrower grants by a grantee, ListGrants/ListRetirableGrants, and the WorkSpaces
on-behalf-of flow with the sample key policy."""

import json

import pytest
from botocore.exceptions import ClientError

from sealvol_testing.kms import ACCOUNT, error_code
from sealvol_testing.paths import REPO

EBS = "ebs.amazonaws.com"
WS = "workspaces.amazonaws.com"
SID = "S-1-5-21-1111@d-906712345a"
CTX = {"aws:workspaces:sid-directoryid": SID, "aws:ebs:id": "vol-0aaa"}


def test_ebs_denied_without_grant_then_allowed_with_matching_one(admin, ebs, key):
    with pytest.raises(ClientError) as e:
        ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)
    assert error_code(e) == "AccessDeniedException"
    g = admin.create_grant(KeyId=key, GranteePrincipal=EBS, Operations=["GenerateDataKeyWithoutPlaintext", "Decrypt"],
                           Constraints={"EncryptionContextEquals": CTX})
    assert len(g["GrantId"]) == 64 and g["GrantToken"]
    blob = ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)["CiphertextBlob"]
    assert len(ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"]) == 64
    # Keys compare case-insensitively in constraints; the AAD still needs the exact context.
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=blob, EncryptionContext={k.upper(): v for k, v in CTX.items()})
    assert error_code(e) == "InvalidCiphertextException"
    for wrong in ({**CTX, "aws:ebs:id": "vol-0bbb"}, {"aws:ebs:id": "vol-0aaa"}, {**CTX, "x": "y"}, {},
                  {**CTX, "aws:ebs:id": "VOL-0AAA"}):
        with pytest.raises(ClientError) as e:
            ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=wrong)
        assert error_code(e) == "AccessDeniedException", wrong
    # Operations outside the grant stay denied.
    with pytest.raises(ClientError) as e:
        ebs.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=CTX)
    assert error_code(e) == "AccessDeniedException"


def test_retire_by_token_stops_authorizing(admin, ebs, key):
    g = admin.create_grant(KeyId=key, GranteePrincipal=EBS, RetiringPrincipal=EBS, Operations=["Decrypt", "GenerateDataKeyWithoutPlaintext"],
                           Constraints={"EncryptionContextSubset": {"aws:ebs:id": "vol-0aaa"}})
    blob = ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)["CiphertextBlob"]
    ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX, GrantTokens=[g["GrantToken"]])
    retirable = ebs.list_retirable_grants(RetiringPrincipal=EBS)["Grants"]
    assert g["GrantId"] in [x["GrantId"] for x in retirable]
    ebs.retire_grant(GrantToken=g["GrantToken"])
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
    assert error_code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        ebs.retire_grant(GrantToken=g["GrantToken"])
    assert error_code(e) == "NotFoundException"


def test_revoke_stops_authorizing(admin, ebs, key):
    g = admin.create_grant(KeyId=key, GranteePrincipal=EBS, Operations=["Decrypt", "Encrypt"])
    blob = ebs.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    ebs.decrypt(CiphertextBlob=blob)
    with pytest.raises(ClientError) as e:
        ebs.revoke_grant(KeyId=key, GrantId=g["GrantId"])
    assert error_code(e) == "AccessDeniedException"
    admin.revoke_grant(KeyId=key, GrantId=g["GrantId"])
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=blob)
    assert error_code(e) == "AccessDeniedException"
    with pytest.raises(ClientError) as e:
        admin.revoke_grant(KeyId=key, GrantId=g["GrantId"])
    assert error_code(e) == "NotFoundException"
    with pytest.raises(ClientError) as e:
        admin.revoke_grant(KeyId=key, GrantId="not-a-grant")
    assert error_code(e) == "InvalidGrantIdException"


def test_retire_by_id_and_who_may_retire(admin, ebs, workspaces, key):
    g = admin.create_grant(KeyId=key, GranteePrincipal=EBS, RetiringPrincipal=WS, Operations=["Decrypt"])
    with pytest.raises(ClientError) as e:
        ebs.retire_grant(KeyId=key, GrantId=g["GrantId"])
    assert error_code(e) == "AccessDeniedException"
    workspaces.retire_grant(KeyId=key, GrantId=g["GrantId"])
    assert g["GrantId"] not in [x["GrantId"] for x in admin.list_grants(KeyId=key)["Grants"]]


def test_list_grants_shape(admin, key):
    g = admin.create_grant(KeyId=key, GranteePrincipal=EBS, RetiringPrincipal=f"arn:aws:iam::{ACCOUNT}:root",
                           Operations=["Decrypt"], Constraints={"EncryptionContextSubset": {"a": "b"}}, Name="vol-grant")
    grants = admin.list_grants(KeyId=key)["Grants"]
    mine = [x for x in grants if x["GrantId"] == g["GrantId"]][0]
    assert mine["GranteePrincipal"] == EBS and mine["Name"] == "vol-grant" and mine["Operations"] == ["Decrypt"]
    assert mine["Constraints"] == {"EncryptionContextSubset": {"a": "b"}}
    assert mine["KeyId"].endswith(key) and mine["IssuingAccount"] == f"arn:aws:iam::{ACCOUNT}:root"
    assert admin.list_grants(KeyId=key, GrantId=g["GrantId"])["Grants"][0]["GrantId"] == g["GrantId"]


def test_create_grant_validation(admin, key):
    cases = [
        dict(GranteePrincipal="not-a-principal", Operations=["Decrypt"]),
        dict(GranteePrincipal=EBS, Operations=["Frobnicate"]),
        dict(GranteePrincipal=EBS, Operations=["DescribeKey"], Constraints={"EncryptionContextSubset": {"a": "b"}}),
        dict(GranteePrincipal=EBS, Operations=["Decrypt"], Constraints={"EncryptionContextSubset": {"a": "b"}, "EncryptionContextEquals": {"a": "b"}}),
    ]
    for kw in cases:
        with pytest.raises(ClientError) as e:
            admin.create_grant(KeyId=key, **kw)
        assert error_code(e) == "ValidationException", kw


def test_invalid_grant_token(admin, key):
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key, Plaintext=b"x", GrantTokens=["forged-token"])
    assert error_code(e) == "InvalidGrantTokenException"
    with pytest.raises(ClientError) as e:
        admin.retire_grant(GrantToken="forged-token")
    assert error_code(e) == "InvalidGrantTokenException"


def test_grantee_creates_only_narrower_grants(admin, workspaces, ebs, key):
    parent = admin.create_grant(KeyId=key, GranteePrincipal=WS, Operations=["CreateGrant", "Decrypt", "GenerateDataKeyWithoutPlaintext"],
                                Constraints={"EncryptionContextSubset": {"aws:workspaces:sid-directoryid": SID}})
    child = workspaces.create_grant(KeyId=key, GranteePrincipal=EBS, Operations=["Decrypt", "GenerateDataKeyWithoutPlaintext"],
                                    Constraints={"EncryptionContextEquals": CTX}, GrantTokens=[parent["GrantToken"]])
    ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX, GrantTokens=[child["GrantToken"]])
    wider = [
        dict(Operations=["Decrypt", "Encrypt"], Constraints={"EncryptionContextEquals": CTX}),
        dict(Operations=["Decrypt"]),
        dict(Operations=["Decrypt"], Constraints={"EncryptionContextSubset": {"aws:workspaces:sid-directoryid": "S-other@d-1"}}),
    ]
    for kw in wider:
        with pytest.raises(ClientError) as e:
            workspaces.create_grant(KeyId=key, GranteePrincipal=EBS, **kw)
        assert error_code(e) == "AccessDeniedException", kw
    with pytest.raises(ClientError) as e:
        ebs.create_grant(KeyId=key, GranteePrincipal=EBS, Operations=["Decrypt"], Constraints={"EncryptionContextEquals": CTX})
    assert error_code(e) == "AccessDeniedException"


def test_workspaces_flow_with_sample_key_policy(admin, alice, workspaces, workspaces_for_alice, ebs):
    """The launch steps: Alice's key with the published key policy; WorkSpaces acting for
    Alice describes it and grants itself; with that grant it grants EBS per volume; EBS
    generates the data key; attach decrypts it."""
    policy = (REPO / "kms-daemon" / "policies" / "workspaces-key-policy.json").read_text()
    key = admin.create_key(Policy=policy, Description="alice workspaces key")["KeyMetadata"]["KeyId"]
    # Alice alone may describe (IAM Describe*) and grant (IAM kms:CreateGrant, through the
    # root statement), but not use the key without going through WorkSpaces.
    alice.describe_key(KeyId=key)
    for call in (lambda: alice.generate_data_key(KeyId=key, NumberOfBytes=64),
                 lambda: alice.encrypt(KeyId=key, Plaintext=b"x"),
                 lambda: alice.disable_key(KeyId=key)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "AccessDeniedException"
    # Through WorkSpaces, Alice's key policy statements apply (kms:ViaService, GrantIsForAWSResource).
    assert workspaces_for_alice.describe_key(KeyId=key)["KeyMetadata"]["KeyState"] == "Enabled"
    ws_grant = workspaces_for_alice.create_grant(
        KeyId=key, GranteePrincipal=WS, RetiringPrincipal=WS,
        Operations=["CreateGrant", "Decrypt", "GenerateDataKeyWithoutPlaintext", "RetireGrant"],
        Constraints={"EncryptionContextSubset": {"aws:workspaces:sid-directoryid": SID}})
    # WorkSpaces without Alice (its own identity) has no key policy statement: only its grant.
    with pytest.raises(ClientError) as e:
        workspaces.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext={"aws:workspaces:sid-directoryid": "other"})
    assert error_code(e) == "AccessDeniedException"
    ebs_grant = workspaces.create_grant(KeyId=key, GranteePrincipal=EBS, RetiringPrincipal=WS,
                                        Operations=["Decrypt", "GenerateDataKeyWithoutPlaintext"],
                                        Constraints={"EncryptionContextEquals": CTX}, GrantTokens=[ws_grant["GrantToken"]])
    blob = ebs.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)["CiphertextBlob"]
    assert len(ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"]) == 64
    # Terminate: WorkSpaces retires both grants; EBS is denied again.
    workspaces.retire_grant(KeyId=key, GrantId=ebs_grant["GrantId"])
    workspaces.retire_grant(GrantToken=ws_grant["GrantToken"])
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
    assert error_code(e) == "AccessDeniedException"


def test_forward_access_only_for_workspaces_with_the_users_own_signature(daemon, key):
    """Nobody acts for a user without the user's proof (DESIGN §2): a bare ARN, a token
    signed with a guessed secret, or a token presented by anyone but WorkSpaces is refused,
    each with AccessDeniedException."""
    bare_root = daemon.client("ebs", token=f"arn:aws:iam::{ACCOUNT}:root")
    forged = daemon.client("workspaces", token=daemon.forward_token("admin", secret="guessed"))
    alice_presents = daemon.client("alice", token=daemon.forward_token("alice"))
    ebs_presents = daemon.client("ebs", token=daemon.forward_token("alice"))
    for c in (bare_root, forged, alice_presents, ebs_presents):
        with pytest.raises(ClientError) as e:
            c.describe_key(KeyId=key)
        assert error_code(e) == "AccessDeniedException"


def test_aws_managed_workspaces_key(daemon, admin, alice, workspaces, workspaces_for_alice, ebs):
    with pytest.raises(ClientError) as e:
        alice.describe_key(KeyId="alias/aws/workspaces")
    assert error_code(e) == "NotFoundException"
    md = workspaces_for_alice.describe_key(KeyId="alias/aws/workspaces")["KeyMetadata"]
    assert md["KeyManager"] == "AWS"
    again = workspaces.describe_key(KeyId="alias/aws/workspaces")["KeyMetadata"]
    assert again["KeyId"] == md["KeyId"], "created once"
    key = md["KeyId"]
    # Users can describe, list and read the policy...
    assert alice.describe_key(KeyId="alias/aws/workspaces")["KeyMetadata"]["KeyId"] == key
    assert "alias/aws/workspaces" in [a["AliasName"] for a in admin.list_aliases()["Aliases"]]
    json.loads(admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"])
    assert admin.get_key_rotation_status(KeyId=key)["KeyRotationEnabled"] is True
    # ...but not use, disable, re-policy or delete it.
    for call in (lambda: alice.generate_data_key(KeyId=key, NumberOfBytes=64),
                 lambda: admin.encrypt(KeyId=key, Plaintext=b"x"),
                 lambda: admin.disable_key(KeyId=key),
                 lambda: admin.put_key_policy(KeyId=key, PolicyName="default", Policy=admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"]),
                 lambda: admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=7),
                 lambda: admin.delete_alias(AliasName="alias/aws/workspaces"),
                 lambda: admin.disable_key_rotation(KeyId=key)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "AccessDeniedException"
    # WorkSpaces (for Alice) can use it.
    blob = workspaces_for_alice.encrypt(KeyId="alias/aws/workspaces", Plaintext=b"x", EncryptionContext=CTX)["CiphertextBlob"]
    assert workspaces_for_alice.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == b"x"


def test_aws_managed_key_rotates_every_three_years(fresh_daemon):
    ws = fresh_daemon.client("workspaces")
    admin = fresh_daemon.client("admin")
    key = ws.describe_key(KeyId="alias/aws/workspaces")["KeyMetadata"]["KeyId"]
    status = admin.get_key_rotation_status(KeyId=key)
    assert status["KeyRotationEnabled"] and status["RotationPeriodInDays"] == 1095
    old = ws.encrypt(KeyId=key, Plaintext=b"old", EncryptionContext=CTX)["CiphertextBlob"]
    fresh_daemon.advance_clock(1094 * 86400)
    assert ws.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"][37:41] == b"\x00\x00\x00\x01"
    fresh_daemon.advance_clock(2 * 86400)
    assert ws.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"][37:41] == b"\x00\x00\x00\x02"
    assert ws.decrypt(CiphertextBlob=old, EncryptionContext=CTX)["Plaintext"] == b"old"


def test_service_principal_fields_and_tokens(daemon, admin, ebs, key):
    """GranteeServicePrincipal / RetiringServicePrincipal (DESIGN §3) over the raw wire."""
    status, body = daemon.raw("TrentService.CreateGrant", {
        "KeyId": key, "GranteeServicePrincipal": EBS, "RetiringServicePrincipal": WS,
        "Operations": ["Decrypt", "Encrypt"], "Constraints": {"EncryptionContextSubset": {"aws:ebs:id": "vol-0svc"}}})
    assert status == 200, body
    ctx = {"aws:ebs:id": "vol-0svc"}
    blob = ebs.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=ctx, GrantTokens=[body["GrantToken"]])["CiphertextBlob"]
    assert ebs.decrypt(CiphertextBlob=blob, EncryptionContext=ctx)["Plaintext"] == b"x"
    grant = admin.list_grants(KeyId=key, GrantId=body["GrantId"])["Grants"][0]
    assert grant["GranteePrincipal"] == EBS and grant["RetiringPrincipal"] == WS
    assert body["GrantId"] in [g["GrantId"] for g in admin.list_retirable_grants(RetiringPrincipal=WS)["Grants"]]
    status, err = daemon.raw("TrentService.CreateGrant", {
        "KeyId": key, "GranteeServicePrincipal": "arn:aws:iam::111122223333:user/Alice", "Operations": ["Decrypt"]})
    assert status == 400 and err["__type"] == "ValidationException"
