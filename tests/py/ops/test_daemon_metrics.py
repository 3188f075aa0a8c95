"""kms-daemon's Prometheus metrics (`serve --metrics-listen`), scraped by a REAL Prometheus
(sealvol_testing.prometheus): request counts by operation and outcome, latency and audit
histograms and auth failures are exactly what boto3 drove; the endpoint is apart from the
KMS port and serves only GET /metrics; promtool accepts the exposition."""

import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from sealvol_testing.kms import REGION, Daemon, wait_for
from sealvol_testing.paths import KMS_DAEMON_BIN, require_binary
from sealvol_testing.prometheus import Prometheus, check_metrics, require_prometheus, write_file_sd

N_OK, M_DENIED, K_BAD_SIGNATURE = 7, 4, 5
# kms_daemon::metrics::listener::MAX_CONNECTIONS_PER_PEER
METRICS_CONNECTIONS_PER_PEER = 8


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path / "state", ["--metrics-listen", "127.0.0.1:0"]).start()
    yield d
    assert d.stop() == 0, "kms-daemon must exit 0 on SIGTERM"


def metrics_url(daemon):
    """The metrics endpoint from the ready file (port 0 picked a free one)."""
    ready = daemon.state_dir.parent / (daemon.state_dir.name + ".ready")
    info = json.loads(ready.read_text())
    assert info["metrics"].startswith("http://127.0.0.1:"), info
    assert info["metrics"] != info["endpoint"], "metrics must have a listener of their own"
    return info["metrics"]


def http(method, url, data=None):
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode(errors="replace")


def error_code(e):
    return e.value.response["Error"]["Code"]


def drive(daemon):
    """N successful Encrypts, M refused with AccessDenied, K with a bad signature."""
    admin, ebs = daemon.client("admin"), daemon.client("ebs")
    key = admin.create_key(Description="metrics")["KeyMetadata"]["KeyId"]
    for i in range(N_OK):
        admin.encrypt(KeyId=key, Plaintext=b"x" * (i + 1))
    for _ in range(M_DENIED):
        with pytest.raises(ClientError) as e:
            ebs.encrypt(KeyId=key, Plaintext=b"denied")
        assert error_code(e) == "AccessDeniedException"
    access_key, _ = daemon.credentials("admin")
    forger = boto3.client("kms", endpoint_url=daemon.endpoint, region_name=REGION, aws_access_key_id=access_key,
                          aws_secret_access_key="wrong-secret-wrong-secret-wrong-secret00",
                          config=Config(retries={"max_attempts": 1, "mode": "standard"}))
    for _ in range(K_BAD_SIGNATURE):
        with pytest.raises(ClientError) as e:
            forger.encrypt(KeyId=key, Plaintext=b"forged")
        assert error_code(e) == "InvalidSignatureException"


