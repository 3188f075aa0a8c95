"""KMS HTTP limits under attack: dispatched mutations are always audited, whatever the
client does at the body deadline; strangers holding unfinished bodies cannot stall
honest clients; oversized bodies get an immediate 413 that urllib and boto3 can read."""

import base64
import json
import socket
import threading
import time

import botocore.exceptions
import pytest
from botocore.config import Config

from sealvol_testing.ci import skip_or_fail
from sealvol_testing.kms import Daemon, wait_for
from sealvol_testing.kms_raw import audit_records, connect_from, endpoint_addr, raise_fd_limit, read_response, signed_head, unsigned_head

EBS = "ebs.amazonaws.com"


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state").start()
    yield d
    assert d.stop() == 0


def _slow_create_grant(d, key, name, last_byte_at, hang_up, results):
    """A signed CreateGrant whose last body byte is sent `last_byte_at` seconds after the
    head; then the client hangs up at once or waits for the answer."""
    body = json.dumps({"KeyId": key, "GranteePrincipal": EBS, "Operations": ["Decrypt"],
                       "Name": name}).encode()
    s = connect_from(endpoint_addr(d), timeout=60)
    try:
        start = time.monotonic()
        s.sendall(signed_head(d, "CreateGrant", body) + body[:-1])
        threading.Event().wait(max(0.0, start + last_byte_at - time.monotonic()))
        try:
            s.sendall(body[-1:])
        except OSError:
            results[name] = "closed"
            return
        if hang_up:
            results[name] = "hung up"
            return
        try:
            results[name] = read_response(s)[0]
        except (OSError, ConnectionError):
            results[name] = "closed"
    finally:
        s.close()


def test_dispatched_mutations_are_audited_whatever_the_client_does(daemon):
    """Bodies completing around the body deadline (about 2 s) and around the old 30 s
    request timeout, half the clients hanging up right after their last byte: every
    grant that exists has its successful CreateGrant record, and no record claims a
    grant that does not exist."""
    admin = daemon.client("admin")
    key = admin.create_key(Description="edge")["KeyMetadata"]["KeyId"]
    schedule = [1.80 + 0.02 * i for i in range(20)] + [29.90 + 0.006 * i for i in range(24)]
    results = {}
    threads = []
    for i, at in enumerate(schedule):
        t = threading.Thread(target=_slow_create_grant,
                             args=(daemon, key, f"edge-{i:02d}", at, i % 2 == 0, results))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(timeout=90)
        assert not t.is_alive(), "a slow client hung"

    def grants():
        out = []
        for page in admin.get_paginator("list_grants").paginate(KeyId=key):
            out += [g["Name"] for g in page["Grants"]]
        return set(out)

    def audited():
        records, _ = audit_records(daemon.state_dir)
        return {r["requestParameters"]["name"] for r in records
                if r["eventName"] == "CreateGrant" and "errorCode" not in r
                and isinstance(r.get("requestParameters"), dict)}

    # A grant created by a task still finishing is audited by the time it settles.
    try:
        wait_for(lambda: grants() == audited(), timeout=10, what="grants and audit agree")
    except TimeoutError:
        pass
    created, logged = grants(), audited()
    print("outcomes:", json.dumps(results, sort_keys=True))
    print(f"grants {len(created)}, audited {len(logged)}")
    assert created - logged == set(), f"grants created without an audit record: {sorted(created - logged)}"
    assert logged - created == set(), f"audited grants that do not exist: {sorted(logged - created)}"


