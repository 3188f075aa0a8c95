"""The trust model under attack (issue 12, docs/threat-model.md T17-T21): nobody acts for
a user without the user's proof, explicit Deny wins everywhere, encryption contexts are
unambiguous. Each test is an attack that worked against the daemon before forward-access
tokens: a service key naming the account root in a header got the plaintext of a volume
key; a grantee holding CreateGrant slipped past a key-policy Deny; `Principal: "*"`
Denies did not stop services; an IAM Deny was not read when the key policy named the
user; keys differing only in case were read differently by grants and policies.

Every refusal must be AccessDeniedException (or ValidationException for bad input) and
leave an audit record."""

import json
import subprocess

import pytest
from botocore.exceptions import ClientError

from sealvol_testing.kms import ALICE, Daemon, error_code, ROOT
from sealvol_testing.paths import KMS_DAEMON_BIN, REPO

SAMPLE_KEY_POLICY = (REPO / "kms-daemon" / "policies" / "workspaces-key-policy.json").read_text()
LEGACY_ON_BEHALF_OF = "x-sealvol-on-behalf-of"
CTX = {"aws:ebs:id": "vol-0trust"}


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state").start()
    yield d
    d.stop()


def denied(call):
    with pytest.raises(ClientError) as e:
        call()
    return error_code(e)


def with_header(client, name, value):
    def add(request, **_):
        request.headers[name] = value
    client.meta.events.register("before-sign.kms.*", add)
    return client


def audit_lines(daemon):
    return [json.loads(line) for line in (daemon.state_dir / "audit.log").read_text().splitlines()]


def test_a_service_key_naming_root_in_a_header_gets_nothing(daemon):
    admin = daemon.client("admin")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"k" * 64, EncryptionContext=CTX)["CiphertextBlob"]
    for header in (LEGACY_ON_BEHALF_OF, "x-sealvol-forward-access"):
        for profile in ("ebs", "workspaces"):
            as_root = with_header(daemon.client(profile), header, ROOT)
            assert denied(lambda: as_root.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)) == "AccessDeniedException"
            assert denied(lambda: as_root.put_key_policy(KeyId=key, PolicyName="default", Policy=SAMPLE_KEY_POLICY)) == "AccessDeniedException"
            assert denied(lambda: as_root.create_key()) == "AccessDeniedException"
    assert admin.get_key_policy(KeyId=key, PolicyName="default")["Policy"] != SAMPLE_KEY_POLICY
    assert [k["KeyId"] for k in admin.list_keys()["Keys"]] == [key]


def test_forward_access_refusals_are_each_audited(daemon):
    admin = daemon.client("admin")
    key = admin.create_key(Policy=SAMPLE_KEY_POLICY)["KeyMetadata"]["KeyId"]
    ak_alice = daemon.credentials("alice")[0]
    good = daemon.client("workspaces", forward_for="alice")
    md = good.describe_key(KeyId=key)["KeyMetadata"]
    assert md["KeyId"] == key
    out = good.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)
    assert out["CiphertextBlob"]
    tok = daemon.forward_token("alice")
    ws, ebs = "workspaces.amazonaws.com", "ebs.amazonaws.com"
    attacks = [  # (what, presenter profile, presenter as audited, token)
        ("bare ARN", "workspaces", ws, ALICE),
        ("signed by another than the named user", "workspaces", ws, daemon.forward_token("alice", secret="not-alices-secret")),
        ("signed by a service", "workspaces", ws, daemon.forward_token("ebs")),
        ("expired", "workspaces", ws, daemon.forward_token("alice", age=301)),
        ("too long-lived", "workspaces", ws, daemon.forward_token("alice", expires=3600)),
        ("tampered nonce", "workspaces", ws, tok.replace("X-Sealvol-Nonce=", "X-Sealvol-Nonce=f")),
        ("tampered delegate", "workspaces", ws, tok.replace("workspaces.amazonaws.com", "ebs.amazonaws.com")),
        ("naming another delegate", "workspaces", ws, daemon.forward_token("alice", delegate=ebs)),
        ("for another endpoint", "workspaces", ws, daemon.forward_token("alice", host="kms.us-east-1.amazonaws.com")),
        ("presented by EBS", "ebs", ebs, tok),
        ("presented by the user", "alice", ALICE, tok),
        ("presented by root", "admin", ROOT, tok),
    ]
    before = len(audit_lines(daemon))
    for what, profile, _, token in attacks:
        client = daemon.client(profile, token=token)
        code = denied(lambda: client.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX))
        assert code == "AccessDeniedException", what
    records = audit_lines(daemon)[before:]
    assert len(records) == len(attacks), "one audit record per refused request"
    for (what, _, presenter, _), r in zip(attacks, records):
        assert r["eventName"] == "GenerateDataKeyWithoutPlaintext", what
        assert r["errorCode"] == "AccessDeniedException", what
        assert r["userIdentity"]["arn"] == presenter, f"{what}: audited under who signed the request"
        assert r["userIdentity"]["accessKeyId"] != ak_alice or presenter == ALICE, what
    ok = [r for r in audit_lines(daemon)[:before] if r["eventName"] == "GenerateDataKeyWithoutPlaintext" and "errorCode" not in r]
    assert ok and ok[-1]["userIdentity"]["arn"] == ALICE
    assert ok[-1]["userIdentity"]["invokedBy"] == "workspaces.amazonaws.com"
    assert ok[-1]["userIdentity"]["accessKeyId"] == ak_alice


