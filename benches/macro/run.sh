#!/usr/bin/env bash
# Macro benchmark: cistern side by side with its peers, in one run, on 127.0.0.1.
#
#   benches/macro/run.sh [--quick] [--keep] [--out FILE] [--tuned]
#
#   --quick     small sizes and counts: checks that the harness works in a few minutes; the
#               numbers mean little
#   --keep      keep the work directory (logs, configs, raw samples) instead of deleting it
#   --out FILE  also write the results table (Markdown) and the raw samples to FILE
#   --tuned     run everything twice: first on the machine's default settings, then with the
#               memory tuning below (free page reporting held off, memory touched before the
#               sections that fill caches); the report shows both tables, default first.
#               Without it, nothing about the kernel or the VM is changed: the figures are
#               those of the machine as users have it
#
# NOT run in CI: it takes 15-30 minutes, needs about 12 GiB of free disk under $TMPDIR, and its
# numbers depend on the machine. Needs: docker-registry (Debian's CNCF distribution 2.8),
# nginx, wrk, curl, openssl, python3, and cargo (for cistern's release build; or set
# CISTERN_BIN to a built binary). On Debian, as root:
#     apt-get install docker-registry nginx wrk curl openssl python3
# (Installing nginx does not start a system nginx where policy-rc.d forbids it; this script
# never uses port 80 or the system's nginx config.)
#
# What it starts, each in its own process, all on 127.0.0.1 ports it picks, all state in one
# temporary directory:
#   upstream          docker-registry (filesystem storage, access log on), seeded over plain
#                     HTTP (monolithic POST + PUT uploads with curl) with the blobs below, a
#                     config blob and an OCI manifest
#   throttle          nginx reverse proxy in front of the upstream, limit_rate SLOW_RATE per
#                     connection: the "slow upstream"
#   nginx-static      nginx serving the same blob and manifest files from disk (sendfile): the
#                     baseline for warm GETs
#   cistern           the release build, one in front of the upstream and one in front of the
#                     throttle
#   distribution      docker-registry in proxy mode (proxy.remoteurl), same two
#   nginx-cache       nginx proxy_cache with proxy_cache_lock on (lock timeout and age raised
#                     to 10m so that waiting requests are not sent upstream), same two
#
# Blobs (random, incompressible; sizes overridable by the environment variables in brackets):
#   A1..A<COLD_RUNS>  [BLOB_MIB=200]  one cold GET of each through each proxy, after a
#                                     `sync`; A1 then for the warm single-client GETs. The
#                                     time one core takes to sha256 A1 is reported beside:
#                                     a proxy that verifies before its last byte cannot beat it
#   B1..B<BURST_RUNS> [BURST_MIB=100] BURST_CLIENTS=100 concurrent cold GETs of one of them,
#                                     then the same burst warm; BURST_RUNS=3 rounds (a new blob
#                                     each), proxies interleaved; medians; upstream GETs counted
#                                     from its access log, each round
#   S                 [SLOW_MIB=100]  through the throttle (SLOW_RATE=20m, nginx syntax:
#                                     20 MiB/s): one client starts the fill, JOINERS=8 more
#                                     join every JOIN_INTERVAL=0.35 s from JOIN_FIRST=1.0 s;
#                                     time to first body byte of each joiner. nginx's
#                                     limit_rate lets the first second's worth (20 MiB) through
#                                     at once, then paces; the joiners come after that burst
#                                     and before the fill's end (checked and reported)
#   C                 [BIG_MIB=2048]  BIG_CLIENTS=50 concurrent cold GETs; peak RSS of the
#                                     proxy's processes (VmHWM, reset with clear_refs first;
#                                     nginx: master + workers summed)
# Only with --tuned (its second pass): before each section that fills caches, the memory those
# fills will take is written once and freed, and free page reporting is held off where the
# kernel has it; see "the machine's memory" below.
# Warm GETs: WARM_RUNS=5 rounds, servers interleaved; medians. Manifest req/s: wrk,
# WRK_CONNS=64 connections, WRK_THREADS=2 threads, WRK_SECS=10 s, WRK_RUNS=3 rounds; median.
# Every client transfer is bounded by MAX_TIME=900 s; every wait for a server by 30 s.
#
# Output: a Markdown table of the ratios, one column per proxy (cistern, distribution proxy,
# nginx proxy_cache), each cell with ✅/❌ against the issue's target and the raw numbers.
# The raw samples are in $WORK/results.tsv (measure, server, value).
#
# The clients, the proxies and the upstream share the machine's cores: on a small machine the
# ratios include that contention (the same for every proxy). Run it on an otherwise idle
# machine for numbers worth publishing.

set -euo pipefail

