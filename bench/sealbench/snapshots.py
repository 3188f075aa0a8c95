"""Snapshots into S3 on a real Garage (issue 15): a WorkSpace with a 10 GiB user volume,
a first snapshot, 1 GiB of random 4 KiB writes, a second snapshot; bytes uploaded against
the chunks that changed, and time against `aws s3 cp` of the whole volume file to the same
bucket in the same run; restore throughput against `aws s3 cp` down; foreground 4 KiB
IOPS while a snapshot uploads against the same job alone."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import fio
from .util import sh, summary

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "py"))

CHUNK = 512 << 10


def _timed(fn):
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def run(a, work, cl, log):
    os.environ.setdefault("SEALVOL_BIN", str(a.sealvol))
    os.environ.setdefault("KMS_DAEMON_BIN", str(a.kms_daemon))
    from sealvol_testing.garage import Garage
    from sealvol_testing.kms import Daemon
    from sealvol_testing.sealvol import DIRECTORY, KEY_POLICY, Sealvol

    size_gib = a.snapshot_size_gib
    change = (a.snapshot_change_mib << 20)
    root = Path(work) / "snapshots"
    (root / "kms").mkdir(parents=True)
    daemon = Daemon(root / "kms").start()
    cl.callback(daemon.stop)
    garage = Garage(nodes=1, tmp_dir=root / "garage").__enter__()
    cl.callback(lambda: garage.__exit__(None, None, None))
    garage.write_aws_profile(daemon.state_dir, "garage")
    sv = Sealvol(root / "state", daemon)
    sv.env.update({"SEALVOL_SNAPSHOT_STORE": f"s3://{garage.bucket}/bench",
                   "SEALVOL_SNAPSHOT_STORE_PROFILE": "garage", "AWS_ENDPOINT_URL_S3": garage.endpoint,
                   "SEALVOL_SNAPSHOT_INTERVAL": "0"})
    sv.run("register-directory", "--directory-id", DIRECTORY)
    (root / "b" / "etc").mkdir(parents=True)
    sv.run("create-bundle", "--bundle-id", "wsb-test1", "--from-dir", str(root / "b"), "--size-gib", "1")
    key = daemon.client("admin").create_key(Policy=KEY_POLICY)["KeyMetadata"]["Arn"]
    ws = sv.launch("bench", key=key, user_gib=str(size_gib))
    cl.callback(sv.terminate_all)
    home = sv.mnt(ws) / "home"
    user_path = next(v["Path"] for v in sv.json("describe-volumes", "--workspace-id", ws)["Volumes"]
                     if v["Kind"] == "user")
    aws_env = {**sv.env, "AWS_PROFILE": "garage"}
    aws = [str(REPO / ".venv" / "bin" / "aws"), "s3", "cp", "--only-show-errors"]

    def snap():
        t, out = _timed(lambda: sv.json("create-snapshot", "--workspace-id", ws)["Snapshots"])
        return t, {s["Kind"]: s for s in out}

    # Some data first, so the first snapshot has something to carry.
    sh("fio", "--name=seed", f"--filename={home}/seed.bin", "--rw=write", "--bs=1M", "--ioengine=libaio",
       "--direct=1", "--iodepth=8", f"--size={a.snapshot_seed_mib}M", "--output-format=json")
    t_first, first = snap()
    log(f"snapshot 1 (full): {t_first:.1f} s, {first['user']['Upload']['BytesUploaded'] / 2**20:.0f} MiB uploaded")
    # 1 GiB of random 4 KiB writes: every block of a new 1 GiB file once, in random order.
    sh("fio", "--name=change", f"--filename={home}/change.bin", "--rw=randwrite", "--bs=4k", "--ioengine=libaio",
       "--direct=1", "--iodepth=16", f"--size={change}", "--randrepeat=0", "--output-format=json")
    t_second, second = snap()
    up = second["user"]["Upload"]
    header_chunks = 32  # 16 MiB LUKS2 header area, always re-read
    changed_bytes = max(up["ChunksRead"] - header_chunks, 1) * CHUNK
    log(f"snapshot 2 (incremental): {t_second:.1f} s, {up['BytesUploaded'] / 2**20:.0f} MiB uploaded of "
        f"{changed_bytes / 2**20:.0f} MiB in changed chunks ({change / 2**20:.0f} MiB written)")
    # The yardstick: the whole volume file up to the same bucket, and back down.
    file_bytes = os.path.getsize(user_path)
    t_cp_up, _ = _timed(lambda: sh(*aws, user_path, f"s3://{garage.bucket}/cp/volume.img", env=aws_env))
    down = Path(work) / "cp-down.img"
    t_cp_down, _ = _timed(lambda: sh(*aws, f"s3://{garage.bucket}/cp/volume.img", str(down), env=aws_env))
    down.unlink()
    log(f"aws s3 cp of the {file_bytes / 2**30:.0f} GiB volume file: up {t_cp_up:.1f} s, down {t_cp_down:.1f} s")
    # Restore: both volumes fetched from the latest snapshots.
    stored = sum(s["Upload"]["Chunks"] - s["Upload"]["Holes"] for s in second.values()) * CHUNK
    manifests = [json.loads(subprocess.run([*aws[:2], "cp", f"s3://{garage.bucket}/bench/{s['Manifest']}", "-"],
                                           env=aws_env, capture_output=True, check=True).stdout)
                 for s in second.values()]
    restore_bytes = sum(sum(1 for h in m["chunks"] if h) for m in manifests) * CHUNK
    restore_volume_bytes = sum(m["file_size"] for m in manifests)
    t_restore, _ = _timed(lambda: sv.json("restore-workspace", "--workspace-id", ws))
    log(f"restore-workspace: {t_restore:.1f} s for {restore_bytes / 2**20:.0f} MiB of chunks")
    # Foreground I/O during a snapshot against alone: dirty a lot, then measure.
    iops_alone, iops_during = [], []
    for _ in range(a.reps):
        sh("fio", "--name=dirty", f"--filename={home}/dirty.bin", "--rw=write", "--bs=1M", "--ioengine=libaio",
           "--direct=1", "--iodepth=8", f"--size={a.snapshot_change_mib}M", "--output-format=json")
        iops_alone.append(fio.run(f"{home}/fg.bin", "randwrite", "4k", 16, a.runtime, 256 << 20)["iops"])
        done = threading.Event()
        t = threading.Thread(target=lambda: (sv.json("create-snapshot", "--workspace-id", ws), done.set()))
        t.start()
        time.sleep(0.5)
        iops_during.append(fio.run(f"{home}/fg.bin", "randwrite", "4k", 16, a.runtime, 256 << 20)["iops"])
        t.join()
        if not done.is_set():
            log("!! the snapshot ran during the foreground job did not finish")
    out = {
        "volume_gib": size_gib,
        "written_mib": change / 2**20,
        "first": {"seconds": t_first, "bytes_uploaded": first["user"]["Upload"]["BytesUploaded"]
                  + first["root"]["Upload"]["BytesUploaded"]},
        "second": {"seconds": t_second, "bytes_uploaded": up["BytesUploaded"], "chunks_read": up["ChunksRead"],
                   "changed_chunk_bytes": changed_bytes, "root_bytes_uploaded": second["root"]["Upload"]["BytesUploaded"]},
        "aws_s3_cp_up_seconds": t_cp_up,
        "aws_s3_cp_down_seconds": t_cp_down,
        "volume_file_bytes": file_bytes,
        "restore": {"seconds": t_restore, "bytes": restore_bytes, "stored_bytes": stored,
                    "volume_bytes": restore_volume_bytes},
        "fg_iops_alone": summary(iops_alone),
        "fg_iops_during_snapshot": summary(iops_during),
    }
    out["ratios"] = {
        "uploaded_over_changed": up["BytesUploaded"] / changed_bytes,
        "second_snapshot_speedup_vs_cp": t_cp_up / t_second,
        "restore_mb_s": restore_bytes / t_restore / 1e6,
        "cp_down_mb_s": file_bytes / t_cp_down / 1e6,
        "restore_over_cp_down": (restore_bytes / t_restore) / (file_bytes / t_cp_down),
        "restore_volume_mb_s": restore_volume_bytes / t_restore / 1e6,
        "restore_volume_over_cp_down": (restore_volume_bytes / t_restore) / (file_bytes / t_cp_down),
        "fg_iops_during_over_alone": out["fg_iops_during_snapshot"]["median"] / out["fg_iops_alone"]["median"],
    }
    log("snapshots: " + ", ".join(f"{k} {v:.2f}" for k, v in out["ratios"].items()))
    sv.terminate_all()
    return out
