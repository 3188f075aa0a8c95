"""The whole run: every contender side by side, repetitions interleaved (each repetition
starts with a different contender) so drift from other load hits all of them."""
import os
import tempfile
import time

from . import fio, peers, snapshots
from .targets import LoopExt4, QsdLuks, RawFile, SealvolVolume
from .util import Cleanup, machine_facts, rotated, rss_kib, summary

SECTIONS = ("cipher", "fio", "metrics", "scaling", "rss", "kms", "rekey", "snapshots")

# Agent variants measured beside the defaults (`--variants`): each adds an encrypted volume
# per cache mode whose agent runs with this environment.
VARIANTS = {
    "backing-uring": {"SEALVOL_BACKING_IO": "uring"},
    "fuse-uring": {"SEALVOL_FUSE_TRANSPORT": "uring"},
    "all-uring": {"SEALVOL_BACKING_IO": "uring", "SEALVOL_FUSE_TRANSPORT": "uring"},
}
# The backing engine serves only `--cache none` files (writeback is always synchronous).
VARIANT_MODES = {"backing-uring": ("none",), "all-uring": ("none",)}
# FUSE over io_uring is offered only while this kernel switch is on (off by default).
FUSE_URING_SWITCH = "/sys/module/fuse/parameters/enable_uring"


def _fuse_uring_on(cl):
    """Turns the kernel's FUSE-over-io_uring switch on for the run, back as it was after."""
    with open(FUSE_URING_SWITCH) as f:
        was = f.read().strip()
    with open(FUSE_URING_SWITCH, "w") as f:
        f.write("Y")

    def restore():
        with open(FUSE_URING_SWITCH, "w") as f:
            f.write(was)
    cl.callback(restore)


def fio_target_specs(a):
    """(name, label, factory(work)) for every fio target of the run, in report order."""
    size = a.size_gib << 30

    def vol(name, enc, cache, env=None):
        return lambda work: SealvolVolume(a.sealvol, work, name, a.size_gib, encrypted=enc, cache=cache, env=env)

    def ext4(name, enc, cache):
        return lambda work: LoopExt4(SealvolVolume(a.sealvol, work, name + "-vol", a.size_gib, encrypted=enc,
                                                   cache=cache), work, name)

    specs = [("raw", "raw backing file (host fs, fio O_DIRECT): the device limit",
              lambda work: RawFile(work, "raw", size))]
    for c in a.cache_modes:
        specs.append((f"enc-{c}", f"sealvol encrypted volume, --cache {c} (FUSE /dev/fuse)", vol(f"enc-{c}", True, c)))
        specs.append((f"plain-{c}", f"sealvol unencrypted volume, --cache {c}", vol(f"plain-{c}", False, c)))
    for v in a.variants:
        for c in (c for c in a.cache_modes if c in VARIANT_MODES.get(v, a.cache_modes)):
            specs.append((f"enc-{c}-{v}", f"sealvol encrypted, --cache {c}, {' '.join(f'{k}={x}' for k, x in VARIANTS[v].items())}",
                          vol(f"enc-{c}-{v}", True, c, VARIANTS[v])))
    specs.append(("qsd-direct", "qemu-storage-daemon LUKS FUSE export, cache.direct=on (qemu cache=none)",
                  lambda work: QsdLuks(work, "qsd-direct", size, direct=True)))
    specs.append(("qsd-writeback", "qemu-storage-daemon LUKS FUSE export, its default (writeback)",
                  lambda work: QsdLuks(work, "qsd-writeback", size)))
    for c in a.cache_modes:
        specs.append((f"ext4-enc-{c}", f"loop + ext4 on a sealvol encrypted volume, --cache {c}", ext4(f"ext4-enc-{c}", True, c)))
        specs.append((f"ext4-plain-{c}", f"loop + ext4 on a sealvol unencrypted volume, --cache {c}",
                      ext4(f"ext4-plain-{c}", False, c)))
    return specs


def _close_target(t):
    t.close()
    if isinstance(t, LoopExt4):
        t.under.close()


REQUEST_SIZES = ["4k", "16k", "64k", "256k", "1M"]
THREADS = [1, 2, 4]
RSS_SIZES_GIB = [1, 10, 100]


class Scraper:
    """Scrapes an agent's /metrics every second, as Prometheus would, while fio runs."""

    def __init__(self, addr):
        import threading
        self.addr, self.count, self.failures = addr, 0, 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if addr:
            self.thread.start()

    def _run(self):
        import urllib.request
        while not self.done.wait(1.0):
            try:
                with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=5) as r:
                    r.read()
                self.count += 1
            except OSError:
                self.failures += 1

    def stop(self):
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()


