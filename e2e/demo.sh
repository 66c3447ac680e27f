#!/usr/bin/env bash
# `make demo`: kpipe's main job on the built-in local stack.
# Brings up the local test bed (building what is missing), installs the chart, deploys an HTTP sink, applies a
# pipeline (minReplicas 0), produces a burst and shows live progress — replicas, lag, throughput, delivered —
# until the workers have scaled back to zero. Then prints where to look and how to tear down.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
RECORDS=${KPIPE_DEMO_RECORDS:-100000}
PARTITIONS=${KPIPE_DEMO_PARTITIONS:-12}
NS=kpipe-demo
SYSTEM_NS=kpipe-system
TOPIC=demo-orders
bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }
step() { bold "==> $*"; }

step "1/6 local stack: etcd, kube-apiserver, controller-manager, Kafka, process kubelet (cached build on first run)"
e2e/testbed/up.sh
set -a; source "${KPIPE_RUN:-${XDG_CACHE_HOME:-$HOME/.cache}/kpipe/run}/env"; set +a
k() { "$KUBECTL" --kubeconfig "$KUBECONFIG" "$@"; }

step "2/6 building kpipe (operator and worker release binaries; the bed maps kpipe/* images to them)"
cargo build --release -p kpipe-operator -p kpipe-worker
cargo build -p kpipe-e2e --bins

step "3/6 helm install kpipe into $SYSTEM_NS"
# A CRD left by earlier test runs on this bed is adopted by the release (Helm's ownership labels/annotations).
for crd in consumerpipelines.kpipe.io deadletterreplays.kpipe.io; do
  if k get crd "$crd" >/dev/null 2>&1; then
    k label crd "$crd" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
    k annotate crd "$crd" meta.helm.sh/release-name=kpipe meta.helm.sh/release-namespace="$SYSTEM_NS" \
      --overwrite >/dev/null
  fi
done
"$HELM" upgrade --install kpipe charts/kpipe --namespace "$SYSTEM_NS" --create-namespace \
  --set logging.format=text --wait --timeout 180s
k -n "$SYSTEM_NS" get pods -o wide

step "4/6 topic $TOPIC ($PARTITIONS partitions), its dead-letter topic, and an HTTP sink pod"
k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
for t in "$TOPIC:$PARTITIONS" "$TOPIC-dlq:1"; do
  "$KPIPE_BIN/kafka-topics" --bootstrap-server "$KAFKA_BOOTSTRAP" --create --if-not-exists \
    --topic "${t%%:*}" --partitions "${t##*:}" --replication-factor 1 >/dev/null
done
k -n "$NS" apply -f - >/dev/null <<YAML
apiVersion: apps/v1
kind: Deployment
metadata: { name: sink, labels: { app: sink } }
spec:
  replicas: 1
  selector: { matchLabels: { app: sink } }
  template:
    metadata: { labels: { app: sink } }
    spec:
      containers:
        - name: sink
          image: kpipe/test-sink:latest
          args: ["--listen", "0.0.0.0:8080", "--delay-ms", "2"]
          ports: [{ containerPort: 8080, name: http }]
          readinessProbe: { httpGet: { path: /healthz, port: 8080 }, periodSeconds: 1 }
YAML
k -n "$NS" rollout status deploy/sink --timeout=120s
SINK_IP=$(k -n "$NS" get pods -l app=sink -o jsonpath='{.items[0].status.podIP}')
# The local bed has no Service VIPs (no kube-proxy), so the pipeline addresses the sink pod directly.
SINK_URL="http://$SINK_IP:8080/records"

step "5/6 kubectl apply the ConsumerPipeline (scale 0..6 on lag) and produce a burst of $RECORDS records"
k -n "$NS" apply -f - <<YAML
apiVersion: kpipe.io/v1alpha1
kind: ConsumerPipeline
metadata: { name: orders-demo }
spec:
  source: { bootstrapServers: ["$KAFKA_BOOTSTRAP"], topics: [$TOPIC], startOffset: earliest }
  processor: { http: { url: "$SINK_URL", format: json, timeout: 5s } }
  ordering: key
  batch: { maxRecords: 200, maxWait: 20ms }
  onFailure: deadLetter
  deadLetter: { topic: $TOPIC-dlq }
  scaling:
    minReplicas: 0
    maxReplicas: 6
    lagThreshold: 2000
    pollInterval: 2s
    scaleDownStabilization: 15s
    cooldownToZero: 20s
