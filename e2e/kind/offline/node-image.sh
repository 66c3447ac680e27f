#!/usr/bin/env bash
# Builds the offline kind node image $NODE_IMAGE (Kubernetes $K8S_VERSION) from Debian packages, the Go module proxy
# and debootstrap only, the way kind's `build node-image` assembles one, minus its registry pulls (kind fetches every
# image of `kubeadm config images list` it did not build, which cannot work offline):
#   1. binaries, each cached under the component cache by version: kubelet, kubeadm, kubectl, kube-apiserver,
#      kube-controller-manager, kube-scheduler, kube-proxy (e2e/testbed/build-k8s.sh), etcd (build-etcd.sh),
#      coredns, crictl, kind itself, and pause (its C source ships in the k8s.io/kubernetes module);
#   2. kpipe-offline/debian:bookworm from debootstrap, then kind's base image (kind-base.Dockerfile);
#   3. the registry.k8s.io/* images kubeadm wants, made from those binaries with `docker import`;
#   4. the node: the base image + kubelet/kubeadm/kubectl/crictl + those images pre-imported and pinned in the node's
#      containerd + a static bridge CNI config (kindnetd cannot be pulled; single node only), committed.
# Idempotent: returns at once when $NODE_IMAGE exists in the engine; every step skips what exists.
# Versions: e2e/testbed/versions.env (why Kubernetes stays 1.34.x and kind v0.30.x on cgroup v1: see there).
# --tools-only: only the Go and C builds of step 1 that the bed does not share (kind, kubelet, kubeadm,
# kube-scheduler, kube-proxy, coredns, crictl, pause), without a Docker engine. CI runs it at the lowest priority
# beside `make test`, whose suites leave the cores mostly idle (.ci/run); the full run then finds them cached.
source "$(dirname "$0")/lib.sh"
need go; need gcc
tools_only=0
[ "${1:-}" = --tools-only ] && tools_only=1
if [ "$tools_only" = 0 ]; then
  need jq
  use_docker
  if has_image "$NODE_IMAGE"; then log "node image $NODE_IMAGE is there"; exit 0; fi
fi
t0=$(date +%s)
step() { local s; s=$(date +%s); log "node image: $1"; "${@:2}"; log "node image: $1 took $(( $(date +%s) - s ))s"; }

kind_bin() {
  [ -x "$KIND_BIN/kind" ] && return 0
  mkdir -p "$KIND_BIN"; GOBIN="$KIND_BIN" CGO_ENABLED=0 go install "sigs.k8s.io/kind@$KIND_VERSION"
}
node_tools() {
  [ -f "$NODE_TOOLS_BIN/.complete" ] && return 0
  mkdir -p "$NODE_TOOLS_BIN"
  GOBIN="$NODE_TOOLS_BIN" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  GOBIN="$NODE_TOOLS_BIN" CGO_ENABLED=0 go install -trimpath \
    -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  touch "$NODE_TOOLS_BIN/.complete"
}
pause_bin() {
  [ -x "$PAUSE_BIN/pause" ] && return 0
  local src; src="$(go env GOMODCACHE)/k8s.io/kubernetes@$K8S_VERSION/build/pause/linux/pause.c"
  [ -f "$src" ] || go mod download "k8s.io/kubernetes@$K8S_VERSION"
  mkdir -p "$PAUSE_BIN"
  gcc -Os -static -DVERSION="\"$PAUSE_VERSION\"" -o "$PAUSE_BIN/pause.tmp" "$src"
  strip "$PAUSE_BIN/pause.tmp"; mv "$PAUSE_BIN/pause.tmp" "$PAUSE_BIN/pause"
}
kind_base_image() {
  has_image "$KIND_BASE_IMAGE" && return 0
  local ctx kind_src
  ctx=$(mktemp -d)
  kind_src=$(go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | jq -r .Dir)
  cp -r "$kind_src/images/base/files" "$ctx/files"; chmod -R u+w "$ctx/files"
  docker build -q --network host --build-arg "DEBIAN_IMAGE=$DEBIAN_IMAGE" -f "$OFFLINE_DIR/kind-base.Dockerfile" \
    -t "$KIND_BASE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
}
# binary_image <image> <binary> <path in image> [docker import --change ...]: a one-binary image with /tmp, a passwd
# and PATH; kubeadm's static pods call the control-plane binaries by name.
binary_image() {
  local image=$1 binary=$2 path=$3 d; shift 3
  has_image "$image" && return 0
  d=$(mktemp -d)
  mkdir -p "$d$(dirname "$path")" "$d/tmp" "$d/etc"; chmod 1777 "$d/tmp"
  install -m 0755 "$binary" "$d$path"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' >"$d/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$d/etc/group"
  tar -C "$d" --owner=0 --group=0 -c . \
    | docker import --change 'ENV PATH=/usr/local/bin:/usr/bin:/bin' "$@" - "$image" >/dev/null
  rm -rf "$d"
}
R=registry.k8s.io
control_plane_images=(
  "$R/kube-apiserver:$K8S_VERSION" "$R/kube-controller-manager:$K8S_VERSION" "$R/kube-scheduler:$K8S_VERSION"
  "$R/kube-proxy:$K8S_VERSION" "$R/etcd:$ETCD_IMAGE_TAG" "$R/coredns/coredns:$COREDNS_VERSION"
  "$R/pause:$PAUSE_VERSION" "$R/pause:3.10")
