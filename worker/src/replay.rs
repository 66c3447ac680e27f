//! Replay mode: `kpipe-worker` with `KPIPE_REPLAY_PLAN` re-processes a pipeline's dead letters once and exits.
//!
//! It reads the dead-letter topic with the replay's own consumer group (partitions assigned, not subscribed: one
//! replay pod at a time, no rebalances), from the group's committed offsets up to the end offsets in the plan, one
//! record after the other per partition (so records of one key stay in order). For each dead letter the plan
//! selects ([`kpipe_api::replay::Selection`]) it restores the original record — key, value and original headers
//! unchanged, the dead-letter context headers removed, the original topic/partition/offset/timestamp as its
//! coordinates — adds the header `kpipe.replay: <namespace>/<replay>` so the processor can tell a replay apart,
//! and hands it to the pipeline's processor with the pipeline's retry policy. A record that still fails (or a
//! reference record, whose payload the dead letter does not hold) is written to the parking topic: the dead letter
//! as it was (all its headers) plus `kpipe.replay`, `kpipe.replay.error.class`, `kpipe.replay.error.message` and
//! `kpipe.replay.attempts`. It never writes to the dead-letter topic.
//!
//! After each record it commits the next offset synchronously with the partition's cumulative
//! [`Progress`] in the commit metadata, so a killed replay resumes where it stopped with exact counts (the record
//! in flight when it died is processed again: at least once).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kpipe_api::replay::{self, Header, Progress, REPLAY_CONTEXT_PREFIX, REPLAY_HEADER, ReplayPlan};
use kpipe_api::worker_contract::WorkerConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::{Offset, TopicPartitionList};
use tokio::runtime::Handle;

use crate::backoff::{BackoffPolicy, jitter_unit};
use crate::classify::{Failure, FailureClass};
use crate::kafka_config::{self, Env};
use crate::metrics::Metrics;
use crate::processor::kafka::TopicLimits;
use crate::processor::producer::{KafkaProducer, Outgoing};
use crate::processor::{BatchOutcome, Processor};
use crate::record::Record;
use crate::run::{RunError, processor_for};

/// How long one Kafka request of the replay may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a replay stopped before it finished (the Job retries it; progress is kept).
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("invalid replay plan in KPIPE_REPLAY_PLAN: {0}")]
    Plan(#[from] serde_json::Error),
    #[error(transparent)]
    Setup(#[from] RunError),
    #[error("Kafka {what} failed: {source}")]
    Kafka { what: &'static str, source: KafkaError },
    #[error("cannot park dead letter {partition}@{offset} in {topic:?}: {source}")]
    Park { topic: String, partition: i32, offset: i64, source: KafkaError },
}

fn kafka(what: &'static str) -> impl Fn(KafkaError) -> ReplayError {
    move |source| ReplayError::Kafka { what, source }
}

/// What happened to one record of the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Skipped,
    Succeeded,
    Parked,
}

/// Adds one record's fate to a partition's progress (pure).
pub fn account(p: Progress, fate: Fate) -> Progress {
    match fate {
        Fate::Skipped => Progress { skipped: p.skipped + 1, ..p },
        Fate::Succeeded => Progress { replayed: p.replayed + 1, succeeded: p.succeeded + 1, ..p },
        Fate::Parked => Progress { replayed: p.replayed + 1, failed_again: p.failed_again + 1, ..p },
    }
}

/// The record handed to the processor for a dead letter, or `None` when it cannot be restored (not a kpipe dead
/// letter, or a reference record without its payload).
pub fn original_record(plan: &ReplayPlan, dl: &DeadLetter) -> Option<Record> {
    let o = replay::restore(&dl.headers)?;
    if o.truncated {
        return None;
    }
    let mut headers = o.headers;
    headers.push((REPLAY_HEADER.to_string(), Some(plan.replay.as_bytes().to_vec())));
    Some(Record {
        topic: o.topic.into(),
        partition: o.partition,
        offset: o.offset,
        timestamp_ms: o.timestamp_ms,
        key: dl.key.clone(),
        value: dl.value.clone(),
        headers,
        epoch: 0,
    })
}

/// A record of the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<Header>,
}

