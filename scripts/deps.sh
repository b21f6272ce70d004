#!/usr/bin/env bash
# Install what cport needs to build, test and benchmark on a fresh Debian 12 machine.
# Installs only what is missing; uses sudo when not root.
set -euo pipefail
# clang-format: scripts/test.sh's format step (its CMake target exists only when found).
pkgs=(cmake gcc clang clang-format make pkg-config liburing-dev valgrind libclang-rt-14-dev
      util-linux procps iproute2 nginx-light wrk curl)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # (through sudo, the variable must be on sudo's command line: sudo resets the environment)
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Debian starts nginx on install; cport's benchmark starts its own instance when needed.
  if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
    $SUDO systemctl stop nginx 2>/dev/null || $SUDO service nginx stop 2>/dev/null || true
  fi
fi
