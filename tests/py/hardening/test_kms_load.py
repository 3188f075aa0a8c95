"""KMS load and abuse: N concurrent SigV4 clients (keep-alive HTTP/1.1, independently
signed) mix Decrypt, GenerateDataKey, CreateGrant, RetireGrant and DisableKey/EnableKey
against a private real daemon while slowloris connections, slow and oversized bodies and
stale replays hammer it. Checks: zero unexpected errors, every request answered has its
audit record (requests sent == audit lines written), RSS bounded, honest p99 bounded, and
stale or future timestamps refused. Unauthenticated abuse is summarised in the log (a
few records per source in full, the rest counted in UnauthenticatedRequestsSummary
records, the last one written at shutdown), so the audit check is: requests answered ==
individual records + summarised counts, across rotated files, after the daemon stops.

CI runs a short configuration (default 16 clients for 10 s). The long run reported in
docs/hardening.md: HARDENING_LOAD_CLIENTS=64 HARDENING_LOAD_SECONDS=60.
Figures are printed and written to $HARDENING_REPORT_DIR/kms_load.json when set.
"""

import base64
import datetime
import http.client
import json
import os
import random
import socket
import threading
import time
from pathlib import Path

from sealvol_testing.ci import env_float, env_int
from sealvol_testing.kms import Daemon, sigv4, wait_for
from sealvol_testing.kms_raw import audit_records, counted_requests

CLIENTS = env_int("HARDENING_LOAD_CLIENTS", 16)
SECONDS = env_float("HARDENING_LOAD_SECONDS", 10)
SLOWLORIS = env_int("HARDENING_SLOWLORIS", 200)
RSS_LIMIT_MIB = env_int("HARDENING_RSS_LIMIT_MIB", 512)
P99_LIMIT_S = env_float("HARDENING_P99_LIMIT_S", 2.0)
EBS = "ebs.amazonaws.com"
WS = "workspaces.amazonaws.com"
CTX = {"aws:ebs:id": "vol-load"}


def amz_now(offset=0):
    t = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return t.strftime("%Y%m%dT%H%M%SZ")


class Client:
    """One keep-alive connection; every request signed with the spec signer."""

    def __init__(self, daemon, profile):
        self.host = daemon.endpoint.split("://", 1)[1]
        h, p = self.host.rsplit(":", 1)
        self.addr = (h, int(p))
        self.ak, self.sk = daemon.credentials(profile)
        self.conn = None

    def call(self, op, body, date_offset=0):
        data = json.dumps(body).encode()
        headers = {"host": self.host, "content-type": "application/x-amz-json-1.1",
                   "x-amz-target": f"TrentService.{op}"}
        now = amz_now(date_offset)
        headers["x-amz-date"] = now
        headers["authorization"] = sigv4(headers, data, self.ak, self.sk, now)
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(*self.addr, timeout=60)
            try:
                self.conn.request("POST", "/", body=data, headers={k: v for k, v in headers.items() if k != "host"})
                r = self.conn.getresponse()
                raw = r.read()
                return r.status, json.loads(raw or b"{}")
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                # A keep-alive connection the server closed between requests: the request
                # was not received, so it is not counted; reconnect once.
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")


