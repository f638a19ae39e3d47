#!/usr/bin/env bash
# Lazy pulling in focus (issue 16): a lazy-pulling snapshotter's reads of one cold layer,
# replayed straight from a slow upstream, through cistern (cold_ranges = "upstream" and
# "wait"), and through nginx with the slice module. For each, prints per-range latency
# (p50, p99, max) and the bytes the upstream sent.
#
# The upstream is nginx serving the layer's file (Range works on static files) at RATE per
# connection. The pattern, like eStargz or SOCI after a container start: one read of the
# table of contents at the end of the layer (TOC_KIB), then RANGES reads of 4-64 KiB at
# offsets spread over the layer (fixed seed), CONCURRENCY at a time. Every target starts
# with an empty cache.
#
# Goals (issue 16): cistern's p50 within 1.2x of straight from the upstream, and upstream
# bytes at most the layer's size plus the ranges' bytes.
#
# Usage: benches/focused/lazy_pull.sh [CISTERN_BIN]   (default: target/release/cistern)
# Environment: LAYER_MIB=200, RATE=20m (nginx syntax), RANGES=300, CONCURRENCY=8,
# TOC_KIB=512. Needs nginx (with ngx_http_slice_module, as Debian's), curl, openssl,
# python3. Not run in CI; everything it starts is stopped by PID, and its work directory is
# removed, whatever the exit.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${1:-$ROOT/target/release/cistern}"
: "${LAYER_MIB:=200}" "${RATE:=20m}" "${RANGES:=300}" "${CONCURRENCY:=8}" "${TOC_KIB:=512}"
REPO=bench/lazy
[[ -x "$BIN" ]] || { echo "no cistern binary at $BIN (cargo build --release)" >&2; exit 1; }
for tool in nginx curl openssl python3 sha256sum; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cistern-lazy.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

{ read -r P_UP; read -r P_CISTERN; read -r P_SLICE; } < <(python3 "$ROOT/benches/macro/helpers.py" ports 3)
UP="http://127.0.0.1:$P_UP"
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }

# === the layer, served slowly ===
f="$WORK/layer"
{ openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:lazy" -in /dev/zero 2>/dev/null || true; } |
    head -c $((LAYER_MIB * 1024 * 1024)) >"$f"
DIGEST="sha256:$(sha256sum "$f" | cut -d' ' -f1)"
BLOB_PATH="/v2/$REPO/blobs/$DIGEST"
mkdir -p "$WORK/www/v2/$REPO/blobs"
mv "$f" "$WORK/www$BLOB_PATH"

nginx_start() { # nginx_start NAME PORT HTTP_EXTRA SERVER_BODY
    local name=$1 port=$2 extra=$3 body=$4 dir="$WORK/$1"
    mkdir -p "$dir/tmp"
    local user=""
    [[ $EUID != 0 ]] || user="user root root;"
    cat >"$dir/nginx.conf" <<EOF
$user
worker_processes 1;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    types { }
    default_type application/octet-stream;
    $extra
    server {
        listen 127.0.0.1:$port;
        $body
    }
}
EOF
    nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;' 2>"$dir/stderr.log" &
    PIDS+=("$!")
}

# The upstream logs the bytes of every response, to sum what each target cost it.
nginx_start upstream "$P_UP" "log_format sent '\$body_bytes_sent';" "
        root $WORK/www;
        access_log $WORK/upstream/sent.log sent;
        location = /v2/ { default_type application/json; return 200 '{}'; }
        location / { limit_rate $RATE; }"
wait_http "$UP/v2/"

upstream_bytes() { awk '{s += $1} END {print s + 0}' "$WORK/upstream/sent.log"; }

# === the pattern ===
python3 - "$LAYER_MIB" "$RANGES" "$TOC_KIB" >"$WORK/pattern" <<'EOF'
import random, sys
size = int(sys.argv[1]) << 20
ranges, toc = int(sys.argv[2]), int(sys.argv[3]) << 10
rng = random.Random(16)
print(f"bytes={size - toc}-{size - 1}")
for _ in range(ranges):
    n = rng.randrange(4 << 10, 64 << 10)
    a = rng.randrange(0, size - n)
    print(f"bytes={a}-{a + n - 1}")
EOF
RANGE_BYTES=$(awk -F'[=-]' '{s += $3 - $2 + 1} END {print s}' "$WORK/pattern")

# replay BASE: the TOC read first, then the rest CONCURRENCY at a time; prints
# "p50 p99 max" in seconds, and fails on any answer that is not a 206 of the right length.
replay() {
    python3 - "$1$BLOB_PATH" "$CONCURRENCY" "$WORK/pattern" <<'EOF'
import concurrent.futures, http.client, statistics, sys, time, urllib.parse
url, conc, pattern = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read().split()
u = urllib.parse.urlsplit(url)
def get(rng):
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    t = time.monotonic()
    c.request("GET", u.path, headers={"Range": rng})
    r = c.getresponse()
    body = r.read()
    took = time.monotonic() - t
    a, b = map(int, rng[len("bytes="):].split("-"))
    if r.status != 206 or len(body) != b - a + 1:
        sys.exit(f"{rng}: status {r.status}, {len(body)} bytes")
    c.close()
    return took
times = [get(pattern[0])]
with concurrent.futures.ThreadPoolExecutor(conc) as pool:
    times += list(pool.map(get, pattern[1:]))
times.sort()
p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
print(f"{statistics.median(times):.4f} {p99:.4f} {times[-1]:.4f}")
EOF
}

report() { # report NAME BYTES_BEFORE
    local latencies
    latencies=$(replay "$2")
    # What the background work (cistern's fill, nginx's slices) adds comes after the last
    # range: wait until the upstream has been quiet for two seconds.
    local last=-1 now
    while now=$(upstream_bytes) && [[ $now != "$last" ]]; do last=$now; sleep 2; done
    printf '%-22s %s  %12d\n' "$1" "$latencies" $((now - $3))
}

echo "layer ${LAYER_MIB} MiB at $RATE/s; $((RANGES + 1)) ranges, $RANGE_BYTES bytes in all"
echo "target                 p50_s  p99_s  max_s  upstream_bytes"

report direct "$UP" "$(upstream_bytes)"

for mode in upstream wait; do
    mkdir -p "$WORK/cistern-$mode"
    printf 'listen = "127.0.0.1:%s"\ndata_dir = "%s"\nshutdown_grace = "2s"\n[upstream]\nurl = "%s"\n[cache]\ncold_ranges = "%s"\n[log]\nlevel = "warn"\n' \
        "$P_CISTERN" "$WORK/cistern-$mode/data" "$UP" "$mode" >"$WORK/cistern-$mode/config.toml"
    "$BIN" serve --config "$WORK/cistern-$mode/config.toml" >"$WORK/cistern-$mode/log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$P_CISTERN/v2/"
    report "cistern ($mode)" "http://127.0.0.1:$P_CISTERN" "$(upstream_bytes)"
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
done

# nginx's slice module: fetches and caches the 1 MiB slices a range touches.
nginx_start slice "$P_SLICE" "
    proxy_cache_path $WORK/slice/cache levels=1:2 keys_zone=slice:16m max_size=100g inactive=7d use_temp_path=off;" "
        location / {
            proxy_pass $UP;
            slice 1m;
            proxy_cache slice;
            proxy_cache_key \$uri\$slice_range;
            proxy_set_header Range \$slice_range;
            proxy_cache_valid 200 206 7d;
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
        }"
wait_http "http://127.0.0.1:$P_SLICE/v2/"
report "nginx slice (1 MiB)" "http://127.0.0.1:$P_SLICE" "$(upstream_bytes)"
