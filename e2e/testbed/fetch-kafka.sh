#!/usr/bin/env bash
# Resolves Apache Kafka $KAFKA_VERSION (broker + tools jars, e2e/testbed/kafka/pom.xml) from Maven Central into
# $KAFKA_HOME/libs. Idempotent: the marker file holds the POM's checksum, so a download is reused until the POM
# changes. A new download is resolved beside the old one and swapped in: a running broker keeps the jars it opened.
source "$(dirname "$0")/lib.sh"
need mvn
need java
kafka_current && exit 0
start=$(date +%s)
log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_HOME/libs"
new="$KAFKA_HOME/libs.new"
rm -rf "$new"; mkdir -p "$new"
# Maven's output goes to a log (even quiet it prints terminal escape codes); shown when it fails.
mvn_log="$KAFKA_HOME/mvn.log"
mvn -B -q -Dstyle.color=never -f "$TESTBED_DIR/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
  "org.apache.maven.plugins:maven-dependency-plugin:$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
  -DoutputDirectory="$new" -DincludeScope=runtime >"$mvn_log" 2>&1 \
  || { tail -n 40 "$mvn_log" >&2; die "maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (is Maven Central reachable?)"; }
core=$(ls "$new"/kafka_2.13-"$KAFKA_VERSION".jar 2>/dev/null) || die "kafka_2.13-$KAFKA_VERSION.jar missing after resolve"
unzip -l "$core" | matches 'kafka/Kafka.class' || die "$core has no kafka.Kafka main class"
unzip -l "$core" | matches 'kafka/tools/StorageTool.class' || die "$core has no kafka.tools.StorageTool"
compgen -G "$new/log4j-core-*.jar" >/dev/null || die "log4j-core not on the Kafka classpath (check the published POM)"
compgen -G "$new/log4j-slf4j-impl-*.jar" >/dev/null || die "log4j-slf4j-impl missing: Kafka's logs would go nowhere"
rm -rf "$KAFKA_HOME/libs.old"
[ ! -d "$KAFKA_HOME/libs" ] || mv "$KAFKA_HOME/libs" "$KAFKA_HOME/libs.old"
mv "$new" "$KAFKA_HOME/libs"
rm -rf "$KAFKA_HOME/libs.old"
kafka_pom_sum > "$KAFKA_HOME/.complete"
log "Kafka $KAFKA_VERSION fetched in $(( $(date +%s) - start ))s ($(find "$KAFKA_HOME/libs" -name '*.jar' | wc -l) jars)"