class RssMonitor(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.peak, self.samples, self.stop = pid, 0, [], threading.Event()

    def rss_kib(self):
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def run(self):
        while not self.stop.is_set():
            try:
                v = self.rss_kib()
            except OSError:
                return
            self.peak = max(self.peak, v)
            self.samples.append(v)
            self.stop.wait(0.1)


def audit_lines(daemon):
    """Requests the log accounts for: individual records plus summarised counts."""
    individual, summarised = counted_requests(audit_records(daemon.state_dir)[0])
    return individual + summarised


def slowloris(addr, n, stop, opened):
    """Opens n connections that send a request head one byte at a time, reopening them
    when the server drops them (it must: heads have a read timeout)."""
    socks = []
    head = b"POST / HTTP/1.1\r\nHost: x\r\nX-Amz-Target: TrentService.Decrypt\r\n"
    try:
        while not stop.is_set():
            while len(socks) < n:
                try:
                    s = socket.create_connection(addr, timeout=5)
                    s.setblocking(False)
                    socks.append([s, 0])
                    opened[0] += 1
                except OSError:
                    break
            for entry in list(socks):
                s, i = entry
                try:
                    s.send(head[i % len(head):i % len(head) + 1])
                    entry[1] += 1
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    s.close()
                    socks.remove(entry)
            stop.wait(0.5)
    finally:
        for s, _ in socks:
            s.close()


def abusive_bodies(daemon, stop, counts):
    """Oversized bodies (413, audited) and bodies that declare 1 MiB but trickle."""
    host = daemon.endpoint.split("://", 1)[1]
    h, p = host.rsplit(":", 1)
    while not stop.is_set():
        status, _ = daemon.raw("TrentService.Encrypt", b"{" + b" " * (300 * 1024) + b"}", sign=False)
        assert status == 413, status
        counts["oversized"] += 1
        s = socket.create_connection((h, int(p)), timeout=5)
        try:
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
                      b"X-Amz-Target: TrentService.Decrypt\r\nContent-Length: 1048576\r\n\r\n{")
            s.settimeout(2)
            try:
                got = s.recv(4096)
            except socket.timeout:
                got = b""
            # Either refused up front from Content-Length (413) or, when we hang up, the
            # handler sees the body end early; both are audited, as one record.
            assert not got or got.startswith(b"HTTP/1.1 413"), got[:64]
            counts["declared_too_large" if got else "slow_body_unanswered"] += 1
        finally:
            s.close()
        stop.wait(0.2)


def test_kms_load_and_abuse(tmp_path):
    d = Daemon(tmp_path / "state").start()
    try:
        _run(d, tmp_path)
    finally:
        code = d.stop()
    assert code == 0, "kms-daemon must exit 0 on SIGTERM after the load"


