#!/usr/bin/env bash
# Builds/fetches every cached test-bed component that is missing (Kafka jars, etcd, helm, Kubernetes), in parallel,
# with prefixed progress on stderr and full logs in $KPIPE_CACHE/build-logs. Prints the cold build time.
# Idempotent: each step returns at once when its cache entry is complete.
source "$(dirname "$0")/lib.sh"
blogs="$KPIPE_CACHE/build-logs"
mkdir -p "$blogs"
log "building missing components into $KPIPE_CACHE in parallel (full logs in $blogs)"
tb=$(date +%s)
jobs_=()
for s in fetch-kafka build-etcd build-helm build-k8s; do
  (
    set +o pipefail
    "$TESTBED_DIR/$s.sh" 2>&1 | tee "$blogs/$s.log" | grep --line-buffered -v '^go: downloading' | sed -u "s/^/  [$s] /" >&2
    exit "${PIPESTATUS[0]}"
  ) &
  jobs_+=("$!:$s")
done
failed=""
for j in "${jobs_[@]}"; do
  if wait "${j%%:*}"; then log "${j#*:} finished after $(( $(date +%s) - tb ))s"; else failed="$failed ${j#*:}"; fi
done
[ -z "$failed" ] || die "build failed:$failed (see $blogs/<step>.log)"
log "COLD BUILD TIME: $(( $(date +%s) - tb ))s for the missing components (cached from now on)"
