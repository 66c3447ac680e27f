#!/usr/bin/env bash
# `make e2e-kind`: the e2e suites of the local test bed on a real kind cluster (real kubelet, containerd, kube-proxy
# Service networking, CoreDNS, RBAC). Steps:
#   1. a Docker engine: the caller's, else the project's own (e2e/kind/offline/dockerd.sh; no firewall changes);
#   2. offline (the project's engine, or KPIPE_OFFLINE=1): the kind node image built from Debian packages and the Go
#      module proxy (e2e/kind/offline/node-image.sh, cached); online: kind's standard node image;
#   3. `make images` (e2e/kind/images.sh): kpipe/operator, kpipe/worker, the test sinks, kpipe/kafka;
#   4. creates the cluster (or reuses it), loads the images, deploys Kafka (kafka.yaml);
#   5. writes the suites' env file ($KPIPE_RUN/env: kubeconfig, Kafka addresses, images, node) and runs the suites.
# The cluster is kept for the next run (create ~20 s, but reuse is free); `e2e/kind/down.sh` removes it, the
# network and the project's dockerd. Env: KPIPE_KIND_CLUSTER (kpipe-e2e), KPIPE_KIND_SUITES (the --test names),
# KPIPE_KIND_TESTS (extra args for the test binaries, e.g. a test name filter), KPIPE_KIND_DOWN=1 (tear down
# afterwards), KPIPE_KIND_SETUP_ONLY=1 (stop once the cluster and the env file are ready).
# The body is one block, so bash reads all of it before running it (editing the file mid-run cannot derail a run).
{
source "$(dirname "$0")/offline/lib.sh"
cd "$REPO_ROOT"
t0=$(date +%s)
cluster=${KPIPE_KIND_CLUSTER:-kpipe-e2e}
run_dir=${KPIPE_KIND_RUN:-$KPIPE_CACHE/kind-run}
# The suites that run on kind: everything but the process bed's own acceptance tests (testbed.rs checks the process
# kubelet and the bed's scripts) and the benchmark.
suites=${KPIPE_KIND_SUITES:-"api chart pipeline ownership never_strand failure_handling lifecycle"}
mkdir -p "$run_dir"
# Teardown on exit when asked (CI); a teardown that leaves something behind fails the run.
if [ "${KPIPE_KIND_DOWN:-0}" = 1 ]; then trap 'rc=$?; "$KIND_DIR/down.sh" || rc=1; exit $rc' EXIT; fi

use_docker
[ "$KPIPE_OWN_DOCKER" = 1 ] && export KPIPE_OFFLINE=${KPIPE_OFFLINE:-1}
# Tools: kind (PATH, else built from the Go module proxy), kubectl and helm of the bed's pinned versions.
"$TESTBED_DIR/build-k8s.sh"; "$TESTBED_DIR/build-helm.sh"
kind=$(command -v kind || true)
if [ -z "$kind" ] || [ "${KPIPE_OFFLINE:-0}" = 1 ]; then
  [ -x "$KIND_BIN/kind" ] || { mkdir -p "$KIND_BIN"; GOBIN="$KIND_BIN" CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION"; }
  kind="$KIND_BIN/kind"
fi
kubectl="$K8S_BIN/kubectl"; helm="$HELM_BIN/helm"
create_args=(--config "$KIND_DIR/kind-config.yaml")
if [ "${KPIPE_OFFLINE:-0}" = 1 ]; then
  "$OFFLINE_DIR/node-image.sh"
  config="$run_dir/kind-config.yaml"
  sed "s/@ETCD_IMAGE_TAG@/$ETCD_IMAGE_TAG/" "$OFFLINE_DIR/kind-config.yaml" >"$config"
  create_args=(--config "$config" --image "$NODE_IMAGE")
fi
log "building the images"
mapfile -t images < <("$KIND_DIR/images.sh")

if ! "$kind" get clusters 2>/dev/null | matches "^$cluster$"; then
  # On the project's engine: a network of our own with a fixed IPv4 subnet and bridge name (kind would pick a default
  # pool plus an IPv6 ULA); far from the bed's 10.244/24, the pods' 10.245/16 and the Services' 10.96/12.
  if [ "$KPIPE_OWN_DOCKER" = 1 ] && ! docker network inspect kind >/dev/null 2>&1; then
    docker network create -d bridge --subnet 172.31.250.0/24 -o com.docker.network.bridge.name=kpipe-kind0 \
      -o com.docker.network.driver.mtu=1400 kind >/dev/null
  fi
  log "creating kind cluster $cluster"
  tc=$(date +%s)
  # --kubeconfig: kind would otherwise merge its context into ~/.kube/config
  "$kind" create cluster --name "$cluster" "${create_args[@]}" --kubeconfig "$run_dir/kubeconfig" --wait 5m
  log "cluster created in $(( $(date +%s) - tc ))s"
fi
"$kind" get kubeconfig --name "$cluster" >"$run_dir/kubeconfig"
export KUBECONFIG="$run_dir/kubeconfig"
node="$cluster-control-plane"
for image in "${images[@]}"; do "$kind" load docker-image --name "$cluster" "$image" >/dev/null; done
log "loaded ${images[*]}"

image_of() { printf '%s\n' "${images[@]}" | grep "/$1:"; }
kafka_image=$(image_of kafka)
sed "s|@KAFKA_IMAGE@|$kafka_image|g" "$KIND_DIR/kafka.yaml" | "$kubectl" apply -f - >/dev/null
"$kubectl" -n kafka rollout status statefulset/kafka --timeout=300s
node_address=$("$kubectl" get node "$node" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
cat >"$run_dir/env" <<ENV
# written by e2e/kind/run.sh: the kind cluster $cluster for the e2e suites (see e2e/src/testbed.rs)
KPIPE_CLUSTER=kind
KPIPE_RUN=$run_dir
KUBECONFIG=$run_dir/kubeconfig
KUBECTL=$kubectl
HELM=$helm
KAFKA_BOOTSTRAP=127.0.0.1:30092
KAFKA_BOOTSTRAP_PODS=kafka.kafka.svc:9092
KAFKA_NAMESPACE=kafka
KPIPE_KIND_NODE=$node
KPIPE_NODE_ADDRESS=$node_address
DOCKER=$(command -v docker)
DOCKER_HOST=${DOCKER_HOST:-}
KPIPE_E2E_OPERATOR_IMAGE=$(image_of operator)
KPIPE_E2E_WORKER_IMAGE=$(image_of worker)
KPIPE_TEST_SINK_IMAGE=$(image_of test-sink)
KPIPE_TEST_HTTP_IMAGE=$(image_of test-http)
ENV
log "kind cluster $cluster ready after $(( $(date +%s) - t0 ))s; env file $run_dir/env"
"$kubectl" get nodes -o wide
if [ "${KPIPE_KIND_SETUP_ONLY:-0}" = 1 ]; then exit 0; fi

test_args=()
for s in $suites; do test_args+=(--test "$s"); done
status=0
tt=$(date +%s)
# shellcheck disable=SC2086 # KPIPE_KIND_TESTS holds several cargo test arguments
KPIPE_RUN="$run_dir" ${CARGO:-cargo} test -p kpipe-e2e "${test_args[@]}" --no-fail-fast -- \
  --test-threads="${KPIPE_TEST_THREADS:-1}" ${KPIPE_KIND_TESTS:-} || status=$?
log "suites (${suites}) took $(( $(date +%s) - tt ))s"
# (the test namespaces are gone by now: the happy path prints and checks the images its operator and workers ran)
echo "images of the pods left in the cluster (kubectl get pods -A -o jsonpath='{..image}'):"
"$kubectl" get pods -A -o jsonpath='{..image}' | tr ' ' '\n' | sort | uniq -c
log "make e2e-kind: $( [ $status = 0 ] && echo passed || echo FAILED ) after $(( $(date +%s) - t0 ))s"
exit "$status"
}
