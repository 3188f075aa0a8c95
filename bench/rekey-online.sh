#!/usr/bin/env bash
# Foreground I/O during an online rekey (issue #5): a 4 KiB random 70/30 read/write fio
# job at QD16 on an attached encrypted volume's FUSE file, first alone, then while
# `sealvol rekey-volume --mountpoint` re-encrypts the whole volume underneath it.
# fio's 100 ms IOPS log gives the IOPS inside the rekey window and the worst 100 ms
# window; fio's own maximum completion latency is the longest any single I/O waited
# (the bound: about one hotzone's time).
#
# Usage: bench/rekey-online.sh [--size-gib N] [--hotzone-mib N] [--seconds S]
#                              [--during-seconds S] [--resilience journal|checksum]
#                              [--output json]
#   --seconds: the job alone; --during-seconds: the job the rekey starts 2 s into (it must
#   outlast the rekey)
#   SEALVOL_BIN=path   use this binary (default: cargo build --release)
#   BENCH_DIR=dir      where the image and mount go (default: a temp dir under /var/tmp)
set -euo pipefail

SIZE_GIB=1
HOTZONE_MIB=2
RESILIENCE=journal
SECONDS_BASE=8
SECONDS_DURING=15
OUTPUT=table
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --hotzone-mib) HOTZONE_MIB="$2"; shift 2 ;;
        --seconds) SECONDS_BASE="$2"; shift 2 ;;
        --during-seconds) SECONDS_DURING="$2"; shift 2 ;;
        --resilience) RESILIENCE="$2"; shift 2 ;;
        --output) OUTPUT="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[[ $(id -u) -eq 0 ]] || { echo "bench/rekey-online.sh needs root (FUSE mount)" >&2; exit 2; }
command -v fio >/dev/null || { echo "needs fio (apt-get install fio)" >&2; exit 2; }
if [[ -z "${SEALVOL_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --quiet --release --bin sealvol)
    SEALVOL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/sealvol"
fi

DIR="$(mktemp -d "${BENCH_DIR:-/var/tmp}/sealvol-rekey-online.XXXXXX")"
MNT="$DIR/mnt"
cleanup() {
    [[ -n "${FIO_PID:-}" ]] && kill "$FIO_PID" 2>/dev/null || true
    "$SEALVOL_BIN" detach --mountpoint "$MNT" >/dev/null 2>&1 || true
    rm -rf "$DIR"
}
trap cleanup EXIT
mkdir -p "$MNT"
head -c 64 /dev/urandom >"$DIR/old.key"
head -c 64 /dev/urandom >"$DIR/new.key"

"$SEALVOL_BIN" create-volume --path "$DIR/vol.luks" --size-gib "$SIZE_GIB" --volume-key-file "$DIR/old.key" >/dev/null
# Every sector real work for the rekey (no holes).
dd if=/dev/urandom of="$DIR/vol.luks" bs=1M seek=16 count=$(( SIZE_GIB * 1024 )) conv=notrunc status=none
"$SEALVOL_BIN" attach --path "$DIR/vol.luks" --mountpoint "$MNT" --volume-key-file "$DIR/old.key" >/dev/null

fio_job() { # name runtime
    fio --name="$1" --filename="$MNT/disk" --rw=randrw --rwmixread=70 --bs=4k \
        --ioengine=libaio --iodepth=16 --direct=1 --time_based --runtime="$2" \
        --randrepeat=0 --norandommap --group_reporting \
        --write_iops_log="$DIR/$1" --log_avg_msec=100 --output-format=json --output="$DIR/$1.json"
}

fio_job base "$SECONDS_BASE"

now_ms() { date +%s%3N; }
t_fio=$(now_ms)
fio_job during "$SECONDS_DURING" &
FIO_PID=$!
sleep 2
t0=$(now_ms)
"$SEALVOL_BIN" rekey-volume --mountpoint "$MNT" --new-volume-key-file "$DIR/new.key" \
    --hotzone-mib "$HOTZONE_MIB" --resilience "$RESILIENCE" --output json >"$DIR/rekey.json"
t1=$(now_ms)
wait "$FIO_PID"
FIO_PID=
if (( t1 - t_fio > SECONDS_DURING * 1000 )); then
    echo "the rekey outlasted the ${SECONDS_DURING} s foreground job: rerun with a larger --during-seconds" >&2
    exit 1
fi

python3 - "$DIR" "$OUTPUT" "$SIZE_GIB" "$HOTZONE_MIB" $(( t0 - t_fio )) $(( t1 - t_fio )) <<'EOF'
import glob, json, statistics, sys
d, output, size_gib, hz_mib, r0, r1 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

def buckets(prefix):
    # fio writes one iops log per direction kind: <prefix>_iops.1.log (time_ms, iops, ddir, ...)
    per = {}
    for path in glob.glob(f"{d}/{prefix}_iops*.log"):
        for line in open(path):
            parts = [p.strip() for p in line.split(",")]
            if len(parts) < 2:
                continue
            t, v = int(parts[0]), int(parts[1])
            per[t // 100] = per.get(t // 100, 0) + v
    return per

def max_clat_ms(prefix):
    j = json.load(open(f"{d}/{prefix}.json"))["jobs"][0]
    return max(j[k]["clat_ns"]["max"] for k in ("read", "write")) / 1e6, j["read"]["iops"] + j["write"]["iops"]

base = buckets("base")
during = buckets("during")
base_iops = statistics.median(base.values())
window = [v for b, v in during.items() if r0 // 100 + 1 <= b < r1 // 100]
if not window:
    sys.exit("the rekey finished inside one 100 ms window; use --size-gib larger")
rekey_s = (r1 - r0) / 1000
zones = size_gib * 1024 / hz_mib
res = {
    "size_gib": size_gib,
    "hotzone_mib": hz_mib,
    "rekey_seconds": rekey_s,
    "rekey_mb_per_s": size_gib * 2**30 / rekey_s / 1e6,
    "hotzone_ms": rekey_s * 1000 / zones,
    "base_iops_median": base_iops,
    "during_iops_median": statistics.median(window),
    "during_iops_min_100ms": min(window),
    "ratio": statistics.median(window) / base_iops,
    "base_max_latency_ms": max_clat_ms("base")[0],
    "during_max_latency_ms": max_clat_ms("during")[0],
}
if output == "json":
    print(json.dumps(res, indent=2))
else:
    print(f"online rekey of {size_gib} GiB, hotzone {hz_mib} MiB: {rekey_s:.2f} s ({res['rekey_mb_per_s']:.0f} MB/s), "
          f"{res['hotzone_ms']:.1f} ms per hotzone")
    print(f"foreground fio 4k randrw 70/30 QD16, IOPS per 100 ms (median): alone {base_iops:.0f}, "
          f"during rekey {res['during_iops_median']:.0f} ({res['ratio']:.2f}x), worst 100 ms during rekey {min(window)}")
    print(f"longest single I/O: alone {res['base_max_latency_ms']:.1f} ms, during rekey {res['during_max_latency_ms']:.1f} ms")
EOF
