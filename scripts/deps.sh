#!/usr/bin/env bash
# Install what cport needs to build, test and benchmark on a fresh Debian 12 machine.
# Installs only what is missing; uses sudo when not root.
set -euo pipefail
pkgs=(cmake gcc clang make pkg-config liburing-dev valgrind libclang-rt-14-dev
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
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
  # Debian starts nginx on install; cport's benchmark starts its own instance when needed.
  if [[ " ${missing[*]} " == *" nginx-light "* ]]; then
    $SUDO systemctl stop nginx 2>/dev/null || $SUDO service nginx stop 2>/dev/null || true
  fi
fi
