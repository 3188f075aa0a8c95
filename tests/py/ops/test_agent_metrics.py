"""The agents' Prometheus metrics (issue #16, part 4), scraped by a REAL Prometheus that
finds the agent through the file_sd target the agent publishes itself.

An encrypted volume attached with SEALVOL_METRICS_LISTEN=127.0.0.1:0: known writes, an
fsync and known reads on the served file; PromQL then answers exactly those bytes, the
volume's size and no rekey; promtool accepts the exposition; after detach the target file
is gone. A WorkSpace agent labels its series with the WorkSpace id and reports its last
snapshot's time.
"""

import json
import os
import subprocess
import time

from sealvol_testing.ci import require
from sealvol_testing.host import run
from sealvol_testing.paths import SEALVOL_BIN
from sealvol_testing.prometheus import Prometheus, check_metrics, require_prometheus
from sealvol_testing.sealvol import own_world

GIB = 1 << 30
BLOCK = 64 * 1024
WRITES, READS = 10, 5


def scrape(addr):
    import urllib.request
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as r:
        return r.read().decode()


def test_attached_volume_metrics_reach_prometheus(tmp_path):
    require(root=True, fuse=True, files=(SEALVOL_BIN,))
    require_prometheus()
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    vol, mnt, sd = tmp_path / "vol.img", tmp_path / "mnt", tmp_path / "sd"
    mnt.mkdir()
    run(SEALVOL_BIN, "create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(tmp_path / "run"), SEALVOL_METRICS_LISTEN="127.0.0.1:0",
               SEALVOL_METRICS_SD_DIR=str(sd))
    run(SEALVOL_BIN, "attach", "--path", vol, "--mountpoint", mnt, "--volume-key-file", key, env=env)
    try:
        targets = list(sd.glob("*.json"))
        assert len(targets) == 1, f"the agent published no target file in {sd}"
        addr = json.loads(targets[0].read_text())[0]["targets"][0]
        record = json.loads(next((tmp_path / "run").glob("agent-*.json")).read_text())
        assert record["metrics"] == addr, record

        fd = os.open(mnt / "disk", os.O_RDWR)
        try:
            for i in range(WRITES):
                os.pwrite(fd, os.urandom(BLOCK), i * BLOCK)
            os.fsync(fd)
            for i in range(READS):
                assert len(os.pread(fd, BLOCK, i * BLOCK)) == BLOCK
        finally:
            os.close(fd)

        text = scrape(addr)
        assert check_metrics(text) == "", check_metrics(text)

        with Prometheus(tmp_path / "prom", file_sd=sd / "*.json") as prom:
            prom.wait_for_targets_up(1)
            vol_sel = '{job="file_sd",volume="disk"}'
            assert prom.wait_for_value(f"sealvol_volume_written_bytes_total{vol_sel}", WRITES * BLOCK) == WRITES * BLOCK
            assert prom.wait_for_value(f"sealvol_volume_read_bytes_total{vol_sel}", READS * BLOCK) == READS * BLOCK
            assert prom.wait_for_value(f"sealvol_volume_writes_total{vol_sel} >= bool {WRITES}", 1)
            assert prom.wait_for_value(f"sealvol_volume_flushes_total{vol_sel} >= bool 1", 1)
            assert prom.wait_for_value(f"sealvol_volume_size_bytes{vol_sel}", GIB) == GIB
            assert prom.wait_for_value(f"sealvol_rekey_in_progress{vol_sel}", 0) == 0
            assert prom.wait_for_value(f"sum(sealvol_volume_errors_total{vol_sel})", 0) == 0
            assert prom.wait_for_value(f"sealvol_volume_in_flight_requests{vol_sel}", 0) == 0
    finally:
        run(SEALVOL_BIN, "detach", "--mountpoint", mnt, env=env)
    assert not list(sd.glob("agent-*.json")), "the target file outlived its agent"


def test_a_bad_metrics_address_refuses_to_attach(tmp_path):
    require(root=True, fuse=True, files=(SEALVOL_BIN,))
    key = tmp_path / "key"
    key.write_bytes(os.urandom(64))
    vol, mnt = tmp_path / "vol.img", tmp_path / "mnt"
    mnt.mkdir()
    run(SEALVOL_BIN, "create-volume", "--path", vol, "--size-gib", "1", "--volume-key-file", key)
    env = dict(os.environ, SEALVOL_RUNTIME_DIR=str(tmp_path / "run"), SEALVOL_METRICS_LISTEN="localhost")
    p = subprocess.run([str(SEALVOL_BIN), "attach", "--path", str(vol), "--mountpoint", str(mnt),
                        "--volume-key-file", str(key)], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != 0 and "SEALVOL_METRICS_LISTEN" in p.stderr, p.stderr
    with open("/proc/self/mounts") as f:
        assert str(mnt) not in f.read(), "a refused attach left a mount"


def test_workspace_agent_labels_and_last_snapshot(tmp_path):
    require_prometheus()
    with own_world(prefix="sealvol-metrics-ws-") as (daemon, sv, key):
        sd = tmp_path / "sd"
        sv.env.update(SEALVOL_METRICS_LISTEN="127.0.0.1:0", SEALVOL_METRICS_SD_DIR=str(sd))
        ws = sv.launch("xena", key=key)
        before = int(time.time())
        sv.run("create-snapshot", "--workspace-id", ws)
        target = json.loads(next(sd.glob("*.json")).read_text())[0]
        assert target["labels"]["workspace_id"] == ws, target
        with Prometheus(tmp_path / "prom", file_sd=sd / "*.json") as prom:
            prom.wait_for_targets_up(1)
            sel = f'{{workspace_id="{ws}"}}'
            t = prom.wait_for_query(f"sealvol_last_snapshot_timestamp_seconds{sel}", lambda r: len(r) == 1)[0][1]
            assert before - 5 <= t <= time.time() + 5, t
            vols = prom.wait_for_query(f"sealvol_volume_size_bytes{sel}", lambda r: len(r) == 2)
            assert sorted(l["volume"] for l, _ in vols) == ["root", "user"]
            # ext4 on the user volume wrote through the agent (mkfs, mount, journal).
            prom.wait_for_value(f'sealvol_volume_written_bytes_total{{workspace_id="{ws}",volume="user"}} > bool 0', 1)
