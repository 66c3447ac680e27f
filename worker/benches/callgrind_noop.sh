#!/bin/bash
# Instruction count of a noop kpipe-worker draining a topic (docs/BENCHMARKS.md, "Instruction counts of the noop poll
# path"). Instruction counts do not depend on the machine's load, unlike the wall-clock benches.
#
# usage: worker/benches/callgrind_noop.sh <kpipe-worker binary> <topic> <records> [cg|plain]
#   cg (default): runs the worker under `valgrind --tool=callgrind`, prints the total instructions and leaves the
#                 profile in $OUT_DIR/callgrind.<label>.out (inspect with `callgrind_annotate --inclusive=yes`);
#   plain:        runs it natively and prints the drain time and the process's CPU seconds.
# The topic must already hold <records> records; each run reads it in a fresh consumer group with a noop spec and is
# stopped with SIGTERM once kpipe_worker_records_processed_total reaches <records>.
# Needs the bed's Kafka: `set -a; . ~/.cache/kpipe/run/env; set +a`.
# PROCESSOR (JSON, default {"noop": {}}) and CONCURRENCY (JSON, default: the CRD's) profile another processor, e.g.
# PROCESSOR='{"kafka": {"topic": "out"}}' CONCURRENCY='{"perPartition": 1024, "perWorker": 8192}' for the forwarder.
set -euo pipefail
BIN=$1 TOPIC=$2 N=$3 MODE=${4:-cg}
PROCESSOR=${PROCESSOR:-'{"noop": {}}'}
CONCURRENCY=${CONCURRENCY:+"\"concurrency\": $CONCURRENCY, "}
OUT_DIR=${OUT_DIR:-/tmp/kpipe-callgrind}
mkdir -p "$OUT_DIR"
LABEL=$(basename "$BIN")-$(date +%s%N)
PORT=$((20000 + RANDOM % 20000))
CFG=$OUT_DIR/$LABEL.json
cat > "$CFG" <<JSON
{"groupId": "callgrind-$LABEL", "namespace": "bench", "pipeline": "callgrind",
 "spec": {"processor": $PROCESSOR, $CONCURRENCY"onFailure": "drop",
          "source": {"bootstrapServers": ["$KAFKA_BOOTSTRAP"], "topics": ["$TOPIC"],
                     "config": {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}}}}
JSON
export KPIPE_CONFIG=$CFG KPIPE_LISTEN=127.0.0.1:$PORT KPIPE_SHUTDOWN_TIMEOUT=10s KPIPE_COMMIT_INTERVAL=200ms \
  KPIPE_POD_NAME=callgrind RUST_LOG=warn
START=$(date +%s.%N)
if [ "$MODE" = cg ]; then
  valgrind --tool=callgrind --callgrind-out-file="$OUT_DIR/callgrind.$LABEL.out" "$BIN" > "$OUT_DIR/$LABEL.log" 2>&1 &
else
  "$BIN" > "$OUT_DIR/$LABEL.log" 2>&1 &
fi
PID=$!
while :; do
  done_n=$(curl -s "127.0.0.1:$PORT/metrics" 2>/dev/null | awk '/^kpipe_worker_records_processed_total/ {print $2}' || true)
  if [ -n "$done_n" ] && [ "${done_n%.*}" -ge "$N" ]; then break; fi
  if ! kill -0 "$PID" 2>/dev/null; then echo "the worker exited; log: $OUT_DIR/$LABEL.log" >&2; exit 1; fi
  sleep 0.05
done
END=$(date +%s.%N)
CPU=$(awk '{print ($14 + $15) / 100}' "/proc/$PID/stat")
kill -TERM "$PID"
wait "$PID" || true
if [ "$MODE" = cg ]; then
  echo "$LABEL instructions=$(awk '/^totals:/ {print $2}' "$OUT_DIR/callgrind.$LABEL.out") per_record=$(awk -v n="$N" '/^totals:/ {printf "%.0f", $2 / n}' "$OUT_DIR/callgrind.$LABEL.out")"
else
  echo "$LABEL drain_s=$(echo "$END - $START" | bc) cpu_s=$CPU"
fi
