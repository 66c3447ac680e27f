#!/usr/bin/env bash
# `make bench-worker`: the worker benchmark on the test bed's broker (noop worker vs a bare rdkafka consumer on a
# 12-partition 2M × 100 B topic, a 20 ms HTTP handler with key ordering and concurrency 256, RSS while draining).
# Driver: worker/benches/worker.rs. Writes its block of docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
e2e/testbed/install-deps.sh
e2e/testbed/up.sh
cargo build --release -p kpipe-worker
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); date: $(date -u +%FT%TZ); load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== command: cargo bench -p kpipe-worker --bench worker"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo bench -p kpipe-worker --bench worker | tee "$out"
{ echo '```'; grep -v '^running\|^test result\|^$\|^     Running' "$out"; echo '```'; } \
  | e2e/bench/record.sh worker "Worker: noop vs bare rdkafka, 20 ms handler, memory" "make bench-worker"
