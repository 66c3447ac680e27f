#!/usr/bin/env bash
# `make bench-operator`: N ConsumerPipelines (default 1000, KPIPE_BENCH_PIPELINES) against the test bed's single broker.
# Reports: time until all are Ready, steady-state operator RSS, TCP connections the operator holds to the broker, and
# the reaction time from a backlog to a changed Deployment replica count. Writes its block of docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
e2e/testbed/install-deps.sh
e2e/testbed/up.sh
cargo build --release -p kpipe-operator -p kpipe-worker
echo "== machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r); date: $(date -u +%FT%TZ)"
echo "== command: cargo test -p kpipe-operator --release --test bench_operator -- --ignored --nocapture"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
cargo test -p kpipe-operator --release --test bench_operator -- --ignored --nocapture --test-threads 1 | tee "$out"
{ echo '```'; grep -v '^running\|^test result\|^$\|^     Running' "$out"; echo '```'; } \
  | e2e/bench/record.sh operator "Operator: 1,000 pipelines, RSS, connections, reaction" "make bench-operator"
