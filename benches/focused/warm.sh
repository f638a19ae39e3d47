#!/usr/bin/env bash
# Warm blob serving in focus (issue 15): one client GETs a cached blob from cistern and from
# nginx serving the same file (sendfile on), rounds interleaved; then BURST_CLIENTS clients
# GET one cached blob at once from each. Prints every round, the medians, the slowest round
# and the ratios to nginx. Runs on the machine's settings as they are: nothing about the
# kernel or the VM is changed.
#
# Usage: benches/focused/warm.sh [CISTERN_BIN...]   (default: target/release/cistern)
#        Several binaries are measured side by side in the same rounds (e.g. before/after).
# Environment: BLOB_MIB=200, ROUNDS=9, BURST_MIB=100, BURST_CLIENTS=100, BURST_ROUNDS=3.
# Needs nginx, curl, openssl, python3. Not run in CI; everything it starts is stopped by
# PID, and its work directory is removed, whatever the exit.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BINS=("$@")
[[ ${#BINS[@]} -gt 0 ]] || BINS=("$ROOT/target/release/cistern")
: "${BLOB_MIB:=200}" "${ROUNDS:=9}" "${BURST_MIB:=100}" "${BURST_CLIENTS:=100}" "${BURST_ROUNDS:=3}"
REPO=bench/warm
for bin in "${BINS[@]}"; do [[ -x "$bin" ]] || { echo "no cistern binary at $bin" >&2; exit 1; }; done
for tool in nginx curl openssl python3 sha256sum; do
    command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cistern-warm.XXXXXX")"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

mapfile -t PORTS < <(python3 "$ROOT/benches/macro/helpers.py" ports $((1 + ${#BINS[@]})))
P_NGINX=${PORTS[0]}
NGINX="http://127.0.0.1:$P_NGINX"
wait_http() { for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return; sleep 0.1; done; echo "$1 did not answer" >&2; exit 1; }

# === two blobs, as nginx serves them (and as cistern's upstream, the same nginx) ===
mkdir -p "$WORK/www/v2/$REPO/blobs"
blob() { # blob NAME MIB -> the blob's path under /v2
    local f="$WORK/$1"
    { openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:$1" -in /dev/zero 2>/dev/null || true; } |
        head -c $(($2 * 1024 * 1024)) >"$f"
    local path="/v2/$REPO/blobs/sha256:$(sha256sum "$f" | cut -d' ' -f1)"
    mv "$f" "$WORK/www$path"
    echo "$path"
}
SINGLE=$(blob single "$BLOB_MIB")
BURST=$(blob burst "$BURST_MIB")

user=""
[[ $EUID != 0 ]] || user="user root root;"
mkdir -p "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
$user
worker_processes auto;
error_log $WORK/nginx/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    types { }
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$P_NGINX;
        root $WORK/www;
        location = /v2/ { default_type application/json; return 200 '{}'; }
        location / { }
    }
}
EOF
nginx -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' 2>"$WORK/nginx/stderr.log" &
PIDS+=("$!")
wait_http "$NGINX/v2/"

NAMES=(nginx)
declare -A BASE=([nginx]=$NGINX)
for i in "${!BINS[@]}"; do
    name="cistern$((i + 1))"
    port=${PORTS[$((i + 1))]}
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/config.toml" <<EOF
listen = "127.0.0.1:$port"
data_dir = "$WORK/$name/data"
[upstream]
url = "$NGINX"
[log]
level = "warn"
EOF
    "${BINS[$i]}" serve --config "$WORK/$name/config.toml" 2>"$WORK/$name/log" &
    PIDS+=("$!")
    BASE[$name]="http://127.0.0.1:$port"
    NAMES+=("$name")
    wait_http "${BASE[$name]}/v2/"
    echo "$name = ${BINS[$i]}" >&2
done

# Warm every server: cistern fetches and commits each blob once, and every file is in the
# page cache before the first timed round.
for name in "${NAMES[@]}"; do
    for path in "$SINGLE" "$BURST"; do
        curl -fsS --noproxy '*' -o /dev/null "${BASE[$name]}$path"
    done
done
sleep 2

declare -A SAMPLES
timed() { # timed NAME PATH -> seconds for one GET, checked for length
    local out
    out=$(curl -fsS --noproxy '*' -o /dev/null -w '%{time_total} %{size_download}' "${BASE[$1]}$2")
    echo "${out% *}"
}
burst() { # burst NAME PATH N -> wall seconds for N parallel GETs, all complete
    local cfg="$WORK/burst.cfg" start end ok
    : >"$cfg"
    for _ in $(seq 1 "$3"); do printf 'url = "%s"\noutput = "/dev/null"\n' "${BASE[$1]}$2" >>"$cfg"; done
    start=$(date +%s.%N)
    ok=$(curl -sS --no-progress-meter --noproxy '*' -Z --parallel-max "$3" --parallel-immediate -w '%{http_code}\n' -K "$cfg" | grep -c '^200$' || true)
    end=$(date +%s.%N)
    [[ $ok == "$3" ]] || { echo "burst on $1: only $ok of $3 complete" >&2; exit 1; }
    python3 -c "print(round($end - $start, 4))"
}

echo "warm ${BLOB_MIB} MiB GET, 1 client, $ROUNDS rounds (seconds):" >&2
for r in $(seq 1 "$ROUNDS"); do
    line="  round $r:"
    for name in "${NAMES[@]}"; do
        t=$(timed "$name" "$SINGLE")
        SAMPLES[single.$name]+="$t "
        line+=" $name $t"
    done
    echo "$line" >&2
done
echo "warm burst: $BURST_CLIENTS clients on one ${BURST_MIB} MiB blob, $BURST_ROUNDS rounds (seconds):" >&2
for r in $(seq 1 "$BURST_ROUNDS"); do
    line="  round $r:"
    for name in "${NAMES[@]}"; do
        t=$(burst "$name" "$BURST" "$BURST_CLIENTS")
        SAMPLES[burst.$name]+="$t "
        line+=" $name $t"
    done
    echo "$line" >&2
done

echo
echo "| measure | server | median | slowest | median vs nginx | slowest vs nginx's median |"
echo "|---|---|---|---|---|---|"
for kind in single burst; do
    for name in "${NAMES[@]}"; do
        python3 - "$kind" "$name" "${SAMPLES[$kind.$name]}" "${SAMPLES[$kind.nginx]}" <<'EOF'
import statistics, sys
kind, name, mine, base = sys.argv[1], sys.argv[2], sys.argv[3].split(), sys.argv[4].split()
mine, base = [float(x) for x in mine], [float(x) for x in base]
m, b = statistics.median(mine), statistics.median(base)
label = {"single": "warm GET, 1 client", "burst": "warm burst"}[kind]
print(f"| {label} | {name} | {m:.3f} s | {max(mine):.3f} s | {m / b:.2f}× | {max(mine) / b:.2f}× |")
EOF
    done
done
echo
echo "page reporting min_free_ms: $(cat /sys/module/page_reporting/parameters/min_free_ms 2>/dev/null || echo n/a); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
