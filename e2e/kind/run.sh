#!/usr/bin/env bash
# `make e2e-kind`: the same end-to-end suite as the local test bed, on a kind cluster (needs Docker and kind).
# Creates the cluster, builds and loads the images, deploys a single-node Kafka, installs the chart, writes an env
# file in the test bed's format and runs the suite against it. The suite only needs a kubeconfig and Kafka
# addresses, so it does not care which cluster it runs on.
set -euo pipefail
cd "$(dirname "$0")/../.."
cluster=${KPIPE_KIND_CLUSTER:-kpipe-e2e}
run_dir=${KPIPE_KIND_RUN:-${XDG_CACHE_HOME:-$HOME/.cache}/kpipe/kind-run}
for tool in docker kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "make e2e-kind needs '$tool' on PATH" >&2; exit 1; }
done
mkdir -p "$run_dir"
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kpipe/Chart.yaml)

if ! kind get clusters | grep -x "$cluster" >/dev/null; then
  kind create cluster --name "$cluster" --config e2e/kind/kind-config.yaml --wait 120s
fi
kind get kubeconfig --name "$cluster" > "$run_dir/kubeconfig"
export KUBECONFIG="$run_dir/kubeconfig"

e2e/kind/images.sh
for component in operator worker; do kind load docker-image --name "$cluster" "kpipe/$component:$version"; done
# Test-only images (the HTTP sink) are built from the e2e crate's binaries into a tiny image.
docker build -q -t kpipe/test-http:latest -f - . <<'DOCKERFILE'
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p kpipe-e2e --bin kpipe-test-http && install -D target/release/kpipe-test-http /out/kpipe-test-http
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/kpipe-test-http /usr/local/bin/kpipe-test-http
ENTRYPOINT ["/usr/local/bin/kpipe-test-http"]
DOCKERFILE
kind load docker-image --name "$cluster" kpipe/test-http:latest

kubectl apply -f e2e/kind/kafka.yaml
kubectl -n kafka rollout status statefulset/kafka --timeout=300s

cat > "$run_dir/env" <<ENV
KUBECONFIG=$run_dir/kubeconfig
KAFKA_BOOTSTRAP=127.0.0.1:30092
KAFKA_BOOTSTRAP_PODS=kafka.kafka.svc:9092
KUBECTL=$(command -v kubectl)
HELM=$(command -v helm)
KPIPE_CLUSTER=kind
ENV
echo "kind cluster $cluster ready; env file $run_dir/env"
set -a; source "$run_dir/env"; set +a
export KPIPE_RUN="$run_dir" KPIPE_KAFKA_BOOTSTRAP="$KAFKA_BOOTSTRAP"
cargo test -p kpipe-e2e --test '*' -- --test-threads=1
