"""Encrypt/Decrypt/ReEncrypt/GenerateDataKey*, encryption context binding, blob
robustness, key states, and the Decrypt check order of DESIGN §3."""

import base64
import os

import pytest
from botocore.exceptions import ClientError

from sealvol_testing.kms import error_code

CTX = {"aws:workspaces:sid-directoryid": "S-1-5-21-1@d-9067e2b3a1", "aws:ebs:id": "vol-0123456789abcdef0"}


def test_encrypt_decrypt_round_trip(admin, key):
    r = admin.encrypt(KeyId=key, Plaintext=b"hello", EncryptionContext=CTX)
    assert r["KeyId"].endswith(key) and r["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT"
    d = admin.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CTX)
    assert d["Plaintext"] == b"hello" and d["KeyId"].endswith(key)
    d = admin.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CTX, KeyId=key)
    assert d["Plaintext"] == b"hello"


def test_context_must_match_exactly(admin, key):
    blob = admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=CTX)["CiphertextBlob"]
    for wrong in ({}, {"aws:ebs:id": CTX["aws:ebs:id"]}, {**CTX, "extra": "1"}, {**CTX, "aws:ebs:id": "vol-other"},
                  {k.upper(): v for k, v in CTX.items()}):
        with pytest.raises(ClientError) as e:
            admin.decrypt(CiphertextBlob=blob, EncryptionContext=wrong)
        assert error_code(e) == "InvalidCiphertextException", wrong


def test_ambiguous_context_does_not_decrypt(admin, key):
    blob = admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext={"a": "bc"})["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob, EncryptionContext={"ab": "c"})
    assert error_code(e) == "InvalidCiphertextException"
    assert admin.decrypt(CiphertextBlob=blob, EncryptionContext={"a": "bc"})["Plaintext"] == b"x"


def test_generate_data_key_variants(admin, key):
    r = admin.generate_data_key(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)
    assert len(r["Plaintext"]) == 64
    assert admin.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CTX)["Plaintext"] == r["Plaintext"]
    assert len(admin.generate_data_key(KeyId=key, KeySpec="AES_256")["Plaintext"]) == 32
    assert len(admin.generate_data_key(KeyId=key, KeySpec="AES_128")["Plaintext"]) == 16
    w = admin.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64, EncryptionContext=CTX)
    assert "Plaintext" not in w
    assert len(admin.decrypt(CiphertextBlob=w["CiphertextBlob"], EncryptionContext=CTX)["Plaintext"]) == 64
    for kwargs in ({}, {"NumberOfBytes": 0}, {"NumberOfBytes": 1025}, {"NumberOfBytes": 32, "KeySpec": "AES_256"}):
        with pytest.raises(ClientError) as e:
            admin.generate_data_key(KeyId=key, **kwargs)
        assert error_code(e) == "ValidationException", kwargs


def test_encrypt_limits(admin, key):
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key, Plaintext=os.urandom(4097))
    assert error_code(e) == "ValidationException"
    admin.encrypt(KeyId=key, Plaintext=os.urandom(4096))


def test_re_encrypt(admin, key):
    dst = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"move me", EncryptionContext=CTX)["CiphertextBlob"]
    r = admin.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CTX, DestinationKeyId=dst,
                         DestinationEncryptionContext={"new": "ctx"})
    assert r["SourceKeyId"].endswith(key) and r["KeyId"].endswith(dst)
    d = admin.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext={"new": "ctx"})
    assert d["Plaintext"] == b"move me" and d["KeyId"].endswith(dst)
    with pytest.raises(ClientError) as e:
        admin.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext={}, DestinationKeyId=dst)
    assert error_code(e) == "InvalidCiphertextException"
    with pytest.raises(ClientError) as e:
        admin.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CTX, SourceKeyId=dst, DestinationKeyId=dst)
    assert error_code(e) == "IncorrectKeyException"


def test_forged_and_truncated_blobs(admin, key):
    blob = admin.encrypt(KeyId=key, Plaintext=b"secret")["CiphertextBlob"]
    cases = [b"\x00", blob[:10], blob[:-1], blob[:53], os.urandom(len(blob)), os.urandom(6000),
             bytes([blob[0] ^ 1]) + blob[1:], blob[:60] + bytes([blob[60] ^ 0x80]) + blob[61:],
             blob[:-1] + bytes([blob[-1] ^ 1]), b"\x01" + b"z" * 100]
    for forged in cases:
        with pytest.raises(ClientError) as e:
            admin.decrypt(CiphertextBlob=forged)
        assert error_code(e) == "InvalidCiphertextException", forged[:8]


def test_blob_naming_unknown_key(admin, key):
    blob = bytearray(admin.encrypt(KeyId=key, Plaintext=b"secret")["CiphertextBlob"])
    blob[1:37] = b"00000000-0000-4000-8000-000000000000"
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=bytes(blob))
    assert error_code(e) == "InvalidCiphertextException"


