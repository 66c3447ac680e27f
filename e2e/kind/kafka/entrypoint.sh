#!/bin/sh
# Formats the KRaft storage named by log.dirs on first start (cluster id: $KAFKA_CLUSTER_ID), then runs the broker.
# Config: $KAFKA_CONFIG (default /etc/kafka/server.properties); JVM heap: $KAFKA_HEAP_OPTS.
set -eu
conf=${KAFKA_CONFIG:-/etc/kafka/server.properties}
[ -r "$conf" ] || { echo "kafka-entrypoint: no config at $conf" >&2; exit 1; }
data=$(sed -n 's/^log\.dirs=//p' "$conf" | cut -d, -f1)
[ -n "$data" ] || { echo "kafka-entrypoint: $conf sets no log.dirs" >&2; exit 1; }
cp=/opt/kafka/libs/'*'
log4j=-Dlog4j2.configurationFile=file:/opt/kafka/config/log4j2.properties
if [ ! -f "$data/meta.properties" ]; then
  java -Xmx256m "$log4j" -cp "$cp" kafka.tools.StorageTool format \
    -t "${KAFKA_CLUSTER_ID:-a3BpcGUta2luZC1rYWZrYQ}" -c "$conf" --ignore-formatted
fi
# shellcheck disable=SC2086 # KAFKA_HEAP_OPTS holds several JVM options
exec java ${KAFKA_HEAP_OPTS:--Xms256m -Xmx768m} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
  "$log4j" -Dkafka.logs.dir=/tmp -cp "$cp" kafka.Kafka "$conf"
