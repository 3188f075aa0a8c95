"""The fio part of the report (issue 14): every row on every target, the ratios the issue
sets targets for, and CPU time per GiB moved beside every figure."""

SEQ_ROWS = ("seq-read-1M-qd4", "seq-write-1M-qd4")
QD16_4K = ("rand-read-4k-qd16", "rand-write-4k-qd16", "mixed-70r30w-4k-qd16")


def ratio(a, b):
    """Median ratio a/b, and the worst/best ratio the min/max ranges allow."""
    if not a or not b or not b["median"]:
        return None
    return {"median": a["median"] / b["median"], "lo": a["min"] / b["max"], "hi": a["max"] / b["min"]}


def fmt(x, nd=0):
    if x is None:
        return "–"
    if abs(x) >= 100 or nd == 0:
        return f"{x:,.0f}"
    return f"{x:.{nd}f}"


def cell(s, nd=0):
    if not s:
        return "–"
    return f"{fmt(s['median'], nd)} <sub>[{fmt(s['min'], nd)}–{fmt(s['max'], nd)}]</sub>"


def columns(res):
    f = res.get("fio") or {}
    if not f:
        return []
    present = next(iter(f.values()))["targets"]
    order = list(res.get("target_labels", {})) or list(present)
    return [t for t in order if t in present]


def targets(res):
    """(figure, ratio, goal) for every fio target of issues 6 and 14."""
    f = res.get("fio") or {}
    rows = []
    for row, e in f.items():
        t = e["targets"]
        rows.append((f"{row}: enc-none / raw O_DIRECT", ratio(t.get("enc-none"), t.get("raw")),
                     0.9 if row in SEQ_ROWS else 0.8 if row in QD16_4K[:2] else None))
    for row, e in f.items():
        t = e["targets"]
        goal = 3.0 if row in SEQ_ROWS else 2.0 if row in QD16_4K else None
        rows.append((f"{row}: enc-none / qemu cache.direct=on", ratio(t.get("enc-none"), t.get("qsd-direct")), goal))
    for row, e in f.items():
        t = e["targets"]
        goal = 2.0 if row == "rand-write-4k-qd16" else 1.0
        rows.append((f"{row}: enc-writeback / qemu writeback", ratio(t.get("enc-writeback"), t.get("qsd-writeback")), goal))
    for mode in ("none", "writeback"):
        for row, e in f.items():
            t = e["targets"]
            rows.append((f"{row}: encrypted / unencrypted volume, --cache {mode}",
                         ratio(t.get(f"enc-{mode}"), t.get(f"plain-{mode}")), 0.9))
        e = f.get("rand-write-4k-qd16")
        if e:
            t = e["targets"]
            rows.append((f"rand-write-4k-qd16: loop + ext4, encrypted / unencrypted, --cache {mode}",
                         ratio(t.get(f"ext4-enc-{mode}"), t.get(f"ext4-plain-{mode}")), 0.8))
    return [r for r in rows if r[1] is not None and r[2] is not None]


def markdown(res):
    f = res.get("fio")
    if not f:
        return []
    L = []
    w = L.append
    labels = res.get("target_labels", {})
    cols = columns(res)
    w("## fio: every row on every target\n")
    w("fio libaio `direct=1` on the file each target serves, time-based, the working set written once "
      "first. 1 MiB rows in MB/s (10⁶ B/s), 4 KiB rows in IOPS (read + write for the mix); median "
      "<sub>[min–max]</sub> of the repetitions, targets rotated per repetition. `direct=1` bypasses the page "
      "cache of the file fio opens; what the server does with its own backing file is its cache mode: "
      "`--cache none` (and qemu `cache.direct=on`) go to the disk with O_DIRECT, `writeback` goes through "
      "the host page cache, which is why a writeback target can read faster than `raw`. The qemu peer is "
      "LUKS1 (qemu 10.0 refuses LUKS2), aes-xts-plain64, 512-bit key.\n")
    w("| row | " + " | ".join(cols) + " |")
    w("|---|" + "---|" * len(cols))
    for row, e in f.items():
        t = e["targets"]
        w(f"| {row} ({'MB/s' if e['metric'] == 'mb_per_s' else 'IOPS'}) | " + " | ".join(cell(t.get(c)) for c in cols) + " |")
    w("\nTargets: " + "; ".join(f"`{c}` = {labels.get(c, c)}" for c in cols) + ".\n")
    if any(e.get("cpu_machine_s_per_gib") for e in f.values()):
        w("### CPU seconds per GiB moved\n")
        w("Whole machine (every core, user + system + interrupts: the server, the kernel's FUSE and block "
          "layers, and fio itself) / the server process alone (agent or qemu-storage-daemon, all threads, "
          "user + system), over each fio process, divided by the GiB fio moved in it. Lower is better. The "
          "machine figure also counts whatever else ran (see the load average above).\n")
        w("| row | " + " | ".join(cols) + " |")
        w("|---|" + "---|" * len(cols))
        for row, e in f.items():
            cm, cs = e.get("cpu_machine_s_per_gib", {}), e.get("cpu_server_s_per_gib", {})
            cells = []
            for c in cols:
                m, s = cm.get(c), cs.get(c)
                cells.append(f"{fmt(m['median'], 2) if m else '–'} / {fmt(s['median'], 2) if s else '–'}")
            w(f"| {row} | " + " | ".join(cells) + " |")
        w("")
    w("### p99 completion latency (µs), 4 KiB rows\n")
    w("| row | " + " | ".join(cols) + " |")
    w("|---|" + "---|" * len(cols))
    for row, e in f.items():
        if e["metric"] == "iops":
            w(f"| {row} | " + " | ".join(fmt((e["p99_us"].get(c) or {}).get("median")) for c in cols) + " |")
    if res.get("fio_fill_mb_per_s"):
        w("\nFirst write of the working set (fio 1 MiB sequential, QD8, once, not repeated): "
          + ", ".join(f"{k} {v:.0f} MB/s" for k, v in res["fio_fill_mb_per_s"].items()) + ".\n")
    return L
