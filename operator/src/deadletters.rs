//! Dead-letter counts for `status.deadLetters` (docs/api.md, "Dead letters in status").
//!
//! The reconciler registers every pipeline that has `spec.deadLetter.topic` ([`DeadLetterReader::watch`]) with the
//! Kafka settings it derived from the pipeline's Secrets — the same [`Cluster`] the lag probe uses, built by
//! [`kpipe_api::kafka_client::properties`] like the workers' clients, so SASL/TLS pipelines are read like plaintext
//! ones. Every [`INTERVAL`] the reader reads what was appended to each registered topic since its last pass and
//! counts the records whose `kpipe.pipeline` header names the pipeline, by their `kpipe.error.class` header, in
//! memory. When a pipeline's counts change it triggers a reconcile of that pipeline; the reconciler puts them into
//! `status.deadLetters` with its own status write ([`DeadLetterReader::summary`], [`for_status`]), so the status has
//! one field manager. The reader never lists pipelines: registrations come from reconciles, which the controller's
//! watch drives; a pipeline whose `spec.deadLetter` is removed is unregistered and its `status.deadLetters`
//! cleared.
//!
//! Why the topic and not the workers' metrics: the topic is what a replay reads and what an operator inspects, it
//! survives worker restarts and scale-to-zero, and a topic shared by pipelines is split by the header.
//!
//! Resuming: a pipeline registered for the first time in a leadership term starts from the counts and
//! `readOffsets` in its status ([`seed`]), so a new leader reads only what the previous one had not counted. The
//! counts and offsets of a status are written in one apply, so the sum stays exact; a topic whose log end fell
//! below a recorded offset (recreated or truncated) is counted from scratch ([`resume_at`]).
//!
//! Read failures (missing topic, authentication, unreachable brokers) are counted in
//! `kpipe_operator_dead_letter_read_errors_total{namespace,pipeline,reason}` and logged as a warning when the error
//! changes; the counts in status keep their last value.
//!
//! The decisions ([`resume_at`], [`Tally::count`], [`seed`], [`for_status`]) are pure and unit-tested; the Kafka
//! I/O is at the edges ([`read_topic`], [`DeadLetterReader::run`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kpipe_api::v1alpha1::{ConsumerPipeline, DeadLetterSummary};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio::sync::{mpsc, watch};

use crate::metrics::Metrics;
use crate::probe::Cluster;

/// How often the registered dead-letter topics are read.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Records read from one dead-letter topic per pass (the rest is read in the next passes).
pub const MAX_RECORDS_PER_PASS: usize = 50_000;
/// Header naming the pipeline that wrote a dead letter (its `metadata.name`).
pub const PIPELINE_HEADER: &str = "kpipe.pipeline";
/// Header with the error class of a dead letter's last failure.
pub const CLASS_HEADER: &str = "kpipe.error.class";

/// Asks the pipeline controller of the pipeline's scope to reconcile it (its counts changed).
pub type Trigger = mpsc::Sender<ObjectRef<DeserializeGuard<ConsumerPipeline>>>;

/// Why reading a dead-letter topic failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("dead-letter topic {0:?} does not exist")]
    TopicNotFound(String),
    #[error("reading dead-letter topic {topic:?}: {detail}")]
    Kafka { topic: String, detail: String },
    #[error("reading the dead-letter topic panicked or was cancelled: {0}")]
    Task(String),
}

impl DeadLetterError {
    /// The `reason` label of `kpipe_operator_dead_letter_read_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::TopicNotFound(_) => "TopicNotFound",
            Self::Kafka { .. } => "KafkaError",
            Self::Task(_) => "TaskFailed",
        }
    }
}

/// Where to continue reading one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Read from this offset (the log start when it was never read or retention passed the last read).
    From(i64),
    /// The partition's log end is below what was read: the topic was recreated or truncated; count from scratch.
    Restart,
}

/// Where to resume a partition whose retained log is `[low, high)`, having read up to `read` (exclusive).
pub fn resume_at(read: Option<i64>, low: i64, high: i64) -> Resume {
    match read {
        None => Resume::From(low),
        Some(r) if r > high => Resume::Restart,
        Some(r) => Resume::From(r.max(low)),
    }
}

/// Dead letters of one pipeline counted so far, and how far each partition of its topic was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Dead letters of the pipeline.
    pub total: i64,
    /// By `kpipe.error.class` (`unknown` when the header is absent).
    pub by_class: BTreeMap<String, i64>,
    /// Partition → offset read up to (exclusive).
    pub read: BTreeMap<i32, i64>,
}

