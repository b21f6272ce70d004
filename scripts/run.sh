#!/usr/bin/env bash
# Install what is missing, build cport (all of build/bin), and run the echo server on port 5050
# (until SIGINT/SIGTERM). Extra arguments go to cport-echo (see build/bin/cport-echo --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)"
exec build/bin/cport-echo --port 5050 "$@"
