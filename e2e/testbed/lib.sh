#!/usr/bin/env bash
# Shared helpers for the test-bed scripts. Source it; do not execute it.
# (Variables defined here are used by the scripts that source this file.)
# shellcheck disable=SC2034
set -euo pipefail
TESTBED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$TESTBED_DIR/../.." && pwd)
# shellcheck source=versions.env
source "$TESTBED_DIR/versions.env"
KPIPE_CACHE=${KPIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kpipe}
K8S_BIN="$KPIPE_CACHE/k8s-$K8S_VERSION/bin"
ETCD_BIN="$KPIPE_CACHE/etcd-$ETCD_VERSION/bin"
HELM_BIN="$KPIPE_CACHE/helm-$HELM_VERSION/bin"
KAFKA_HOME="$KPIPE_CACHE/kafka-$KAFKA_VERSION"
# Where a running bed keeps its state (PKI, data, logs, kubeconfig, pids).
KPIPE_RUN=${KPIPE_RUN:-${KPIPE_CACHE}/run}

# Network of the bed: one Linux bridge; the host side owns the first address, every pod gets its own
# network namespace with a veth into the bridge. Kafka and the kube-apiserver listen on the bridge address
# so that both the host and the pods reach them at the same address.
KPIPE_BRIDGE=${KPIPE_BRIDGE:-kpipe0}
KPIPE_BRIDGE_IP=${KPIPE_BRIDGE_IP:-10.244.0.1}
KPIPE_POD_PREFIX_LEN=24
KPIPE_NODE=${KPIPE_NODE:-kpipe-node}
ETCD_PORT=${ETCD_PORT:-2379}
APISERVER_PORT=${APISERVER_PORT:-6443}
KAFKA_PORT=${KAFKA_PORT:-9092}
KAFKA_CONTROLLER_PORT=${KAFKA_CONTROLLER_PORT:-9093}
# Secured listeners of the bed's broker (e2e/testbed/kafka-security.sh): SASL_SSL + SCRAM-SHA-512, SSL + mTLS.
KAFKA_SCRAM_PORT=${KAFKA_SCRAM_PORT:-9094}
KAFKA_MTLS_PORT=${KAFKA_MTLS_PORT:-9095}
# SASL_SSL + OAUTHBEARER listener, and the bed's OIDC issuer (kpipe-test-oidc) whose tokens it accepts.
KAFKA_OAUTH_PORT=${KAFKA_OAUTH_PORT:-9096}
KPIPE_OIDC_PORT=${KPIPE_OIDC_PORT:-9097}

CARGO_TARGET=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
KUBELET_BIN="$CARGO_TARGET/debug/kpipe-kubelet"
OIDC_BIN="$CARGO_TARGET/debug/kpipe-test-oidc"

log() { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "required tool '$1' not found on PATH"; }

# matches <regex>: some line of stdin matches. Reads all of stdin: `grep -q` stops at the first match, and when the
# writer's output spans several writes (a bridge with many service addresses, a JVM's classpath, a jar listing) its
# next write gets SIGPIPE, which `pipefail` turns into a failed pipeline although the line was there.
matches() { grep -e "$1" >/dev/null; }

# The Kafka jars in the cache were resolved from the current e2e/testbed/kafka/pom.xml.
kafka_pom_sum() { sha256sum "$TESTBED_DIR/kafka/pom.xml" | cut -d' ' -f1; }
kafka_current() { [ -f "$KAFKA_HOME/.complete" ] && [ "$(cat "$KAFKA_HOME/.complete")" = "$(kafka_pom_sum)" ]; }

pidfile() { echo "$KPIPE_RUN/pids/$1.pid"; }

# alive <component> <expected substring of /proc/<pid>/cmdline>: the recorded pid still runs that program.
alive() {
  local f pid
  f=$(pidfile "$1")
  [ -f "$f" ] || return 1
  pid=$(cat "$f")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | matches "$2"
}

# Health checks: each returns 0 when the component serves requests.
etcd_healthy() { curl -fsS -m 2 "http://127.0.0.1:$ETCD_PORT/health" 2>/dev/null | matches '"health":"true"'; }
apiserver_healthy() {
  curl -fsS -m 3 --cacert "$KPIPE_RUN/pki/ca.crt" --cert "$KPIPE_RUN/pki/admin.crt" --key "$KPIPE_RUN/pki/admin.key" \
    "https://$KPIPE_BRIDGE_IP:$APISERVER_PORT/readyz" >/dev/null 2>&1
}
kcm_healthy() { curl -fsSk -m 2 "https://127.0.0.1:10257/healthz" >/dev/null 2>&1; }
kafka_healthy() {
  # "ready" = the broker answers a metadata (DescribeCluster) request on its client listener.
  java -Xmx96m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC -Dlog4j2.configurationFile="file:$KPIPE_RUN/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_HOME/libs/*" org.apache.kafka.tools.ClusterTool cluster-id \
    --bootstrap-server "$KPIPE_BRIDGE_IP:$KAFKA_PORT" >/dev/null 2>&1
}
kubelet_healthy() {
  [ -x "$K8S_BIN/kubectl" ] || return 1
  # The running kubelet wrote its pid after registering the node (a stale Ready condition in etcd is not enough).
  [ -f "$KPIPE_RUN/kubelet.ready" ] && [ "$(cat "$KPIPE_RUN/kubelet.ready")" = "$(cat "$(pidfile kubelet)" 2>/dev/null)" ] || return 1
  [ "$("$K8S_BIN/kubectl" --kubeconfig "$KPIPE_RUN/admin.kubeconfig" get node "$KPIPE_NODE" \
      -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = "True" ]
}
oidc_healthy() { curl -fsS -m 2 "http://$KPIPE_BRIDGE_IP:$KPIPE_OIDC_PORT/.well-known/openid-configuration" >/dev/null 2>&1; }
bridge_healthy() { ip -4 addr show dev "$KPIPE_BRIDGE" 2>/dev/null | matches "inet $KPIPE_BRIDGE_IP/"; }
