"""fio jobs, JSON output parsed (never scraped)."""
import json
import time

from .util import machine_busy_s, proc_cpu_s, sh

# name, rw, bs, iodepth, metric. 4 KiB rows report IOPS (read + write for the mix),
# 1 MiB rows MB/s (10^6 bytes/s, as fio's bw_bytes).
ROWS = [
    ("seq-read-1M-qd4", "read", "1M", 4, "mb_per_s"),
    ("seq-write-1M-qd4", "write", "1M", 4, "mb_per_s"),
    ("rand-read-4k-qd1", "randread", "4k", 1, "iops"),
    ("rand-read-4k-qd16", "randread", "4k", 16, "iops"),
    ("rand-write-4k-qd1", "randwrite", "4k", 1, "iops"),
    ("rand-write-4k-qd16", "randwrite", "4k", 16, "iops"),
    ("mixed-70r30w-4k-qd16", "randrw", "4k", 16, "iops"),
]


def fill(path, size_bytes):
    """Writes every byte of the working set once (random, non-zero data) so reads hit
    real ciphertext and not holes; creates the file for the ext4 targets."""
    sh("fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", "--iodepth=8",
       "--ioengine=libaio", "--direct=1", f"--size={size_bytes}", "--output-format=json")


def run(path, rw, bs, iodepth, runtime_s, size_bytes, ramp_s=1.0, extra=()):
    """One time-based fio job; returns MB/s, IOPS and p99 completion latency (µs)."""
    args = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
            "--ioengine=libaio", "--direct=1", f"--size={size_bytes}", "--time_based",
            f"--runtime={int(runtime_s * 1000)}ms", "--randrepeat=0", "--norandommap",
            "--group_reporting", "--output-format=json", *extra]
    if ramp_s > 0:
        args.append(f"--ramp_time={int(ramp_s * 1000)}ms")
    if rw == "randrw":
        args.append("--rwmixread=70")
    job = json.loads(sh(*args))["jobs"][0]
    sides = [job[s] for s in ("read", "write") if job[s]["io_bytes"] > 0]
    p99 = [s["clat_ns"]["percentile"].get("99.000000") for s in sides if s["clat_ns"].get("percentile")]
    return {
        "mb_per_s": sum(s["bw_bytes"] for s in sides) / 1e6,
        "iops": sum(s["iops"] for s in sides),
        "p99_us": max(p99) / 1e3 if p99 else None,
    }


def run_measured(path, rw, bs, iodepth, runtime_s, size_bytes, ramp_s, server_pid):
    """`run`, plus the CPU it cost: whole-machine busy CPU seconds and the server process's
    (agent or qemu-storage-daemon; kernel time in its threads included) per GiB moved. The
    CPU window is the whole fio process; the bytes in that window are fio's steady
    bandwidth times the window, so start-up and ramp count on both sides."""
    m0, s0, t0 = machine_busy_s(), proc_cpu_s(server_pid), time.monotonic()
    r = run(path, rw, bs, iodepth, runtime_s, size_bytes, ramp_s)
    m1, s1, dt = machine_busy_s(), proc_cpu_s(server_pid), time.monotonic() - t0
    gib = r["mb_per_s"] * 1e6 * dt / 2**30
    r["cpu_machine_s_per_gib"] = (m1 - m0) / gib if gib > 0 else None
    r["cpu_server_s_per_gib"] = (s1 - s0) / gib if gib > 0 and s0 is not None and s1 is not None else None
    return r


def run_batch(path, jobs, runtime_s, size_bytes, ramp_s=1.0):
    """Several jobs one after the other (`stonewall`) in one fio process, which saves
    fio's start-up per job. jobs: (name, rw, bs, iodepth). Returns name -> metrics."""
    args = ["fio", f"--filename={path}", "--ioengine=libaio", "--direct=1", f"--size={size_bytes}",
            "--time_based", f"--runtime={int(runtime_s * 1000)}ms", "--randrepeat=0", "--norandommap",
            "--invalidate=0", "--output-format=json"]
    if ramp_s > 0:
        args.append(f"--ramp_time={int(ramp_s * 1000)}ms")
    for name, rw, bs, qd in jobs:
        args += [f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", "--stonewall"]
        if rw == "randrw":
            args.append("--rwmixread=70")
    out = {}
    for job in json.loads(sh(*args))["jobs"]:
        sides = [job[s] for s in ("read", "write") if job[s]["io_bytes"] > 0]
        p99 = [s["clat_ns"]["percentile"].get("99.000000") for s in sides if s["clat_ns"].get("percentile")]
        out[job["jobname"]] = {
            "mb_per_s": sum(s["bw_bytes"] for s in sides) / 1e6,
            "iops": sum(s["iops"] for s in sides),
            "p99_us": max(p99) / 1e3 if p99 else None,
        }
    return out