def test_real_prometheus_counts_exactly_what_was_driven(daemon, tmp_path):
    require_prometheus()
    url = metrics_url(daemon)
    drive(daemon)
    sd = tmp_path / "targets.json"
    write_file_sd(sd, [url], {"service": "kms-daemon"})
    with Prometheus(tmp_path / "prom", static_targets=[url], file_sd=sd) as prom:
        targets = prom.wait_for_targets_up(2)
        assert {t["labels"]["job"] for t in targets} == {"static", "file_sd"}
        assert any(t["labels"].get("service") == "kms-daemon" for t in targets), "file_sd labels reach the target"
        job = '{job="static"'
        prom.wait_for_value(f'kms_requests_total{job},operation="Encrypt",outcome="ok"}}', N_OK)
        prom.wait_for_value(f'kms_requests_total{job},operation="Encrypt",outcome="AccessDeniedException"}}', M_DENIED)
        prom.wait_for_value(f'kms_requests_total{job},operation="Encrypt",outcome="InvalidSignatureException"}}',
                            K_BAD_SIGNATURE)
        prom.wait_for_value(f'kms_auth_failures_total{job},reason="signature_mismatch"}}', K_BAD_SIGNATURE)
        prom.wait_for_value(f'sum(kms_auth_failures_total{job}}})', K_BAD_SIGNATURE)
        prom.wait_for_value(f'kms_request_duration_seconds_count{job},operation="Encrypt"}}',
                            N_OK + M_DENIED + K_BAD_SIGNATURE)
        prom.wait_for_value(f'kms_request_duration_seconds_bucket{job},operation="Encrypt",le="+Inf"}}',
                            N_OK + M_DENIED + K_BAD_SIGNATURE)
        prom.wait_for_value(f'kms_requests_total{job},operation="CreateKey",outcome="ok"}}', 1)
        # Every authenticated request is audited one by one (CreateKey, N, M); failed
        # authentications are too, up to the flood gate's per-source allowance.
        audited = prom.query(f'kms_audit_append_duration_seconds_count{job}}}')
        assert len(audited) == 1 and audited[0][1] >= 1 + N_OK + M_DENIED, audited
        assert prom.query(f'kms_audit_append_failures_total{job}}}')[0][1] == 0
        [(labels, _)] = prom.query(f'kms_build_info{job}}}')
        assert labels["version"], labels
        # The file_sd job scrapes the same daemon: the same answer through the other path.
        prom.wait_for_value('kms_requests_total{job="file_sd",operation="Encrypt",outcome="ok"}', N_OK)


def test_promtool_accepts_the_exposition(daemon):
    require_prometheus()
    drive(daemon)
    status, headers, text = http("GET", metrics_url(daemon) + "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text"), dict(headers)
    assert text.endswith("# EOF\n")
    assert f'kms_requests_total{{operation="Encrypt",outcome="ok"}} {N_OK}' in text
    assert check_metrics(text) == "", check_metrics(text)


def test_only_get_metrics_is_served_and_not_on_the_kms_port(daemon):
    url = metrics_url(daemon)
    assert http("GET", url + "/metrics")[0] == 200
    status, _, body = http("GET", url + "/")
    assert status == 404, body
    assert http("GET", url + "/metrics/extra")[0] == 404
    status, headers, _ = http("POST", url + "/metrics", data=b"x")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert http("DELETE", url + "/metrics")[0] == 405
    # The KMS port knows nothing of /metrics.
    status, _, body = http("GET", daemon.endpoint + "/metrics")
    assert status == 404 and "kms_requests_total" not in body, body
    status, _, body = http("POST", daemon.endpoint + "/metrics", data=b"{}")
    assert status == 404 and "kms_requests_total" not in body, body


def test_unknown_operations_share_one_label_value(daemon):
    for target in ("TrentService.NoSuchThing", "TrentService.Other", "Nonsense"):
        status, body = daemon.raw(target, {})
        assert status == 400 and body["__type"] == "UnknownOperationException", body
    _, _, text = http("GET", metrics_url(daemon) + "/metrics")
    assert 'kms_requests_total{operation="Unknown",outcome="UnknownOperationException"} 3' in text, text
    assert "NoSuchThing" not in text and "Nonsense" not in text


def test_metrics_are_off_without_the_flag(tmp_path):
    d = Daemon(tmp_path / "state").start()
    try:
        ready = json.loads((tmp_path / "state.ready").read_text())
        assert "metrics" not in ready, ready
        status, _, _ = http("GET", d.endpoint + "/metrics")
        assert status == 404
    finally:
        assert d.stop() == 0