def _timed(fn):
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def run_fio_section(a, work, cl, res, log):
    ws = a.working_set_mib << 20
    t = {}
    res["target_labels"] = {}
    if any("SEALVOL_FUSE_TRANSPORT" in VARIANTS[v] for v in a.variants):
        _fuse_uring_on(cl)
    for name, label, make in fio_target_specs(a):
        t[name] = make(work)
        cl.callback(_close_target, t[name])
        res["target_labels"][name] = label
    names = list(t)
    res["fio_fill_mb_per_s"] = {}
    for n in names:
        dt = _timed(lambda: fio.fill(t[n].path, ws))
        res["fio_fill_mb_per_s"][n] = ws / dt / 1e6
    log(f"filled {a.working_set_mib} MiB on {len(names)} targets: "
        + ", ".join(f"{n} {v:.0f} MB/s" for n, v in res["fio_fill_mb_per_s"].items()))
    def server_rss():
        """RSS (KiB) of each target's server process; one /proc scan per target."""
        return {n: rss_kib(pid) for n, v in t.items() if (pid := v.server_pid())}

    rss = {"after_fill": server_rss()}

    # Each row is its own fio process so that its CPU can be measured; targets rotate per
    # repetition, rows keep their order within a target.
    per = {n: {row[0]: [] for row in fio.ROWS} for n in names}
    for rep in range(a.reps):
        for n in rotated(names, rep):
            pid = t[n].server_pid()
            for row, rw, bs, qd, _ in fio.ROWS:
                per[n][row].append(fio.run_measured(t[n].path, rw, bs, qd, a.runtime, ws, a.ramp, pid))
        log(f"fio repetition {rep + 1}/{a.reps} done")
    out = {}
    for row, rw, bs, qd, metric in fio.ROWS:
        pick = lambda n, k: summary([r[k] for r in per[n][row]])  # noqa: E731
        entry = {"rw": rw, "bs": bs, "iodepth": qd, "metric": metric,
                 "targets": {n: pick(n, metric) for n in names},
                 "p99_us": {n: pick(n, "p99_us") for n in names},
                 "cpu_machine_s_per_gib": {n: pick(n, "cpu_machine_s_per_gib") for n in names},
                 "cpu_server_s_per_gib": {n: pick(n, "cpu_server_s_per_gib") for n in names}}
        out[row] = entry
        med = {n: entry["targets"][n]["median"] for n in names}
        log(f"{row:22s} " + " ".join(f"{n}={med[n]:.0f}" for n in names) + f" ({metric})")
    res["fio"] = out

    # Request-size scaling: random reads QD8 on the FUSE files, ours and the peer's.
    sc = {}
    who = [n for n in ("enc-none", "enc-writeback", "qsd-direct", "qsd-writeback") if n in t]
    per = {(n, bs): [] for n in who for bs in REQUEST_SIZES}
    size_jobs = [(bs, "randread", bs, 8) for bs in REQUEST_SIZES]
    for rep in range(a.scale_reps):
        for n in rotated(who, rep):
            for bs, r in fio.run_batch(t[n].path, size_jobs, a.scale_runtime, ws, a.scale_ramp).items():
                per[(n, bs)].append(r["mb_per_s"])
    for (n, bs), xs in per.items():
        sc.setdefault(n, {})[bs] = summary(xs)
    res.setdefault("scaling", {})["request_size_randread_qd8_mb_per_s"] = sc
    log("request size (randread QD8, MB/s): " + "; ".join(
        f"{n}: " + " ".join(f"{bs}={sc[n][bs]['median']:.0f}" for bs in REQUEST_SIZES) for n in who))

    rss["after_load"] = server_rss()
    res["rss_fio_targets_kib"] = rss
    for n in reversed(names):
        _close_target(t[n])


def run_thread_scaling(a, work, cl, res, log):
    ws = a.working_set_mib << 20
    vol = SealvolVolume(a.sealvol, work, "threads", a.size_gib, encrypted=True, threads=4)
    cl.callback(vol.close)
    fio.fill(vol.path, ws)
    vol.detach()
    jobs = [("seq-read-1M-qd4", "read", "1M", 4, "mb_per_s"), ("rand-read-4k-qd16", "randread", "4k", 16, "iops"),
            ("rand-write-4k-qd16", "randwrite", "4k", 16, "iops")]
    per = {(j[0], th): [] for j in jobs for th in THREADS}
    for rep in range(a.scale_reps):
        for th in rotated(THREADS, rep):
            vol.attach(th)
            got = fio.run_batch(vol.path, [j[:4] for j in jobs], a.scale_runtime, ws, a.scale_ramp)
            for name, rw, bs, qd, metric in jobs:
                per[(name, th)].append(got[name][metric])
            vol.detach()
    out = {}
    for (name, th), xs in per.items():
        out.setdefault(name, {})[str(th)] = summary(xs)
    res.setdefault("scaling", {})["fuse_threads_encrypted"] = out
    log("FUSE threads (encrypted): " + "; ".join(
        f"{n}: " + " ".join(f"{th}t={out[n][str(th)]['median']:.0f}" for th in THREADS) for n in out))
    vol.close()