QUICK=0
KEEP=0
OUT=""
TUNED=0
PASS_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1; PASS_ARGS+=("$1") ;;
        --keep) KEEP=1; PASS_ARGS+=("$1") ;;
        --out) OUT="$2"; shift ;;
        --tuned) TUNED=1 ;;
        -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# --tuned: this script twice, each pass in a child with its own work directory; the first on
# default settings, the second tuned (TOUCH=1). Each child leaves its raw samples in
# RESULTS_COPY; the report shows both.
if [[ $TUNED == 1 ]]; then
    both="$(mktemp -d "${TMPDIR:-/tmp}/cistern-macro-both.XXXXXX")"
    for pass in default tuned; do
        touch_flag=0
        [[ $pass == default ]] || touch_flag=1
        printf '\n::: pass: %s settings\n' "$pass" >&2
        TOUCH=$touch_flag RESULTS_COPY="$both/$pass.tsv" bash "$0" "${PASS_ARGS[@]}" >"$both/$pass.txt" ||
            { echo "error: the $pass pass failed (its output: $both/$pass.txt)" >&2; exit 1; }
    done
    TABLE="$(python3 "$(dirname "$0")/helpers.py" report-pair "$both/default.tsv" "$both/tuned.tsv")"
    echo "$TABLE"
    if [[ -n "$OUT" ]]; then
        {
            echo "## Macro benchmark, default settings and tuned, $(date -u +%Y-%m-%dT%H:%MZ)"
            echo
            echo "$TABLE"
            for pass in default tuned; do
                echo
                echo "Raw samples, $pass settings (measure, server, value):"
                echo
                sed 's/^/    /' "$both/$pass.tsv"
            done
        } >"$OUT"
        echo "written to $OUT" >&2
    fi
    rm -rf "$both"
    exit 0
fi

if [[ $QUICK == 1 ]]; then
    : "${BLOB_MIB:=20}" "${COLD_RUNS:=2}" "${WARM_RUNS:=3}" "${BURST_MIB:=10}"
    : "${BURST_CLIENTS:=20}" "${BURST_RUNS:=2}" "${SLOW_MIB:=20}" "${SLOW_RATE:=5m}" "${JOINERS:=4}" "${JOIN_INTERVAL:=0.4}"
    : "${BIG_MIB:=128}" "${BIG_CLIENTS:=10}" "${WRK_SECS:=3}" "${WRK_RUNS:=1}"
fi
: "${BLOB_MIB:=200}" "${COLD_RUNS:=3}" "${WARM_RUNS:=5}"
: "${BURST_MIB:=100}" "${BURST_CLIENTS:=100}" "${BURST_RUNS:=3}"
: "${SLOW_MIB:=100}" "${SLOW_RATE:=20m}" "${JOINERS:=8}" "${JOIN_FIRST:=1.0}" "${JOIN_INTERVAL:=0.35}"
: "${BIG_MIB:=2048}" "${BIG_CLIENTS:=50}"
: "${WRK_CONNS:=64}" "${WRK_THREADS:=2}" "${WRK_SECS:=10}" "${WRK_RUNS:=3}"
: "${MAX_TIME:=900}"
READY_SECS=30
REPO=bench/app
MANIFEST_TYPE=application/vnd.oci.image.manifest.v1+json

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
HELPERS="$HERE/helpers.py"

