#!/usr/bin/env bash
# Reports each test-bed component: process alive, health endpoint, and where its log is.
# Exit code 0 only when every component is up and healthy.
source "$(dirname "$0")/lib.sh"
bad=0
row() { printf '%-24s %-8s %s\n' "$1" "$2" "$3"; }
check() {
  local name=$1 match=$2 fn=$3 pid="-"
  [ -f "$(pidfile "$name")" ] && pid=$(cat "$(pidfile "$name")")
  if ! alive "$name" "$match"; then
    row "$name" DOWN "not running (log: $KPIPE_RUN/logs/$name.log)"; bad=1
  elif ! "$fn"; then
    row "$name" UNHEALTHY "pid $pid, health check failed (log: $KPIPE_RUN/logs/$name.log)"; bad=1
  else
    row "$name" UP "pid $pid"
  fi
}
echo "run dir: $KPIPE_RUN   cache: $KPIPE_CACHE"
if bridge_healthy; then row "bridge $KPIPE_BRIDGE" UP "$KPIPE_BRIDGE_IP/$KPIPE_POD_PREFIX_LEN"; else row "bridge $KPIPE_BRIDGE" DOWN "-"; bad=1; fi
check etcd etcd etcd_healthy
check kube-apiserver kube-apiserver apiserver_healthy
check kube-controller-manager kube-controller-manager kcm_healthy
check kafka kafka.Kafka kafka_healthy
check oidc kpipe-test-oidc oidc_healthy
check kubelet kpipe-kubelet kubelet_healthy
if [ "$bad" = 0 ]; then
  v=$("$K8S_BIN/kubectl" --kubeconfig "$KPIPE_RUN/admin.kubeconfig" version -o json 2>/dev/null | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p' | tail -1)
  pods=$("$K8S_BIN/kubectl" --kubeconfig "$KPIPE_RUN/admin.kubeconfig" get pods -A --no-headers 2>/dev/null | wc -l)
  echo "apiserver $v, kafka ${KPIPE_BRIDGE_IP}:$KAFKA_PORT, $pods pods, netns: $(ip netns list 2>/dev/null | grep -c '^kpipe-' || true)"
  echo "env file: $KPIPE_RUN/env"
else
  echo "test bed is NOT fully up (run e2e/testbed/up.sh)"
fi
exit "$bad"
