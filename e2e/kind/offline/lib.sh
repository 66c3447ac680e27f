#!/usr/bin/env bash
# Shared settings of the offline kind path. Source it; do not execute it. Builds on the test bed's lib.sh (versions,
# component cache, log/die/need).
# shellcheck disable=SC2034
# shellcheck source=../../testbed/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/../../testbed" && pwd)/lib.sh"
OFFLINE_DIR="$REPO_ROOT/e2e/kind/offline"
KIND_DIR="$REPO_ROOT/e2e/kind"

# Component cache entries of the kind path, keyed by version like the bed's.
KIND_BIN="$KPIPE_CACHE/kind-$KIND_VERSION/bin"
NODE_TOOLS_BIN="$KPIPE_CACHE/kind-node-tools-coredns-$COREDNS_VERSION-crictl-$CRICTL_VERSION/bin"
PAUSE_BIN="$KPIPE_CACHE/pause-$PAUSE_VERSION-k8s-$K8S_VERSION/bin"
# etcd's image tag as kubeadm names it (<version>-0); kind's config patches kubeadm to this tag.
ETCD_IMAGE_TAG="${ETCD_VERSION#v}-0"

# The project's own Docker engine (used only when no engine answers): data in the component cache (so built images
# survive a stop), runtime state under /run. Never touches the host firewall (see dockerd.sh).
KPIPE_DOCKER=${KPIPE_DOCKER:-$KPIPE_CACHE/docker}
KPIPE_DOCKER_EXEC=${KPIPE_DOCKER_EXEC:-/run/kpipe-docker}
KPIPE_DOCKER_SOCK="$KPIPE_DOCKER_EXEC/docker.sock"

# Local images of the offline path. The tags carry every version that goes into them, so a version bump builds a new
# image and an existing tag is never rebuilt.
DEBIAN_IMAGE=kpipe-offline/debian:bookworm
CC_BASE_IMAGE=kpipe-offline/cc-debian12:nonroot
KIND_BASE_IMAGE=kpipe-offline/kind-base:kind-$KIND_VERSION
NODE_IMAGE=kpipe-offline/kind-node:$K8S_VERSION-kind-$KIND_VERSION-etcd-$ETCD_VERSION
KAFKA_IMAGE=kpipe/kafka:$KAFKA_VERSION

# The configured apt mirror (first deb822 URIs: or one-line deb entry), for debootstrap.
apt_mirror() {
  cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}'
}

# use_docker: point DOCKER_HOST at an engine that answers: the caller's (DOCKER_HOST or the default socket) or, when
# none does, the project's own (started by dockerd.sh start). Sets KPIPE_OWN_DOCKER=1 when it is ours.
use_docker() {
  need docker
  KPIPE_OWN_DOCKER=0
  if [ -z "${KPIPE_FORCE_OWN_DOCKER:-}" ] && docker info >/dev/null 2>&1; then return 0; fi
  export DOCKER_HOST="unix://$KPIPE_DOCKER_SOCK"
  if ! docker info >/dev/null 2>&1; then
    install_engine_deps
    "$OFFLINE_DIR/dockerd.sh" start
  fi
  KPIPE_OWN_DOCKER=1
  # The project's engine runs the legacy builder (no buildx plugin here); builds use the host network because its
  # containers have no NAT to the outside (bridge networking without iptables).
  export DOCKER_BUILDKIT=0
}
# install_engine_deps: Debian's dockerd (docker.io, which brings containerd, runc and iptables), debootstrap and jq,
# when missing. Package scripts must not start Debian's dockerd with its defaults (iptables rules, FORWARD policy
# DROP, ip_forward=1): a policy-rc.d that refuses service starts is in place during the install.
install_engine_deps() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v jq >/dev/null && return 0
  local made=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; made=1; fi
  "$TESTBED_DIR/install-deps.sh" docker.io debootstrap jq || { [ $made = 0 ] || rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ $made = 0 ] || rm -f /usr/sbin/policy-rc.d
}
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# debian_image: $DEBIAN_IMAGE (bookworm, minbase) from debootstrap and the configured apt mirror, when missing.
debian_image() {
  has_image "$DEBIAN_IMAGE" && return 0
  need debootstrap
  mkdir -p "$KPIPE_CACHE/build-logs"
  local root; root=$(mktemp -d "$KPIPE_CACHE/debootstrap.XXXXXX")
  log "debootstrap bookworm (minbase) -> $DEBIAN_IMAGE"
  debootstrap --variant=minbase bookworm "$root" "$(apt_mirror)" >"$KPIPE_CACHE/build-logs/debootstrap.log" 2>&1 \
    || { rm -rf "$root"; die "debootstrap failed (see $KPIPE_CACHE/build-logs/debootstrap.log)"; }
  tar -C "$root" -c . | docker import - "$DEBIAN_IMAGE" >/dev/null
  rm -rf "$root"
}

# cc_base_image: $CC_BASE_IMAGE, the offline stand-in for gcr.io/distroless/cc-debian12:nonroot: the files of
# Debian's glibc, libgcc, OpenSSL, zlib, tzdata and netbase packages (unpacked, no package manager, no shell), the
# host's CA bundle, a nonroot user 65532 and a world-writable /tmp. Built when missing.
cc_base_image() {
  has_image "$CC_BASE_IMAGE" && return 0
  local d; d=$(mktemp -d)
  mkdir -p "$d/debs" "$d/root/etc/ssl/certs" "$d/root/tmp" "$d/root/home/nonroot"
  log "assembling $CC_BASE_IMAGE from Debian packages"
  (cd "$d/debs" && apt-get download -q libc6 libgcc-s1 libssl3 zlib1g tzdata netbase >/dev/null 2>&1) \
    || { apt-get update -qq && (cd "$d/debs" && apt-get download -q libc6 libgcc-s1 libssl3 zlib1g tzdata netbase); } \
    || die "apt-get download of the base packages failed"
  local deb; for deb in "$d"/debs/*.deb; do dpkg-deb -x "$deb" "$d/root"; done
  rm -rf "$d/root/usr/share/doc" "$d/root/usr/share/man" "$d/root/usr/share/lintian" "$d/root/usr/share/locale"
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] || cp /etc/ssl/certs/ca-certificates.crt "$d/root/etc/ssl/certs/"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$d/root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$d/root/etc/group"
  chmod 1777 "$d/root/tmp"; chown 65532:65532 "$d/root/home/nonroot"
  tar -C "$d/root" --numeric-owner -c . | docker import --change 'USER 65532:65532' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' - "$CC_BASE_IMAGE" >/dev/null
  rm -rf "$d"
}