def _run(d, tmp_path):
    admin, ws = Client(d, "admin"), Client(d, "workspaces")
    st, k = admin.call("CreateKey", {"Description": "load"})
    assert st == 200, k
    key = k["KeyMetadata"]["KeyId"]
    st, k2 = admin.call("CreateKey", {"Description": "toggled"})
    toggled = k2["KeyMetadata"]["KeyId"]
    st, e = admin.call("Encrypt", {"KeyId": key, "Plaintext": base64.b64encode(b"x" * 64).decode(), "EncryptionContext": CTX})
    assert st == 200, e
    blob = e["CiphertextBlob"]
    st, e2 = admin.call("Encrypt", {"KeyId": toggled, "Plaintext": base64.b64encode(b"y" * 64).decode(), "EncryptionContext": CTX})
    blob2 = e2["CiphertextBlob"]

    # Replays with stale or future timestamps are refused (and audited).
    for offset, want in ((-600, "Signature expired"), (600, "not yet current")):
        st, r = admin.call("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": CTX}, date_offset=offset)
        assert st == 400 and r["__type"] in ("InvalidSignatureException", "IncompleteSignatureException"), r
        assert want in r.get("message", ""), r

    setup_requests = 7
    base_audit = audit_lines(d)
    monitor = RssMonitor(d.proc.pid)
    monitor.start()
    wait_for(lambda: monitor.samples, what="first RSS sample")
    rss_start = monitor.samples[0]

    stop = threading.Event()
    opened = [0]
    abuse_counts = {"oversized": 0, "declared_too_large": 0, "slow_body_unanswered": 0}
    h, p = d.endpoint.split("://", 1)[1].rsplit(":", 1)
    abusers = [threading.Thread(target=slowloris, args=((h, int(p)), SLOWLORIS, stop, opened), daemon=True),
               threading.Thread(target=abusive_bodies, args=(d, stop, abuse_counts), daemon=True)]
    for t in abusers:
        t.start()

    lock = threading.Lock()
    stats = {"requests": 0, "unexpected": [], "by_op": {}, "latencies": [], "expected_errors": 0}
    deadline = time.monotonic() + SECONDS

    def worker(i):
        c = Client(d, "admin")
        w = Client(d, "workspaces")
        rnd = random.Random(i)
        lat, sent, by_op, expected, unexpected = [], 0, {}, 0, []

        def do(client, op, body, ok_codes=()):
            nonlocal sent, expected
            t0 = time.monotonic()
            st, r = client.call(op, body)
            lat.append(time.monotonic() - t0)
            sent += 1
            by_op[op] = by_op.get(op, 0) + 1
            if st == 200:
                return r
            if r.get("__type") in ok_codes:
                expected += 1
                return None
            unexpected.append((op, st, r))
            return None

        while time.monotonic() < deadline:
            x = rnd.random()
            if x < 0.45:
                r = do(c, "Decrypt", {"CiphertextBlob": blob, "EncryptionContext": CTX})
                if r is not None and base64.b64decode(r["Plaintext"]) != b"x" * 64:
                    unexpected.append(("Decrypt", 200, "wrong plaintext"))
            elif x < 0.55:
                do(c, "Decrypt", {"CiphertextBlob": blob2, "EncryptionContext": CTX}, ok_codes=("DisabledException",))
            elif x < 0.75:
                r = do(c, "GenerateDataKey", {"KeyId": key, "NumberOfBytes": 64, "EncryptionContext": CTX})
                if r is not None and len(base64.b64decode(r["Plaintext"])) != 64:
                    unexpected.append(("GenerateDataKey", 200, "wrong size"))
            elif x < 0.93:
                g = do(c, "CreateGrant", {"KeyId": key, "GranteePrincipal": EBS, "RetiringPrincipal": WS,
                                          "Operations": ["Decrypt"], "Constraints": {"EncryptionContextSubset": CTX}})
                if g is not None:
                    do(w, "RetireGrant", {"KeyId": key, "GrantId": g["GrantId"]})
            else:
                do(c, "DisableKey" if rnd.random() < 0.5 else "EnableKey", {"KeyId": toggled})
        with lock:
            stats["requests"] += sent
            stats["expected_errors"] += expected
            stats["unexpected"].extend(unexpected)
            stats["latencies"].extend(lat)
            for k_, v in by_op.items():
                stats["by_op"][k_] = stats["by_op"].get(k_, 0) + v

    t0 = time.monotonic()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(CLIENTS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(timeout=SECONDS + 120)
        assert not t.is_alive(), "a load client hung"
    elapsed = time.monotonic() - t0
    stop.set()
    for t in abusers:
        t.join(timeout=30)

    # After the abuse: a fresh honest request is served at once.
    st, r = admin.call("DescribeKey", {"KeyId": key})
    assert st == 200, r
    monitor.stop.set()
    monitor.join()

    lat = sorted(stats["latencies"])
    p50 = lat[len(lat) // 2] if lat else 0
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else 0
    abuse_audited = abuse_counts["oversized"] + abuse_counts["declared_too_large"] + abuse_counts["slow_body_unanswered"]
    expected_audit = stats["requests"] + abuse_audited + 1
    # The summary of the last window of unauthenticated requests is written at shutdown.
    assert d.stop() == 0, "kms-daemon must exit 0 on SIGTERM after the load"
    written = audit_lines(d) - base_audit
    report = {
        "clients": CLIENTS, "seconds": round(elapsed, 1), "requests": stats["requests"],
        "req_per_s": round(stats["requests"] / elapsed, 1), "by_op": stats["by_op"],
        "expected_errors": stats["expected_errors"], "unexpected_errors": len(stats["unexpected"]),
        "p50_ms": round(p50 * 1000, 2), "p99_ms": round(p99 * 1000, 2),
        "audit_records_expected": expected_audit, "audit_records_written": written,
        "abuse": dict(abuse_counts, slowloris_connections_opened=opened[0]),
        "rss_start_mib": round(rss_start / 1024, 1), "rss_peak_mib": round(monitor.peak / 1024, 1),
        "setup_requests_not_counted": setup_requests,
    }
    print("KMS load report:", json.dumps(report, indent=1))
    out = os.environ.get("HARDENING_REPORT_DIR")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "kms_load.json").write_text(json.dumps(report, indent=1))

    assert stats["requests"] > CLIENTS, "the load clients made no progress"
    assert not stats["unexpected"], f"unexpected errors: {stats['unexpected'][:5]}"
    for op in ("Decrypt", "GenerateDataKey", "CreateGrant", "RetireGrant"):
        assert stats["by_op"].get(op, 0) > 0, f"{op} never ran"
    assert stats["by_op"].get("DisableKey", 0) + stats["by_op"].get("EnableKey", 0) > 0
    assert written == expected_audit, f"audit records: {written} written, {expected_audit} requests answered"
    assert abuse_counts["oversized"] > 0 and opened[0] >= min(SLOWLORIS, 50)
    assert monitor.peak / 1024 < RSS_LIMIT_MIB, f"peak RSS {monitor.peak / 1024:.0f} MiB"
    assert p99 < P99_LIMIT_S, f"honest p99 {p99 * 1000:.0f} ms under abuse"
    # Every audit line is one complete JSON record (audit_records parsed them all).
