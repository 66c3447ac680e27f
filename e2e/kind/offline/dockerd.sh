#!/usr/bin/env bash
# The project's own Docker engine for machines without one (`make images`, `make e2e-kind`, .ci/run):
#   dockerd.sh start | stop | status
# It leaves the host alone: no iptables/ip6tables rules and no FORWARD policy (--iptables=false --ip6tables=false),
# no change to net.ipv4.ip_forward (--ip-forward=false; the bridge driver would set it to 1), no docker0 bridge
# (--bridge=none). Its data root is in the component cache (images survive a stop), its exec root, socket and
# pidfile under /run/kpipe-docker. Containers reach each other and the host over user-defined bridges; they get no
# NAT to the outside (nothing outside is reachable here anyway; image builds use --network host).
# The default runtime is runc-capfix (next to this script): see there why.
source "$(dirname "$0")/lib.sh"
pidf="$KPIPE_DOCKER_EXEC/dockerd.pid"
running() { [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }
case "${1:-}" in
  start)
    need dockerd; need jq; need runc
    if running; then exit 0; fi
    mkdir -p "$KPIPE_DOCKER/data" "$KPIPE_DOCKER_EXEC"
    # kind bind-mounts /lib/modules read-only into its nodes; Docker would create the missing host path itself.
    [ -e /lib/modules ] || mkdir -p /lib/modules
    log "starting the project's dockerd (socket $KPIPE_DOCKER_SOCK, log $KPIPE_DOCKER/dockerd.log)"
    # its own session: a signal to the caller's process group (Ctrl-C of make) must not take the engine down
    setsid nohup dockerd --data-root "$KPIPE_DOCKER/data" --exec-root "$KPIPE_DOCKER_EXEC/exec" --pidfile "$pidf" \
      -H "unix://$KPIPE_DOCKER_SOCK" --iptables=false --ip6tables=false --ip-forward=false --bridge=none \
      --add-runtime capfix="$OFFLINE_DIR/runc-capfix" --default-runtime capfix \
      >>"$KPIPE_DOCKER/dockerd.log" 2>&1 </dev/null &
    for _ in $(seq 1 120); do
      DOCKER_HOST="unix://$KPIPE_DOCKER_SOCK" docker info >/dev/null 2>&1 && exit 0
      sleep 0.5
    done
    tail -20 "$KPIPE_DOCKER/dockerd.log" >&2
    die "dockerd did not answer within 60s (log: $KPIPE_DOCKER/dockerd.log)"
    ;;
  stop)
    if running; then
      pid=$(cat "$pidf")
      log "stopping the project's dockerd (pid $pid)"
      kill -TERM "$pid"
      for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && die "dockerd $pid did not stop within 60s"
    fi
    # dockerd leaves the bind mount of the host netns handle under its exec root; its containerd leaves runtime dirs.
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done \
      < <(awk -v r="$KPIPE_DOCKER_EXEC" '$2 ~ "^"r {print $2}' /proc/mounts | sort -r)
    rm -rf "$KPIPE_DOCKER_EXEC"
    ;;
  status)
    if running; then echo "dockerd running (pid $(cat "$pidf"), DOCKER_HOST=unix://$KPIPE_DOCKER_SOCK)"
    else echo "dockerd not running"; exit 1; fi
    ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
