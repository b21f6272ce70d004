#!/usr/bin/env bash
# echo_bench.sh: compare echo servers under cport-bench (see bench/README.md, "Echo benchmark").
#
# For every scenario it runs N alternating rounds; in round r every server runs once, in an
# order rotated by r, each time as a fresh process pinned to one CPU while cport-bench runs
# pinned to another. cport-bench itself samples the server's CPU time (/proc/PID/stat) at the
# exact start and end of its measured window (--server-pid), and for "hold" the server's
# VmRSS before connecting and after the connections have idled. The script prints, per
# scenario, the median of each metric per server and the median of the per-round ratios to
# the reference server.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
ROUNDS=
WARMUP=
SECS=
HOLD_CONNS=
HOLD_SECS=
HOLD_SETTLE=
SERVER_CPU=0
CLIENT_CPU=1
PORT_BASE=15000
REF=ref
OUT=
QUICK=0
SCENARIOS=echo_64x100,echo_64x1000d4,echo_16kx50d2,connrate_64,hold
SERVERS=()

usage() {
    cat <<'EOF'
usage: bench/echo_bench.sh [options]
  --quick              smoke test: 2 rounds, 0.5 s warm-up, 1 s runs, hold 2000 connections
  --rounds N           alternating rounds per scenario (default 5; at least 5 for real figures)
  --secs T             measured seconds per run (default 5)
  --warmup W           warm-up seconds before the measured window (default 2)
  --hold-conns N       connections in the hold scenario (default 19000)
  --hold-secs T        how long hold keeps them idle (default 3)
  --hold-settle T      before each of hold's RSS samples of the set-up, wait (at most T)
                       until the server's RSS has not changed for 2.5 s, so that both
                       find it at rest (default 10; pool buffers a burst left free are
                       trimmed after a second, in steps)
  --scenarios LIST     comma-separated subset of:
                         echo_64x100 echo_64x1000d4 echo_16kx50d2 connrate_64 hold
                       and, not in the default list, echo_16kx4d2 (few connections,
                       large messages) and latency_64x100r20k (open loop: latency
                       at a fixed rate, from each message's due time)
  --build DIR          build directory holding bin/ (default <repo>/build)
  --server 'NAME|COMMAND|HOLD_ARGS'
                       a server to compare (repeatable; replaces the default list).
                       COMMAND is split on spaces; {port} and {build} are substituted.
                       HOLD_ARGS are appended for the hold scenario only.
  --ref NAME           the reference server that ratios are computed against (default ref)
  --server-cpu N       CPU the server is pinned to (default 0)
  --client-cpu N       CPU cport-bench is pinned to (default 1)
  --port-base P        first TCP port; every run uses a new one (default 15000)
  --out DIR            keep raw outputs there (default: a new temporary directory)
Default servers:
  cport-uring|{build}/bin/cport-echo --port {port} --threads 1 --backend io_uring --buffer 65536|--zero-byte --buffer 4096
  cport-epoll|{build}/bin/cport-echo --port {port} --threads 1 --backend epoll --buffer 65536|--zero-byte --buffer 4096
  ref|{build}/bin/ref_echo --port {port}|
  ref-uring|{build}/bin/ref_uring_echo --port {port}|
EOF
}

CMDLINE="$0 $*"
while [ $# -gt 0 ]; do
    case $1 in
    --quick) QUICK=1 ;;
    --rounds) ROUNDS=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --warmup) WARMUP=$2; shift ;;
    --hold-conns) HOLD_CONNS=$2; shift ;;
    --hold-secs) HOLD_SECS=$2; shift ;;
    --hold-settle) HOLD_SETTLE=$2; shift ;;
    --scenarios) SCENARIOS=$2; shift ;;
    --build) BUILD=$2; shift ;;
    --server) SERVERS+=("$2"); shift ;;
    --ref) REF=$2; shift ;;
    --server-cpu) SERVER_CPU=$2; shift ;;
    --client-cpu) CLIENT_CPU=$2; shift ;;
    --port-base) PORT_BASE=$2; shift ;;
    --out) OUT=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "echo_bench.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
