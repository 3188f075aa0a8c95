#!/usr/bin/env bash
# Side-by-side KMS benchmark: kms-daemon (durable audit log on) and moto_server, same
# load generator (kms-load: SigV4-signed, keep-alive, N concurrent clients).
# Usage: kms-daemon/benches/kms_load.sh [DURATION_SECS]   (from the repo root)
set -euo pipefail
duration="${1:-10}"
repo="$(cd "$(dirname "$0")/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
cargo build -p kms-daemon -p kms-load --release --bins >&2
work="$(mktemp -d)"
cleanup() {
  [[ -n "${kms_pid:-}" ]] && kill "$kms_pid" 2>/dev/null || true
  [[ -n "${moto_pid:-}" ]] && kill "$moto_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$target/release/kms-daemon" --state-dir "$work/state" --listen 127.0.0.1:0 --ready-file "$work/ready" >/dev/null 2>"$work/kms.log" &
kms_pid=$!
moto_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$repo/.venv/bin/moto_server" -p "$moto_port" >"$work/moto.log" 2>&1 &
moto_pid=$!
deadline=$((SECONDS + 30))
until [[ -s "$work/ready" ]] && curl -s -o /dev/null "http://127.0.0.1:$moto_port/"; do
  (( SECONDS < deadline )) || { echo "servers did not start" >&2; exit 1; }
  sleep 0.1
done
echo "== kms-daemon (release, audit log fdatasync'ed per request, group commit)"
"$target/release/kms-load" --state-dir "$work/state" --clients 1,16 --duration "$duration" "${@:2}"
echo "== moto_server $("$repo/.venv/bin/python" -c 'import moto; print(moto.__version__)')"
"$target/release/kms-load" --endpoint "http://127.0.0.1:$moto_port" --clients 1,16 --duration "$duration" "${@:2}"
