#!/usr/bin/env bash
# Valgrind leak check of the examples and servers: each runs under valgrind (epoll backend:
# valgrind does not model io_uring's shared rings), serves a short verified echo load from
# cport-bench, gets SIGTERM, and must exit 0 with no leak and no error. cport-echo also
# serves one scrape of its --stats-port (a second cp_server in the same process). The proxy
# (examples/proxy.c) runs in front of a cport-echo of its own (not under valgrind), and the
# load goes through it.
# The chat example gets a load of its own (below).
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
# The chat example: 4 clients each send 1500 framed messages (about 1 KiB each, 1.5 MB)
# while reading everything the others send, a fifth never reads (dropped once its queue
# passes --queue-limit: reset), and clients join and leave meanwhile. Each reading client
# must get its welcome and then exactly the others' relayed frames (by byte count: the
# test suite checks the content); then SIGTERM.
chat_frames() { # client number -> its messages, framed, on stdout
  local i=$1 k n body
  body=$(printf 'chat%.0s' $(seq 1 600)) # 2400 bytes to cut the messages from
  for ((k = 0; k < 1500; k++)); do
    n=$((500 + (k * 37 + i * 11) % 1000))
    printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x' $((n >> 24)) $((n >> 16 & 255)) \
      $((n >> 8 & 255)) $((n & 255)))%s" "${body:0:n}"
  done
}
echo "--- chat under load"
CPORT_BACKEND=epoll "${vg[@]}" "$bin/chat" --port 0 --bind 127.0.0.1 --threads 2 --backend epoll \
  --queue-limit 262144 >"$log/chat.out" 2>"$log/chat.err" &
pid=$!
port=""
for _ in $(seq 1 300); do
  port=$(grep -oE 'listening on 127.0.0.1:[0-9]+' "$log/chat.out" 2>/dev/null | grep -oE '[0-9]+$')
  [ -n "$port" ] && break
  kill -0 $pid 2>/dev/null || break
  sleep 0.1
done
if [ -z "$port" ]; then
  echo "chat did not start"; cat "$log/chat.err"; kill $pid 2>/dev/null; wait $pid; fail=1
else
  fds=() readers=() senders=()
  for i in 0 1 2 3 4; do
    [ $i -lt 4 ] && chat_frames $i >"$log/tx.$i"
    exec {fd}<>"/dev/tcp/127.0.0.1/$port"
    fds+=("$fd")
    # Its welcome (12 bytes) first: it is in the room before anyone talks.
    timeout 60 head -c 12 <&"$fd" >/dev/null
  done
  for i in 0 1 2 3; do
    want=0 # (the welcome is read)
    for j in 0 1 2 3; do
      [ $j -ne $i ] && want=$((want + $(stat -c %s "$log/tx.$j") + 4 * 1500))
    done
    echo $want >"$log/want.$i"
    timeout 300 head -c "$want" <&"${fds[$i]}" >"$log/rx.$i" &
    readers+=($!)
  done
  for i in 0 1 2 3; do
    cat "$log/tx.$i" >&"${fds[$i]}" &
    senders+=($!)
  done
  for _ in $(seq 1 20); do # joins and leaves during the traffic
    exec {c}<>"/dev/tcp/127.0.0.1/$port"
    exec {c}>&-
  done
  wait "${senders[@]}"
  for i in 0 1 2 3; do
    wait "${readers[$i]}"
    got=$(stat -c %s "$log/rx.$i") want=$(cat "$log/want.$i")
    if [ "$got" != "$want" ]; then
      echo "chat client $i got $got bytes of relayed frames, expected $want"; fail=1
    fi
  done
  for fd in "${fds[@]}"; do exec {fd}>&-; done
  kill -TERM $pid
  for _ in $(seq 1 1200); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done
  if kill -0 $pid 2>/dev/null; then
    echo "chat did not exit within 120 s of SIGTERM"; kill -KILL $pid 2>/dev/null; fail=1
  fi
  wait $pid; rc=$?
  if ((rc != 0)); then
    echo "chat exited $rc under valgrind:"; cat "$log/chat.err"; fail=1
  elif ! grep -q ' dropped=1 ' "$log/chat.out"; then
    echo "chat did not drop the client that never reads:"; cat "$log/chat.out"; fail=1
  fi
fi
rm -rf "$log"
exit $fail
