#!/usr/bin/env bash
# Stops the local test bed: the kubelet first (it kills its pod processes), then Kafka, the controller-manager,
# the apiserver and etcd; then removes leftover pod processes, pod network namespaces, veths and the bridge.
# State (PKI, etcd and Kafka data, logs) stays in $KPIPE_RUN so the next up.sh is warm;
# `down.sh --purge` deletes the run directory too.
source "$(dirname "$0")/lib.sh"
purge=0
# One up/down at a time (several engineers and test runs share one bed).
mkdir -p "$KPIPE_CACHE"
exec 9>"$KPIPE_CACHE/testbed.lock"
flock -w 900 9 || die "another e2e/testbed/up.sh or down.sh holds $KPIPE_CACHE/testbed.lock"
[ "${1:-}" = "--purge" ] && purge=1

stop() {
  local name=$1 match=$2 grace=${3:-15} pid i
  if alive "$name" "$match"; then
    pid=$(cat "$(pidfile "$name")")
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
      alive "$name" "$match" || break
      sleep 0.1
    done
    if alive "$name" "$match"; then
      log "$name did not stop within ${grace}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.2
    fi
  fi
  rm -f "$(pidfile "$name")"
}

stop kubelet kpipe-kubelet 30
# Pod processes the kubelet could not stop (e.g. it was SIGKILLed): their process groups are recorded per container.
if [ -d "$KPIPE_RUN/pods" ]; then
  for f in "$KPIPE_RUN"/pods/*/*.pid; do
    [ -f "$f" ] || continue
    pgid=$(cat "$f")
    if [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; then
      log "killing leftover pod process group $pgid ($f)"
      kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
fi
stop kafka kafka.Kafka 30
stop oidc kpipe-test-oidc 10
stop kube-controller-manager kube-controller-manager 10
stop kube-apiserver kube-apiserver 15
stop etcd etcd 10
# Copies of bed components the pid files do not track (e.g. started twice by an older up.sh): left running they hold
# ports and would run every pod a second time. Only processes of this run directory are touched.
for match in kpipe-kubelet kafka.Kafka kpipe-test-oidc kube-controller-manager kube-apiserver etcd; do
  for pid in $(pgrep -f -- "$match" || true); do
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | matches "$KPIPE_RUN" || continue
    log "killing untracked $match (pid $pid)"
    kill -KILL "$pid" 2>/dev/null || true
  done
done

# Network: per-pod namespaces are named kpipe-<uid>; host veth ends are kv<uid> (they vanish with the namespace).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^kpipe-' || true); do
  ip netns del "$ns" 2>/dev/null || true
done
for v in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep '^kv' || true); do
  ip link del "$v" 2>/dev/null || true
done
if ip link show "$KPIPE_BRIDGE" >/dev/null 2>&1; then
  log "removing bridge $KPIPE_BRIDGE"
  ip link del "$KPIPE_BRIDGE" || true
fi
rm -f "$KPIPE_RUN/env"
if [ "$purge" = 1 ]; then
  log "purging $KPIPE_RUN"
  rm -rf "$KPIPE_RUN"
fi
log "test bed down"
