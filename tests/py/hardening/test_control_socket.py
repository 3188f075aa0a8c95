"""The attach agent's control socket (online rekey) answers only root and the agent's own
user: it checks the peer's uid with SO_PEERCRED, so even a socket whose file mode lets
another user connect (a loosened runtime directory) does not let that user start a rekey
or read status."""

import functools
import json
import os
import socket
import tempfile
from pathlib import Path

import pytest

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.paths import SEALVOL_BIN
from sealvol_testing.sealvol import run_sealvol

NOBODY = 65534


def ask(sock_path: Path, request: dict, uid=None) -> dict:
    """Sends one request line (from a child that drops to `uid` first) and returns the
    first reply line, parsed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, talk, report through the pipe
        code = 0
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(30)
                s.connect(str(sock_path))
                try:
                    s.sendall(json.dumps(request).encode() + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # refused before the request was read: the reply is queued
                reply = s.makefile("rb").readline()
            os.write(w, reply)
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            os.write(w, json.dumps({"child-error": repr(e)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    os.waitpid(pid, 0)
    return json.loads(out)


def test_control_socket_refuses_a_peer_of_another_uid():
    if os.geteuid() != 0:
        skip_or_fail("needs root for a FUSE mount and to connect as another uid")
    if not Path("/dev/fuse").exists():
        skip_or_fail("/dev/fuse is missing")
    if not SEALVOL_BIN.exists():
        pytest.fail(f"sealvol binary not found at {SEALVOL_BIN}")
    with tempfile.TemporaryDirectory(prefix="sealvol-ctl-") as top:
        top = Path(top)
        top.chmod(0o755)
        run = top / "run"
        env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(run))
        vol, key, mnt = top / "vol.luks", top / "key", top / "mnt"
        raw = bytearray(os.urandom(64))
        raw[32:] = bytes(b ^ 0x77 for b in raw[:32])
        key.write_bytes(bytes(raw))
        key.chmod(0o600)
        mnt.mkdir()

        sv = functools.partial(run_sealvol, env)

        sv("create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
        sv("attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", key)
        try:
            socks = list(run.glob("*.sock"))
            assert len(socks) == 1, socks
            sock = socks[0]
            # Loosen the file system so that only the agent's own check stands in the way.
            run.chmod(0o755)
            sock.chmod(0o666)
            assert ask(sock, {"op": "status"}) == {"status": [["disk", None]]}, "root is answered"
            refused = ask(sock, {"op": "status"}, uid=NOBODY)
            assert "child-error" not in refused, refused
            assert "permission denied" in refused.get("error", ""), refused
            new_key = bytes(b ^ 0xFF for b in raw)
            refused = ask(sock, {"op": "rekey", "export": None, "new_volume_key": new_key.hex(),
                                 "hotzone_bytes": None}, uid=NOBODY)
            assert "permission denied" in refused.get("error", ""), refused
            assert ask(sock, {"op": "status"}) == {"status": [["disk", None]]}, "no rekey was started"
        finally:
            sv("detach", "--mountpoint", mnt)