def test_a_grantee_with_create_grant_cannot_pass_a_key_policy_deny(daemon):
    admin, alice = daemon.client("admin"), daemon.client("alice")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.create_grant(KeyId=key, GranteePrincipal=ALICE, Operations=["Decrypt", "CreateGrant"])
    deny = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Principal": {"AWS": ALICE}, "Action": "kms:CreateGrant", "Resource": "*"},
    ]}
    admin.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(deny))
    before = {g["GrantId"] for g in admin.list_grants(KeyId=key)["Grants"]}
    code = denied(lambda: alice.create_grant(KeyId=key, GranteePrincipal=ALICE, Operations=["Decrypt"]))
    assert code == "AccessDeniedException"
    assert {g["GrantId"] for g in admin.list_grants(KeyId=key)["Grants"]} == before


@pytest.mark.parametrize("principal", ["*", {"AWS": "*"}])
def test_a_deny_for_everyone_stops_services_using_their_grants(daemon, principal):
    admin, ebs = daemon.client("admin"), daemon.client("ebs")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.create_grant(KeyId=key, GranteePrincipal="ebs.amazonaws.com", Operations=["Decrypt"])
    blob = admin.encrypt(KeyId=key, Plaintext=b"k" * 64, EncryptionContext=CTX)["CiphertextBlob"]
    assert ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == b"k" * 64
    deny = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ROOT}, "Action": "kms:*", "Resource": "*"},
        {"Effect": "Deny", "Principal": principal, "Action": "kms:Decrypt", "Resource": "*"},
    ]}
    admin.put_key_policy(KeyId=key, PolicyName="default", Policy=json.dumps(deny))
    assert denied(lambda: ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)) == "AccessDeniedException"


def test_an_iam_deny_wins_over_a_key_policy_that_names_the_user(daemon, tmp_path):
    admin, alice = daemon.client("admin"), daemon.client("alice")
    # No account-root statement: the key policy alone allows Alice, so IAM allowances do
    # not count here, but an IAM Deny still does.
    allow_alice = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": ALICE}, "Action": ["kms:Encrypt", "kms:Decrypt"], "Resource": "*"},
    ]}
    key = admin.create_key(Policy=json.dumps(allow_alice))["KeyMetadata"]["KeyId"]
    blob = alice.encrypt(KeyId=key, Plaintext=b"secret", EncryptionContext=CTX)["CiphertextBlob"]
    iam_deny = tmp_path / "deny.json"
    iam_deny.write_text(json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Deny", "Action": "kms:Decrypt", "Resource": "*"}]}))
    subprocess.run([str(KMS_DAEMON_BIN), "put-principal-policy", "--state-dir", str(daemon.state_dir),
                    "--principal", ALICE, "--policy-file", str(iam_deny), "--policy-name", "NoDecrypt"], check=True, timeout=30)
    assert denied(lambda: alice.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)) == "AccessDeniedException"


def test_context_keys_that_differ_only_in_case_are_refused_everywhere(daemon):
    admin = daemon.client("admin")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    twin = {"aws:ebs:id": "vol-0trust", "AWS:EBS:ID": "vol-0other"}
    blob = admin.encrypt(KeyId=key, Plaintext=b"k" * 64, EncryptionContext=CTX)["CiphertextBlob"]
    calls = {
        "Encrypt": lambda: admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=twin),
        "Decrypt": lambda: admin.decrypt(CiphertextBlob=blob, EncryptionContext=twin),
        "GenerateDataKey": lambda: admin.generate_data_key(KeyId=key, NumberOfBytes=64, EncryptionContext=twin),
        "GenerateDataKeyWithoutPlaintext": lambda: admin.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=twin),
        "ReEncrypt": lambda: admin.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CTX, DestinationKeyId=key, DestinationEncryptionContext=twin),
        "CreateGrant": lambda: admin.create_grant(KeyId=key, GranteePrincipal="ebs.amazonaws.com", Operations=["Decrypt"], Constraints={"EncryptionContextEquals": twin}),
    }
    for op, call in calls.items():
        assert denied(call) == "ValidationException", op
    assert admin.list_grants(KeyId=key)["Grants"] == []


def test_asymmetric_create_key_needs_key_usage(daemon):
    admin = daemon.client("admin")
    assert denied(lambda: admin.create_key(KeySpec="RSA_2048")) == "ValidationException"
    assert admin.list_keys()["Keys"] == []
    md = admin.create_key(KeySpec="RSA_2048", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]
    assert md["KeyUsage"] == "ENCRYPT_DECRYPT"


def test_the_tightened_admin_policy_stops_self_granted_decrypt(daemon):
    """The seed's IAM policy allows kms:CreateGrant without kms:GrantIsForAWSResource, so
    Alice can grant herself Decrypt on a WorkSpaces key; the tightened one (threat model
    T25) allows grants only through WorkSpaces."""
    admin, alice = daemon.client("admin"), daemon.client("alice")
    key = admin.create_key(Policy=SAMPLE_KEY_POLICY)["KeyMetadata"]["KeyId"]
    self_grant = dict(KeyId=key, GranteePrincipal=ALICE, Operations=["Decrypt"])
    g = alice.create_grant(**self_grant)
    admin.revoke_grant(KeyId=key, GrantId=g["GrantId"])
    tightened = REPO / "kms-daemon" / "policies" / "alice-workspaces-iam-policy-tightened.json"
    subprocess.run([str(KMS_DAEMON_BIN), "put-principal-policy", "--state-dir", str(daemon.state_dir),
                    "--principal", ALICE, "--policy-file", str(tightened), "--policy-name", "WorkSpacesEncryptedVolumes"],
                   check=True, timeout=30)
    assert denied(lambda: alice.create_grant(**self_grant)) == "AccessDeniedException"
    via_ws = daemon.client("workspaces", forward_for="alice")
    via_ws.create_grant(KeyId=key, GranteePrincipal="ebs.amazonaws.com", Operations=["Decrypt"],
                        Constraints={"EncryptionContextEquals": CTX})