impl Tally {
    /// Counts one record of the topic: it is the pipeline's when its `kpipe.pipeline` header equals `pipeline`.
    pub fn count(&mut self, pipeline: &str, record_pipeline: Option<&[u8]>, class: Option<&[u8]>) {
        if record_pipeline != Some(pipeline.as_bytes()) {
            return;
        }
        self.total += 1;
        let class = class.map(String::from_utf8_lossy).map(|c| c.into_owned()).unwrap_or_else(|| "unknown".into());
        *self.by_class.entry(class).or_default() += 1;
    }

    /// The status field for these counts.
    pub fn summary(&self, topic: &str, now: Option<Time>) -> DeadLetterSummary {
        DeadLetterSummary {
            topic: topic.to_string(),
            total: self.total,
            by_class: self.by_class.clone(),
            read_offsets: self.read.iter().map(|(p, o)| (p.to_string(), *o)).collect(),
            observed_at: now,
        }
    }
}

/// The tally a pipeline's counting starts from when it is first registered (pure): the counts and read offsets of
/// its status when they are for `topic` (a new leader continues where the last status write left off), else zero,
/// and when those counts were last brought up to date.
pub fn seed(status: Option<&DeadLetterSummary>, topic: &str) -> (Tally, Option<Time>) {
    match status.filter(|s| s.topic == topic) {
        Some(s) => (
            Tally {
                total: s.total,
                by_class: s.by_class.clone(),
                read: s.read_offsets.iter().filter_map(|(p, o)| p.parse::<i32>().ok().map(|p| (p, *o))).collect(),
            },
            s.observed_at.clone(),
        ),
        None => (Tally::default(), None),
    }
}

/// `status.deadLetters` as the reconciler writes it (pure): absent without `spec.deadLetter` (`topic` None); the
/// reader's counts when it has counts for `topic`; else the previous status's, while they are for `topic` (a new
/// leader has not read yet); else absent.
pub fn for_status(
    topic: Option<&str>,
    counted: Option<DeadLetterSummary>,
    previous: Option<&DeadLetterSummary>,
) -> Option<DeadLetterSummary> {
    let topic = topic?;
    counted.filter(|c| c.topic == topic).or_else(|| previous.filter(|p| p.topic == topic).cloned())
}

/// Reads what `topic` holds beyond `tally.read` (blocking; at most `max_records` records) and counts the
/// pipeline's dead letters into `tally`.
pub fn read_topic(
    consumer: &BaseConsumer,
    topic: &str,
    pipeline: &str,
    tally: &mut Tally,
    timeout: Duration,
    max_records: usize,
) -> Result<(), DeadLetterError> {
    let kafka =
        |e: rdkafka::error::KafkaError| DeadLetterError::Kafka { topic: topic.to_string(), detail: e.to_string() };
    let metadata = consumer.fetch_metadata(Some(topic), timeout).map_err(kafka)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(DeadLetterError::TopicNotFound(topic.to_string()));
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(DeadLetterError::TopicNotFound(topic.to_string()));
    }
    let mut marks = Vec::new();
    for p in t.partitions() {
        let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout).map_err(kafka)?;
        marks.push((p.id(), low, high));
    }
    if marks.iter().any(|(p, low, high)| resume_at(tally.read.get(p).copied(), *low, *high) == Resume::Restart) {
        *tally = Tally::default();
    }
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for (p, low, high) in marks {
        let Resume::From(from) = resume_at(tally.read.get(&p).copied(), low, high) else { continue };
        tally.read.insert(p, from);
        if from < high {
            tpl.add_partition_offset(topic, p, Offset::Offset(from)).map_err(kafka)?;
            ends.insert(p, high);
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(kafka)?;
    let deadline = Instant::now() + timeout;
    let mut records = 0usize;
    while !ends.is_empty() && records < max_records {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match consumer.poll(left) {
            None => break,
            Some(Err(e)) => return Err(kafka(e)),
            Some(Ok(m)) => {
                let (p, offset) = (m.partition(), m.offset());
                let Some(&end) = ends.get(&p) else { continue };
                if offset >= end || offset < tally.read.get(&p).copied().unwrap_or(0) {
                    continue;
                }
                records += 1;
                // Not rust-rdkafka's header iterator: it panics on a header key that is not UTF-8.
                let headers = kpipe_rdkafka_native::copy_headers(&m).headers;
                // The writer's block, as the replay reads it (a dead letter of a dead letter carries two).
                let context = kpipe_api::replay::context_headers(&headers);
                let owner = kpipe_api::replay::header(context, PIPELINE_HEADER);
                let class = kpipe_api::replay::header(context, CLASS_HEADER);
                tally.count(pipeline, owner, class);
                tally.read.insert(p, offset + 1);
                if offset + 1 >= end {
                    ends.remove(&p);
                }
            }
        }
    }
    // Control records (transaction markers) and compacted gaps are never delivered: take the consumer's position.
    if let Ok(positions) = consumer.position() {
        for e in positions.elements_for_topic(topic) {
            if let (Offset::Offset(pos), Some(&end)) = (e.offset(), ends.get(&e.partition())) {
                let read = tally.read.entry(e.partition()).or_default();
                *read = (*read).max(pos.min(end));
            }
        }
    }
    Ok(())
}

/// The reader's consumer for `cluster`: never subscribes or commits, [`read_topic`] assigns what it reads. One per
/// cluster (bootstrap servers and credentials, [`Cluster::key`]), kept across passes while a registered pipeline
/// uses it.
pub fn dead_letter_consumer(cluster: &Cluster, timeout: Duration) -> Result<BaseConsumer, DeadLetterError> {
    cluster
        .client_config(READER_CLIENT_ID, timeout)
        .set("group.id", READER_CLIENT_ID)
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| DeadLetterError::Kafka { topic: String::new(), detail: e.to_string() })
}

