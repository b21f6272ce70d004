#!/usr/bin/env bash
# instr_per_msg.sh: user-space instructions per echoed message of an echo server, counted by
# valgrind's callgrind (exact and repeatable, unlike CPU time; see bench/README.md).
#
#   bench/instr_per_msg.sh [--build DIR] [--secs N] [--mode echo|connrate] [--load 'ARGS'] \
#                          [--top N] [--port P] -- SERVER [SERVER ARGS...]
#
# The server runs under callgrind (its own --port is added), cport-bench drives it with
# `echo ARGS` (default: -c 100 -s 64 -d 1) for N seconds (default 6), and the script prints
# the program's instructions divided by the messages echoed (with --mode connrate: by the
# connections, each one message; default load -c 64 -s 64), then the N functions (default
# 15) that executed the most. Start-up and shutdown are included: long runs shrink their
# share. valgrind cannot run io_uring programs (3.19 does not know its system calls'
# effects): measure cport-echo with --backend epoll; the port, socket layer and server code
# are the same for both backends.
#
# The program's atomic read-modify-write instructions (lock-prefixed or xchg: a lock's
# acquire and release, reference counts) are counted too, per message: each costs ~20
# cycles however few instructions surround it, which instruction counts do not show. Only
# the program's own code is disassembled (objdump), not libc's or liburing's.
set -u -o pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD=$ROOT/build
SECS=6
LOAD=
MODE=echo
TOP=15
PORT=15900
while [ $# -gt 0 ]; do
    case $1 in
    --build) BUILD=$2; shift ;;
    --secs) SECS=$2; shift ;;
    --load) LOAD=$2; shift ;;
    --mode) MODE=$2; shift ;;
    --top) TOP=$2; shift ;;
    --port) PORT=$2; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "instr_per_msg.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ $# -gt 0 ] || { echo "instr_per_msg.sh: no server command (after --)" >&2; exit 2; }
case $MODE in
echo) : "${LOAD:=-c 100 -s 64 -d 1}" ;;
connrate) : "${LOAD:=-c 64 -s 64}" ;;
*) echo "instr_per_msg.sh: --mode echo or connrate" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "instr_per_msg.sh: valgrind not found" >&2; exit 2; }
BENCH=$BUILD/bin/cport-bench
[ -x "$BENCH" ] || { echo "instr_per_msg.sh: $BENCH not found; build first" >&2; exit 2; }

OUT=$(mktemp -d /tmp/instr_per_msg.XXXXXX)
PIN_S=(taskset -c 0)
PIN_C=(taskset -c 1)
command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ] || { PIN_S=(); PIN_C=(); }

"${PIN_S[@]}" valgrind --tool=callgrind --callgrind-out-file="$OUT/cg.out" --dump-instr=yes \
    "$@" --port "$PORT" >"$OUT/server.log" 2>&1 &
VPID=$!
trap 'kill -INT $VPID 2>/dev/null' EXIT
for _ in $(seq 1 200); do
    awk -v h="$(printf '%04X' "$PORT")" '$4 == "0A" { n = split($2, a, ":"); if (a[n] == h) f = 1 }
        END { exit !f }' /proc/net/tcp 2>/dev/null && break
    kill -0 $VPID 2>/dev/null || break
    sleep 0.1
done
read -r -a load <<<"$LOAD"
"${PIN_C[@]}" "$BENCH" "$MODE" "${load[@]}" -w 0 -T "$SECS" --port "$PORT" >"$OUT/bench.out" 2>&1
kill -INT $VPID
wait $VPID 2>/dev/null
trap - EXIT
key=total_msgs
[ "$MODE" = connrate ] && key=total_connections
msgs=$(grep '^RESULT' "$OUT/bench.out" | tr ' ' '\n' | sed -n "s/^$key=//p")
ir=$(callgrind_annotate "$OUT/cg.out" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
if [ -z "$msgs" ] || [ "$msgs" = 0 ] || [ -z "$ir" ]; then
    echo "instr_per_msg.sh: no result (see $OUT)" >&2
    exit 1
fi
echo "# $* under: cport-bench $MODE $LOAD -T $SECS"
awk -v i="$ir" -v m="$msgs" 'BEGIN { printf "messages %d, instructions %d, per message %.0f\n", m, i, i / m }'
echo "# top functions (instructions per message, self):"
callgrind_annotate --auto=no "$OUT/cg.out" 2>/dev/null | awk -v m="$msgs" -v top="$TOP" '
    /PROGRAM TOTALS/ { next }
    /^ *[0-9,]+ +\( *[0-9.]+%\) +[^ ]+:/ && n < top {
        x = $1; gsub(",", "", x); sub(/^ *[^ ]+ +\([^)]*\) +/, ""); printf "%8.1f  %s\n", x / m, $0; n++ }'
# Atomics: the addresses of the program's lock-prefixed and xchg instructions, then the
# times callgrind counted each executing (its cost lines: address, line, count; addresses
# may be relative to the previous line; a line after calls= is a call's inclusive cost).
PROG=$(realpath "$(command -v "$1")")
objdump -d --no-show-raw-insn "$PROG" | awk '
    /^[0-9a-f]+ <.*>:$/ { fn = substr($2, 2, length($2) - 3) }
    /^ +[0-9a-f]+:	(lock |xchg )/ { a = $1; sub(":", "", a); print a, fn }' >"$OUT/atomics.txt"
awk -v m="$msgs" -v prog="$PROG" -v top="$TOP" '
    function hex(s,   i, c, v) { v = 0; s = tolower(s); sub(/^0x/, "", s)
        for (i = 1; i <= length(s); i++) { c = index("0123456789abcdef", substr(s, i, 1)) - 1; v = v * 16 + c }
        return v }
    FNR == NR { at[hex($1)] = $2; next }
    /^c?ob=\([0-9]+\) / { id = $1; sub(/^c?ob=/, "", id); name[id] = $2 }
    /^ob=/ { id = $1; sub(/^ob=/, "", id); mine = (name[id] == prog); next }
    /^calls=/ { skip = 1; next }
    /^(0x[0-9a-f]+|[-+][0-9]+|\*)( |$)/ {
        if ($1 ~ /^0x/) addr = hex($1); else if ($1 != "*") addr += $1
        if (skip) { skip = 0; next }
        if (mine && (addr in at)) { n[at[addr]] += $3; total += $3 }
    }
    END {
        printf "atomic instructions (lock, xchg) per message: %.2f\n", total / m
        for (f in n) printf "%8.2f  %s\n", n[f] / m, f | "sort -rn | head -" top
    }' "$OUT/atomics.txt" "$OUT/cg.out"
echo "# raw data: $OUT"