YAML
seq -f "order-%08.0f" 1 "$RECORDS" | KAFKA_TOOL_HEAP=-Xmx256m "$KPIPE_BIN/kafka-console-producer" \
  --bootstrap-server "$KAFKA_BOOTSTRAP" --topic "$TOPIC" --producer-property linger.ms=20 >/dev/null
echo "produced $RECORDS records at $(date +%T)"

step "6/6 watching: replicas follow the lag up, then back to zero (Ctrl-C stops watching; the stack keeps running)"
start=$(date +%s); seen_up=0; prev_delivered=0; prev_t=$start
printf '%-8s %-8s %-8s %-6s %-9s %-12s %-10s %s\n' TIME DESIRED REPLICAS READY LAG DELIVERED REC/S CONDITION
while :; do
  now=$(date +%s)
  json=$(k -n "$NS" get cpl orders-demo -o json 2>/dev/null || echo '{}')
  read -r desired replicas ready lag reason < <(python3 -c '
import json,sys
s=json.load(sys.stdin).get("status",{})
c={x["type"]:x for x in s.get("conditions",[])}
r=c.get("Scaling",{}).get("reason") or c.get("Ready",{}).get("reason") or "-"
print(s.get("desiredReplicas",0), s.get("replicas",0), s.get("readyReplicas",0), (s.get("lag") or {}).get("total","-"), r)' <<<"$json")
  delivered=$(curl -s --max-time 2 "http://$SINK_IP:8080/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["unique"])' 2>/dev/null || echo 0)
  dt=$(( now - prev_t )); rate=$(( dt > 0 ? (delivered - prev_delivered) / dt : 0 ))
  printf '%-8s %-8s %-8s %-6s %-9s %-12s %-10s %s\n' "+$(( now - start ))s" "$desired" "$replicas" "$ready" "$lag" \
    "$delivered/$RECORDS" "$rate" "$reason"
  prev_delivered=$delivered; prev_t=$now
  [ "$replicas" -gt 0 ] 2>/dev/null && seen_up=1
  if [ "$seen_up" = 1 ] && [ "$replicas" = 0 ] && [ "$lag" = 0 ]; then break; fi
  if [ $(( now - start )) -gt "${KPIPE_DEMO_TIMEOUT:-900}" ]; then echo "demo: gave up waiting after ${KPIPE_DEMO_TIMEOUT:-900}s" >&2; exit 1; fi
  sleep 2
done
echo
bold "Done: $delivered of $RECORDS records delivered; the pipeline scaled 0 -> N -> 0 in $(( $(date +%s) - start ))s."
k -n "$NS" get events --field-selector involvedObject.name=orders-demo --sort-by=.lastTimestamp 2>/dev/null | tail -15 || true
# A healthy run raises no Warning Event (a transient state such as a group coordinator being set up is Normal).
warnings=$(k -n "$NS" get events --field-selector involvedObject.name=orders-demo,type=Warning -o name | wc -l)
if [ "$warnings" -gt 0 ]; then
  echo "demo: $warnings Warning Event(s) on the pipeline:" >&2
  k -n "$NS" get events --field-selector involvedObject.name=orders-demo,type=Warning >&2
  exit 1
fi
echo "no Warning Event on the pipeline"
cat <<DONE

Where to look:
  kubectl --kubeconfig $KUBECONFIG -n $NS get cpl -w          # Desired / Replicas / Lag / Ready
  kubectl --kubeconfig $KUBECONFIG -n $NS describe cpl orders-demo
  operator metrics:  curl http://\$(kubectl --kubeconfig $KUBECONFIG -n $SYSTEM_NS get pod -l app.kubernetes.io/name=kpipe-operator -o jsonpath='{.items[0].status.podIP}'):8080/metrics
  Grafana dashboard: charts/kpipe/files/dashboard.json (installed with --set dashboard.enabled=true)
  pod logs:          $KPIPE_POD_LOGS/
Produce more:        seq -f "order-%08.0f" 1 50000 | $KPIPE_BIN/kafka-console-producer --bootstrap-server $KAFKA_BOOTSTRAP --topic $TOPIC
Tear down:           make testbed-down
DONE
