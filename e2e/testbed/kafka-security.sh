#!/usr/bin/env bash
# Secured Kafka listeners for the test bed: SASL_SSL with SCRAM-SHA-512, SSL with client certificates (mutual
# TLS) and SASL_SSL with OAUTHBEARER (tokens of the bed's own OIDC issuer, `kpipe-test-oidc`, validated by Kafka's
# OAuthBearerValidatorCallbackHandler against the issuer's JWKS), on top of the bed's PLAINTEXT listener. Kafka's
# StandardAuthorizer keeps every resource open to everyone except topics and groups named with the secured prefix
# (`kpipe-secured-`), which unauthenticated (PLAINTEXT, User:ANONYMOUS) clients may not touch. Everything offline:
# the CA, certificates and the issuer's key come from openssl, the SCRAM user and the ACLs from Kafka's own tools.
#
# Sourced by up.sh (functions only), or run on its own to start a private secured broker (and its issuer) for
# development:
#   kafka-security.sh run DIR HOST PLAIN_PORT CONTROLLER_PORT SCRAM_PORT MTLS_PORT OAUTH_PORT OIDC_PORT
# (foreground; the caller stops it with SIGTERM/SIGINT, which stops the issuer too). Needs KAFKA_HOME (the bed's
# env file sets it) and the issuer binary (KPIPE_OIDC_BIN, default $CARGO_TARGET_DIR/debug/kpipe-test-oidc).
#
# Material (regenerated when missing, kept otherwise) in DIR/pki:
#   ca.crt / ca.key            the CA that signed the broker and client certificates
#   broker.crt / broker.key    the broker's certificate: IP SANs for HOST and 127.0.0.1, DNS SAN localhost
#   client.crt / client.key    a client certificate for mutual TLS (CN=kpipe-mtls-client)
#   expired-client.crt/.key    a client certificate signed by the CA that expired in 2020
#   other-ca.crt               a CA that signed nothing of the broker's (an "untrusted CA" for tests)
#   scram-user / scram-password  the SCRAM-SHA-512 user kafka-configs creates
#   oidc-key.pem               the OIDC issuer's RS256 signing key (PKCS#8)
#   oidc-client-id / oidc-client-secret  the client of the issuer's client-credentials grant

# Topics and consumer groups whose names start with this are refused to unauthenticated clients (ACLs).
SECURED_PREFIX=kpipe-secured-
# `aud` of the issuer's tokens, which the broker expects.
OIDC_AUDIENCE=kafka