def run_metrics_overhead(a, work, cl, res, log):
    """What the agent's metrics cost on the 4 KiB rows: ONE encrypted volume (same backing
    file, so file layout and host caching cannot differ), attached alternately with metrics
    off and on (SEALVOL_METRICS_LISTEN, scraped every second as Prometheus would), in
    rotated order; twice the usual repetitions, since the difference sought is small."""
    ws = a.working_set_mib << 20
    vol = SealvolVolume(a.sealvol, work, "metrics", a.size_gib, encrypted=True, metrics=True)
    cl.callback(vol.close)
    env_on = vol.env
    fio.fill(vol.path, ws)
    vol.detach()
    jobs = [(row, rw, bs, qd) for row, rw, bs, qd, _ in fio.ROWS if bs == "4k"]
    per = {(row, mode): [] for row, *_ in jobs for mode in ("off", "on")}
    scrapes = 0
    for rep in range(a.reps * 2):
        for mode in rotated(["off", "on"], rep):
            vol.env = env_on if mode == "on" else None
            vol.attach(4)
            scraper = Scraper(vol.metrics_addr()) if mode == "on" else None
            got = fio.run_batch(vol.path, jobs, a.runtime, ws, a.ramp)
            if scraper:
                scraper.stop()
                scrapes += scraper.count
            for row, *_ in jobs:
                per[(row, mode)].append(got[row]["iops"])
            vol.detach()
    out = {row: {mode: summary(per[(row, mode)]) for mode in ("off", "on")} for row, *_ in jobs}
    res["metrics_overhead_iops"] = out
    res["metrics_overhead_scrapes"] = scrapes
    log("metrics off/on, same encrypted volume (IOPS): " + "; ".join(
        f"{row} {v['off']['median']:.0f}/{v['on']['median']:.0f}" for row, v in out.items()) + f"; {scrapes} scrapes")
    vol.close()


def run_rss_scaling(a, work, cl, res, log):
    """Agent RSS as the (sparse) volume grows: right after attach, and after random 4 KiB
    writes then reads spread over the whole volume."""
    out = {}
    for g in RSS_SIZES_GIB:
        vol = SealvolVolume(a.sealvol, work, f"rss{g}", g, encrypted=True)
        cl.callback(vol.close)
        idle = vol.agent_rss_kib()
        size = g << 30
        jobs = [("w", "randwrite", "4k", 16)] if a.rss_writes else []
        fio.run_batch(vol.path, jobs + [("r", "randread", "4k", 16)], a.scale_runtime, size, 0)
        out[f"{g}"] = {"rss_after_attach_kib": idle, "rss_after_io_kib": vol.agent_rss_kib(),
                       "backing_allocated_mib": vol.backing_allocated_bytes() / 2**20}
        vol.close()
    res["rss_vs_volume_size"] = out
    log("agent RSS (KiB) after I/O, by volume size: " + ", ".join(
        f"{g} GiB={v['rss_after_io_kib']}" for g, v in out.items()))


def run(a, log):
    res = {"machine": machine_facts(), "params": {k: v for k, v in vars(a).items()}, "errors": {}}
    t_start = time.monotonic()
    work = tempfile.mkdtemp(prefix="sealvol-bench-", dir="/var/tmp")
    with Cleanup(work) as cl:
        steps = {
            "cipher": lambda: res.__setitem__("cipher", peers.cipher(a.sealvol, a.reps, a.cipher_seconds, log)),
            "fio": lambda: run_fio_section(a, work, cl, res, log),
            "metrics": lambda: run_metrics_overhead(a, work, cl, res, log),
            "scaling": lambda: run_thread_scaling(a, work, cl, res, log),
            "rss": lambda: run_rss_scaling(a, work, cl, res, log),
            "kms": lambda: res.__setitem__("kms", peers.kms(a.kms_daemon, a.kms_load, a.moto_server, work, cl, a.reps,
                                                            a.kms_duration, a.kms_warmup, log)),
            "rekey": lambda: res.__setitem__("rekey", peers.rekey(a.sealvol, work, a.rekey_reps, a.rekey_size_gib, log)),
            "snapshots": lambda: res.__setitem__("snapshots", snapshots.run(a, work, cl, log)),
        }
        for name in a.only:
            t0 = time.monotonic()
            try:
                steps[name]()
            except KeyboardInterrupt:
                raise
            except Exception as e:  # one failed section must not lose the others
                res["errors"][name] = f"{type(e).__name__}: {e}"
                log(f"!! {name} failed: {e}")
            res.setdefault("section_seconds", {})[name] = round(time.monotonic() - t0, 1)
    res["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    res["total_seconds"] = round(time.monotonic() - t_start, 1)
    return res