/// `client.id` (and unused `group.id`) of the dead-letter reader's consumers.
const READER_CLIENT_ID: &str = "kpipe-operator-dead-letters";

/// What the reconciler registers for a pipeline with a dead-letter topic.
#[derive(Clone)]
pub struct Watch {
    pub namespace: String,
    pub name: String,
    /// `spec.deadLetter.topic`.
    pub topic: String,
    /// How to reach the pipeline's cluster (its `source.auth` and Secret values, as the lag probe has them).
    pub cluster: Cluster,
    /// `status.deadLetters` as the reconciler read it: where counting resumes in a new leadership term.
    pub seed: Option<DeadLetterSummary>,
    /// Reconciles the pipeline when its counts change.
    pub trigger: Trigger,
}

struct Tracked {
    watch: Watch,
    tally: Tally,
    /// When the counts last changed (`observedAt`).
    observed_at: Option<Time>,
    /// The last read error logged (a warning per new error, not per pass).
    failing: Option<String>,
    /// The counts describe the topic: seeded from the status, or read at least once.
    known: bool,
}

/// Counts the dead letters of the registered pipelines every [`INTERVAL`] (module docs).
pub struct DeadLetterReader {
    metrics: Metrics,
    timeout: Duration,
    /// Pipeline uid → its registration and counts.
    tracked: Mutex<HashMap<String, Tracked>>,
    /// [`Cluster::key`] → the consumer reading that cluster's dead-letter topics (passes are sequential).
    consumers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

impl DeadLetterReader {
    /// A reader whose Kafka requests time out after `timeout`.
    pub fn new(metrics: Metrics, timeout: Duration) -> Self {
        Self { metrics, timeout, tracked: Mutex::new(HashMap::new()), consumers: Mutex::new(HashMap::new()) }
    }

    /// Registers pipeline `uid` (`Some`) or unregisters it (`None`: no `spec.deadLetter`, or the pipeline is gone).
    /// A registration for another topic than before starts counting again (from the seed when it is for that topic).
    pub fn watch(&self, uid: &str, watch: Option<Watch>) {
        let Ok(mut tracked) = self.tracked.lock() else { return };
        match watch {
            None => {
                if let Some(gone) = tracked.remove(uid) {
                    self.metrics.forget_dead_letter_reader(&gone.watch.namespace, &gone.watch.name);
                }
            }
            Some(w) => match tracked.get_mut(uid) {
                Some(t) if t.watch.topic == w.topic => t.watch = w,
                _ => {
                    let known = w.seed.as_ref().is_some_and(|s| s.topic == w.topic);
                    let (tally, observed_at) = seed(w.seed.as_ref(), &w.topic);
                    self.metrics.forget_dead_letter_counts(&w.namespace, &w.name);
                    self.set_gauges(&w, &tally);
                    tracked.insert(uid.to_string(), Tracked { watch: w, tally, observed_at, failing: None, known });
                }
            },
        }
    }

