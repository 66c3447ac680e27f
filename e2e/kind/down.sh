#!/usr/bin/env bash
# Tears the kind path down: deletes the kind cluster (its node container and volume), the `kind` Docker network when
# the project's engine made it, and stops the project's dockerd (which unmounts what it left under its exec root).
# Leaves the built images in the engine's data root (the component cache) for the next run. Then checks that nothing
# is left: no kind containers, no kind network, no mounts of the engine, no dockerd of ours.
source "$(dirname "$0")/offline/lib.sh"
cluster=${KPIPE_KIND_CLUSTER:-kpipe-e2e}
kind=$(command -v kind || echo "$KIND_BIN/kind")
own=0
if [ -n "${KPIPE_FORCE_OWN_DOCKER:-}" ] || { [ -z "${DOCKER_HOST:-}" ] && ! docker info >/dev/null 2>&1; }; then
  export DOCKER_HOST="unix://$KPIPE_DOCKER_SOCK"
fi
[ "${DOCKER_HOST:-}" = "unix://$KPIPE_DOCKER_SOCK" ] && own=1
if docker info >/dev/null 2>&1; then
  if [ -x "$kind" ] && "$kind" get clusters 2>/dev/null | matches "^$cluster$"; then
    log "deleting kind cluster $cluster"
    "$kind" delete cluster --name "$cluster" --kubeconfig "${KPIPE_KIND_RUN:-$KPIPE_CACHE/kind-run}/kubeconfig"
  fi
  if [ "$own" = 1 ]; then
    docker network inspect kind >/dev/null 2>&1 && docker network rm kind >/dev/null
    left=$(docker ps -aq)
    [ -z "$left" ] || die "containers left in the project's engine: $left"
  fi
fi
[ "$own" = 1 ] && "$OFFLINE_DIR/dockerd.sh" stop
# Checks: nothing of ours is mounted or bridged any more.
if [ "$own" = 1 ]; then
  ! awk '{print $2}' /proc/mounts | grep -e "^$KPIPE_DOCKER_EXEC" -e "^$KPIPE_DOCKER/data" >/dev/null \
    || die "mounts left: $(awk '{print $2}' /proc/mounts | grep -e "^$KPIPE_DOCKER_EXEC" -e "^$KPIPE_DOCKER/data")"
  ! ip link show kpipe-kind0 >/dev/null 2>&1 || die "bridge kpipe-kind0 left behind"
fi
log "kind path torn down"
