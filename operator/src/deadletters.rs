//! Dead-letter inspection and per-pipeline condition metrics.
//!
//! Every [`INTERVAL`] the reader lists the ConsumerPipelines it watches and
//! - exports each pipeline's conditions as `kpipe_operator_pipeline_condition{type,status,reason}` and
//!   `spec.suspend` as `kpipe_operator_pipeline_suspended` (what the chart's alerts match on), and
//! - for a pipeline with `spec.deadLetter.topic`, reads what was appended to that topic since its last pass and
//!   counts the records whose `kpipe.pipeline` header names the pipeline, by their `kpipe.error.class` header, into
//!   `status.deadLetters` (server-side apply with its own field manager [`FIELD_MANAGER`], so it never fights the
//!   reconciler over the rest of the status) and `kpipe_operator_pipeline_dead_letters{class}`.
//!
//! Why the topic and not the workers' metrics: the topic is what a replay reads and what an operator inspects, it
//! survives worker restarts and scale-to-zero, and a topic shared by pipelines is split by the header. Cost: each
//! dead letter is fetched once per leader term (at most [`MAX_RECORDS_PER_PASS`] per pipeline and pass).
//! Limits: counts live in memory (a new leader re-reads the retained topic, so records removed by retention in
//! the meantime stop being counted); pipelines with `source.auth` (SASL/TLS) are not read (their status has no
//! `deadLetters`), like the offset keeper.
//!
//! The decisions ([`resume_at`], [`Tally::count`], [`condition_series`]) are pure and unit-tested; the Kafka and
//! apiserver I/O is at the edges ([`read_topic`], [`DeadLetterReader::run`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kpipe_api::v1alpha1::{ConsumerPipeline, ConsumerPipelineStatus, DeadLetterSummary};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use rdkafka::Message;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use tokio::sync::watch;

use crate::controller::Scope;
use crate::leader::LeaderFence;
use crate::metrics::Metrics;
use crate::probe::Cluster;

/// Field manager of `status.deadLetters` (the reconciler applies the rest of the status with its own).
pub const FIELD_MANAGER: &str = "kpipe-operator-dead-letters";
/// How often pipelines are listed and dead-letter topics read.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Records read from one dead-letter topic per pass (the rest is read in the next passes).
pub const MAX_RECORDS_PER_PASS: usize = 50_000;
/// Header naming the pipeline that wrote a dead letter (its `metadata.name`).
pub const PIPELINE_HEADER: &str = "kpipe.pipeline";
/// Header with the error class of a dead letter's last failure.
pub const CLASS_HEADER: &str = "kpipe.error.class";

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

/// One `kpipe_operator_pipeline_condition` series: (type, status, reason).
pub type ConditionSeries = (String, String, String);

/// The condition series of a pipeline's status: one per condition, its current status and reason.
pub fn condition_series(status: Option<&ConsumerPipelineStatus>) -> Vec<ConditionSeries> {
    status
        .map(|s| s.conditions.iter().map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone())).collect())
        .unwrap_or_default()
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
                let (mut owner, mut class) = (None, None);
                if let Some(headers) = m.headers() {
                    for h in headers.iter() {
                        match h.key {
                            PIPELINE_HEADER => owner = h.value,
                            CLASS_HEADER => class = h.value,
                            _ => {}
                        }
                    }
                }
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
/// cluster, kept across passes (a client per pipeline and pass would reconnect every few seconds).
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

/// Lists the pipelines every [`INTERVAL`], exports their condition gauges and keeps `status.deadLetters` current.
pub struct DeadLetterReader {
    client: Client,
    metrics: Metrics,
    fence: LeaderFence,
    timeout: Duration,
    /// uid → (namespace, name, topic, tally).
    tallies: Mutex<HashMap<String, Tracked>>,
    /// [`Cluster::key`] → the consumer reading that cluster's dead-letter topics (passes are sequential).
    consumers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

struct Tracked {
    namespace: String,
    name: String,
    topic: String,
    tally: Tally,
}

impl DeadLetterReader {
    /// A reader writing through `client` while `fence` allows it.
    pub fn new(client: Client, metrics: Metrics, fence: LeaderFence, timeout: Duration) -> Self {
        Self {
            client,
            metrics,
            fence,
            timeout,
            tallies: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
        }
    }

    /// Runs passes until `stop` turns true.
    pub async fn run(self: Arc<Self>, scopes: Vec<Scope>, mut stop: watch::Receiver<bool>) {
        loop {
            self.pass(&scopes).await;
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(INTERVAL) => {}
            }
        }
    }