    /// The counts of pipeline `uid` as `status.deadLetters` (None: not registered, or nothing read yet and nothing
    /// to resume from).
    pub fn summary(&self, uid: &str) -> Option<DeadLetterSummary> {
        let tracked = self.tracked.lock().ok()?;
        tracked.get(uid).filter(|t| t.known).map(|t| t.tally.summary(&t.watch.topic, t.observed_at.clone()))
    }

    fn set_gauges(&self, w: &Watch, tally: &Tally) {
        for (class, n) in &tally.by_class {
            self.metrics.pipeline_dead_letters.with_label_values(&[&w.namespace, &w.name, class]).set(*n);
        }
    }

    /// Forgets every registration and client (a new leadership term starts from the statuses).
    pub fn reset(&self) {
        if let Ok(mut t) = self.tracked.lock() {
            t.clear();
        }
        if let Ok(mut c) = self.consumers.lock() {
            c.clear();
        }
    }

    /// Reads the registered topics every [`INTERVAL`] until `stop` turns true.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.pass().await;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    async fn pass(&self) {
        let work: Vec<(String, Watch, Tally)> = match self.tracked.lock() {
            Ok(t) => t.iter().map(|(uid, t)| (uid.clone(), t.watch.clone(), t.tally.clone())).collect(),
            Err(_) => return,
        };
        // Clients of clusters no pipeline uses any more (rotated credentials are another key) are closed.
        let keys: HashSet<String> = work.iter().map(|(_, w, _)| w.cluster.key()).collect();
        if let Ok(mut c) = self.consumers.lock() {
            c.retain(|k, _| keys.contains(k));
        }
        for (uid, w, tally) in work {
            let read = self.read(&w, tally.clone()).await;
            self.record(&uid, &w, &tally, read);
        }
    }

    /// Reads `w.topic` beyond `tally` with the cluster's consumer (created on first use, dropped after a failure).
    async fn read(&self, w: &Watch, mut tally: Tally) -> Result<Tally, DeadLetterError> {
        let key = w.cluster.key();
        let cached = self.consumers.lock().ok().and_then(|c| c.get(&key).cloned());
        let (cluster, timeout, topic, pipeline) = (w.cluster.clone(), self.timeout, w.topic.clone(), w.name.clone());
        let read = tokio::task::spawn_blocking(move || {
            let consumer = match cached {
                Some(c) => c,
                None => Arc::new(dead_letter_consumer(&cluster, timeout)?),
            };
            read_topic(&consumer, &topic, &pipeline, &mut tally, timeout, MAX_RECORDS_PER_PASS)?;
            Ok((consumer, tally))
        })
        .await
        .map_err(|e| DeadLetterError::Task(e.to_string()))
        .and_then(|r| r);
        match read {
            Ok((consumer, tally)) => {
                if let Ok(mut c) = self.consumers.lock() {
                    c.insert(key, consumer);
                }
                Ok(tally)
            }
            Err(e) => {
                // A fresh client next pass: the failure may be the connection's.
                if let Ok(mut c) = self.consumers.lock() {
                    c.remove(&key);
                }
                Err(e)
            }
        }
    }

