"""A REAL Prometheus server for the tests (Debian package `prometheus`): started in a temp
dir with a generated config (scrape every second; `static_configs` for given targets and
`file_sd_configs` for a JSON file the test or the code under test writes), checked by
`promtool check config` first, on a free loopback port. Offers polling helpers over its
HTTP API (`/api/v1/targets`, `/api/v1/query`) that retry until a predicate holds or fail
with what was last seen, and `promtool check metrics` for exposition text. On a failure
its log is printed (pytest shows it with the failure).

Missing `prometheus`/`promtool` skips outside CI and fails under CI=true (ci.require)."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from sealvol_testing.ci import require

PROMETHEUS = os.environ.get("PROMETHEUS_BIN", "prometheus")
PROMTOOL = os.environ.get("PROMTOOL_BIN", "promtool")
SCRAPE_INTERVAL = "1s"


def require_prometheus():
    """Skips (or under CI=true fails) unless prometheus and promtool are installed."""
    require(tools=(PROMETHEUS, PROMTOOL))


def free_port():
    """A loopback port free right now (Prometheus cannot be told to pick one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def host_port(url_or_addr):
    """`127.0.0.1:PORT` from `http://127.0.0.1:PORT` (or the address itself)."""
    return url_or_addr.split("://", 1)[-1].rstrip("/")


def write_file_sd(path, targets, labels=None):
    """Writes a `file_sd_configs` JSON file (atomically: Prometheus watches it) listing
    `targets` (addresses or URLs) with optional labels."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps([{"targets": [host_port(t) for t in targets], "labels": labels or {}}]))
    os.replace(tmp, path)


def classic_text(openmetrics):
    """The OpenMetrics exposition as the classic Prometheus text format (0.0.4), line for
    line and with every sample unchanged: counter families are named by their `_total`
    sample on `# HELP`/`# TYPE` (OpenMetrics names the family without the suffix), and the
    `# UNIT` and `# EOF` lines, which the classic format lacks, are dropped."""
    counters = set()
    for line in openmetrics.splitlines():
        parts = line.split(" ")
        if line.startswith("# TYPE ") and len(parts) == 4 and parts[3] == "counter":
            counters.add(parts[2])
    out = []
    for line in openmetrics.splitlines():
        if line == "# EOF" or line.startswith("# UNIT "):
            continue
        parts = line.split(" ", 3)
        if line.startswith(("# HELP ", "# TYPE ")) and len(parts) >= 3 and parts[2] in counters:
            parts[2] += "_total"
            line = " ".join(parts)
        out.append(line)
    return "\n".join(out) + "\n"


def check_metrics(text):
    """Runs `promtool check metrics` on an exposition; returns its findings (empty when it
    accepts the text). It lints names, units, help and types. promtool 2.x parses only
    the classic text format, so an OpenMetrics text is mapped to it first (classic_text)."""
    if text.rstrip().endswith("# EOF"):
        text = classic_text(text)
    p = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    findings = (p.stdout + p.stderr).strip()
    return findings if p.returncode != 0 or findings else ""


class Prometheus:
    """One Prometheus process. `static_targets`: addresses (or URLs) scraped as job
    `static`; `file_sd`: a JSON file of targets (see write_file_sd) scraped as job
    `file_sd`. Use as a context manager, or call start() and stop()."""

    def __init__(self, workdir, static_targets=(), file_sd=None, metrics_path="/metrics"):
        self.workdir = Path(workdir)
        self.static_targets = [host_port(t) for t in static_targets]
        self.file_sd = Path(file_sd) if file_sd else None
        self.metrics_path = metrics_path
        self.proc = None
        self.url = None
        self.log_path = self.workdir / "prometheus.log"

    # --- lifecycle -------------------------------------------------------------
    def config(self):
        """The generated configuration (YAML is a superset of JSON, so it is written as JSON)."""
        scrape = []
        common = {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL, "metrics_path": self.metrics_path}
        if self.static_targets:
            scrape.append({"job_name": "static", **common, "static_configs": [{"targets": self.static_targets}]})
        if self.file_sd:
            scrape.append({"job_name": "file_sd", **common,
                           "file_sd_configs": [{"files": [str(self.file_sd)], "refresh_interval": SCRAPE_INTERVAL}]})
        return {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
                "scrape_configs": scrape}

    def start(self, timeout=60):
        require_prometheus()
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = self.workdir / "prometheus.yml"
        cfg.write_text(json.dumps(self.config(), indent=2))
        if self.file_sd and not self.file_sd.exists():
            write_file_sd(self.file_sd, [])
        check = subprocess.run([PROMTOOL, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, f"promtool rejects the generated config {cfg}:\n{check.stdout}{check.stderr}"
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--web.listen-address=127.0.0.1:{port}",
             f"--storage.tsdb.path={self.workdir / 'data'}", "--log.level=info"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        log.close()
        self.poll(self._ready, timeout, "Prometheus /-/ready")
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}\n{self.log()}")
        try:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode if self.proc else None

    def log(self):
        """The Prometheus log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def __enter__(self):
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            print(f"--- prometheus log ({self.log_path}) ---\n{self.log()}")
        self.stop()
        if exc_type is None:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)
        return False

    # --- API -------------------------------------------------------------------
    def api(self, path, **params):
        """GET /api/v1/<path>; returns `data`, or raises with Prometheus' error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.loads(r.read())
        except urllib.error.HTTPError as e:
            body = json.loads(e.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus API {path} {params} failed: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def targets(self):
        """The active targets (each a dict with labels, health, lastError, scrapeUrl)."""
        return self.api("targets")["activeTargets"]

    def query(self, promql):
        """An instant query: a list of (labels, value) with the value as a float (vector
        results; a scalar comes back as one pair with empty labels)."""
        data = self.api("query", query=promql)
        kind, result = data["resultType"], data["result"]
        if kind == "vector":
            return [(r["metric"], float(r["value"][1])) for r in result]
        if kind == "scalar":
            return [({}, float(result[1]))]
        raise AssertionError(f"query {promql!r} returned a {kind}, expected a vector")

    # --- polling ---------------------------------------------------------------
    def poll(self, probe, timeout, what):
        """Calls `probe()` until it returns something truthy (returned) or `timeout`
        seconds pass; then fails naming `what` (a string, or a callable giving one at
        failure time), the last value seen and the log tail."""
        deadline = time.monotonic() + timeout
        last = None
        while True:
            last = probe()
            if last:
                return last
            if time.monotonic() > deadline:
                what = what() if callable(what) else what
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}\n"
                                     f"--- prometheus log tail ---\n{self.log()[-4000:]}")
            time.sleep(0.2)

    def wait_for_targets_up(self, n, timeout=30):
        """Waits until at least `n` targets are up; returns them. The failure names each
        target's health and last scrape error."""
        seen = []

        def probe():
            seen[:] = self.targets()
            up = [t for t in seen if t["health"] == "up"]
            return up if len(up) >= n else None

        try:
            return self.poll(probe, timeout, f"{n} targets up")
        except AssertionError as e:
            detail = "\n".join(f"  {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}" for t in seen)
            raise AssertionError(f"{e}\ntargets:\n{detail}") from None

    def wait_for_query(self, promql, predicate, timeout=30, what=None):
        """Re-runs `promql` until `predicate(result)` holds (result as from query());
        returns the result. Fails with the last result."""
        last = []

        def probe():
            last[:] = self.query(promql)
            return predicate(last)

        self.poll(probe, timeout, lambda: f"{what or promql!r} (last result of {promql!r}: {last!r})")
        return list(last)

    def wait_for_value(self, promql, expected, timeout=30):
        """Waits until `promql` yields exactly one series whose value is `expected`; returns it."""
        def ok(result):
            return len(result) == 1 and result[0][1] == expected

        return self.wait_for_query(promql, ok, timeout, f"exactly one series == {expected}")[0][1]
