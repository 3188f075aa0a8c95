"""The unmodified AWS CLI against the daemon, with the daemon-written profiles."""

import base64
import json


def test_aws_cli_round_trip(daemon, tmp_path):
    key = json.loads(daemon.cli("admin", "create-key", "--description", "cli").stdout)["KeyMetadata"]["KeyId"]
    daemon.cli("admin", "create-alias", "--alias-name", "alias/cli-key", "--target-key-id", key)
    described = json.loads(daemon.cli("alice", "describe-key", "--key-id", "alias/cli-key").stdout)
    assert described["KeyMetadata"]["KeyId"] == key
    (tmp_path / "pt").write_bytes(b"cli plaintext")
    enc = json.loads(daemon.cli("admin", "encrypt", "--key-id", key, "--plaintext", f"fileb://{tmp_path / 'pt'}",
                                "--encryption-context", "aws:ebs:id=vol-cli").stdout)
    (tmp_path / "ct").write_bytes(base64.b64decode(enc["CiphertextBlob"]))
    dec = json.loads(daemon.cli("admin", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'ct'}",
                                "--encryption-context", "aws:ebs:id=vol-cli").stdout)
    assert base64.b64decode(dec["Plaintext"]) == b"cli plaintext"
    bad = daemon.cli("admin", "decrypt", "--ciphertext-blob", f"fileb://{tmp_path / 'ct'}",
                     "--encryption-context", "aws:ebs:id=vol-other", check=False)
    assert bad.returncode != 0 and "InvalidCiphertextException" in bad.stderr
    gdk = json.loads(daemon.cli("admin", "generate-data-key-without-plaintext", "--key-id", key, "--number-of-bytes", "64").stdout)
    assert gdk["KeyId"].endswith(key)
    grant = json.loads(daemon.cli("admin", "create-grant", "--key-id", key, "--grantee-principal", "ebs.amazonaws.com",
                                  "--operations", "Decrypt").stdout)
    grants = json.loads(daemon.cli("admin", "list-grants", "--key-id", key).stdout)["Grants"]
    assert grant["GrantId"] in [g["GrantId"] for g in grants]
    daemon.cli("admin", "revoke-grant", "--key-id", key, "--grant-id", grant["GrantId"])
    daemon.cli("admin", "disable-key", "--key-id", key)
    assert json.loads(daemon.cli("admin", "describe-key", "--key-id", key).stdout)["KeyMetadata"]["KeyState"] == "Disabled"
    daemon.cli("admin", "enable-key", "--key-id", key)
    out = json.loads(daemon.cli("admin", "schedule-key-deletion", "--key-id", key, "--pending-window-in-days", "7").stdout)
    assert out["KeyState"] == "PendingDeletion"
    daemon.cli("admin", "cancel-key-deletion", "--key-id", key)
    denied = daemon.cli("alice", "create-key", check=False)
    assert denied.returncode != 0 and "AccessDeniedException" in denied.stderr
    aliases = json.loads(daemon.cli("alice", "list-aliases").stdout)["Aliases"]
    assert "alias/cli-key" in [a["AliasName"] for a in aliases]
