"""The CI rule: a test that needs root, /dev/fuse, loop devices or a system tool may skip
only outside CI, and says why; under CI=true a missing prerequisite is a failure."""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI") == "true"


def skip_or_fail(reason):
    """Outside CI: skip with the reason printed. Under CI=true a missing prerequisite fails."""
    if IN_CI:
        pytest.fail(f"CI=true and a prerequisite is missing: {reason}")
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def has_tool(tool):
    """Whether a system tool is installed (also looking in sbin, which a non-root PATH may lack)."""
    return bool(shutil.which(tool)) or any(os.path.exists(f"{d}/{tool}") for d in ("/usr/sbin", "/sbin"))


def require(root=False, fuse=False, tools=(), files=()):
    """Skips (or under CI fails) naming every missing prerequisite at once."""
    missing = []
    if root and os.geteuid() != 0:
        missing.append("root")
    if fuse and not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    missing += [t for t in tools if not has_tool(t)]
    missing += [str(f) for f in files if not os.path.exists(f)]
    if missing:
        skip_or_fail("needs " + ", ".join(missing))


def env_int(name, default):
    """An integer knob from the environment (CI sizes by default, long runs by override)."""
    return int(os.environ.get(name, default))


def env_float(name, default):
    """A float knob from the environment."""
    return float(os.environ.get(name, default))
