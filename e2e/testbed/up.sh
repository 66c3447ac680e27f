#!/usr/bin/env bash
# Brings the local test bed up: etcd, kube-apiserver, kube-controller-manager, Apache Kafka (KRaft, single
# combined node) and the kpipe process kubelet, all as plain local processes (no Docker).
# Builds or fetches whatever is missing first (cached under $KPIPE_CACHE, keyed by version).
# Idempotent: on a running, healthy bed it only re-checks health and returns.
# Writes $KPIPE_RUN/env (KEY=VALUE lines) that tests and scripts source.
source "$(dirname "$0")/lib.sh"
need curl; need openssl; need ip; need java; need go; need cargo
[ "$(id -u)" = 0 ] || die "the test bed needs root (network namespaces, bridge, bind mounts)"
t0=$(date +%s)
# One up/down at a time (several engineers and test runs share one bed).
mkdir -p "$KPIPE_CACHE"
exec 9>"$KPIPE_CACHE/testbed.lock"
flock -w 900 9 || die "another e2e/testbed/up.sh or down.sh holds $KPIPE_CACHE/testbed.lock"

# ---------------------------------------------------------------- fast path: everything already healthy
all_up() {
  alive etcd etcd && alive kube-apiserver kube-apiserver && alive kube-controller-manager kube-controller-manager \
    && alive kafka kafka.Kafka && alive kubelet kpipe-kubelet && alive oidc kpipe-test-oidc && bridge_healthy \
    && [ -f "$KPIPE_RUN/env" ] && etcd_healthy && apiserver_healthy && kcm_healthy && kubelet_healthy && kafka_healthy \
    && oidc_healthy
}
# Sources changed since the last `cargo build` done by this script (the stamp; cargo leaves the binary untouched
# when a change does not affect it, so the binary's mtime alone would make every run rebuild).
KUBELET_STAMP="$CARGO_TARGET/debug/.kpipe-kubelet.stamp"
kubelet_stale() {
  [ ! -x "$KUBELET_BIN" ] || [ ! -f "$KUBELET_STAMP" ] \
    || [ -n "$(find "$REPO_ROOT/e2e/src" "$REPO_ROOT/e2e/Cargo.toml" -newer "$KUBELET_STAMP" -print -quit)" ]
}
# The running kubelet is older than its binary (rebuilt since it started).
# KPIPE_KEEP_KUBELET=1 (used by tests that restart only Kafka) never restarts a running kubelet: that would
# restart every pod of every test sharing the bed.
kubelet_outdated() {
  [ "${KPIPE_KEEP_KUBELET:-0}" != 1 ] && [ -f "$(pidfile kubelet)" ] && [ "$KUBELET_BIN" -nt "$(pidfile kubelet)" ]
}
if [ -d "$KPIPE_RUN" ] && ! kubelet_stale && ! kubelet_outdated && all_up; then
  log "test bed already up and healthy (checked in $(( $(date +%s) - t0 ))s); env: $KPIPE_RUN/env"
  exit 0
fi

# ---------------------------------------------------------------- build / fetch (cached)
missing=0
for c in "$K8S_BIN/.complete" "$ETCD_BIN/.complete" "$HELM_BIN/.complete"; do
  [ -f "$c" ] || missing=1
done
kafka_current || missing=1
if [ "$missing" = 1 ]; then
  "$TESTBED_DIR/build-all.sh"
fi
if { kubelet_stale || [ ! -x "$OIDC_BIN" ]; } && [ "${KPIPE_KEEP_KUBELET:-0}" != 1 ]; then
  # librdkafka is built with the curl sources of the curl-sys crate (rdkafka's `curl-static` feature): no system curl
  # headers are needed any more.
  log "building the process kubelet (cargo build -p kpipe-e2e --bins)"
  # The stamp is taken before the build (sources edited during it count as newer); on a fresh clone target/ does
  # not exist yet.
  mkdir -p "$(dirname "$KUBELET_STAMP")"
  touch "$KUBELET_STAMP.new"
  (cd "$REPO_ROOT" && cargo build -q -p kpipe-e2e --bins) || die "cargo build of kpipe-kubelet failed"
  mv "$KUBELET_STAMP.new" "$KUBELET_STAMP"
