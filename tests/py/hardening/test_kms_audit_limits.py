"""The audit log cannot be turned against the host: unauthenticated floods are written
without bodies and summarised, every record is size-capped, the log rotates by size
without losing a record, and the counts of the last summary survive shutdown."""

import json
import threading
import urllib.error
import urllib.request

import botocore.exceptions

from sealvol_testing.kms import Daemon
from sealvol_testing.kms_raw import audit_records, counted_requests

SUMMARY = "UnauthenticatedRequestsSummary"


def _unsigned(d, body):
    req = urllib.request.Request(d.endpoint + "/", data=body, method="POST")
    req.add_header("content-type", "application/x-amz-json-1.1")
    req.add_header("x-amz-target", "TrentService.Encrypt")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def test_an_unsigned_flood_is_summarised_not_written(tmp_path):
    """400 unsigned 250 KiB requests grew audit.log by 100 MB; now a few records and
    one summary account for all of them, also once the daemon has stopped."""
    d = Daemon(tmp_path / "state").start()
    log = d.state_dir / "audit.log"
    before = log.stat().st_size
    big = json.dumps({"KeyId": "k", "Plaintext": "A" * (250 * 1024 - 40)}).encode()
    statuses = []
    lock = threading.Lock()

    def flood():
        for _ in range(50):
            st = _unsigned(d, big)
            with lock:
                statuses.append(st)

    threads = [threading.Thread(target=flood) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    grown = log.stat().st_size - before
    assert d.stop() == 0
    assert len(statuses) == 400 and set(statuses) == {400}, set(statuses)
    assert grown < 1024 * 1024, f"audit.log grew by {grown} bytes for 400 unsigned requests"
    records, _ = audit_records(d.state_dir)
    failed = [r for r in records if r.get("errorCode") == "MissingAuthenticationTokenException"]
    assert all(r["requestParameters"] is None for r in failed), "a failed-auth record carries the body"
    individual, summarised = counted_requests(failed + [r for r in records if r["eventName"] == SUMMARY])
    assert individual + summarised == 400, (individual, summarised)
    summaries = [r for r in records if r["eventName"] == SUMMARY]
    assert summaries, "no summary record"
    codes = summaries[-1]["additionalEventData"]["sources"][0]["errorCodes"]
    assert set(codes) == {"MissingAuthenticationTokenException"}, codes


def test_records_are_size_capped(tmp_path):
    """A signed request with a 200 KiB encryption context (refused: contexts are capped
    at 8 KiB) is audited with a marker in place of its parameters, not copied whole."""
    d = Daemon(tmp_path / "state").start()
    try:
        admin = d.client("admin")
        key = admin.create_key(Description="cap")["KeyMetadata"]["KeyId"]
        ctx = {f"k{i}": "v" * 1000 for i in range(200)}
        try:
            admin.encrypt(KeyId=key, Plaintext=b"x", EncryptionContext=ctx)
        except botocore.exceptions.ClientError as e:
            assert e.response["Error"]["Code"] == "ValidationException", e.response
    finally:
        assert d.stop() == 0
    with open(d.state_dir / "audit.log", "rb") as f:
        lines = f.read().splitlines()
    assert max(len(l) for l in lines) <= 16 * 1024 + 1
    enc = [json.loads(l) for l in lines if json.loads(l)["eventName"] == "Encrypt"]
    assert enc and enc[-1]["requestParameters"]["originalSize"] > 200_000, enc[-1]["requestParameters"]


def test_rotation_loses_no_record_under_concurrent_load(tmp_path):
    """With a 64 KiB rotation size, 8 concurrent clients (including denied ones, which
    are authenticated and always written one by one): records across audit.log* ==
    requests answered."""
    d = Daemon(tmp_path / "state", ["--audit-max-bytes", "65536", "--audit-keep", "10000"]).start()
    try:
        admin = d.client("admin")
        key = admin.create_key(Description="rot")["KeyMetadata"]["KeyId"]
        blob = admin.encrypt(KeyId=key, Plaintext=b"r" * 16)["CiphertextBlob"]
        answered = [2]
        lock = threading.Lock()

        def worker(i):
            c = d.client("admin" if i % 4 else "ebs")
            n = 0
            for _ in range(150):
                try:
                    if i % 4:
                        c.decrypt(CiphertextBlob=blob)
                    else:
                        c.decrypt(CiphertextBlob=blob)  # ebs holds no grant: denied
                except botocore.exceptions.ClientError as e:
                    assert e.response["Error"]["Code"] == "AccessDeniedException", e.response
                n += 1
            with lock:
                answered[0] += n

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        assert d.stop() == 0
    records, files = audit_records(d.state_dir)
    individual, summarised = counted_requests(records)
    print(f"{len(files)} files, {individual} records, {summarised} summarised, {answered[0]} answered")
    assert len(files) > 5, "the log did not rotate"
    assert summarised == 0
    assert individual == answered[0]
    denied = [r for r in records if r.get("errorCode") == "AccessDeniedException"]
    assert len(denied) == 2 * 150, "denied authenticated requests are written one by one"
    assert all(r["requestParameters"] is not None for r in denied)
