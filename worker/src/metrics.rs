//! Prometheus metrics of the worker (text exposition on `/metrics`).

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub consumed: IntCounter,
    pub processed: IntCounter,
    pub failed: IntCounterVec,
    pub retried: IntCounter,
    /// `kpipe_worker_records_dead_lettered_total{class}`: records written to the dead-letter topic, by the error
    /// class of their last failure — the value of their `kpipe.error.class` header (`timeout`, `connection`,
    /// `http_<status>`, `rejected`, `bad_response`, `produce`, `encode`, `deferred`; bounded by the HTTP status
    /// codes).
    pub dead_lettered: IntCounterVec,
    pub dead_letter_errors: IntCounter,
    pub dropped: IntCounter,
    pub batch_size: Histogram,
    pub processing_seconds: Histogram,
    pub end_to_end_seconds: Histogram,
    pub in_flight: IntGauge,
    pub blocked: IntGauge,
    pub committed_offset: IntGaugeVec,
    pub lag: IntGaugeVec,
    pub rebalances: IntCounterVec,
    pub assigned_partitions: IntGauge,
    pub paused_partitions: IntGauge,
    /// `kpipe_worker_partition_pauses_total`: times a partition was paused for backpressure (each pause drops what
    /// librdkafka prefetched for it, fetched again on resume).
    pub partition_pauses: IntCounter,
    /// `kpipe_worker_consumer_holds_total`: times the consumer thread held because a partition's overflow was full: it
    /// took no records from librdkafka's fetch queue until no partition held (each holding partition's task took its
    /// overflow, or the partition was paused, or it was revoked). Holds of several partitions at once are one hold.
    pub consumer_holds: IntCounter,
    /// `kpipe_worker_consumer_held_seconds_total`: seconds of those holds, during which no partition of the worker
    /// received fetched records (see `consumer::backpressure`).
    pub consumer_held_seconds: Counter,
    /// `kpipe_worker_buffered_bytes`: bytes of records fetched and not yet started, bounded worker-wide
    /// (`consumer::dispatch`).
    pub buffered_bytes: IntGauge,
    pub commit_failures: IntCounter,
    pub commit_waits: IntCounter,
    pub commit_seconds: Histogram,
    /// `kpipe_worker_offset_resets_total{reason}`: committed offsets found out of range (the rule of
    /// `kpipe_api::offsets::start_point`), by reason: `below_log_start` (retention), `above_log_end` (recreated topic,
    /// truncated log) — both resolved at assignment — and `out_of_range` (librdkafka reported a fetch position out
    /// of range while consuming and reset it to the earliest retained record).
    pub offset_resets: IntCounterVec,
    /// `kpipe_worker_offset_regressions_total`: times a partition's offsets went back while it was assigned (a
    /// reset, a recreated topic) and its tracker re-based.
    pub offset_regressions: IntCounter,
    /// `kpipe_worker_commits_withheld_total`: per-partition commits not sent because the offset was beyond the
    /// partition's log end (a recreated topic): no committed offset ever exceeds the log end.
    pub commits_withheld: IntCounter,
    /// `kpipe_worker_circuit_state`: the processor circuit breaker, 0 closed, 1 open, 2 half-open
    /// ([`crate::breaker`]).
    pub circuit_state: IntGauge,
    /// `kpipe_worker_circuit_opened_total`: times the circuit opened (the processor was unavailable).
    pub circuit_opened: IntCounter,
    /// `kpipe_worker_concurrency_limit`: the adaptive limit on records in processor calls at once,
    /// between 1 and `concurrency.perWorker` ([`crate::aimd`]).
    pub concurrency_limit: IntGauge,
    /// `kpipe_worker_records_throttled_total`: record failures that carried a `Retry-After` (429/503),
    /// waited for as asked and not counted against `retry.maxAttempts`.
    pub throttled: IntCounter,
    /// `kpipe_worker_dead_letter_truncated_total`: records dead-lettered as a reference record (value,
    /// and if need be headers and key, left out) because the full copy exceeds the dead-letter topic's
    /// `max.message.bytes`.
    pub dead_letter_truncated: IntCounter,
    /// `kpipe_worker_records_too_large_total`: records refused before producing because they exceed the
    /// output topic's `max.message.bytes` (a permanent failure, sent down the failure policy).
    pub too_large: IntCounter,
    /// `kpipe_worker_header_keys_replaced_total`: record header keys that were not UTF-8 (the protocol does not
    /// check; some clients write any bytes), passed on with U+FFFD in place of each invalid sequence
    /// (`kpipe_rdkafka_native::copy_headers`).
    pub header_keys_replaced: IntCounter,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot register metric: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, MetricsError> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let float_counter = |name: &str, help: &str| -> Result<Counter, MetricsError> {
            let c = Counter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, MetricsError> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, MetricsError> {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let seconds = vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
        let failed = IntCounterVec::new(
            Opts::new("kpipe_worker_records_failed_total", "Failed processing attempts of records, by error class"),
            &["class"],
        )?;
        registry.register(Box::new(failed.clone()))?;
        let dead_lettered = IntCounterVec::new(
            Opts::new(
                "kpipe_worker_records_dead_lettered_total",
                "Records written to the dead-letter topic, by the error class of their kpipe.error.class header",
            ),
            &["class"],
        )?;
        registry.register(Box::new(dead_lettered.clone()))?;
        let committed_offset = IntGaugeVec::new(
            Opts::new("kpipe_worker_committed_offset", "Last offset committed by this worker, per partition"),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(committed_offset.clone()))?;
        let lag = IntGaugeVec::new(
            Opts::new("kpipe_worker_partition_lag", "Records between the log end and the committed offset"),
            &["topic", "partition"],
        )?;
        registry.register(Box::new(lag.clone()))?;
        let rebalances = IntCounterVec::new(
            Opts::new("kpipe_worker_rebalances_total", "Partition assignment changes, by kind (assign/revoke/lost)"),
            &["kind"],
        )?;
        registry.register(Box::new(rebalances.clone()))?;
        let offset_resets = IntCounterVec::new(
            Opts::new(
                "kpipe_worker_offset_resets_total",
                "Committed offsets out of range, reset to the earliest retained record, by reason",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(offset_resets.clone()))?;
        Ok(Self {
            consumed: counter("kpipe_worker_records_consumed_total", "Records received from Kafka")?,
            processed: counter("kpipe_worker_records_processed_total", "Records the processor completed")?,
            failed,
            retried: counter("kpipe_worker_records_retried_total", "Record retries scheduled")?,
            dead_lettered,
            dead_letter_errors: counter(
                "kpipe_worker_dead_letter_errors_total",
                "Failed dead-letter writes (retried)",
            )?,
            dropped: counter("kpipe_worker_records_dropped_total", "Records dropped by the drop failure policy")?,
            batch_size: histogram(
                "kpipe_worker_batch_size_records",
                "Records per processor batch",
                vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
            )?,
            processing_seconds: histogram(
                "kpipe_worker_processing_duration_seconds",
                "Duration of one processor call",
                seconds.clone(),
            )?,
            end_to_end_seconds: histogram(
                "kpipe_worker_end_to_end_latency_seconds",
                "From the record's Kafka timestamp until it is done",
                seconds,
            )?,
            in_flight: gauge("kpipe_worker_in_flight_records", "Records received and not yet done")?,
            blocked: gauge("kpipe_worker_blocked_records", "Records stalled by the block failure policy")?,
            committed_offset,
            lag,
            rebalances,
            assigned_partitions: gauge("kpipe_worker_assigned_partitions", "Partitions assigned to this worker")?,
            paused_partitions: gauge("kpipe_worker_paused_partitions", "Partitions paused for backpressure")?,
            buffered_bytes: gauge(
                "kpipe_worker_buffered_bytes",
                "Bytes of records fetched and not yet started (waiting in the worker): key, value and headers plus 224 bytes of bookkeeping per record and 80 per header; bounded worker-wide",
            )?,
            partition_pauses: counter(
                "kpipe_worker_partition_pauses_total",
                "Times a partition was paused for backpressure",
            )?,
            consumer_holds: counter(
                "kpipe_worker_consumer_holds_total",
                "Times the consumer held (took no fetched records for any partition) because a partition's overflow was full",
            )?,
            consumer_held_seconds: float_counter(
                "kpipe_worker_consumer_held_seconds_total",
                "Seconds the consumer held (took no fetched records) because a partition's overflow was full",
            )?,
            commit_failures: counter("kpipe_worker_commit_failures_total", "Failed offset commits")?,
            commit_waits: counter(
                "kpipe_worker_commit_waits_total",
                "Times a partition held records back at concurrency.uncommittedPerPartition until a commit was acknowledged",
            )?,
            commit_seconds: histogram(
                "kpipe_worker_commit_duration_seconds",
                "Round trip of one offset commit, until the broker acknowledged it",
                vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0],
            )?,
            offset_resets,
            offset_regressions: counter(
                "kpipe_worker_offset_regressions_total",
                "Times a partition's offsets went back while assigned (reset, recreated topic) and its tracker re-based",
            )?,
            commits_withheld: counter(
                "kpipe_worker_commits_withheld_total",
                "Partition commits not sent because the offset was beyond the partition's log end",
            )?,
            circuit_state: gauge(
                "kpipe_worker_circuit_state",
                "Processor circuit breaker: 0 closed, 1 open (processor unavailable), 2 half-open (probing)",
            )?,
            circuit_opened: counter("kpipe_worker_circuit_opened_total", "Times the processor circuit breaker opened")?,
            concurrency_limit: gauge(
                "kpipe_worker_concurrency_limit",
                "Adaptive (AIMD) limit on records in processor calls at once",
            )?,
            throttled: counter(
                "kpipe_worker_records_throttled_total",
                "Record failures with Retry-After (429/503): waited as asked, not counted as attempts",
            )?,
            dead_letter_truncated: counter(
                "kpipe_worker_dead_letter_truncated_total",
                "Records dead-lettered as a reference record because the full copy exceeds the topic's size limit",
            )?,
            too_large: counter(
                "kpipe_worker_records_too_large_total",
                "Records refused because they exceed the output topic's max.message.bytes",
            )?,
            header_keys_replaced: counter(
                "kpipe_worker_header_keys_replaced_total",
                "Record header keys that were not UTF-8, passed on with U+FFFD in place of the invalid bytes",
            )?,
            registry,
        })
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_conventions() {
        let m = Metrics::new().unwrap();
        m.consumed.inc();
        m.failed.with_label_values(&["timeout"]).inc();
        m.dead_lettered.with_label_values(&["http_400"]).inc();
        m.committed_offset.with_label_values(&["t", "0"]).set(5);
        m.offset_resets.with_label_values(&["below_log_start"]).inc();
        m.offset_regressions.inc();
        let text = m.render();
        for name in [
            "kpipe_worker_records_consumed_total 1",
            "kpipe_worker_records_failed_total{class=\"timeout\"} 1",
            "kpipe_worker_records_dead_lettered_total{class=\"http_400\"} 1",
            "kpipe_worker_committed_offset{partition=\"0\",topic=\"t\"} 5",
            "kpipe_worker_processing_duration_seconds_bucket",
            "kpipe_worker_in_flight_records 0",
            "kpipe_worker_offset_resets_total{reason=\"below_log_start\"} 1",
            "kpipe_worker_offset_regressions_total 1",
            "kpipe_worker_commits_withheld_total 0",
            "kpipe_worker_circuit_state 0",
            "kpipe_worker_circuit_opened_total 0",
            "kpipe_worker_concurrency_limit 0",
            "kpipe_worker_records_throttled_total 0",
            "kpipe_worker_dead_letter_truncated_total 0",
            "kpipe_worker_records_too_large_total 0",
            "kpipe_worker_header_keys_replaced_total 0",
            "kpipe_worker_partition_pauses_total 0",
            "kpipe_worker_consumer_holds_total 0",
            "kpipe_worker_consumer_held_seconds_total 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
