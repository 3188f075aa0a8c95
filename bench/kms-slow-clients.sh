#!/usr/bin/env bash
# KMS under slow strangers (DESIGN §3 limits, §9 KMS yardstick), side by side in one run:
# for each daemon given (e.g. today's and the base commit's build), REPS interleaved
# repetitions of
#   - honest Decrypt at 16 SigV4 keep-alive clients, nothing else running (req/s, p99);
#   - honest Decrypt at 16 clients while SLOW unauthenticated connections hold unfinished
#     bodies from 8 loopback source addresses (req/s, p99, max).
# Prints every run and the medians. Usage:
#   bench/kms-slow-clients.sh NAME=path/to/kms-daemon [NAME=path ...]
# Env: KMS_LOAD (default target/release/kms-load), REPS (3), SECONDS_PER_RUN (5),
#      SLOW (1000), CLIENTS (16).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
KMS_LOAD=${KMS_LOAD:-$REPO/target/release/kms-load}
REPS=${REPS:-3}; SECS=${SECONDS_PER_RUN:-5}; SLOW=${SLOW:-1000}; CLIENTS=${CLIENTS:-16}
[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
ulimit -n "$(ulimit -Hn)"
W=$(mktemp -d /tmp/kms-slow.XXXX); trap 'rm -rf "$W"' EXIT
RESULTS=$W/results.txt; : > "$RESULTS"

run_one() { # name daemon mode
    local name=$1 bin=$2 mode=$3 dir=$W/$1-$3-$RANDOM pid line slow_args=()
    mkdir -p "$dir"
    "$bin" --state-dir "$dir/state" --listen 127.0.0.1:0 --ready-file "$dir/ready" >/dev/null 2>"$dir/log" &
    pid=$!
    for _ in $(seq 200); do [ -s "$dir/ready" ] && break; sleep 0.05; done
    [ "$mode" = slow ] && slow_args=(--slow-clients "$SLOW" --slow-sources 8)
    line=$("$KMS_LOAD" --state-dir "$dir/state" --op decrypt --clients "$CLIENTS" \
        --duration "$SECS" --warmup 1 "${slow_args[@]}" 2>/dev/null | tail -1)
    kill -TERM $pid; wait $pid || true
    echo "$name $mode $line" | tee -a "$RESULTS"
}

for rep in $(seq "$REPS"); do
    for spec in "$@"; do
        name=${spec%%=*}; bin=${spec#*=}
        run_one "$name" "$bin" idle
        run_one "$name" "$bin" slow
    done
done

echo "--- medians over $REPS runs (Decrypt, $CLIENTS clients, ${SECS}s; slow = $SLOW slow connections)"
python3 - "$RESULTS" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, mode = line.split()[:2]
    f = dict(re.findall(r"([a-z0-9/_]+)=([0-9.]+)", line))
    rows.setdefault((name, mode), []).append(f)
for (name, mode), fs in rows.items():
    med = lambda k: statistics.median(float(x[k]) for x in fs)
    print(f"{name:10} {mode:5} req/s={med('req/s'):7.0f} p50={med('p50'):7.2f}ms p99={med('p99'):8.2f}ms "
          f"max={med('max'):8.2f}ms errors={med('errors'):.0f} runs={len(fs)}")
PY
