"""Processes, statistics, machine facts and the cleanup stack every resource goes on."""
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import time


class CommandError(RuntimeError):
    """A command failed; carries its stderr so the report of a failed run says why."""


def sh(*args, check=True, timeout=None, **kw):
    """Runs a command, returns stdout; raises CommandError with stderr on failure."""
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise CommandError(f"{' '.join(map(str, args))} -> {p.returncode}\n{p.stderr[-2000:]}")
    return p.stdout


def summary(xs):
    """Median, min, max and count of repeated measurements (None entries dropped)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "all": xs}


def rotated(items, k):
    """items rotated by k: interleaved repetitions start with a different contender."""
    k %= len(items)
    return items[k:] + items[:k]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, what, timeout=30.0, step=0.05):
    """Polls cond() until true or the deadline passes (no blind sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(step)
    raise TimeoutError(f"timed out waiting for {what}")


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == path for line in f)


def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class Cleanup(contextlib.ExitStack):
    """An ExitStack that also turns SIGTERM/SIGINT/SIGHUP into an exception, so every
    mount, loop device and child process registered on it is released on any exit, and
    that at the end lazily unmounts anything still mounted under `root`."""

    def __init__(self, root):
        super().__init__()
        self.root = os.path.realpath(root)

    def __enter__(self):
        super().__enter__()
        self._old = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._old[sig] = signal.signal(sig, self._raise)
        self.callback(self._sweep)
        return self

    @staticmethod
    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for sig, h in self._old.items():
                signal.signal(sig, h)

    def _sweep(self):
        """Last resort: nothing of ours stays mounted or attached."""
        with open("/proc/mounts") as f:
            left = [line.split()[1] for line in f if line.split()[1].startswith(self.root + "/")]
        for m in sorted(left, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if self.root in line:
                subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def tool_version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def machine_facts():
    cpuinfo = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = set(re.search(r"flags\s*:\s*(.*)", cpuinfo).group(1).split())
    crypto_flags = [f for f in ("aes", "vaes", "pclmulqdq", "vpclmulqdq", "avx", "avx2", "avx512f", "avx512vl",
                                "avx512bw", "gfni", "sha_ni") if f in flags]
    return {
        "cpu": model.group(1).strip() if model else "?",
        "cpu_flags_crypto": crypto_flags,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "uptime_start": sh("uptime").strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "versions": {
            "fio": tool_version(["fio", "--version"]),
            "qemu-storage-daemon": tool_version(["qemu-storage-daemon", "--version"]),
            "openssl": tool_version(["openssl", "version"]),
            "cryptsetup": tool_version(["cryptsetup", "--version"]),
            "kernel": platform.version(),
        },
        "backing_fs": sh("df", "-T", "/var/tmp").splitlines()[-1].split()[1],
    }


CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s():
    """CPU seconds the whole machine spent not idle (all cores; user, system, irq, softirq,
    steal; iowait counts as idle), from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / CLK_TCK


def proc_cpu_s(pid):
    """CPU seconds (user + system, every thread) a process has used, or None."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK
