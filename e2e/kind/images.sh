#!/usr/bin/env bash
# `make images`: the container images, from binaries cargo builds on this machine (as release pipelines do):
#   kpipe/operator:<appVersion>, kpipe/worker:<appVersion>      (operator/Dockerfile, worker/Dockerfile)
#   kpipe/test-sink:<appVersion>, kpipe/test-http:<appVersion>  (e2e/test.Dockerfile; the e2e suites' HTTP sinks)
#   kpipe/kafka:$KAFKA_VERSION                                  (e2e/kind/kafka/; the kind path's broker)
# Uses the Docker engine that answers (DOCKER_HOST or the default socket); when none does, starts the project's own
# (e2e/kind/offline/dockerd.sh, which leaves the host firewall alone). The base images are build arguments:
#   KPIPE_BASE_IMAGE        base of the kpipe and test images (default: the Dockerfiles' distroless cc image)
#   KPIPE_KAFKA_BASE_IMAGE  base of the Kafka image (default: the Dockerfile's debian:bookworm-slim)
# Offline (KPIPE_OFFLINE=1, implied on the project's own engine, which reaches no registry) both are made here from
# Debian packages: a distroless-like base from unpacked .debs and a debootstrapped bookworm.
# Prints the image names, one a line, on stdout.
source "$(dirname "$0")/offline/lib.sh"
cd "$REPO_ROOT"
use_docker
[ "$KPIPE_OWN_DOCKER" = 1 ] && KPIPE_OFFLINE=${KPIPE_OFFLINE:-1}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/kpipe/Chart.yaml)
[ -n "$version" ] || die "no appVersion in charts/kpipe/Chart.yaml"
build_args=(); kafka_args=(); net=()
if [ "${KPIPE_OFFLINE:-0}" = 1 ]; then
  cc_base_image; debian_image
  KPIPE_BASE_IMAGE=${KPIPE_BASE_IMAGE:-$CC_BASE_IMAGE}
  KPIPE_KAFKA_BASE_IMAGE=${KPIPE_KAFKA_BASE_IMAGE:-$DEBIAN_IMAGE}
  net=(--network host)   # apt inside the Kafka build: the project's engine gives containers no NAT
fi
[ -z "${KPIPE_BASE_IMAGE:-}" ] || build_args=(--build-arg "BASE_IMAGE=$KPIPE_BASE_IMAGE")
[ -z "${KPIPE_KAFKA_BASE_IMAGE:-}" ] || kafka_args=(--build-arg "BASE_IMAGE=$KPIPE_KAFKA_BASE_IMAGE")

# The binaries link glibc, libgcc, libm and (unless LIBZ_SYS_STATIC=1) zlib dynamically; librdkafka and OpenSSL are
# static. Distroless' cc image has no zlib, so builds for the default base link zlib statically; the offline base
# carries Debian's zlib1g and takes the binaries `make test` builds as they are (no second release build).
[ -n "${KPIPE_BASE_IMAGE:-}" ] || export LIBZ_SYS_STATIC=1
log "cargo build --release (operator, worker, test sinks)"
# The Makefile's release-bins, which `make test` builds too: the same command, so nothing is compiled twice.
make -s --no-print-directory -C "$REPO_ROOT" release-bins >&2
ctx=$(mktemp -d); trap 'rm -rf "$ctx"' EXIT
# one_binary_image <dockerfile> <image> <binary> [docker build args]: a context holding only that binary.
one_binary_image() {
  local dockerfile=$1 image=$2 binary=$3; shift 3
  rm -rf "${ctx:?}"/*; cp "$CARGO_TARGET/release/$binary" "$ctx/"
  log "building $image"
  docker build -q -f "$dockerfile" "${build_args[@]}" "$@" -t "$image" "$ctx" >/dev/null
  echo "$image"
}
one_binary_image operator/Dockerfile "kpipe/operator:$version" kpipe-operator
one_binary_image worker/Dockerfile "kpipe/worker:$version" kpipe-worker
one_binary_image e2e/test.Dockerfile "kpipe/test-sink:$version" kpipe-test-sink --build-arg BIN=kpipe-test-sink
one_binary_image e2e/test.Dockerfile "kpipe/test-http:$version" kpipe-test-http --build-arg BIN=kpipe-test-http

"$TESTBED_DIR/fetch-kafka.sh" >&2
# Rebuilt only when its inputs change (the jars follow KAFKA_VERSION and the POM): their checksum is a label.
inputs=$(cat e2e/kind/kafka/* "$TESTBED_DIR/kafka/pom.xml" | sha256sum | cut -c1-16)
if [ "$(docker image inspect -f '{{index .Config.Labels "io.kpipe.inputs"}}' "$KAFKA_IMAGE" 2>/dev/null)" != "$inputs" ]
then
  rm -rf "${ctx:?}"/*
  cp -r "$KAFKA_HOME/libs" "$ctx/libs"
  cp e2e/kind/kafka/entrypoint.sh e2e/kind/kafka/log4j2.properties "$ctx/"
  log "building $KAFKA_IMAGE"
  docker build -q -f e2e/kind/kafka/Dockerfile "${net[@]}" "${kafka_args[@]}" --label "io.kpipe.inputs=$inputs" -t "$KAFKA_IMAGE" "$ctx" >/dev/null
fi
echo "$KAFKA_IMAGE"
