"""Responses that carry Plaintext leave no copies in the daemon's memory once sent: the
serialized body (`"Plaintext":"<base64>"`, found only in response bodies) is wiped when
hyper is done with it. Reads the daemon's memory through /proc/PID/mem, which needs
root (the daemon is not dumpable)."""

import base64
import os
import re

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.kms import Daemon


def _memory_count(pid, needle):
    found = 0
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            start, end, perms = int(m.group(1), 16), int(m.group(2), 16), m.group(3)
            if not perms.startswith("rw") or "[vvar" in line or "[vsyscall" in line:
                continue
            pos = start
            tail = b""
            while pos < end:
                n = min(end - pos, 8 << 20)
                try:
                    mem.seek(pos)
                    chunk = mem.read(n)
                except OSError:
                    break
                buf = tail + chunk
                found += buf.count(needle)
                tail = buf[-(len(needle) - 1):]
                pos += n
    return found


def test_no_plaintext_response_left_in_memory(tmp_path):
    if os.geteuid() != 0:
        skip_or_fail("reading a non-dumpable daemon's memory needs root")
    d = Daemon(tmp_path / "state").start()
    try:
        admin = d.client("admin")
        key = admin.create_key(Description="mem")["KeyMetadata"]["KeyId"]
        out = admin.generate_data_key(KeyId=key, NumberOfBytes=48)
        blob, plaintext = out["CiphertextBlob"], out["Plaintext"]
        for _ in range(300):
            assert admin.decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
        # Fresh connections too (their buffers are freed with them).
        for _ in range(20):
            assert d.client("admin").decrypt(CiphertextBlob=blob)["Plaintext"] == plaintext
        needle = b'"Plaintext":"' + base64.b64encode(plaintext) + b'"'
        copies = _memory_count(d.proc.pid, needle)
    finally:
        assert d.stop() == 0
    assert copies == 0, f"{copies} serialized Plaintext responses left in daemon memory"
