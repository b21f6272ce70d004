#!/usr/bin/env bash
# httpd_bench.sh: cport-httpd against nginx serving the same static files (see bench/README.md,
# "HTTP benchmark").
#
# Servers: Debian's nginx (a private instance: one process, master_process off, sendfile on,
# access_log off, its own temporary prefix, config, pid file and error log on a free port; the
# system nginx is never touched) and cport-httpd --threads 1 --no-access-log on io_uring and on
# epoll. Each run starts a fresh server pinned to one CPU and runs wrk (one thread) pinned to
# the other. Scenarios: small = a 4 KiB file over keep-alive connections (requests/s);
# large = a 1 MiB file (MiB/s of body). N alternating rounds: in round r every server runs
# once, in an order rotated by r. Prints per scenario the median of each server's figures and
# the median of the per-round ratios to nginx.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
ROUNDS=5
SECS=4
WARMUP=1
SMALL_CONNS=50
LARGE_CONNS=8
SERVER_CPU=0
CLIENT_CPU=1
PORT_BASE=18080
SERVERS=nginx,cport-uring,cport-epoll
SCENARIOS=small,large
OUT=

usage() {
    cat <<'EOF'
usage: bench/httpd_bench.sh [options]
  --quick            smoke test: 2 rounds of 1 s runs
  --rounds N         alternating rounds (default 5)
  --secs T           measured seconds per run (default 4)
  --warmup W         warm-up seconds before each measured run (default 1; 0 = none)
  (wrk takes whole seconds only: --secs and --warmup must be integers)
  --small-conns C    wrk connections for the 4 KiB file (default 50)
  --large-conns C    wrk connections for the 1 MiB file (default 8)
  --servers LIST     subset of nginx,cport-uring,cport-epoll (default all three)
  --scenarios LIST   subset of small,large (default both)
  --build DIR        build directory holding bin/cport-httpd (default <repo>/build)
  --server-cpu N     CPU the server is pinned to (default 0)
  --client-cpu N     CPU wrk is pinned to (default 1)
  --port-base P      first TCP port tried (default 18080)
  --out DIR          keep raw wrk outputs there (default: a temporary directory, removed)
EOF
}

CMDLINE="$0 $*"
while [ $# -gt 0 ]; do
    case $1 in
    --quick) ROUNDS=2; SECS=1; WARMUP=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --small-conns) SMALL_CONNS=$2; shift ;;
    --large-conns) LARGE_CONNS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --build) BUILD=$2; shift ;;
    --server-cpu) SERVER_CPU=$2; shift ;;
    --client-cpu) CLIENT_CPU=$2; shift ;;
    --port-base) PORT_BASE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "httpd_bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
# wrk -d takes whole seconds ("0.5s" makes it print its usage and exit 1): a fractional
# warm-up was skipped without a word, a fractional --secs failed every run.
for v in "--rounds:$ROUNDS:1" "--secs:$SECS:1" "--warmup:$WARMUP:0"; do
    IFS=: read -r opt val min <<<"$v"
    if ! [[ $val =~ ^[0-9]+$ ]] || [ "$val" -lt "$min" ]; then
        echo "httpd_bench.sh: $opt needs a whole number >= $min (wrk takes whole seconds), not '$val'" >&2
        exit 2
    fi
done

for tool in wrk nginx taskset curl ss; do
    command -v $tool >/dev/null || PATH=$PATH:/usr/sbin
    command -v $tool >/dev/null || { echo "httpd_bench.sh: $tool not found (scripts/deps.sh installs it)" >&2; exit 1; }
done
HTTPD=$BUILD/bin/cport-httpd
[ -x "$HTTPD" ] || { echo "httpd_bench.sh: $HTTPD is not built" >&2; exit 1; }

TMP=$(mktemp -d /tmp/httpd-bench.XXXXXX)
[ -n "$OUT" ] || OUT=$TMP/out
mkdir -p "$OUT" "$TMP/root" "$TMP/nginx/logs"
SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf "$TMP" # --out DIR lies outside it and is kept
}
trap cleanup EXIT
trap 'exit 130' INT TERM

head -c 4096 /dev/urandom >"$TMP/root/4k.bin"
head -c 1048576 /dev/urandom >"$TMP/root/1m.bin"

next_port=$PORT_BASE
free_port() { # the next port nobody listens on
    while [ -n "$(ss -Htln "sport = :$next_port" 2>/dev/null)" ]; do next_port=$((next_port + 1)); done
    PORT=$next_port
    next_port=$((next_port + 1))
}

backend_of() { case $1 in cport-uring) echo io_uring ;; *) echo epoll ;; esac; }

start_server() { # name port
    local name=$1 port=$2
    case $name in
    nginx)
        cat >"$TMP/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 65;
    keepalive_requests 100000000;
    default_type application/octet-stream;
    client_body_temp_path $TMP/nginx/body;
    proxy_temp_path $TMP/nginx/proxy;
    fastcgi_temp_path $TMP/nginx/fastcgi;
    uwsgi_temp_path $TMP/nginx/uwsgi;
    scgi_temp_path $TMP/nginx/scgi;
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        root $TMP/root;
        location / { }
    }
}
EOF
        taskset -c "$SERVER_CPU" nginx -p "$TMP/nginx" -e "$TMP/nginx/logs/error.log" \
            -c "$TMP/nginx/nginx.conf" >"$TMP/server.log" 2>&1 &
        ;;
    cport-uring | cport-epoll)
        taskset -c "$SERVER_CPU" "$HTTPD" --root "$TMP/root" --port "$port" --bind 127.0.0.1 \
            --threads 1 --no-access-log --backend "$(backend_of "$name")" >"$TMP/server.log" 2>&1 &
        ;;
    esac
    SERVER_PID=$! # taskset execs the server: this is the server's own pid
    for _ in $(seq 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/4k.bin" && return 0
        sleep 0.05
    done
    echo "httpd_bench.sh: $name did not come up on port $port" >&2
    cat "$TMP/server.log" >&2
    return 1
}

