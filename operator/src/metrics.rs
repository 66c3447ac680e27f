//! Prometheus metrics (`kpipe_operator_` prefix, base units, `_total` counters).

use std::collections::HashMap;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::time::Duration;

use crate::lag::Snapshot;
use crate::probe::ClientCounts;
use crate::stall::StallReason;

/// A pipeline's gauges after one reconcile ([`Metrics::set_pipeline`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineGauges {
    pub worker_restarts: i32,
    pub crash_looping_workers: i32,
    /// This poll's lag measurement (`None`: Kafka not read; the lag gauges keep their values).
    pub snapshot: Option<Snapshot>,
    /// `Some(None)`: assessed and not stalled; `None`: not assessed this poll (the gauge is kept).
    pub stall: Option<Option<StallReason>>,
    pub desired_replicas: i32,
    pub replicas: i32,
}

/// Every metric the operator exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub lag: IntGaugeVec,
    pub stuck_partitions: IntGaugeVec,
    pub retrying_partitions: IntGaugeVec,
    pub worker_restarts: IntGaugeVec,
    pub crash_looping_workers: IntGaugeVec,
    pub stalled: IntGaugeVec,
    pub arrival_rate: IntGaugeVec,
    pub capacity_per_replica: IntGaugeVec,
    pub desired_replicas: IntGaugeVec,
    pub replicas: IntGaugeVec,
    pub scale_events: IntCounterVec,
    pub probe_errors: IntCounterVec,
    pub probe_duration: HistogramVec,
    pub kafka_clients: IntGaugeVec,
    pub leader: IntGauge,
    /// `kpipe_operator_pipeline_condition{namespace,pipeline,type,status,reason}`: 1 for each condition of the
    /// pipeline's status as the reconciler last computed it, with its current status and reason.
    pub pipeline_condition: IntGaugeVec,
    /// `kpipe_operator_pipeline_suspended{namespace,pipeline}`: 1 while `spec.suspend` is true.
    pub pipeline_suspended: IntGaugeVec,
    /// `kpipe_operator_pipeline_dead_letters{namespace,pipeline,class}`: dead letters of the pipeline found in its
    /// dead-letter topic, by error class (the counts of `status.deadLetters`).
    pub pipeline_dead_letters: IntGaugeVec,
    /// `kpipe_operator_dead_letter_read_errors_total{namespace,pipeline,reason}`: failed reads of the pipeline's
    /// dead-letter topic ([`crate::deadletters::DeadLetterError::reason`]).
    pub dead_letter_read_errors: IntCounterVec,
}

