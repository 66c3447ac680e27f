#!/usr/bin/env bash
# Installs the Debian packages kpipe's builds and test bed need, when they are missing (idempotent, quick when
# everything is there). libcurl's headers are only needed by builds without rdkafka's `curl-static` feature (kpipe's
# builds compile curl-sys's bundled curl; librdkafka's CMake includes curl/curl.h either way). Extra package names
# given as arguments are installed too (the benchmarks ask for kcat). `prometheus` brings promtool, which tests the
# chart's alert rules (e2e/tests/alerts.rs; the Debian package also ships a systemd unit, which this script never
# starts). `valgrind` runs the leak check of worker/rdkafka-native (tests/fetch_queue.rs).
set -euo pipefail
packages=(libcurl4-openssl-dev openssl iproute2 curl procps prometheus valgrind "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep "install ok installed" >/dev/null || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "[deps] installing Debian packages: ${missing[*]}" >&2
if [ "$(id -u)" != 0 ]; then
  echo "[deps] ERROR: need root to apt-get install ${missing[*]} (or install them yourself)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || { echo "[deps] ERROR: apt-get update failed" >&2; exit 1; }
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
  || { echo "[deps] ERROR: apt-get install ${missing[*]} failed" >&2; exit 1; }