stop_server() { # only the server this script started, by its pid
    kill -TERM "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
    SERVER_PID=
}

HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; } # utime+stime, all threads

IFS=, read -r -a servers <<<"$SERVERS"
IFS=, read -r -a scenarios <<<"$SCENARIOS"
RESULTS=$TMP/results # scenario round server value
: >"$RESULTS"

echo "httpd_bench: $CMDLINE"
echo "  $(nginx -v 2>&1); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'); kernel $(uname -r); $(nproc) CPUs"
echo "  server on CPU $SERVER_CPU, wrk -t1 on CPU $CLIENT_CPU; $ROUNDS rounds x ${SECS}s (+${WARMUP}s warm-up)"
for sc in "${scenarios[@]}"; do
    case $sc in
    small) path=/4k.bin; conns=$SMALL_CONNS ;;
    large) path=/1m.bin; conns=$LARGE_CONNS ;;
    *) echo "unknown scenario $sc" >&2; exit 2 ;;
    esac
    for ((r = 0; r < ROUNDS; r++)); do
        n=${#servers[@]}
        for ((k = 0; k < n; k++)); do
            name=${servers[$(((k + r) % n))]}
            free_port
            start_server "$name" "$PORT" || exit 1
            url="http://127.0.0.1:$PORT$path"
            if [ "$WARMUP" -gt 0 ] &&
                ! taskset -c "$CLIENT_CPU" wrk -t1 -c"$conns" -d"${WARMUP}s" "$url" >/dev/null 2>&1; then
                echo "  $sc round $r $name: warm-up failed (wrk exit status $?)" >&2
            fi
            raw=$OUT/$sc-$r-$name.txt
            cpu0=$(cpu_ticks "$SERVER_PID")
            taskset -c "$CLIENT_CPU" wrk -t1 -c"$conns" -d"${SECS}s" "$url" >"$raw" 2>&1
            cpu1=$(cpu_ticks "$SERVER_PID")
            stop_server
            rps=$(awk '/^Requests\/sec:/ {print $2}' "$raw")
            reqs=$(awk '/ requests in / {print $1; exit}' "$raw") # served in the measured run
            bad=$(awk '/Non-2xx|Socket errors/ {print}' "$raw")
            if [ -z "$rps" ] || [ -z "$reqs" ] || [ -n "$bad" ]; then
                echo "  $sc round $r $name: FAILED: ${bad:-no figures}" >&2
                continue
            fi
            # 1 MiB bodies: requests/s = MiB/s of body. Server CPU: microseconds per request
            # served (wrk's count; its run lasts a little longer than -d, so rps x SECS fell
            # short of it: 5559 x 1 s against 5602 served in 1.01 s).
            val=$rps
            cpu=$(awk -v t=$((cpu1 - cpu0)) -v hz="$HZ" -v n="$reqs" \
                'BEGIN {printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0)}')
            printf "  %-6s round %d %-12s %12.1f %s  server cpu %8.2f us/req\n" "$sc" "$r" "$name" \
                "$val" "$([ "$sc" = small ] && echo req/s || echo MiB/s)" "$cpu"
            echo "$sc $r $name $val $cpu" >>"$RESULTS"
        done
    done
done

echo
awk -v servers="$SERVERS" -v scen="$SCENARIOS" '
function median(s,    a, n, i, j, t) {
    n = split(s, a, " ")
    if (n == 0) return ""
    for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
{ v[$1, $2, $3] = $4; c[$1, $2, $3] = $5; all[$1, $3] = all[$1, $3] " " $4; allc[$1, $3] = allc[$1, $3] " " $5; ok[$1, $3]++ }
END {
    ns = split(servers, S, ","); nc = split(scen, C, ",")
    for (k = 1; k <= nc; k++) {
        sc = C[k]; unit = sc == "small" ? "req/s (4 KiB file)" : "MiB/s (1 MiB file)"
        printf "%s: medians of the runs that succeeded (%d rounds)\n", sc, 0 + ROUNDS
        printf "  %-12s %14s %10s %16s %10s %6s\n", "server", unit ~ /req/ ? "req/s" : "MiB/s", "vs nginx", "cpu us/req", "vs nginx", "ok"
        for (i = 1; i <= ns; i++) {
            rat = ""; ratc = ""
            for (r = 0; r < 1000; r++)
                if ((sc, r, S[i]) in v && (sc, r, "nginx") in v && v[sc, r, "nginx"] > 0) {
                    rat = rat " " v[sc, r, S[i]] / v[sc, r, "nginx"]
                    if (c[sc, r, S[i]] > 0) ratc = ratc " " c[sc, r, "nginx"] / c[sc, r, S[i]]
                }
            m = median(all[sc, S[i]]); q = median(rat); mc = median(allc[sc, S[i]]); qc = median(ratc)
            printf "  %-12s %14s %10s %16s %10s %6s\n", S[i], m == "" ? "-" : sprintf("%.1f", m),
                   q == "" ? "-" : sprintf("%.3f", q), mc == "" ? "-" : sprintf("%.2f", mc),
                   qc == "" ? "-" : sprintf("%.3f", qc), (0 + ok[sc, S[i]]) "/" (0 + ROUNDS)
        }
    }
    print "(ratios: median of the per-round ratios; for cpu, nginx us/req / server us/req, so > 1 = cheaper)"
}' ROUNDS="$ROUNDS" "$RESULTS"