/// A static metric definition (an error is a programming error the tests catch).
pub(crate) fn must<T>(r: prometheus::Result<T>) -> T {
    // Metric definitions are static; an error here is a programming error caught by the tests.
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let pipe = &["namespace", "pipeline"];
        let reconciles = must(IntCounterVec::new(
            Opts::new("kpipe_operator_reconciles_total", "Reconciles by result (ok, error)"),
            &["result"],
        ));
        let reconcile_errors = must(IntCounterVec::new(
            Opts::new("kpipe_operator_reconcile_errors_total", "Reconcile errors and Degraded causes by reason"),
            &["reason"],
        ));
        let reconcile_duration = must(Histogram::with_opts(
            HistogramOpts::new("kpipe_operator_reconcile_duration_seconds", "Duration of one reconcile")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        ));
        let lag = must(IntGaugeVec::new(
            Opts::new("kpipe_operator_pipeline_lag_records", "Consumer-group lag of the pipeline, in records"),
            pipe,
        ));
        let stuck_partitions = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_stuck_partitions",
                "Partitions with lag whose committed offset does not move",
            ),
            pipe,
        ));
        let retrying_partitions = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_retrying_partitions",
                "Partitions whose head record a live worker reports it is retrying (commit metadata)",
            ),
            pipe,
        ));
        let worker_restarts = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_worker_restarts",
                "Container restarts summed over the pipeline's current worker pods",
            ),
            pipe,
        ));
        let crash_looping_workers = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_crash_looping_workers",
                "Worker pods that restarted within 5 minutes or wait in CrashLoopBackOff",
            ),
            pipe,
        ));
        let stalled = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_stalled",
                "1 while the pipeline's backlog is not draining, by reason (the Stalled condition)",
            ),
            &["namespace", "pipeline", "reason"],
        ));
        let arrival_rate = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_arrival_records_per_second",
                "Records written to the pipeline's source topics per second (last minute)",
            ),
            pipe,
        ));
        let capacity_per_replica = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_replica_capacity_records_per_second",
                "Records per second one worker replica handles, as the scaler's throughput model knows it",
            ),
            pipe,
        ));
        let desired_replicas = must(IntGaugeVec::new(
            Opts::new("kpipe_operator_pipeline_desired_replicas", "Replicas the scaler wants"),
            pipe,
        ));
        let replicas = must(IntGaugeVec::new(
            Opts::new("kpipe_operator_pipeline_replicas", "Replicas set on the worker Deployment"),
            pipe,
        ));
        let scale_events = must(IntCounterVec::new(
            Opts::new("kpipe_operator_scale_events_total", "Replica changes by direction (up, down)"),
            &["namespace", "pipeline", "direction"],
        ));
        let probe_errors = must(IntCounterVec::new(
            Opts::new("kpipe_operator_probe_errors_total", "Failed lag probes by reason"),
            &["reason"],
        ));
        let probe_duration = must(HistogramVec::new(
            HistogramOpts::new("kpipe_operator_probe_duration_seconds", "Duration of one lag probe")
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
            &["result"],
        ));
        let kafka_clients = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_kafka_clients",
                "Open Kafka clients: cluster (shared metadata client), group (per-group client, SASL/TLS only), offset_connection (shared OffsetFetch connections)",
            ),
            &["kind"],
        ));
        let leader = must(IntGauge::new("kpipe_operator_leader", "1 while this replica holds the leader lease"));
        let pipeline_condition = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_condition",
                "1 for each status condition of the pipeline, labelled with its type, status and reason",
            ),
            &["namespace", "pipeline", "type", "status", "reason"],
        ));
        let pipeline_suspended = must(IntGaugeVec::new(
            Opts::new("kpipe_operator_pipeline_suspended", "1 while the pipeline's spec.suspend is true"),
            pipe,
        ));
        let pipeline_dead_letters = must(IntGaugeVec::new(
            Opts::new(
                "kpipe_operator_pipeline_dead_letters",
                "Dead letters of the pipeline found in its dead-letter topic, by error class (status.deadLetters)",
            ),
            &["namespace", "pipeline", "class"],
        ));
        let dead_letter_read_errors = must(IntCounterVec::new(
            Opts::new(
                "kpipe_operator_dead_letter_read_errors_total",
                "Failed reads of the pipeline's dead-letter topic by the operator's dead-letter reader, by reason",
            ),
            &["namespace", "pipeline", "reason"],
        ));
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reconcile_errors.clone()),
            Box::new(reconcile_duration.clone()),
            Box::new(lag.clone()),
            Box::new(stuck_partitions.clone()),
            Box::new(retrying_partitions.clone()),
            Box::new(worker_restarts.clone()),
            Box::new(crash_looping_workers.clone()),
            Box::new(stalled.clone()),
            Box::new(arrival_rate.clone()),
            Box::new(capacity_per_replica.clone()),
            Box::new(desired_replicas.clone()),
            Box::new(replicas.clone()),
            Box::new(scale_events.clone()),
            Box::new(probe_errors.clone()),
            Box::new(probe_duration.clone()),
            Box::new(kafka_clients.clone()),
            Box::new(leader.clone()),
            Box::new(pipeline_condition.clone()),
            Box::new(pipeline_suspended.clone()),
            Box::new(pipeline_dead_letters.clone()),
            Box::new(dead_letter_read_errors.clone()),
        ] {
            must(registry.register(c));
        }
        Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            lag,
            stuck_partitions,
            retrying_partitions,
            worker_restarts,
            crash_looping_workers,
            stalled,
            arrival_rate,
            capacity_per_replica,
            desired_replicas,
            replicas,
            scale_events,
            probe_errors,
            probe_duration,
            kafka_clients,
            leader,
            pipeline_condition,
            pipeline_suspended,
            pipeline_dead_letters,
            dead_letter_read_errors,
        }
    }

    /// `kpipe_operator_pipeline_condition`: exactly the given (type, status, reason) series for the pipeline.
    pub fn set_conditions(&self, namespace: &str, pipeline: &str, conditions: &[(String, String, String)]) {
        self.remove_matching(&self.pipeline_condition, namespace, pipeline);
        for (t, s, r) in conditions {
            self.pipeline_condition.with_label_values(&[namespace, pipeline, t, s, r]).set(1);
        }
    }

    /// Forget the dead-letter count series of a pipeline (counted anew).
    pub fn forget_dead_letter_counts(&self, namespace: &str, pipeline: &str) {
        self.remove_matching(&self.pipeline_dead_letters, namespace, pipeline);
    }

    /// Forget the dead-letter count and read-error series of a pipeline (no longer counted).
    pub fn forget_dead_letter_reader(&self, namespace: &str, pipeline: &str) {
        self.forget_dead_letter_counts(namespace, pipeline);
        self.remove_matching(&self.dead_letter_read_errors, namespace, pipeline);
    }

    /// Removes every series of `vec` whose `namespace` and `pipeline` labels are these.
    fn remove_matching<B: prometheus::core::MetricVecBuilder>(
        &self,
        vec: &prometheus::core::MetricVec<B>,
        namespace: &str,
        pipeline: &str,
    ) {
        for family in vec.collect() {
            for m in family.get_metric() {
                let labels: HashMap<&str, &str> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
                if labels.get("namespace") == Some(&namespace) && labels.get("pipeline") == Some(&pipeline) {
                    let _ = vec.remove(&labels);
                }
            }
        }
    }

    /// One reconcile finished (`ok`: without error) after `elapsed`.
    pub fn observe_reconcile(&self, ok: bool, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
        self.reconciles.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    /// A reconcile failed, or found a new problem, with `reason` (a condition/Event reason).
    pub fn record_problem(&self, reason: &str) {
        self.reconcile_errors.with_label_values(&[reason]).inc();
    }

    /// One lag probe took `elapsed`; `error`: its failure reason.
    pub fn observe_probe(&self, error: Option<&str>, elapsed: Duration) {
        let outcome = if error.is_some() { "error" } else { "ok" };
        self.probe_duration.with_label_values(&[outcome]).observe(elapsed.as_secs_f64());
        if let Some(reason) = error {
            self.probe_errors.with_label_values(&[reason]).inc();
        }
    }

    /// The lag probe's open Kafka clients.
    pub fn set_kafka_clients(&self, counts: &ClientCounts) {
        let set = |kind: &str, n: usize| self.kafka_clients.with_label_values(&[kind]).set(n as i64);
        set("cluster", counts.clusters);
        set("group", counts.groups);
        set("offset_connection", counts.offset_connections);
    }

    /// The replica count of `namespace/pipeline` changed (`direction`: "up" or "down").
    pub fn record_scale(&self, namespace: &str, pipeline: &str, direction: &str) {
        self.scale_events.with_label_values(&[namespace, pipeline, direction]).inc();
    }

    /// Set the per-pipeline gauges of `namespace/pipeline`.
    pub fn set_pipeline(&self, namespace: &str, pipeline: &str, g: &PipelineGauges) {
        let labels = [namespace, pipeline];
        self.worker_restarts.with_label_values(&labels).set(i64::from(g.worker_restarts));
        self.crash_looping_workers.with_label_values(&labels).set(i64::from(g.crash_looping_workers));
        if let Some(stall) = g.stall {
            self.set_stalled(namespace, pipeline, stall);
        }
        if let Some(s) = &g.snapshot {
            self.lag.with_label_values(&labels).set(s.total_lag);
            self.stuck_partitions.with_label_values(&labels).set(i64::from(s.stuck_partitions));
            self.retrying_partitions.with_label_values(&labels).set(i64::from(s.retrying_partitions));
            self.arrival_rate.with_label_values(&labels).set(s.arrival_rate().round() as i64);
            if let Some(capacity) = s.capacity {
                self.capacity_per_replica.with_label_values(&labels).set(capacity.rate().round() as i64);
            }
        }
        self.desired_replicas.with_label_values(&labels).set(i64::from(g.desired_replicas));
        self.replicas.with_label_values(&labels).set(i64::from(g.replicas));
    }

    /// Forget a deleted pipeline's series.
    pub fn forget(&self, namespace: &str, pipeline: &str) {
        for g in [
            &self.lag,
            &self.stuck_partitions,
            &self.retrying_partitions,
            &self.worker_restarts,
            &self.crash_looping_workers,
            &self.arrival_rate,
            &self.capacity_per_replica,
            &self.desired_replicas,
            &self.replicas,
        ] {
            let _ = g.remove_label_values(&[namespace, pipeline]);
        }
        for d in ["up", "down"] {
            let _ = self.scale_events.remove_label_values(&[namespace, pipeline, d]);
        }
        self.set_stalled(namespace, pipeline, None);
        self.remove_matching(&self.pipeline_condition, namespace, pipeline);
        let _ = self.pipeline_suspended.remove_label_values(&[namespace, pipeline]);
        self.forget_dead_letter_reader(namespace, pipeline);
    }

    /// `kpipe_operator_pipeline_stalled`: 1 for the current reason, no series while not stalled.
    pub fn set_stalled(&self, namespace: &str, pipeline: &str, reason: Option<StallReason>) {
        for r in StallReason::ALL {
            if Some(r) != reason {
                let _ = self.stalled.remove_label_values(&[namespace, pipeline, r.as_str()]);
            }
        }
        if let Some(r) = reason {
            self.stalled.with_label_values(&[namespace, pipeline, r.as_str()]).set(1);
        }
    }

    /// Text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if TextEncoder::new().encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_prefix_and_forgets() {
        let m = Metrics::new();
        m.reconciles.with_label_values(&["ok"]).inc();
        m.lag.with_label_values(&["ns", "p"]).set(42);
        m.arrival_rate.with_label_values(&["ns", "p"]).set(6000);
        m.capacity_per_replica.with_label_values(&["ns", "p"]).set(1000);
        let text = m.render();
        assert!(text.contains("kpipe_operator_reconciles_total{result=\"ok\"} 1"));
        assert!(text.contains("kpipe_operator_pipeline_lag_records{namespace=\"ns\",pipeline=\"p\"} 42"));
        assert!(
            text.contains("kpipe_operator_pipeline_arrival_records_per_second{namespace=\"ns\",pipeline=\"p\"} 6000")
        );
        assert!(text.contains(
            "kpipe_operator_pipeline_replica_capacity_records_per_second{namespace=\"ns\",pipeline=\"p\"} 1000"
        ));
        m.forget("ns", "p");
        assert!(!m.render().contains("pipeline=\"p\""));
        let c = |t: &str, s: &str, r: &str| (t.to_string(), s.to_string(), r.to_string());
        m.set_conditions("ns", "p", &[c("Degraded", "True", "TopicNotFound"), c("Ready", "False", "TopicNotFound")]);
        m.set_conditions("ns", "q", &[c("Degraded", "False", "AsExpected")]);
        m.set_conditions("ns", "p", &[c("Degraded", "False", "AsExpected")]);
        let text = m.render();
        assert!(text.contains(
            "kpipe_operator_pipeline_condition{namespace=\"ns\",pipeline=\"p\",reason=\"AsExpected\",status=\"False\",type=\"Degraded\"} 1"
        ));
        assert!(!text.contains("TopicNotFound"), "old series removed:\n{text}");
        assert!(text.contains("pipeline=\"q\""));
        m.pipeline_dead_letters.with_label_values(&["ns", "p", "http_400"]).set(3);
        m.dead_letter_read_errors.with_label_values(&["ns", "p", "TopicNotFound"]).inc();
        m.pipeline_suspended.with_label_values(&["ns", "p"]).set(1);
        m.forget("ns", "p");
        let text = m.render();
        assert!(!text.contains("pipeline=\"p\""), "{text}");
        assert!(text.contains("pipeline=\"q\""));
    }
}
