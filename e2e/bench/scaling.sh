#!/usr/bin/env bash
# `make bench-scaling`: autoscaling, two ways. (1) The trace simulation of kpipe's scaling policy vs a model of
# KEDA's Kafka scaler + HPA defaults (deterministic: replica-seconds, worst lag, replica changes). (2) On the test
# bed: backlog → Deployment replicas changed, → first pod Ready, → first record delivered, for the default and a
# short pollInterval. Writes its blocks of docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
e2e/testbed/install-deps.sh
sim=$(mktemp) bed=$(mktemp)
trap 'rm -f "$sim" "$bed"' EXIT
echo "== command: cargo test -p kpipe-operator --test trace_simulation -- --nocapture --test-threads 1"
cargo test -p kpipe-operator --test trace_simulation -- --nocapture --test-threads 1 | tee "$sim"
{
  echo "World and KEDA+HPA model: see operator/src/sim.rs. Raw output:"
  echo
  echo '```'
  grep -v '^running\|^test result\|^$\|^     Running' "$sim"
  echo '```'
} | e2e/bench/record.sh sim "Autoscaling: trace simulation, kpipe vs KEDA+HPA defaults" \
  "cargo test -p kpipe-operator --test trace_simulation -- --nocapture --test-threads 1"

e2e/testbed/up.sh
cargo build --release -p kpipe-operator -p kpipe-worker -p kpipe-e2e
echo "== command: cargo test -p kpipe-e2e --release --test bench_scaling -- --ignored --nocapture"
KPIPE_BENCH_REPORT="$bed" cargo test -p kpipe-e2e --release --test bench_scaling -- --ignored --nocapture
e2e/bench/record.sh scaling "Autoscaling on the test bed: scale from zero" \
  "make bench-scaling (cargo test -p kpipe-e2e --release --test bench_scaling -- --ignored --nocapture)" <"$bed"
