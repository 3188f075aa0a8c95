"""Raw-socket helpers for the KMS HTTP hardening tests: signed request heads (with the
suite's independent SigV4 signer), connections from chosen loopback source addresses,
and reading the audit log across rotated files."""

import datetime
import json
import resource
import socket
from pathlib import Path

from sealvol_testing.kms import sigv4


def endpoint_addr(daemon):
    host = daemon.endpoint.split("://", 1)[1]
    h, p = host.rsplit(":", 1)
    return h, int(p)


def signed_head(daemon, op, body, profile="admin", content_length=None):
    """The bytes of a signed request head for `body` (Content-Length as given or real)."""
    ak, sk = daemon.credentials(profile)
    host = daemon.endpoint.split("://", 1)[1]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    headers = {"host": host, "content-type": "application/x-amz-json-1.1",
               "x-amz-target": f"TrentService.{op}", "x-amz-date": now}
    headers["authorization"] = sigv4(headers, body, ak, sk, now)
    lines = [f"POST / HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    lines.append(f"content-length: {len(body) if content_length is None else content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def unsigned_head(daemon, op, content_length):
    host = daemon.endpoint.split("://", 1)[1]
    return (f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n"
            f"X-Amz-Target: TrentService.{op}\r\nContent-Length: {content_length}\r\n\r\n").encode()


def connect_from(addr, source=None, timeout=10):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    if source:
        s.bind((source, 0))
    s.connect(addr)
    return s


def read_response(s):
    """Reads one HTTP response (head and Content-Length body); returns (status, json)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response: {data[:80]!r}")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    return status, json.loads(rest[:length] or b"{}")


def raise_fd_limit(want):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(want, soft)), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def audit_records(state_dir: Path):
    """Every record of the log, oldest first, across audit.log.N ... audit.log."""
    base = state_dir / "audit.log"
    files = []
    n = 1
    while Path(f"{base}.{n}").exists():
        files.append(Path(f"{base}.{n}"))
        n += 1
    files.reverse()
    files.append(base)
    out = []
    for f in files:
        with open(f, "rb") as fh:
            for line in fh:
                out.append(json.loads(line))
    return out, files


def counted_requests(records):
    """Requests a log accounts for: individual records plus summarised counts."""
    individual = [r for r in records if r.get("eventName") != "UnauthenticatedRequestsSummary"]
    summarised = sum(r["additionalEventData"]["requestsCounted"] for r in records
                     if r.get("eventName") == "UnauthenticatedRequestsSummary")
    return len(individual), summarised
