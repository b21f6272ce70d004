#!/usr/bin/env bash
# Valgrind leak check of the examples and servers: each runs under valgrind (epoll backend:
# valgrind does not model io_uring's shared rings), serves a short verified echo load from
# cport-bench, gets SIGTERM, and must exit 0 with no leak and no error. cport-echo also
# serves one scrape of its --stats-port (a second cp_server in the same process). The proxy
# (examples/proxy.c) runs in front of a cport-echo of its own (not under valgrind), and the
# load goes through it.
# Usage: scripts/valgrind.sh BUILD_DIR
set -uo pipefail
bin=${1:-build}/bin
log=$(mktemp -d)
fail=0
vg=(valgrind -q --leak-check=full --errors-for-leak-kinds=definite,indirect,possible
    --error-exitcode=99 --trace-children=no)

echo "--- pool_vs_naive --quick"
if ! "${vg[@]}" "$bin/pool_vs_naive" --quick >"$log/pool.out" 2>"$log/pool.err"; then
  cat "$log/pool.err"; fail=1
fi

# The port a server printed in its "listening on" line ($1: its log; $2: its pid).
listen_port() {
  local p=""
  for _ in $(seq 1 300); do   # valgrind starts slowly: up to 30 s
    p=$(grep -oE 'listening on 127.0.0.1:[0-9]+' "$1" 2>/dev/null | grep -oE '[0-9]+$' | head -1)
    [ -n "$p" ] && break
    kill -0 "$2" 2>/dev/null || break
    sleep 0.1
  done
  echo "$p"
}

# The proxy's upstream ends with its proxy.
stop_upstream() {
  [ -n "$upid" ] || return 0
  kill -TERM $upid; wait $upid; local rc=$?
  if ((rc != 0)); then echo "the proxy's upstream exited $rc"; cat "$log/upstream.err"; fail=1; fi
  upid=""
}

upid=""
for srv in echo_raw iocp_style cport-echo proxy; do
  echo "--- $srv under load"
  extra=()
  [ "$srv" = cport-echo ] && extra=(--stats-port 0)
  if [ "$srv" = proxy ]; then
    "$bin/cport-echo" --port 0 --bind 127.0.0.1 --threads 2 --backend epoll \
      >"$log/upstream.out" 2>"$log/upstream.err" &
    upid=$!
    uport=$(listen_port "$log/upstream.out" $upid)
    if [ -z "$uport" ]; then
      echo "the proxy's upstream did not start"; cat "$log/upstream.err"; kill $upid 2>/dev/null
      wait $upid; upid=""; fail=1; continue
    fi
    extra=(--upstream "127.0.0.1:$uport")
  fi
  CPORT_BACKEND=epoll "${vg[@]}" "$bin/$srv" --port 0 --bind 127.0.0.1 --threads 2 --backend epoll "${extra[@]}" \
    >"$log/$srv.out" 2>"$log/$srv.err" &
  pid=$!
  port=""
  for _ in $(seq 1 300); do   # valgrind starts slowly: up to 30 s
    port=$(grep -oE 'listening on 127.0.0.1:[0-9]+' "$log/$srv.out" "$log/$srv.err" 2>/dev/null |
           grep -oE '[0-9]+$' | head -1)
    [ -n "$port" ] && break
    kill -0 $pid 2>/dev/null || break
    sleep 0.1
  done
  if [ -z "$port" ]; then
    echo "$srv did not start"; cat "$log/$srv.err"; kill $pid 2>/dev/null; wait $pid; fail=1
    stop_upstream; continue
  fi
  if ! "$bin/cport-bench" echo --port "$port" -c 20 -s 1k -d 4 -T 2 -w 0 >"$log/bench.out" 2>&1; then
    echo "load against $srv failed:"; cat "$log/bench.out"; fail=1
  fi
  if [ "$srv" = cport-echo ]; then
    sport=$(grep -oE 'stats on 127.0.0.1:[0-9]+' "$log/$srv.out" | grep -oE '[0-9]+$')
    if ! exec 3<>"/dev/tcp/127.0.0.1/$sport"; then
      echo "no stats port"; fail=1
    else
      printf 'GET / HTTP/1.1\r\nHost: x\r\n\r\n' >&3
      if ! timeout 30 cat <&3 | grep -q '^cport_echo_bytes_received_total '; then
        echo "the stats scrape failed"; fail=1
      fi
      exec 3<&-
    fi
  fi
  kill -TERM $pid
  # A server that hangs under valgrind must fail the run, not hold CI until its time limit.
  for _ in $(seq 1 1200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if kill -0 $pid 2>/dev/null; then
    echo "$srv did not exit within 120 s of SIGTERM"; kill -KILL $pid 2>/dev/null; fail=1
  fi
  wait $pid; rc=$?
  if ((rc != 0)); then
    echo "$srv exited $rc under valgrind:"; cat "$log/$srv.err"; fail=1
  fi
  stop_upstream
done
rm -rf "$log"
exit $fail
