"""Where the binaries under test are: `$SEALVOL_BIN` / `$KMS_DAEMON_BIN` / `$KMS_LOAD_BIN`
when set (scripts/test sets the first two to its cargo target dir), else the debug build
in this checkout. The AWS CLI is the one installed in the test venv."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SEALVOL_BIN = Path(os.environ.get("SEALVOL_BIN", REPO / "target" / "debug" / "sealvol"))
KMS_DAEMON_BIN = Path(os.environ.get("KMS_DAEMON_BIN", REPO / "target" / "debug" / "kms-daemon"))
KMS_LOAD_BIN = Path(os.environ.get("KMS_LOAD_BIN", KMS_DAEMON_BIN.parent / "kms-load"))
AWS_CLI = Path(sys.executable).parent / "aws"


def require_binary(path: Path, env_var: str) -> Path:
    """Fails (never skips: a missing build is a broken run) when a binary is not built."""
    if not path.exists():
        pytest.fail(f"{path.name} binary not found at {path}; run `cargo build --workspace` or set {env_var}")
    return path