    async fn pass(&self, scopes: &[Scope]) {
        let mut seen = HashSet::new();
        for scope in scopes {
            let api: Api<ConsumerPipeline> = match scope {
                Scope::All => Api::all(self.client.clone()),
                Scope::Namespace(ns) => Api::namespaced(self.client.clone(), ns),
            };
            let list = match api.list(&ListParams::default()).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter reader: cannot list pipelines");
                    // Keep what is known for this scope: forget nothing on a failed list.
                    let known = self.tallies.lock().map(|t| t.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
                    seen.extend(known);
                    continue;
                }
            };
            for p in list.items {
                let Some(uid) = p.uid() else { continue };
                seen.insert(uid.clone());
                self.export_conditions(&p);
                self.read_dead_letters(&uid, &p).await;
            }
        }
        self.forget_except(&seen);
    }

    fn export_conditions(&self, p: &ConsumerPipeline) {
        let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
        self.metrics.set_conditions(&ns, &name, &condition_series(p.status.as_ref()));
        self.metrics.pipeline_suspended.with_label_values(&[&ns, &name]).set(i64::from(p.spec.suspend));
    }

    async fn read_dead_letters(&self, uid: &str, p: &ConsumerPipeline) {
        let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
        let Some(topic) = p.spec.dead_letter.as_ref().map(|d| d.topic.clone()) else { return };
        if p.spec.source.auth.is_some() {
            return;
        }
        let mut tally = {
            let Ok(t) = self.tallies.lock() else { return };
            match t.get(uid) {
                Some(tr) if tr.topic == topic => tr.tally.clone(),
                _ => Tally::default(),
            }
        };
        let cluster = Cluster::plaintext(p.spec.source.bootstrap_servers.clone());
        let key = cluster.key();
        let cached = self.consumers.lock().ok().and_then(|c| c.get(&key).cloned());
        let (timeout, t2, pipeline) = (self.timeout, topic.clone(), name.clone());
        let read = tokio::task::spawn_blocking(move || {
            let consumer = match cached {
                Some(c) => c,
                None => match dead_letter_consumer(&cluster, timeout) {
                    Ok(c) => Arc::new(c),
                    Err(e) => return (None, Err(e), tally),
                },
            };
            let r = read_topic(&consumer, &t2, &pipeline, &mut tally, timeout, MAX_RECORDS_PER_PASS);
            (Some(consumer), r, tally)
        })
        .await;
        let tally = match read {
            Ok((consumer, Ok(()), tally)) => {
                if let (Some(c), Ok(mut cached)) = (consumer, self.consumers.lock()) {
                    cached.insert(key, c);
                }
                tally
            }
            Ok((_, Err(e), _)) => {
                // A fresh client next pass: the failure may be the connection's.
                if let Ok(mut cached) = self.consumers.lock() {
                    cached.remove(&key);
                }
                tracing::debug!(namespace = %ns, pipeline = %name, error = %e, "dead-letter topic not read");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %DeadLetterError::Task(e.to_string()), "dead-letter reader");
                return;
            }
        };
        // Written when the listed status differs (observedAt aside): a failed write is retried in the next pass.
        let summary = tally.summary(&topic, None);
        let current = p
            .status
            .as_ref()
            .and_then(|s| s.dead_letters.clone())
            .map(|d| DeadLetterSummary { observed_at: None, ..d });
        if current.as_ref() != Some(&summary) {
            self.publish(&ns, &name, &tally.summary(&topic, Some(Time(jiff::Timestamp::now())))).await;
        }
        for (class, n) in &tally.by_class {
            self.metrics.pipeline_dead_letters.with_label_values(&[&ns, &name, class]).set(*n);
        }
        if let Ok(mut t) = self.tallies.lock() {
            t.insert(uid.to_string(), Tracked { namespace: ns, name, topic, tally });
        }
    }

    /// Applies `status.deadLetters` (while this replica may write).
    async fn publish(&self, ns: &str, name: &str, summary: &DeadLetterSummary) {
        if !self.fence.may_act() {
            return;
        }
        let api: Api<ConsumerPipeline> = Api::namespaced(self.client.clone(), ns);
        let patch = serde_json::json!({
            "apiVersion": "kpipe.io/v1alpha1",
            "kind": "ConsumerPipeline",
            "status": { "deadLetters": summary },
        });
        if let Err(e) = api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(patch)).await {
            tracing::warn!(namespace = %ns, pipeline = %name, error = %e, "cannot write status.deadLetters");
        }
    }

    fn forget_except(&self, seen: &HashSet<String>) {
        let gone: Vec<Tracked> = match self.tallies.lock() {
            Ok(mut t) => {
                let uids: Vec<String> = t.keys().filter(|u| !seen.contains(*u)).cloned().collect();
                uids.iter().filter_map(|u| t.remove(u)).collect()
            }
            Err(_) => return,
        };
        for tr in gone {
            self.metrics.forget_dead_letters(&tr.namespace, &tr.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

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
    fn condition_series_mirror_the_status() {
        assert!(condition_series(None).is_empty());
        let c = |t: &str, s: &str, r: &str| Condition {
            type_: t.into(),
            status: s.into(),
            reason: r.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(jiff::Timestamp::UNIX_EPOCH),
        };
        let status = ConsumerPipelineStatus {
            conditions: vec![c("Ready", "True", "Running"), c("Degraded", "True", "TopicNotFound")],
            ..Default::default()
        };
        assert_eq!(
            condition_series(Some(&status)),
            vec![
                ("Ready".to_string(), "True".to_string(), "Running".to_string()),
                ("Degraded".to_string(), "True".to_string(), "TopicNotFound".to_string())
            ]
        );
    }
}