k8s_images() {
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler; do
    binary_image "$R/$c:$K8S_VERSION" "$K8S_BIN/$c" "/usr/local/bin/$c"
  done
  binary_image "$R/etcd:$ETCD_IMAGE_TAG" "$ETCD_BIN/etcd" /usr/local/bin/etcd
  binary_image "$R/coredns/coredns:$COREDNS_VERSION" "$NODE_TOOLS_BIN/coredns" /coredns --change 'ENTRYPOINT ["/coredns"]'
  binary_image "$R/pause:$PAUSE_VERSION" "$PAUSE_BIN/pause" /pause --change 'ENTRYPOINT ["/pause"]'
  docker tag "$R/pause:$PAUSE_VERSION" "$R/pause:3.10"
  # kube-proxy execs iptables-restore/-save and conntrack: kind's base image has them (no second Debian image).
  if ! has_image "$R/kube-proxy:$K8S_VERSION"; then
    local d; d=$(mktemp -d); install -m 0755 "$K8S_BIN/kube-proxy" "$d/kube-proxy"
    printf 'FROM %s\nCOPY kube-proxy /usr/local/bin/kube-proxy\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\nCMD []\n' \
      "$KIND_BASE_IMAGE" >"$d/Dockerfile"
    docker build -q -t "$R/kube-proxy:$K8S_VERSION" "$d" >/dev/null; rm -rf "$d"
  fi
}
assemble_node() {
  local id="kpipe-node-build-$$" archive
  archive=$(mktemp "$KPIPE_CACHE/kind-images.XXXXXX.tar")
  docker save "${control_plane_images[@]}" -o "$archive"
  docker run -d --name "$id" --entrypoint sleep --security-opt seccomp=unconfined "$KIND_BASE_IMAGE" infinity >/dev/null
  # shellcheck disable=SC2064
  trap "docker rm -f -v '$id' >/dev/null 2>&1 || true; rm -f '$archive'" EXIT
  local b
  for b in kubelet kubeadm kubectl; do docker cp "$K8S_BIN/$b" "$id:/usr/bin/$b"; done
  docker cp "$NODE_TOOLS_BIN/crictl" "$id:/usr/local/bin/crictl"
  docker exec "$id" sh -c "chown root:root /usr/bin/kube* /usr/local/bin/crictl && chmod 0755 /usr/bin/kube* \
    /usr/local/bin/crictl && printf %s '$K8S_VERSION' >/kind/version && mkdir -p /etc/cni/net.d"
  # One bridge for the single node's pods (kind-config.yaml sets networking.podSubnet to match, and
  # disableDefaultCNI because kindnetd's image is not available offline). 10.245/16, not kind's default 10.244/16:
  # that one is the local test bed's pod network on the host.
  docker exec -i "$id" sh -c 'cat >/etc/cni/net.d/10-kpipe-bridge.conflist' <<'JSON'
{
  "cniVersion": "1.0.0",
  "name": "kpipe-kind-bridge",
  "plugins": [
    { "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": { "type": "host-local", "ranges": [[{ "subnet": "10.245.0.0/24" }]], "routes": [{ "dst": "0.0.0.0/0" }] } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
JSON
  docker exec "$id" sh -c 'containerd >/tmp/containerd.log 2>&1 &
    for _ in $(seq 1 100); do ctr version >/dev/null 2>&1 && exit 0; sleep 0.2; done; cat /tmp/containerd.log; exit 1'
  docker exec -i "$id" ctr --namespace=k8s.io images import --label=io.cri-containerd.pinned=pinned \
    --all-platforms --no-unpack --digests - <"$archive" >/dev/null
  docker exec "$id" sh -c 'kill "$(pidof containerd)"; while pidof containerd >/dev/null; do sleep 0.2; done; rm -f /tmp/containerd.log'
  docker commit --change 'ENTRYPOINT [ "/usr/local/bin/entrypoint", "/sbin/init" ]' "$id" "$NODE_IMAGE" >/dev/null
}

tools() {
  step "kind $KIND_VERSION" kind_bin
  # Not the bed's own three (kube-apiserver, kube-controller-manager, kubectl): up.sh may be building or running them.
  step "Kubernetes $K8S_VERSION node binaries" "$TESTBED_DIR/build-k8s.sh" kube-scheduler kube-proxy kubelet kubeadm
  step "coredns $COREDNS_VERSION, crictl $CRICTL_VERSION" node_tools
  step "pause $PAUSE_VERSION" pause_bin
  log "node image tools built in $(( $(date +%s) - t0 ))s"
}

main() {
  mkdir -p "$KPIPE_CACHE/build-logs"
  # One build of the tools at a time: CI's early --tools-only run may still be going when `make e2e-kind` starts.
  exec 9>"$KPIPE_CACHE/kind-node-tools.lock"
  flock 9
  if [ "$tools_only" = 1 ]; then tools; return; fi
  step "kind $KIND_VERSION" kind_bin
  step "Kubernetes $K8S_VERSION node binaries" "$TESTBED_DIR/build-k8s.sh" kube-apiserver kube-controller-manager \
    kubectl kube-scheduler kube-proxy kubelet kubeadm
  step "etcd $ETCD_VERSION" "$TESTBED_DIR/build-etcd.sh"
  step "coredns $COREDNS_VERSION, crictl $CRICTL_VERSION" node_tools
  step "pause $PAUSE_VERSION" pause_bin
  step "Debian base image (debootstrap)" debian_image
  step "kind base image" kind_base_image
  step "control-plane images" k8s_images
  step "assemble $NODE_IMAGE" assemble_node
  log "node image $NODE_IMAGE built in $(( $(date +%s) - t0 ))s (cold build time; cached from now on)"
}
# Everything runs from main, so the whole script is read before it starts (safe to edit while a build runs).
main "$@"
