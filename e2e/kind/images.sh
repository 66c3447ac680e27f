#!/usr/bin/env bash
# Builds the kpipe container images with Docker (`make images`). Tags match the chart's defaults
# (kpipe/operator:<appVersion>, kpipe/worker:<appVersion>).
set -euo pipefail
cd "$(dirname "$0")/../.."
command -v docker >/dev/null || { echo "make images needs a Docker engine (docker CLI not found)" >&2; exit 1; }
docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine ('docker info' failed)" >&2; exit 1; }
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kpipe/Chart.yaml)
for component in operator worker; do
  echo "building kpipe/$component:$version"
  docker build -f "$component/Dockerfile" -t "kpipe/$component:$version" .
done
