"""Fixtures of the kms-daemon conformance suite (the harness is sealvol_testing.kms)."""

import pytest

from sealvol_testing.kms import Daemon


@pytest.fixture(scope="session")
def daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("kms") / "state").start()
    yield d
    assert d.stop() == 0, "kms-daemon must exit 0 on SIGTERM"


@pytest.fixture
def fresh_daemon(tmp_path):
    """A private daemon with the test clock enabled (for restarts and time travel)."""
    d = Daemon(tmp_path / "state", ["--test-clock"]).start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def admin(daemon):
    return daemon.client("admin")


@pytest.fixture(scope="session")
def alice(daemon):
    return daemon.client("alice")


@pytest.fixture(scope="session")
def ebs(daemon):
    return daemon.client("ebs")


@pytest.fixture(scope="session")
def workspaces(daemon):
    return daemon.client("workspaces")


@pytest.fixture(scope="session")
def workspaces_for_alice(daemon):
    return daemon.client("workspaces", forward_for="alice")


@pytest.fixture
def key(admin):
    return admin.create_key(Description="test key")["KeyMetadata"]["KeyId"]
