"""The systemd units in `systemd/` (issue #16, part 3).

* `systemd-analyze verify` accepts every unit with no warning (an unknown or misspelt
  directive is only a warning to systemd, so any output fails the test), with ExecStart
  pointed at the binaries built here;
* the command lines the units run parse: each ExecStart with `--help` appended exits 0
  (a flag the binary does not know makes clap fail first);
* the recovery unit treats recovery's "some left down" status (3) as success, so it keeps
  holding the agents it started;
* a unit with a misspelt directive makes the check fail (the check can fail).
"""

import re
import shlex
import subprocess

import pytest

from sealvol_testing.ci import require
from sealvol_testing.paths import KMS_DAEMON_BIN as DAEMON_BIN, REPO, SEALVOL_BIN

UNITS = sorted((REPO / "systemd").glob("*.service"))
INSTALLED = {"/usr/local/bin/kms-daemon": DAEMON_BIN, "/usr/local/bin/sealvol": SEALVOL_BIN}


def localised(text):
    for installed, built in INSTALLED.items():
        text = text.replace(installed, str(built))
    return text


def verify(tmp_path, units):
    """Runs `systemd-analyze verify` on {name: text}; returns its rc and output lines."""
    require(tools=("systemd-analyze",), files=(DAEMON_BIN, SEALVOL_BIN))
    paths = []
    for name, text in units.items():
        p = tmp_path / name
        p.write_text(localised(text))
        paths.append(str(p))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *paths], capture_output=True, text=True,
                       timeout=120)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    return r.returncode, lines


def directive(text, key):
    return [m.group(1).strip() for m in re.finditer(rf"^{key}=(.*)$", text, re.M)]


def test_units_exist():
    names = {u.name for u in UNITS}
    assert {"kms-daemon.service", "sealvol-workspaces.service"} <= names, names


def test_systemd_analyze_verify_accepts_every_unit(tmp_path):
    rc, lines = verify(tmp_path, {u.name: u.read_text() for u in UNITS})
    assert rc == 0 and not lines, "\n".join(lines)


def test_a_misspelt_directive_is_caught(tmp_path):
    text = (REPO / "systemd" / "kms-daemon.service").read_text().replace("NoNewPrivileges=", "NoNewPrivilegez=")
    rc, lines = verify(tmp_path, {"kms-daemon.service": text})
    assert lines and any("NoNewPrivilegez" in l for l in lines), lines


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_exec_start_command_lines_parse(unit):
    require(files=(DAEMON_BIN, SEALVOL_BIN))
    for line in directive(unit.read_text(), "ExecStart"):
        argv = shlex.split(localised(line.lstrip("-@:+!")))
        r = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{unit.name}: {line!r} does not parse: {r.stderr}"


def test_recovery_unit_keeps_its_agents_when_some_are_left_down():
    text = (REPO / "systemd" / "sealvol-workspaces.service").read_text()
    assert directive(text, "Type") == ["oneshot"] and directive(text, "RemainAfterExit") == ["yes"]
    assert "3" in " ".join(directive(text, "SuccessExitStatus")).split()
    assert directive(text, "KillSignal") == ["SIGTERM"]
    assert "kms-daemon.service" in " ".join(directive(text, "After"))
    # The agents' stop timeout fits inside the unit's.
    stop = int(directive(text, "TimeoutStopSec")[0])
    agent = int(next(e.split("=", 1)[1] for e in directive(text, "Environment") if e.startswith("SEALVOL_STOP_TIMEOUT=")))
    assert agent + 10 < stop, (agent, stop)
    for must in ("LimitCORE", "NoNewPrivileges", "MemoryDenyWriteExecute"):
        assert directive(text, must), f"sealvol-workspaces.service lacks {must}"
