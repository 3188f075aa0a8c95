"""Global options as the AWS CLI takes them (issue 16): `--profile`, `--output`,
`--region`, `--endpoint-url`, `--state-dir` before or after the verb, run through the real
CLI against the real daemon. The endpoint tests strip every endpoint from the profile file
and the environment, so only the flag can bring the requests to the daemon."""

import json
import socket
import subprocess

import pytest

from sealvol_testing.sealvol import SEALVOL

ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS")


def run(env, *args):
    return subprocess.run([SEALVOL, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def ok(env, *args):
    r = run(env, *args)
    assert r.returncode == 0, f"sealvol {' '.join(map(str, args))} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


@pytest.fixture
def bare_env(sv, daemon, tmp_path):
    """sv's environment with no endpoint anywhere (profile file or environment), no
    AWS_PROFILE and no SEALVOL_STATE_DIR: the flags must say it all."""
    text = (daemon.state_dir / "config").read_text()
    config = tmp_path / "config"
    config.write_text("".join(l for l in text.splitlines(keepends=True) if not l.startswith("endpoint_url")))
    assert "endpoint_url" not in config.read_text() and "[profile alice]" in config.read_text()
    env = dict(sv.env, AWS_CONFIG_FILE=str(config))
    for k in (*ENDPOINT_ENV, "AWS_PROFILE", "SEALVOL_STATE_DIR"):
        env.pop(k, None)
    return env


@pytest.fixture
def workspace(sv, cmk):
    ws = sv.launch("global-opts", key=cmk)
    yield ws
    sv.run("terminate-workspaces", "--workspace-ids", ws, check=False)


def closed_port_url():
    """An http URL on loopback where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_global_options_before_the_verb_reach_the_daemon(sv, daemon, admin, cmk, bare_env, workspace):
    flags = ["--profile", "alice", "--output", "json", "--state-dir", sv.state_dir,
             "--endpoint-url", daemon.endpoint]
    out = json.loads(ok(bare_env, *flags, "describe-workspaces", "--workspace-ids", workspace).stdout)
    assert out["Workspaces"][0]["WorkspaceId"] == workspace
    assert out["Workspaces"][0]["State"] == "AVAILABLE"
    assert "KeyWarning" not in out["Workspaces"][0]

    # The key check in describe-workspaces goes through the forwarded service client:
    # it sees the disabled key only if --endpoint-url reached the admin's token and it.
    admin.disable_key(KeyId=cmk)
    try:
        out = json.loads(ok(bare_env, *flags, "describe-workspaces", "--workspace-ids", workspace).stdout)
        assert "Disabled" in out["Workspaces"][0].get("KeyWarning", ""), out
        # The same options after the verb, as before.
        after = json.loads(ok(bare_env, "describe-workspaces", "--workspace-ids", workspace, *flags).stdout)
        assert after == out
    finally:
        admin.enable_key(KeyId=cmk)


def test_endpoint_url_alone_drives_a_verb_that_authenticates(sv, daemon, bare_env, workspace):
    flags = ["--profile", "alice", "--state-dir", sv.state_dir, "--endpoint-url", daemon.endpoint]
    out = json.loads(ok(bare_env, "stop-workspaces", "--workspace-ids", workspace, *flags, "--output", "json").stdout)
    assert out["FailedRequests"] == []
    assert sv.describe(workspace)["State"] == "STOPPED"
    sv.run("start-workspaces", "--workspace-ids", workspace)
    assert sv.describe(workspace)["State"] == "AVAILABLE"


def test_endpoint_url_alone_reaches_the_agent(sv, daemon, bare_env, workspace):
    flags = ["--profile", "alice", "--state-dir", sv.state_dir, "--endpoint-url", daemon.endpoint]
    ok(bare_env, *flags, "stop-workspaces", "--workspace-ids", workspace)
    r = run(bare_env, *flags, "--output", "json", "start-workspaces", "--workspace-ids", workspace)
    state = sv.describe(workspace)["State"]
    if state != "AVAILABLE":
        sv.run("reboot-workspaces", "--workspace-ids", workspace, check=False)
    assert r.returncode == 0 and state == "AVAILABLE", f"{state}\n{r.stdout}\n{r.stderr}"


@pytest.mark.parametrize("where", ["profile", "environment"])
def test_a_wrong_endpoint_url_wins_fails_clearly_and_changes_nothing(sv, daemon, workspace, where):
    """The flag wins over AWS_ENDPOINT_URL_KMS and over the profile's endpoint_url (both
    point at the working daemon here), and its failure names the URL."""
    env = dict(sv.env)
    if where == "environment":
        env["AWS_ENDPOINT_URL_KMS"] = daemon.endpoint
    pid = sv.agent_pid(workspace)
    bad = closed_port_url()
    r = run(env, "stop-workspaces", "--workspace-ids", workspace, "--endpoint-url", bad)
    assert r.returncode != 0, r.stdout
    assert bad in r.stderr, r.stderr
    assert "--endpoint-url" in r.stderr, r.stderr
    assert sv.describe(workspace)["State"] == "AVAILABLE"
    assert sv.agent_pid(workspace) == pid, "agent untouched"


@pytest.mark.parametrize("bad", ["not-a-url", "ftp://127.0.0.1:1"])
def test_an_unusable_endpoint_url_is_refused_naming_it(sv, workspace, bad):
    r = run(sv.env, "--endpoint-url", bad, "stop-workspaces", "--workspace-ids", workspace)
    assert r.returncode != 0, r.stdout
    assert bad in r.stderr and "--endpoint-url" in r.stderr, r.stderr
    assert sv.describe(workspace)["State"] == "AVAILABLE"


def test_region_flag_reaches_the_signature(sv, workspace):
    """kms-daemon verifies the SigV4 scope's region: a wrong --region is refused, the
    daemon's own region (the profile's too) works."""
    r = run(sv.env, "--region", "eu-west-3", "stop-workspaces", "--workspace-ids", workspace)
    assert r.returncode != 0, r.stdout
    assert sv.describe(workspace)["State"] == "AVAILABLE"
    ok(sv.env, "--region", "us-east-1", "--output", "json", "describe-workspaces", "--workspace-ids", workspace)


def test_environment_fallbacks_fill_what_the_flags_leave_out(sv, workspace):
    """SEALVOL_STATE_DIR and AWS_PROFILE (set in sv.env) stand in for the flags; a flag
    given beats its variable."""
    out = json.loads(ok(sv.env, "describe-workspaces", "--workspace-ids", workspace, "--output", "json").stdout)
    assert out["Workspaces"][0]["WorkspaceId"] == workspace
    empty = sv.state_dir / "elsewhere"
    out = json.loads(ok(sv.env, "--state-dir", empty, "--output", "json", "describe-workspaces").stdout)
    assert out["Workspaces"] == []


def test_version_and_help():
    r = subprocess.run([SEALVOL, "--version"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("sealvol ") and len(r.stdout.split()) == 2, r.stdout
    h = subprocess.run([SEALVOL, "--help"], capture_output=True, text=True, timeout=30).stdout
    assert "Global options:" in h
    for flag in ("--profile", "--output", "--region", "--endpoint-url", "--state-dir", "--service-profile",
                 "--ebs-profile"):
        assert h.count(f"{flag} <") == 1, (flag, h)
