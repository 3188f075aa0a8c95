"""Private writes never follow a symlink planted where the writer puts its temporary
(docs/threat-notes-files.md): kms-daemon's --ready-file, credentials and config, and the
attach agent's record. Before the fix each was written through the predictable name
`F.tmp` (Path::with_extension("tmp")) opened with O_CREAT|O_TRUNC, which follows a
symlink: anyone who could write the directory could make the writer overwrite any file
it can write (a root daemon: any file), and the symlink then replaced the target."""

import functools
import hashlib
import os
from pathlib import Path

import pytest

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.sealvol import run_sealvol
from sealvol_testing.kms import Daemon

PRECIOUS = b"precious: must not change\n"


def plant(link: Path, victim: Path):
    victim.write_bytes(PRECIOUS)
    link.symlink_to(victim)


def assert_regular(p: Path):
    assert p.exists() and not p.is_symlink(), f"{p} is a symlink (the planted one was renamed over it)"


def test_kms_daemon_private_writes_do_not_follow_planted_symlinks(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victims = tmp_path / "victims"
    victims.mkdir()
    # The old temporaries: <ready file>.with_extension("tmp") for state.ready is state.tmp,
    # and credentials.tmp / config.tmp in the state dir.
    planted = {
        tmp_path / "state.tmp": victims / "ready-victim",
        state / "credentials.tmp": victims / "credentials-victim",
        state / "config.tmp": victims / "config-victim",
    }
    for link, victim in planted.items():
        plant(link, victim)
    d = Daemon(state).start()
    try:
        for victim in planted.values():
            assert victim.read_bytes() == PRECIOUS, f"{victim} was overwritten through a planted symlink"
        for written in (tmp_path / "state.ready", state / "credentials", state / "config"):
            assert_regular(written)
        assert b"aws_secret_access_key" in (state / "credentials").read_bytes()
        leftovers = [p.name for p in state.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]
        assert leftovers == [], f"temporaries left behind: {leftovers}"
    finally:
        assert d.stop() == 0


def test_agent_record_does_not_follow_a_planted_symlink(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("needs root for a FUSE mount")
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(run))
    vol, key, mnt = tmp_path / "vol.luks", tmp_path / "key", tmp_path / "mnt"
    raw = bytearray(os.urandom(64))
    raw[32:] = bytes(b ^ 0x5A for b in raw[:32])
    key.write_bytes(bytes(raw))
    mnt.mkdir()
    # The record is agent-<first 16 hex of sha256(canonical mountpoint)>.json; the old
    # temporary was the same name with .tmp.
    digest = hashlib.sha256(str(mnt.resolve()).encode()).hexdigest()[:16]
    victim = tmp_path / "victim"
    plant(run / f"agent-{digest}.tmp", victim)

    sv = functools.partial(run_sealvol, env)

    sv("create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    sv("attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", key)
    try:
        assert victim.read_bytes() == PRECIOUS, "the agent wrote its record through a planted symlink"
        assert_regular(run / f"agent-{digest}.json")
    finally:
        sv("detach", "--mountpoint", mnt)
