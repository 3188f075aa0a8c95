"""Wire protocol and SigV4 failures, exercised with an independent SigV4 signer."""

import datetime
import json

import pytest

from sealvol_testing.kms import FORWARD_ACCESS

DESCRIBE = "TrentService.ListKeys"


def test_independent_signer_is_accepted(daemon):
    status, body = daemon.raw(DESCRIBE, {})
    assert status == 200 and "Keys" in body


def test_missing_authorization(daemon):
    status, body = daemon.raw(DESCRIBE, {}, sign=False)
    assert status == 400 and body["__type"] == "MissingAuthenticationTokenException"


def test_unknown_access_key(daemon):
    status, body = daemon.raw(DESCRIBE, {}, access_key="AKIAUNKNOWNUNKNOWN00")
    assert status == 400 and body["__type"] == "UnrecognizedClientException"


def test_bad_signature(daemon):
    status, body = daemon.raw(DESCRIBE, {}, secret="wrong-secret-wrong-secret-wrong-secret00")
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_tampered_body(daemon, key):
    status, body = daemon.raw("TrentService.DescribeKey", {"KeyId": key},
                              tamper_body=('{"KeyId":"%s" }' % key).encode())
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_tampered_signed_header(daemon, key):
    # Sign as DescribeKey, then swap the target after signing.
    status, body = daemon.raw("TrentService.DescribeKey", {"KeyId": key},
                              unsigned_headers={"x-amz-target": "TrentService.DisableKey"})
    assert status == 400 and body["__type"] == "InvalidSignatureException"


def test_stale_and_future_timestamps(daemon):
    now = datetime.datetime.now(datetime.timezone.utc)
    for delta in (datetime.timedelta(minutes=-6), datetime.timedelta(hours=-2)):
        stamp = (now + delta).strftime("%Y%m%dT%H%M%SZ")
        status, body = daemon.raw(DESCRIBE, {}, amz_date=stamp)
        assert status == 400 and body["__type"] == "InvalidSignatureException" and "expired" in body["message"], body
    stamp = (now + datetime.timedelta(minutes=6)).strftime("%Y%m%dT%H%M%SZ")
    status, body = daemon.raw(DESCRIBE, {}, amz_date=stamp)
    assert status == 400 and body["__type"] in ("InvalidSignatureException", "IncompleteSignatureException")
    stamp = (now - datetime.timedelta(minutes=4)).strftime("%Y%m%dT%H%M%SZ")
    assert daemon.raw(DESCRIBE, {}, amz_date=stamp)[0] == 200


def test_incomplete_authorization_header(daemon):
    status, body = daemon.raw(DESCRIBE, {}, sign=False, unsigned_headers={"authorization": "AWS4-HMAC-SHA256 Credential=AKIA/x"})
    assert status == 400 and body["__type"] == "IncompleteSignatureException"


def test_unsigned_forward_access_header_is_refused(daemon, key):
    status, body = daemon.raw("TrentService.DescribeKey", {"KeyId": key}, profile="workspaces",
                              unsigned_headers={FORWARD_ACCESS: daemon.forward_token("alice")})
    assert status == 400 and body["__type"] == "IncompleteSignatureException"


def test_forward_access_presented_by_a_user_is_denied(daemon, key):
    status, body = daemon.raw("TrentService.DescribeKey", {"KeyId": key}, profile="alice",
                              extra_headers={FORWARD_ACCESS: daemon.forward_token("alice")})
    assert status == 400 and body["__type"] == "AccessDeniedException"


@pytest.mark.parametrize("payload", [
    b"{not json", b"[]", b'{"KeyId": 5}', b'{"KeyId": "k", "Bogus": 1}', b'"string"',
])
def test_malformed_requests(daemon, payload):
    status, body = daemon.raw("TrentService.DescribeKey", payload)
    assert status == 400 and body["__type"] == "SerializationException", body


def test_bad_base64(daemon):
    status, body = daemon.raw("TrentService.Decrypt", {"CiphertextBlob": "***not base64***"})
    assert status == 400 and body["__type"] == "SerializationException"


def test_wrong_type_context(daemon, key):
    status, body = daemon.raw("TrentService.Encrypt", {"KeyId": key, "Plaintext": "eA==", "EncryptionContext": {"a": ["b"]}})
    assert status == 400 and body["__type"] == "SerializationException"


def test_unknown_target(daemon):
    status, body = daemon.raw("TrentService.Frobnicate", {})
    assert status == 400 and body["__type"] == "UnknownOperationException"


def test_oversized_body_is_refused(daemon):
    status, body = daemon.raw("TrentService.Encrypt", b"{" + b" " * (300 * 1024) + b"}", sign=False)
    assert status == 413 and body["__type"] == "ValidationException"


def test_wrong_content_type(daemon):
    status, body = daemon.raw(DESCRIBE, {}, content_type="text/plain")
    assert status == 400 and body["__type"] == "SerializationException"


def test_stalled_connections_do_not_block_others(daemon):
    """Half-sent request heads hold only their own connection; others are served."""
    import socket
    host, port = daemon.endpoint.split("://", 1)[1].rsplit(":", 1)
    stalled = []
    try:
        for _ in range(50):
            s = socket.create_connection((host, int(port)), timeout=5)
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Tar")
            stalled.append(s)
        status, body = daemon.raw(DESCRIBE, {})
        assert status == 200 and "Keys" in body
    finally:
        for s in stalled:
            s.close()


def test_random_garbage_never_crashes_or_500s(daemon, key):
    """Random targets x mangled bodies: every answer is a clean 4xx with a __type, and
    the daemon keeps serving."""
    import base64
    import random
    rng = random.Random(1234)
    targets = ["Decrypt", "Encrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "ReEncrypt", "CreateGrant",
               "RetireGrant", "RevokeGrant", "PutKeyPolicy", "CreateAlias", "ScheduleKeyDeletion", "ListGrants",
               "DescribeKey", "ListAliases", "EnableKeyRotation"]
    values = [None, True, 0, -1, 2**63, 1.5, "", "x" * 5000, "alias/aws/workspaces", key, [], {}, {"a": 1}, ["t"],
              base64.b64encode(rng.randbytes(80)).decode(), "!!!", {"EncryptionContextEquals": {"a": "b"}}]
    fields = ["KeyId", "CiphertextBlob", "Plaintext", "EncryptionContext", "GrantTokens", "NumberOfBytes", "KeySpec",
              "Operations", "GranteePrincipal", "Constraints", "Policy", "AliasName", "TargetKeyId", "GrantId",
              "GrantToken", "PendingWindowInDays", "DestinationKeyId", "Limit", "Marker", "RotationPeriodInDays"]
    for i in range(300):
        body = {f: rng.choice(values) for f in rng.sample(fields, rng.randint(0, 5))}
        raw = json.dumps(body).encode()
        if i % 7 == 0:
            raw = raw[: rng.randint(0, len(raw))]
        status, resp = daemon.raw("TrentService." + rng.choice(targets), raw)
        assert status in (200, 400), (status, resp, raw)
        if status == 400:
            assert resp.get("__type") and "message" in resp, resp
    assert daemon.raw(DESCRIBE, {})[0] == 200
    assert daemon.proc.poll() is None
