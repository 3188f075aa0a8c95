"""sealvol benchmark driver (issue 6, DESIGN §9): every figure next to its yardstick in
one run, medians of --reps interleaved repetitions with min and max; writes
bench/results.json, bench/report.md and bench/report.png.

The logic lives in the `sealbench` package beside this file.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from sealbench import report, suite  # noqa: E402


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sealvol", default="target/release/sealvol")
    ap.add_argument("--kms-daemon", default="target/release/kms-daemon")
    ap.add_argument("--kms-load", default="target/release/kms-load")
    ap.add_argument("--moto-server", default=".venv/bin/moto_server")
    ap.add_argument("--quick", action="store_true", help="smoke test under 3 minutes: short runs, small sizes, scaling once, no rekey unless --only names it")
    ap.add_argument("--size-gib", type=int, default=None, help="volume size for the fio targets (default 2, quick 1)")
    ap.add_argument("--runtime", type=float, default=None, help="seconds per fio run (default 3, quick 0.2)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (default 3, quick 1; >= 3 for a report to quote)")
    ap.add_argument("--only", default=",".join(suite.SECTIONS), help="comma-separated sections: " + ",".join(suite.SECTIONS))
    ap.add_argument("--cache-modes", default="none,writeback",
                    help="sealvol --cache modes measured in the fio section (default both)")
    ap.add_argument("--variants", default="",
                    help="extra encrypted-volume agents in the fio section, comma-separated: "
                         + ",".join(suite.VARIANTS) + " (default none)")
    ap.add_argument("--out-dir", default="bench")
    ap.add_argument("--report-only", action="store_true", help="redraw report.md/.png from OUT_DIR/results.json")
    a = ap.parse_args(argv)
    a.only_default = a.only == ap.get_default("only")
    # As typed to scripts/bench (the binary paths it passes are left out).
    shown, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x in ("--sealvol", "--kms-daemon", "--kms-load", "--moto-server"):
            skip = True
        else:
            shown.append(x)
    a.argv = shown
    q = a.quick
    a.reps = a.reps or (1 if q else 3)
    a.size_gib = a.size_gib or (1 if q else 2)
    a.runtime = a.runtime if a.runtime is not None else (0.2 if q else 3.0)
    a.ramp = 0.0 if q else 1.0
    a.working_set_mib = 128 if q else a.size_gib * 1024 * 3 // 4
    a.scale_runtime = min(a.runtime, 0.2 if q else 2.0)
    a.scale_ramp = 0.0 if q else 0.5
    a.cipher_seconds = 0.25 if q else 1.0
    a.kms_duration = 1 if q else 4
    a.kms_warmup = 0 if q else 1
    a.rekey_size_gib = 1
    a.snapshot_size_gib = 1 if q else 10
    a.snapshot_change_mib = 128 if q else 1024
    a.snapshot_seed_mib = 128 if q else 2048
    # Quick mode is a smoke test: the slow sections (1 GiB rekeys, re-attaching for each
    # thread count) run once, and the RSS-vs-size check only reads (writes make detach flush).
    a.rekey_reps = 1 if q else a.reps
    a.scale_reps = 1 if q else a.reps
    a.rss_writes = not q
    a.only = [s for s in a.only.split(",") if s]
    a.cache_modes = [c for c in a.cache_modes.split(",") if c]
    a.variants = [v for v in a.variants.split(",") if v]
    if set(a.cache_modes) - {"none", "writeback"} or set(a.variants) - set(suite.VARIANTS):
        ap.error(f"unknown cache mode or variant: {a.cache_modes} {a.variants}")
    if q and a.only_default:
        a.only.remove("rekey")  # two 1 GiB re-encryptions do not fit in quick's 3 minutes
    if a.only_default:
        a.only.remove("snapshots")  # needs Garage and a WorkSpace: ask for it with --only snapshots
    bad = set(a.only) - set(suite.SECTIONS)
    if bad:
        ap.error(f"unknown sections: {bad}")
    return a


def merge(old, new, sections):
    """A run of some sections replaces their figures in the previous results and keeps the
    others (each section records when and with which arguments it last ran)."""
    ran = {s: {"date_utc": new["machine"]["date_utc"], "cpu": new["machine"]["cpu"],
               "cores": new["machine"]["cores"], "argv": new["params"].get("argv")} for s in sections}
    runs = old.pop("section_runs", None) or {
        s: {"date_utc": old["machine"]["date_utc"], "cpu": old["machine"]["cpu"], "cores": old["machine"]["cores"]}
        for s in old.get("section_seconds", {})}
    for k, v in new.items():
        if k in ("scaling", "section_seconds") and isinstance(old.get(k), dict):
            old[k].update(v)
        elif k == "errors":
            old[k] = {s: e for s, e in old.get(k, {}).items() if s not in sections} | v
        else:
            old[k] = v
    old["section_runs"] = runs | ran
    return old


def main(argv):
    a = parse(argv)
    results = os.path.join(a.out_dir, "results.json")
    if a.report_only:
        with open(results) as f:
            res = json.load(f)
    else:
        if os.geteuid() != 0:
            sys.exit("scripts/bench needs root (FUSE mounts, loop devices, cryptsetup)")
        t0 = time.monotonic()

        def log(msg):
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

        res = suite.run(a, log)
        os.makedirs(a.out_dir, exist_ok=True)
        if not a.only_default and os.path.exists(results):
            with open(results) as f:
                res = merge(json.load(f), res, a.only)
        with open(results, "w") as f:
            json.dump(res, f, indent=2)
        log(f"wrote {results}")
    notes = os.path.join(a.out_dir, "notes.md")  # hand-written findings (profiles), kept across runs
    res["notes_md"] = open(notes).read() if os.path.exists(notes) else None
    md, png = report.write(res, a.out_dir)
    print("wrote", md, png)
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
