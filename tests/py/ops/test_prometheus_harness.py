"""The real-Prometheus harness itself (sealvol_testing.prometheus): targets published
through file_sd after start are picked up (the WorkSpaces agents are published that
way), a condition that never holds fails with what was last seen, and the generated
config passes promtool."""

import json
import subprocess

import pytest

from sealvol_testing.kms import Daemon
from sealvol_testing.prometheus import PROMTOOL, Prometheus, classic_text, check_metrics, require_prometheus, write_file_sd


@pytest.fixture
def metrics_target(tmp_path):
    d = Daemon(tmp_path / "state", ["--metrics-listen", "127.0.0.1:0"]).start()
    yield json.loads((tmp_path / "state.ready").read_text())["metrics"]
    assert d.stop() == 0


def test_targets_published_through_file_sd_after_start_are_scraped(metrics_target, tmp_path):
    require_prometheus()
    sd = tmp_path / "agents.json"
    with Prometheus(tmp_path / "prom", file_sd=sd) as prom:
        assert json.loads(sd.read_text()) == [{"targets": [], "labels": {}}]
        assert prom.targets() == []
        write_file_sd(sd, [metrics_target], {"workspace": "ws-test"})
        [target] = prom.wait_for_targets_up(1)
        assert target["labels"]["workspace"] == "ws-test" and target["labels"]["job"] == "file_sd"
        [(labels, value)] = prom.wait_for_query('kms_build_info{workspace="ws-test"}', lambda r: len(r) == 1)
        assert value == 1 and labels["instance"] == metrics_target.split("://", 1)[1]


def test_a_condition_that_never_holds_fails_with_the_last_result(metrics_target, tmp_path):
    require_prometheus()
    with Prometheus(tmp_path / "prom", static_targets=[metrics_target]) as prom:
        prom.wait_for_targets_up(1)
        prom.wait_for_query("kms_build_info", lambda r: len(r) == 1)
        with pytest.raises(AssertionError) as e:
            prom.wait_for_value("kms_build_info", 2, timeout=1.5)
        assert "kms_build_info" in str(e.value) and "exactly one series == 2" in str(e.value)
        assert "'version'" in str(e.value), "the failure shows the last result"
        with pytest.raises(AssertionError) as e:
            prom.wait_for_targets_up(2, timeout=1.5)
        assert metrics_target in str(e.value), "the failure names the targets seen"
        with pytest.raises(AssertionError) as e:
            prom.query("sum(")
        assert "bad_data" in str(e.value)


def test_generated_config_passes_promtool(tmp_path):
    require_prometheus()
    prom = Prometheus(tmp_path, static_targets=["http://127.0.0.1:1"], file_sd=tmp_path / "sd.json")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(json.dumps(prom.config()))
    write_file_sd(tmp_path / "sd.json", ["127.0.0.1:2"])
    p = subprocess.run([PROMTOOL, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = {j["job_name"]: j for j in prom.config()["scrape_configs"]}
    assert jobs["static"]["static_configs"] == [{"targets": ["127.0.0.1:1"]}]
    assert jobs["file_sd"]["file_sd_configs"][0]["files"] == [str(tmp_path / "sd.json")]
    assert all(j["scrape_interval"] == "1s" for j in jobs.values())


def test_promtool_lint_finds_faults_in_openmetrics_text():
    require_prometheus()
    good = "# HELP x_requests Requests.\n# TYPE x_requests counter\nx_requests_total 3\n# EOF\n"
    assert classic_text(good) == "# HELP x_requests_total Requests.\n# TYPE x_requests_total counter\nx_requests_total 3\n"
    assert check_metrics(good) == ""
    assert "no help text" in check_metrics("# TYPE x_requests counter\nx_requests_total 3\n# EOF\n")