fi
[ -x "$KUBELET_BIN" ] || die "kubelet binary $KUBELET_BIN missing after build"
[ -x "$OIDC_BIN" ] || die "OIDC issuer binary $OIDC_BIN missing after build"

# Pods run their containers from <run>/pods/<pod>/bin inside a private mount namespace, where the worker's emptyDir on
# /tmp (and any other volume) is mounted over the host path. A run folder under /tmp would be hidden and every worker
# would fail with "kpipe-worker: not found".
case "$(realpath -m "$KPIPE_RUN")/" in
  /tmp/*) die "run folder $KPIPE_RUN is under /tmp, which pods mount an emptyDir over: set KPIPE_RUN (or KPIPE_CACHE / XDG_CACHE_HOME) outside /tmp" ;;
esac
mkdir -p "$KPIPE_RUN"/{pids,logs,pods,bin}
P="$KPIPE_RUN/pki"

# ---------------------------------------------------------------- network: bridge for pod network namespaces
if ! bridge_healthy; then
  log "creating bridge $KPIPE_BRIDGE ($KPIPE_BRIDGE_IP/$KPIPE_POD_PREFIX_LEN)"
  ip link show "$KPIPE_BRIDGE" >/dev/null 2>&1 || ip link add "$KPIPE_BRIDGE" type bridge \
    || die "cannot create bridge $KPIPE_BRIDGE (needs CAP_NET_ADMIN)"
  ip addr replace "$KPIPE_BRIDGE_IP/$KPIPE_POD_PREFIX_LEN" dev "$KPIPE_BRIDGE"
  ip link set "$KPIPE_BRIDGE" up
  bridge_healthy || die "bridge $KPIPE_BRIDGE has no address $KPIPE_BRIDGE_IP"
fi

# ---------------------------------------------------------------- PKI (generated once per run dir)
if [ ! -f "$P/.complete" ]; then
  log "generating PKI in $P"
  rm -rf "$P"; mkdir -p "$P"
  (
    cd "$P"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj "/CN=kpipe-testbed-ca" \
      -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
    printf 'subjectAltName=DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:127.0.0.1,IP:10.0.0.1,IP:%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' \
      "$KPIPE_BRIDGE_IP" > server.ext
    printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' > client.ext
    openssl req -newkey rsa:2048 -nodes -keyout apiserver.key -out apiserver.csr -subj "/CN=kube-apiserver" 2>/dev/null
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out apiserver.crt -extfile server.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout admin.key -out admin.csr -subj "/O=system:masters/CN=kpipe-admin" 2>/dev/null
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out admin.crt -extfile client.ext 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    rm -f ./*.csr
  ) || die "openssl failed while generating the PKI"
  touch "$P/.complete"
fi
if [ ! -f "$P/front-proxy-client.crt" ]; then
  (
    cd "$P"
    openssl req -newkey rsa:2048 -nodes -keyout front-proxy-client.key -out front-proxy-client.csr -subj "/CN=front-proxy-client" 2>/dev/null
    openssl x509 -req -in front-proxy-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -out front-proxy-client.crt -extfile client.ext 2>/dev/null
    rm -f front-proxy-client.csr
  ) || die "openssl failed while generating the front-proxy client certificate"
fi
if [ ! -f "$P/kubelet.crt" ]; then
  (
    cd "$P"
    printf 'subjectAltName=DNS:%s,IP:%s\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n' \
      "$KPIPE_NODE" "$KPIPE_BRIDGE_IP" > kubelet.ext
    openssl req -newkey rsa:2048 -nodes -keyout kubelet.key -out kubelet.csr -subj "/CN=system:node:$KPIPE_NODE" 2>/dev/null
    openssl x509 -req -in kubelet.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -out kubelet.crt -extfile kubelet.ext 2>/dev/null
    rm -f kubelet.csr
  ) || die "openssl failed while generating the kubelet serving certificate"
fi
cat > "$KPIPE_RUN/admin.kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: kpipe-testbed
  cluster:
    server: https://$KPIPE_BRIDGE_IP:$APISERVER_PORT
    certificate-authority: $P/ca.crt
users:
- name: kpipe-admin
  user:
    client-certificate: $P/admin.crt
    client-key: $P/admin.key
contexts:
- name: kpipe-testbed
  context: {cluster: kpipe-testbed, user: kpipe-admin}
current-context: kpipe-testbed
KC

# ---------------------------------------------------------------- process helpers
# start <component> <cmdline-match> <cmd...>: runs detached in its own session, output to logs/<component>.log.
# The command is remembered so wait_healthy can start it again if a pre-existing (e.g. shutting-down) process dies.
declare -A START_CMD STARTED RETRIED
declare -A PORT_OF=([etcd]=$ETCD_PORT [kube-apiserver]=$APISERVER_PORT [kube-controller-manager]=10257
  [kafka]=$KAFKA_PORT [kubelet]=10250 [oidc]=$KPIPE_OIDC_PORT)
# port_owner <port>: pid of the process listening on a TCP port (empty if free).
port_owner() { ss -Hltnp "sport = :$1" 2>/dev/null | sed -n 's/.*pid=\([0-9]*\).*/\1/p' | head -1; }
start() {
  local name=$1 match=$2 owner; shift 2
  START_CMD[$name]=$(printf '%q ' "$@")
  if alive "$name" "$match"; then return 0; fi
  owner=$(port_owner "${PORT_OF[$name]}")
  [ -z "$owner" ] || die "cannot start $name: port ${PORT_OF[$name]} is used by pid $owner ($(tr '\0' ' ' </proc/"$owner"/cmdline 2>/dev/null | cut -c1-80)) which this bed does not track; stop it (or run down.sh) first"
  log "starting $name"
  STARTED[$name]=1
  spawn "$name" "$match"
}
# spawn <component> <cmdline-match>: runs the remembered command detached in its own session and records its pid.
spawn() {
  local name=$1 match=$2 pid close="" fd
  # No descriptor this script inherited may live on in a daemon: `flock /work/bed.lock cargo test ...` hands its lock
  # (fd 3) down to a test that restarts Kafka through this script, and a broker holding it would hold the bed's lock
  # until it exits (every later `flock` waits forever). bash's own script descriptor (255) is close-on-exec.
  for fd in $(ls /proc/$$/fd); do
    if [ "$fd" -gt 2 ] && [ "$fd" -lt 255 ]; then close+=" $fd>&-"; fi
  done
  eval "setsid ${START_CMD[$name]} >>\"\$KPIPE_RUN/logs/$name.log\" 2>&1 </dev/null$close &"
  pid=$!
  echo "$pid" >"$(pidfile "$name")"
  # $! execs twice: this shell's copy becomes `setsid <program> …`, which becomes the program. Until the second exec,
  # and for a moment during it (an exec in progress reads as an empty cmdline), `alive` would take it for an early
  # exit and start a second copy (two kubelets running every pod twice; two controller-managers, one of them on a
  # port the bed does not track). setsid's own cmdline contains the program's name, so wait until argv[0] is no
  # longer setsid and the cmdline matches.
  local argv0
  for _ in $(seq 1 100); do
    [ -r "/proc/$pid/cmdline" ] || break
    argv0=
    IFS= read -r -d '' argv0 <"/proc/$pid/cmdline" 2>/dev/null || true
    if [ -n "$argv0" ] && [ "${argv0##*/}" != setsid ] && tr '\0' ' ' <"/proc/$pid/cmdline" | matches "$match"; then
      break
    fi
    sleep 0.05
  done
}
# wait_healthy <component> <cmdline-match> <check-fn> <timeout-s>
wait_healthy() {
  local name=$1 match=$2 check=$3 timeout=$4 s
  s=$(date +%s)
  until "$check"; do
    if ! alive "$name" "$match"; then
      if [ -z "${STARTED[$name]:-}" ] && [ -n "${START_CMD[$name]:-}" ]; then
        # It was an old process that was still running (unhealthy, e.g. shutting down): start a fresh one.
        log "$name (pre-existing, unhealthy) exited: starting it again"
        STARTED[$name]=1
        spawn "$name" "$match"
        s=$(date +%s)
        continue
      fi
      if [ -z "${RETRIED[$name]:-}" ] && [ -n "${START_CMD[$name]:-}" ]; then
        # One retry: right after a fresh PKI the controller-manager has been seen to fail its first TLS handshake
        # with the just-started apiserver (and exit); a second start succeeds.
        RETRIED[$name]=1
        log "$name exited during startup: retrying once (log: $KPIPE_RUN/logs/$name.log)"
        sleep 1
        spawn "$name" "$match"
        s=$(date +%s)
        continue
      fi
      tail -n 30 "$KPIPE_RUN/logs/$name.log" >&2 || true
      die "$name exited during startup (log: $KPIPE_RUN/logs/$name.log)"
    fi
    if [ -z "${STARTED[$name]:-}" ] && [ $(( $(date +%s) - s )) -ge 10 ]; then
      # A process from an earlier run that stays unhealthy (typically a slow graceful shutdown): replace it.
      log "pre-existing $name unhealthy for 10s: killing it (it gets restarted)"
      kill -KILL "$(cat "$(pidfile "$name")")" 2>/dev/null || true
      for _ in $(seq 1 50); do alive "$name" "$match" || break; sleep 0.1; done
      continue
    fi
    if [ $(( $(date +%s) - s )) -ge "$timeout" ]; then
      tail -n 30 "$KPIPE_RUN/logs/$name.log" >&2 || true
      die "$name not healthy after ${timeout}s (log: $KPIPE_RUN/logs/$name.log)"
    fi
    sleep 0.3
  done
  alive "$name" "$match" || die "$name exited right after startup (log: $KPIPE_RUN/logs/$name.log)"
  log "$name ready ($(( $(date +%s) - s ))s)"
}