say() { printf '\n::: %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

for tool in docker-registry nginx wrk curl openssl python3 sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not found (see the top of $0 for what to install)"
done

# === work directory, processes, cleanup ===

WORK="$(mktemp -d "${TMPDIR:-/tmp}/cistern-macro.XXXXXX")"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
declare -a PIDS=()
declare -A PID_NAME=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "${REPORTING_OLD:-}" ]]; then
        echo "$REPORTING_OLD" >"$REPORTING_PARAM" 2>/dev/null ||
            echo "warning: could not restore $REPORTING_PARAM to $REPORTING_OLD" >&2
    fi
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    # Bounded: whatever has not stopped after 10 s is killed.
    local deadline=$((SECONDS + 10))
    for pid in "${PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "warning: ${PID_NAME[$pid]:-$pid} did not stop; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP == 1 || $rc != 0 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME LOG CMD...: runs CMD in the background and remembers its PID (in MAIN_PID[NAME],
# and for the cleanup). Not in a subshell: the cleanup must know every PID.
declare -A MAIN_PID=()
start() {
    local name=$1 log=$2
    shift 2
    "$@" >"$log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    PID_NAME[$pid]=$name
    MAIN_PID[$name]=$pid
}

# wait_http NAME PID URL: until URL answers 200 (bounded), or the process died.
wait_http() {
    local name=$1 pid=$2 url=$3 deadline=$((SECONDS + READY_SECS))
    until curl -fsS --noproxy '*' -o /dev/null --max-time 2 "$url" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || die "$name exited while starting; see $WORK"
        ((SECONDS < deadline)) || die "$name did not answer $url within ${READY_SECS}s"
        sleep 0.1
    done
}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$RESULTS"; }

curl_get() { # curl_get URL -> "time_total time_starttransfer size_download http_code"
    curl -sS --noproxy '*' -o /dev/null --max-time "$MAX_TIME" \
        -w '%{time_total} %{time_starttransfer} %{size_download} %{http_code}\n' "$1" || true
}

# timed_get SERVER MEASURE URL SIZE: one GET, checked, its wall time recorded.
timed_get() {
    local server=$1 measure=$2 url=$3 size=$4 out total _ttfb got code
    out="$(curl_get "$url")"
    read -r total _ttfb got code <<<"$out"
    if [[ "$code" != 200 || "$got" != "$size" ]]; then
        echo "warning: $server $measure: HTTP $code, $got of $size bytes ($url)" >&2
        record "${measure}_failed" "$server" 1
        return
    fi
    record "$measure" "$server" "$total"
    printf '  %-14s %-14s %8.3f s\n' "$server" "$measure" "$total" >&2
}

# === the machine ===

say "machine"
{
    echo "nproc: $(nproc)"
    echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
    echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
    echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "kernel: $(uname -r)"
    echo "free page reporting min_free_ms: $(cat /sys/module/page_reporting/parameters/min_free_ms 2>/dev/null || echo 'n/a (no page_reporting)')"
    echo "settings: $([[ ${TOUCH:-0} == 1 ]] && echo 'tuned (reporting held off, memory touched before filling sections)' || echo 'default (nothing changed)')"
    echo "docker-registry: $(docker-registry --version 2>&1 | head -1)"
    echo "nginx: $(nginx -v 2>&1)"
    echo "wrk: $(wrk -v 2>&1 | head -1)"
} | tee "$WORK/machine.txt" >&2
for p in BLOB_MIB COLD_RUNS WARM_RUNS BURST_MIB BURST_CLIENTS BURST_RUNS SLOW_MIB SLOW_RATE JOINERS \
    JOIN_FIRST JOIN_INTERVAL BIG_MIB BIG_CLIENTS WRK_CONNS WRK_THREADS WRK_SECS WRK_RUNS; do
    record "param_$(tr '[:upper:]' '[:lower:]' <<<"$p")" all "${!p}"
done

# === cistern's release build ===

if [[ -z "${CISTERN_BIN:-}" ]]; then
    say "building cistern (release)"
    (cd "$ROOT" && cargo build --release --locked --bin cistern >&2)
    CISTERN_BIN="$ROOT/target/release/cistern"
fi
[[ -x "$CISTERN_BIN" ]] || die "CISTERN_BIN=$CISTERN_BIN is not executable"

# === ports ===

mapfile -t PORTS < <(python3 "$HELPERS" ports 10)
P_UP=${PORTS[0]} P_THROTTLE=${PORTS[1]} P_STATIC=${PORTS[2]}
P_CISTERN=${PORTS[3]} P_CISTERN_SLOW=${PORTS[4]}
P_DIST=${PORTS[5]} P_DIST_SLOW=${PORTS[6]}
P_NGX=${PORTS[7]} P_NGX_SLOW=${PORTS[8]}
UP="http://127.0.0.1:$P_UP"
THROTTLE="http://127.0.0.1:$P_THROTTLE"
declare -A BASE=(
    [upstream]="$UP"
    [nginx-static]="http://127.0.0.1:$P_STATIC"
    [cistern]="http://127.0.0.1:$P_CISTERN"
    [distribution]="http://127.0.0.1:$P_DIST"
    [nginx-cache]="http://127.0.0.1:$P_NGX"
    [cistern-slow]="http://127.0.0.1:$P_CISTERN_SLOW"
    [distribution-slow]="http://127.0.0.1:$P_DIST_SLOW"
    [nginx-cache-slow]="http://127.0.0.1:$P_NGX_SLOW"
)
PROXIES=(cistern distribution nginx-cache)

# === the upstream registry ===

registry_config() { # registry_config DIR PORT [REMOTE]: a docker-registry config file
    local dir=$1 port=$2 remote=${3:-}
    mkdir -p "$dir/storage"
    {
        echo "version: 0.1"
        if [[ -z "$remote" ]]; then
            # The upstream: its access log is how upstream GETs are counted.
            printf 'log:\n  level: info\n  accesslog:\n    disabled: false\n'
        else
            printf 'log:\n  level: warn\n  accesslog:\n    disabled: true\n'
        fi
        printf 'storage:\n  filesystem:\n    rootdirectory: %s\n' "$dir/storage"
        printf '  maintenance:\n    uploadpurging:\n      enabled: false\n'
        printf 'http:\n  addr: 127.0.0.1:%s\n' "$port"
        [[ -z "$remote" ]] || printf 'proxy:\n  remoteurl: %s\n' "$remote"
    } >"$dir/config.yml"
}

say "starting the upstream registry"
registry_config "$WORK/upstream" "$P_UP"
start upstream "$WORK/upstream/registry.log" docker-registry serve "$WORK/upstream/config.yml"
wait_http upstream "${MAIN_PID[upstream]}" "$UP/v2/"

# === the blobs ===

make_blob() { # make_blob NAME MIB: random, incompressible, deterministic per name
    local f="$WORK/blobs/$1"
    mkdir -p "$WORK/blobs"
    openssl enc -aes-128-ctr -nosalt -pbkdf2 -pass "pass:cistern-bench-$1" -in /dev/zero 2>/dev/null |
        head -c "$(($2 * 1024 * 1024))" >"$f"
    echo "sha256:$(sha256sum "$f" | cut -d' ' -f1)"
}

push_blob() { # push_blob FILE DIGEST: a monolithic upload (POST, then PUT with the body)
    local file=$1 digest=$2 loc sep
    loc="$(curl -fsS --noproxy '*' --max-time 30 -X POST -D - -o /dev/null \
        "$UP/v2/$REPO/blobs/uploads/" | tr -d '\r' | awk 'tolower($1) == "location:" {print $2}')"
    [[ -n "$loc" ]] || die "upload of $file: no Location from the upstream"
    [[ "$loc" == http* ]] || loc="$UP$loc"
    sep='?'
    [[ "$loc" != *\?* ]] || sep='&'
    curl -fsS --noproxy '*' --max-time "$MAX_TIME" -X PUT -H 'Expect:' \
        -H 'Content-Type: application/octet-stream' -T "$file" -o /dev/null \
        "$loc${sep}digest=$digest"
    curl -fsS --noproxy '*' --max-time 30 -I -o /dev/null "$UP/v2/$REPO/blobs/$digest" ||
        die "blob $digest is not in the upstream after its upload"
}

say "creating and pushing the blobs (this takes a while for the big one)"
declare -A DIGEST=() SIZE=()
NAMES=()
for i in $(seq 1 "$COLD_RUNS"); do NAMES+=("A$i"); done
for i in $(seq 1 "$BURST_RUNS"); do NAMES+=("B$i"); done
NAMES+=(S C)
declare -A MIB_OF=([S]=$SLOW_MIB [C]=$BIG_MIB)
for i in $(seq 1 "$COLD_RUNS"); do MIB_OF[A$i]=$BLOB_MIB; done
for i in $(seq 1 "$BURST_RUNS"); do MIB_OF[B$i]=$BURST_MIB; done
for n in "${NAMES[@]}"; do
    DIGEST[$n]=$(make_blob "$n" "${MIB_OF[$n]}")
    SIZE[$n]=$((MIB_OF[$n] * 1024 * 1024))
    push_blob "$WORK/blobs/$n" "${DIGEST[$n]}"
    echo "  $n: ${MIB_OF[$n]} MiB ${DIGEST[$n]}" >&2
done

# The image: a config blob and a manifest whose one layer is A1.
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' \
    >"$WORK/blobs/config"
CONFIG_DIGEST="sha256:$(sha256sum "$WORK/blobs/config" | cut -d' ' -f1)"
push_blob "$WORK/blobs/config" "$CONFIG_DIGEST"
printf '{"schemaVersion":2,"mediaType":"%s","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"%s","size":%d}]}' \
    "$MANIFEST_TYPE" "$CONFIG_DIGEST" "$(stat -c %s "$WORK/blobs/config")" "${DIGEST[A1]}" "${SIZE[A1]}" \
    >"$WORK/blobs/manifest"
MANIFEST_DIGEST="sha256:$(sha256sum "$WORK/blobs/manifest" | cut -d' ' -f1)"
MANIFEST_SIZE=$(stat -c %s "$WORK/blobs/manifest")
curl -fsS --noproxy '*' --max-time 30 -X PUT -H "Content-Type: $MANIFEST_TYPE" \
    --data-binary "@$WORK/blobs/manifest" -o /dev/null "$UP/v2/$REPO/manifests/latest"
got="$(curl -fsS --noproxy '*' --max-time 30 -H "Accept: $MANIFEST_TYPE" \
    "$UP/v2/$REPO/manifests/$MANIFEST_DIGEST" | sha256sum | cut -d' ' -f1)"
[[ "sha256:$got" == "$MANIFEST_DIGEST" ]] || die "the upstream does not serve the manifest byte for byte"
echo "  manifest: $MANIFEST_SIZE bytes $MANIFEST_DIGEST" >&2

blob_path() { echo "/v2/$REPO/blobs/${DIGEST[$1]}"; }
MANIFEST_PATH="/v2/$REPO/manifests/$MANIFEST_DIGEST"

# upstream_gets DIGEST: GETs of that blob in the upstream's access log so far.
upstream_gets() {
    grep -c "\"GET /v2/$REPO/blobs/$1 HTTP/1.1\"" "$WORK/upstream/registry.log" || true
}
throttle_gets() {
    grep -c "\"GET /v2/$REPO/blobs/$1 HTTP/1.1\"" "$WORK/throttle/access.log" 2>/dev/null || true
}

# === nginx: static files, the throttle, two caches ===

nginx_start() { # nginx_start NAME PORT HTTP_EXTRA SERVER_BODY
    local name=$1 port=$2 extra=$3 body=$4 dir="$WORK/$1"
    mkdir -p "$dir/tmp"
    local user=""
    # Workers run as nobody by default when the master is root, and nobody cannot read the
    # private work directory.
    [[ $EUID != 0 ]] || user="user root root;"
    cat >"$dir/nginx.conf" <<EOF
$user
worker_processes auto;
error_log $dir/error.log warn;
pid $dir/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
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
    start "$name" "$dir/stderr.log" \
        nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" -g 'daemon off;'
}

say "starting nginx (static files, throttle, proxy_cache)"
mkdir -p "$WORK/www/v2/$REPO/blobs" "$WORK/www/v2/$REPO/manifests"
for n in "${NAMES[@]}"; do ln "$WORK/blobs/$n" "$WORK/www$(blob_path "$n")"; done
cp "$WORK/blobs/manifest" "$WORK/www$MANIFEST_PATH"
nginx_start nginx-static "$P_STATIC" "" "
        root $WORK/www;
        location = /v2/ { default_type application/json; return 200 '{}'; }
        location /v2/$REPO/manifests/ { default_type $MANIFEST_TYPE; }
        location / { }"

upstream_block() { # upstream_block NAME PORT
    echo "upstream $1 { server 127.0.0.1:$2; keepalive 32; }"
}
nginx_start throttle "$P_THROTTLE" "$(upstream_block registry "$P_UP")" "
        access_log $WORK/throttle/access.log;
        location / {
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$http_host;
            # limit_rate paces what nginx sends; it does not apply to unbuffered proxying
            # (nginx 1.22), so the throttle buffers (reading the upstream fast) and sends slowly.
            proxy_buffering on;
            limit_rate $SLOW_RATE;
        }"

cache_conf() { # cache_conf NAME UPSTREAM_PORT -> the http-level part
    echo "proxy_cache_path $WORK/$1/cache levels=1:2 keys_zone=$1:16m max_size=100g inactive=7d use_temp_path=off;"
    upstream_block registry "$2"
}
CACHE_LOCATION="
        location / {
            proxy_pass http://registry;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host \$http_host;
            proxy_cache ZONE;
            proxy_cache_valid 200 7d;
            # Content addressed by digest never changes; the upstream's headers don't matter.
            proxy_ignore_headers Cache-Control Expires Set-Cookie;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 10m;
            proxy_cache_lock_age 10m;
            add_header X-Cache-Status \$upstream_cache_status;
        }"
nginx_start nginx-cache "$P_NGX" "$(cache_conf nginx-cache "$P_UP")" "${CACHE_LOCATION/ZONE/nginx-cache}"
nginx_start nginx-cache-slow "$P_NGX_SLOW" "$(cache_conf nginx-cache-slow "$P_THROTTLE")" \
    "${CACHE_LOCATION/ZONE/nginx-cache-slow}"
for n in nginx-static throttle nginx-cache nginx-cache-slow; do
    wait_http "$n" "${MAIN_PID[$n]}" "${BASE[$n]:-$THROTTLE}/v2/"
done
BASE[throttle]=$THROTTLE

# The throttle must really be slow, or the join test means nothing: time the whole slow blob
# through it (the average rate a fill sees, initial burst included).
read -r t _ got code <<<"$(curl -sS --noproxy '*' -o /dev/null --max-time "$MAX_TIME" \
    -w '%{time_total} %{time_starttransfer} %{size_download} %{http_code}\n' "$THROTTLE$(blob_path S)")"
rate="$(python3 -c "print(round($got / 1048576 / max($t, 1e-6), 1))")"
echo "  throttle: $got bytes in ${t}s = $rate MiB/s on average (HTTP $code; limit_rate $SLOW_RATE)" >&2
record throttle_mib_s throttle "$rate"

# === distribution in proxy mode, cistern ===

# === the machine's memory ===

# In a virtual machine whose memory the hypervisor backs on first touch (Firecracker, and any
# VM with a balloon), the first write to a page of guest memory costs a fault in the host: on
# the 2-core VM of docs/BENCHMARKS.md, writing files into never-touched memory ran at
# 0.2-0.5 GB/s instead of 3-4 GB/s, and it made every proxy that caches (cistern and nginx
# proxy_cache, not distribution, whose client path writes nothing) look 2-3x slower on cold
# GETs. Worse, with free page reporting (virtio-balloon) a page freed in the guest goes back
# to the host within seconds, to be faulted in again at its next use. So: hold reporting off
# for the run where the kernel lets us (min_free_ms, restored on exit), and before each
# section that fills caches, write the memory those fills will take once (touch_memory):
# the page cache then gets pages that are already backed, as it always does on a real
# machine. Both are tunings, so they run only with --tuned (TOUCH=1, the second pass), and the
# report then shows the default-settings figures first.
: "${TOUCH:=0}" # 1 only in --tuned's second pass
REPORTING_PARAM=/sys/module/page_reporting/parameters/min_free_ms
if [[ $TOUCH == 1 && -w $REPORTING_PARAM ]]; then
    old="$(cat "$REPORTING_PARAM")"
    for ms in 300000 120000 60000; do
        if echo "$ms" >"$REPORTING_PARAM" 2>/dev/null; then
            REPORTING_OLD=$old
            echo "  free page reporting held off: $REPORTING_PARAM $old -> $ms (restored on exit)" >&2
            break
        fi
    done
fi
touch_memory() { # touch_memory MIB: write MIB of memory once (capped to leave 2 GiB free)
    [[ $TOUCH == 1 ]] || return 0
    local mib=$1 avail started=$SECONDS
    avail=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
    ((mib <= avail - 2048)) || mib=$((avail - 2048))
    ((mib > 0)) || return 0
    python3 -c "
import sys
n, step = int(sys.argv[1]) << 20, 64 << 20
b = bytearray(n)
for i in range(0, n, step):
    b[i:i + step] = b'\x01' * len(b[i:i + step])
" "$mib"
    echo "  touched $mib MiB of memory in $((SECONDS - started)) s" >&2
}

say "starting distribution (proxy mode) and cistern"
for pair in "distribution:$P_DIST:$UP" "distribution-slow:$P_DIST_SLOW:$THROTTLE"; do
    IFS=: read -r name port _ <<<"$pair"
    remote=${pair#*:*:}
    registry_config "$WORK/$name" "$port" "$remote"
    start "$name" "$WORK/$name/registry.log" docker-registry serve "$WORK/$name/config.yml"
done
for pair in "cistern:$P_CISTERN:$UP" "cistern-slow:$P_CISTERN_SLOW:$THROTTLE"; do
    IFS=: read -r name port _ <<<"$pair"
    remote=${pair#*:*:}
    mkdir -p "$WORK/$name"
    cat >"$WORK/$name/config.toml" <<EOF
listen = "127.0.0.1:$port"
data_dir = "$WORK/$name/data"
shutdown_grace = "2s"

[upstream]
url = "$remote"

[log]
level = "info"
EOF
    start "$name" "$WORK/$name/cistern.log" "$CISTERN_BIN" serve --config "$WORK/$name/config.toml"
done
for name in distribution distribution-slow cistern cistern-slow; do
    wait_http "$name" "${MAIN_PID[$name]}" "${BASE[$name]}/v2/"
done

# === 1. cold single-client GETs, and straight from the upstream ===

say "cold ${BLOB_MIB} MiB GETs (one per proxy per blob), and the same blobs straight from the upstream"
touch_memory $((3 * COLD_RUNS * BLOB_MIB + 512))
floor="$(python3 "$HELPERS" hashtime "$WORK/blobs/A1")"
record hash_floor_s sha256 "$floor"
echo "  one core hashes the ${BLOB_MIB} MiB blob (sha256) in $floor s" >&2
for i in $(seq 1 "$COLD_RUNS"); do
    n=A$i
    # The blobs' pushes, and the round before, leave GiBs of dirty pages: flush them now, so
    # that no proxy's cache writes wait behind writeback it did not cause.
    sync
    # The upstream serves from its page cache, as it will for the proxies.
    curl_get "$UP$(blob_path "$n")" >/dev/null
    timed_get upstream direct_blob_s "$UP$(blob_path "$n")" "${SIZE[$n]}"
    for p in "${PROXIES[@]}"; do
        timed_get "$p" cold_blob_s "${BASE[$p]}$(blob_path "$n")" "${SIZE[$n]}"
    done
done

# === 2. warm single-client GETs vs nginx serving the file ===

say "warm ${BLOB_MIB} MiB GETs, ${WARM_RUNS} rounds"
for p in nginx-static "${PROXIES[@]}"; do curl_get "${BASE[$p]}$(blob_path A1)" >/dev/null; done
for _ in $(seq 1 "$WARM_RUNS"); do
    timed_get nginx-static static_blob_s "${BASE[nginx-static]}$(blob_path A1)" "${SIZE[A1]}"
    for p in "${PROXIES[@]}"; do
        timed_get "$p" warm_blob_s "${BASE[$p]}$(blob_path A1)" "${SIZE[A1]}"
    done
done

# === 3. warm manifest-by-digest req/s ===

say "manifest by digest: wrk -t$WRK_THREADS -c$WRK_CONNS -d${WRK_SECS}s, ${WRK_RUNS} rounds"
for p in nginx-static "${PROXIES[@]}"; do
    got="$(curl -fsS --noproxy '*' --max-time 30 -H "Accept: $MANIFEST_TYPE" \
        "${BASE[$p]}$MANIFEST_PATH" | sha256sum | cut -d' ' -f1)" || got=none
    [[ "sha256:$got" == "$MANIFEST_DIGEST" ]] || die "$p does not serve the manifest byte for byte"
done
upstream_manifest_requests() {
    grep -c "\"[A-Z]* /v2/$REPO/manifests/" "$WORK/upstream/registry.log" || true
}
for _ in $(seq 1 "$WRK_RUNS"); do
    for p in nginx-static "${PROXIES[@]}"; do
        before=$(upstream_manifest_requests)
        out="$(timeout $((WRK_SECS + 30)) wrk -t"$WRK_THREADS" -c"$WRK_CONNS" -d"${WRK_SECS}s" \
            -H "Accept: $MANIFEST_TYPE" "${BASE[$p]}$MANIFEST_PATH" 2>&1)" || true
        echo "$out" >>"$WORK/wrk.log"
        rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
        bad="$(awk '/Non-2xx or 3xx responses:/ {print $NF}' <<<"$out")"
        errs="$(grep -o 'Socket errors:.*' <<<"$out" || true)"
        if [[ -z "$rps" || -n "$bad" ]]; then
            echo "warning: $p: wrk: ${bad:-no} non-2xx responses; $errs" >&2
            record manifest_rps_failed "$p" 1
            [[ -z "$rps" ]] && continue
        fi
        record manifest_rps "$p" "$rps"
        sleep 0.5
        up=$(($(upstream_manifest_requests) - before))
        record manifest_upstream_requests "$p" "$up"
        printf '  %-14s %10s req/s, %s manifest requests reached the upstream %s\n' \
            "$p" "$rps" "$up" "$errs" >&2
    done
done

# === 4. a burst of concurrent cold GETs of one blob, then the same burst warm ===

burst() { # burst SERVER MEASURE URL N SIZE: N parallel GETs in one curl; records the wall time
    local server=$1 measure=$2 url=$3 n=$4 size=$5 cfg="$WORK/burst.$1.$2.curl" out start end ok
    : >"$cfg"
    for _ in $(seq 1 "$n"); do printf 'url = "%s"\noutput = "/dev/null"\n' "$url" >>"$cfg"; done
    start=$(date +%s.%N)
    out="$(curl -sS --noproxy '*' -Z --parallel-max "$n" --parallel-immediate --max-time "$MAX_TIME" \
        -w '%{http_code} %{size_download}\n' -K "$cfg" 2>>"$WORK/burst.err")" || true
    end=$(date +%s.%N)
    ok="$(awk -v s="$size" '$1 == 200 && $2 == s {n++} END {print n + 0}' <<<"$out")"
    record "$measure" "$server" "$(python3 -c "print(round($end - $start, 4))")"
    record "${measure%_s}_ok" "$server" "$ok/$n"
    printf '  %-14s %-14s %8.3f s, %s complete\n' "$server" "$measure" \
        "$(python3 -c "print($end - $start)")" "$ok/$n" >&2
}

say "${BURST_CLIENTS} concurrent GETs of one ${BURST_MIB} MiB blob: cold, then warm; ${BURST_RUNS} rounds"
touch_memory $((3 * BURST_RUNS * BURST_MIB + 512))
for i in $(seq 1 "$BURST_RUNS"); do
    for p in "${PROXIES[@]}"; do
        before=$(upstream_gets "${DIGEST[B$i]}")
        burst "$p" burst_cold_s "${BASE[$p]}$(blob_path "B$i")" "$BURST_CLIENTS" "${SIZE[B$i]}"
        sleep 1 # distribution logs a request when its response is done
        after=$(upstream_gets "${DIGEST[B$i]}")
        record burst_upstream_gets "$p" $((after - before))
        echo "  $p: $((after - before)) upstream GETs" >&2
        burst "$p" burst_warm_s "${BASE[$p]}$(blob_path "B$i")" "$BURST_CLIENTS" "${SIZE[B$i]}"
    done
    # The same warm burst from nginx serving the file: the baseline for warm bursts.
    burst nginx-static burst_static_s "${BASE[nginx-static]}$(blob_path "B$i")" "$BURST_CLIENTS" "${SIZE[B$i]}"
done

# === 5. clients joining a cold fill from a slow upstream ===

say "joining a cold fill of ${SLOW_MIB} MiB from a ${SLOW_RATE}/s upstream: ${JOINERS} joiners"
touch_memory $((3 * SLOW_MIB + 512))
for p in "${PROXIES[@]}"; do
    before=$(throttle_gets "${DIGEST[S]}")
    python3 "$HELPERS" join "${BASE[$p-slow]}$(blob_path S)" "${SIZE[S]}" "$JOINERS" \
        "$JOIN_FIRST" "$JOIN_INTERVAL" "$MAX_TIME" >"$WORK/join.$p.jsonl"
    sleep 1
    after=$(throttle_gets "${DIGEST[S]}")
    python3 - "$WORK/join.$p.jsonl" "$p" "$((after - before))" >>"$RESULTS" <<'EOF'
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
server, gets = sys.argv[2], sys.argv[3]
ok = sum(1 for r in recs if r.get("ok"))
for r in recs[1:]:
    if "ttfb_s" in r:
        print(f"join_ttfb_s\t{server}\t{r['ttfb_s']}")
if "ttfb_s" in recs[0]:
    print(f"join_first_client_ttfb_s\t{server}\t{recs[0]['ttfb_s']}")
print(f"join_ok\t{server}\t{ok}/{len(recs)}")
# A joiner joined the fill if it started before the first client had its whole blob.
end = recs[0].get("start", 0) + recs[0].get("total_s", 0)
during = sum(1 for r in recs[1:] if r.get("start", 1e9) < end)
print(f"join_during_fill\t{server}\t{during}/{len(recs) - 1}")
print(f"join_upstream_gets\t{server}\t{gets}")
EOF
    python3 -c '
import json, sys
for l in open(sys.argv[1]):
    r = json.loads(l)
    print("  %-13s client %2d start %5.2fs  ttfb %s  total %s  %s" % (sys.argv[2], r["client"],
          r.get("start", -1), r.get("ttfb_s"), r.get("total_s"), "ok" if r.get("ok") else r.get("error", "FAILED")))
' "$WORK/join.$p.jsonl" "$p" >&2
done

# === 6. peak RSS while many clients stream one cold big blob ===

say "peak RSS: ${BIG_CLIENTS} clients stream one cold ${BIG_MIB} MiB blob"
touch_memory $((3 * BIG_MIB + 512))
for p in "${PROXIES[@]}"; do
    main=${MAIN_PID[$p]}
    pids=("$main")
    if [[ $p == nginx-cache ]]; then
        mapfile -t -O 1 pids < <(pgrep -P "$main")
    fi
    for pid in "${pids[@]}"; do
        echo 5 >"/proc/$pid/clear_refs" 2>/dev/null ||
            echo "warning: cannot reset VmHWM of $pid (not root?): lifetime peak reported" >&2
    done
    stop="$WORK/rss.$p.stop"
    python3 "$HELPERS" rss "$stop" "${pids[@]}" >"$WORK/rss.$p.json" &
    sampler=$!
    burst "$p" rss_wall_s "${BASE[$p]}$(blob_path C)" "$BIG_CLIENTS" "${SIZE[C]}"
    touch "$stop"
    wait "$sampler"
    hwm="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["vmhwm_sum_kib"])' "$WORK/rss.$p.json")"
    record rss_hwm_kib "$p" "$hwm"
    echo "  $p: VmHWM $((hwm / 1024)) MiB over ${#pids[@]} process(es); $(cat "$WORK/rss.$p.json")" >&2
done

# === the table ===

say "results"
TABLE="$(python3 "$HELPERS" report "$RESULTS")"
echo "$TABLE"
[[ -z "${RESULTS_COPY:-}" ]] || cp "$RESULTS" "$RESULTS_COPY"
if [[ -n "$OUT" ]]; then
    {
        echo "## Macro benchmark, $(date -u +%Y-%m-%dT%H:%MZ)"
        echo
        sed 's/^/    /' "$WORK/machine.txt"
        echo
        echo "$TABLE"
        echo
        echo "Raw samples (measure, server, value):"
        echo
        sed 's/^/    /' "$RESULTS"
    } >"$OUT"
    echo "written to $OUT" >&2
fi
