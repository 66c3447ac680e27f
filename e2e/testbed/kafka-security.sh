#!/usr/bin/env bash
# Secured Kafka listeners for the test bed: SASL_SSL with SCRAM-SHA-512 and SSL with client certificates (mutual
# TLS), on top of the bed's PLAINTEXT listener. Everything offline: the CA and certificates come from openssl, the
# SCRAM user from Kafka's own tools.
#
# Sourced by up.sh (functions only), or run on its own to start a private secured broker for development:
#   kafka-security.sh run DIR HOST PLAIN_PORT CONTROLLER_PORT SCRAM_PORT MTLS_PORT   (foreground; caller kills it)
# Needs KAFKA_HOME (the bed's env file sets it).
#
# Material (regenerated when missing, kept otherwise) in DIR/pki:
#   ca.crt / ca.key            the CA that signed the broker and client certificates
#   broker.crt / broker.key    the broker's certificate: IP SANs for HOST and 127.0.0.1, DNS SAN localhost
#   client.crt / client.key    a client certificate for mutual TLS (CN=kpipe-mtls-client)
#   expired-client.crt/.key    a client certificate signed by the CA that expired in 2020
#   other-ca.crt               a CA that signed nothing of the broker's (an "untrusted CA" for tests)
#   scram-user / scram-password  the SCRAM-SHA-512 user kafka-configs creates

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

# Print the server.properties lines of the secured listeners. $1 pki dir, $2 host, $3 SCRAM port, $4 mTLS port.
# The caller adds `SCRAM://$host:$3,MTLS://$host:$4` to listeners/advertised.listeners and
# `SCRAM:SASL_SSL,MTLS:SSL` to listener.security.protocol.map.
security_properties() {
  local d=$1
  cat <<PROPS
# secured listeners (e2e/testbed/kafka-security.sh): SCRAM = SASL_SSL + SCRAM-SHA-512, MTLS = SSL + client certs
ssl.keystore.type=PEM
ssl.keystore.location=$d/broker-keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$d/ca.crt
ssl.endpoint.identification.algorithm=https
listener.name.scram.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.scram.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.mtls.ssl.client.auth=required
PROPS
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
  dir=$2 host=$3 port=$4 cport=$5 sport=$6 mport=$7
  : "${KAFKA_HOME:?KAFKA_HOME not set (source the test bed env)}"
  mkdir -p "$dir/data"
  security_pki "$dir/pki" "$host"
  {
    cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://$host:$port,CONTROLLER://127.0.0.1:$cport,SCRAM://$host:$sport,MTLS://$host:$mport
advertised.listeners=PLAINTEXT://$host:$port,SCRAM://$host:$sport,MTLS://$host:$mport
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SCRAM:SASL_SSL,MTLS:SSL
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
    security_properties "$dir/pki"
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
    "-Dlog4j2.configurationFile=file:$dir/log4j2.properties" "-Dkafka.logs.dir=$dir")
  java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format -t a3BpcGUtc2VjdXJlLTAwMQ \
    -c "$dir/server.properties" --ignore-formatted \
    --add-scram "SCRAM-SHA-512=[name=$(cat "$dir/pki/scram-user"),password=$(cat "$dir/pki/scram-password")]" \
    >/dev/null
  exec java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties"
fi