# ---------------------------------------------------------------- etcd
mkdir -p "$KPIPE_RUN/etcd"
start etcd etcd "$ETCD_BIN/etcd" --name=kpipe --data-dir="$KPIPE_RUN/etcd" --log-level=warn --unsafe-no-fsync=true \
  --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
  --initial-cluster=kpipe=http://127.0.0.1:2380 --listen-metrics-urls=http://127.0.0.1:2381
wait_healthy etcd etcd etcd_healthy 30

# ---------------------------------------------------------------- kube-apiserver
# Binds all addresses: the host reaches it on 127.0.0.1 or the bridge address, pods on the bridge address.
start kube-apiserver kube-apiserver "$K8S_BIN/kube-apiserver" \
  --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=0.0.0.0 --secure-port="$APISERVER_PORT" \
  --advertise-address=127.0.0.1 --endpoint-reconciler-type=none \
  --tls-cert-file="$P/apiserver.crt" --tls-private-key-file="$P/apiserver.key" \
  --client-ca-file="$P/ca.crt" \
  --service-account-issuer=https://kubernetes.default.svc.cluster.local \
  --service-account-key-file="$P/sa.pub" --service-account-signing-key-file="$P/sa.key" \
  --service-cluster-ip-range=10.0.0.0/24 \
  --service-account-max-token-expiration=8760h \
  --requestheader-client-ca-file="$P/ca.crt" --requestheader-allowed-names=front-proxy-client \
  --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group \
  --requestheader-extra-headers-prefix=X-Remote-Extra- \
  --proxy-client-cert-file="$P/front-proxy-client.crt" --proxy-client-key-file="$P/front-proxy-client.key" \
  --kubelet-preferred-address-types=InternalIP --kubelet-certificate-authority="$P/ca.crt" \
  --kubelet-client-certificate="$P/admin.crt" --kubelet-client-key="$P/admin.key" \
  --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
  --allow-privileged=true --profiling=false --v=1