# Generate the PKI in $1 for broker host $2 unless it is complete and names that host.
security_pki() {
  local d=$1 host=$2
  mkdir -p "$d"
  if [ -f "$d/.complete" ] && [ "$(cat "$d/.host" 2>/dev/null)" = "$host" ]; then return 0; fi
  rm -rf "$d" && mkdir -p "$d"
  (
    set -e
    cd "$d"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -sha256 \
      -subj "/CN=kpipe-testbed-kafka-ca" 2>/dev/null
    openssl req -x509 -newkey rsa:2048 -nodes -keyout other-ca.key -out other-ca.crt -days 3650 -sha256 \
      -subj "/CN=kpipe-testbed-untrusted-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout broker.key -out broker.csr -subj "/CN=kpipe-testbed-kafka" 2>/dev/null
    printf 'subjectAltName=IP:%s,IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' "$host" >broker.ext
    openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out broker.crt -days 3650 -sha256 \
      -extfile broker.ext 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout client.key -out client.csr -subj "/CN=kpipe-mtls-client" 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' >client.ext
    openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 3650 -sha256 \
      -extfile client.ext 2>/dev/null
    # An expired client certificate: `openssl ca` is the CLI that takes explicit validity dates.
    openssl req -newkey rsa:2048 -nodes -keyout expired-client.key -out expired-client.csr \
      -subj "/CN=kpipe-expired-client" 2>/dev/null
    mkdir -p ca-db && : >ca-db/index.txt && echo 1000 >ca-db/serial
    cat >ca-db/ca.cnf <<CNF
[ ca ]
default_ca = testbed
[ testbed ]
dir = $d/ca-db
database = \$dir/index.txt
serial = \$dir/serial
new_certs_dir = \$dir
certificate = $d/ca.crt
private_key = $d/ca.key
default_md = sha256
policy = any
unique_subject = no
[ any ]
commonName = supplied
CNF
    openssl ca -batch -config ca-db/ca.cnf -in expired-client.csr -out expired-client.crt \
      -startdate 20200101000000Z -enddate 20200102000000Z -notext 2>/dev/null
    # The broker's PEM keystore: unencrypted PKCS#8 key + certificate.
    openssl pkcs8 -topk8 -nocrypt -in broker.key -out broker.pk8
    cat broker.pk8 broker.crt >broker-keystore.pem
    echo kpipe-scram >scram-user
    openssl rand -hex 16 >scram-password
    rm -f ./*.csr ./*.ext
    chmod 600 ./*.key broker.pk8 broker-keystore.pem scram-password
    echo "$host" >.host
    touch .complete
  )
}

# The OIDC issuer's signing key and client in $1 (generated when missing, kept otherwise; kept apart from
# security_pki's marker so a PKI made before the OAUTHBEARER listener gains them without new certificates).
security_oidc_material() {
  local d=$1
  [ -f "$d/oidc-key.pem" ] && [ -f "$d/oidc-client-id" ] && [ -f "$d/oidc-client-secret" ] && return 0
  (
    set -e
    cd "$d"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out oidc-key.pem 2>/dev/null
    echo kpipe-oidc-client >oidc-client-id
    openssl rand -hex 16 >oidc-client-secret
    chmod 600 oidc-key.pem oidc-client-secret
  )
}

# The issuer's command line: $1 pki dir, $2 host, $3 issuer port (the binary is $OIDC_BIN).
security_oidc_cmd() {
  local d=$1 host=$2 port=$3
  printf '%s\n' "$OIDC_BIN" --listen "$host:$port" --key "$d/oidc-key.pem" --client-id "$(cat "$d/oidc-client-id")" \
    --client-secret-file "$d/oidc-client-secret" --audience "$OIDC_AUDIENCE"
}

# The issuer answers its discovery document. $1 host, $2 issuer port.
security_oidc_healthy() { curl -fsS -m 2 "http://$1:$2/.well-known/openid-configuration" >/dev/null 2>&1; }

# The JVM option Kafka 4 needs before it fetches a JWKS from a URL (org.apache.kafka.sasl.oauthbearer.allowed.urls).
# $1 host, $2 issuer port.
security_oidc_jvm_opt() { echo "-Dorg.apache.kafka.sasl.oauthbearer.allowed.urls=http://$1:$2/jwks,http://$1:$2/token"; }

# Print the server.properties lines of the secured listeners and the authorizer. $1 pki dir, $2 host, $3 issuer
# port. The caller adds `SCRAM://…,MTLS://…,OAUTH://…` to listeners/advertised.listeners and
# `SCRAM:SASL_SSL,MTLS:SSL,OAUTH:SASL_SSL` to listener.security.protocol.map.
security_properties() {
  local d=$1 host=$2 oidc_port=$3
  cat <<PROPS
# secured listeners (e2e/testbed/kafka-security.sh): SCRAM = SASL_SSL + SCRAM-SHA-512, MTLS = SSL + client certs,
# OAUTH = SASL_SSL + OAUTHBEARER (JWTs of the bed's OIDC issuer, checked against its JWKS)
ssl.keystore.type=PEM
ssl.keystore.location=$d/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.crt
ssl.endpoint.identification.algorithm=https
listener.name.scram.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.scram.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.mtls.ssl.client.auth=required
listener.name.oauth.sasl.enabled.mechanisms=OAUTHBEARER
listener.name.oauth.oauthbearer.sasl.jaas.config=org.apache.kafka.common.security.oauthbearer.OAuthBearerLoginModule required unsecuredLoginStringClaim_sub="kpipe-broker";
listener.name.oauth.oauthbearer.sasl.server.callback.handler.class=org.apache.kafka.common.security.oauthbearer.OAuthBearerValidatorCallbackHandler
# Sessions end with their token (KIP-368 re-authentication; the hour is only the upper bound): a client that cannot
# get a new token from the issuer loses its connections when the old token expires, as on managed Kafkas.
listener.name.oauth.oauthbearer.connections.max.reauth.ms=3600000
sasl.oauthbearer.jwks.endpoint.url=http://$host:$oidc_port/jwks
sasl.oauthbearer.expected.audience=$OIDC_AUDIENCE
sasl.oauthbearer.expected.issuer=http://$host:$oidc_port
# ACLs: everything stays open (no ACL on a resource = allowed) except the secured prefix, where every
# authenticated principal is allowed and User:ANONYMOUS (PLAINTEXT) is denied (security_acls).
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=true
PROPS
}

# The ACLs of the secured prefix through the PLAINTEXT listener $1 (idempotent): ALLOW User:* (a resource with an
# ACL is closed to principals no ACL names) and DENY User:ANONYMOUS (DENY wins), on prefixed topics and groups.
security_acls() {
  local bootstrap=$1 log=() who
  [ -z "${KAFKA_TOOLS_LOG4J:-}" ] || log=("-Dlog4j2.configurationFile=file:$KAFKA_TOOLS_LOG4J")
  for who in "--allow-principal=User:*" "--deny-principal=User:ANONYMOUS"; do
    java -Xmx256m "${log[@]}" -cp "$KAFKA_HOME/libs/*" org.apache.kafka.tools.AclCommand \
      --bootstrap-server "$bootstrap" --add "$who" --operation All \
      --topic "$SECURED_PREFIX" --group "$SECURED_PREFIX" --resource-pattern-type prefixed >/dev/null || return 1
  done
}

# Create (or reset) the SCRAM-SHA-512 credential of the bed's user through the PLAINTEXT listener $2 with Kafka's
# ConfigCommand. $1 pki dir.
security_scram_user() {
  local d=$1 bootstrap=$2 log=()
  [ -z "${KAFKA_TOOLS_LOG4J:-}" ] || log=("-Dlog4j2.configurationFile=file:$KAFKA_TOOLS_LOG4J")
  java -Xmx256m "${log[@]}" -cp "$KAFKA_HOME/libs/*" \
    kafka.admin.ConfigCommand --bootstrap-server "$bootstrap" --alter --entity-type users \
    --entity-name "$(cat "$d/scram-user")" \
    --add-config "SCRAM-SHA-512=[iterations=4096,password=$(cat "$d/scram-password")]" >/dev/null
}

if [ "${BASH_SOURCE[0]}" = "$0" ] && [ "${1:-}" = run ]; then
  set -euo pipefail
  dir=$2 host=$3 port=$4 cport=$5 sport=$6 mport=$7 oport=$8 iport=$9
  : "${KAFKA_HOME:?KAFKA_HOME not set (source the test bed env)}"
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  OIDC_BIN=${KPIPE_OIDC_BIN:-${CARGO_TARGET_DIR:-$repo/target}/debug/kpipe-test-oidc}
  [ -x "$OIDC_BIN" ] || { echo "$OIDC_BIN missing (cargo build -p kpipe-e2e --bin kpipe-test-oidc)" >&2; exit 1; }
  mkdir -p "$dir/data"
  security_pki "$dir/pki" "$host"
  security_oidc_material "$dir/pki"
  {
    cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://$host:$port,CONTROLLER://127.0.0.1:$cport,SCRAM://$host:$sport,MTLS://$host:$mport,OAUTH://$host:$oport
advertised.listeners=PLAINTEXT://$host:$port,SCRAM://$host:$sport,MTLS://$host:$mport,OAUTH://$host:$oport
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SCRAM:SASL_SSL,MTLS:SSL,OAUTH:SASL_SSL
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs=$dir/data
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.network.threads=1
num.io.threads=2
PROPS
    security_properties "$dir/pki" "$host" "$iport"
  } >"$dir/server.properties"
  cat >"$dir/log4j2.properties" <<'L4J'
status = error
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.out.ref = OUT
L4J
  jopts=(-Xms128m -Xmx384m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true
    "-Dlog4j2.configurationFile=file:$dir/log4j2.properties" "-Dkafka.logs.dir=$dir"
    "$(security_oidc_jvm_opt "$host" "$iport")")
  # The issuer first: the broker's validator fetches the JWKS when the listener starts.
  mapfile -t oidc_cmd < <(security_oidc_cmd "$dir/pki" "$host" "$iport")
  "${oidc_cmd[@]}" >>"$dir/oidc.log" 2>&1 &
  oidc_pid=$!
  broker_pid=
  trap 'kill -TERM $oidc_pid $broker_pid 2>/dev/null; wait' EXIT
  trap 'exit 143' TERM INT
  for _ in $(seq 1 50); do security_oidc_healthy "$host" "$iport" && break; sleep 0.1; done
  java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format -t a3BpcGUtc2VjdXJlLTAwMQ \
    -c "$dir/server.properties" --ignore-formatted \
    --add-scram "SCRAM-SHA-512=[name=$(cat "$dir/pki/scram-user"),password=$(cat "$dir/pki/scram-password")]" \
    >/dev/null
  java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties" &
  broker_pid=$!
  # The ACLs once the broker answers (the authorizer keeps its ACLs in the metadata log: idempotent).
  for _ in $(seq 1 120); do
    security_acls "$host:$port" 2>/dev/null && { echo "ACLs of $SECURED_PREFIX set" >&2; break; }
    kill -0 "$broker_pid" 2>/dev/null || break
    sleep 1
  done
  wait "$broker_pid"
fi