# Defaults; --quick only changes the values not given explicitly.
if [ "$QUICK" = 1 ]; then
    : "${ROUNDS:=2}" "${WARMUP:=0.5}" "${SECS:=1}" "${HOLD_CONNS:=2000}" "${HOLD_SECS:=1}" "${HOLD_SETTLE:=3}"
else
    : "${ROUNDS:=5}" "${WARMUP:=2}" "${SECS:=5}" "${HOLD_CONNS:=19000}" "${HOLD_SECS:=3}" "${HOLD_SETTLE:=10}"
fi
BUILD=$(cd "$BUILD" 2>/dev/null && pwd) || { echo "echo_bench.sh: no build directory" >&2; exit 2; }
BENCH=$BUILD/bin/cport-bench
[ -x "$BENCH" ] || { echo "echo_bench.sh: $BENCH not found; build first" >&2; exit 2; }
if [ ${#SERVERS[@]} -eq 0 ]; then
    SERVERS=(
        "cport-uring|{build}/bin/cport-echo --port {port} --threads 1 --backend io_uring --buffer 65536|--zero-byte --buffer 4096"
        "cport-epoll|{build}/bin/cport-echo --port {port} --threads 1 --backend epoll --buffer 65536|--zero-byte --buffer 4096"
        "ref|{build}/bin/ref_echo --port {port}|"
        "ref-uring|{build}/bin/ref_uring_echo --port {port}|"
    )
fi

# Servers that exist.
NAMES=()
declare -A CMD HOLDARGS
for spec in "${SERVERS[@]}"; do
    IFS='|' read -r name cmd hold <<<"$spec"
    cmd=${cmd//\{build\}/$BUILD}
    read -r -a words <<<"$cmd"
    if [ -z "$name" ] || [ ${#words[@]} -eq 0 ]; then
        echo "echo_bench.sh: bad --server '$spec' (want NAME|COMMAND|HOLD_ARGS)" >&2
        exit 2
    fi
    if [ -n "${CMD[$name]+x}" ]; then
        echo "echo_bench.sh: server name $name used twice" >&2
        exit 2
    fi
    if ! command -v "${words[0]}" >/dev/null 2>&1; then
        echo "skipping $name: ${words[0]} not found (not built yet?)"
        continue
    fi
    NAMES+=("$name")
    CMD[$name]=$cmd
    HOLDARGS[$name]=${hold:-}
done
[ ${#NAMES[@]} -gt 0 ] || { echo "echo_bench.sh: no server to run" >&2; exit 2; }
HAVE_REF=0
for n in "${NAMES[@]}"; do [ "$n" = "$REF" ] && HAVE_REF=1; done
[ "$HAVE_REF" = 1 ] || echo "note: reference server '$REF' is not in the list; no ratios"

PIN_S=(taskset -c "$SERVER_CPU")
PIN_C=(taskset -c "$CLIENT_CPU")
if [ "$(nproc)" -lt 2 ] || ! command -v taskset >/dev/null; then
    echo "warning: fewer than 2 CPUs or no taskset: not pinning (figures are less meaningful)"
    PIN_S=()
    PIN_C=()
fi

# Both processes may need ~19000 descriptors; children inherit the raised soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

if [ -z "$OUT" ]; then
    OUT=$(mktemp -d /tmp/echo_bench.XXXXXX)
fi
mkdir -p "$OUT"
DATA=$OUT/results.tsv
LOG=$OUT/runs.log
: >"$DATA"
: >"$LOG"

# scenario -> "description|cport-bench arguments|metric list"
# Metrics: key:label:decimals, where key is a RESULT key (or cpu_us_per_X = user + system).
declare -A SC_DESC SC_ARGS SC_METRICS
SC_DESC[echo_64x100]="echo 64 B x 100 conns x depth 1"
SC_ARGS[echo_64x100]="echo -c 100 -s 64 -d 1"
SC_DESC[echo_64x1000d4]="echo 64 B x 1000 conns x depth 4"
SC_ARGS[echo_64x1000d4]="echo -c 1000 -s 64 -d 4"
SC_DESC[echo_16kx50d2]="echo 16 KiB x 50 conns x depth 2"
SC_ARGS[echo_16kx50d2]="echo -c 50 -s 16384 -d 2"
SC_DESC[echo_16kx4d2]="echo 16 KiB x 4 conns x depth 2"
SC_ARGS[echo_16kx4d2]="echo -c 4 -s 16384 -d 2"
SC_DESC[latency_64x100r20k]="echo 64 B x 100 conns, open loop at 20 000 msgs/s (depth <= 4)"
SC_ARGS[latency_64x100r20k]="echo -c 100 -s 64 -d 4 --rate 20000"
SC_DESC[connrate_64]="connrate, 64 concurrent, 64 B echo per connection"
SC_ARGS[connrate_64]="connrate -c 64 -s 64"
SC_DESC[hold]="hold $HOLD_CONNS connections (one verified echo each, then idle)"
SC_ARGS[hold]="hold -n $HOLD_CONNS --echo --settle $HOLD_SETTLE"
ECHO_METRICS="msgs_per_s:msgs/s:0 mib_per_s:MiB/s:1 p50_us:p50_us:1 p99_us:p99_us:1 server_user_us_per_msg:usr_us/msg:3 server_sys_us_per_msg:sys_us/msg:3 cpu_us_per_msg:cpu_us/msg:3 jain:jain:4"
for s in echo_64x100 echo_64x1000d4 echo_16kx50d2 echo_16kx4d2; do SC_METRICS[$s]=$ECHO_METRICS; done
SC_METRICS[latency_64x100r20k]="msgs_per_s:msgs/s:0 p50_us:p50_us:1 p99_us:p99_us:1 p999_us:p999_us:1 max_us:max_us:0 late_sends:late_sends:0 cpu_us_per_msg:cpu_us/msg:3"
SC_METRICS[connrate_64]="conns_per_s:conns/s:0 p50_us:p50_us:1 p99_us:p99_us:1 server_user_us_per_conn:usr_us/conn:2 server_sys_us_per_conn:sys_us/conn:2 cpu_us_per_conn:cpu_us/conn:2"
SC_METRICS[hold]="held:held:0 conns_per_s:setup_conns/s:0 p99_us:setup_p99_us:0 server_rss_per_conn_b:rss_B/conn:0 server_rss_marginal_b:rss_marg_B:0 server_rss_idle_kb:rss_KiB:0 cpu_us_per_conn:cpu_us/conn:2"

IFS=',' read -r -a SCEN_LIST <<<"$SCENARIOS"
for s in "${SCEN_LIST[@]}"; do
    [ -n "${SC_ARGS[$s]+x}" ] || { echo "echo_bench.sh: unknown scenario $s" >&2; exit 2; }
done

SERVER_PID=
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        sleep 0.5
        kill -KILL "$SERVER_PID" 2>/dev/null
    fi
}
trap cleanup EXIT
trap 'echo "interrupted"; exit 130' INT TERM

is_listening() { # port
    local hex
    hex=$(printf '%04X' "$1")
    awk -v h="$hex" '$4 == "0A" { n = split($2, a, ":"); if (a[n] == h) f = 1 } END { exit !f }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Whether process PID itself holds the socket listening on PORT. cport-bench measures the
# CPU and memory of the process the script started: a wrapper that runs the server as its
# child (timeout, perf stat, a shell script without exec) would be measured instead of the
# server, and a port already in use would send the load to somebody else's server.
owns_listener() { # pid port
    local hex ino fd
    hex=$(printf '%04X' "$2")
    for ino in $(awk -v h="$hex" '$4 == "0A" { n = split($2, a, ":"); if (a[n] == h) print $10 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null); do
        for fd in /proc/"$1"/fd/*; do
            [ "$(readlink "$fd" 2>/dev/null)" = "socket:[$ino]" ] && return 0
        done
    done
    return 1
}

stop_server() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "  server $pid ignored SIGTERM for 5 s; killing it" | tee -a "$LOG"
        kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null
    SERVER_PID=
}

RUN=0
run_one() { # scenario round server
    local sc=$1 round=$2 name=$3
    local port=$((PORT_BASE + RUN % 20000))
    RUN=$((RUN + 1))
    local cmd=${CMD[$name]//\{port\}/$port} extra="" bargs
    [ "$sc" = hold ] && extra=${HOLDARGS[$name]}
    local -a sargv cargv
    read -r -a sargv <<<"$cmd $extra"
    local tag="$sc.$round.$name"
    "${PIN_S[@]}" "${sargv[@]}" >"$OUT/$tag.server.log" 2>&1 &
    SERVER_PID=$!
    local pid=$SERVER_PID i
    for i in $(seq 1 200); do
        is_listening "$port" && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if ! is_listening "$port"; then
        echo "  $tag: server did not start listening on port $port (see $OUT/$tag.server.log)"
        printf '%s\t%s\t%s\tfailed\t1\n' "$sc" "$round" "$name" >>"$DATA"
        stop_server "$pid"
        return
    fi
    if ! owns_listener "$pid" "$port"; then
        echo "  $tag: port $port is not listened on by the started process ($pid) but by another" \
            "one (a wrapper that does not exec the server, or the port was in use): not measured" |
            tee -a "$LOG"
        printf '%s\t%s\t%s\tfailed\t1\n' "$sc" "$round" "$name" >>"$DATA"
        stop_server "$pid"
        return
    fi
    if [ "$sc" = hold ]; then
        bargs="${SC_ARGS[$sc]} -T $HOLD_SECS"
    else
        bargs="${SC_ARGS[$sc]} -w $WARMUP -T $SECS"
    fi
    read -r -a cargv <<<"$BENCH $bargs --port $port --server-pid $pid"
    local limit
    limit=$(awk -v w="$WARMUP" -v t="$SECS" -v h="$HOLD_SECS" -v s="$HOLD_SETTLE" 'BEGIN { printf "%d", w + t + h + 2 * s + 90 }')
    {
        echo "# $tag"
        echo "server: ${PIN_S[*]} ${sargv[*]}"
        echo "client: ${PIN_C[*]} ${cargv[*]}"
    } >>"$LOG"
    "${PIN_C[@]}" timeout -k 10 -s INT "$limit" "${cargv[@]}" >"$OUT/$tag.out" 2>"$OUT/$tag.err"
    local rc=$?
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "  $tag: the server died during the run" | tee -a "$LOG"
        rc=99
    fi
    stop_server "$pid"
    local line
    line=$(grep '^RESULT ' "$OUT/$tag.out" | tail -n 1)
    if [ "$rc" -ne 0 ] || [ -z "$line" ]; then
        echo "  $tag: FAILED (exit $rc): $(grep -E '^errors|^held' "$OUT/$tag.out" | tr '\n' ' ')$(head -c 300 "$OUT/$tag.err")"
        printf '%s\t%s\t%s\tfailed\t1\n' "$sc" "$round" "$name" >>"$DATA"
        return
    fi
    printf '%s\t%s\t%s\tfailed\t0\n' "$sc" "$round" "$name" >>"$DATA"
    echo "$line" | tr ' ' '\n' | awk -F= -v s="$sc" -v r="$round" -v n="$name" '
        NF == 2 && $2 ~ /^-?[0-9.]+$/ { v[$1] = $2; printf "%s\t%s\t%s\t%s\t%s\n", s, r, n, $1, $2 }
        END {
            if (("server_user_us_per_msg" in v) && ("server_sys_us_per_msg" in v))
                printf "%s\t%s\t%s\tcpu_us_per_msg\t%.6f\n", s, r, n, v["server_user_us_per_msg"] + v["server_sys_us_per_msg"]
            if (("server_user_us_per_conn" in v) && ("server_sys_us_per_conn" in v))
                printf "%s\t%s\t%s\tcpu_us_per_conn\t%.6f\n", s, r, n, v["server_user_us_per_conn"] + v["server_sys_us_per_conn"]
        }' >>"$DATA"
    local summary
    summary=$(echo "$line" | tr ' ' '\n' | grep -E '^(msgs_per_s|conns_per_s|held|server_cpu_pct|server_rss_per_conn_b)=' | tr '\n' ' ')
    echo "  round $round  $name: $summary"
}

report() { # scenario
    local sc=$1
    local names="${NAMES[*]}"
    awk -F'\t' -v sc="$sc" -v names="$names" -v ref="$REF" -v metrics="${SC_METRICS[$sc]}" '
        function median(list,    a, n, i, j, t) {
            n = split(list, a, " ")
            for (i = 2; i <= n; i++) { t = a[i] + 0; for (j = i - 1; j >= 1 && a[j] + 0 > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
            if (n == 0) return ""
            return (n % 2) ? a[(n + 1) / 2] + 0 : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        $1 == sc && $4 == "failed" { runs[$3]++; if ($5 == 1) { fails[$3]++; bad[$2, $3] = 1 } }
        $1 == sc && $4 != "failed" { val[$2, $3, $4] = $5; rounds[$2] = 1 }
        END {
            ns = split(names, S, " "); nm = split(metrics, M, " ")
            for (m = 1; m <= nm; m++) { split(M[m], p, ":"); key[m] = p[1]; lab[m] = p[2]; dec[m] = p[3] }
            for (i = 1; i <= ns; i++) for (r in rounds) {
                if ((r, S[i]) in bad) continue
                for (m = 1; m <= nm; m++) if ((r, S[i], key[m]) in val) {
                    v = val[r, S[i], key[m]]; L[i, m] = L[i, m] " " v
                    if (S[i] != ref && !((r, ref) in bad) && ((r, ref, key[m]) in val) && val[r, ref, key[m]] + 0 != 0)
                        R[i, m] = R[i, m] " " v / val[r, ref, key[m]]
                }
            }
            printf "%-14s", "median"; for (m = 1; m <= nm; m++) printf " %13s", lab[m]; printf "  %s\n", "runs(failed)"
            for (i = 1; i <= ns; i++) {
                printf "%-14s", S[i]
                for (m = 1; m <= nm; m++) { x = median(L[i, m]); if (x == "") printf " %13s", "-"; else printf(" %13." dec[m] "f", x) }
                printf "  %d(%d)\n", runs[S[i]], fails[S[i]]
            }
            hr = 0; for (i = 1; i <= ns; i++) if (S[i] == ref) hr = 1
            if (!hr || ns < 2) exit
            printf "%-14s", "ratio vs " ref; for (m = 1; m <= nm; m++) printf " %13s", lab[m]; printf "\n"
            for (i = 1; i <= ns; i++) {
                if (S[i] == ref) continue
                printf "%-14s", S[i]
                for (m = 1; m <= nm; m++) { x = median(R[i, m]); if (x == "") printf " %13s", "-"; else printf " %13.3f", x }
                printf "\n"
            }
        }' "$DATA"
}

echo "# echo_bench.sh: $CMDLINE"
echo "# date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host: $(uname -n)  kernel: $(uname -r)"
echo "# cpu: $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo), $(nproc) CPUs;" \
    "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
echo "# rounds $ROUNDS, warm-up ${WARMUP}s, measured ${SECS}s; hold: $HOLD_CONNS conns for ${HOLD_SECS}s, RSS sampled once settled (at most ${HOLD_SETTLE}s)"
echo "# server pinned: ${PIN_S[*]:-none}; client pinned: ${PIN_C[*]:-none}; reference: $REF"
echo "# raw results and per-run commands: $OUT"
for n in "${NAMES[@]}"; do
    echo "# server $n: ${CMD[$n]}${HOLDARGS[$n]:+  (hold: + ${HOLDARGS[$n]})}"
done

NS=${#NAMES[@]}
for sc in "${SCEN_LIST[@]}"; do
    echo
    if [ "$sc" = hold ]; then
        echo "== ${SC_DESC[$sc]}: cport-bench ${SC_ARGS[$sc]} -T $HOLD_SECS --port P --server-pid PID"
    else
        echo "== ${SC_DESC[$sc]}: cport-bench ${SC_ARGS[$sc]} -w $WARMUP -T $SECS --port P --server-pid PID"
    fi
    for ((r = 0; r < ROUNDS; r++)); do
        for ((k = 0; k < NS; k++)); do
            run_one "$sc" "$r" "${NAMES[$(((k + r) % NS))]}"
        done
    done
    report "$sc"
done
echo
echo "# done; raw results in $OUT"