wait_healthy kube-apiserver kube-apiserver apiserver_healthy 120
if [ -n "${STARTED[kube-apiserver]:-}" ] && alive kube-controller-manager kube-controller-manager; then
  # client-go informers back off up to 30 s after losing the apiserver; a fresh kcm resyncs at once (~1 s).
  log "kube-apiserver was (re)started: restarting kube-controller-manager too"
  kill -TERM "$(cat "$(pidfile kube-controller-manager)")" 2>/dev/null || true
  for _ in $(seq 1 100); do alive kube-controller-manager kube-controller-manager || break; sleep 0.1; done
  if alive kube-controller-manager kube-controller-manager; then
    kill -KILL "$(cat "$(pidfile kube-controller-manager)")" 2>/dev/null || true
  fi
  for _ in $(seq 1 20); do [ -z "$(port_owner 10257)" ] && break; sleep 0.1; done
  rm -f "$(pidfile kube-controller-manager)"
fi

# ---------------------------------------------------------------- kube-controller-manager
start kube-controller-manager kube-controller-manager "$K8S_BIN/kube-controller-manager" \
  --kubeconfig="$KPIPE_RUN/admin.kubeconfig" \
  --authentication-kubeconfig="$KPIPE_RUN/admin.kubeconfig" --authorization-kubeconfig="$KPIPE_RUN/admin.kubeconfig" \
  --leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 \
  --service-account-private-key-file="$P/sa.key" --root-ca-file="$P/ca.crt" \
  --cluster-name=kpipe-testbed --controllers='*' --v=1
