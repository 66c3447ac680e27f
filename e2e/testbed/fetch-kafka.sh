#!/usr/bin/env bash
# Resolves Apache Kafka $KAFKA_VERSION (broker + tools jars) from Maven Central into $KAFKA_HOME/libs.
# Idempotent: a complete download (marker file) is reused.
source "$(dirname "$0")/lib.sh"
need mvn
need java
if [ -f "$KAFKA_HOME/.complete" ]; then exit 0; fi
start=$(date +%s)
log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME/libs"
rm -rf "$KAFKA_HOME/libs"; mkdir -p "$KAFKA_HOME/libs"
mvn -B -q -f "$TESTBED_DIR/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
  "org.apache.maven.plugins:maven-dependency-plugin:$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
  -DoutputDirectory="$KAFKA_HOME/libs" -DincludeScope=runtime \
  || die "maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (is Maven Central reachable?)"
core=$(ls "$KAFKA_HOME"/libs/kafka_2.13-"$KAFKA_VERSION".jar 2>/dev/null) || die "kafka_2.13-$KAFKA_VERSION.jar missing after resolve"
unzip -l "$core" | matches 'kafka/Kafka.class' || die "$core has no kafka.Kafka main class"
unzip -l "$core" | matches 'kafka/tools/StorageTool.class' || die "$core has no kafka.tools.StorageTool"
compgen -G "$KAFKA_HOME/libs/log4j-core-*.jar" >/dev/null || die "log4j-core not on the Kafka classpath (check the published POM)"
touch "$KAFKA_HOME/.complete"
log "Kafka $KAFKA_VERSION fetched in $(( $(date +%s) - start ))s ($(find "$KAFKA_HOME/libs" -name '*.jar' | wc -l) jars)"