/// The headers of a parked record: the dead letter's own plus the replay's context.
pub fn parking_headers(plan: &ReplayPlan, dl: &DeadLetter, failure: &Failure, attempts: u32) -> Vec<Header> {
    let mut h = dl.headers.clone();
    let ctx = |k: &str| format!("{REPLAY_CONTEXT_PREFIX}{k}");
    h.push((REPLAY_HEADER.to_string(), Some(plan.replay.as_bytes().to_vec())));
    h.push((ctx("error.class"), Some(failure.class.label().into_bytes())));
    let mut message = failure.message.clone();
    message.truncate(1024);
    h.push((ctx("error.message"), Some(message.into_bytes())));
    h.push((ctx("attempts"), Some(attempts.to_string().into_bytes())));
    h
}

/// Runs a replay to completion; returns the progress summed over the partitions.
pub async fn run(config: WorkerConfig, plan_json: &str, env: Env) -> Result<Progress, ReplayError> {
    let plan: ReplayPlan = serde_json::from_str(plan_json)?;
    let metrics = Metrics::new().map_err(RunError::from)?;
    let producer = Arc::new(KafkaProducer::new(&kafka_config::producer(&config, &env)).map_err(kafka("producer"))?);
    let limits = Arc::new(TopicLimits::new(None));
    let processor = processor_for(&config, Some(&producer), &limits, &metrics)?;
    let backoff = BackoffPolicy::from(&config.spec.retry);
    let mut consumer_config = kafka_config::common(&config, &env);
    consumer_config
        .set("group.id", &plan.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = consumer_config.create().map_err(kafka("consumer"))?;
    let handle = Handle::current();
    let replayer = Replayer { plan, processor, producer, backoff, handle };
    tokio::task::spawn_blocking(move || replayer.replay(&consumer))
        .await
        .unwrap_or_else(|e| Err(ReplayError::Setup(RunError::Thread(std::io::Error::other(e.to_string())))))
}

struct Replayer {
    plan: ReplayPlan,
    processor: Arc<dyn Processor>,
    producer: Arc<KafkaProducer>,
    backoff: BackoffPolicy,
    handle: Handle,
}

impl Replayer {
    fn replay(&self, consumer: &BaseConsumer) -> Result<Progress, ReplayError> {
        let topic = self.plan.dead_letter_topic.as_str();
        let mut wanted = TopicPartitionList::new();
        for p in self.plan.end_offsets.keys() {
            wanted.add_partition(topic, *p);
        }
        let committed = consumer.committed_offsets(wanted, KAFKA_TIMEOUT).map_err(kafka("offset fetch"))?;
        // partition → (next offset, progress)
        let mut state: BTreeMap<i32, (Option<i64>, Progress)> = BTreeMap::new();
        for e in committed.elements_for_topic(topic) {
            let next = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            state.insert(e.partition(), (next, replay::decode_progress(e.metadata()).unwrap_or_default()));
        }
        let mut assign = TopicPartitionList::new();
        for (p, end) in &self.plan.end_offsets {
            let (next, _) = state.entry(*p).or_default();
            if next.is_none_or(|n| n < *end) {
                let at = next.map_or(Offset::Beginning, Offset::Offset);
                assign.add_partition_offset(topic, *p, at).map_err(kafka("assign"))?;
            }
        }
        let mut open = assign.count();
        tracing::info!(replay = %self.plan.replay, topic, partitions = open, "replay starting");
        if open > 0 {
            consumer.assign(&assign).map_err(kafka("assign"))?;
        }
        while open > 0 {
            let m = match consumer.poll(Duration::from_secs(1)) {
                None => {
                    open = self.close_finished(consumer, &mut state)?;
                    continue;
                }
                Some(Err(e)) => return Err(kafka("fetch")(e)),
                Some(Ok(m)) => m,
            };
            let (p, offset) = (m.partition(), m.offset());
            let Some(&end) = self.plan.end_offsets.get(&p) else { continue };
            if offset >= end {
                open = self.close_finished(consumer, &mut state)?;
                continue;
            }
            let dl = DeadLetter {
                partition: p,
                offset,
                timestamp_ms: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                // Not rust-rdkafka's header iterator: it panics on a header key that is not UTF-8.
                headers: kpipe_rdkafka_native::copy_headers(&m).headers,
            };
            drop(m);
            let fate = self.handle(&dl)?;
            let entry = state.entry(p).or_default();
            entry.1 = account(entry.1, fate);
            entry.0 = Some(offset + 1);
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(topic, p, Offset::Offset(offset + 1))
                .and_then(|()| {
                    commit
                        .find_partition(topic, p)
                        .map(|mut e| e.set_metadata(replay::encode_progress(&entry.1)))
                        .ok_or(KafkaError::Subscription("partition missing".into()))
                })
                .map_err(kafka("commit"))?;
            consumer.commit(&commit, CommitMode::Sync).map_err(kafka("commit"))?;
            if offset + 1 >= end {
                open = self.close_finished(consumer, &mut state)?;
            }
        }
        let total = state.values().fold(Progress::default(), |acc, (_, p)| acc.plus(*p));
        tracing::info!(replay = %self.plan.replay, replayed = total.replayed, succeeded = total.succeeded,
            failed_again = total.failed_again, skipped = total.skipped, "replay finished");
        Ok(total)
    }

    /// Partitions still to read: those whose position is below their end offset. A partition whose remaining
    /// offsets hold no records (transaction markers, compaction) counts as finished once the consumer's position
    /// reached the end.
    fn close_finished(
        &self,
        consumer: &BaseConsumer,
        state: &mut BTreeMap<i32, (Option<i64>, Progress)>,
    ) -> Result<usize, ReplayError> {
        let topic = self.plan.dead_letter_topic.as_str();
        let positions = consumer.position().map_err(kafka("position"))?;
        let mut open = 0;
        for (p, end) in &self.plan.end_offsets {
            let read = state.get(p).and_then(|(n, _)| *n);
            let position = positions.find_partition(topic, *p).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
            let low = if read.is_none() {
                consumer.fetch_watermarks(topic, *p, KAFKA_TIMEOUT).map_err(kafka("watermarks"))?.0
            } else {
                0
            };
            let done = read.is_some_and(|r| r >= *end) || position.is_some_and(|o| o >= *end) || low >= *end;
            if !done {
                open += 1;
            }
        }
        Ok(open)
    }

    /// Replays one record of the dead-letter topic.
    fn handle(&self, dl: &DeadLetter) -> Result<Fate, ReplayError> {
        if !self.plan.selection.selects(dl.offset, dl.timestamp_ms, &dl.headers) {
            return Ok(Fate::Skipped);
        }
        let Some(record) = original_record(&self.plan, dl) else {
            let f = Failure {
                class: FailureClass::Encode,
                message: "the dead letter does not hold the original record (reference record or no context)".into(),
                retry_after: None,
            };
            self.park(dl, &f, 0)?;
            return Ok(Fate::Parked);
        };
        let record = Arc::new(record);
        let mut attempts = 0u32;
        loop {
            let outcome = self.handle.block_on(self.processor.process(std::slice::from_ref(&record)));
            let failure = match outcome {
                BatchOutcome::Partial(f) if f.is_empty() => return Ok(Fate::Succeeded),
                BatchOutcome::Partial(mut f) => f.remove(0).1,
                BatchOutcome::Failed(f) => f,
            };
            attempts += 1;
            if !failure.class.is_retryable() || self.backoff.may_retry(attempts, None).is_err() {
                tracing::warn!(offset = dl.offset, partition = dl.partition, attempts, error = %failure.message,
                    "replayed record failed again: parked");
                self.park(dl, &failure, attempts)?;
                return Ok(Fate::Parked);
            }
            let wait = self.backoff.delay(attempts, jitter_unit()).max(failure.retry_after.unwrap_or_default());
            std::thread::sleep(wait);
        }
    }

    fn park(&self, dl: &DeadLetter, failure: &Failure, attempts: u32) -> Result<(), ReplayError> {
        let headers = parking_headers(&self.plan, dl, failure, attempts)
            .iter()
            .fold(OwnedHeaders::new(), |h, (k, v)| h.insert(KafkaHeader { key: k, value: v.as_deref() }));
        let record =
            Outgoing { key: dl.key.as_deref(), value: dl.value.as_deref(), headers: Some(headers), timestamp_ms: None };
        let sent = self.handle.block_on(self.producer.send(&self.plan.parking_topic, record));
        sent.map_err(|source| ReplayError::Park {
            topic: self.plan.parking_topic.clone(),
            partition: dl.partition,
            offset: dl.offset,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kpipe_api::replay::Selection;

    fn h(k: &str, v: &str) -> Header {
        (k.to_string(), Some(v.as_bytes().to_vec()))
    }

    fn plan() -> ReplayPlan {
        ReplayPlan {
            replay: "ns/r1".into(),
            dead_letter_topic: "dlq".into(),
            parking_topic: "parked".into(),
            group_id: "g".into(),
            end_offsets: BTreeMap::from([(0, 10)]),
            selection: Selection { pipeline: "orders".into(), ..Default::default() },
        }
    }

    fn dl() -> DeadLetter {
        DeadLetter {
            partition: 0,
            offset: 4,
            timestamp_ms: Some(2_000),
            key: Some(b"k1".to_vec()),
            value: Some(b"v".to_vec()),
            headers: vec![
                h("trace", "t1"),
                h("kpipe.original.topic", "orders"),
                h("kpipe.original.partition", "2"),
                h("kpipe.original.offset", "77"),
                h("kpipe.original.timestamp", "1000"),
                h("kpipe.error.class", "http_503"),
                h("kpipe.pipeline", "orders"),
            ],
        }
    }

    #[test]
    fn the_processor_gets_the_original_record_marked_as_a_replay() {
        let r = original_record(&plan(), &dl()).unwrap();
        assert_eq!((&*r.topic, r.partition, r.offset, r.timestamp_ms), ("orders", 2, 77, Some(1000)));
        assert_eq!((r.key.as_deref(), r.value.as_deref()), (Some(&b"k1"[..]), Some(&b"v"[..])));
        assert_eq!(r.headers, vec![h("trace", "t1"), h("kpipe.replay", "ns/r1")]);
        let mut truncated = dl();
        truncated.headers.push(h("kpipe.payload.truncated", "true"));
        assert_eq!(original_record(&plan(), &truncated), None);
    }

    #[test]
    fn parked_records_keep_the_dead_letter_and_add_the_replay_context() {
        let f = Failure { class: FailureClass::HttpStatus(400), message: "bad".into(), retry_after: None };
        let hs = parking_headers(&plan(), &dl(), &f, 3);
        assert_eq!(&hs[..dl().headers.len()], &dl().headers[..]);
        assert_eq!(
            &hs[dl().headers.len()..],
            &[
                h("kpipe.replay", "ns/r1"),
                h("kpipe.replay.error.class", "http_400"),
                h("kpipe.replay.error.message", "bad"),
                h("kpipe.replay.attempts", "3")
            ]
        );
    }

    #[test]
    fn progress_counts_each_fate() {
        let p = [Fate::Succeeded, Fate::Parked, Fate::Skipped, Fate::Succeeded]
            .into_iter()
            .fold(Progress::default(), account);
        assert_eq!(p, Progress { replayed: 3, succeeded: 2, failed_again: 1, skipped: 1 });
    }
}
