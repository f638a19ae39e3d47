#!/usr/bin/env bash
# The cold path in focus: where a cold GET's time and CPU go, without the macro benchmark's
# other servers. Starts docker-registry (CNCF distribution 2.8) on loopback, pushes BLOBS
# random blobs of BLOB_MIB MiB, starts cistern in front of it, and for each blob prints:
#
#   direct  wall time of a GET straight from the upstream (after one GET to warm its page cache)
#   cold    wall time of the first GET through cistern
#   warm    wall time of the second GET through cistern
#   cpu     CPU seconds (user + system, from /proc/PID/stat) that cistern and the upstream
#           spent during the cold GET
#
# Usage: benches/focused/cold_cpu.sh [CISTERN_BIN]   (default: target/release/cistern)
# Environment: BLOBS=5, BLOB_MIB=200, GAP=2 (seconds between blobs), TOUCH=0 (the default)
# measures the machine as it is; TOUCH=1 is a tuning: it holds free page reporting off and
# writes the memory the cache will take once before the measures (see benches/macro/run.sh,
# "the machine's memory"), and a figure taken with it is shown beside the default one.
# Needs docker-registry, curl, openssl, python3. Not run in CI; everything it starts is
# stopped by PID, and its work directory is removed, whatever the exit.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${1:-$ROOT/target/release/cistern}"
: "${BLOBS:=5}" "${BLOB_MIB:=200}" "${GAP:=2}" "${TOUCH:=0}"
REPO=bench/blob
[[ -x "$BIN" ]] || { echo "no cistern binary at $BIN (cargo build --release)" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cistern-focused.XXXXXX")"
PIDS=()
REPORTING_PARAM=/sys/module/page_reporting/parameters/min_free_ms
REPORTING_OLD=
cleanup() {
    [[ -z "$REPORTING_OLD" ]] || echo "$REPORTING_OLD" >"$REPORTING_PARAM" || true
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

{ read -r P_UP; read -r P_CISTERN; } < <(python3 "$ROOT/benches/macro/helpers.py" ports 2)
UP="http://127.0.0.1:$P_UP"
CISTERN="http://127.0.0.1:$P_CISTERN"
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

mkdir -p "$WORK/up/storage"
printf 'version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$WORK/up/storage" "$P_UP" >"$WORK/up/config.yml"
docker-registry serve "$WORK/up/config.yml" >"$WORK/up/log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "$UP/v2/"

DIGESTS=()
for i in $(seq 1 "$BLOBS"); do
    f="$WORK/blob"
    { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:focused-$i" -in /dev/zero 2>/dev/null || true; } |
        head -c $((BLOB_MIB * 1024 * 1024)) >"$f"
    d="sha256:$(sha256sum "$f" | cut -d' ' -f1)"
    loc="$(curl -fsS -X POST -D - -o /dev/null "$UP/v2/$REPO/blobs/uploads/" | tr -d '\r' |
        awk 'tolower($1) == "location:" {print $2}')"
    [[ "$loc" == http* ]] || loc="$UP$loc"
    curl -fsS -X PUT -H 'Expect:' -H 'Content-Type: application/octet-stream' -T "$f" -o /dev/null "$loc&digest=$d"
    DIGESTS+=("$d")
    rm "$f"
done
sync

if [[ $TOUCH == 1 ]]; then
    if [[ -w $REPORTING_PARAM ]]; then
        old="$(cat "$REPORTING_PARAM")"
        echo 300000 >"$REPORTING_PARAM" 2>/dev/null && REPORTING_OLD=$old
    fi
    python3 -c "
import sys
n, step = int(sys.argv[1]) << 20, 64 << 20
b = bytearray(n)
for i in range(0, n, step):
    b[i:i + step] = b'\x01' * len(b[i:i + step])
" $((BLOBS * BLOB_MIB + 512))
fi

mkdir -p "$WORK/cistern"
printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nshutdown_grace = "2s"\n[upstream]\nurl = "%s"\n[log]\nlevel = "warn"\n' \
    "$P_CISTERN" "$WORK/cistern/data" "$UP" >"$WORK/cistern/config.toml"
"$BIN" serve --config "$WORK/cistern/config.toml" >"$WORK/cistern/log" 2>&1 &
C_PID=$!
PIDS+=("$C_PID")
wait_http "$CISTERN/v2/"

HZ=$(getconf CLK_TCK)
echo "blob  direct_s  cold_s  warm_s  cistern_cpu_s  upstream_cpu_s   ($BLOB_MIB MiB each; $(nproc) cores)"
for i in "${!DIGESTS[@]}"; do
    path="/v2/$REPO/blobs/${DIGESTS[$i]}"
    curl -fsS -o /dev/null "$UP$path"
    direct=$(curl -fsS -o /dev/null -w '%{time_total}' "$UP$path")
    c0=$(cpu_ticks "$C_PID"); u0=$(cpu_ticks "$UP_PID")
    cold=$(curl -fsS -o /dev/null -w '%{time_total}' "$CISTERN$path")
    c1=$(cpu_ticks "$C_PID"); u1=$(cpu_ticks "$UP_PID")
    warm=$(curl -fsS -o /dev/null -w '%{time_total}' "$CISTERN$path")
    printf '%4d  %8.3f  %6.3f  %6.3f  %13.2f  %14.2f\n' "$((i + 1))" "$direct" "$cold" "$warm" \
        "$(bc -l <<<"($c1 - $c0) / $HZ")" "$(bc -l <<<"($u1 - $u0) / $HZ")"
    sleep "$GAP"
done
