"""sealvol benchmark driver: runs each figure and its yardstick in the same run.

Figures are medians of --reps repetitions (min and max kept). fio output is parsed as
JSON, openssl speed's table as text (it has no machine format).
"""
import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def sh(*args, **kw):
    return subprocess.run(args, check=True, capture_output=True, text=True, **kw).stdout


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def openssl_xts(seconds):
    out = sh("openssl", "speed", "-evp", "aes-256-xts", "-bytes", "4096", "-seconds", str(seconds))
    # Last line: "AES-256-XTS   123456.78k" (k = 1000 bytes/s)
    for line in reversed(out.splitlines()):
        m = re.search(r"(\d+(?:\.\d+)?)k\s*$", line)
        if m and "xts" in line.lower():
            return float(m.group(1)) * 1000 / 1e6
    raise RuntimeError("cannot parse openssl speed output:\n" + out)


def sealvol_cipher(sealvol, seconds):
    figs = json.loads(sh(sealvol, "bench", "--seconds", str(seconds), "--output", "json"))
    return figs


class Attached:
    """A volume attached through sealvol's FUSE agent; detached on exit."""

    def __init__(self, sealvol, workdir, name, size_gib, encrypted, threads=4):
        self.sealvol, self.mnt = sealvol, os.path.join(workdir, name + ".mnt")
        self.vol = os.path.join(workdir, name + ".img")
        os.makedirs(self.mnt, exist_ok=True)
        args = [sealvol, "create-volume", "--force", "--path", self.vol, "--size-gib", str(size_gib)]
        attach = [sealvol, "attach", "--path", self.vol, "--mountpoint", self.mnt, "--threads", str(threads)]
        if encrypted:
            kf = os.path.join(workdir, name + ".key")
            with open(kf, "wb") as f:
                f.write(os.urandom(64))
            args += ["--volume-key-file", kf]
            attach += ["--volume-key-file", kf]
        else:
            args.append("--unencrypted")
            attach.append("--unencrypted")
        sh(*args)
        sh(*attach)
        self.disk = os.path.join(self.mnt, "disk")

    def agent_rss_kib(self):
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
                if b"attach" in cmd and self.mnt.encode() in cmd:
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmRSS:"):
                            return int(line.split()[1])
            except OSError:
                continue
        return None

    def close(self):
        subprocess.run([self.sealvol, "detach", "--mountpoint", self.mnt], capture_output=True)
        os.unlink(self.vol)


FIO_ROWS = [
    ("seq-read-1M", "read", "1M", 4),
    ("seq-write-1M", "write", "1M", 4),
    ("rand-read-4k-qd16", "randread", "4k", 16),
    ("rand-write-4k-qd16", "randwrite", "4k", 16),
]


def fio(target, rw, bs, iodepth, runtime, size):
    out = sh(
        "fio", "--name=bench", f"--filename={target}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={iodepth}",
        "--ioengine=libaio", "--direct=1", f"--size={size}", "--time_based", f"--runtime={runtime}",
        "--ramp_time=1", "--group_reporting", "--output-format=json",
    )
    job = json.loads(out)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"mb_per_s": side["bw_bytes"] / 1e6, "iops": side["iops"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sealvol", required=True)
    ap.add_argument("--quick", action="store_true", help="short runs (under 3 minutes)")
    ap.add_argument("--size-gib", type=int, default=2)
    ap.add_argument("--runtime", type=int, default=5, help="seconds per fio run")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results.json")
    a = ap.parse_args()
    if a.quick:
        a.runtime, a.size_gib = 2, 1
    res = {"machine": {"cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
                       "cores": os.cpu_count(), "kernel": platform.release()},
           "cipher": {}, "fio": {}, "rss": {}}

    # Cipher vs OpenSSL, interleaved so drift hits both.
    ossl, ours = [], []
    for _ in range(a.reps):
        ossl.append(openssl_xts(1 if a.quick else 2))
        figs = sealvol_cipher(a.sealvol, 1 if a.quick else 2)
        ours.append(next(f["mb_per_s"] for f in figs if f["sector_size"] == 4096 and f["threads"] == 1 and f["op"] == "encrypt"))
    res["cipher"] = {"openssl_aes256xts_4096_mb_s": summary(ossl), "sealvol_xts_4096_1t_encrypt_mb_s": summary(ours),
                     "ratio": statistics.median(ours) / statistics.median(ossl), "all_figures_last_rep": figs}
    print(f"cipher: sealvol {statistics.median(ours):.0f} MB/s vs openssl {statistics.median(ossl):.0f} MB/s "
          f"= {res['cipher']['ratio']:.2f}x", flush=True)

    work = tempfile.mkdtemp(prefix="sealvol-bench-", dir="/var/tmp")
    vols = {}
    try:
        vols["plain"] = Attached(a.sealvol, work, "plain", a.size_gib, encrypted=False)
        vols["encrypted"] = Attached(a.sealvol, work, "encrypted", a.size_gib, encrypted=True)
        size = f"{a.size_gib}G"
        # Pre-fill so reads hit real ciphertext, not holes.
        for v in vols.values():
            sh("fio", "--name=fill", f"--filename={v.disk}", "--rw=write", "--bs=1M", "--iodepth=4",
               "--ioengine=libaio", "--direct=1", f"--size={size}")
        for v in vols.values():
            res["rss"][f"{next(k for k, x in vols.items() if x is v)}_after_fill_kib"] = v.agent_rss_kib()
        for row, rw, bs, qd in FIO_ROWS:
            per = {k: [] for k in vols}
            for _ in range(a.reps):
                for k, v in vols.items():  # interleaved
                    per[k].append(fio(v.disk, rw, bs, qd, a.runtime, size))
            metric = "mb_per_s" if bs == "1M" else "iops"
            entry = {k: summary([r[metric] for r in rs]) for k, rs in per.items()}
            entry["metric"] = metric
            entry["ratio_encrypted_vs_plain"] = entry["encrypted"]["median"] / entry["plain"]["median"]
            res["fio"][row] = entry
            print(f"{row:22s} plain {entry['plain']['median']:10.0f} encrypted {entry['encrypted']['median']:10.0f} "
                  f"{metric}  ratio {entry['ratio_encrypted_vs_plain']:.2f}", flush=True)
        for k, v in vols.items():
            res["rss"][f"{k}_after_load_kib"] = v.agent_rss_kib()
        print("agent RSS (KiB):", json.dumps(res["rss"]))
    finally:
        for v in vols.values():
            v.close()
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    print("wrote", a.out)


if __name__ == "__main__":
    sys.exit(main())