def test_decrypt_with_wrong_key_id_is_incorrect_key(admin, key):
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob, KeyId=other)
    assert error_code(e) == "IncorrectKeyException"


def test_disabled_key_refuses_crypto(admin, key):
    blob = admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=CTX)["CiphertextBlob"]
    admin.disable_key(KeyId=key)
    for call in (lambda: admin.decrypt(CiphertextBlob=blob, EncryptionContext=CTX),
                 lambda: admin.encrypt(KeyId=key, Plaintext=b"x"),
                 lambda: admin.generate_data_key_without_plaintext(KeyId=key, NumberOfBytes=64)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "DisabledException"
    admin.enable_key(KeyId=key)
    assert admin.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)["Plaintext"] == b"x"


def test_pending_deletion_key_refuses_crypto(admin, key):
    blob = admin.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
    admin.schedule_key_deletion(KeyId=key, PendingWindowInDays=7)
    for call in (lambda: admin.decrypt(CiphertextBlob=blob), lambda: admin.encrypt(KeyId=key, Plaintext=b"x"),
                 lambda: admin.generate_data_key(KeyId=key, NumberOfBytes=64)):
        with pytest.raises(ClientError) as e:
            call()
        assert error_code(e) == "KMSInvalidStateException"
    admin.cancel_key_deletion(KeyId=key)
    admin.enable_key(KeyId=key)
    assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == b"x"


def test_decrypt_check_order(admin, ebs, key):
    """parse -> KeyId -> authorization -> key state -> context."""
    other = admin.create_key()["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=CTX)["CiphertextBlob"]
    # 1. an unparsable blob wins over a wrong KeyId and over missing authorization
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=b"\x07garbage" * 8, KeyId=other)
    assert error_code(e) == "InvalidCiphertextException"
    # 2. a wrong KeyId wins over missing authorization
    with pytest.raises(ClientError) as e:
        ebs.decrypt(CiphertextBlob=blob, KeyId=other, EncryptionContext=CTX)
    assert error_code(e) == "IncorrectKeyException"
    admin.disable_key(KeyId=key)
    try:
        # 3. authorization wins over key state
        with pytest.raises(ClientError) as e:
            ebs.decrypt(CiphertextBlob=blob, EncryptionContext=CTX)
        assert error_code(e) == "AccessDeniedException"
        # 4. key state wins over a wrong context
        with pytest.raises(ClientError) as e:
            admin.decrypt(CiphertextBlob=blob, EncryptionContext={"wrong": "ctx"})
        assert error_code(e) == "DisabledException"
    finally:
        admin.enable_key(KeyId=key)
    # 5. the context is checked last
    with pytest.raises(ClientError) as e:
        admin.decrypt(CiphertextBlob=blob, EncryptionContext={"wrong": "ctx"})
    assert error_code(e) == "InvalidCiphertextException"


def test_dry_run(admin, key):
    with pytest.raises(ClientError) as e:
        admin.encrypt(KeyId=key, Plaintext=b"x", DryRun=True)
    assert error_code(e) == "DryRunOperationException"


def test_rotation_then_decrypt_old_blob(fresh_daemon):
    admin = fresh_daemon.client("admin")
    key = admin.create_key()["KeyMetadata"]["KeyId"]
    admin.enable_key_rotation(KeyId=key, RotationPeriodInDays=90)
    old = admin.encrypt(KeyId=key, Plaintext=b"year one", EncryptionContext=CTX)["CiphertextBlob"]
    fresh_daemon.advance_clock(91 * 86400)
    new = admin.encrypt(KeyId=key, Plaintext=b"year two", EncryptionContext=CTX)["CiphertextBlob"]
    assert old[37:41] != new[37:41], "blob must name a newer material version after rotation"
    rotations = admin.list_key_rotations(KeyId=key)["Rotations"]
    assert len(rotations) == 1
    fresh_daemon.advance_clock(91 * 86400)
    admin.rotate_key_on_demand(KeyId=key)
    assert len(admin.list_key_rotations(KeyId=key)["Rotations"]) == 3
    assert admin.decrypt(CiphertextBlob=old, EncryptionContext=CTX)["Plaintext"] == b"year one"
    assert admin.decrypt(CiphertextBlob=new, EncryptionContext=CTX)["Plaintext"] == b"year two"
    # Customer managed keys without rotation enabled never rotate.
    plain = admin.create_key()["KeyMetadata"]["KeyId"]
    b1 = admin.encrypt(KeyId=plain, Plaintext=b"x")["CiphertextBlob"]
    fresh_daemon.advance_clock(5 * 365 * 86400)
    b2 = admin.encrypt(KeyId=plain, Plaintext=b"x")["CiphertextBlob"]
    assert b1[37:41] == b2[37:41] == b"\x00\x00\x00\x01"