wait_healthy kube-controller-manager kube-controller-manager kcm_healthy 60

# ---------------------------------------------------------------- Kafka (KRaft, combined broker+controller)
K="$KPIPE_RUN/kafka"
mkdir -p "$K/data" "$K/logs"
# Secured listeners beside PLAINTEXT (SASL_SSL + SCRAM-SHA-512, SSL + client certificates, SASL_SSL + OAUTHBEARER);
# the PKI and the OIDC issuer's key are generated once under the run dir (kept across restarts, regenerated when
# missing).
source "$TESTBED_DIR/kafka-security.sh"
KS="$K/security"
security_pki "$KS" "$KPIPE_BRIDGE_IP" || die "generating the Kafka test PKI in $KS failed"
security_oidc_material "$KS" || die "generating the OIDC issuer's key in $KS failed"
# The OIDC issuer before the broker: the OAUTHBEARER listener's validator fetches its JWKS.
mapfile -t OIDC_CMD < <(security_oidc_cmd "$KS" "$KPIPE_BRIDGE_IP" "$KPIPE_OIDC_PORT")
start oidc kpipe-test-oidc "${OIDC_CMD[@]}"
wait_healthy oidc kpipe-test-oidc oidc_healthy 30
{
cat <<PROPS
# generated by e2e/testbed/up.sh
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://$KPIPE_BRIDGE_IP:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT,SCRAM://$KPIPE_BRIDGE_IP:$KAFKA_SCRAM_PORT,MTLS://$KPIPE_BRIDGE_IP:$KAFKA_MTLS_PORT,OAUTH://$KPIPE_BRIDGE_IP:$KAFKA_OAUTH_PORT
advertised.listeners=PLAINTEXT://$KPIPE_BRIDGE_IP:$KAFKA_PORT,SCRAM://$KPIPE_BRIDGE_IP:$KAFKA_SCRAM_PORT,MTLS://$KPIPE_BRIDGE_IP:$KAFKA_MTLS_PORT,OAUTH://$KPIPE_BRIDGE_IP:$KAFKA_OAUTH_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SCRAM:SASL_SSL,MTLS:SSL,OAUTH:SASL_SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$K/data
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
auto.create.topics.enable=true
delete.topic.enable=true
num.network.threads=2
num.io.threads=4
PROPS
security_properties "$KS" "$KPIPE_BRIDGE_IP" "$KPIPE_OIDC_PORT"
} > "$K/server.properties.new"
# A running broker started with other properties (e.g. before a listener was added) is restarted with the new ones.
if alive kafka kafka.Kafka && [ -f "$K/server.properties" ] && ! cmp -s "$K/server.properties" "$K/server.properties.new"; then
  log "Kafka's server.properties changed: restarting Kafka"
  kpid=$(cat "$(pidfile kafka)")
  kill -TERM "$kpid" 2>/dev/null || true
  for _ in $(seq 1 600); do alive kafka kafka.Kafka || break; sleep 0.1; done
  if alive kafka kafka.Kafka; then kill -KILL "$kpid" 2>/dev/null || true; sleep 0.5; fi
  rm -f "$(pidfile kafka)"