class SlowStrangers(threading.Thread):
    """`n` unauthenticated connections, spread over loopback sources 127.0.0.2.., each
    holding a request head and the start of a 4 KiB body; reopened when closed."""

    def __init__(self, addr, n, sources=8):
        super().__init__(daemon=True)
        self.addr, self.n, self.sources = addr, n, sources
        self.stop = threading.Event()
        self.open = 0
        self.opened = 0

    def run(self):
        import selectors
        sel = selectors.DefaultSelector()
        head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n" \
               b"X-Amz-Target: TrentService.ListKeys\r\nContent-Length: 4096\r\n\r\n{\"Limit\":"
        socks = {}
        try:
            while not self.stop.is_set():
                i = 0
                while len(socks) < self.n and not self.stop.is_set():
                    src = f"127.0.0.{2 + (self.opened + i) % self.sources}"
                    i += 1
                    try:
                        s = connect_from(self.addr, src, timeout=2)
                        s.sendall(head)
                        s.setblocking(False)
                    except OSError:
                        break
                    socks[s.fileno()] = s
                    sel.register(s, selectors.EVENT_READ)
                    self.opened += 1
                self.open = len(socks)
                for k, _ in sel.select(timeout=0.2):
                    s = k.fileobj
                    sel.unregister(s)
                    socks.pop(s.fileno(), None)
                    s.close()
                self.open = len(socks)
        finally:
            for s in socks.values():
                s.close()


def test_slow_strangers_do_not_stall_honest_clients(daemon):
    """1,000 strangers holding unfinished bodies: an honest signed client's ListKeys and
    Decrypt stay fast (they took 29 s when the strangers held the operation slots)."""
    if raise_fd_limit(4096) < 2200:
        skip_or_fail("needs ~2,200 open files in the test process")
    admin = daemon.client("admin")
    key = admin.create_key(Description="honest")["KeyMetadata"]["KeyId"]
    blob = admin.encrypt(KeyId=key, Plaintext=b"p" * 32)["CiphertextBlob"]
    strangers = SlowStrangers(endpoint_addr(daemon), 1000)
    strangers.start()
    try:
        wait_for(lambda: strangers.open >= 950, timeout=60, what="1,000 slow connections open")
        honest = daemon.client("admin")
        latencies = []
        # How many strangers held a connection as each honest request began. They are cut
        # together at their body deadline and reconnect, so the count swings between ~300
        # and 1,000: one reading taken at an arbitrary moment (739 failed this test once)
        # says nothing about the load the honest requests met.
        held = []
        # For 5 s at least, so strangers are cut at their body deadline and come back.
        until = time.monotonic() + 5
        while len(latencies) < 40 or time.monotonic() < until:
            held.append(strangers.open)
            t0 = time.monotonic()
            if len(latencies) % 2:
                honest.list_keys()
            else:
                assert honest.decrypt(CiphertextBlob=blob)["Plaintext"] == b"p" * 32
            latencies.append(time.monotonic() - t0)
            if latencies[-1] >= 1.0:
                break
        at_full = sum(h >= 900 for h in held)
        held.sort()
        open_during = held[len(held) // 2]
    finally:
        strangers.stop.set()
        strangers.join(timeout=30)
    latencies.sort()
    print(f"honest latency p50 {latencies[len(latencies) // 2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; strangers open as requests began: median {open_during}, lowest {held[0]}, highest {held[-1]}, >= 900 for {at_full} of {len(held)}; opened {strangers.opened}")
    # The load was real: honest requests ran while 900+ strangers held connections (how
    # fast the generator reconnects after the cut varies from run to run, so how many
    # of the requests did is reported, not asserted).
    assert at_full >= 1, "no honest request ran while 900 strangers held connections"
    assert latencies[-1] < 1.0, f"an honest request took {latencies[-1]:.2f} s"


def test_a_declared_oversize_body_is_refused_at_once(daemon):
    s = connect_from(endpoint_addr(daemon), timeout=5)
    try:
        t0 = time.monotonic()
        s.sendall(unsigned_head(daemon, "Encrypt", 10 * 1024 * 1024))
        status, body = read_response(s)
        took = time.monotonic() - t0
    finally:
        s.close()
    assert status == 413 and body["__type"] == "ValidationException", (status, body)
    assert took < 2, f"413 took {took:.1f} s"


def test_urllib_sending_8_mib_reads_the_413(daemon):
    status, body = daemon.raw("TrentService.Encrypt", b"{" + b" " * (8 * 1024 * 1024) + b"}", sign=False)
    assert status == 413 and body["__type"] == "ValidationException", (status, body)


def test_boto3_sending_8_mib_reads_the_413(daemon):
    c = daemon.session("admin").client(
        "kms", config=Config(retries={"max_attempts": 1, "mode": "standard"}, parameter_validation=False))
    key = c.create_key(Description="big")["KeyMetadata"]["KeyId"]
    with pytest.raises(botocore.exceptions.ClientError) as e:
        c.encrypt(KeyId=key, Plaintext=b"x" * (8 * 1024 * 1024))
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413
    assert e.value.response["Error"]["Code"] == "ValidationException"
    # The connection pool still works after the refusal.
    assert c.describe_key(KeyId=key)["KeyMetadata"]["KeyId"] == key


def test_a_chunked_body_over_the_cap_gets_413(daemon):
    host = daemon.endpoint.split("://", 1)[1]
    s = connect_from(endpoint_addr(daemon), timeout=10)
    try:
        s.sendall((f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-amz-json-1.1\r\n"
                   "X-Amz-Target: TrentService.Encrypt\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
        try:
            for _ in range(64):
                s.sendall(chunk)
        except OSError:
            pass
        status, body = read_response(s)
    finally:
        s.close()
    assert status == 413 and body["__type"] == "ValidationException", (status, body)
