"""kms-daemon takes SIGTERM gracefully from the moment it reports ready (systemd, the
tests and the demo all stop it right after readiness at times): exit status 0, every
time. Its handlers used to be installed only once the server loop first ran, so a SIGTERM
in the gap after the ready file killed it with the default action (status -15, seen once
in a full CI run). The test signals the instant the ready file appears."""

import os
import signal
import subprocess
import time

from sealvol_testing.paths import KMS_DAEMON_BIN, require_binary

ROUNDS = 40


def start_and_term_at_ready(state):
    ready = state.parent / (state.name + ".ready")
    p = subprocess.Popen([str(require_binary(KMS_DAEMON_BIN, "KMS_DAEMON_BIN")), "--state-dir", str(state),
                          "--listen", "127.0.0.1:0", "--ready-file", str(ready)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):  # spin: the gap being tested is microseconds wide
        assert p.poll() is None, f"kms-daemon exited early ({p.returncode})"
        assert time.monotonic() < deadline, "kms-daemon never became ready"
    p.send_signal(signal.SIGTERM)
    return p.wait(timeout=20)


def test_sigterm_the_instant_it_is_ready_exits_cleanly(tmp_path):
    codes = []
    for i in range(ROUNDS):
        state = tmp_path / f"s{i}"
        state.mkdir(mode=0o700)
        codes.append(start_and_term_at_ready(state))
    assert codes == [0] * ROUNDS, codes