fi
mv "$K/server.properties.new" "$K/server.properties"
cat > "$K/log4j2.properties" <<'L4J'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
logger.srv.name = kafka.server.KafkaRaftServer
logger.srv.level = INFO
logger.brk.name = kafka.server.BrokerServer
logger.brk.level = INFO
L4J
cat > "$K/tools-log4j2.properties" <<'L4J'
status = error
appender.err.type = Console
appender.err.name = ERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = ERROR
rootLogger.appenderRef.err.ref = ERR
L4J
KAFKA_JOPTS=(-Xms512m -Xmx1g -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:+ExplicitGCInvokesConcurrent
  -Djava.awt.headless=true "-Dlog4j2.configurationFile=file:$K/log4j2.properties" "-Dkafka.logs.dir=$K/logs"
  "$(security_oidc_jvm_opt "$KPIPE_BRIDGE_IP" "$KPIPE_OIDC_PORT")")
if ! alive kafka kafka.Kafka; then
  if [ ! -f "$K/data/meta.properties" ]; then
    log "formatting Kafka KRaft storage"
    java -Xmx256m "-Dlog4j2.configurationFile=file:$K/tools-log4j2.properties" -cp "$KAFKA_HOME/libs/*" \
      kafka.tools.StorageTool format -t "$(cat "$K/cluster-id" 2>/dev/null || echo a3BpcGUtdGVzdGJlZC0wMQ)" \
      -c "$K/server.properties" --ignore-formatted >>"$KPIPE_RUN/logs/kafka.log" 2>&1 \
      || { tail -n 20 "$KPIPE_RUN/logs/kafka.log" >&2; die "kafka storage format failed"; }
  fi
fi
start kafka kafka.Kafka java "${KAFKA_JOPTS[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$K/server.properties"
wait_healthy kafka kafka.Kafka kafka_healthy 120
# The SCRAM user (idempotent: an existing credential is reset to the cached password).
KAFKA_TOOLS_LOG4J="$K/tools-log4j2.properties" security_scram_user "$KS" "$KPIPE_BRIDGE_IP:$KAFKA_PORT" \
  || die "creating the SCRAM user with kafka-configs failed"
# ACLs: topics and groups named $SECURED_PREFIX* are closed to unauthenticated (PLAINTEXT) clients (idempotent).
KAFKA_TOOLS_LOG4J="$K/tools-log4j2.properties" security_acls "$KPIPE_BRIDGE_IP:$KAFKA_PORT" \
  || die "creating the secured prefix's ACLs with kafka-acls failed"

# ---------------------------------------------------------------- tool wrappers (kafka CLIs, kubectl, helm)
B="$KPIPE_RUN/bin"
ln -sf "$K8S_BIN/kubectl" "$B/kubectl"
ln -sf "$HELM_BIN/helm" "$B/helm"
ln -sf "$ETCD_BIN/etcd" "$B/etcd"
kafka_tool() {
  cat > "$B/$1" <<SH
#!/usr/bin/env bash
# $1 for the kpipe test bed (Kafka $KAFKA_VERSION jars from Maven Central)
exec java \${KAFKA_TOOL_HEAP:--Xmx512m} -Dlog4j2.configurationFile=file:$K/tools-log4j2.properties -cp '$KAFKA_HOME/libs/*' $2 "\$@"
SH
  chmod +x "$B/$1"
}
kafka_tool kafka-topics org.apache.kafka.tools.TopicCommand
kafka_tool kafka-consumer-groups org.apache.kafka.tools.consumer.group.ConsumerGroupCommand
kafka_tool kafka-producer-perf-test org.apache.kafka.tools.ProducerPerformance
kafka_tool kafka-consumer-perf-test org.apache.kafka.tools.ConsumerPerformance
kafka_tool kafka-console-producer org.apache.kafka.tools.ConsoleProducer
kafka_tool kafka-console-consumer org.apache.kafka.tools.consumer.ConsoleConsumer
kafka_tool kafka-cluster org.apache.kafka.tools.ClusterTool
kafka_tool kafka-get-offsets org.apache.kafka.tools.GetOffsetShell
kafka_tool kafka-configs kafka.admin.ConfigCommand
kafka_tool kafka-metadata-quorum org.apache.kafka.tools.MetadataQuorumCommand