    /// Keeps the result of a read of the counts `before` (unless the pipeline was unregistered or re-registered
    /// for another topic meanwhile); new counts update the gauges and trigger a reconcile.
    fn record(&self, uid: &str, w: &Watch, before: &Tally, read: Result<Tally, DeadLetterError>) {
        let (ns, name) = (w.namespace.as_str(), w.name.as_str());
        let Ok(mut tracked) = self.tracked.lock() else { return };
        let Some(t) = tracked.get_mut(uid).filter(|t| t.watch.topic == w.topic && t.tally == *before) else { return };
        match read {
            Ok(tally) => {
                if t.failing.take().is_some() {
                    tracing::info!(namespace = ns, pipeline = name, topic = %w.topic, "dead-letter topic read again");
                }
                if tally == t.tally && t.known {
                    return;
                }
                t.known = true;
                let classes_gone = t.tally.by_class.keys().any(|c| !tally.by_class.contains_key(c));
                t.tally = tally;
                t.observed_at = Some(Time(jiff::Timestamp::now()));
                if classes_gone {
                    self.metrics.forget_dead_letter_counts(ns, name);
                }
                self.set_gauges(w, &t.tally);
                // A full channel means reconciles are queued already; the next poll writes the counts anyway.
                let _ = t.watch.trigger.try_send(ObjectRef::new(name).within(ns));
            }
            Err(e) => {
                self.metrics.dead_letter_read_errors.with_label_values(&[ns, name, e.reason()]).inc();
                let message = e.to_string();
                if t.failing.as_ref() != Some(&message) {
                    tracing::warn!(namespace = ns, pipeline = name, error = %message,
                        "cannot read the dead-letter topic; status.deadLetters keeps its last counts");
                    t.failing = Some(message);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_starts_at_the_log_start_and_follows_retention() {
        assert_eq!(resume_at(None, 5, 10), Resume::From(5));
        assert_eq!(resume_at(Some(7), 5, 10), Resume::From(7));
        assert_eq!(resume_at(Some(10), 5, 10), Resume::From(10), "fully read");
        assert_eq!(resume_at(Some(3), 5, 10), Resume::From(5), "retention removed 3 and 4");
        assert_eq!(resume_at(Some(12), 0, 4), Resume::Restart, "recreated topic");
    }

    #[test]
    fn counts_only_the_pipelines_own_dead_letters_by_class() {
        let mut t = Tally::default();
        t.count("orders", Some(b"orders"), Some(b"http_400"));
        t.count("orders", Some(b"orders"), Some(b"http_400"));
        t.count("orders", Some(b"orders"), Some(b"timeout"));
        t.count("orders", Some(b"orders"), None);
        t.count("orders", Some(b"billing"), Some(b"http_400"));
        t.count("orders", None, Some(b"http_400"));
        assert_eq!(t.total, 4);
        assert_eq!(t.by_class, BTreeMap::from([("http_400".into(), 2), ("timeout".into(), 1), ("unknown".into(), 1)]));
        t.read.insert(0, 17);
        let s = t.summary("orders-dlq", None);
        assert_eq!(s.read_offsets, BTreeMap::from([("0".to_string(), 17)]));
        assert_eq!((s.topic.as_str(), s.total), ("orders-dlq", 4));
    }

    #[test]
    fn a_new_term_resumes_from_the_status_of_the_same_topic() {
        let status = DeadLetterSummary {
            topic: "orders-dlq".into(),
            total: 7,
            by_class: BTreeMap::from([("http_400".into(), 7)]),
            read_offsets: BTreeMap::from([("0".into(), 12), ("1".into(), 3), ("x".into(), 9)]),
            observed_at: Some(Time(jiff::Timestamp::UNIX_EPOCH)),
        };
        let (t, at) = seed(Some(&status), "orders-dlq");
        assert_eq!((t.total, t.by_class.get("http_400")), (7, Some(&7)));
        assert_eq!(t.read, BTreeMap::from([(0, 12), (1, 3)]), "an unparsable partition key is read again");
        assert_eq!(at, status.observed_at);
        // The summary of a seeded tally is the status it came from: nothing to write until something is read.
        assert_eq!(
            t.summary("orders-dlq", at),
            DeadLetterSummary { read_offsets: BTreeMap::from([("0".into(), 12), ("1".into(), 3)]), ..status.clone() }
        );
        assert_eq!(seed(Some(&status), "other-dlq"), (Tally::default(), None), "another topic starts at zero");
        assert_eq!(seed(None, "orders-dlq"), (Tally::default(), None));
    }

    #[test]
    fn status_shows_the_counts_of_the_current_topic_only() {
        let s = |topic: &str, total: i64| DeadLetterSummary { topic: topic.into(), total, ..Default::default() };
        assert_eq!(for_status(None, Some(s("a", 1)), Some(&s("a", 1))), None, "spec.deadLetter removed: cleared");
        assert_eq!(for_status(Some("a"), Some(s("a", 2)), Some(&s("a", 1))), Some(s("a", 2)));
        assert_eq!(for_status(Some("a"), None, Some(&s("a", 1))), Some(s("a", 1)), "not read yet: kept");
        assert_eq!(for_status(Some("b"), None, Some(&s("a", 1))), None, "topic changed: the old counts go");
        assert_eq!(for_status(Some("b"), Some(s("a", 3)), None), None);
    }

    #[test]
    fn read_errors_have_metric_reasons() {
        assert_eq!(DeadLetterError::TopicNotFound("t".into()).reason(), "TopicNotFound");
        assert_eq!(DeadLetterError::Kafka { topic: "t".into(), detail: "auth".into() }.reason(), "KafkaError");
    }
}