def scrape(daemon):
    """The daemon's metrics as {series: value} (series as written, labels included)."""
    status, _, text = http("GET", metrics_url(daemon) + "/metrics")
    assert status == 200, text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def connect(endpoint):
    host, port = endpoint.split("://", 1)[1].rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def closed_at_once(s):
    """Whether the server closed `s` without a word (reads EOF or a reset)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_open_and_refused_by_the_peer_cap_are_counted(tmp_path):
    d = Daemon(tmp_path / "state", ["--metrics-listen", "127.0.0.1:0", "--max-connections-per-peer", "2"]).start()
    held = []
    try:
        assert scrape(d)["kms_open_connections"] == 0
        held = [connect(d.endpoint) for _ in range(2)]
        wait_for(lambda: scrape(d)["kms_open_connections"] == 2, what="two open connections counted")
        third = connect(d.endpoint)
        assert closed_at_once(third)
        third.close()
        wait_for(lambda: scrape(d).get('kms_connections_refused_total{reason="peer_cap"}') == 1,
                 what="the refused connection counted")
        for s in held:
            s.close()
        wait_for(lambda: scrape(d)["kms_open_connections"] == 0, what="closed connections uncounted")
    finally:
        for s in held:
            s.close()
        assert d.stop() == 0


def test_idle_strangers_on_the_metrics_port_are_capped_and_kms_keeps_serving(daemon):
    url = metrics_url(daemon)
    admin = daemon.client("admin")
    key = admin.create_key(Description="busy")["KeyMetadata"]["KeyId"]
    idle = [connect(url) for _ in range(METRICS_CONNECTIONS_PER_PEER)]
    try:
        # The cap is decided right after accept: the next connection is closed at once.
        extra = connect(url)
        assert closed_at_once(extra), "a connection over the metrics port's per-peer cap must be closed"
        extra.close()
        for i in range(5):
            admin.encrypt(KeyId=key, Plaintext=b"still served %d" % i)
    finally:
        for s in idle:
            s.close()

    def served_again():
        # Until the daemon notices the strangers hung up, their slots are still held.
        try:
            return scrape(daemon).get('kms_requests_total{operation="Encrypt",outcome="ok"}') == 5
        except (ConnectionError, urllib.error.URLError):
            return False

    wait_for(served_again, what="the metrics port serving again once the strangers left")


def test_ready_line_and_help_name_the_metrics_endpoint(tmp_path):
    bin_ = str(require_binary(KMS_DAEMON_BIN, "KMS_DAEMON_BIN"))
    help_text = subprocess.run([bin_, "--help"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "--metrics-listen <ADDR>" in help_text
    assert "bind to loopback or a private network" in " ".join(help_text.split()), help_text
    p = subprocess.Popen([bin_, "--state-dir", str(tmp_path / "state"), "--listen", "127.0.0.1:0",
                          "--metrics-listen", "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    try:
        line = p.stdout.readline()
        m = re.match(r"kms-daemon ready endpoint=(http://\S+) metrics=(http://127\.0\.0\.1:\d+) state_dir=", line)
        assert m and m[1] != m[2], line
        assert http("GET", m[2] + "/metrics")[0] == 200
    finally:
        p.terminate()
        assert p.wait(timeout=30) == 0
        p.stdout.close()


def test_kms_requests_are_answered_while_the_metrics_port_is_hammered(daemon):
    url = metrics_url(daemon) + "/metrics"
    admin = daemon.client("admin")
    key = admin.create_key(Description="hammered")["KeyMetadata"]["KeyId"]
    stop = threading.Event()
    scrapes = []

    def hammer():
        while not stop.is_set():
            try:
                scrapes.append(http("GET", url)[0])
            except OSError:
                scrapes.append("refused")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        slowest = 0.0
        for i in range(30):
            t0 = time.monotonic()
            admin.encrypt(KeyId=key, Plaintext=b"%d" % i)
            slowest = max(slowest, time.monotonic() - t0)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert scrapes.count(200) >= 10, f"the hammer barely ran: {len(scrapes)} scrapes"
    # Generous bound for a shared 2-core machine: a stall would take seconds.
    assert slowest < 2.0, f"an Encrypt took {slowest:.2f}s while /metrics was hammered"