# ---------------------------------------------------------------- process kubelet
if alive kubelet kpipe-kubelet && kubelet_outdated; then
  log "kubelet binary was rebuilt: restarting the kubelet (its pods get restarted)"
  kpid=$(cat "$(pidfile kubelet)")
  kill -TERM "$kpid" 2>/dev/null || true
  for _ in $(seq 1 300); do alive kubelet kpipe-kubelet || break; sleep 0.1; done
  if alive kubelet kpipe-kubelet; then kill -KILL "$kpid" 2>/dev/null || true; fi
  rm -f "$(pidfile kubelet)"
fi
start kubelet kpipe-kubelet "$KUBELET_BIN" \
  --kubeconfig "$KPIPE_RUN/admin.kubeconfig" --node-name "$KPIPE_NODE" --run-dir "$KPIPE_RUN" \
  --bridge "$KPIPE_BRIDGE" --bridge-ip "$KPIPE_BRIDGE_IP" --prefix-len "$KPIPE_POD_PREFIX_LEN" \
  --pod-apiserver "https://$KPIPE_BRIDGE_IP:$APISERVER_PORT" --ca-file "$P/ca.crt" \
  --images "${KPIPE_IMAGES:-$TESTBED_DIR/images.conf}" --repo-root "$REPO_ROOT" --target-dir "$CARGO_TARGET" \
  --tls-cert-file "$P/kubelet.crt" --tls-key-file "$P/kubelet.key" --port 10250
wait_healthy kubelet kpipe-kubelet kubelet_healthy 60

# ---------------------------------------------------------------- env file for tests and scripts
cat > "$KPIPE_RUN/env.tmp" <<ENV
KPIPE_RUN=$KPIPE_RUN
KPIPE_CACHE=$KPIPE_CACHE
KUBECONFIG=$KPIPE_RUN/admin.kubeconfig
KPIPE_APISERVER=https://$KPIPE_BRIDGE_IP:$APISERVER_PORT
KPIPE_CA_FILE=$P/ca.crt
KAFKA_BOOTSTRAP=$KPIPE_BRIDGE_IP:$KAFKA_PORT
KAFKA_SCRAM_BOOTSTRAP=$KPIPE_BRIDGE_IP:$KAFKA_SCRAM_PORT
KAFKA_MTLS_BOOTSTRAP=$KPIPE_BRIDGE_IP:$KAFKA_MTLS_PORT
KAFKA_OAUTH_BOOTSTRAP=$KPIPE_BRIDGE_IP:$KAFKA_OAUTH_PORT
KAFKA_SECURITY_DIR=$KS
KAFKA_SECURED_PREFIX=$SECURED_PREFIX
KPIPE_OIDC_ISSUER=http://$KPIPE_BRIDGE_IP:$KPIPE_OIDC_PORT
KPIPE_OIDC_TOKEN_URL=http://$KPIPE_BRIDGE_IP:$KPIPE_OIDC_PORT/token
KAFKA_HOME=$KAFKA_HOME
KAFKA_VERSION=$KAFKA_VERSION
K8S_VERSION=$K8S_VERSION
KUBECTL=$K8S_BIN/kubectl
HELM=$HELM_BIN/helm
KPIPE_BIN=$B
KPIPE_NODE=$KPIPE_NODE
KPIPE_BRIDGE_IP=$KPIPE_BRIDGE_IP
KPIPE_POD_LOGS=$KPIPE_RUN/pods
KPIPE_LOGS=$KPIPE_RUN/logs
ENV
mv "$KPIPE_RUN/env.tmp" "$KPIPE_RUN/env"
log "test bed up in $(( $(date +%s) - t0 ))s. Use it with:  set -a; . $KPIPE_RUN/env; set +a; export PATH=\$KPIPE_BIN:\$PATH"
