#!/usr/bin/env bash
# A private single-node Kafka (KRaft) with a short offset retention, for tests of idle-group
# offsets. offsets.retention.minutes is a read-only broker config, so the shared test bed's broker
# cannot be changed without a restart that would disturb other suites: this broker is the test's own.
# Usage: short-retention-kafka.sh DIR BROKER_PORT CONTROLLER_PORT [HOST]  (runs in the foreground;
# the caller kills it). HOST defaults to 127.0.0.1; the bed's bridge IP makes it reachable from
# worker pods. Needs KAFKA_HOME (the bed's env file sets it).
set -euo pipefail
dir=$1 port=$2 cport=$3 host=${4:-127.0.0.1}
: "${KAFKA_HOME:?KAFKA_HOME not set (source the test bed env)}"
mkdir -p "$dir/data"
cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://$host:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://$host:$port
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
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
offsets.retention.minutes=1
offsets.retention.check.interval.ms=2000
num.network.threads=1
num.io.threads=2
PROPS
cat > "$dir/log4j2.properties" <<'L4J'
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
java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.tools.StorageTool format -t a3BpcGUtaWRsZS10ZXN0MDE \
  -c "$dir/server.properties" --ignore-formatted >/dev/null
exec java "${jopts[@]}" -cp "$KAFKA_HOME/libs/*" kafka.Kafka "$dir/server.properties"
