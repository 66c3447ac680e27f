#!/usr/bin/env bash
# `make bench-peers`: kpipe-worker side by side with kcat, Kafka's ConsumerPerformance, the seed-style sarama consumer
# and franz-go (throughput on 2M × 100 B, 1M × 1 KiB of padded ids and 1M × 1 KiB of JSON-like text), and kpipe's
# ordering modes vs the seed-style worker pool on a 20 ms HTTP handler. Driver: worker/benches/peers.rs. Writes its
# block of docs/BENCHMARKS.md.
# Knobs: KPIPE_BENCH_ROUNDS (3), KPIPE_BENCH_RECORDS (2000000), KPIPE_BENCH_RECORDS_1K (1000000),
# KPIPE_BENCH_RECORDS_1K_TEXT (1000000),
# KPIPE_BENCH_SLOW_RECORDS (200000), KPIPE_BENCH_SLOW_SECONDS (10), KPIPE_BENCH_ONLY (throughput|slow).
set -euo pipefail
cd "$(dirname "$0")/../.."
e2e/testbed/install-deps.sh kcat
e2e/testbed/up.sh
run=${KPIPE_RUN:-${XDG_CACHE_HOME:-$HOME/.cache}/kpipe/run}
export KPIPE_PEERS_BIN="$run/bench/peers-bin" KPIPE_BENCH_BUILD="$run/bench/go-peers"
e2e/bench/build-peers.sh "$KPIPE_PEERS_BIN"
cargo build --release -p kpipe-worker
report=$(mktemp)
trap 'rm -f "$report"' EXIT
echo "== command: cargo bench -p kpipe-worker --bench peers"
KPIPE_BENCH_REPORT="$report" cargo bench -p kpipe-worker --bench peers
e2e/bench/record.sh peers "Side by side: kpipe-worker vs kcat, ConsumerPerformance, sarama (seed), franz-go" \
  "make bench-peers (e2e/bench/peers.sh → cargo bench -p kpipe-worker --bench peers)" <"$report"
