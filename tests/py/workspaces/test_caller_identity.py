"""The controller never takes its caller's identity from a file (issue 12): before
forward-access tokens, a profile holding only `principal_arn = ...:root` in the config
file, and no credentials at all, launched WorkSpaces as the account root. Now every verb
that changes something needs a token signed with the caller's own credentials."""

import pytest

from sealvol_testing.sealvol import DIRECTORY

ROOT = "arn:aws:iam::111122223333:root"


@pytest.fixture
def mallory(sv, daemon, tmp_path):
    """The same controller, run with a profile that names root but has no credentials."""
    config = tmp_path / "config"
    config.write_text((daemon.state_dir / "config").read_text() + (
        "[profile mallory]\nregion = us-east-1\n"
        f"endpoint_url = {daemon.endpoint}\nprincipal_arn = {ROOT}\n"))
    env = dict(sv.env, AWS_CONFIG_FILE=str(config), AWS_PROFILE="mallory")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(k, None)
    return env


def run_as(sv, env, *args):
    saved = sv.env
    sv.env = env
    try:
        return sv.run(*args, check=False)
    finally:
        sv.env = saved


def test_a_profile_without_credentials_cannot_launch(sv, mallory, admin, cmk):
    sv.run("create-user", "--directory-id", DIRECTORY, "--user-name", "mallory-victim")
    before = sv.json("describe-workspaces")["Workspaces"]
    r = run_as(sv, mallory, "create-workspaces", "--directory-id", DIRECTORY, "--user-name", "mallory-victim",
               "--bundle-id", "wsb-test1", "--volume-encryption-key", cmk,
               "--root-volume-encryption-enabled", "--user-volume-encryption-enabled", "--output", "json")
    out = r.stdout + r.stderr
    assert r.returncode != 0 or '"FailedRequests": []' not in out.replace("\n", ""), out
    assert "no usable AWS credentials" in out, out
    assert sv.json("describe-workspaces")["Workspaces"] == before, "nothing launched"
    assert admin.list_grants(KeyId=cmk)["Grants"] == [], "no grant created"


def test_a_profile_without_credentials_cannot_touch_a_running_workspace(sv, mallory, cmk):
    ws = sv.launch("caller-owner", key=cmk)
    for verb in (["reboot-workspaces", "--workspace-ids", ws], ["terminate-workspaces", "--workspace-ids", ws],
                 ["stop-workspaces", "--workspace-ids", ws], ["rebuild-workspaces", "--workspace-ids", ws],
                 ["rewrap-volume", "--workspace-id", ws, "--volume-encryption-key", cmk]):
        r = run_as(sv, mallory, *verb)
        assert r.returncode != 0, f"{verb[0]} ran without credentials:\n{r.stdout}{r.stderr}"
        assert "no usable AWS credentials" in r.stderr, r.stderr
        assert sv.describe(ws)["State"] == "AVAILABLE", verb[0]
    sv.run("terminate-workspaces", "--workspace-ids", ws)
