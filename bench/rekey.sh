#!/usr/bin/env bash
# Rekey throughput (DESIGN §9): `sealvol rekey-volume --path` (offline; hotzones with
# --resilience journal, then with --resilience checksum) on a 1 GiB volume vs
# `cryptsetup reencrypt --force-offline-reencrypt --resilience checksum` on a same-size
# LUKS2 image made by `cryptsetup luksFormat` (pbkdf2, low iterations, a keyfile). All data
# areas are filled with random bytes first so that every sector is real work (no holes).
# Prints MB/s for each and the ratios.
#
# Usage: bench/rekey.sh [--size-gib N] [--hotzone-mib N]
#   SEALVOL_BIN=path   use this binary (default: cargo build --release)
#   BENCH_DIR=dir      where the images go (default: a temp dir under /var/tmp)
set -euo pipefail

SIZE_GIB=1
HOTZONE=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --size-gib) SIZE_GIB="$2"; shift 2 ;;
        --hotzone-mib) HOTZONE=(--hotzone-mib "$2"); shift 2 ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
[[ $(id -u) -eq 0 ]] || { echo "bench/rekey.sh needs root (cryptsetup reencrypt uses a loop device)" >&2; exit 2; }
command -v cryptsetup >/dev/null || { echo "needs cryptsetup" >&2; exit 2; }
if [[ -z "${SEALVOL_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --quiet --release --bin sealvol)
    SEALVOL_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/sealvol"
fi

DIR="$(mktemp -d "${BENCH_DIR:-/var/tmp}/sealvol-rekey-bench.XXXXXX")"
trap 'rm -rf "$DIR"' EXIT
BYTES=$(( SIZE_GIB << 30 ))
DATA_OFF_MIB=16

head -c 64 /dev/urandom >"$DIR/old.key"
head -c 64 /dev/urandom >"$DIR/new.key"
head -c 32 /dev/urandom >"$DIR/pass.key"

now() { date +%s.%N; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", b / s / 1e6 }'; }

# --- sealvol (journal, then checksum resilience) -------------------------------------
sealvol_rekey() { # MODE -> sets sv_s (seconds)
    "$SEALVOL_BIN" create-volume --path "$DIR/sealvol.luks" --size-gib "$SIZE_GIB" --volume-key-file "$DIR/old.key" >/dev/null
    dd if=/dev/urandom of="$DIR/sealvol.luks" bs=1M seek=$DATA_OFF_MIB count=$(( SIZE_GIB * 1024 )) conv=notrunc status=none
    sync
    local t0 t1
    t0=$(now)
    "$SEALVOL_BIN" rekey-volume --path "$DIR/sealvol.luks" --volume-key-file "$DIR/old.key" \
        --new-volume-key-file "$DIR/new.key" --offline --resilience "$1" "${HOTZONE[@]}" --output json >"$DIR/sealvol.json"
    t1=$(now)
    sv_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
    rm -f "$DIR/sealvol.luks"
}
sealvol_rekey journal
svj_s=$sv_s; svj=$(mbps "$BYTES" "$sv_s")
sealvol_rekey checksum
svc_s=$sv_s; svc=$(mbps "$BYTES" "$sv_s")

# --- cryptsetup ----------------------------------------------------------------------
truncate -s $(( BYTES + (DATA_OFF_MIB << 20) )) "$DIR/cs.img"
cryptsetup luksFormat --batch-mode --type luks2 --cipher aes-xts-plain64 --key-size 512 \
    --sector-size 4096 --pbkdf pbkdf2 --pbkdf-force-iterations 1000 \
    --key-file "$DIR/pass.key" "$DIR/cs.img"
dd if=/dev/urandom of="$DIR/cs.img" bs=1M seek=$DATA_OFF_MIB count=$(( SIZE_GIB * 1024 )) conv=notrunc status=none
sync
t0=$(now)
cryptsetup reencrypt --batch-mode --force-offline-reencrypt --resilience checksum \
    --pbkdf pbkdf2 --pbkdf-force-iterations 1000 --key-file "$DIR/pass.key" "$DIR/cs.img"
t1=$(now)
cs_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
cs=$(mbps "$BYTES" "$cs_s")

ratio() { awk -v a="$1" -v b="$cs" 'BEGIN { printf "%.2f", a / b }'; }
echo "volume: ${SIZE_GIB} GiB, every sector written; sealvol hotzone: ${HOTZONE[*]:-default (offline: 8 MiB, two journal slots)}"
echo "sealvol rekey-volume --offline --resilience journal:   ${svj} MB/s (${svj_s} s)"
echo "sealvol rekey-volume --offline --resilience checksum:  ${svc} MB/s (${svc_s} s)"
echo "cryptsetup reencrypt --force-offline-reencrypt (checksum): ${cs} MB/s (${cs_s} s)"
echo "ratio sealvol/cryptsetup: journal $(ratio "$svj")x, checksum $(ratio "$svc")x"
